//! The crate's one error type.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Common(#[from] meterline_common::Error),
    #[error("shutdown: {0}")]
    Shutdown(String),
}
