//! The crate's one error type, grouped by the outside system that failed.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Common(#[from] meterline_common::Error),
    #[error("kafka: {context}: {source}")]
    Kafka {
        context: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("clickhouse: {context}: {source}")]
    Clickhouse {
        context: &'static str,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error("postgres: {context}: {source}")]
    Postgres {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("meters: {0}")]
    Meters(String),
    #[error("quantity: {0}")]
    Quantity(String),
    #[error("stored window is invalid: {0}")]
    Corrupt(String),
    #[error("task failed: {0}")]
    Task(String),
}
