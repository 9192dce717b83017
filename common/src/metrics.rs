//! The Prometheus recorder. Each service installs it once; `/metrics` renders it.
//!
//! Naming rule for every metric in meterline: `<service>_<noun>_<unit>`, `_total` for
//! counters, base units (`_seconds`, `_bytes`), and only bounded label values: never a
//! customer id, event id or other value that grows with traffic.

// The one file of this crate that may use the metrics macros (clippy.toml).
#![allow(clippy::disallowed_macros)]

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::Error;

/// Latency buckets for request and I/O durations, in seconds: 0.5 ms up to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Buckets for lags measured from a window's end or due time, in seconds: 1 s up to a day.
/// Those lags are minutes to hours (a window is due minutes after its end), far past the top
/// latency bucket, where every observation would land in `+Inf`.
const LAG_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 2700.0, 3600.0, 4500.0, 5400.0,
    7200.0, 14400.0, 43200.0, 86400.0,
];

/// Buckets for sizes of batches, in items: 1 up to a million (the largest batch any service
/// allows).
const BATCH_BUCKETS: &[f64] = &[
    1.0, 10.0, 100.0, 1000.0, 5000.0, 10000.0, 25000.0, 50000.0, 100000.0, 250000.0, 1000000.0,
];

/// Installs the global recorder and returns the handle that renders it. `_lag_seconds`
/// metrics become histograms with the lag buckets, other `_seconds` metrics with the latency
/// buckets, `_batch_events` and `_windows_marked` metrics with the batch buckets. (The exporter tries suffix
/// matchers in string order, so `_lag_seconds` is tried before `_seconds`.)
pub fn install(service: &'static str) -> Result<PrometheusHandle, Error> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_lag_seconds".into()), LAG_BUCKETS)
        .map_err(|e| Error::Metrics(e.to_string()))?
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(|e| Error::Metrics(e.to_string()))?
        .set_buckets_for_metric(Matcher::Suffix("_batch_events".into()), BATCH_BUCKETS)
        .map_err(|e| Error::Metrics(e.to_string()))?
        .set_buckets_for_metric(Matcher::Suffix("_windows_marked".into()), BATCH_BUCKETS)
        .map_err(|e| Error::Metrics(e.to_string()))?
        .install_recorder()
        .map_err(|e| Error::Metrics(e.to_string()))?;
    metrics::describe_gauge!(
        "meterline_build_info",
        "always 1; the service and its version as labels"
    );
    // The series of the shared ops routes (see `ops`), described here once per service so
    // that each has its help text before the first request or readiness check.
    metrics::describe_counter!(
        format!("{service}_http_requests_total"),
        "http requests answered, by method, route template and status"
    );
    metrics::describe_histogram!(
        format!("{service}_http_request_duration_seconds"),
        metrics::Unit::Seconds,
        "http request time, by method and route template"
    );
    metrics::describe_gauge!(
        format!("{service}_dependency_up"),
        "1 when the dependency answered the last readiness check, else 0"
    );
    metrics::gauge!("meterline_build_info", "service" => service, "version" => env!("CARGO_PKG_VERSION"))
        .set(1.0);
    Ok(handle)
}

// The emit functions of the shared plumbing: the only places outside a service's own
// `metrics.rs` that count or record (a `clippy.toml` rule keeps the raw macros out of the
// rest of the workspace).

/// Requests refused with a 401, by `reason` (the error code). Shared by every service that
/// takes bearer tokens; Prometheus's `job` label tells them apart.
pub const AUTH_FAILURES: &str = "meterline_auth_failures_total";

/// Describes [`AUTH_FAILURES`] and registers each `reason` at zero, so that dashboards and
/// alerts see the series before the first refusal.
pub fn describe_auth_failures(reasons: impl IntoIterator<Item = &'static str>) {
    metrics::describe_counter!(AUTH_FAILURES, "requests refused with a 401, by reason");
    for reason in reasons {
        metrics::counter!(AUTH_FAILURES, "reason" => reason).absolute(0);
    }
}

pub fn auth_failure(reason: &'static str) {
    metrics::counter!(AUTH_FAILURES, "reason" => reason).increment(1);
}

/// `<service>_dependency_up{dependency}`: 1 when the last readiness check of it passed.
pub fn dependency_up(service: &'static str, dependency: &'static str, up: bool) {
    metrics::gauge!(format!("{service}_dependency_up"), "dependency" => dependency).set(if up {
        1.0
    } else {
        0.0
    });
}

/// One answered HTTP request: `<service>_http_requests_total` and
/// `<service>_http_request_duration_seconds`, by bounded method, route template and status.
pub fn http_request(
    service: &'static str,
    method: &'static str,
    route: String,
    status: u16,
    elapsed: std::time::Duration,
) {
    metrics::counter!(format!("{service}_http_requests_total"),
        "method" => method, "route" => route.clone(), "status" => status.to_string())
    .increment(1);
    metrics::histogram!(format!("{service}_http_request_duration_seconds"),
        "method" => method, "route" => route)
    .record(elapsed.as_secs_f64());
}
