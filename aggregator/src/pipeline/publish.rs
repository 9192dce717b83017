//! Loop 2: dirty windows whose end plus grace has passed are claimed, their totals recomputed
//! from the deduplicated rows, and published to `usage.windows` with a new revision when they
//! changed (the first publication is `due`, later ones `late`).
//!
//! What a window's total covers: for a meter billing the period to date (MAX, LATEST,
//! COUNT_UNIQUE), the period's events up to the window's end; for a count or sum, the
//! window's own events, cut where a billing period ends inside it, with the rest billed by the
//! window after it ([`meterline_schemas::PeriodCalendar::additive_range`]), so no usage is
//! moved into another period's invoice.
//!
//! Rule kept here: a claim is recorded as published only after Kafka acknowledged every total
//! of it; on any error the claim rolls back and the windows stay dirty.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use meterline_common::shutdown::pause;
use meterline_schemas::stripe_limits;
use meterline_schemas::{
    CustomerId, EnvironmentId, JobId, MeterId, TenantId, Timestamp, Window, WindowReason,
    WindowTotal,
};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::{Shared, CLAIM_LIMIT};
use crate::billing::{next_revision, Trigger, WindowAggregates};
use crate::due;
use crate::meter_cache::MeterCache;
use crate::metrics;
use crate::windows::{Claim, Publication, WindowKey};
use crate::Error;

/// Loop 2: publishes dirty windows once due.
pub async fn publish_due(
    shared: Arc<Shared>,
    interval: Duration,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let mut cache = MeterCache::new(shared.pool.clone());
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shared.batch_done.notified() => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        loop {
            let now = OffsetDateTime::now_utc();
            let Some(claim) = retry!("claim_due", &shutdown, {
                shared.registry.claim_due(now, CLAIM_LIMIT, shared.quiet)
            }) else {
                return Ok(());
            };
            if claim.windows.is_empty() {
                break;
            }
            let full = claim.windows.len() as i64 == CLAIM_LIMIT;
            if let Err(e) = publish_claim(&shared, &mut cache, claim, Trigger::Due, None).await {
                // The claim was rolled back: the windows stay dirty and are retried.
                tracing::warn!(error = %e, "publishing due windows failed, retrying");
                if !pause(Duration::from_secs(1), &shutdown).await {
                    return Ok(());
                }
                break;
            }
            if !full {
                break;
            }
        }
    }
}

/// Recomputes the claimed windows, publishes those that go out, records them, and releases
/// the claim. On error nothing is recorded (the claim rolls back).
pub(super) async fn publish_claim(
    shared: &Shared,
    cache: &mut MeterCache,
    claim: Claim,
    trigger: Trigger,
    job: Option<&JobId>,
) -> Result<usize, Error> {
    cache.refresh().await?;
    let now = OffsetDateTime::now_utc();
    let computed_at = Timestamp::new(now).map_err(|e| Error::Corrupt(e.to_string()))?;

    // Each customer's billing periods (its Stripe subscription's, else calendar months).
    let keys: Vec<WindowKey> = claim.windows.iter().map(|w| w.key.clone()).collect();
    let calendars = shared.registry.calendars(&keys).await?;
    let calendar_of = |k: &WindowKey| calendars.of(k);

    // One query per (tenant, environment, meter, window, range), for all its customers.
    type Group = (
        TenantId,
        EnvironmentId,
        MeterId,
        Window,
        (OffsetDateTime, OffsetDateTime),
    );
    let mut groups: BTreeMap<Group, Vec<CustomerId>> = BTreeMap::new();
    // Windows after a claimed window that crosses its billing period's end: they bill its
    // rest, so they are marked with the claim (created when they hold no event of their own).
    let mut successors: Vec<WindowKey> = Vec::new();
    for w in &claim.windows {
        let k = &w.key;
        let range = match cache.meter(&k.tenant_id, &k.environment_id, &k.meter_id) {
            // A maximum, latest value or distinct count does not add up over windows: its
            // windows carry the billing period to date, for Stripe's `last` formula.
            // A changed meter's new definition counts from its effective time.
            Some(m) if m.aggregation.bills_period_to_date() => {
                let (from, to) = calendar_of(k).period_to_date(&k.window);
                let (_, since) =
                    cache.aggregation_at(&k.tenant_id, &k.environment_id, m, k.window.start());
                (since.map_or(from, |since| from.max(since)), to)
            }
            // A count or sum adds up: the window's own events, cut at a period boundary
            // inside it, the rest billed by the next window in the next period.
            _ => {
                let window_at = |at: OffsetDateTime| {
                    cache
                        .sizes()
                        .window_at(&k.tenant_id, &k.environment_id, at)
                        .map_err(|e| Error::Corrupt(format!("window at {at}: {e}")))
                };
                let previous = window_at(k.window.start() - time::Duration::NANOSECOND)?;
                let calendar = calendar_of(k);
                if calendar.additive_end(&k.window) < k.window.end() {
                    successors.push(WindowKey {
                        window: window_at(k.window.end())?,
                        ..k.clone()
                    });
                }
                calendar.additive_range(&k.window, &previous)
            }
        };
        groups
            .entry((
                k.tenant_id.clone(),
                k.environment_id.clone(),
                k.meter_id.clone(),
                k.window,
                range,
            ))
            .or_default()
            .push(k.customer_id.clone());
    }
    let mut aggregates: HashMap<WindowKey, (WindowAggregates, OffsetDateTime)> = HashMap::new();
    for ((tenant, environment, meter, window, range), customers) in groups {
        let found = shared
            .warehouse
            .window_aggregates(&tenant, &environment, &meter, range, &customers)
            .await?;
        for (customer, a) in found {
            aggregates.insert(
                WindowKey {
                    tenant_id: tenant.clone(),
                    environment_id: environment.clone(),
                    customer_id: customer,
                    meter_id: meter.clone(),
                    window,
                },
                a,
            );
        }
    }

    let mut totals = Vec::new();
    let mut publications = Vec::new();
    // Windows published for the first time: their lag is taken once Kafka acknowledged them.
    let mut firsts = Vec::new();
    for state in &claim.windows {
        let key = &state.key;
        let Some(meter) = cache.meter(&key.tenant_id, &key.environment_id, &key.meter_id) else {
            tracing::error!(meter = %key.meter_id, "window of an unknown meter left unpublished");
            continue;
        };
        let (a, last_event_at) = match aggregates.get(key) {
            Some((a, last)) => (*a, Timestamp::new(*last).ok()),
            None => (WindowAggregates::default(), None),
        };
        let (aggregation, _) = cache.aggregation_at(
            &key.tenant_id,
            &key.environment_id,
            meter,
            key.window.start(),
        );
        let quantity = a.quantity(aggregation);
        let Some(revision) = next_revision(&state.published, quantity, a.events, trigger) else {
            continue;
        };
        let reason = match (trigger, job) {
            (Trigger::Resync, Some(job_id)) => WindowReason::Resync {
                job_id: job_id.clone(),
            },
            _ if state.published.revision == 0 => WindowReason::Due,
            _ => WindowReason::Late,
        };
        if state.published.revision == 0 {
            firsts.push(key.window);
        }
        totals.push(WindowTotal {
            tenant_id: key.tenant_id.clone(),
            environment_id: key.environment_id.clone(),
            customer_id: key.customer_id.clone(),
            meter_id: key.meter_id.clone(),
            window: key.window,
            quantity,
            event_count: a.events,
            revision,
            reason,
            expired: stripe_limits::window_expired(&key.window, now),
            computed_at,
            // Before the window's end by construction (read from [.., window end)).
            last_event_at: last_event_at.filter(|at| at.as_offset_date_time() < key.window.end()),
            period_end: Timestamp::new(calendar_of(key).of_window(&key.window).end()).ok(),
        });
        publications.push(Publication {
            key: key.clone(),
            revision: revision.get(),
            quantity,
            event_count: a.events,
        });
    }
    shared.writer.publish_windows(&totals).await?;
    let acknowledged = OffsetDateTime::now_utc();
    successors.sort_unstable();
    successors.dedup();
    claim
        .finish(&publications, &successors, shared.grace)
        .await?;
    for total in &totals {
        metrics::window_published(&total.reason);
    }
    for window in &firsts {
        metrics::first_publication_lag(due::publication_lag(window, shared.grace, acknowledged));
    }
    Ok(totals.len())
}
