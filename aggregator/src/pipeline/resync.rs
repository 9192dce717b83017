//! Loop 3: `usage.resync` requests recompute every due window in their range and publish it
//! with reason `resync` and the job id, changed or not.
//!
//! Rule kept here: a request's offset is committed only after every window of its range was
//! published (or the request was dead-lettered); a shutdown in between leaves it uncommitted,
//! and redoing it publishes the same totals again under the same job.

use std::sync::Arc;
use std::time::Duration;

use meterline_common::kafka::{commit_message, next_message, DeadLetter};
use meterline_common::shutdown::pause;
use meterline_schemas::{ResyncRequest, Topic};
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::{BorrowedMessage, Message};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::publish::publish_claim;
use super::{Shared, CLAIM_LIMIT, SERVICE};
use crate::billing::Trigger;
use crate::meter_cache::MeterCache;
use crate::metrics;
use crate::windows::WindowKey;
use crate::Error;

/// Loop 3: resync requests.
pub async fn consume_resync(
    shared: Arc<Shared>,
    consumer: Arc<StreamConsumer>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let mut cache = MeterCache::new(shared.pool.clone());
    loop {
        let Some(message) = next_message(&consumer, &shutdown).await else {
            return Ok(());
        };
        if !handle_resync(&shared, &mut cache, &message, &shutdown).await {
            return Ok(());
        }
        commit_message(&consumer, &message, true);
    }
}

/// False when shutdown interrupted it (the request is then left uncommitted and redone).
async fn handle_resync(
    shared: &Shared,
    cache: &mut MeterCache,
    message: &BorrowedMessage<'_>,
    shutdown: &CancellationToken,
) -> bool {
    let request = match ResyncRequest::from_json_bytes(message.payload().unwrap_or_default()) {
        Ok(r) => r,
        Err(e) => {
            let dead = DeadLetter::of(
                Topic::UsageResync,
                message,
                SERVICE,
                e.to_string(),
                e.dlq_error_kind(),
            );
            let sent = retry!("dead_letter", shutdown, shared.dead_letters.send(&dead)).is_some();
            if sent {
                metrics::rejected(&dead.headers.error_kind);
            }
            return sent;
        }
    };
    let mut after: Option<WindowKey> = None;
    let mut published = 0usize;
    loop {
        let now = OffsetDateTime::now_utc();
        let Some(claim) = retry!("claim_resync", shutdown, {
            shared.registry.claim_range(
                &request.tenant_id,
                &request.environment_id,
                request.customer_id.as_ref(),
                request.meter_id.as_ref(),
                request.range.from().as_offset_date_time(),
                request.range.to().as_offset_date_time(),
                now,
                after.as_ref(),
                CLAIM_LIMIT,
            )
        }) else {
            return false;
        };
        if claim.windows.is_empty() {
            break;
        }
        let last = claim.windows.last().map(|w| w.key.clone());
        let full = claim.windows.len() as i64 == CLAIM_LIMIT;
        match publish_claim(shared, cache, claim, Trigger::Resync, Some(&request.job_id)).await {
            Ok(n) => {
                published += n;
                after = last;
            }
            Err(e) => {
                tracing::warn!(job = %request.job_id, error = %e, "resync step failed, retrying");
                if pause(Duration::from_secs(1), shutdown).await {
                    continue;
                }
                return false;
            }
        }
        if !full {
            break;
        }
    }
    metrics::resync_done();
    tracing::info!(job = %request.job_id, windows = published, "resync published");
    true
}
