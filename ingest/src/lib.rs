//! meterline ingest: takes usage events over HTTP and writes them to `usage.raw`.
//!
//! Layout:
//! - [`config`]: the environment variables it reads.
//! - [`startup`]: wiring of clients, readiness checks and the HTTP server.
//! - [`error`]: the crate's error type.

pub mod config;
pub mod error;
pub mod startup;

pub use config::Config;
pub use error::Error;
