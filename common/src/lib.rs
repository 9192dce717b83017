//! Shared plumbing of the meterline services: only what every service needs to talk to the
//! outside systems and to run. The billing domain lives in crates named after it
//! (`meterline-accounts`, `meterline-catalog`) and in the services.
//!
//! Layout, one module per concern so that no service copies another's setup:
//! - [`api`]: the JSON error answer and JSON body extractor of every HTTP API.
//! - [`auth`]: bearer JWTs and the [`auth::TenantScope`] every query is scoped by.
//! - [`config`]: typed reading of environment variables; a missing or malformed variable is an
//!   error that names it.
//! - [`kafka`]: the one Kafka kit: topic names (with `TOPIC_PREFIX`), client settings, topic
//!   creation, acknowledged writes and their retriable/permanent split, receive-or-shutdown,
//!   offsets and the commit, dead letters, and the readiness and lag watches.
//! - [`clickhouse`]: the client, the versioned SQL migrator and its readiness check.
//! - [`postgres`]: the connection pool, the sqlx migrations and the readiness check.
//! - [`retry`]: the doubling backoff and the retriable/permanent split of a failed step.
//! - [`retention`]: the floor of every retention (Stripe's 35 days plus a week), the
//!   `events_processed` TTL, and the pruning each service runs over the tables it owns.
//! - [`telemetry`]: JSON log lines.
//! - [`metrics`]: the Prometheus recorder every service installs once.
//! - [`ops`]: the `/healthz`, `/readyz` and `/metrics` routes every service serves.
//! - [`shutdown`]: the signal that starts a graceful shutdown, and the pause it cuts short.
//! - [`server`]: binding and serving an axum router until shutdown.
//! - [`service`]: what every service binary does around its own work (exit codes, logs,
//!   metrics, signals, the HTTP server).

pub mod api;
pub mod auth;
pub mod clickhouse;
pub mod config;
pub mod error;
pub mod kafka;
pub mod metrics;
pub mod ops;
pub mod postgres;
pub mod retention;
pub mod retry;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod telemetry;

pub use error::Error;
