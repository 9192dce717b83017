//! Loop 5: billing periods Stripe named. When stripe-sink records a subscription period (or
//! a customer with one is mapped), the customer's windows from the period's start are marked
//! dirty ([`crate::windows::WindowRegistry::mark_period_changes`]); loop 2
//! then recomputes them over the period Stripe bills and publishes what changed, and the sink
//! sends it. The rules of the periods themselves are [`meterline_catalog::billing_periods`].

use std::sync::Arc;
use std::time::Duration;

use meterline_common::shutdown::pause;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::{metrics, Error};

/// How often to look for changed periods.
const POLL: Duration = Duration::from_secs(2);
/// Changed periods applied per statement.
const LIMIT: i64 = 200;

/// Loop 5: applies changed billing periods until `shutdown`.
pub async fn follow_billing_periods(
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    loop {
        let Some(applied) = retry!(
            "billing_periods",
            shutdown,
            shared.registry.mark_period_changes(LIMIT)
        ) else {
            return Ok(());
        };
        if applied > 0 {
            metrics::billing_periods_applied(applied);
            tracing::info!(
                periods = applied,
                "windows of changed billing periods marked"
            );
            // The windows are dirty now: publish them without waiting for the next round.
            shared.batch_done.notify_one();
        }
        if applied < LIMIT as u64 && !pause(POLL, &shutdown).await {
            return Ok(());
        }
    }
}
