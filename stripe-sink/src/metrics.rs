//! Every metric stripe-sink exports, named in this one place (`stripe_sink_<noun>_<unit>`);
//! labels are bounded (reasons, sources, kinds), never a customer, meter or event id.

// The one file of this crate that may use the metrics macros (clippy.toml).
#![allow(clippy::disallowed_macros)]

use meterline_common::shutdown::pause;

use crate::ledger::LedgerState;

/// Messages read from `stripe.webhooks`.
pub const WEBHOOK_EVENTS_CONSUMED: &str = "stripe_sink_webhook_events_consumed_total";
/// Webhook events that changed nothing, by `reason` (`unhandled_type`, `stale`).
pub const WEBHOOK_EVENTS_IGNORED: &str = "stripe_sink_webhook_events_ignored_total";
/// Messages of `stripe.webhooks` sent to `stripe.webhooks.dlq`, by `reason` (`parse`,
/// `validation`, `unsupported_version`, `database_refused`).
pub const WEBHOOK_EVENTS_REJECTED: &str = "stripe_sink_webhook_events_rejected_total";
/// Failed attempts to apply a webhook event (it is retried), by `step`.
pub const WEBHOOK_RETRIES: &str = "stripe_sink_webhook_retries_total";
/// Customer mappings made active, by `source` (`webhook`, `manual`, `import`; a bulk upload
/// counts as `manual`).
pub const CUSTOMER_MAPPINGS_CREATED: &str = "stripe_sink_customer_mappings_created_total";
/// Active customer mappings refreshed by a newer event of their Stripe customer.
pub const CUSTOMER_MAPPINGS_UPDATED: &str = "stripe_sink_customer_mappings_updated_total";
/// Customer mappings retired, by `source` of the change (`webhook`, `manual`).
pub const CUSTOMER_MAPPINGS_RETIRED: &str = "stripe_sink_customer_mappings_retired_total";
/// Stripe customers recorded as unmapped (no usable `metadata.external_id`).
pub const UNMAPPED_CUSTOMERS_RECORDED: &str = "stripe_sink_unmapped_customers_recorded_total";
/// Stripe meter error reports recorded, by `type` (`error_report_triggered`,
/// `no_meter_found`).
pub const METER_ERROR_REPORTS_RECORDED: &str = "stripe_sink_meter_error_reports_recorded_total";
/// Accepted meter events that Stripe's error reports say it dropped: their units were taken
/// back out of the synced sums and their windows failed.
pub const METER_EVENTS_DROPPED: &str = "stripe_sink_meter_events_dropped_total";
/// Changes of a window's usage found after its billing period's invoice was final: reported
/// on the window (failed, `after_final_invoice`), not sent.
pub const CHANGES_AFTER_FINAL_INVOICE: &str = "stripe_sink_changes_after_final_invoice_total";

pub fn describe() {
    use metrics::describe_counter;
    describe_counter!(
        WEBHOOK_EVENTS_CONSUMED,
        "messages read from stripe.webhooks"
    );
    describe_counter!(
        WEBHOOK_EVENTS_IGNORED,
        "webhook events that changed nothing, by reason"
    );
    describe_counter!(
        WEBHOOK_EVENTS_REJECTED,
        "messages sent to stripe.webhooks.dlq, by reason"
    );
    describe_counter!(
        WEBHOOK_RETRIES,
        "failed attempts to apply a webhook event, by step"
    );
    describe_counter!(
        CUSTOMER_MAPPINGS_CREATED,
        "customer mappings made active, by source"
    );
    describe_counter!(
        CUSTOMER_MAPPINGS_UPDATED,
        "active customer mappings refreshed by a newer event"
    );
    describe_counter!(
        CUSTOMER_MAPPINGS_RETIRED,
        "customer mappings retired, by source"
    );
    describe_counter!(
        UNMAPPED_CUSTOMERS_RECORDED,
        "stripe customers recorded without a usable external_id"
    );
    describe_counter!(
        METER_ERROR_REPORTS_RECORDED,
        "stripe meter error reports recorded, by type"
    );
    describe_counter!(
        METER_EVENTS_DROPPED,
        "accepted meter events stripe reported dropped; their units are owed again"
    );
    describe_counter!(
        CHANGES_AFTER_FINAL_INVOICE,
        "usage changes found after their period's invoice was final: reported, not sent"
    );
    for counter in [
        WEBHOOK_EVENTS_CONSUMED,
        CUSTOMER_MAPPINGS_UPDATED,
        UNMAPPED_CUSTOMERS_RECORDED,
        METER_EVENTS_DROPPED,
        CHANGES_AFTER_FINAL_INVOICE,
    ] {
        metrics::counter!(counter).absolute(0);
    }
    for source in ["webhook", "manual"] {
        metrics::counter!(CUSTOMER_MAPPINGS_CREATED, "source" => source).absolute(0);
        metrics::counter!(CUSTOMER_MAPPINGS_RETIRED, "source" => source).absolute(0);
    }
    metrics::counter!(CUSTOMER_MAPPINGS_CREATED, "source" => "import").absolute(0);
    for reason in ["unhandled_type", "stale"] {
        metrics::counter!(WEBHOOK_EVENTS_IGNORED, "reason" => reason).absolute(0);
    }
    for reason in [
        "parse",
        "validation",
        "unsupported_version",
        "database_refused",
    ] {
        metrics::counter!(WEBHOOK_EVENTS_REJECTED, "reason" => reason).absolute(0);
    }
    for step in [
        "customer_mapping",
        "error_report",
        "error_report_details",
        "dropped_send",
        "dead_letter",
    ] {
        metrics::counter!(WEBHOOK_RETRIES, "step" => step).absolute(0);
    }
    for kind in ["error_report_triggered", "no_meter_found"] {
        metrics::counter!(METER_ERROR_REPORTS_RECORDED, "type" => kind).absolute(0);
    }
    meterline_common::auth::describe_metrics();
}

// The sync (usage.windows -> ledger -> Stripe).

/// Window totals recorded in the ledger.
pub const WINDOWS_RECORDED: &str = "stripe_sink_windows_recorded_total";
/// Claimed windows released, by `outcome` (one of [`SETTLE_OUTCOMES`]).
pub const WINDOWS_SETTLED: &str = "stripe_sink_windows_settled_total";
/// The `outcome` labels of [`WINDOWS_SETTLED`], as `sync::finish_label` names them, and
/// `claim_lost`: the lease ran out and another dispatcher took the window over.
pub const SETTLE_OUTCOMES: &[&str] = &[
    "settled",
    "retry",
    "unanswered",
    "pending_mapping",
    "skipped",
    "expired",
    "failed",
    "needs_reconciliation",
    "claim_lost",
];
/// Meter event requests to Stripe, by `outcome` (`accepted`, `already_recorded`,
/// `retriable`, `rate_limited`, `in_progress`, `authentication`, `permanent`, `circuit_open`,
/// `pacing_unavailable`).
pub const STRIPE_REQUESTS: &str = "stripe_sink_stripe_requests_total";
/// Time of one meter event request to Stripe.
pub const STRIPE_REQUEST_DURATION: &str = "stripe_sink_stripe_request_duration_seconds";
/// Time a request waited for its account's send slot (shared by every replica).
pub const RATE_LIMIT_WAIT: &str = "stripe_sink_rate_limit_wait_seconds";
/// Send slots dropped because the request woke up too late to use them.
pub const PACING_SLOTS_MISSED: &str = "stripe_sink_pacing_slots_missed_total";
/// From a window's end to Stripe accepting its meter event.
pub const SYNC_LAG: &str = "stripe_sink_sync_lag_seconds";
/// Stripe accounts whose circuit breaker is open or half-open.
pub const CIRCUITS_OPEN: &str = "stripe_sink_circuits_open";

pub fn describe_sync() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(WINDOWS_RECORDED, "window totals recorded in the ledger");
    describe_counter!(WINDOWS_SETTLED, "claimed windows released, by outcome");
    describe_counter!(
        STRIPE_REQUESTS,
        "meter event requests to stripe, by outcome"
    );
    describe_histogram!(
        STRIPE_REQUEST_DURATION,
        Unit::Seconds,
        "stripe request time"
    );
    describe_histogram!(RATE_LIMIT_WAIT, Unit::Seconds, "send slot wait per request");
    describe_histogram!(SYNC_LAG, Unit::Seconds, "window end to stripe acceptance");
    describe_counter!(
        PACING_SLOTS_MISSED,
        "send slots dropped: the request woke too late to use them"
    );
    metrics::counter!(PACING_SLOTS_MISSED).absolute(0);
    describe_gauge!(CIRCUITS_OPEN, "stripe accounts with an open circuit");
    metrics::counter!(WINDOWS_RECORDED).absolute(0);
    metrics::gauge!(CIRCUITS_OPEN).set(0.0);
    // Registered without a sample so that their series exist before the first request.
    for histogram in [STRIPE_REQUEST_DURATION, RATE_LIMIT_WAIT, SYNC_LAG] {
        let _ = metrics::histogram!(histogram);
    }
    for outcome in SETTLE_OUTCOMES {
        metrics::counter!(WINDOWS_SETTLED, "outcome" => *outcome).absolute(0);
    }
    for outcome in [
        "accepted",
        "already_recorded",
        "retriable",
        "rate_limited",
        "in_progress",
        "authentication",
        "permanent",
        "circuit_open",
        "pacing_unavailable",
    ] {
        metrics::counter!(STRIPE_REQUESTS, "outcome" => outcome).absolute(0);
    }
}

// Gauges read from PostgreSQL and Kafka every few seconds by [`report`]: the state of the
// ledger and of the consumer groups, which no single request or message can tell.

/// Windows in each open ledger state (`state`: one of [`OPEN_STATES`]), all tenants together.
/// Closed states (`synced`, `skipped`, `expired`) grow forever and are left out.
pub const LEDGER_WINDOWS: &str = "stripe_sink_ledger_windows";
/// Seconds since the end of the oldest window still owed to Stripe (`pending`, `in_flight`,
/// `pending_mapping`), 0 when none is: the lag `GET /v1/stripe/sync/status` shows, for every
/// tenant at once.
pub const OLDEST_OWED_WINDOW_AGE: &str = "stripe_sink_oldest_owed_window_age_seconds";
/// Messages after the committed offset of each partition of the sink's consumer groups, by
/// `topic` (`usage.windows`, `stripe.webhooks`) and `partition`.
pub const CONSUMER_LAG: &str = "stripe_sink_consumer_lag_messages";
/// Messages ever written to each dead-letter topic (the sum of its partitions' end offsets),
/// by `topic` (`usage.raw.dlq`, `usage.windows.dlq`, `usage.resync.dlq`,
/// `stripe.webhooks.dlq`), whichever service wrote them.
pub const DLQ_MESSAGES: &str = "stripe_sink_dlq_messages_total";

/// The ledger states [`LEDGER_WINDOWS`] counts.
pub const OPEN_STATES: &[&str] = &LedgerState::names(LedgerState::OPEN);

/// How long one watch may wait for Kafka.
const KAFKA_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What [`report`] reads: the ledger's pool, each consumer group of the sink and the topic it
/// reads, and the dead-letter topics.
pub struct Watches {
    pool: sqlx::PgPool,
    groups: Vec<(
        meterline_schemas::Topic,
        meterline_common::kafka::GroupWatch,
    )>,
    /// The service's metadata client (also its readiness probe): end offsets of the DLQs.
    metadata: std::sync::Arc<meterline_common::kafka::KafkaProbe>,
    topics: meterline_common::kafka::Topics,
}

impl Watches {
    /// `groups`: each topic the sink consumes and the consumer group reading it.
    pub fn new(
        pool: sqlx::PgPool,
        kafka: &meterline_common::config::KafkaSettings,
        metadata: std::sync::Arc<meterline_common::kafka::KafkaProbe>,
        client_id: &str,
        groups: &[(meterline_schemas::Topic, &str)],
    ) -> Result<Self, crate::Error> {
        let topics = meterline_common::kafka::Topics::new(kafka.topic_prefix.clone());
        let groups = groups
            .iter()
            .map(|(topic, group)| {
                meterline_common::kafka::GroupWatch::new(
                    kafka,
                    client_id,
                    group,
                    &topics.name(*topic),
                )
                .map(|watch| (*topic, watch))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            pool,
            groups,
            metadata,
            topics,
        })
    }

    fn describe() {
        use metrics::{describe_counter, describe_gauge, Unit};
        describe_gauge!(LEDGER_WINDOWS, "windows in each open ledger state");
        describe_gauge!(
            OLDEST_OWED_WINDOW_AGE,
            Unit::Seconds,
            "seconds since the end of the oldest window still owed to stripe"
        );
        describe_gauge!(
            CONSUMER_LAG,
            "messages after the committed offset, by topic and partition"
        );
        describe_counter!(
            DLQ_MESSAGES,
            "messages ever written to each dead-letter topic"
        );
    }

    async fn ledger(&self) -> Result<(), crate::Error> {
        let rows: Vec<(String, i64, Option<time::OffsetDateTime>)> = sqlx::query_as(
            "SELECT sync_status, count(*), min(window_end) FROM stripe_sync_batches
             WHERE sync_status = ANY($1) GROUP BY sync_status",
        )
        .bind(OPEN_STATES)
        .fetch_all(&self.pool)
        .await
        .map_err(|source| crate::Error::Postgres {
            context: "counting open windows",
            source,
        })?;
        let now = time::OffsetDateTime::now_utc();
        let mut oldest_owed: Option<time::OffsetDateTime> = None;
        for state in LedgerState::OPEN {
            let row = rows.iter().find(|(status, _, _)| status == state.as_str());
            let count = row.map_or(0, |(_, count, _)| *count);
            metrics::gauge!(LEDGER_WINDOWS, "state" => state.as_str()).set(count as f64);
            if state.is_owed() {
                if let Some(end) = row.and_then(|(_, _, end)| *end) {
                    oldest_owed = Some(oldest_owed.map_or(end, |o| o.min(end)));
                }
            }
        }
        let age = oldest_owed.map_or(0.0, |end| (now - end).as_seconds_f64().max(0.0));
        metrics::gauge!(OLDEST_OWED_WINDOW_AGE).set(age);
        Ok(())
    }

    async fn kafka(&self) -> Result<(), crate::Error> {
        for (topic, watch) in &self.groups {
            for partition in watch.lag(KAFKA_TIMEOUT).await? {
                metrics::gauge!(CONSUMER_LAG,
                    "topic" => topic.base_name(),
                    "partition" => partition.partition.to_string())
                .set(partition.lag as f64);
            }
        }
        for topic in meterline_schemas::Topic::all() {
            let written = self
                .metadata
                .end_offsets_total(&self.topics.dlq(*topic), KAFKA_TIMEOUT)
                .await?;
            metrics::counter!(DLQ_MESSAGES, "topic" => topic.dlq_base_name())
                .absolute(written.max(0) as u64);
        }
        Ok(())
    }
}

/// Reads the ledger and Kafka gauges now and then every `every`, until shutdown. A failed
/// reading is logged and leaves the gauges at their last values; the next one tries again.
pub async fn report(
    watches: Watches,
    every: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), crate::Error> {
    Watches::describe();
    loop {
        if let Err(e) = watches.ledger().await {
            tracing::warn!(error = %e, "reading the ledger gauges failed");
        }
        if let Err(e) = watches.kafka().await {
            tracing::warn!(error = %e, "reading the kafka gauges failed");
        }
        if !pause(every, &shutdown).await {
            return Ok(());
        }
    }
}

// The emit functions: the only places the sink counts or records outside this file (a
// `clippy.toml` rule keeps the raw macros out of the rest of the crate).

pub(crate) fn webhook_event_consumed() {
    metrics::counter!(WEBHOOK_EVENTS_CONSUMED).increment(1);
}

/// `reason`: `unhandled_type` or `stale`.
pub(crate) fn webhook_event_ignored(reason: &'static str) {
    metrics::counter!(WEBHOOK_EVENTS_IGNORED, "reason" => reason).increment(1);
}

pub(crate) fn webhook_event_rejected(kind: &meterline_schemas::DlqErrorKind) {
    metrics::counter!(WEBHOOK_EVENTS_REJECTED, "reason" => kind.as_str().to_owned()).increment(1);
}

pub(crate) fn webhook_retry(step: &'static str) {
    metrics::counter!(WEBHOOK_RETRIES, "step" => step).increment(1);
}

/// `source`: `webhook`, `manual` or `import`.
pub(crate) fn customer_mappings_created(source: &'static str, count: u64) {
    metrics::counter!(CUSTOMER_MAPPINGS_CREATED, "source" => source).increment(count);
}

pub(crate) fn customer_mappings_updated(count: u64) {
    metrics::counter!(CUSTOMER_MAPPINGS_UPDATED).increment(count);
}

/// `source`: `webhook` or `manual`.
pub(crate) fn customer_mappings_retired(source: &'static str, count: u64) {
    metrics::counter!(CUSTOMER_MAPPINGS_RETIRED, "source" => source).increment(count);
}

pub(crate) fn unmapped_customer_recorded() {
    metrics::counter!(UNMAPPED_CUSTOMERS_RECORDED).increment(1);
}

/// `kind`: `error_report_triggered` or `no_meter_found`.
pub(crate) fn meter_error_report_recorded(kind: &'static str) {
    metrics::counter!(METER_ERROR_REPORTS_RECORDED, "type" => kind).increment(1);
}

pub(crate) fn meter_event_dropped() {
    metrics::counter!(METER_EVENTS_DROPPED).increment(1);
}

pub(crate) fn change_after_final_invoice() {
    metrics::counter!(CHANGES_AFTER_FINAL_INVOICE).increment(1);
}

pub(crate) fn windows_recorded(count: usize) {
    metrics::counter!(WINDOWS_RECORDED).increment(count as u64);
}

/// `outcome`: one of [`SETTLE_OUTCOMES`].
pub(crate) fn window_settled(outcome: &'static str) {
    metrics::counter!(WINDOWS_SETTLED, "outcome" => outcome).increment(1);
}

pub(crate) fn sync_lag(lag: time::Duration) {
    metrics::histogram!(SYNC_LAG).record(lag.as_seconds_f64().max(0.0));
}

pub(crate) fn rate_limit_waited(waited: std::time::Duration) {
    metrics::histogram!(RATE_LIMIT_WAIT).record(waited.as_secs_f64());
}

pub(crate) fn pacing_slot_missed() {
    metrics::counter!(PACING_SLOTS_MISSED).increment(1);
}

/// One meter event request: how long Stripe took (`None` when it never went out) and its
/// `outcome` label.
pub(crate) fn stripe_request(took: Option<std::time::Duration>, outcome: &'static str) {
    if let Some(took) = took {
        metrics::histogram!(STRIPE_REQUEST_DURATION).record(took.as_secs_f64());
    }
    metrics::counter!(STRIPE_REQUESTS, "outcome" => outcome).increment(1);
}

pub(crate) fn circuits_open(open: usize) {
    metrics::gauge!(CIRCUITS_OPEN).set(open as f64);
}
