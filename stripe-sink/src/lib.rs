//! meterline stripe-sink: publishes window totals to Stripe meter events, and serves the
//! Stripe control API.
//!
//! Layout:
//! - [`config`]: the environment variables it reads.
//! - [`routes`]: the control API (`/v1/stripe/...`), one error type for every handler.
//! - [`sync`]: the loops, a file per step: usage.windows into the ledger (`record`), claiming
//!   ready windows and releasing mapped ones (`dispatch`), settling one window with Stripe
//!   (`settle`).
//! - [`billing`]: the rules as plain functions: billable whole numbers, differences,
//!   timestamps, Stripe's time bounds (from `meterline_schemas::stripe_limits`).
//! - [`identifier`]: the deterministic identifier (and Idempotency-Key) of each meter event.
//! - [`ledger`]: the sync ledger in PostgreSQL (windows, sends, jobs).
//! - [`stripe`]: the Stripe client and the classification of its answers.
//! - [`pacing`]: per-account send slots shared by every replica, circuit breaker, the jittered backoff of Stripe
//!   requests: where the rate limit is applied.
//! - [`kafka`]: the publisher of resync requests.
//! - [`metrics`]: the names of every metric the sink exports and their emit functions.
//! - [`mappings`]: customer and meter mappings in PostgreSQL.
//! - [`bulk`]: the CSV file of the bulk mapping upload, read into validated rows.
//! - [`import`]: imports of a Stripe account's existing customers, resumable jobs.
//! - [`webhook_events`]: the consumer of `stripe.webhooks` that maintains customer mappings
//!   and records Stripe's meter error reports.
//! - [`startup`]: wiring of stores, loops, readiness checks and the HTTP server.
//! - [`error`]: the crate's error type.

pub mod billing;
pub mod bulk;
pub mod config;
pub mod error;
pub mod identifier;
pub mod import;
pub mod kafka;
pub mod ledger;
pub mod mappings;
pub mod metrics;
pub mod pacing;
pub mod routes;
pub mod startup;
pub mod stripe;
pub mod sync;
pub mod webhook_events;

pub use config::Config;
pub use error::Error;
