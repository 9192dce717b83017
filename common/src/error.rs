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
    // The HTTP client's own message is only "client error (SendRequest)": the cause under it
    // (a reset connection, a refused certificate) is what an operator needs.
    #[error("clickhouse: {context}: {}", with_causes(source))]
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

/// An error and the errors under it: the HTTP client says only "client error (Connect)",
/// the cause (a refused connection, an untrusted certificate) is further down.
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        // Some layers repeat their cause in their own message.
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}
