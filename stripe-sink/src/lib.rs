//! meterline stripe-sink: publishes window totals to Stripe meter events, and serves the
//! Stripe control API.
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
