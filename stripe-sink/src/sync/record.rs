//! Step 1 of the sync: window totals from `usage.windows` into the ledger.
//!
//! Rule kept here: a total's offset is committed only after the ledger holds it (or the
//! message is acknowledged on `usage.windows.dlq`); a redelivery re-records the same total,
//! which changes nothing.

use std::sync::Arc;
use std::time::Duration;

use meterline_common::kafka::{commit, read_batch, DeadLetter, NextOffsets};
use meterline_common::retry::Backoff;
use meterline_schemas::{Topic, WindowTotal};
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::Message;
use tokio_util::sync::CancellationToken;

use super::{SyncContext, SERVICE};
use crate::{metrics, Error};

/// The most totals recorded in one transaction.
const BATCH_MAX: usize = 500;

/// How long a batch waits for more totals after its first: the totals of one due minute are
/// published together, and a short wait gathers them into one commit.
const BATCH_WAIT: Duration = Duration::from_millis(20);

/// Loop 1: `usage.windows` into the ledger, a batch of totals per transaction.
pub async fn consume_windows(
    ctx: Arc<SyncContext>,
    consumer: StreamConsumer,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    loop {
        let messages = read_batch(&consumer, BATCH_MAX, BATCH_WAIT, &shutdown).await;
        if messages.is_empty() {
            return Ok(());
        }
        let mut totals = Vec::with_capacity(messages.len());
        for message in &messages {
            match WindowTotal::from_json_bytes(message.payload().unwrap_or_default()) {
                Ok(total) => totals.push(total),
                Err(e) => {
                    let letter = DeadLetter::of(
                        Topic::UsageWindows,
                        message,
                        SERVICE,
                        e.to_string(),
                        e.dlq_error_kind(),
                    );
                    if !retry(&shutdown, "writing a dead letter", || async {
                        ctx.dead_letters.send(&letter).await.map_err(Error::from)
                    })
                    .await
                    {
                        return Ok(());
                    }
                }
            }
        }
        if !totals.is_empty()
            && !retry(&shutdown, "recording window totals", || {
                ctx.ledger.record_windows(&totals)
            })
            .await
        {
            return Ok(());
        }
        metrics::windows_recorded(totals.len());
        ctx.recorded.notify_waiters();
        // The ledger holds them now; a lost commit only re-records the same totals. Not
        // waited for: a round trip per batch would slow the sink's intake.
        commit(&consumer, &NextOffsets::of(&messages), false);
    }
}

/// Runs `attempt` until it succeeds (true) or shutdown begins (false: nothing is committed,
/// and the messages are delivered again after a restart).
async fn retry<F, Fut>(shutdown: &CancellationToken, what: &str, mut attempt: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), Error>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        match attempt().await {
            Ok(()) => return true,
            Err(e) => {
                tracing::warn!(error = %e, "{what} failed, retrying");
                if !backoff.wait(shutdown).await {
                    return false;
                }
            }
        }
    }
}
