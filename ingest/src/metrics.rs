//! Every metric ingest exports, named in this one place (`ingest_<noun>_<unit>`); labels are
//! bounded (error codes and outcome kinds, never an id). Request counts and latency come
//! from the shared middleware as `ingest_http_requests_total` and
//! `ingest_http_request_duration_seconds`.

// The one file of this crate that may use the metrics macros (clippy.toml).
#![allow(clippy::disallowed_macros)]

use std::time::Duration;

use crate::kafka::WriteError;

/// Events acknowledged by Kafka.
pub const EVENTS_ACCEPTED: &str = "ingest_events_accepted_total";
/// Events refused, by `reason` (the error code the client got).
pub const EVENTS_REJECTED: &str = "ingest_events_rejected_total";
/// Time from handing a request's events to the producer to the last acknowledgement.
pub const PRODUCE_DURATION: &str = "ingest_kafka_produce_duration_seconds";
/// Writes Kafka did not acknowledge, by `kind` (`unavailable`, `refused`).
pub const PRODUCE_ERRORS: &str = "ingest_kafka_produce_errors_total";

pub fn rejected(reason: &'static str, count: u64) {
    metrics::counter!(EVENTS_REJECTED, "reason" => reason).increment(count);
}

pub(crate) fn produce_finished(elapsed: Duration, outcomes: &[Result<(), WriteError>]) {
    metrics::histogram!(PRODUCE_DURATION).record(elapsed.as_secs_f64());
    let ok = outcomes.iter().filter(|o| o.is_ok()).count() as u64;
    metrics::counter!(EVENTS_ACCEPTED).increment(ok);
    for outcome in outcomes {
        match outcome {
            Ok(()) => {}
            Err(WriteError::Unavailable) => {
                metrics::counter!(PRODUCE_ERRORS, "kind" => "unavailable").increment(1)
            }
            Err(WriteError::Refused) => {
                metrics::counter!(PRODUCE_ERRORS, "kind" => "refused").increment(1)
            }
        }
    }
}

/// Registers every counter at zero so dashboards and alerts see them before the first event.
pub fn describe() {
    metrics::describe_counter!(EVENTS_ACCEPTED, "usage events acknowledged by kafka");
    metrics::describe_counter!(EVENTS_REJECTED, "usage events refused, by reason");
    metrics::describe_histogram!(
        PRODUCE_DURATION,
        metrics::Unit::Seconds,
        "time for kafka to acknowledge a request's events"
    );
    metrics::describe_counter!(PRODUCE_ERRORS, "usage.raw writes kafka did not acknowledge");
    metrics::counter!(EVENTS_ACCEPTED).absolute(0);
    for kind in ["unavailable", "refused"] {
        metrics::counter!(PRODUCE_ERRORS, "kind" => kind).absolute(0);
    }
    for reason in REJECT_REASONS {
        metrics::counter!(EVENTS_REJECTED, "reason" => *reason).absolute(0);
    }
    let _ = metrics::histogram!(PRODUCE_DURATION);
    meterline_common::auth::describe_metrics();
}

/// Every `reason` of [`EVENTS_REJECTED`]: the body checks of `JsonBody` (content type, size,
/// JSON shape), the per-event checks of `events::accept`, and the bulk checks of the routes.
/// A code missing here still counts; it only appears after its first refusal.
pub const REJECT_REASONS: &[&str] = &[
    "unsupported_media_type",
    "body_too_large",
    "unreadable_body",
    "malformed_json",
    "unknown_field",
    "missing_field",
    "invalid_type",
    "invalid_value",
    "timestamp_in_future",
    "event_too_large",
    "empty_batch",
    "too_many_events",
    "batch_invalid",
];
