//! Shared plumbing of the meterline services.
//!
//! Layout, one module per concern so that no service copies another's setup:
//! - [`api`]: the JSON error answer and JSON body extractor of every HTTP API.
//! - [`audit`]: the audit trail of Stripe configuration, mapping and key changes and of API
//!   key decryptions; rows built from typed changes that cannot hold a secret.
//! - [`auth`]: bearer JWTs and the [`auth::TenantScope`] every query is scoped by.
//! - [`crypto`]: AES-256-GCM for secrets at rest, with key ids for rotation.
//! - [`config`]: typed reading of environment variables; a missing or malformed variable is an
//!   error that names it.
//! - [`kafka`]: topic names (with `TOPIC_PREFIX`), client settings for producers and consumer
//!   groups, topic creation, and the broker readiness check. No rdkafka type leaves this crate's
//!   `kafka` module except the client handles the services drive.
//! - [`clickhouse`]: the client, the versioned SQL migrator and its readiness check.
//! - [`postgres`]: the connection pool, the sqlx migrations and the readiness check.
//! - [`retention`]: how long ledger rows, webhook deduplication records and ClickHouse rows
//!   are kept (never under Stripe's 35 days plus a week), and the pruning.
//! - [`meters`]: the meter definitions store, the only code touching the `meters` table;
//!   every query scoped by tenant and environment.
//! - [`stripe_config`]: each tenant's Stripe key, webhook secrets and sync settings, stored
//!   encrypted.
//! - [`telemetry`]: JSON log lines.
//! - [`metrics`]: the Prometheus recorder every service installs once.
//! - [`ops`]: the `/healthz`, `/readyz` and `/metrics` routes every service serves.
//! - [`scope_map`]: a map keyed by tenant and environment, searched without copying ids.
//! - [`window_sizes`]: each tenant's window size history, changed only on boundaries of both
//!   sizes so that windows never overlap.
//! - [`window_totals`]: window totals of a customer and meter read from ClickHouse exactly as
//!   the sync computes them (deduplicated rows, the same aggregates and windows).
//! - [`shutdown`]: the signal that starts a graceful shutdown.
//! - [`server`]: binding and serving an axum router until shutdown.
//! - [`service`]: what every service binary does around its own work (exit codes, logs,
//!   metrics, signals, the HTTP server).

pub mod api;
pub mod audit;
pub mod auth;
pub mod clickhouse;
pub mod config;
pub mod crypto;
pub mod error;
pub mod kafka;
pub mod meters;
pub mod metrics;
pub mod ops;
pub mod postgres;
pub mod retention;
pub mod retry;
pub mod scope_map;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod stripe_config;
pub mod telemetry;
pub mod window_sizes;
pub mod window_totals;

pub use error::Error;
