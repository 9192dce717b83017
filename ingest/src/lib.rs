//! meterline ingest: takes usage events over HTTP and writes them to `usage.raw`, keeps
//! the meter definitions, and answers usage queries from ClickHouse.
//!
//! Layout:
//! - [`config`]: the environment variables it reads.
//! - [`startup`]: wiring of clients, readiness checks and the HTTP server.
//! - [`routes`]: the HTTP API (`/v1/events`, `/v1/events/bulk`, `/v1/meters`, `/v1/usage`).
//! - [`events`]: turning a request's event into a `usage.raw` message (pure functions).
//! - [`kafka`]: the acknowledged, idempotent writer of `usage.raw`.
//! - [`metrics`]: the names of every metric ingest exports.
//! - [`error`]: the crate's error type.

pub mod config;
pub mod error;
pub mod events;
pub mod kafka;
pub mod metrics;
pub mod routes;
pub mod startup;

pub use config::Config;
pub use error::Error;
