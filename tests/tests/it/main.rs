//! Integration tests on the real local stack (`dev/up`): Apache Kafka, ClickHouse and
//! PostgreSQL, each test in its own namespace so that they run in parallel.

mod aggregator;
mod allow_list;
mod clickhouse;
mod ingest;
mod customer_import;
mod dlq_replay;
mod kafka;
mod mappings_api;
mod meters;
mod metrics_catalogue;
mod postgres;
mod services;
mod retention;
mod sink;
mod webhook_relay;
mod usage_api;
