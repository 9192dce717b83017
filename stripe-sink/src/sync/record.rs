//! Step 1 of the sync: window totals from `usage.windows` into the ledger.
//!
//! Rule kept here: a total's offset is committed only after the ledger holds it (or the
//! message is acknowledged on `usage.windows.dlq`); a redelivery re-records the same total,
//! which changes nothing.

use std::sync::Arc;
use std::time::Duration;

use meterline_common::kafka::{commit_message, next_message, DeadLetter};
use meterline_common::retry::Backoff;
use meterline_schemas::{Topic, WindowTotal};
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::Message;
use tokio_util::sync::CancellationToken;

use super::{SyncContext, SERVICE};
use crate::{metrics, Error};

/// Loop 1: `usage.windows` into the ledger.
pub async fn consume_windows(
    ctx: Arc<SyncContext>,
    consumer: StreamConsumer,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    while let Some(message) = next_message(&consumer, &shutdown).await {
        let parsed = WindowTotal::from_json_bytes(message.payload().unwrap_or_default());
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        loop {
            let outcome = match &parsed {
                Ok(total) => ctx.ledger.record_window(total).await.map(|()| {
                    metrics::window_recorded();
                }),
                Err(e) => {
                    let letter = DeadLetter::of(
                        Topic::UsageWindows,
                        &message,
                        SERVICE,
                        e.to_string(),
                        e.dlq_error_kind(),
                    );
                    ctx.dead_letters.send(&letter).await.map_err(Error::from)
                }
            };
            let Err(e) = outcome else { break };
            tracing::warn!(error = %e, "recording a window total failed, retrying");
            // Not committed on shutdown: the total is delivered again after a restart.
            if !backoff.wait(&shutdown).await {
                return Ok(());
            }
        }
        // The ledger holds it now; a lost commit only re-records the same total. Not waited
        // for: one round trip per window would cap the sink's intake.
        commit_message(&consumer, &message, false);
    }
    Ok(())
}
