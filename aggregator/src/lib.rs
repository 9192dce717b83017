//! meterline aggregator: consumes `usage.raw`, writes billable rows to ClickHouse, and
//! publishes windowed totals to `usage.windows`.
//!
//! Layout:
//! - [`config`]: the environment variables it reads.
//! - [`billing`]: the rules as plain functions: meters an event feeds, quantities, windows
//!   due and expired, revisions.
//! - [`pipeline`]: the loops: usage.raw into ClickHouse, due windows out, resync requests.
//! - [`clickhouse`]: `events_processed` writes and deduplicated window aggregates.
//! - [`windows`]: the window registry in PostgreSQL (dirty marks, claims, revisions).
//! - [`meter_cache`]: meters and window sizes of every tenant, refreshed per batch.
//! - [`kafka`]: consumers, the window publisher and the dead-letter writer.
//! - [`metrics`]: the names of every metric the aggregator exports.
//! - [`startup`]: wiring of clients, loops, readiness checks and the HTTP server.
//! - [`error`]: the crate's error type.

pub mod billing;
pub mod clickhouse;
pub mod config;
pub mod error;
pub mod kafka;
pub mod meter_cache;
pub mod metrics;
pub mod pipeline;
pub mod startup;
pub mod windows;

pub use config::Config;
pub use error::Error;
