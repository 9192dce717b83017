//! meterline webhook-relay: verifies signed Stripe webhooks per tenant environment and
//! publishes them to `stripe.webhooks`.
//!
//! Layout:
//! - [`config`]: the environment variables it reads.
//! - [`startup`]: wiring of clients, readiness checks and the HTTP server.
//! - [`routes`]: the HTTP API, `POST /webhooks/stripe/{tenant_id}/{environment_id}`.
//! - [`extract`]: the extractor that yields only deliveries whose signature verified.
//! - [`sources`]: the optional allow-list of source networks and trusted proxies.
//! - [`signature`]: `Stripe-Signature` parsing and verification over raw bytes (pure).
//! - [`event`]: a verified body as a Stripe event and a `stripe.webhooks` message (pure).
//! - [`secrets`]: which secrets verify a tenant environment's deliveries.
//! - [`relay`]: deduplicate, publish, then record, in that order.
//! - [`single_flight`]: one delivery per event at a time within the process.
//! - [`kafka`]: the acknowledged, idempotent writer of `stripe.webhooks`.
//! - [`deliveries`]: the deduplication log in PostgreSQL.
//! - [`metrics`]: the names of every metric the relay exports.
//! - [`error`]: the crate's error types.

pub mod config;
pub mod deliveries;
pub mod error;
pub mod event;
pub mod extract;
pub mod kafka;
pub mod metrics;
pub mod relay;
pub mod routes;
pub mod secrets;
pub mod signature;
pub mod single_flight;
pub mod sources;
pub mod startup;

pub use config::Config;
pub use error::Error;
