//! The sync: window totals from `usage.windows` into the ledger, and from the ledger to
//! Stripe.
//!
//! 1. [`record`] ([`consume_windows`]) records each published total in the ledger and only
//!    then commits its offset (a redelivery re-records the same total: harmless).
//! 2. [`mod@dispatch`] ([`dispatch()`]) runs workers that claim ready windows (one per
//!    customer and meter at a time) and [`settle`] each: resend an outstanding meter event
//!    unchanged, or send the change of the window's total not yet accounted for, rounded
//!    against the customer and meter's carry, paced by the account's rate limit, behind
//!    its circuit breaker, retried with backoff.
//! 3. [`release_waiting`] (in [`mod@dispatch`]) moves windows waiting for a customer mapping
//!    back to pending once the mapping exists, and windows skipped for their configuration
//!    once sync and their meter mapping are on again (from a webhook, the API or an import).

use std::sync::Arc;
use std::time::Duration;

use meterline_accounts::stripe_config::StripeConfigStore;
use meterline_catalog::meters::MeterStore;
use meterline_common::kafka::DeadLetters;

use crate::config::StripeSettings;
use crate::ledger::Ledger;
use crate::mappings::MappingStore;
use crate::pacing::{Backoff, Pacer};
use crate::stripe::StripeClient;

pub mod dispatch;
pub mod record;
pub mod settle;

pub use dispatch::{dispatch, release_waiting};
pub use record::consume_windows;

pub(crate) const SERVICE: &str = "stripe-sink";

/// A meter event never answered for this long may have been recorded by Stripe and then
/// forgotten with its identifier (24 h): resending it could bill twice.
pub(super) const UNKNOWABLE_AFTER: time::Duration = time::Duration::hours(23);

/// Everything the sync needs.
pub struct SyncContext {
    pub ledger: Ledger,
    /// The meters' definitions: which Stripe formula each needs.
    pub meters: MeterStore,
    pub configs: StripeConfigStore,
    pub mappings: MappingStore,
    pub stripe: StripeClient,
    pub pacer: Arc<Pacer>,
    pub settings: StripeSettings,
    /// Between the attempts of one request (short: the window is held meanwhile).
    pub request_backoff: Backoff,
    /// Before a window that could not be settled is tried again.
    pub window_backoff: Backoff,
    pub dead_letters: DeadLetters,
    /// Woken when totals were recorded, so idle dispatchers claim them at once instead of
    /// at their next poll: a minute's windows fall due together.
    pub recorded: tokio::sync::Notify,
}

impl SyncContext {
    /// How long a claim holds a window: every attempt of one request at its time limit
    /// plus the longest pause between attempts, with a margin.
    pub(super) fn lease(&self) -> Duration {
        let attempts = self.settings.max_retries + 1;
        (self.settings.timeout + self.request_backoff.max) * attempts * 4 + Duration::from_secs(10)
    }
}
