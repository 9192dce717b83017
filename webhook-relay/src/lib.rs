//! meterline webhook-relay: verifies signed Stripe webhooks per tenant and publishes them
//! to `stripe.webhooks`.
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
