//! Loop 4: meter backfills. A meter created, or one whose event name or filters changed, is
//! given the matching events of the past 35 days that it does not have yet, from
//! `events_raw` ([`meterline_catalog::backfills`] holds the rules and the job table).
//!
//! Rule kept here: a page's rows are in ClickHouse and its windows marked dirty before its
//! progress is recorded, as for a batch of loop 1 before its commit: a crash redoes the page,
//! and its copies collapse. The windows then go out like windows with late events: a window
//! already published gets its next revision, and the sink sends what changed.

use std::sync::Arc;
use std::time::Duration;

use meterline_catalog::backfills::{self, Claimed};
use meterline_catalog::meter_versions;
use meterline_catalog::meters::MeterStore;
use meterline_catalog::window_sizes;
use meterline_common::auth::TenantScope;
use meterline_common::shutdown::pause;
use meterline_schemas::{MeterDefinition, RawUsageEvent};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::metering::{distinct_windows, remeter_copies, settle_first_copies};
use super::Shared;
use crate::billing;
use crate::clickhouse::BackfillPage;
use crate::{metrics, Error};

/// How long a claimed backfill is held between two recorded pages.
const LEASE: time::Duration = time::Duration::minutes(5);
/// Events read per page.
const PAGE: u64 = 5_000;
/// How often to look for a backfill when there is none.
const POLL: Duration = Duration::from_secs(5);

/// Loop 4: works through due backfills, one at a time per aggregator.
pub async fn run_backfills(shared: Arc<Shared>, shutdown: CancellationToken) -> Result<(), Error> {
    let meters = MeterStore::new(shared.pool.clone());
    loop {
        let claimed = retry!("backfill", shutdown, async {
            backfills::claim(&shared.pool, LEASE)
                .await
                .map_err(backfill_error)
        });
        match claimed {
            None => return Ok(()),
            Some(Some(claimed)) => {
                if !work_through(&shared, &meters, claimed, &shutdown).await {
                    return Ok(());
                }
            }
            Some(None) => {
                if !pause(POLL, &shutdown).await {
                    return Ok(());
                }
            }
        }
    }
}

fn backfill_error(e: backfills::BackfillError) -> Error {
    Error::Meters(e.to_string())
}

/// Works through one backfill to its end, or until the lease is lost. False on shutdown.
async fn work_through(
    shared: &Shared,
    meters: &MeterStore,
    mut claimed: Claimed,
    shutdown: &CancellationToken,
) -> bool {
    let scope = TenantScope {
        tenant_id: claimed.tenant_id.clone(),
        environment_id: claimed.environment_id.clone(),
        subject: None,
    };
    loop {
        // Read per page: an edit during the backfill (which schedules its own) applies from
        // the next page on.
        let Some(meter) = retry!("backfill", shutdown, async {
            meters
                .get(&scope, &claimed.meter_id)
                .await
                .map_err(|e| Error::Meters(e.to_string()))
        }) else {
            return false;
        };
        let Some(meter) = meter.map(|m| m.definition) else {
            // Gone (a meter cannot be deleted today; a hand-made row may): nothing to give it.
            return finish(shared, &claimed, shutdown).await;
        };
        let Some(sizes) = retry!("backfill", shutdown, async {
            window_sizes::load_scope(&shared.pool, &scope)
                .await
                .map_err(|e| Error::Meters(e.to_string()))
        }) else {
            return false;
        };
        // Each event counts under the definition in force at its timestamp.
        let Some(history) = retry!("backfill", shutdown, async {
            meter_versions::load(&shared.pool, &scope, &claimed.meter_id)
                .await
                .map_err(|e| Error::Meters(e.to_string()))
        }) else {
            return false;
        };
        let histories = billing::Histories::from([(claimed.meter_id.clone(), history)]);
        let page = BackfillPage {
            tenant: &claimed.tenant_id,
            environment: &claimed.environment_id,
            meter: &claimed.meter_id,
            event_name: meter.event_name.as_str(),
            after: (claimed.done_until, &claimed.done_after_id),
            until: claimed.until,
            limit: PAGE,
        };
        let Some(events) = retry!(
            "backfill",
            shutdown,
            shared.warehouse.raw_events_without_meter(&page)
        ) else {
            return false;
        };
        let Some(last) = events.last() else {
            return finish(shared, &claimed, shutdown).await;
        };
        let next = (last.timestamp, last.event_id.clone());
        let mut metered = meter_page(&meter, &histories, &sizes, &events);
        // As for a live batch: a stored event bills at its first copy's time.
        let rows = std::slice::from_mut(&mut metered.rows);
        let Some(copies) = settle_first_copies(shared, rows, shutdown).await else {
            return false;
        };
        let now = OffsetDateTime::now_utc();
        let restamped = remeter_copies(copies, |event, ingested_at, rows| {
            let window = sizes
                .window_at(event.timestamp.as_offset_date_time())
                .ok()?;
            let meters = std::slice::from_ref(&meter);
            Some(
                billing::meter_event(
                    event,
                    meters,
                    Some(&histories),
                    window,
                    ingested_at,
                    now,
                    rows,
                )
                .failures,
            )
        });
        metered.rows.extend(restamped);
        let rows = &metered.rows;
        if retry!("backfill", shutdown, shared.warehouse.insert(rows.iter())).is_none() {
            return false;
        }
        let windows = distinct_windows(rows);
        if retry!(
            "backfill",
            shutdown,
            shared.registry.mark_dirty(&windows, shared.grace)
        )
        .is_none()
        {
            return false;
        }
        if meter.aggregation.bills_period_to_date()
            && retry!(
                "backfill",
                shutdown,
                shared.registry.mark_later_in_period(&windows)
            )
            .is_none()
        {
            return false;
        }
        (claimed.done_until, claimed.done_after_id) = next;
        // One meter: at most one row per event, and a page holds each event once (FINAL).
        let found = rows.len() as i64;
        let Some(held) = retry!("backfill", shutdown, async {
            backfills::progress(&shared.pool, &claimed, found, metered.unusable, LEASE)
                .await
                .map_err(backfill_error)
        }) else {
            return false;
        };
        if held {
            metrics::backfill_page(found as u64, metered.unusable as u64);
        } else {
            tracing::warn!(
                meter_id = %claimed.meter_id,
                "meter backfill lease lost; another aggregator carries on"
            );
            return true;
        }
        shared.batch_done.notify_one();
    }
}

/// Marks the backfill done. False on shutdown.
async fn finish(shared: &Shared, claimed: &Claimed, shutdown: &CancellationToken) -> bool {
    let finished = retry!("backfill", shutdown, async {
        backfills::finish(&shared.pool, claimed)
            .await
            .map_err(backfill_error)
    });
    if finished.is_some() {
        metrics::backfill_done();
        tracing::info!(
            tenant_id = %claimed.tenant_id,
            environment_id = %claimed.environment_id,
            meter_id = %claimed.meter_id,
            "meter backfill done"
        );
    }
    finished.is_some()
}

/// A page metered against the one meter.
struct MeteredPage {
    rows: Vec<billing::MeteredEvent>,
    /// Matching events whose property the meter cannot use.
    unusable: i64,
}

/// Meters a page of stored events with the live pipeline's rule ([`billing::meter_event`]).
fn meter_page(
    meter: &MeterDefinition,
    histories: &billing::Histories,
    sizes: &window_sizes::SizeHistory,
    events: &[crate::clickhouse::StoredRawEvent],
) -> MeteredPage {
    let now = OffsetDateTime::now_utc();
    let meters = std::slice::from_ref(meter);
    let mut rows = Vec::with_capacity(events.len());
    let mut unusable = 0;
    for stored in events {
        // Only events that parsed are stored; one that no longer does is not this meter's.
        let Ok(event) = RawUsageEvent::from_json_bytes(stored.payload.as_bytes()) else {
            unusable += 1;
            continue;
        };
        let Ok(window) = sizes.window_at(stored.timestamp) else {
            unusable += 1;
            continue;
        };
        let metering = billing::meter_event(
            &Arc::new(event),
            meters,
            Some(histories),
            window,
            stored.ingested_at,
            now,
            &mut rows,
        );
        if !metering.failures.is_empty() {
            unusable += 1;
        }
    }
    MeteredPage { rows, unusable }
}
