//! Every metric stripe-sink exports, named in this one place (`stripe_sink_<noun>_<unit>`);
//! labels are bounded (reasons, sources, kinds), never a customer, meter or event id.

/// Messages read from `stripe.webhooks`.
pub const WEBHOOK_EVENTS_CONSUMED: &str = "stripe_sink_webhook_events_consumed_total";
/// Webhook events that changed nothing, by `reason` (`unhandled_type`, `stale`).
pub const WEBHOOK_EVENTS_IGNORED: &str = "stripe_sink_webhook_events_ignored_total";
/// Messages of `stripe.webhooks` sent to `stripe.webhooks.dlq`, by `reason` (`parse`,
/// `validation`, `unsupported_version`, `database_refused`).
pub const WEBHOOK_EVENTS_REJECTED: &str = "stripe_sink_webhook_events_rejected_total";
/// Failed attempts to apply a webhook event (it is retried), by `step`.
pub const WEBHOOK_RETRIES: &str = "stripe_sink_webhook_retries_total";
/// Customer mappings made active, by `source` (`webhook`, `manual`).
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
    for counter in [
        WEBHOOK_EVENTS_CONSUMED,
        CUSTOMER_MAPPINGS_UPDATED,
        UNMAPPED_CUSTOMERS_RECORDED,
    ] {
        metrics::counter!(counter).absolute(0);
    }
    for source in ["webhook", "manual"] {
        metrics::counter!(CUSTOMER_MAPPINGS_CREATED, "source" => source).absolute(0);
        metrics::counter!(CUSTOMER_MAPPINGS_RETIRED, "source" => source).absolute(0);
    }
}

// The sync (usage.windows -> ledger -> Stripe).

/// Window totals recorded in the ledger.
pub const WINDOWS_RECORDED: &str = "stripe_sink_windows_recorded_total";
/// Claimed windows released, by `outcome` (`settled`, `retry`, `unanswered`, `pending_mapping`, `skipped`,
/// `expired`, `failed`, `needs_reconciliation`).
pub const WINDOWS_SETTLED: &str = "stripe_sink_windows_settled_total";
/// Meter event requests to Stripe, by `outcome` (`accepted`, `already_recorded`,
/// `retriable`, `rate_limited`, `in_progress`, `authentication`, `permanent`, `circuit_open`).
pub const STRIPE_REQUESTS: &str = "stripe_sink_stripe_requests_total";
/// Time of one meter event request to Stripe.
pub const STRIPE_REQUEST_DURATION: &str = "stripe_sink_stripe_request_duration_seconds";
/// Time a request waited for its account's token bucket.
pub const RATE_LIMIT_WAIT: &str = "stripe_sink_rate_limit_wait_seconds";
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
    describe_histogram!(
        RATE_LIMIT_WAIT,
        Unit::Seconds,
        "token bucket wait per request"
    );
    describe_histogram!(SYNC_LAG, Unit::Seconds, "window end to stripe acceptance");
    describe_gauge!(CIRCUITS_OPEN, "stripe accounts with an open circuit");
    metrics::counter!(WINDOWS_RECORDED).absolute(0);
    metrics::gauge!(CIRCUITS_OPEN).set(0.0);
    for outcome in [
        "accepted",
        "already_recorded",
        "retriable",
        "rate_limited",
        "in_progress",
        "authentication",
        "permanent",
        "circuit_open",
    ] {
        metrics::counter!(STRIPE_REQUESTS, "outcome" => outcome).absolute(0);
    }
}
