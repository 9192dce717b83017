//! Steps 2 and 3 of the sync: worker loops that claim ready windows (one per customer and
//! meter at a time) and settle each, and the release of windows waiting for a mapping.
//!
//! Rule kept here: a claimed window is always finished, even during shutdown, so that its
//! lease does not hold it for minutes.

use std::sync::Arc;
use std::time::Duration;

use meterline_common::retry::Backoff;
use meterline_common::shutdown::pause;
use meterline_schemas::stripe_limits;
use rand::SeedableRng;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::settle::settle;
use super::SyncContext;
use crate::ledger::Finish;
use crate::{metrics, Error};

/// How often an idle dispatcher looks for windows whose retry is due; newly recorded totals
/// wake it at once.
const IDLE_POLL: Duration = Duration::from_millis(200);

/// Loop 2: `workers` dispatchers settling ready windows.
pub async fn dispatch(
    ctx: Arc<SyncContext>,
    workers: usize,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let handles: Vec<_> = (0..workers)
        .map(|worker| tokio::spawn(dispatcher(ctx.clone(), worker, shutdown.clone())))
        .collect();
    for handle in handles {
        handle.await.map_err(|e| Error::Task(e.to_string()))??;
    }
    Ok(())
}

async fn dispatcher(
    ctx: Arc<SyncContext>,
    worker: usize,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let mut rng = rand::rngs::StdRng::from_entropy();
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        // Taken before the claim, so it is never later than the lease the database records.
        let held_until = tokio::time::Instant::now() + ctx.lease();
        let claimed = match ctx.ledger.claim(1, ctx.lease()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(worker, error = %e, "claiming windows failed");
                Vec::new()
            }
        };
        let Some(batch) = claimed.into_iter().next() else {
            // Windows also become ready by time (a retry's delay), hence the poll.
            tokio::select! {
                () = ctx.recorded.notified() => {}
                keep_going = pause(IDLE_POLL, &shutdown) => if !keep_going {
                    return Ok(());
                },
            }
            continue;
        };
        // A claimed window is always finished, even during shutdown: its lease would
        // otherwise hold it for minutes.
        let Some(finish) = settle(&ctx, &batch, held_until, &mut rng).await else {
            claim_lost(batch.id);
            continue;
        };
        let label = finish_label(&finish);
        metrics::window_settled(label);
        if let Finish::Failed(reason) | Finish::NeedsReconciliation(reason) = &finish {
            tracing::warn!(batch = batch.id, %reason, outcome = label, "window not sent");
        }
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match ctx.ledger.finish(batch.claim, &finish).await {
                Ok(()) => break,
                Err(Error::ClaimLost { .. }) => {
                    claim_lost(batch.id);
                    break;
                }
                Err(e) => {
                    tracing::warn!(batch = batch.id, error = %e, "finishing a window failed, retrying");
                    backoff.sleep().await;
                }
            }
        }
    }
}

/// The window's lease ran out before this dispatcher was done and another claimed it: the
/// new owner resends anything outstanding unchanged and finishes it.
fn claim_lost(batch: i64) {
    metrics::window_settled("claim_lost");
    tracing::warn!(
        batch,
        "the window's lease ran out and another dispatcher claimed it; this one wrote nothing more"
    );
}

fn finish_label(finish: &Finish) -> &'static str {
    match finish {
        Finish::Settled => "settled",
        Finish::RetryIn { .. } => "retry",
        Finish::Unanswered { .. } => "unanswered",
        Finish::PendingMapping => "pending_mapping",
        Finish::Skipped(_) => "skipped",
        Finish::Expired => "expired",
        Finish::Failed(_) => "failed",
        Finish::NeedsReconciliation(_) => "needs_reconciliation",
    }
}

/// How far before the last look a config or meter mapping change is looked at again: a change
/// committed just after that statement read the tables can carry an earlier `updated_at`, and
/// a dispatcher may mark a window skipped just after the change it has not seen yet.
const CHANGE_MARGIN: time::Duration = time::Duration::minutes(1);

/// Loop 3: windows waiting for a customer mapping go out once it exists, and windows skipped
/// for their configuration (sync off, no meter mapping) go out once it allows them.
pub async fn release_waiting(
    ctx: Arc<SyncContext>,
    every: Duration,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    // None: the first round looks at every enabled scope.
    let mut changed_since = None;
    loop {
        if !pause(every, &shutdown).await {
            return Ok(());
        }
        match ctx.ledger.release_mapped().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(windows = n, "windows released by new customer mappings"),
            Err(e) => tracing::warn!(error = %e, "releasing mapped windows failed"),
        }
        if ctx.settings.enabled {
            let oldest_end = OffsetDateTime::now_utc() - stripe_limits::MAX_EVENT_AGE;
            match ctx.ledger.release_enabled(oldest_end, changed_since).await {
                Ok((reopened, at)) => {
                    if reopened > 0 {
                        tracing::info!(
                            windows = reopened,
                            "skipped windows re-opened: sync or their meter mapping is on now"
                        );
                    }
                    changed_since = Some(at - CHANGE_MARGIN);
                }
                // The next round looks as far back as this one did.
                Err(e) => tracing::warn!(error = %e, "re-opening skipped windows failed"),
            }
        }
        let open = ctx
            .pacer
            .breaker_states()
            .iter()
            .filter(|(_, s)| *s != crate::pacing::BreakerState::Closed)
            .count();
        metrics::circuits_open(open);
    }
}
