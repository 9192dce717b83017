//! The Prometheus recorder. Each service installs it once; `/metrics` renders it.
//!
//! Naming rule for every metric in meterline: `<service>_<noun>_<unit>`, `_total` for
//! counters, base units (`_seconds`, `_bytes`), and only bounded label values: never a
//! customer id, event id or other value that grows with traffic.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::Error;

/// Latency buckets for request and I/O durations, in seconds: 0.5 ms up to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Installs the global recorder and returns the handle that renders it. `_seconds` metrics
/// become histograms with the latency buckets above.
pub fn install(service: &'static str) -> Result<PrometheusHandle, Error> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(|e| Error::Metrics(e.to_string()))?
        .install_recorder()
        .map_err(|e| Error::Metrics(e.to_string()))?;
    metrics::gauge!("meterline_build_info", "service" => service, "version" => env!("CARGO_PKG_VERSION"))
        .set(1.0);
    Ok(handle)
}
