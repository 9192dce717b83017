//! meterline aggregator: consumes `usage.raw`, writes billable rows to ClickHouse, and
//! publishes windowed totals to `usage.windows`.
//!
//! Layout:
//! - [`config`]: the environment variables it reads.
//! - [`billing`]: the rules as plain functions: meters an event feeds, quantities, expired
//!   windows (Stripe's limits), revisions.
//! - [`first_copy`]: which copy of an event counts, and the timestamp it bills at.
//! - [`due`]: when a window becomes due, the one rule the marking, the claims and the lag
//!   metric use.
//! - [`pipeline`]: the loops, a file each: usage.raw into ClickHouse (`consume`, with
//!   `metering`), due windows out (`publish`), resync requests (`resync`).
//! - [`clickhouse`]: `events_processed` writes, the first-copy index, and deduplicated window
//!   aggregates.
//! - [`windows`]: the window registry in PostgreSQL (dirty marks, claims, revisions).
//! - [`meter_cache`]: meters and window sizes of every tenant, refreshed per batch.
//! - [`kafka`]: batched reads of `usage.raw`, the consumer lag, the window publisher (on the
//!   shared Kafka kit of `meterline_common::kafka`).
//! - [`metrics`]: the names of every metric the aggregator exports.
//! - [`startup`]: wiring of clients, loops, readiness checks and the HTTP server.
//! - [`error`]: the crate's error type.

pub mod billing;
pub mod clickhouse;
pub mod config;
pub mod due;
pub mod error;
pub mod first_copy;
pub mod kafka;
pub mod meter_cache;
pub mod metrics;
pub mod pipeline;
pub mod startup;
pub mod windows;

pub use config::Config;
pub use error::Error;
