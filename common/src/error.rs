//! The crate's one error type, grouped by the outside system that failed.

use crate::config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("kafka: {context}: {source}")]
    Kafka {
        context: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("kafka: {0}")]
    KafkaAdmin(String),
    #[error("clickhouse: {context}: {source}")]
    Clickhouse {
        context: String,
        #[source]
        source: ::clickhouse::error::Error,
    },
    #[error("clickhouse migration {version} ({name}): {reason}")]
    ClickhouseMigration {
        version: u32,
        name: String,
        reason: String,
    },
    #[error("postgres: {context}: {source}")]
    Postgres {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("postgres migrations: {0}")]
    PostgresMigration(#[from] sqlx::migrate::MigrateError),
    #[error("http server: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(String),
    #[error("task failed: {0}")]
    Task(String),
    /// Stored data that no longer passes validation (written by hand, or by an older rule).
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
}
