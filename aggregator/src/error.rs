//! The crate's one error type, grouped by the outside system that failed.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Common(#[from] meterline_common::Error),
    #[error("kafka: publishing window totals: {0}")]
    Publish(meterline_common::kafka::WriteError),
    #[error(
        "clickhouse: {context}: {}",
        meterline_common::error::with_causes(source)
    )]
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
