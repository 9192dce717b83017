//! Integration tests on the real local stack (`dev/up`): Apache Kafka, ClickHouse and
//! PostgreSQL, each test in its own namespace so that they run in parallel.

mod aggregator;
mod allow_list;
mod audit;
mod chaos;
mod clickhouse;
mod customer_import;
mod dlq_replay;
mod ingest;
mod kafka;
mod mappings_api;
mod meters;
mod metrics_catalogue;
mod postgres;
mod retention;
mod services;
mod sink;
mod sink_replicas;
mod tls;
mod usage_api;
mod webhook_relay;
