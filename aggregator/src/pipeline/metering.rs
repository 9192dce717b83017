//! Resolving a batch of `usage.raw` messages against the meters: the rows each event feeds,
//! the windows they touch, the dead letters of the messages that cannot be metered.
//!
//! Rule kept here: a message that fails is never dropped: it becomes a dead letter with its
//! reason, and the meters it fed correctly keep their rows (a replay collapses the copies).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use meterline_common::kafka::{DeadLetter, NextOffsets};
use meterline_schemas::{DlqErrorKind, RawUsageEvent, Timestamp, Topic};
use rdkafka::message::{BorrowedMessage, Message};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::consume::MeteredBatch;
use super::{Shared, SERVICE};
use crate::billing::{self, MeteredEvent, RawEvent};
use crate::first_copy::{self, Fix};
use crate::meter_cache::MeterCache;
use crate::metrics;
use crate::windows::{WindowKey, WindowKeyRef};

/// Parses every message of a batch and resolves it against the meters.
///
/// Parsing is most of a batch's CPU, and while it runs the other stages mostly wait on
/// ClickHouse and PostgreSQL: the messages are split over one thread per core, so a batch is
/// metered in about the time of its share rather than the whole.
pub(super) fn meter_batch(cache: &MeterCache, messages: &[BorrowedMessage<'_>]) -> MeteredBatch {
    let now = OffsetDateTime::now_utc();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let chunk = messages.len().div_ceil(threads).max(1);
    let parts: Vec<MeteredPart> = std::thread::scope(|scope| {
        let running: Vec<_> = messages
            .chunks(chunk)
            .map(|part| scope.spawn(move || meter_messages(cache, part, now)))
            .collect();
        running
            .into_iter()
            .map(|thread| {
                thread
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    let mut runs = Vec::with_capacity(parts.len());
    let mut raw = Vec::with_capacity(parts.len());
    let mut windows = Vec::new();
    let mut dead = Vec::new();
    let mut unmetered = 0;
    // In message order: rows of the same event id keep their relative order.
    for part in parts {
        runs.push(part.rows);
        raw.push(part.raw);
        windows = merge_windows(windows, part.windows);
        dead.extend(part.dead);
        unmetered += part.unmetered;
    }
    MeteredBatch {
        runs,
        raw,
        period_windows: period_windows(cache, &windows),
        windows,
        dead,
        unmetered,
        offsets: NextOffsets::of(messages),
    }
}

/// The windows of `windows` whose meter bills the period to date: their later windows of the
/// period carry these windows' events too.
fn period_windows(cache: &MeterCache, windows: &[WindowKey]) -> Vec<WindowKey> {
    windows
        .iter()
        .filter(|k| {
            cache
                .meter(&k.tenant_id, &k.environment_id, &k.meter_id)
                .is_some_and(|m| m.aggregation.bills_period_to_date())
        })
        .cloned()
        .collect()
}

/// Gives every copy of the batch its event's billing time ([`first_copy`]) and records the
/// events seen for the first time, before the batch's rows are inserted. `cache` serves only
/// the copies metered again, and is refreshed only for them (they are rare). False when
/// shutdown interrupted it.
pub(super) async fn settle_batch(
    shared: &Shared,
    cache: &mut MeterCache,
    batch: &mut MeteredBatch,
    shutdown: &CancellationToken,
) -> bool {
    let Some(copies) = settle_first_copies(shared, &mut batch.runs, shutdown).await else {
        return false;
    };
    if copies.is_empty() {
        return true;
    }
    if retry!("refresh_meters", shutdown, cache.refresh()).is_none() {
        return false;
    }
    let now = OffsetDateTime::now_utc();
    let restamped = remeter_copies(copies, |event, ingested_at, rows| {
        let (tenant, environment) = (&event.tenant_id, &event.environment_id);
        let at = event.timestamp.as_offset_date_time();
        let window = cache.sizes().window_at(tenant, environment, at).ok()?;
        let meters = cache.meters(tenant, environment);
        let histories = cache.histories(tenant, environment);
        Some(
            billing::meter_event(event, meters, histories, window, ingested_at, now, rows).failures,
        )
    });
    batch.runs.push(restamped);
    // The windows again from the rows: a restamped copy's own window, holding nothing of it
    // now, is not marked (it would publish an empty total).
    batch.windows = batch
        .runs
        .iter()
        .map(|run| distinct_windows(run))
        .fold(Vec::new(), merge_windows);
    batch.period_windows = period_windows(cache, &batch.windows);
    true
}

/// A copy to meter again at its event's billing time: the event restamped, when its copy was
/// ingested, and the version its rows may not exceed.
pub(super) struct Restamp {
    event: Arc<RawUsageEvent>,
    ingested_at: OffsetDateTime,
    ceiling: u64,
}

/// Settles `runs` against the first copies ([`first_copy`]): records the events seen for the
/// first time, demotes the copies that would outrank a stored one, and takes out the rows of
/// copies stamped at another time than their event's billing copy, giving back those copies
/// to meter again ([`remeter_copies`]). None when shutdown interrupted it.
pub(super) async fn settle_first_copies(
    shared: &Shared,
    runs: &mut [Vec<MeteredEvent>],
    shutdown: &CancellationToken,
) -> Option<Vec<Restamp>> {
    let started = std::time::Instant::now();
    let fixes: Vec<(usize, usize, Fix)> = {
        let first = first_copy::first_in_batch(runs.iter().flatten());
        let stored = retry!(
            "first_copies",
            shutdown,
            shared.warehouse.stored_first_copies(first.keys().copied())
        )?;
        let settled = first_copy::settle(first, stored);
        retry!(
            "first_copies",
            shutdown,
            shared.warehouse.record_first_copies(&settled.new)
        )?;
        runs.iter()
            .enumerate()
            .flat_map(|(r, run)| run.iter().enumerate().map(move |(i, row)| (r, i, row)))
            .filter_map(|(r, i, row)| match first_copy::fix(row, &settled) {
                Fix::Keep => None,
                fix => Some((r, i, fix)),
            })
            .collect()
    };
    // Each restamped copy once (its rows share the event), with its billing time; its rows
    // leave their run (indices per run, ascending: the fixes are in row order).
    let mut copies: Vec<Restamp> = Vec::new();
    let mut seen: HashSet<*const RawUsageEvent> = HashSet::new();
    let mut taken: Vec<Vec<usize>> = vec![Vec::new(); runs.len()];
    for (r, i, fix) in fixes {
        let row = &mut runs[r][i];
        match fix {
            Fix::Keep => {}
            Fix::Demote(version) => row.version = version,
            Fix::Restamp { at, ceiling } => {
                let Ok(timestamp) = Timestamp::new(at) else {
                    // Every stored time was a valid timestamp: unreachable, but never a
                    // reason to drop the copy's rows.
                    continue;
                };
                taken[r].push(i);
                if seen.insert(Arc::as_ptr(&row.event)) {
                    let mut event = RawUsageEvent::clone(&row.event);
                    event.timestamp = timestamp;
                    copies.push(Restamp {
                        event: Arc::new(event),
                        ingested_at: row.ingested_at,
                        ceiling,
                    });
                }
            }
        }
    }
    for (run, taken) in runs.iter_mut().zip(&taken) {
        if !taken.is_empty() {
            let mut i = 0;
            run.retain(|_| {
                i += 1;
                taken.binary_search(&(i - 1)).is_err()
            });
        }
    }
    metrics::copies_settled(started.elapsed(), copies.len());
    Some(copies)
}

/// The rows of `copies` metered again at their billing time by `remeter` (the rows of an
/// event, and the meters it does not fit; `None` when it has no window there), each no
/// higher in version than its ceiling.
pub(super) fn remeter_copies(
    copies: Vec<Restamp>,
    remeter: impl Fn(
        &Arc<RawUsageEvent>,
        OffsetDateTime,
        &mut Vec<MeteredEvent>,
    ) -> Option<Vec<(meterline_schemas::MeterId, meterline_schemas::QuantityError)>>,
) -> Vec<MeteredEvent> {
    let mut restamped = Vec::new();
    for copy in copies {
        let start = restamped.len();
        match remeter(&copy.event, copy.ingested_at, &mut restamped) {
            Some(failures) if failures.is_empty() => {}
            failures => tracing::error!(
                event_id = %copy.event.id,
                ?failures,
                "a copy of an event does not fit every meter at its first copy's time: \
                 the meters it fed at its own time lose its rows (its first copy counts)"
            ),
        }
        for row in &mut restamped[start..] {
            row.version = row.version.min(copy.ceiling);
        }
    }
    restamped
}

/// What metering a run of messages produced.
struct MeteredPart {
    rows: Vec<MeteredEvent>,
    /// Every event parsed, for `events_raw`.
    raw: Vec<RawEvent>,
    /// The windows of `rows`, sorted, each once (found on the metering thread, which leaves
    /// only a merge of a few sorted lists to the batch).
    windows: Vec<WindowKey>,
    dead: Vec<DeadLetter>,
    unmetered: u64,
}

fn meter_messages(
    cache: &MeterCache,
    messages: &[BorrowedMessage<'_>],
    now: OffsetDateTime,
) -> MeteredPart {
    let mut rows = Vec::with_capacity(messages.len() * 2);
    let mut raw = Vec::with_capacity(messages.len());
    let mut dead = Vec::new();
    let mut unmetered = 0u64;
    for m in messages {
        let event = match RawUsageEvent::from_json_bytes(m.payload().unwrap_or_default()) {
            Ok(event) => Arc::new(event),
            Err(e) => {
                dead.push(DeadLetter::of(
                    Topic::UsageRaw,
                    m,
                    SERVICE,
                    e.to_string(),
                    e.dlq_error_kind(),
                ));
                continue;
            }
        };
        let timestamp = event.timestamp.as_offset_date_time();
        let window =
            match cache
                .sizes()
                .window_at(&event.tenant_id, &event.environment_id, timestamp)
            {
                Ok(w) => w,
                Err(e) => {
                    dead.push(DeadLetter::of(
                        Topic::UsageRaw,
                        m,
                        SERVICE,
                        e.to_string(),
                        DlqErrorKind::VALIDATION,
                    ));
                    continue;
                }
            };
        // Direct producers leave ingested_at out: the broker's timestamp stands in for it.
        let ingested_at = event
            .ingested_at
            .map(|t| t.as_offset_date_time())
            .or_else(|| {
                m.timestamp().to_millis().and_then(|ms| {
                    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()
                })
            })
            .unwrap_or(now);
        let metering = billing::meter_event(
            &event,
            cache.meters(&event.tenant_id, &event.environment_id),
            cache.histories(&event.tenant_id, &event.environment_id),
            window,
            ingested_at,
            now,
            &mut rows,
        );
        raw.push(RawEvent {
            payload: String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
            event,
            ingested_at,
        });
        if metering.fed == 0 && metering.failures.is_empty() {
            unmetered += 1;
        }
        if !metering.failures.is_empty() {
            let reasons: Vec<String> = metering
                .failures
                .iter()
                .map(|(meter, e)| format!("meter {meter}: {e}"))
                .collect();
            // The meters it fed correctly keep their rows; after a fix, a replay from the
            // dead-letter topic adds the rest and the copies of the others collapse.
            let kind = DlqErrorKind::parse("invalid_quantity").unwrap_or(DlqErrorKind::VALIDATION);
            dead.push(DeadLetter::of(
                Topic::UsageRaw,
                m,
                SERVICE,
                reasons.join("; "),
                kind,
            ));
        }
    }
    MeteredPart {
        windows: distinct_windows(&rows),
        rows,
        raw,
        dead,
        unmetered,
    }
}

/// The windows `rows` touch, sorted, each once. Deduplicated through borrowed keys first: a
/// batch has up to a hundred thousand rows but a few thousand windows, and owned keys would
/// copy four strings per row.
pub(super) fn distinct_windows(rows: &[MeteredEvent]) -> Vec<WindowKey> {
    let mut first_row: HashMap<WindowKeyRef<'_>, &MeteredEvent, foldhash::fast::RandomState> =
        HashMap::default();
    for row in rows {
        first_row.entry(row.window_key()).or_insert(row);
    }
    let mut windows: Vec<WindowKey> = first_row.into_values().map(WindowKey::of).collect();
    windows.sort_unstable();
    windows
}

/// The union of two sorted lists of distinct windows, sorted, each once.
fn merge_windows(a: Vec<WindowKey>, b: Vec<WindowKey>) -> Vec<WindowKey> {
    if a.is_empty() {
        return b;
    }
    let mut merged = Vec::with_capacity(a.len() + b.len());
    let (mut a, mut b) = (a.into_iter().peekable(), b.into_iter().peekable());
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => match x.cmp(y) {
                std::cmp::Ordering::Less => a.next(),
                std::cmp::Ordering::Greater => b.next(),
                std::cmp::Ordering::Equal => {
                    b.next();
                    a.next()
                }
            },
            (Some(_), None) => a.next(),
            (None, _) => b.next(),
        };
        match next {
            Some(window) => merged.push(window),
            None => return merged,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterline_schemas::{CustomerId, EnvironmentId, MeterId, TenantId, Window};
    use time::macros::datetime;

    fn key(customer: &str, meter: &str, minute: i64) -> WindowKey {
        let at = datetime!(2026-11-27 10:00 UTC) + time::Duration::minutes(minute);
        WindowKey {
            tenant_id: TenantId::parse("t").unwrap(),
            environment_id: EnvironmentId::parse("e").unwrap(),
            customer_id: CustomerId::parse(customer).unwrap(),
            meter_id: MeterId::parse(meter).unwrap(),
            window: Window::containing(at, 1).unwrap(),
        }
    }

    #[test]
    fn the_windows_of_a_batchs_runs_merge_into_one_sorted_list_without_repeats() {
        let runs = [
            vec![
                key("a", "calls", 0),
                key("b", "calls", 1),
                key("c", "tokens", 0),
            ],
            vec![
                key("a", "calls", 0),
                key("a", "calls", 1),
                key("c", "tokens", 0),
            ],
            vec![],
            vec![key("d", "calls", 0)],
        ];
        let merged = runs.iter().cloned().fold(Vec::new(), merge_windows);
        let mut expected: Vec<WindowKey> = runs.concat();
        expected.sort();
        expected.dedup();
        assert_eq!(merged.len(), 5);
        assert_eq!(merged, expected);
    }
}
