//! Every metric the aggregator exports, named in this one place (`aggregator_<noun>_<unit>`);
//! labels are bounded (reasons, partitions), never an id.

// The one file of this crate that may use the metrics macros (clippy.toml).
#![allow(clippy::disallowed_macros)]

/// Messages read from `usage.raw`.
pub const EVENTS_CONSUMED: &str = "aggregator_events_consumed_total";
/// Rows written to `events_processed` (one per event and meter it feeds).
pub const ROWS_INSERTED: &str = "aggregator_rows_inserted_total";
/// Messages sent to `usage.raw.dlq` or `usage.resync.dlq`, by `reason` ([`REJECT_REASONS`]).
pub const EVENTS_REJECTED: &str = "aggregator_events_rejected_total";
/// Every `reason` of [`EVENTS_REJECTED`]: the parse failures of a message, and a meter that
/// cannot use the event's property value.
pub const REJECT_REASONS: [&str; 4] = [
    "parse",
    "validation",
    "unsupported_version",
    "invalid_quantity",
];
/// Events that matched no meter of their tenant environment.
pub const EVENTS_UNMETERED: &str = "aggregator_events_unmetered_total";
/// Events for windows that had already been published (their window goes out again).
pub const LATE_EVENTS: &str = "aggregator_late_events_total";
/// Copies of an event stamped at another time than its first copy: counted at the first
/// copy's time, in its window ([`crate::first_copy`]).
pub const COPIES_RESTAMPED: &str = "aggregator_copies_restamped_total";
/// Time a batch (or a backfill page) took to look its events up in `event_first_seen`, record
/// the new ones and fix its copies.
pub const FIRST_COPIES_DURATION: &str = "aggregator_first_copies_duration_seconds";
/// Events older than Stripe's 35 days: stored and flagged, never sendable.
pub const EXPIRED_EVENTS: &str = "aggregator_expired_events_total";
/// Events meter backfills gave their meter (`outcome` `found`), or could not give it because
/// the meter cannot use their property value (`unusable`).
pub const BACKFILL_EVENTS: &str = "aggregator_backfill_events_total";
/// Meter backfills worked through to their end.
pub const BACKFILLS: &str = "aggregator_backfills_completed_total";
/// Subscription periods Stripe named whose customer's windows were marked for recomputation.
pub const BILLING_PERIODS_APPLIED: &str = "aggregator_billing_periods_applied_total";
/// Events per batch.
pub const BATCH_SIZE: &str = "aggregator_batch_events";
/// Time ClickHouse took to accept a batch.
pub const INSERT_DURATION: &str = "aggregator_clickhouse_insert_duration_seconds";
/// Failed attempts of a batch step (it is retried), by `step` ([`RETRY_STEPS`]).
pub const BATCH_RETRIES: &str = "aggregator_batch_retries_total";
/// Every `step` of [`BATCH_RETRIES`].
pub const RETRY_STEPS: [&str; 10] = [
    "refresh_meters",
    "first_copies",
    "clickhouse_insert",
    "mark_windows",
    "mark_later_windows",
    "dead_letter",
    "claim_due",
    "claim_resync",
    "backfill",
    "billing_periods",
];
/// Messages behind the end of each `usage.raw` partition this instance owns.
pub const CONSUMER_LAG: &str = "aggregator_consumer_lag_messages";
/// Windows of the registry a batch marks changed: one `aggregation_windows` row written
/// (inserted or updated) for each distinct (customer, meter, window) among its events.
pub const WINDOWS_MARKED: &str = "aggregator_batch_windows_marked";
/// Window totals published to `usage.windows`, by `reason` (`due`, `late`, `resync`).
pub const WINDOWS_PUBLISHED: &str = "aggregator_windows_published_total";
/// From a window being due to its total acknowledged on `usage.windows` (first publication).
pub const PUBLISH_LAG: &str = "aggregator_window_publish_lag_seconds";
/// Resync requests completed.
pub const RESYNCS: &str = "aggregator_resync_requests_total";

pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(EVENTS_CONSUMED, "messages read from usage.raw");
    describe_counter!(ROWS_INSERTED, "rows written to events_processed");
    describe_counter!(
        EVENTS_REJECTED,
        "messages sent to usage.raw.dlq or usage.resync.dlq, by reason"
    );
    describe_counter!(EVENTS_UNMETERED, "events that matched no meter");
    describe_counter!(LATE_EVENTS, "events for windows already published");
    describe_counter!(EXPIRED_EVENTS, "events older than stripe's 35 days");
    describe_counter!(
        COPIES_RESTAMPED,
        "copies of an event stamped at another time than its first copy, counted at its time"
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "events per batch");
    describe_histogram!(
        WINDOWS_MARKED,
        Unit::Count,
        "aggregation_windows rows a batch marks (one per distinct customer, meter and window)"
    );
    describe_histogram!(
        INSERT_DURATION,
        Unit::Seconds,
        "clickhouse insert time per batch"
    );
    describe_counter!(BATCH_RETRIES, "failed attempts of a batch step, by step");
    describe_histogram!(
        FIRST_COPIES_DURATION,
        Unit::Seconds,
        "first-copy lookup, record and fixes per batch"
    );
    describe_gauge!(
        CONSUMER_LAG,
        "messages behind the partition end, by partition"
    );
    describe_counter!(WINDOWS_PUBLISHED, "window totals published, by reason");
    describe_histogram!(
        PUBLISH_LAG,
        Unit::Seconds,
        "window due to total acknowledged"
    );
    describe_counter!(RESYNCS, "resync requests completed");
    describe_counter!(
        BACKFILL_EVENTS,
        "events meter backfills gave their meter, or could not use, by outcome"
    );
    describe_counter!(BACKFILLS, "meter backfills worked through to their end");
    describe_counter!(
        BILLING_PERIODS_APPLIED,
        "subscription periods whose customer's windows were marked for recomputation"
    );
    for counter in [
        EVENTS_CONSUMED,
        ROWS_INSERTED,
        EVENTS_UNMETERED,
        LATE_EVENTS,
        EXPIRED_EVENTS,
        COPIES_RESTAMPED,
        RESYNCS,
        BACKFILLS,
        BILLING_PERIODS_APPLIED,
    ] {
        metrics::counter!(counter).absolute(0);
    }
    for outcome in ["found", "unusable"] {
        metrics::counter!(BACKFILL_EVENTS, "outcome" => outcome).absolute(0);
    }
    for reason in ["due", "late", "resync"] {
        metrics::counter!(WINDOWS_PUBLISHED, "reason" => reason).absolute(0);
    }
    // Registered at zero so that a rate over them is defined before the first failure.
    for reason in REJECT_REASONS {
        metrics::counter!(EVENTS_REJECTED, "reason" => reason).absolute(0);
    }
    for step in RETRY_STEPS {
        metrics::counter!(BATCH_RETRIES, "step" => step).absolute(0);
    }
}

// The emit functions: the only places the aggregator counts or records (a `clippy.toml`
// rule keeps the raw macros out of the rest of the crate).

pub(crate) fn batch_read(events: usize) {
    metrics::counter!(EVENTS_CONSUMED).increment(events as u64);
    metrics::histogram!(BATCH_SIZE).record(events as f64);
}

pub(crate) fn batch_retry(step: &'static str) {
    metrics::counter!(BATCH_RETRIES, "step" => step).increment(1);
}

pub(crate) fn batch_inserted(elapsed: std::time::Duration, rows: usize) {
    metrics::histogram!(INSERT_DURATION).record(elapsed.as_secs_f64());
    metrics::counter!(ROWS_INSERTED).increment(rows as u64);
}

pub(crate) fn batch_recorded(
    windows_marked: usize,
    late_events: usize,
    expired_events: usize,
    unmetered: u64,
) {
    metrics::histogram!(WINDOWS_MARKED).record(windows_marked as f64);
    metrics::counter!(LATE_EVENTS).increment(late_events as u64);
    metrics::counter!(EXPIRED_EVENTS).increment(expired_events as u64);
    metrics::counter!(EVENTS_UNMETERED).increment(unmetered);
}

pub(crate) fn copies_settled(elapsed: std::time::Duration, restamped: usize) {
    metrics::histogram!(FIRST_COPIES_DURATION).record(elapsed.as_secs_f64());
    metrics::counter!(COPIES_RESTAMPED).increment(restamped as u64);
}

pub(crate) fn rejected(kind: &meterline_schemas::DlqErrorKind) {
    metrics::counter!(EVENTS_REJECTED, "reason" => kind.as_str().to_owned()).increment(1);
}

pub(crate) fn window_published(reason: &meterline_schemas::WindowReason) {
    let reason = match reason {
        meterline_schemas::WindowReason::Due => "due",
        meterline_schemas::WindowReason::Late => "late",
        meterline_schemas::WindowReason::Resync { .. } => "resync",
    };
    metrics::counter!(WINDOWS_PUBLISHED, "reason" => reason).increment(1);
}

pub(crate) fn first_publication_lag(lag: time::Duration) {
    metrics::histogram!(PUBLISH_LAG).record(lag.as_seconds_f64().max(0.0));
}

pub(crate) fn resync_done() {
    metrics::counter!(RESYNCS).increment(1);
}

pub(crate) fn backfill_page(found: u64, unusable: u64) {
    metrics::counter!(BACKFILL_EVENTS, "outcome" => "found").increment(found);
    metrics::counter!(BACKFILL_EVENTS, "outcome" => "unusable").increment(unusable);
}

pub(crate) fn backfill_done() {
    metrics::counter!(BACKFILLS).increment(1);
}

pub(crate) fn billing_periods_applied(periods: u64) {
    metrics::counter!(BILLING_PERIODS_APPLIED).increment(periods);
}

pub(crate) fn consumer_lag(partition: i32, lag: i64) {
    metrics::gauge!(CONSUMER_LAG, "partition" => partition.to_string()).set(lag as f64);
}
