//! `docs/metrics.md` is the catalogue of every metric: this test runs the four services on the
//! real stack with the local Stripe, sends traffic through every path the catalogue counts
//! (events through ingest, a refused event and a refused token, a malformed message on
//! `usage.raw`, a signed customer webhook, a window synced to Stripe), then scrapes each
//! service and checks both directions: every metric of the doc is there with the documented
//! type and labels, and every metric the service exports is in the doc. Each scrape must also
//! pass `promtool check metrics`, lint included. A metric marked `exempt` in the doc is not
//! required (the doc says why); nothing else is skipped. A second test checks that the Grafana
//! dashboard and the alert rules name only metrics of the doc.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meterline_tests::api::{post_json, send, token};
use meterline_tests::stack::repo_root;
use meterline_tests::standin::Standin;
use meterline_tests::usage::{hour_start, produce_raw};
use meterline_tests::{Namespace, ServiceProcess};
use serde_json::{json, Value};

const TENANT: &str = "tenant_metrics";
const ENVIRONMENT: &str = "env_prod";
const SERVICES: [&str; 4] = ["ingest", "aggregator", "stripe-sink", "webhook-relay"];

/// One row of the catalogue.
#[derive(Debug, Clone)]
struct Documented {
    name: String,
    kind: String,
    labels: BTreeSet<String>,
    exempt: bool,
}

/// The catalogue, by service. Rows of the `every service` section are copied into each
/// service with `<service>` replaced by its metric prefix.
fn catalogue() -> BTreeMap<&'static str, Vec<Documented>> {
    let path = repo_root().join("docs/metrics.md");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut sections: BTreeMap<String, Vec<Documented>> = BTreeMap::new();
    let mut section: Option<String> = None;
    for line in text.lines() {
        if let Some(heading) = line.strip_prefix("## ") {
            section = Some(heading.trim().to_owned());
            continue;
        }
        let Some(section) = &section else { continue };
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        if cells.len() != 5 || !cells[0].starts_with('`') {
            continue;
        }
        let name = cells[0].trim_matches('`').to_owned();
        let labels = if cells[2] == "none" {
            BTreeSet::new()
        } else {
            cells[2]
                .split(',')
                .map(|l| l.trim().trim_matches('`').to_owned())
                .collect()
        };
        let appears = cells[3];
        assert!(
            ["start", "request", "traffic", "exempt"].contains(&appears),
            "docs/metrics.md: {name}: unknown appears value {appears:?}"
        );
        assert!(
            ["counter", "gauge", "histogram", "summary"].contains(&cells[1]),
            "docs/metrics.md: {name}: unknown type {:?}",
            cells[1]
        );
        sections
            .entry(section.clone())
            .or_default()
            .push(Documented {
                name,
                kind: cells[1].to_owned(),
                labels,
                exempt: appears == "exempt",
            });
    }
    let shared = sections
        .remove("every service")
        .expect("docs/metrics.md has an `every service` section");
    SERVICES
        .iter()
        .map(|service| {
            let prefix = service.replace('-', "_");
            let mut rows: Vec<Documented> = shared
                .iter()
                .map(|row| Documented {
                    name: row.name.replace("<service>", &prefix),
                    ..row.clone()
                })
                .collect();
            rows.extend(
                sections
                    .remove(*service)
                    .unwrap_or_else(|| panic!("docs/metrics.md has no `{service}` section")),
            );
            (*service, rows)
        })
        .collect()
}

/// One metric family of a scrape: its `# TYPE` and the label names of its samples.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    labels: BTreeSet<BTreeSet<String>>,
}

/// Parses Prometheus text into families. Histogram samples (`_bucket`, `_sum`, `_count`) and
/// summary samples (`_sum`, `_count`) count for their family, without `le` and `quantile`.
fn families(text: &str) -> BTreeMap<String, Family> {
    let mut out: BTreeMap<String, Family> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                panic!("malformed TYPE line: {line}");
            };
            out.entry(name.to_owned()).or_default().kind = kind.to_owned();
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let sample = &line[..name_end];
        let labels = if line[name_end..].starts_with('{') {
            label_names(&line[name_end + 1..])
        } else {
            BTreeSet::new()
        };
        let family = if out.contains_key(sample) {
            sample.to_owned()
        } else {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    let base = sample.strip_suffix(suffix)?;
                    let kind = out.get(base)?.kind.as_str();
                    (kind == "histogram" || (kind == "summary" && *suffix != "_bucket"))
                        .then(|| base.to_owned())
                })
                .unwrap_or_else(|| sample.to_owned())
        };
        let labels = labels
            .into_iter()
            .filter(|l| l != "le" && l != "quantile")
            .collect();
        out.entry(family).or_default().labels.insert(labels);
    }
    out
}

/// The label names of `a="x",b="y\"z"} 1`: names up to `=`, values skipped with escapes.
fn label_names(mut rest: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    loop {
        rest = rest.trim_start_matches(',');
        if rest.starts_with('}') || rest.is_empty() {
            return names;
        }
        let eq = rest.find('=').expect("a label has a value");
        names.insert(rest[..eq].trim().to_owned());
        let value = &rest[eq + 1..];
        assert!(value.starts_with('"'), "label value is quoted: {rest}");
        let mut escaped = false;
        let mut end = None;
        for (i, c) in value.char_indices().skip(1) {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        rest = &value[end.expect("a closed label value") + 1..];
    }
}

/// `promtool`, as `dev/check-deploy` installs it, or from PATH. Missing is a failure: the test
/// command installs it before the tests run.
fn promtool() -> PathBuf {
    let cached = repo_root().join(".cache/go-tools/bin/promtool");
    if cached.is_file() {
        return cached;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("promtool"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "promtool not found in {} nor on PATH: run dev/check-deploy (dev/test does) to \
                 install it",
                cached.display()
            )
        })
}

/// `promtool check metrics` on one scrape: it exits non-zero on a parse error and on any lint
/// problem (naming, help text, units).
fn promtool_check(service: &str, text: &str) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics", "--lint=all"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running promtool");
    child
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(text.as_bytes())
        .expect("writing the scrape to promtool");
    let output = child.wait_with_output().expect("promtool finishes");
    assert!(
        output.status.success(),
        "promtool check metrics failed on {service}'s /metrics ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

async fn scrape(service: &ServiceProcess) -> String {
    // A readiness check first: it sets `<service>_dependency_up`, as a kubelet's probes would.
    reqwest::get(service.url("/readyz"))
        .await
        .expect("GET /readyz");
    let response = reqwest::get(service.url("/metrics"))
        .await
        .expect("GET /metrics");
    assert_eq!(response.status().as_u16(), 200, "{} /metrics", service.name);
    response.text().await.expect("the metrics text")
}

/// What is wrong with one scrape against the catalogue, empty when nothing is.
fn problems(service: &str, documented: &[Documented], text: &str) -> Vec<String> {
    let scraped = families(text);
    let mut problems = Vec::new();
    for row in documented.iter().filter(|row| !row.exempt) {
        match scraped.get(&row.name) {
            None => problems.push(format!("{service}: {} is missing", row.name)),
            Some(family) => {
                if family.kind != row.kind {
                    problems.push(format!(
                        "{service}: {} is a {}, the doc says {}",
                        row.name, family.kind, row.kind
                    ));
                }
                for labels in &family.labels {
                    if labels != &row.labels {
                        problems.push(format!(
                            "{service}: {} has labels {labels:?}, the doc says {:?}",
                            row.name, row.labels
                        ));
                    }
                }
            }
        }
    }
    let names: BTreeSet<&str> = documented.iter().map(|row| row.name.as_str()).collect();
    for name in scraped.keys() {
        if !names.contains(name.as_str()) {
            problems.push(format!(
                "{service}: {name} is exported but not in docs/metrics.md"
            ));
        }
    }
    problems
}

async fn put_json(url: &str, token: &str, body: &Value) -> meterline_tests::api::Answer {
    send(
        reqwest::Client::new()
            .put(url)
            .bearer_auth(token)
            .json(body),
    )
    .await
}

/// The metric names a dashboard or rule file mentions: every token that starts like one of
/// ours, with a histogram's or summary's `_bucket`, `_sum` or `_count` taken off when the
/// rest is a documented metric.
fn mentioned(text: &str, documented: &BTreeSet<String>) -> BTreeSet<String> {
    const PREFIXES: [&str; 5] = [
        "ingest_",
        "aggregator_",
        "stripe_sink_",
        "webhook_relay_",
        "meterline_",
    ];
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|token| PREFIXES.iter().any(|p| token.starts_with(p)))
        .map(|token| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|suffix| token.strip_suffix(suffix))
                .find(|base| documented.contains(*base))
                .unwrap_or(token)
                .to_owned()
        })
        .collect()
}

#[test]
fn the_dashboard_and_the_alert_rules_use_only_documented_metrics() {
    let documented: BTreeSet<String> = catalogue()
        .into_values()
        .flatten()
        .map(|row| row.name)
        .collect();
    for file in [
        "helm/meterline/files/meterline-dashboard.json",
        "helm/meterline/files/meterline-rules.yaml",
    ] {
        let path = repo_root().join(file);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let used = mentioned(&text, &documented);
        assert!(used.len() >= 5, "{file} names hardly any metric: {used:?}");
        let unknown: Vec<&String> = used.difference(&documented).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics that docs/metrics.md does not list: {unknown:?}"
        );
    }
}

#[tokio::test]
async fn every_documented_metric_is_exported_and_every_exported_metric_is_documented() {
    let catalogue = catalogue();
    // Fail on a missing promtool before spending a minute on traffic.
    promtool();

    let ns = Namespace::create().await;
    let standin = Standin::start(40).await;
    standin.sum_meter("api_calls").await;

    let ingest = ServiceProcess::spawn("ingest", &ns.env()).await;
    let mut aggregator_env = ns.env();
    for (var, value) in [
        ("STRIPE_SYNC_GRACE_PERIOD_MINUTES", "0"),
        ("AGGREGATOR_BATCH_MAX_WAIT_MS", "200"),
        ("AGGREGATOR_PUBLISH_INTERVAL_MS", "200"),
    ] {
        aggregator_env.push((var.into(), value.into()));
    }
    let aggregator = ServiceProcess::spawn("aggregator", &aggregator_env).await;
    let mut sink_env = ns.env();
    sink_env.push(("STRIPE_API_BASE".into(), standin.base.clone()));
    let sink = ServiceProcess::spawn("stripe-sink", &sink_env).await;
    let relay = ServiceProcess::spawn("webhook-relay", &ns.env()).await;

    // Stripe: a webhook endpoint to the relay, the sink's config with its secret, a meter and
    // its mapping, and a customer whose mapping arrives through the signed webhook.
    let t = token(TENANT, ENVIRONMENT);
    let endpoint = standin
        .post(
            "/v1/webhook_endpoints",
            &[
                (
                    "url",
                    &relay.url(&format!("/webhooks/stripe/{TENANT}/{ENVIRONMENT}")),
                ),
                ("enabled_events[]", "customer.created"),
            ],
        )
        .await;
    let secret = endpoint["secret"].as_str().expect("a webhook secret");
    let config = put_json(
        &sink.url("/v1/stripe/config"),
        &t,
        &json!({"api_key": standin.key, "webhook_secrets": [secret], "rate_limit_per_second": 40}),
    )
    .await;
    assert_eq!(config.status, 200, "{:?}", config.body);
    let meter = post_json(
        &ingest.url("/v1/meters"),
        &t,
        &json!({"id": "calls", "event_name": "api.request", "aggregation": "COUNT"}),
    )
    .await;
    assert_eq!(meter.status, 201, "{:?}", meter.body);
    let mapping = post_json(
        &sink.url("/v1/stripe/meters/mapping"),
        &t,
        &json!({"meter_id": "calls", "provider_type": "stripe", "provider_meter_id": "api_calls",
                "sync_enabled": true}),
    )
    .await;
    assert_eq!(mapping.status, 201, "{:?}", mapping.body);
    let customer = standin.customer("cust_metrics").await;

    // Usage through ingest, in a window long due; one refused event and one refused token.
    let at = hour_start(2) + time::Duration::minutes(7);
    let timestamp = at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    for i in 0..5 {
        let answer = post_json(
            &ingest.url("/v1/events"),
            &t,
            &json!({"id": format!("metrics-{i}"), "customer_id": "cust_metrics",
                    "event_name": "api.request", "timestamp": timestamp}),
        )
        .await;
        assert_eq!(answer.status, 202, "{:?}", answer.body);
    }
    let refused = post_json(&ingest.url("/v1/events"), &t, &json!({"customer_id": 7})).await;
    assert_eq!(refused.status, 400, "{:?}", refused.body);
    let unauthorized = post_json(&ingest.url("/v1/events"), "not-a-token", &json!({})).await;
    assert_eq!(unauthorized.status, 401, "{:?}", unauthorized.body);
    // A producer writing usage.raw directly sends something that is not JSON: a dead letter.
    produce_raw(
        &ns,
        &[(
            format!("{TENANT}:{ENVIRONMENT}:cust_metrics"),
            b"not json".to_vec(),
        )],
    )
    .await;

    // The window reaches Stripe: every sync histogram has an observation.
    let deadline = Instant::now() + Duration::from_secs(90);
    let expected = BTreeMap::from([((customer, "api_calls".to_owned()), 5.0)]);
    while standin.totals().await != expected {
        assert!(
            Instant::now() < deadline,
            "the window did not reach stripe: {:?}\n{}",
            standin.totals().await,
            sink.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Gauges read on a period (the aggregator's lag every 10 s) may need one more round.
    let processes = [&ingest, &aggregator, &sink, &relay];
    let deadline = Instant::now() + Duration::from_secs(30);
    let scrapes = loop {
        let mut scrapes = Vec::new();
        let mut wrong = Vec::new();
        for (service, process) in SERVICES.iter().zip(processes) {
            let text = scrape(process).await;
            wrong.extend(problems(service, &catalogue[service], &text));
            scrapes.push((*service, text));
        }
        if wrong.is_empty() {
            break scrapes;
        }
        assert!(
            Instant::now() < deadline,
            "the scrapes do not match docs/metrics.md:\n{}",
            wrong.join("\n")
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    for (service, text) in &scrapes {
        promtool_check(service, text);
    }
    ns.drop_databases().await;
}
