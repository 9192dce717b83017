//! The properties the fuzz targets check, one module per target. Each module is also compiled
//! into the regression test of the crate it exercises (`#[path = ...]`), which replays the
//! committed inputs of `fuzz/seeds/<target>/` and `fuzz/regressions/<target>/` on stable, so
//! what the fuzzer found stays fixed without libFuzzer in CI.
//!
//! Layout:
//! - [`usage_raw`]: `RawUsageEvent::from_json_bytes`, the `usage.raw` decoder (schemas).
//! - [`ingest_event`]: the request body of `POST /v1/events` and one event of a bulk request
//!   (ingest), and what it turns into on `usage.raw`.
//! - [`stripe_signature`]: `Stripe-Signature` parsing and verification (webhook-relay).
//! - [`standin_form`]: the Stripe stand-in's form decoder (tests/stripe-standin).
//! - [`replay`]: runs a property over committed inputs; used by the regression tests only.

pub mod ingest_event;
pub mod replay;
pub mod standin_form;
pub mod stripe_signature;
pub mod usage_raw;
