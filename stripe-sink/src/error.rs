//! The crate's one error type.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Common(#[from] meterline_common::Error),
    #[error("postgres: {context}: {source}")]
    Postgres {
        context: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("kafka: {0}")]
    Publish(meterline_common::kafka::WriteError),
    #[error("stripe config: {0}")]
    Config(String),
    #[error("stored value is invalid: {0}")]
    Corrupt(String),
    /// The window was claimed again after this dispatcher's lease ran out: it writes nothing.
    #[error("window {batch_id} was claimed by another dispatcher; this one's claim ran out")]
    ClaimLost { batch_id: i64 },
    #[error("task failed: {0}")]
    Task(String),
}

/// Wraps a PostgreSQL error with what was being done: `.map_err(db("reading x"))`. The one
/// helper for every PostgreSQL call of the crate.
pub(crate) fn db(context: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |source| Error::Postgres { context, source }
}

impl meterline_common::retry::Retriable for Error {
    /// PostgreSQL trouble of the moment can pass; everything else will fail again.
    fn is_retriable(&self) -> bool {
        match self {
            Self::Postgres { source, .. } => meterline_common::retry::postgres_retriable(source),
            _ => false,
        }
    }
}
