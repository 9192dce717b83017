//! What the benchmark reads of the aggregator's own `/metrics`: single samples, and the
//! publish-lag histogram between two scrapes.

use anyhow::Context;
use meterline_tests::ServiceProcess;

/// The aggregator's `/metrics` text.
pub(crate) async fn scrape(aggregator: &ServiceProcess) -> anyhow::Result<String> {
    reqwest::get(aggregator.url("/metrics"))
        .await
        .context("reading the aggregator's /metrics")?
        .text()
        .await
        .context("reading the aggregator's /metrics")
}

/// The value of the sample named exactly `name` (labels included) in a Prometheus text.
pub(crate) fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (sample, value) = line.rsplit_once(' ')?;
        (sample == name).then(|| value.parse().ok()).flatten()
    })
}

/// The buckets `(le, cumulative count)` of a histogram.
fn buckets(text: &str, histogram: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{histogram}_bucket{{le=\"");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (le, value) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, value.trim().parse().ok()?))
        })
        .collect()
}

/// The aggregator's publish-lag histogram between two scrapes: observations, and the upper
/// bounds of the buckets holding the median and the 99th percentile.
pub(super) fn publish_lag_histogram(before: &str, after: &str) -> Option<(u64, f64, f64)> {
    const NAME: &str = "aggregator_window_publish_lag_seconds";
    let before = buckets(before, NAME);
    let after = buckets(after, NAME);
    let diff: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, n)| {
            let was = before
                .iter()
                .find(|(b, _)| *b == le)
                .map_or(0.0, |(_, n)| *n);
            (le, n - was)
        })
        .collect();
    let total = diff.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let bound = |p: f64| {
        diff.iter()
            .find(|(_, n)| *n >= p * total)
            .map_or(f64::INFINITY, |(le, _)| *le)
    };
    Some((total as u64, bound(0.5), bound(0.99)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "\
# TYPE aggregator_window_publish_lag_seconds histogram
aggregator_window_publish_lag_seconds_bucket{le=\"0.5\"} 0
aggregator_window_publish_lag_seconds_bucket{le=\"1\"} 10
aggregator_window_publish_lag_seconds_bucket{le=\"2.5\"} 100
aggregator_window_publish_lag_seconds_bucket{le=\"+Inf\"} 120
aggregator_window_publish_lag_seconds_sum 300
aggregator_window_publish_lag_seconds_count 120
aggregator_windows_published_total{reason=\"due\"} 120
";

    #[test]
    fn metrics_are_read_from_the_prometheus_text() {
        assert_eq!(
            metric_value(
                METRICS,
                "aggregator_windows_published_total{reason=\"due\"}"
            ),
            Some(120.0)
        );
        assert_eq!(
            metric_value(METRICS, "aggregator_window_publish_lag_seconds_sum"),
            Some(300.0)
        );
        assert_eq!(
            buckets(METRICS, "aggregator_window_publish_lag_seconds").len(),
            4
        );
        let before = "aggregator_window_publish_lag_seconds_bucket{le=\"+Inf\"} 20\n\
                      aggregator_window_publish_lag_seconds_bucket{le=\"1\"} 0\n";
        // 100 new observations: 10 at <= 1 s, 90 more at <= 2.5 s, 0 above.
        assert_eq!(
            publish_lag_histogram(before, METRICS),
            Some((100, 2.5, 2.5))
        );
    }
}
