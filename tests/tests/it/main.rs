//! Integration tests on the real local stack (`dev/up`): Apache Kafka, ClickHouse and
//! PostgreSQL, each test in its own namespace so that they run in parallel.

mod clickhouse;
mod kafka;
mod postgres;
mod services;
