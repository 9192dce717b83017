//! The aggregator's three loops, one file each:
//!
//! 1. `consume.rs` ([`consume_usage`]): `usage.raw` -> `events_processed`. A batch (bounded
//!    by count and time) is parsed, resolved against the meters, its copies of events given
//!    their first copy's time (`event_first_seen`), inserted into ClickHouse in one insert,
//!    its windows are marked dirty in PostgreSQL, bad messages go to `usage.raw.dlq`, and only
//!    then are its offsets committed. A crash at any point re-delivers the batch; re-inserted
//!    copies collapse in ClickHouse and re-marking is harmless, so nothing is lost or counted
//!    twice.
//! 2. `publish.rs` ([`publish_due`]): dirty windows whose end plus grace has passed are
//!    claimed, their totals recomputed from the deduplicated rows, and published to `usage.windows` with a new
//!    revision when they changed (the first publication is `due`, later ones `late`).
//! 3. `resync.rs` ([`consume_resync`]): `usage.resync` requests recompute every due window
//!    in their range and publish it with reason `resync` and the job id, changed or not.
//! 4. `backfill.rs` ([`run_backfills`]): a meter created, or changed in what it matches, is
//!    given the matching events of the past 35 days it does not have, from `events_raw`
//!    (which loop 1 fills with every event, metered or not).
//! 5. `periods.rs` ([`follow_billing_periods`]): when Stripe names a customer's subscription
//!    period, its period-to-date windows are recomputed over it.
//!
//! Every step that talks to another system is retried with backoff until it succeeds or the
//! service shuts down; a shutdown finishes the batch in hand first, or leaves it uncommitted.
//!
//! `metering.rs` resolves a batch of raw events against the meters (the CPU stage of loop 1).
//! Offsets are committed only after the work they cover is durable: rows in ClickHouse and
//! windows marked for loop 1, the request's windows published for loop 3.

use std::time::Duration;

use meterline_common::kafka::DeadLetters;
use meterline_common::retry::Backoff;
use tokio::sync::Notify;

use crate::clickhouse::Warehouse;
use crate::kafka::Writer;
use crate::windows::WindowRegistry;

/// Evaluates `$attempt` (an async expression giving `Result<T, Error>`) until it succeeds,
/// waiting out the step backoff between attempts, and gives `Some(T)`; `None` when the service
/// is shutting down, and the caller then abandons the batch without committing it. A macro
/// rather than a function taking a closure: the attempt borrows the batch, which closures
/// returning futures cannot express without losing `Send`.
macro_rules! retry {
    ($step:literal, $shutdown:expr, $attempt:expr) => {{
        let mut backoff = $crate::pipeline::step_backoff();
        loop {
            match $attempt.await {
                Ok(value) => break Some(value),
                Err(e) => {
                    $crate::metrics::batch_retry($step);
                    tracing::warn!(
                        step = $step,
                        error = %e,
                        retry_in_ms = backoff.upcoming().as_millis() as u64,
                        "step failed, retrying"
                    );
                }
            }
            if !backoff.wait(&$shutdown).await {
                break None;
            }
        }
    }};
}

mod backfill;
mod consume;
mod metering;
mod periods;
mod publish;
mod resync;

pub use backfill::run_backfills;
pub use consume::consume_usage;
pub use periods::follow_billing_periods;
pub use publish::publish_due;
pub use resync::consume_resync;

pub(crate) const SERVICE: &str = "aggregator";

/// Windows claimed per publication round.
const CLAIM_LIMIT: i64 = 500;

/// Between the attempts of a step that talks to another system: from 100 ms, doubling, to
/// 10 s, so a restarting ClickHouse or PostgreSQL is polled often but never hammered.
pub(crate) fn step_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(10))
}

/// The dependencies the loops share.
pub struct Shared {
    pub warehouse: Warehouse,
    pub registry: WindowRegistry,
    pub writer: Writer,
    pub dead_letters: DeadLetters,
    pub pool: sqlx::PgPool,
    pub grace: Duration,
    /// How long a due window must go without new events before it is published (bounded:
    /// see `WindowRegistry::claim_due`).
    pub quiet: Duration,
    /// Woken after each batch, so windows that became due are published without waiting.
    pub batch_done: Notify,
}
