//! Every metric the webhook relay exports, named in this one place
//! (`webhook_relay_<noun>_<unit>`, `_total` for counters). Labels are bounded: `reason` is one
//! of the error codes of [`crate::error::WebhookError`], never a tenant or event id. Request
//! counts and latency come from the shared middleware as `webhook_relay_http_requests_total`
//! and `webhook_relay_http_request_duration_seconds`.

// The one file of this crate that may use the metrics macros (clippy.toml).
#![allow(clippy::disallowed_macros)]

use std::time::Duration;

use crate::error::WebhookError;

/// Deliveries that reached the webhook route.
pub const RECEIVED: &str = "webhook_relay_webhooks_received_total";
/// Deliveries whose signature verified against the endpoint's secrets.
pub const VERIFIED: &str = "webhook_relay_webhooks_verified_total";
/// Deliveries refused with a 4xx, by `reason`; nothing was published for them.
pub const REJECTED: &str = "webhook_relay_webhooks_rejected_total";
/// Deliveries we could not take (5xx: Kafka or PostgreSQL unavailable), by `reason`; Stripe
/// retries them.
pub const FAILED: &str = "webhook_relay_webhooks_failed_total";
/// Verified deliveries of an event already relayed: answered 200, not published again.
pub const DUPLICATES: &str = "webhook_relay_webhooks_duplicate_total";
/// Events published to `stripe.webhooks` and acknowledged by Kafka.
pub const PUBLISHED: &str = "webhook_relay_webhooks_published_total";
/// Time from handing an event to the producer to Kafka's acknowledgement (or failure).
pub const PUBLISH_DURATION: &str = "webhook_relay_publish_duration_seconds";
/// Published events whose deduplication row could not be written: a redelivery of one of them
/// would be published again.
pub const DEDUP_RECORD_ERRORS: &str = "webhook_relay_dedup_record_errors_total";

pub fn received() {
    metrics::counter!(RECEIVED).increment(1);
}

pub fn verified() {
    metrics::counter!(VERIFIED).increment(1);
}

pub fn duplicate() {
    metrics::counter!(DUPLICATES).increment(1);
}

pub fn published(elapsed: Duration) {
    metrics::histogram!(PUBLISH_DURATION).record(elapsed.as_secs_f64());
    metrics::counter!(PUBLISHED).increment(1);
}

pub fn publish_failed(elapsed: Duration) {
    metrics::histogram!(PUBLISH_DURATION).record(elapsed.as_secs_f64());
}

pub fn dedup_record_failed() {
    metrics::counter!(DEDUP_RECORD_ERRORS).increment(1);
}

/// The counter an answer that is not a 2xx goes to: [`FAILED`] for a 5xx (ours, retried by
/// Stripe), [`REJECTED`] for a 4xx.
fn refusal_counter(error: &WebhookError) -> &'static str {
    if error.status().is_server_error() {
        FAILED
    } else {
        REJECTED
    }
}

/// Counts a refusal (4xx) or a failure (5xx) under its error code.
pub fn refused(error: &WebhookError) {
    metrics::counter!(refusal_counter(error), "reason" => error.code()).increment(1);
}

/// Registers every series at zero so dashboards and alerts see them before the first delivery.
pub fn describe() {
    metrics::describe_counter!(RECEIVED, "stripe webhook deliveries received");
    metrics::describe_counter!(VERIFIED, "deliveries whose stripe-signature verified");
    metrics::describe_counter!(REJECTED, "deliveries refused with a 4xx, by reason");
    metrics::describe_counter!(FAILED, "deliveries answered 5xx, by reason");
    metrics::describe_counter!(
        DUPLICATES,
        "verified deliveries of an already relayed event"
    );
    metrics::describe_counter!(PUBLISHED, "events acknowledged by kafka on stripe.webhooks");
    metrics::describe_histogram!(
        PUBLISH_DURATION,
        metrics::Unit::Seconds,
        "time for kafka to acknowledge a relayed event"
    );
    metrics::describe_counter!(
        DEDUP_RECORD_ERRORS,
        "published events whose deduplication row could not be written"
    );
    for name in [
        RECEIVED,
        VERIFIED,
        DUPLICATES,
        PUBLISHED,
        DEDUP_RECORD_ERRORS,
    ] {
        metrics::counter!(name).absolute(0);
    }
    for error in WebhookError::examples() {
        metrics::counter!(refusal_counter(&error), "reason" => error.code()).absolute(0);
    }
    // Registered without a sample (the handle is dropped) so that its series exists before
    // the first delivery.
    let _ = metrics::histogram!(PUBLISH_DURATION);
}
