//! The stripe-sink on the real stack with the local Stripe: every unit billed once through
//! injected 429s, 500s, timeouts and dropped connections and two SIGKILLs of the sink; still
//! once after Stripe's 24 h identifier window passed and everything was force-resynced, with
//! the API key decrypted (and audited) once per sink process, not per window;
//! paced under the configured rate with one request in flight per customer and meter; the
//! control API tenant-isolated; our request shapes accepted by Stripe's own stripe-mock.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meterline_schemas::RawUsageEvent;
use meterline_tests::api::{get, post_json, send, token};
use meterline_tests::standin::Standin;
use meterline_tests::usage::{create_meter, event, produce_events, spawn_aggregator};
use meterline_tests::{Namespace, ServiceProcess};
use serde_json::{json, Value};
use time::OffsetDateTime;

/// The start of the hour `hours_ago` before the first of these tests asked: fixed for the
/// whole run. The tests name past windows by how many hours ago they are, in several
/// places each; read afresh, a test running across an hour boundary named one window
/// before it and the next after it (seen in CI: a window read back empty after 16:00).
fn hour_start(hours_ago: i64) -> OffsetDateTime {
    static ANCHOR: std::sync::OnceLock<OffsetDateTime> = std::sync::OnceLock::new();
    *ANCHOR.get_or_init(|| meterline_tests::usage::hour_start(0)) - time::Duration::hours(hours_ago)
}

pub(crate) const TENANT: &str = "tenant_sink";
const RATE: u32 = 40;

/// The stand-in's clock, Unix seconds.
async fn standin_now(standin: &Standin) -> i64 {
    let clock: Value = reqwest::get(format!("{}/_standin/clock", standin.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    clock["now"].as_i64().expect("the clock")
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

async fn sink(ns: &Namespace, standin: &Standin) -> ServiceProcess {
    sink_retrying(ns, standin, 2).await
}

/// A sink talking to the stand-in with a 2 s time limit and `retries` retries per claim.
pub(crate) async fn sink_retrying(
    ns: &Namespace,
    standin: &Standin,
    retries: u32,
) -> ServiceProcess {
    let mut env = ns.env();
    env.push(("STRIPE_API_BASE".into(), standin.base.clone()));
    env.push(("STRIPE_API_TIMEOUT_SECONDS".into(), "2".into()));
    env.push(("STRIPE_MAX_RETRIES".into(), retries.to_string()));
    ServiceProcess::spawn("stripe-sink", &env).await
}

/// Configures the tenant in the sink: its Stripe key and rate, two meter mappings, and a
/// customer mapping for each of `customers` (external id -> cus_ id).
async fn configure(sink: &ServiceProcess, standin: &Standin, customers: &BTreeMap<String, String>) {
    let t = token(TENANT, "env_prod");
    let config = post_json_put(
        &sink.url("/v1/stripe/config"),
        &t,
        &json!({"api_key": standin.key, "sync_enabled": true, "aggregation_window_minutes": 60,
                "webhook_secrets": [], "rate_limit_per_second": RATE}),
    )
    .await;
    assert_eq!(config.status, 200, "{:?}", config.body);
    assert_eq!(
        config.body["api_key"], "sk_test_****ndin",
        "masked: {:?}",
        config.body
    );
    for (meter, event_name) in [("calls", "api_calls"), ("tokens", "tokens_used")] {
        let answer = post_json(
            &sink.url("/v1/stripe/meters/mapping"),
            &t,
            &json!({"meter_id": meter, "provider_type": "stripe", "provider_meter_id": event_name,
                    "sync_enabled": true}),
        )
        .await;
        assert_eq!(answer.status, 201, "{:?}", answer.body);
    }
    for (external, cus) in customers {
        let answer = post_json(
            &sink.url("/v1/stripe/customers/mapping"),
            &t,
            &json!({"customer_id": external, "provider_customer_id": cus}),
        )
        .await;
        assert_eq!(answer.status, 201, "{:?}", answer.body);
    }
}

async fn post_json_put(url: &str, token: &str, body: &Value) -> meterline_tests::api::Answer {
    send(
        reqwest::Client::new()
            .put(url)
            .bearer_auth(token)
            .json(body),
    )
    .await
}

/// Polls `GET /v1/stripe/sync/batches?status=...` until `done` holds for its windows, failing
/// after a minute with the last answer.
async fn wait_for_batches(
    sink: &ServiceProcess,
    token: &str,
    status: &str,
    mut done: impl FnMut(&[Value]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let batches = send(
            reqwest::Client::new()
                .get(sink.url(&format!("/v1/stripe/sync/batches?status={status}")))
                .bearer_auth(token),
        )
        .await;
        let windows = batches.body["data"].as_array().cloned().unwrap_or_default();
        if done(&windows) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {status} windows as expected: {:?}",
            batches.body
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Polls the stand-in until its totals equal `expected`, failing with the difference.
async fn wait_for_totals(
    standin: &Standin,
    sink: &ServiceProcess,
    expected: &BTreeMap<(String, String), f64>,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let got = standin.totals().await;
        if &got == expected {
            return;
        }
        if Instant::now() > deadline {
            let wrong: Vec<String> = expected
                .iter()
                .filter(|(k, v)| got.get(*k) != Some(*v))
                .take(10)
                .map(|(k, v)| format!("{k:?}: expected {v}, stripe has {:?}", got.get(k)))
                .collect();
            let extra: Vec<_> = got
                .keys()
                .filter(|k| !expected.contains_key(*k))
                .take(5)
                .collect();
            let metrics = reqwest::get(sink.url("/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let metrics: Vec<&str> = metrics
                .lines()
                .filter(|l| {
                    l.starts_with("stripe_sink_stripe") || l.starts_with("stripe_sink_windows")
                })
                .collect();
            eprintln!("sink metrics:\n{}", metrics.join("\n"));
            panic!(
                "stripe totals differ after {within:?}: {} of {} wrong, e.g. {wrong:#?}; unexpected: {extra:?}",
                expected.iter().filter(|(k, v)| got.get(*k) != Some(*v)).count(),
                expected.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The stand-in's count of requests per second (of its clock) from `from` on.
fn requests_per_second_from(inspect: &Value, from: i64) -> BTreeMap<i64, u64> {
    inspect["requests_per_second"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["second"].as_i64().unwrap_or(0) >= from)
        .map(|r| {
            (
                r["second"].as_i64().unwrap_or(0),
                r["count"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// Seconds over which [`busiest_span`] counts.
const SPAN: i64 = 3;

/// The most requests in any SPAN seconds in a row. The sink paces 5% under the limit;
/// arrivals on a loaded machine can still bunch across a second's boundary (a request sent
/// at the end of one second lands in the next), so the limit is checked over every span of
/// SPAN seconds: the pacing, not the scheduler.
fn busiest_span(per_second: &BTreeMap<i64, u64>) -> u64 {
    per_second
        .keys()
        .map(|&from| {
            (from..from + SPAN)
                .map(|second| per_second.get(&second).copied().unwrap_or(0))
                .sum::<u64>()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test]
async fn every_unit_reaches_stripe_once_through_faults_restarts_and_a_late_force_rerun() {
    let ns = Namespace::create().await;
    let standin = Standin::start(RATE).await;
    standin.sum_meter("api_calls").await;
    standin.sum_meter("tokens_used").await;
    let mut customers = BTreeMap::new();
    for i in 0..200 {
        let external = format!("cust_{i:03}");
        let cus = standin.customer(&external).await;
        customers.insert(external, cus);
    }
    calls_meter(&ns, TENANT).await;
    create_meter(&ns, TENANT, "env_prod", json!({"id": "tokens", "event_name": "api.request", "aggregation": "SUM", "property": "tokens"})).await;
    let _aggregator = spawn_aggregator(&ns, &[]).await;
    let first = sink(&ns, &standin).await;
    configure(&first, &standin, &customers).await;

    // Stripe misbehaves on the meter event route from the start.
    standin
        .control(
            "faults",
            json!({"rate_429": 0.1, "rate_500": 0.05, "rate_drop": 0.02, "rate_slow": 0.02,
                   "slow_ms": 3000, "path_prefix": "/v1/billing/meter_events", "seed": 7}),
        )
        .await;

    // 5,000 distinct events over 200 customers and three hours; every 20th sent twice.
    let base = hour_start(7);
    let mut events = Vec::new();
    let mut expected: BTreeMap<(String, String), f64> = BTreeMap::new();
    let mut windows_with_usage = std::collections::BTreeSet::new();
    for i in 0..5000usize {
        let external = format!("cust_{:03}", i % 200);
        let at = base + time::Duration::seconds(((i * 7919) % (3 * 3600)) as i64);
        let tokens = (i % 17) as i64 + 1;
        let e = event(
            TENANT,
            &format!("evt-{i}"),
            &external,
            "api.request",
            at,
            json!({"tokens": tokens}),
        );
        windows_with_usage.insert((external.clone(), at.unix_timestamp().div_euclid(3600)));
        let cus = customers[&external].clone();
        *expected
            .entry((cus.clone(), "api_calls".into()))
            .or_default() += 1.0;
        *expected.entry((cus, "tokens_used".into())).or_default() += tokens as f64;
        if i % 20 == 0 {
            events.push(e.clone());
        }
        events.push(e);
    }
    let (early, late) = events.split_at(events.len() * 4 / 5);
    produce_events(&ns, early).await;

    // Kill the sink twice while it sends; each restart resumes from the ledger.
    tokio::time::sleep(Duration::from_secs(4)).await;
    first.kill().await;
    let second = sink(&ns, &standin).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Late events for windows already sent: they go out as the difference.
    produce_events(&ns, late).await;
    second.kill().await;
    let third = sink(&ns, &standin).await;
    // Each sink process paces its own requests: the rate is checked from here on, where one
    // process sends (around a restart the dying and the new process may share a second).
    let single_process_from = standin_now(&standin).await + 1;

    wait_for_totals(&standin, &third, &expected, Duration::from_secs(240)).await;
    let inspect = standin.inspect().await;
    let per_second = requests_per_second_from(&inspect, single_process_from);
    assert!(!per_second.is_empty(), "the sink's requests were counted");
    let busiest = busiest_span(&per_second);
    assert!(
        busiest <= u64::from(RATE) * SPAN as u64,
        "stripe saw {busiest} requests in {SPAN} seconds (limit {RATE}/s)"
    );
    for c in inspect["concurrency"].as_array().into_iter().flatten() {
        assert!(
            c["max_concurrent"].as_u64().unwrap_or(0) <= 1,
            "two requests in flight: {c}"
        );
    }

    // Before the day passes, the sink has settled every window: no meter event of it is
    // still unanswered (one would be resent a "day later" only because this test moves
    // Stripe's clock and not ours; in real time the 23 h rule stops that).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = send(
            reqwest::Client::new()
                .get(third.url("/v1/stripe/sync/status"))
                .bearer_auth(token(TENANT, "env_prod")),
        )
        .await;
        let open = ["pending", "in_flight"]
            .iter()
            .map(|s| status.body["windows_by_status"][s].as_i64().unwrap_or(0))
            .sum::<i64>();
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "windows still open: {}",
            status.body
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A day later (Stripe has forgotten every identifier), a forced resync of everything.
    standin.control("faults", json!({})).await;
    standin
        .control("clock/advance", json!({"seconds": 25 * 3600}))
        .await;
    let answer = post_json(
        &third.url("/v1/stripe/sync/manual"),
        &token(TENANT, "env_prod"),
        &json!({"entity_type": "customer", "time_from": rfc3339(base - time::Duration::HOUR),
                "time_to": rfc3339(base + time::Duration::hours(4)), "force_rerun": true}),
    )
    .await;
    assert_eq!(answer.status, 202, "{:?}", answer.body);
    let job = answer.body["job_id"].as_str().unwrap().to_owned();
    // Every window with usage, for both meters.
    let windows = (windows_with_usage.len() * 2) as i64;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = send(
            reqwest::Client::new()
                .get(third.url(&format!("/v1/stripe/sync/jobs/{job}")))
                .bearer_auth(token(TENANT, "env_prod")),
        )
        .await;
        assert_eq!(status.status, 200, "{:?}", status.body);
        let resynced = status.body["windows_resynced"].as_i64().unwrap_or(0);
        let open = ["pending", "in_flight"]
            .iter()
            .map(|s| status.body["windows_by_status"][s].as_i64().unwrap_or(0))
            .sum::<i64>();
        if resynced >= windows && open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the resync did not finish: {}",
            status.body
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = standin.totals().await;
    let differing: Vec<String> = expected
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k:?}: expected {v}, stripe has {:?}", after.get(k)))
        .collect();
    assert!(
        differing.is_empty() && after.len() == expected.len(),
        "a forced resync a day later billed again: {differing:#?}"
    );

    // The sync decrypted the key, and audited it, once per sink process, not once per window
    // it sent: it reuses the key for 10 minutes (`SYNC_KEY_REUSE`), longer than this test.
    let pg = ns.pg_pool().await;
    let decryptions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action = 'api_key.decrypted' AND actor_kind = 'sync'",
    )
    .fetch_one(&pg)
    .await
    .unwrap();
    let settled: i64 =
        sqlx::query_scalar("SELECT count(*) FROM stripe_sync_batches WHERE sync_status = 'synced'")
            .fetch_one(&pg)
            .await
            .unwrap();

    assert!(
        (1..=3).contains(&decryptions) && settled >= windows,
        "{decryptions} audited decryptions by 3 sink processes for {settled} windows sent"
    );
    ns.drop_databases().await;
}

#[tokio::test]
async fn a_tenant_cannot_read_or_change_another_tenants_stripe_data() {
    let ns = Namespace::create().await;
    let standin = Standin::start(25).await;
    let sink = sink(&ns, &standin).await;
    let a = token("tenant_a", "env_prod");
    let b = token("tenant_b", "env_prod");
    let a_test = token("tenant_a", "env_test");
    let put = post_json_put(
        &sink.url("/v1/stripe/config"),
        &a,
        &json!({"api_key": standin.key, "webhook_secrets": ["whsec_aaaaaaaaaaaa1234"]}),
    )
    .await;
    assert_eq!(put.status, 200, "{:?}", put.body);
    let body = put.body.to_string();
    assert!(
        !body.contains("standin\"") && !body.contains("whsec_"),
        "no secret in answers: {body}"
    );
    assert_eq!(
        post_json(&sink.url("/v1/stripe/meters/mapping"), &a,
            &json!({"meter_id": "calls", "provider_type": "stripe", "provider_meter_id": "api_calls", "sync_enabled": true})).await.status,
        201
    );
    assert_eq!(
        post_json(
            &sink.url("/v1/stripe/customers/mapping"),
            &a,
            &json!({"customer_id": "cust_1", "provider_customer_id": "cus_A1234567"})
        )
        .await
        .status,
        201
    );
    let job = post_json(
        &sink.url("/v1/stripe/sync/manual"),
        &a,
        &json!({"time_from": "2026-11-01T00:00:00Z", "time_to": "2026-11-02T00:00:00Z"}),
    )
    .await;
    assert_eq!(job.status, 202, "{:?}", job.body);
    let job_id = job.body["job_id"].as_str().unwrap().to_owned();

    let client = reqwest::Client::new();
    for other in [&b, &a_test] {
        let get = |path: &str| client.get(sink.url(path)).bearer_auth(other);
        assert_eq!(send(get("/v1/stripe/config")).await.status, 404);
        assert_eq!(
            send(get("/v1/stripe/meters/mapping/calls")).await.status,
            404
        );
        assert_eq!(
            send(get("/v1/stripe/customers/mapping/cust_1"))
                .await
                .status,
            404
        );
        assert_eq!(
            send(get(&format!("/v1/stripe/sync/jobs/{job_id}")))
                .await
                .status,
            404
        );
        let list = send(get("/v1/stripe/meters/mapping")).await;
        assert_eq!(list.body["data"], json!([]), "{:?}", list.body);
        let list = send(get("/v1/stripe/customers/mapping")).await;
        assert_eq!(list.body["data"], json!([]), "{:?}", list.body);
        let batches = send(get("/v1/stripe/sync/batches")).await;
        assert_eq!(batches.body["data"], json!([]), "{:?}", batches.body);
        let delete = send(
            client
                .delete(sink.url("/v1/stripe/meters/mapping/calls"))
                .bearer_auth(other),
        )
        .await;
        assert_eq!(delete.status, 404);
        let delete = send(
            client
                .delete(sink.url("/v1/stripe/customers/mapping/cust_1"))
                .bearer_auth(other),
        )
        .await;
        assert_eq!(delete.status, 404);
        // The config test uses the caller's own config: none.
        let test = send(
            client
                .post(sink.url("/v1/stripe/config/test"))
                .bearer_auth(other),
        )
        .await;
        assert_eq!(test.status, 404);
    }
    // Tenant A still has everything.
    let get = |path: &str| client.get(sink.url(path)).bearer_auth(&a);
    assert_eq!(
        send(get("/v1/stripe/meters/mapping/calls")).await.status,
        200
    );
    assert_eq!(
        send(get("/v1/stripe/customers/mapping/cust_1"))
            .await
            .status,
        200
    );
    let test = send(
        client
            .post(sink.url("/v1/stripe/config/test"))
            .bearer_auth(&a),
    )
    .await;
    assert_eq!(test.body["status"], "connected", "{:?}", test.body);
    assert!(
        test.body["stripe_account"]
            .as_str()
            .is_some_and(|a| a.starts_with("acct_")),
        "the test names the key's account: {:?}",
        test.body
    );
    ns.drop_databases().await;
}

#[tokio::test]
async fn bad_config_input_is_refused_and_changes_nothing() {
    let ns = Namespace::create().await;
    let standin = Standin::start(25).await;
    let sink = sink(&ns, &standin).await;
    let t = token("tenant_c", "env_prod");
    let url = sink.url("/v1/stripe/config");
    let cases = [
        (json!({"api_key": "pk_test_publishable"}), "invalid_value"),
        (
            json!({"api_key": standin.key, "aggregation_window_minutes": 3}),
            "invalid_value",
        ),
        (
            json!({"api_key": standin.key, "aggregation_window_minutes": 61}),
            "invalid_value",
        ),
        (
            json!({"api_key": standin.key, "webhook_secrets": ["not-a-secret"]}),
            "invalid_value",
        ),
        (json!({"api_key": standin.key, "extra": 1}), "unknown_field"),
        (json!({"sync_enabled": true}), "missing_field"),
        (json!({"api_key": 7}), "invalid_type"),
    ];
    for (body, code) in cases {
        let answer = post_json_put(&url, &t, &body).await;
        assert_eq!(answer.status, 400, "{body}: {:?}", answer.body);
        assert_eq!(answer.error_code(), code, "{body}");
        assert!(
            !answer.body.to_string().contains("pk_test_publishable"),
            "no key echoed"
        );
    }
    let get = send(reqwest::Client::new().get(&url).bearer_auth(&t)).await;
    assert_eq!(get.status, 404, "nothing was stored");
    // A key Stripe does not know: the test says so clearly.
    let put = post_json_put(&url, &t, &json!({"api_key": "sk_test_unknownkey123"})).await;
    assert_eq!(put.status, 200);
    let test = send(
        reqwest::Client::new()
            .post(sink.url("/v1/stripe/config/test"))
            .bearer_auth(&t),
    )
    .await;
    assert_eq!(test.status, 422, "{:?}", test.body);
    assert_eq!(test.error_code(), "stripe_authentication_failed");
    assert!(
        !test.body.to_string().contains("unknownkey123"),
        "the key is masked: {:?}",
        test.body
    );
    ns.drop_databases().await;
}

/// The requests our Stripe client sends, against Stripe's official mock: accepted as Stripe
/// documents them (stripe-mock validates every parameter against Stripe's OpenAPI spec).
#[tokio::test]
async fn stripe_mock_accepts_the_requests_our_client_sends() {
    use meterline_accounts::stripe_config::StripeApiKey;
    use stripe_sink::stripe::{MeterEvent, Recorded, StripeClient};

    let binary = meterline_tests::stack::repo_root().join(".cache/stripe-mock/bin/stripe-mock");
    assert!(
        binary.exists(),
        "stripe-mock is missing: run dev/up (dev/stripe-mock.sh install)"
    );
    let port = meterline_tests::process::free_port();
    let mut mock = tokio::process::Command::new(&binary)
        .args(["-http-addr", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting stripe-mock");
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("{base}/v1/balance")).await.is_err() {
        assert!(Instant::now() < deadline, "stripe-mock did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client = StripeClient::new(&base, Duration::from_secs(10)).unwrap();
    let key = StripeApiKey::parse("sk_test_123456789").unwrap();
    client.check_key(&key).await.expect("GET /v1/balance");
    let recorded = client
        .create_meter_event(
            &key,
            &MeterEvent {
                event_name: "api_calls".into(),
                customer: "cus_123".into(),
                value: 42,
                identifier: "ml_0123456789abcdef".into(),
                idempotency_key: "ml_0123456789abcdef".into(),
                timestamp: OffsetDateTime::now_utc().unix_timestamp() - 60,
            },
        )
        .await
        .expect("POST /v1/billing/meter_events");
    assert_eq!(recorded, Recorded::Accepted);
    // A correction: a negative value.
    client
        .create_meter_event(
            &key,
            &MeterEvent {
                event_name: "api_calls".into(),
                customer: "cus_123".into(),
                value: -3,
                identifier: "ml_0123456789abcdee".into(),
                idempotency_key: "ml_0123456789abcdee".into(),
                timestamp: OffsetDateTime::now_utc().unix_timestamp() - 60,
            },
        )
        .await
        .expect("a negative correction");
    client
        .find_meter(&key, "api_calls")
        .await
        .expect("GET /v1/billing/meters");
    client
        .summarised_total(&key, "mtr_123", "cus_123", 1_700_000_000, 1_700_003_600)
        .await
        .expect("GET /v1/billing/meters/{id}/event_summaries");
    let _ = mock.kill().await;
}

/// Usage of a customer Stripe does not know yet waits as `pending_mapping`, and goes out as
/// soon as the customer is created in Stripe and its signed `customer.created` webhook has
/// made the mapping (stand-in -> webhook-relay -> stripe.webhooks -> sink).
/// A relay and a sink for the tenant's `env_prod`: the relay's endpoint registered in the
/// stand-in for `enabled_event`, the Stripe config (key and the endpoint's secret) saved.
/// The relay, the sink and the tenant's token.
async fn sink_behind_a_relay(
    ns: &Namespace,
    standin: &Standin,
    enabled_event: &str,
) -> (ServiceProcess, ServiceProcess, String) {
    let relay = ServiceProcess::spawn("webhook-relay", &ns.env()).await;
    let sink = sink(ns, standin).await;
    let endpoint = standin
        .post(
            "/v1/webhook_endpoints",
            &[
                (
                    "url",
                    &relay.url(&format!("/webhooks/stripe/{TENANT}/env_prod")),
                ),
                ("enabled_events[]", enabled_event),
            ],
        )
        .await;
    let secret = endpoint["secret"].as_str().unwrap().to_owned();
    let t = token(TENANT, "env_prod");
    let put = post_json_put(
        &sink.url("/v1/stripe/config"),
        &t,
        &json!({"api_key": standin.key, "webhook_secrets": [secret], "rate_limit_per_second": RATE}),
    )
    .await;
    assert_eq!(put.status, 200, "{:?}", put.body);
    (relay, sink, t)
}

#[tokio::test]
async fn pending_mapping_windows_go_out_once_the_customer_created_webhook_arrives() {
    let ns = Namespace::create().await;
    let standin = Standin::start(RATE).await;
    standin.sum_meter("api_calls").await;
    calls_meter(&ns, TENANT).await;
    let (_relay, sink, t) = sink_behind_a_relay(&ns, &standin, "customer.created").await;
    let _aggregator = spawn_aggregator(&ns, &[]).await;
    let mapped = post_json(
        &sink.url("/v1/stripe/meters/mapping"),
        &t,
        &json!({"meter_id": "calls", "provider_type": "stripe", "provider_meter_id": "api_calls", "sync_enabled": true}),
    )
    .await;
    assert_eq!(mapped.status, 201, "{:?}", mapped.body);

    let at = hour_start(3) + time::Duration::minutes(10);
    let events: Vec<_> = (0..7)
        .map(|i| {
            event(
                TENANT,
                &format!("late-cust-{i}"),
                "cust_not_in_stripe_yet",
                "api.request",
                at,
                json!({}),
            )
        })
        .collect();
    produce_events(&ns, &events).await;

    // The window waits for its mapping; nothing reaches Stripe.
    wait_for_batches(&sink, &t, "pending_mapping", |waiting| {
        waiting
            .iter()
            .any(|b| b["entity_id"] == "cust_not_in_stripe_yet" && b["aggregated_quantity"] == "7")
    })
    .await;
    let status = send(
        reqwest::Client::new()
            .get(sink.url("/v1/stripe/sync/status"))
            .bearer_auth(&t),
    )
    .await;
    assert_eq!(status.body["pending_mappings"], 1, "{:?}", status.body);
    assert!(
        standin.totals().await.is_empty(),
        "nothing was sent without a mapping"
    );

    // The customer is created in Stripe: the webhook maps it, and the window goes out.
    let cus = standin.customer("cust_not_in_stripe_yet").await;
    let expected = BTreeMap::from([((cus, "api_calls".to_owned()), 7.0)]);
    wait_for_totals(&standin, &sink, &expected, Duration::from_secs(60)).await;
    ns.drop_databases().await;
}

/// The meters of the skipped-windows test, one of each kind (`calls` is mapped from the start;
/// the others only later): meter id, definition, Stripe meter event name.
const KIND_METERS: [(&str, &str, &str); 6] = [
    ("calls", r#"{"aggregation": "COUNT"}"#, "api_calls"),
    (
        "tokens",
        r#"{"aggregation": "SUM", "property": "tokens"}"#,
        "tokens_used",
    ),
    (
        "gigabytes",
        r#"{"aggregation": "SUM", "property": "gb"}"#,
        "gigabytes",
    ),
    (
        "seats",
        r#"{"aggregation": "MAX", "property": "seats"}"#,
        "seats_peak",
    ),
    (
        "plan_level",
        r#"{"aggregation": "LATEST", "property": "level"}"#,
        "plan_level",
    ),
    (
        "users",
        r#"{"aggregation": "COUNT_UNIQUE", "property": "user"}"#,
        "active_users",
    ),
];

/// Windows marked `skipped` are not lost, for every meter kind: while the Stripe config has
/// sync off nothing is sent, and turning it on sends what is owed; meters without a Stripe
/// mapping are skipped until the mapping is created, and then go out; turning sync off and on
/// again afterwards sends nothing twice. What goes out is each window's total as the README
/// says it is billed today (rounded half away from zero, to a `sum` meter).
#[tokio::test]
async fn skipped_windows_go_out_once_sync_is_turned_on_and_their_meter_is_mapped() {
    let ns = Namespace::create().await;
    let standin = Standin::start(RATE).await;
    for (id, definition, stripe_event) in KIND_METERS {
        let mut meter: Value = serde_json::from_str(definition).unwrap();
        // A maximum, latest value or distinct count is billed by Stripe's `last` formula.
        let formula = match meter["aggregation"].as_str() {
            Some("COUNT" | "SUM") => "sum",
            _ => "last",
        };
        standin.meter(stripe_event, formula).await;
        meter["id"] = json!(id);
        meter["event_name"] = json!("api.request");
        create_meter(&ns, TENANT, "env_prod", meter).await;
    }
    let cus = standin.customer("cust_skipped").await;
    let sink = sink(&ns, &standin).await;
    let _aggregator = spawn_aggregator(&ns, &[]).await;
    let t = token(TENANT, "env_prod");
    let set_sync = |on: bool| {
        let (url, t, key) = (
            sink.url("/v1/stripe/config"),
            t.clone(),
            standin.key.clone(),
        );
        async move {
            let put = post_json_put(
                &url,
                &t,
                &json!({"api_key": key, "sync_enabled": on, "rate_limit_per_second": RATE}),
            )
            .await;
            assert_eq!(put.status, 200, "{:?}", put.body);
        }
    };
    let map_meter = |meter: &str, stripe_event: &str| {
        let (url, t) = (sink.url("/v1/stripe/meters/mapping"), t.clone());
        let body = json!({"meter_id": meter, "provider_type": "stripe",
                          "provider_meter_id": stripe_event, "sync_enabled": true});
        async move {
            let mapped = post_json(&url, &t, &body).await;
            assert_eq!(mapped.status, 201, "{:?}", mapped.body);
        }
    };
    set_sync(false).await;
    map_meter("calls", "api_calls").await;
    let customer = post_json(
        &sink.url("/v1/stripe/customers/mapping"),
        &t,
        &json!({"customer_id": "cust_skipped", "provider_customer_id": cus}),
    )
    .await;
    assert_eq!(customer.status, 201, "{:?}", customer.body);

    // Six events a second apart: 2 tokens and 0.25 GB each, seats 1..6, plan level 0, 10, ..,
    // 50 (the last one counts), three distinct users.
    let at = hour_start(3) + time::Duration::minutes(20);
    let events: Vec<_> = (0..6i64)
        .map(|i| {
            event(
                TENANT,
                &format!("skipped-{i}"),
                "cust_skipped",
                "api.request",
                at + time::Duration::seconds(i),
                json!({"tokens": 2, "gb": 0.25, "seats": i + 1, "level": 10 * i,
                       "user": format!("u{}", i % 3)}),
            )
        })
        .collect();
    produce_events(&ns, &events).await;

    // Every window is skipped (sync off; and no mapping for five meters), nothing is sent.
    wait_for_batches(&sink, &t, "skipped", |skipped| skipped.len() == 6).await;
    assert!(
        standin.totals().await.is_empty(),
        "nothing sent while sync is off"
    );

    // Sync on: the mapped meter's window goes out; the unmapped ones stay skipped.
    set_sync(true).await;
    let calls = BTreeMap::from([((cus.clone(), "api_calls".to_owned()), 6.0)]);
    wait_for_totals(&standin, &sink, &calls, Duration::from_secs(60)).await;

    // The other meters are mapped: their windows go out too, each at its kind's total
    // (1.5 GB is billed 2: whole numbers, rounded half away from zero).
    for (id, _, stripe_event) in &KIND_METERS[1..] {
        map_meter(id, stripe_event).await;
    }
    let all: BTreeMap<(String, String), f64> = [
        ("api_calls", 6.0),
        ("tokens_used", 12.0),
        ("gigabytes", 2.0),
        ("seats_peak", 6.0),
        ("plan_level", 50.0),
        ("active_users", 3.0),
    ]
    .into_iter()
    .map(|(event_name, total)| ((cus.clone(), event_name.to_owned()), total))
    .collect();
    wait_for_totals(&standin, &sink, &all, Duration::from_secs(60)).await;

    // Off and on again: every window is synced, so nothing more goes to Stripe.
    set_sync(false).await;
    set_sync(true).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(standin.totals().await, all, "nothing sent twice");
    wait_for_batches(&sink, &t, "synced", |synced| synced.len() == 6).await;
    ns.drop_databases().await;
}

/// Rounding drift: Stripe takes whole numbers, and rounding each window on its own billed a
/// SUM meter of 0.4 an hour nothing and one of 0.5 an hour twice its usage. Ten hours of each
/// bill 4 and 5; a late 0.7 added to an old window of each brings the exact totals to 4.7 and
/// 5.7, billed 5 and 6; and the reconciliation report compares against the exact totals and
/// says they match.
#[tokio::test]
async fn fractional_sum_meters_bill_the_rounded_exact_total_not_each_window_rounded() {
    let ns = Namespace::create().await;
    let standin = Standin::start(RATE).await;
    for (id, property, stripe_event) in [
        ("storage", "gb", "gigabytes"),
        ("compute", "cpu", "cpu_hours"),
    ] {
        standin.sum_meter(stripe_event).await;
        let meter = json!({"id": id, "event_name": "usage.sample", "aggregation": "SUM",
                           "property": property});
        create_meter(&ns, TENANT, "env_prod", meter).await;
    }
    let cus = standin.customer("cust_fraction").await;
    let sink = sink(&ns, &standin).await;
    let _aggregator = spawn_aggregator(&ns, &[]).await;
    let t = token(TENANT, "env_prod");
    connect(
        &sink,
        &standin,
        &[("storage", "gigabytes"), ("compute", "cpu_hours")],
        &[("cust_fraction", &cus)],
    )
    .await;

    let sample = |id: String, hours_ago: i64, gb: f64, cpu: f64| {
        event(
            TENANT,
            &id,
            "cust_fraction",
            "usage.sample",
            hour_start(hours_ago) + time::Duration::minutes(10),
            json!({"gb": gb, "cpu": cpu}),
        )
    };
    let hourly: Vec<_> = (1..=10)
        .map(|h| sample(format!("hour-{h}"), h, 0.4, 0.5))
        .collect();
    produce_events(&ns, &hourly).await;
    let billed = |gb: f64, cpu: f64| {
        BTreeMap::from([
            ((cus.clone(), "gigabytes".to_owned()), gb),
            ((cus.clone(), "cpu_hours".to_owned()), cpu),
        ])
    };
    wait_for_totals(&standin, &sink, &billed(4.0, 5.0), Duration::from_secs(90)).await;
    wait_for_batches(&sink, &t, "synced", |synced| synced.len() == 20).await;

    // A late correction to a window already settled: only the rounded running total moves.
    produce_events(&ns, &[sample("late-5".into(), 5, 0.7, 0.7)]).await;
    wait_for_totals(&standin, &sink, &billed(5.0, 6.0), Duration::from_secs(90)).await;
    wait_for_batches(&sink, &t, "synced", |synced| {
        synced.len() == 20
            && synced
                .iter()
                .all(|w| w["aggregated_quantity"] == w["accounted_quantity"])
    })
    .await;

    let lines = reconcile(&sink, &t, hour_start(11), hour_start(0)).await;
    let line = |meter: &str| {
        lines
            .iter()
            .find(|l| l["meter_id"] == meter)
            .unwrap_or_else(|| panic!("no line for {meter}: {lines:?}"))
            .clone()
    };
    for (meter, exact, synced) in [("storage", "4.7", "5"), ("compute", "5.7", "6")] {
        let l = line(meter);
        assert_eq!(l["expected"], exact, "the exact total: {l}");
        assert_eq!(l["ledger_accounted"], exact, "all of it accounted for: {l}");
        assert_eq!(l["ledger_synced"], synced, "{l}");
        assert_eq!(l["status"], "match", "{l}");
    }
    ns.drop_databases().await;
}

/// The lines of `GET /v1/stripe/reconcile` over `[from, to)`.
async fn reconcile(
    sink: &ServiceProcess,
    token: &str,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> Vec<Value> {
    let report = send(
        reqwest::Client::new()
            .get(sink.url("/v1/stripe/reconcile"))
            .query(&[("time_from", rfc3339(from)), ("time_to", rfc3339(to))])
            .bearer_auth(token),
    )
    .await;
    assert_eq!(report.status, 200, "{:?}", report.body);
    report.body["data"]
        .as_array()
        .expect("report lines")
        .clone()
}

/// Polls Stripe's meter event summaries of `meters` (`mtr_...`, expected value) for
/// `customer` over `[start, end)` until each equals its expected value.
async fn wait_for_summaries(
    standin: &Standin,
    customer: &str,
    (start, end): (i64, i64),
    expected: &[(&str, &str, f64)],
) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let mut got = Vec::new();
        for (name, mtr, _) in expected {
            got.push((
                *name,
                standin.summarised_total(mtr, customer, start, end).await,
            ));
        }
        if got.iter().zip(expected).all(|((_, g), (_, _, e))| g == e) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "stripe's values for the period: {got:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Three hours of a workspace: seats 10, 12, 7 (LATEST), connections peaking at 5, 9, 4 (MAX)
/// and users {u1, u2}, {u2, u3}, {u1} (COUNT_UNIQUE). Sent to `sum` meters they billed 29
/// seats, 18 connections and 5 users; on `last` meters Stripe's value for the period is the
/// period's: 7, 9 and 3. A late event in the first hour (20 connections, user u4) raises the
/// period's peak and distinct count, and Stripe's value follows; a mapping whose Stripe
/// formula cannot bill the meter's aggregation is refused with 422.
#[tokio::test]
async fn non_additive_meters_on_last_stripe_meters_bill_the_periods_value_not_a_sum_of_windows() {
    let ns = Namespace::create().await;
    let standin = Standin::start(RATE).await;
    let meters = [
        ("seats", "LATEST", "seats", "seats_last"),
        ("peak", "MAX", "connections", "peak_last"),
        ("users", "COUNT_UNIQUE", "user", "users_last"),
    ];
    let mut stripe_meters = BTreeMap::new();
    for (id, aggregation, property, stripe_event) in meters {
        stripe_meters.insert(id, standin.meter(stripe_event, "last").await);
        let meter = json!({"id": id, "event_name": "workspace.sample",
                           "aggregation": aggregation, "property": property});
        create_meter(&ns, TENANT, "env_prod", meter).await;
    }
    let calls = json!({"id": "calls", "event_name": "workspace.sample", "aggregation": "COUNT"});
    create_meter(&ns, TENANT, "env_prod", calls).await;
    standin.meter("calls_sum", "sum").await;
    let cus = standin.customer("cust_workspace").await;
    let sink = sink(&ns, &standin).await;
    let _aggregator = spawn_aggregator(&ns, &[]).await;
    let t = token(TENANT, "env_prod");
    put_config(&sink, &standin).await;
    let map = |meter: &str, stripe_event: &str| {
        let body = json!({"meter_id": meter, "provider_type": "stripe",
                          "provider_meter_id": stripe_event, "sync_enabled": true});
        let url = sink.url("/v1/stripe/meters/mapping");
        let t = t.clone();
        async move { post_json(&url, &t, &body).await }
    };
    // The wrong formula either way is refused, naming the one needed, and stores nothing.
    let refused = map("peak", "calls_sum").await;
    assert_eq!(refused.status, 422, "{:?}", refused.body);
    assert_eq!(refused.error_code(), "stripe_meter_formula_mismatch");
    let message = refused.body["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.contains("MAX") && message.contains("formula is last"),
        "{message}"
    );
    let refused = map("calls", "seats_last").await;
    assert_eq!(refused.status, 422, "{:?}", refused.body);
    let message = refused.body["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("formula is sum"), "{message}");
    let none = send(
        reqwest::Client::new()
            .get(sink.url("/v1/stripe/meters/mapping"))
            .bearer_auth(&t),
    )
    .await;
    assert_eq!(none.body["data"], json!([]), "refusals store nothing");
    for (id, _, _, stripe_event) in meters {
        let mapped = map(id, stripe_event).await;
        assert_eq!(mapped.status, 201, "{:?}", mapped.body);
    }
    let customer = post_json(
        &sink.url("/v1/stripe/customers/mapping"),
        &t,
        &json!({"customer_id": "cust_workspace", "provider_customer_id": cus}),
    )
    .await;
    assert_eq!(customer.status, 201, "{:?}", customer.body);

    // Three hours in one calendar month (a day earlier when this month began within them).
    let month = |at: OffsetDateTime| (at.year(), at.month());
    let first = if month(hour_start(4)) == month(hour_start(2)) {
        2
    } else {
        26
    };
    let hours = [first + 2, first + 1, first];
    let sample = |id: &str, hours_ago: i64, minute: i64, props: Value| {
        event(
            TENANT,
            id,
            "cust_workspace",
            "workspace.sample",
            hour_start(hours_ago) + time::Duration::minutes(minute),
            props,
        )
    };
    let mut events = Vec::new();
    for (h, (seats, connections, users)) in hours.iter().zip([
        (10, 5, vec!["u1", "u2"]),
        (12, 9, vec!["u2", "u3"]),
        (7, 4, vec!["u1"]),
    ]) {
        events.push(sample(
            &format!("seats-{h}"),
            *h,
            5,
            json!({"seats": seats}),
        ));
        events.push(sample(
            &format!("conn-{h}"),
            *h,
            6,
            json!({"connections": connections}),
        ));
        for (i, user) in users.iter().enumerate() {
            let id = format!("user-{h}-{i}");
            events.push(sample(&id, *h, 7 + i as i64, json!({"user": user})));
        }
    }
    produce_events(&ns, &events).await;
    let range = (
        hour_start(hours[0]).unix_timestamp(),
        hour_start(first - 1).unix_timestamp(),
    );
    let expect = |seats: f64, peak: f64, users: f64| {
        [
            ("seats", stripe_meters["seats"].as_str(), seats),
            ("peak", stripe_meters["peak"].as_str(), peak),
            ("users", stripe_meters["users"].as_str(), users),
        ]
    };
    wait_for_summaries(&standin, &cus, range, &expect(7.0, 9.0, 3.0)).await;

    // Late usage in the first hour: every later hour of the period carries it.
    let late = [
        sample("late-conn", hours[0], 30, json!({"connections": 20})),
        sample("late-user", hours[0], 31, json!({"user": "u4"})),
    ];
    produce_events(&ns, &late).await;
    wait_for_summaries(&standin, &cus, range, &expect(7.0, 20.0, 4.0)).await;
    wait_for_batches(&sink, &t, "synced", |synced| {
        synced.len() == 9
            && synced
                .iter()
                .all(|w| w["aggregated_quantity"] == w["accounted_quantity"])
    })
    .await;

    let lines = reconcile(&sink, &t, hour_start(hours[0]), hour_start(first - 1)).await;
    for (meter, value) in [("seats", "7"), ("peak", "20"), ("users", "4")] {
        let l = lines
            .iter()
            .find(|l| l["meter_id"] == meter)
            .unwrap_or_else(|| panic!("no line for {meter}: {lines:?}"));
        assert_eq!(l["expected"], value, "the period's value: {l}");
        assert_eq!(l["ledger_synced"], value, "{l}");
        assert_eq!(l["stripe"], value.parse::<f64>().unwrap(), "{l}");
        assert_eq!(l["status"], "match", "{l}");
    }
    ns.drop_databases().await;
}

/// Case 8 of the billing issue, on the real PostgreSQL: a dispatcher whose lease ran out
/// (a long `Retry-After`, a rate-limit wait) while another took the window over writes
/// nothing more. Before claims were numbered, the late worker's send of the change it had
/// read (10) went in as a second meter event beside the new owner's, and Stripe billed 20.
#[tokio::test]
async fn a_dispatcher_whose_lease_ran_out_writes_nothing_over_the_next_claim() {
    use meterline_schemas::{
        CustomerId, Decimal, EnvironmentId, MeterId, TenantId, Timestamp, Window, WindowReason,
        WindowTotal,
    };
    use stripe_sink::ledger::{Counts, Finish, Ledger, Send};
    use stripe_sink::Error;

    let ns = Namespace::create().await;
    let pool = ns.pg_pool().await;
    let ledger = Ledger::new(pool.clone());
    let start = hour_start(2);
    let window = Window::new(start, start + time::Duration::hours(1)).unwrap();
    ledger
        .record_window(&WindowTotal {
            tenant_id: TenantId::parse(TENANT).unwrap(),
            environment_id: EnvironmentId::parse("env_prod").unwrap(),
            customer_id: CustomerId::parse("cust_late").unwrap(),
            meter_id: MeterId::parse("calls").unwrap(),
            window,
            quantity: Decimal::from(10),
            event_count: 10,
            revision: std::num::NonZeroU32::MIN,
            reason: WindowReason::Due,
            expired: false,
            computed_at: Timestamp::now(),
            last_event_at: None,
            period_end: None,
        })
        .await
        .unwrap();
    let send = |seq: i32| Send {
        seq,
        identifier: format!("ml_late_{seq}"),
        key_generation: 0,
        value: Decimal::from(10),
        accounted: Decimal::from(10),
        event_name: "api_calls".into(),
        provider_customer_id: "cus_late".into(),
        stripe_timestamp: (start + time::Duration::minutes(59)).unix_timestamp(),
        created_at: OffsetDateTime::now_utc(),
        in_doubt_since: None,
        counts: Counts::Change,
    };

    let late = ledger.claim(1, Duration::from_millis(1)).await.unwrap();
    let late = late.first().expect("the window is claimed").clone();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let owner = ledger.claim(1, Duration::from_secs(60)).await.unwrap();
    let owner = owner
        .first()
        .expect("an expired lease is taken over")
        .clone();
    assert_eq!(owner.id, late.id, "the same window");

    // The new owner sends the window's 10 and settles it.
    ledger.begin_send(owner.claim, &send(1)).await.unwrap();
    ledger.accepted(owner.claim, &send(1)).await.unwrap();

    // The late worker wakes up with what it read before: none of it lands.
    let lost = |r: Result<(), Error>, what: &str| {
        assert!(
            matches!(r, Err(Error::ClaimLost { batch_id }) if batch_id == late.id),
            "{what} by the late worker: {r:?}"
        )
    };
    let mut stale = send(2);
    lost(ledger.begin_send(late.claim, &stale).await, "a second send");
    lost(ledger.accepted(late.claim, &send(1)).await, "an acceptance");
    lost(
        ledger.carried(late.claim, Decimal::new(4, 1)).await,
        "a carry",
    );
    lost(ledger.in_doubt(late.claim, &mut stale).await, "a doubt");
    lost(
        ledger.refused(late.claim, &send(1), "late").await,
        "a refusal",
    );
    lost(
        ledger
            .finish(late.claim, &Finish::Failed("late".into()))
            .await,
        "a finish",
    );
    ledger.finish(owner.claim, &Finish::Settled).await.unwrap();

    let (status, synced, accounted): (String, Decimal, Decimal) = sqlx::query_as(
        "SELECT sync_status, synced_quantity, accounted_quantity FROM stripe_sync_batches
         WHERE id = $1",
    )
    .bind(owner.id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), synced, accounted),
        ("synced", Decimal::from(10), Decimal::from(10))
    );
    let sends: Vec<(i32, String)> =
        sqlx::query_as("SELECT seq, status FROM stripe_sync_sends WHERE batch_id = $1")
            .bind(owner.id)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(sends, vec![(1, "accepted".to_owned())], "one meter event");
    let carry: Option<Decimal> = sqlx::query_scalar("SELECT carry FROM stripe_sync_carry")
        .fetch_optional(&pool)
        .await
        .unwrap();
    assert!(
        carry.is_none_or(|c| c.is_zero()),
        "no carry moved: {carry:?}"
    );
    ns.drop_databases().await;
}

/// Case 9 of the billing issue: a meter event whose attempt went unanswered may be recorded
/// at Stripe, so a refusal that follows must not free its units for a send under a new
/// identifier. (1) Stripe records the event but every answer is lost; the account's key is
/// then rolled and the resend gets 401: the window fails with the send kept, and after the
/// new key is configured and the window retried the same event goes out again, so Stripe
/// holds 5, not 10 (before, the 401 freed the units and seq 2 billed them again). (2) A send
/// answered only with 500s, then refused with a 400 (its timestamp grew too old), waits for
/// reconciliation with its one send kept, instead of failing with its units free.
/// Every meter event request from now on meets the fault `rate` (`rate_drop`, `rate_500`).
async fn fail_every_meter_event(standin: &Standin, rate: &str) {
    let mut faults = json!({"path_prefix": "/v1/billing/meter_events"});
    faults[rate] = json!(1.0);
    standin.control("faults", faults).await;
}

/// Waits until the stand-in applied a fault of `kind` (`dropped`, `server_error`).
async fn until_a_fault_was_applied(standin: &Standin, kind: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while standin.faults_injected().await[kind].as_u64().unwrap_or(0) < 1 {
        assert!(Instant::now() < deadline, "no meter event reached stripe");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `n` calls of `customer` a few minutes into the hour `hours_ago`.
fn calls(customer: &str, prefix: &str, hours_ago: i64, n: usize) -> Vec<RawUsageEvent> {
    (0..n)
        .map(|i| {
            event(
                TENANT,
                &format!("{prefix}-{i}"),
                customer,
                "api.request",
                hour_start(hours_ago) + time::Duration::minutes(5 + i as i64),
                json!({}),
            )
        })
        .collect()
}

/// (seq, status) of the sends of the window starting `hours_ago`.
async fn sends_of(pg: &sqlx::PgPool, hours_ago: i64) -> Vec<(i32, String)> {
    sqlx::query_as(
        "SELECT s.seq, s.status FROM stripe_sync_sends s
         JOIN stripe_sync_batches b ON b.id = s.batch_id
         WHERE b.window_start = $1 ORDER BY s.seq",
    )
    .bind(hour_start(hours_ago))
    .fetch_all(pg)
    .await
    .unwrap()
}

/// The COUNT meter `calls` of `api.request` events, in the tenant's `env_prod`.
pub(crate) async fn calls_meter(ns: &Namespace, tenant: &str) {
    create_meter(
        ns,
        tenant,
        "env_prod",
        json!({"id": "calls", "event_name": "api.request", "aggregation": "COUNT"}),
    )
    .await;
}

/// Connects the tenant's `env_prod` to the stand-in through the sink's API: the config (sync
/// on, [`RATE`]), then a mapping per (meter, Stripe event name) and per (customer, `cus_`).
pub(crate) async fn connect(
    sink: &ServiceProcess,
    standin: &Standin,
    meters: &[(&str, &str)],
    customers: &[(&str, &str)],
) {
    put_config(sink, standin).await;
    for (meter, stripe_event) in meters {
        map_meter(sink, meter, stripe_event).await;
    }
    for (customer, cus) in customers {
        map_customer(sink, customer, cus).await;
    }
}

/// Saves the tenant's Stripe config: the stand-in's key, sync on, [`RATE`] a second (200).
async fn put_config(sink: &ServiceProcess, standin: &Standin) {
    let config = post_json_put(
        &sink.url("/v1/stripe/config"),
        &token(TENANT, "env_prod"),
        &json!({"api_key": standin.key, "sync_enabled": true, "rate_limit_per_second": RATE}),
    )
    .await;
    assert_eq!(config.status, 200, "{:?}", config.body);
}

/// Maps the tenant's `meter` to the Stripe meter of `stripe_event` (201).
async fn map_meter(sink: &ServiceProcess, meter: &str, stripe_event: &str) {
    let answer = post_json(
        &sink.url("/v1/stripe/meters/mapping"),
        &token(TENANT, "env_prod"),
        &json!({"meter_id": meter, "provider_type": "stripe",
                "provider_meter_id": stripe_event, "sync_enabled": true}),
    )
    .await;
    assert_eq!(answer.status, 201, "mapping {meter}: {:?}", answer.body);
}

/// Maps the tenant's `customer` to the Stripe customer `cus` (201).
async fn map_customer(sink: &ServiceProcess, customer: &str, cus: &str) {
    let answer = post_json(
        &sink.url("/v1/stripe/customers/mapping"),
        &token(TENANT, "env_prod"),
        &json!({"customer_id": customer, "provider_customer_id": cus}),
    )
    .await;
    assert_eq!(answer.status, 201, "mapping {customer}: {:?}", answer.body);
}

/// A sink sending the COUNT meter `calls` (event `api.request`) of one customer to the
/// stand-in's `sum` meter `api_calls`; the customer's Stripe id with the sink.
async fn one_customer_on_a_sum_meter(
    ns: &Namespace,
    standin: &Standin,
    customer: &str,
) -> (ServiceProcess, String) {
    standin.sum_meter("api_calls").await;
    let cus = standin.customer(customer).await;
    calls_meter(ns, TENANT).await;
    let sink = sink(ns, standin).await;
    connect(
        &sink,
        standin,
        &[("calls", "api_calls")],
        &[(customer, &cus)],
    )
    .await;
    (sink, cus)
}

#[tokio::test]
async fn a_refusal_after_an_unanswered_attempt_does_not_send_the_units_again() {
    let ns = Namespace::create().await;
    let standin = Standin::start(RATE).await;
    let (sink, cus) = one_customer_on_a_sum_meter(&ns, &standin, "cust_doubt").await;
    let _aggregator = spawn_aggregator(&ns, &[]).await;
    let t = token(TENANT, "env_prod");
    let put_config = |key: String| {
        let url = sink.url("/v1/stripe/config");
        let t = t.clone();
        async move {
            let config = post_json_put(
                &url,
                &t,
                &json!({"api_key": key, "sync_enabled": true, "rate_limit_per_second": RATE}),
            )
            .await;
            assert_eq!(config.status, 200, "{:?}", config.body);
        }
    };
    let pg = ns.pg_pool().await;

    // (1) Every answer to a meter event is lost; Stripe records the first.
    fail_every_meter_event(&standin, "rate_drop").await;
    produce_events(&ns, &calls("cust_doubt", "dropped", 3, 5)).await;
    until_a_fault_was_applied(&standin, "dropped").await;
    let recorded = BTreeMap::from([((cus.clone(), "api_calls".to_owned()), 5.0)]);
    assert_eq!(
        standin.totals().await,
        recorded,
        "stripe recorded the event"
    );
    let rolled = standin
        .control(&format!("accounts/{}/roll_key", standin.key), json!({}))
        .await;
    let new_key = rolled["secret_key"].as_str().expect("a new key").to_owned();
    standin.control("faults", json!({})).await;
    wait_for_batches(&sink, &t, "failed", |failed| {
        failed.len() == 1
            && failed[0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("api key") && e.contains("kept"))
    })
    .await;
    assert_eq!(
        sends_of(&pg, 3).await,
        vec![(1, "sending".to_owned())],
        "the send is kept"
    );

    put_config(new_key).await;
    let retried = post_json(&sink.url("/v1/stripe/batches/retry"), &t, &json!({})).await;
    assert_eq!(retried.status, 200, "{:?}", retried.body);
    wait_for_batches(&sink, &t, "synced", |synced| synced.len() == 1).await;
    // Settled for good: nothing more goes out.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(standin.totals().await, recorded, "billed once, not twice");
    assert_eq!(sends_of(&pg, 3).await, vec![(1, "accepted".to_owned())]);

    // (2) Only 500s (whose outcome Stripe calls indeterminate), then a 400.
    fail_every_meter_event(&standin, "rate_500").await;
    produce_events(&ns, &calls("cust_doubt", "failing", 2, 3)).await;
    until_a_fault_was_applied(&standin, "server_error").await;
    // Stripe's 35 days pass on its clock: the next attempt is refused with a 400.
    standin
        .control("clock/advance", json!({"seconds": 36 * 86_400}))
        .await;
    standin.control("faults", json!({})).await;
    wait_for_batches(&sink, &t, "needs_reconciliation", |open| {
        open.len() == 1
            && open[0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("may hold it"))
    })
    .await;
    assert_eq!(
        sends_of(&pg, 2).await,
        vec![(1, "sending".to_owned())],
        "one send, kept for the reconciliation"
    );
    assert_eq!(standin.totals().await, recorded);
    ns.drop_databases().await;
}

#[tokio::test]
async fn two_keys_of_one_stripe_account_share_its_rate_limit() {
    // Stripe's limits are the account's: a secret key and a restricted key of one account,
    // configured by two tenants, together stay under the limit each of them configures.
    const LIMIT: u32 = 4;
    let ns = Namespace::create().await;
    let standin = Standin::start(LIMIT).await;
    standin.sum_meter("api_calls").await;
    standin.sum_meter("tokens_used").await;
    let restricted = standin
        .control(
            &format!("accounts/{}/restricted_keys", standin.key),
            json!({}),
        )
        .await;
    let restricted = restricted["restricted_key"]
        .as_str()
        .expect("a restricted key")
        .to_owned();
    let mut customers = BTreeMap::new();
    for i in 0..15 {
        let external = format!("cust_{i:02}");
        customers.insert(external.clone(), standin.customer(&external).await);
    }
    let sink = sink(&ns, &standin).await;
    let tenants = [
        ("tenant_a", standin.key.clone(), "api_calls"),
        ("tenant_b", restricted, "tokens_used"),
    ];
    let mut accounts = Vec::new();
    for (tenant, key, stripe_meter) in &tenants {
        calls_meter(&ns, tenant).await;
        let t = token(tenant, "env_prod");
        let config = post_json_put(
            &sink.url("/v1/stripe/config"),
            &t,
            &json!({"api_key": key, "sync_enabled": true, "rate_limit_per_second": LIMIT}),
        )
        .await;
        assert_eq!(config.status, 200, "{:?}", config.body);
        let answer = post_json(
            &sink.url("/v1/stripe/meters/mapping"),
            &t,
            &json!({"meter_id": "calls", "provider_meter_id": stripe_meter, "sync_enabled": true}),
        )
        .await;
        assert_eq!(answer.status, 201, "{:?}", answer.body);
        for (external, cus) in &customers {
            let answer = post_json(
                &sink.url("/v1/stripe/customers/mapping"),
                &t,
                &json!({"customer_id": external, "provider_customer_id": cus}),
            )
            .await;
            assert_eq!(answer.status, 201, "{:?}", answer.body);
        }
        let test = send(
            reqwest::Client::new()
                .post(sink.url("/v1/stripe/config/test"))
                .bearer_auth(&t),
        )
        .await;
        assert_eq!(test.status, 200, "{:?}", test.body);
        accounts.push(test.body["stripe_account"].clone());
    }
    // Both keys name one account.
    assert!(accounts[0].is_string(), "{accounts:?}");
    assert_eq!(accounts[0], accounts[1], "one stripe account");

    let _aggregator = spawn_aggregator(&ns, &[]).await;
    // Two windows per customer and tenant: 60 meter events, 15 s at the shared limit.
    let mut events = Vec::new();
    let mut expected = BTreeMap::new();
    for (tenant, _, stripe_meter) in &tenants {
        for (n, (external, cus)) in customers.iter().enumerate() {
            for hours_ago in [3, 2] {
                events.push(event(
                    tenant,
                    &format!("{tenant}-{external}-{hours_ago}"),
                    external,
                    "api.request",
                    hour_start(hours_ago) + time::Duration::minutes(n as i64),
                    json!({}),
                ));
                *expected
                    .entry((cus.clone(), stripe_meter.to_string()))
                    .or_insert(0.0) += 1.0;
            }
        }
    }
    produce_events(&ns, &events).await;
    // From the moment both keys are sending, count what the account sees.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let totals = standin.totals().await;
        let meters: std::collections::BTreeSet<&str> =
            totals.keys().map(|(_, meter)| meter.as_str()).collect();
        if meters.len() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "both keys send: {totals:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let both_sending_from = standin_now(&standin).await + 1;
    wait_for_totals(&standin, &sink, &expected, Duration::from_secs(180)).await;
    let per_second = requests_per_second_from(&standin.inspect().await, both_sending_from);
    assert!(
        per_second.values().sum::<u64>() >= 20,
        "enough requests after both keys started to judge the pacing: {per_second:?}"
    );
    let busiest = busiest_span(&per_second);
    assert!(
        busiest <= u64::from(LIMIT) * SPAN as u64,
        "the account saw {busiest} requests in {SPAN} seconds (limit {LIMIT}/s): {per_second:?}"
    );
    ns.drop_databases().await;
}

/// Waits until the window starting `hours_ago` has a send in doubt, then lets a day pass
/// with the sink down: the doubt and the window's lease move a day back (the sink's clock
/// cannot be moved; 23 h of real time is not a test), Stripe's clock 25 h on, so it has
/// forgotten the identifier as it would have by then, and Stripe's faults end. The sink
/// that comes back up.
async fn a_day_of_doubt(
    ns: &Namespace,
    standin: &Standin,
    running: ServiceProcess,
    hours_ago: i64,
) -> ServiceProcess {
    let pg = ns.pg_pool().await;
    let in_doubt = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM stripe_sync_sends s JOIN stripe_sync_batches b
               ON b.id = s.batch_id
             WHERE b.window_start = $1 AND s.status = 'sending'
               AND s.in_doubt_since IS NOT NULL",
        )
        .bind(hour_start(hours_ago))
        .fetch_one(&pg)
        .await
        .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while in_doubt().await != 1 {
        assert!(Instant::now() < deadline, "no send in doubt");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    running.kill().await;
    sqlx::query(
        "UPDATE stripe_sync_sends s SET in_doubt_since = in_doubt_since - interval '24 hours'
         FROM stripe_sync_batches b WHERE b.id = s.batch_id AND b.window_start = $1",
    )
    .bind(hour_start(hours_ago))
    .execute(&pg)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE stripe_sync_batches SET lease_until = now() - interval '24 hours',
             next_attempt_at = now()
         WHERE window_start = $1",
    )
    .bind(hour_start(hours_ago))
    .execute(&pg)
    .await
    .unwrap();
    standin
        .control("clock/advance", json!({"seconds": 25 * 3600}))
        .await;
    standin.control("faults", json!({})).await;
    sink(ns, standin).await
}

async fn resolutions(sink: &ServiceProcess, t: &str) -> Vec<Value> {
    let audit = send(
        reqwest::Client::new()
            .get(sink.url("/v1/stripe/audit?action=meter_event.resolved"))
            .bearer_auth(t),
    )
    .await;
    assert_eq!(audit.status, 200, "{:?}", audit.body);
    audit.body["data"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn a_meter_event_in_doubt_for_a_day_is_settled_from_stripe_or_by_an_audited_decision() {
    let ns = Namespace::create().await;
    let standin = Standin::start(RATE).await;
    let (sink, cus) = one_customer_on_a_sum_meter(&ns, &standin, "cust_day").await;
    let _aggregator = spawn_aggregator(&ns, &[]).await;
    let t = token(TENANT, "env_prod");
    let pg = ns.pg_pool().await;

    // (1) Stripe records the event and every answer is lost, for a day.
    fail_every_meter_event(&standin, "rate_drop").await;
    produce_events(&ns, &calls("cust_day", "recorded", 3, 5)).await;
    let sink = a_day_of_doubt(&ns, &standin, sink, 3).await;
    // Its summaries hold it: the event counts as accepted, nothing is sent again.
    wait_for_batches(&sink, &t, "synced", |synced| synced.len() == 1).await;
    let five = BTreeMap::from([((cus.clone(), "api_calls".to_owned()), 5.0)]);
    assert_eq!(standin.totals().await, five, "billed once");
    assert_eq!(sends_of(&pg, 3).await, vec![(1, "accepted".to_owned())]);
    let settled = resolutions(&sink, &t).await;
    assert_eq!(settled.len(), 1, "{settled:?}");
    assert_eq!(settled[0]["actor"]["kind"], "sync");
    assert_eq!(settled[0]["details"]["recorded"], true);

    // (2) Another writer of the meter in the hour, then only 500s for a day: the summaries
    // match neither answer, so a person decides.
    let foreign = (hour_start(2) + time::Duration::minutes(30)).unix_timestamp();
    standin
        .post(
            "/v1/billing/meter_events",
            &[
                ("event_name", "api_calls"),
                ("payload[stripe_customer_id]", &cus),
                ("payload[value]", "2"),
                ("timestamp", &foreign.to_string()),
            ],
        )
        .await;
    fail_every_meter_event(&standin, "rate_500").await;
    produce_events(&ns, &calls("cust_day", "lost", 2, 3)).await;
    let sink = a_day_of_doubt(&ns, &standin, sink, 2).await;
    let mut open = Vec::new();
    wait_for_batches(&sink, &t, "needs_reconciliation", |windows| {
        open = windows.to_vec();
        windows.len() == 1
            && windows[0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("resolve the window"))
    })
    .await;
    let open = open[0]["id"].as_i64().expect("a window id");
    let synced = only_synced_window(&sink, &t).await;
    let resolve = |id: i64, body: Value, who: String| {
        let url = sink.url(&format!("/v1/stripe/sync/batches/{id}/resolve"));
        async move { post_json(&url, &who, &body).await }
    };
    let decision = json!({"recorded": false,
                          "reason": "no event with this identifier in the stripe dashboard"});
    // Bad decisions are refused and change nothing.
    for (id, body, who, status, code) in [
        (
            open,
            json!({"recorded": false}),
            t.clone(),
            400,
            "missing_field",
        ),
        (
            open,
            json!({"recorded": false, "reason": "  "}),
            t.clone(),
            400,
            "invalid_value",
        ),
        (
            open,
            json!({"recorded": "no", "reason": "x"}),
            t.clone(),
            400,
            "invalid_type",
        ),
        (
            synced,
            decision.clone(),
            t.clone(),
            409,
            "not_in_reconciliation",
        ),
        (999_999, decision.clone(), t.clone(), 404, "not_found"),
        (
            open,
            decision.clone(),
            token("tenant_other", "env_prod"),
            404,
            "not_found",
        ),
    ] {
        let answer = resolve(id, body.clone(), who).await;
        assert_eq!(answer.status, status, "{body}: {:?}", answer.body);
        assert_eq!(answer.error_code(), code, "{body}");
    }
    assert_eq!(sends_of(&pg, 2).await, vec![(1, "sending".to_owned())]);
    assert_eq!(resolutions(&sink, &t).await.len(), 1, "nothing audited");

    // Not recorded: the 3 units go out under a new identifier, once.
    let answer = resolve(open, decision.clone(), t.clone()).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.body["recorded"], false);
    wait_for_batches(&sink, &t, "synced", |synced| synced.len() == 2).await;
    let billed = BTreeMap::from([((cus.clone(), "api_calls".to_owned()), 5.0 + 2.0 + 3.0)]);
    assert_eq!(standin.totals().await, billed);
    assert_eq!(
        sends_of(&pg, 2).await,
        vec![(1, "refused".to_owned()), (2, "accepted".to_owned())]
    );
    let settled = resolutions(&sink, &t).await;
    assert_eq!(settled.len(), 2, "{settled:?}");
    assert_eq!(settled[0]["actor"]["kind"], "api", "newest first");
    assert_eq!(settled[0]["details"]["recorded"], false);
    assert_eq!(settled[0]["details"]["reason"], decision["reason"]);
    // Resolved once: a second decision finds nothing to decide.
    let again = resolve(open, decision, t.clone()).await;
    assert_eq!(again.status, 409, "{:?}", again.body);
    ns.drop_databases().await;
}

/// The id of the one synced window.
async fn only_synced_window(sink: &ServiceProcess, t: &str) -> i64 {
    let synced = send(
        reqwest::Client::new()
            .get(sink.url("/v1/stripe/sync/batches?status=synced"))
            .bearer_auth(t),
    )
    .await;
    synced.body["data"][0]["id"]
        .as_i64()
        .expect("a synced window")
}

#[tokio::test]
async fn units_stripe_drops_after_accepting_them_go_out_again_once_the_cause_is_fixed() {
    let ns = Namespace::create().await;
    let standin = Standin::start(RATE).await;
    standin.sum_meter("api_calls").await;
    calls_meter(&ns, TENANT).await;
    // Stripe's error reports are thin events: the relay passes on ids only.
    let (_relay, sink, t) =
        sink_behind_a_relay(&ns, &standin, "v1.billing.meter.error_report_triggered").await;
    let _aggregator = spawn_aggregator(&ns, &[]).await;
    // The customer is mapped to a Stripe customer that does not exist (a typo): Stripe
    // answers 200 and drops the event later.
    for (path, body) in [
        (
            "/v1/stripe/meters/mapping",
            json!({"meter_id": "calls", "provider_meter_id": "api_calls", "sync_enabled": true}),
        ),
        (
            "/v1/stripe/customers/mapping",
            json!({"customer_id": "cust_typo", "provider_customer_id": "cus_nosuchcustomer1"}),
        ),
    ] {
        let answer = post_json(&sink.url(path), &t, &body).await;
        assert_eq!(answer.status, 201, "{path}: {:?}", answer.body);
    }
    produce_events(&ns, &calls("cust_typo", "typo", 3, 4)).await;

    let mut failed = Vec::new();
    wait_for_batches(&sink, &t, "failed", |windows| {
        failed = windows.to_vec();
        windows.len() == 1
    })
    .await;
    let window = &failed[0];
    assert!(
        window["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("dropped") && e.contains("meter_event_customer_not_found")),
        "{window}"
    );
    assert_eq!(window["synced_quantity"], "0", "the units are owed again");
    assert_eq!(window["aggregated_quantity"], "4");
    let reports = window["error_reports"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        reports
            .iter()
            .any(|r| r["identifier"] == window["stripe_event_id"]
                && r["error_code"] == "meter_event_customer_not_found"),
        "the report's details were fetched and name the event: {window}"
    );
    assert!(standin.totals().await.is_empty(), "stripe billed nothing");
    let metrics = reqwest::get(sink.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("stripe_sink_meter_events_dropped_total 1"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("dropped"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The cause is fixed (the right customer mapped) and the window retried: the 4 units go
    // out once, under a new identifier.
    let cus = standin.customer("cust_typo").await;
    let deleted = send(
        reqwest::Client::new()
            .delete(sink.url("/v1/stripe/customers/mapping/cust_typo"))
            .bearer_auth(&t),
    )
    .await;
    assert!(deleted.status < 300, "{:?}", deleted.body);
    let mapped = post_json(
        &sink.url("/v1/stripe/customers/mapping"),
        &t,
        &json!({"customer_id": "cust_typo", "provider_customer_id": cus}),
    )
    .await;
    assert_eq!(mapped.status, 201, "{:?}", mapped.body);
    let retried = post_json(&sink.url("/v1/stripe/batches/retry"), &t, &json!({})).await;
    assert_eq!(retried.status, 200, "{:?}", retried.body);
    let expected = BTreeMap::from([((cus, "api_calls".to_owned()), 4.0)]);
    wait_for_totals(&standin, &sink, &expected, Duration::from_secs(60)).await;
    wait_for_batches(&sink, &t, "synced", |synced| synced.len() == 1).await;
    let pg = ns.pg_pool().await;
    assert_eq!(
        sends_of(&pg, 3).await,
        vec![(1, "dropped".to_owned()), (2, "accepted".to_owned())]
    );
    ns.drop_databases().await;
}

/// Case 6 of the billing issue, on the real PostgreSQL: a meter event Stripe dropped after
/// accepting it leaves its window exactly as before its acceptance, for both ways a send
/// counts: a `sum` change (its units and the carry it moved) and a `last` value (the value
/// before it). A repeated report changes nothing.
#[tokio::test]
async fn a_dropped_meter_event_leaves_its_window_as_before_it_was_accepted() {
    use meterline_schemas::{
        CustomerId, Decimal, EnvironmentId, MeterId, TenantId, Timestamp, Window, WindowReason,
        WindowTotal,
    };
    use stripe_sink::ledger::{Counts, Finish, Ledger, Send};

    let ns = Namespace::create().await;
    let pool = ns.pg_pool().await;
    let ledger = Ledger::new(pool.clone());
    let start = hour_start(2);
    let window = Window::new(start, start + time::Duration::hours(1)).unwrap();
    let d = |units: i64, tenths: u32| Decimal::new(units, tenths);
    // (synced, accounted, the carry)
    let sums = |batch_id: i64| {
        let ledger = ledger.clone();
        async move {
            let current = ledger.current(batch_id, &window).await.unwrap();
            (current.synced, current.accounted, current.carry)
        }
    };
    // A `last` window's value is its latest accepted send's: the one whose value Stripe holds.
    let holds = |batch_id: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, Option<String>>(
                "SELECT stripe_event_id FROM stripe_sync_batches WHERE id = $1",
            )
            .bind(batch_id)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    for (customer, counts) in [("cust_sum", Counts::Change), ("cust_last", Counts::Value)] {
        ledger
            .record_window(&WindowTotal {
                tenant_id: TenantId::parse(TENANT).unwrap(),
                environment_id: EnvironmentId::parse("env_prod").unwrap(),
                customer_id: CustomerId::parse(customer).unwrap(),
                meter_id: MeterId::parse("calls").unwrap(),
                window,
                quantity: d(124, 1),
                event_count: 3,
                revision: std::num::NonZeroU32::MIN,
                reason: WindowReason::Due,
                expired: false,
                computed_at: Timestamp::now(),
                last_event_at: None,
                period_end: None,
            })
            .await
            .unwrap();
        let claimed = ledger.claim(1, Duration::from_secs(60)).await.unwrap();
        let batch = claimed.first().expect("the window is claimed").clone();
        // Two accepted sends: 10 for 10.4, then 2 for 1.6 (sum) or 12 for 12.4 (last).
        let (first, second) = match counts {
            Counts::Change => ((10, d(104, 1)), (2, d(16, 1))),
            Counts::Value => ((10, d(104, 1)), (12, d(124, 1))),
        };
        let send = |seq: i32, (value, accounted): (i64, Decimal)| Send {
            seq,
            identifier: format!("ml_{customer}_{seq}"),
            key_generation: 0,
            value: Decimal::from(value),
            accounted,
            event_name: "api_calls".into(),
            provider_customer_id: format!("cus_{customer}"),
            stripe_timestamp: (start + time::Duration::minutes(59)).unix_timestamp(),
            created_at: OffsetDateTime::now_utc(),
            in_doubt_since: None,
            counts,
        };
        let before = sums(batch.id).await;
        ledger
            .begin_send(batch.claim, &send(1, first))
            .await
            .unwrap();
        ledger.accepted(batch.claim, &send(1, first)).await.unwrap();
        let after_first = sums(batch.id).await;
        ledger
            .begin_send(batch.claim, &send(2, second))
            .await
            .unwrap();
        ledger
            .accepted(batch.claim, &send(2, second))
            .await
            .unwrap();
        ledger.finish(batch.claim, &Finish::Settled).await.unwrap();

        let reason = "stripe dropped it: meter_event_customer_not_found";
        let dropped = ledger
            .dropped_by_stripe(&format!("ml_{customer}_2"), reason)
            .await
            .unwrap();
        assert_eq!(dropped, Some(batch.id), "{customer}");
        assert_eq!(
            sums(batch.id).await,
            after_first,
            "{customer}: as before send 2"
        );
        if counts == Counts::Value {
            assert_eq!(holds(batch.id).await, Some(format!("ml_{customer}_1")));
        }
        let again = ledger
            .dropped_by_stripe(&format!("ml_{customer}_2"), reason)
            .await
            .unwrap();
        assert_eq!(again, None, "{customer}: a repeated report changes nothing");
        assert_eq!(sums(batch.id).await, after_first, "{customer}");
        ledger
            .dropped_by_stripe(&format!("ml_{customer}_1"), reason)
            .await
            .unwrap();
        assert_eq!(
            sums(batch.id).await,
            before,
            "{customer}: as before any send"
        );
        if counts == Counts::Value {
            assert_eq!(holds(batch.id).await, None, "nothing sent any more");
        }
        let (status, error): (String, Option<String>) =
            sqlx::query_as("SELECT sync_status, last_error FROM stripe_sync_batches WHERE id = $1")
                .bind(batch.id)
                .fetch_one(&pool)
                .await
                .unwrap();
        assert_eq!(
            (status.as_str(), error.as_deref()),
            ("failed", Some(reason))
        );
    }
    ns.drop_databases().await;
}

/// One customer's COUNT meter billed while the tenant's window size changes from `old` to
/// `new` minutes with events already counted up to `lead` ahead of the moment of the change:
/// returns the windows the sink billed, oldest first, after checking that Stripe holds one
/// unit per event. The scene is played on a clock hours in the past (`asked_at`), so that
/// every window is due while the test runs; the change is scheduled as the config API does,
/// with that clock.
async fn bill_across_a_window_size_change(
    old: u32,
    new: u32,
) -> Vec<(OffsetDateTime, OffsetDateTime, f64)> {
    let ns = Namespace::create().await;
    let standin = Standin::start(RATE).await;
    let customer = format!("cust_resize_{old}_{new}");
    let (sink, cus) = one_customer_on_a_sum_meter(&ns, &standin, &customer).await;
    if old != 60 {
        meterline_tests::usage::window_minutes_since_epoch(&ns, TENANT, "env_prod", old).await;
    }
    let _aggregator = spawn_aggregator(&ns, &[]).await;
    let pg = ns.pg_pool().await;
    let asked_at = hour_start(7) + time::Duration::minutes(7);
    // As if the ingest allowed events 2 h ahead (INGEST_MAX_FUTURE_SECONDS=7200).
    let lead = Duration::from_secs(2 * 3600);
    let every_10_minutes = |prefix: &str, n: i64| -> Vec<RawUsageEvent> {
        (0..n)
            .map(|k| {
                event(
                    TENANT,
                    &format!("{prefix}-{k}"),
                    &customer,
                    "api.request",
                    asked_at + time::Duration::minutes(10 * k),
                    json!({}),
                )
            })
            .collect()
    };
    let billed = |units: f64| BTreeMap::from([((cus.clone(), "api_calls".to_owned()), units)]);

    // Before the change: events up to the lead ahead are counted in windows of the old size.
    let early = every_10_minutes("early", 12);
    produce_events(&ns, &early).await;
    wait_for_totals(&standin, &sink, &billed(12.0), Duration::from_secs(90)).await;

    let effective = meterline_catalog::window_sizes::schedule_change(
        &pg,
        &meterline_tests::api::scope(TENANT, "env_prod"),
        new,
        asked_at,
        lead,
    )
    .await
    .expect("scheduling the change")
    .expect("a change");
    assert!(
        effective >= asked_at + lead,
        "{old} -> {new}: effective at {effective}, inside the lead"
    );

    // After it: the same instants again, and on past the change into the new size.
    let late = every_10_minutes("late", 30);
    produce_events(&ns, &late).await;
    wait_for_totals(&standin, &sink, &billed(42.0), Duration::from_secs(120)).await;
    let t = token(TENANT, "env_prod");
    wait_for_batches(&sink, &t, "synced", |synced| {
        synced
            .iter()
            .all(|w| w["aggregated_quantity"] == w["synced_quantity"])
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        standin.totals().await,
        billed(42.0),
        "nothing more went out"
    );

    let windows: Vec<(OffsetDateTime, OffsetDateTime, f64)> = sqlx::query_as(
        "SELECT window_start, window_end, synced_quantity::float8 FROM stripe_sync_batches
         WHERE entity_id = $1 ORDER BY window_start",
    )
    .bind(&customer)
    .fetch_all(&pg)
    .await
    .unwrap();
    for pair in windows.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "{old} -> {new}: windows overlap: {pair:?}"
        );
    }
    for e in early.iter().chain(&late) {
        let at = e.timestamp.as_offset_date_time();
        let holding: Vec<_> = windows
            .iter()
            .filter(|(start, end, _)| *start <= at && at < *end)
            .collect();
        assert_eq!(
            holding.len(),
            1,
            "{old} -> {new}: the event at {at} is in {holding:?}"
        );
    }
    for (start, end, _) in &windows {
        let minutes = (*end - *start).whole_minutes();
        let expected = if *start < effective { old } else { new };
        assert_eq!(
            minutes,
            i64::from(expected),
            "{old} -> {new}: window at {start}"
        );
    }
    // The config API schedules with the ingest's allowance (300 s by default) and a minute of
    // clock skew ahead of now.
    let now = OffsetDateTime::now_utc();
    let config = post_json_put(
        &sink.url("/v1/stripe/config"),
        &t,
        &json!({"api_key": standin.key, "sync_enabled": true, "rate_limit_per_second": RATE,
                "aggregation_window_minutes": old}),
    )
    .await;
    assert_eq!(config.status, 200, "{:?}", config.body);
    let from = OffsetDateTime::parse(
        config.body["window_size_effective_from"]
            .as_str()
            .unwrap_or_else(|| panic!("no effective time: {:?}", config.body)),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(
        from >= now + time::Duration::seconds(360),
        "{from} is within the ingest's 5 minutes (+1) of {now}"
    );
    ns.drop_databases().await;
    windows
}

#[tokio::test]
async fn a_window_size_change_from_60_to_15_minutes_bills_every_instant_once() {
    let windows = bill_across_a_window_size_change(60, 15).await;
    assert!(windows
        .iter()
        .any(|(s, e, _)| (*e - *s).whole_minutes() == 15));
}

#[tokio::test]
async fn a_window_size_change_from_15_to_60_minutes_bills_every_instant_once() {
    let windows = bill_across_a_window_size_change(15, 60).await;
    assert!(windows
        .iter()
        .any(|(s, e, _)| (*e - *s).whole_minutes() == 60));
}

/// Polls ClickHouse until `events_raw` holds `n` distinct events of the namespace.
async fn until_events_are_kept(ns: &Namespace, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let kept: u64 = ns
            .clickhouse()
            .query("SELECT uniqExact(event_id) FROM events_raw")
            .fetch_one()
            .await
            .unwrap_or(0);
        if kept == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "events_raw holds {kept} events, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The meters API's answer for `meter` once its backfill is done.
async fn backfill_done(ingest: &ServiceProcess, pg: &sqlx::PgPool, t: &str, meter: &str) -> Value {
    // The two minutes a backfill waits for batches already resolved pass at once.
    sqlx::query("UPDATE meter_backfills SET not_before = now() WHERE status <> 'done'")
        .execute(pg)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = get(&ingest.url(&format!("/v1/meters/{meter}")), t).await;
        if answer.body["backfill"]["status"] == "done" {
            return answer.body["backfill"].clone();
        }
        assert!(
            Instant::now() < deadline,
            "backfill not done: {:?}",
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn usage_sent_before_its_meter_existed_is_billed_once_the_meter_is_created_or_widened() {
    let ns = Namespace::create().await;
    let standin = Standin::start(RATE).await;
    standin.sum_meter("api_calls").await;
    standin.sum_meter("searches").await;
    let cus = standin.customer("cust_early").await;
    let aggregator = spawn_aggregator(&ns, &[]).await;
    let ingest = ServiceProcess::spawn("ingest", &ns.env()).await;
    let sink = sink(&ns, &standin).await;
    let t = token(TENANT, "env_prod");
    let pg = ns.pg_pool().await;
    connect(&sink, &standin, &[], &[("cust_early", &cus)]).await;

    // Usage of two kinds, before any meter: 8 calls, 4 searches in the EU and 3 in the US.
    let search = |id: String, hours_ago: i64, region: &str| {
        event(
            TENANT,
            &id,
            "cust_early",
            "search.query",
            hour_start(hours_ago) + time::Duration::minutes(20),
            json!({"region": region}),
        )
    };
    let mut early = calls("cust_early", "early", 3, 5);
    early.extend(calls("cust_early", "earlier", 30 * 24, 3));
    early.extend((0..4).map(|i| search(format!("eu-{i}"), 3, "eu")));
    early.extend((0..3).map(|i| search(format!("us-{i}"), 2, "us")));
    produce_events(&ns, &early).await;
    until_events_are_kept(&ns, 15).await;

    let create = |body: Value| {
        let url = ingest.url("/v1/meters");
        let t = t.clone();
        async move { post_json(&url, &t, &body).await }
    };
    let created = create(json!({"id": "calls", "event_name": "api.request",
                                "aggregation": "COUNT"}))
    .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    let backfill = &created.body["backfill"];
    assert_eq!(backfill["reason"], "created", "{backfill}");
    assert_eq!(backfill["status"], "pending", "{backfill}");
    let from = OffsetDateTime::parse(
        backfill["from"].as_str().expect("from"),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(
        (OffsetDateTime::now_utc() - time::Duration::days(35) - from).abs()
            < time::Duration::minutes(1),
        "the past 35 days: {backfill}"
    );
    // A call sent after the meter exists, before the backfill ran: metered live, once.
    produce_events(&ns, &calls("cust_early", "live", 2, 1)).await;
    until_events_are_kept(&ns, 16).await;
    for (meter, stripe_meter) in [("calls", "api_calls"), ("eu_searches", "searches")] {
        if meter == "eu_searches" {
            let created = create(json!({"id": "eu_searches", "event_name": "search.query",
                                        "aggregation": "COUNT",
                                        "filters": [{"property": "region", "in": ["eu"]}]}))
            .await;
            assert_eq!(created.status, 201, "{:?}", created.body);
        }
        map_meter(&sink, meter, stripe_meter).await;
    }
    let calls_backfill = backfill_done(&ingest, &pg, &t, "calls").await;
    assert_eq!(
        calls_backfill["events_found"], 8,
        "not the live one: {calls_backfill}"
    );
    let searches_backfill = backfill_done(&ingest, &pg, &t, "eu_searches").await;
    assert_eq!(searches_backfill["events_found"], 4, "{searches_backfill}");
    let billed = |calls: f64, searches: f64| {
        BTreeMap::from([
            ((cus.clone(), "api_calls".to_owned()), calls),
            ((cus.clone(), "searches".to_owned()), searches),
        ])
    };
    wait_for_totals(&standin, &sink, &billed(9.0, 4.0), Duration::from_secs(90)).await;

    // Widened to the US as well: the 3 US searches are found, the 4 EU ones not again.
    let widened = post_json_put(
        &ingest.url("/v1/meters/eu_searches"),
        &t,
        &json!({"event_name": "search.query", "aggregation": "COUNT",
                "filters": [{"property": "region", "in": ["eu", "us"]}]}),
    )
    .await;
    assert_eq!(widened.status, 200, "{:?}", widened.body);
    assert_eq!(widened.body["backfill"]["reason"], "matching_changed");
    let again = backfill_done(&ingest, &pg, &t, "eu_searches").await;
    assert_eq!(again["events_found"], 3, "{again}");
    wait_for_totals(&standin, &sink, &billed(9.0, 7.0), Duration::from_secs(90)).await;
    // An edit that changes what is counted but not what matches re-bills nothing.
    let recounted = post_json_put(
        &ingest.url("/v1/meters/calls"),
        &t,
        &json!({"event_name": "api.request", "aggregation": "COUNT"}),
    )
    .await;
    assert_eq!(recounted.status, 200, "{:?}", recounted.body);
    assert!(
        recounted.body.get("backfill").is_none(),
        "{:?}",
        recounted.body
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(standin.totals().await, billed(9.0, 7.0), "billed once");
    // What the billed usage means cannot change under it: another aggregation applies only
    // from a boundary ahead (case 11), and one that needs another Stripe formula is refused.
    let redefined = post_json_put(
        &ingest.url("/v1/meters/calls"),
        &t,
        &json!({"event_name": "api.request", "aggregation": "MAX", "property": "tokens"}),
    )
    .await;
    assert_eq!(
        (redefined.status, redefined.error_code()),
        (409, "meter_formula_change"),
        "{:?}",
        redefined.body
    );
    let kept = get(&ingest.url("/v1/meters/calls"), &t).await;
    assert_eq!(kept.body["aggregation"], "COUNT", "{:?}", kept.body);
    let scheduled = post_json_put(
        &ingest.url("/v1/meters/calls"),
        &t,
        &json!({"event_name": "api.request", "aggregation": "SUM", "property": "tokens"}),
    )
    .await;
    assert_eq!(scheduled.status, 200, "{:?}", scheduled.body);
    assert_eq!(
        scheduled.body["earlier_definitions"][0]["aggregation"], "COUNT",
        "{:?}",
        scheduled.body
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        standin.totals().await,
        billed(9.0, 7.0),
        "nothing re-billed"
    );
    let metrics = aggregator.metrics().await;
    for line in [
        "aggregator_backfill_events_total{outcome=\"found\"} 15",
        "aggregator_backfills_completed_total 3",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }
    ns.drop_databases().await;
}

/// Stripe's `last` formula bills "the last event in the period": by timestamp (as the stand-in
/// does) or by receipt, a window of a period must never send after a newer window of it has,
/// or its older value could become the bill. Seats 10 (hour 3) and 12 (hour 2) go out; a late
/// event makes hour 3's value 11: it is accounted for without a meter event, and Stripe's
/// period value stays 12 however it orders them.
#[tokio::test]
async fn an_older_window_never_sends_after_a_newer_window_of_its_period_on_a_last_meter() {
    let ns = Namespace::create().await;
    let standin = Standin::start(RATE).await;
    let mtr = standin.meter("seats_last", "last").await;
    create_meter(
        &ns,
        TENANT,
        "env_prod",
        json!({"id": "seats", "event_name": "workspace.seats", "aggregation": "LATEST",
               "property": "seats"}),
    )
    .await;
    let cus = standin.customer("cust_seats").await;
    let sink = sink(&ns, &standin).await;
    let _aggregator = spawn_aggregator(&ns, &[]).await;
    connect(
        &sink,
        &standin,
        &[("seats", "seats_last")],
        &[("cust_seats", &cus)],
    )
    .await;
    let t = token(TENANT, "env_prod");
    let seats = |id: &str, hours_ago: i64, minute: i64, n: u32| {
        event(
            TENANT,
            id,
            "cust_seats",
            "workspace.seats",
            hour_start(hours_ago) + time::Duration::minutes(minute),
            json!({"seats": n}),
        )
    };
    produce_events(&ns, &[seats("s-3", 3, 10, 10), seats("s-2", 2, 10, 12)]).await;
    wait_for_batches(&sink, &t, "synced", |synced| synced.len() == 2).await;
    let meter_events = || async {
        standin.inspect().await["totals"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["event_name"] == "seats_last")
            .map(|t| t["count"].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    assert_eq!(meter_events().await, 2);

    produce_events(&ns, &[seats("s-3-late", 3, 20, 11)]).await;
    wait_for_batches(&sink, &t, "synced", |synced| {
        synced.iter().any(|w| {
            w["window_start"] == rfc3339(hour_start(3))
                && w["aggregated_quantity"] == "11"
                && w["accounted_quantity"] == "11"
        })
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(meter_events().await, 2, "the older window sent nothing");
    let period = (
        hour_start(3).unix_timestamp(),
        hour_start(0).unix_timestamp(),
    );
    wait_for_summaries(&standin, &cus, period, &[("seats", &mtr, 12.0)]).await;
    ns.drop_databases().await;
}

/// Case 7 of the billing issue: a window's meter event is stamped at the second of the latest
/// event it counts, not at the window's last second, so usage is never moved later than its
/// last event (towards a billing period that starts inside the window after it). Five calls
/// at minutes 5 to 9 of an hour: Stripe files all five before minute 10; a late call at minute
/// 30 of the same hour goes out stamped at minute 30.
#[tokio::test]
async fn a_windows_meter_event_is_stamped_at_its_last_event_not_at_the_windows_end() {
    let ns = Namespace::create().await;
    let standin = Standin::start(RATE).await;
    let (_sink, cus) = one_customer_on_a_sum_meter(&ns, &standin, "cust_stamp").await;
    let _aggregator = spawn_aggregator(&ns, &[]).await;
    let meters = standin.get("/v1/billing/meters", &[]).await;
    let mtr = meters["data"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["event_name"] == "api_calls")
        .and_then(|m| m["id"].as_str())
        .unwrap_or_else(|| panic!("the api_calls meter: {meters}"))
        .to_owned();
    let hour = hour_start(2);
    let at = |minutes: i64| (hour + time::Duration::minutes(minutes)).unix_timestamp();
    produce_events(&ns, &calls("cust_stamp", "stamp", 2, 5)).await;
    let filed = |from: i64, to: i64| {
        let (standin, mtr, cus) = (&standin, mtr.clone(), cus.clone());
        async move { standin.summarised_total(&mtr, &cus, at(from), at(to)).await }
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while filed(0, 60).await < 5.0 {
        assert!(Instant::now() < deadline, "the calls did not reach stripe");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(filed(0, 10).await, 5.0, "filed at the last call (minute 9)");
    assert_eq!(filed(10, 60).await, 0.0);

    produce_events(
        &ns,
        &[event(
            TENANT,
            "stamp-late",
            "cust_stamp",
            "api.request",
            hour + time::Duration::minutes(30),
            json!({}),
        )],
    )
    .await;
    while filed(0, 60).await < 6.0 {
        assert!(
            Instant::now() < deadline,
            "the late call did not reach stripe"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(filed(0, 10).await, 5.0);
    assert_eq!(
        filed(30, 31).await,
        1.0,
        "the change is stamped at its window's last event"
    );
    assert_eq!(filed(31, 60).await, 0.0);
    ns.drop_databases().await;
}

/// The exactness test of the billing issue: two customers, a fractional SUM meter, a LATEST
/// seats meter on a `last` Stripe meter, a COUNT meter created (and mapped) only after its
/// usage, sync off while the first hours are recorded and then on, a window size change
/// (60 to 15 minutes) between the hours, and events sent twice with the same ids: every
/// customer's Stripe value equals the ground truth (the sum rounded once, the last seats
/// value, the distinct calls).
#[tokio::test]
async fn every_customers_stripe_value_equals_the_ground_truth_across_the_billing_cases() {
    let ns = Namespace::create().await;
    let standin = Standin::start(RATE).await;
    standin.sum_meter("gigabytes").await;
    standin.sum_meter("api_calls").await;
    let seats_mtr = standin.meter("seats_last", "last").await;
    for meter in [
        json!({"id": "storage", "event_name": "usage.sample", "aggregation": "SUM",
               "property": "gb"}),
        json!({"id": "seats", "event_name": "workspace.seats", "aggregation": "LATEST",
               "property": "seats"}),
    ] {
        create_meter(&ns, TENANT, "env_prod", meter).await;
    }
    let customers = ["cust_truth_a", "cust_truth_b"];
    let mut cus = BTreeMap::new();
    for c in customers {
        cus.insert(c, standin.customer(c).await);
    }
    let sink = sink(&ns, &standin).await;
    let _aggregator = spawn_aggregator(&ns, &[]).await;
    let ingest = ServiceProcess::spawn("ingest", &ns.env()).await;
    let pg = ns.pg_pool().await;
    let t = token(TENANT, "env_prod");
    let mapped: Vec<(&str, &str)> = customers.iter().map(|c| (*c, cus[c].as_str())).collect();
    connect(
        &sink,
        &standin,
        &[("storage", "gigabytes"), ("seats", "seats_last")],
        &mapped,
    )
    .await;
    let sync = |enabled: bool| {
        let (url, t, key) = (
            sink.url("/v1/stripe/config"),
            t.clone(),
            standin.key.clone(),
        );
        async move {
            let body = json!({"api_key": key, "sync_enabled": enabled,
                              "rate_limit_per_second": RATE});
            let answer = post_json_put(&url, &t, &body).await;
            assert_eq!(answer.status, 200, "{:?}", answer.body);
        }
    };
    // (customer, hours ago, minute) -> events: 0.4 GB, a seats value, two calls.
    let usage = |c: &str, hours_ago: i64, minute: i64, seats: u32| {
        let at = hour_start(hours_ago) + time::Duration::minutes(minute);
        let id = format!("{c}-{hours_ago}-{minute}");
        vec![
            event(
                TENANT,
                &format!("{id}-gb"),
                c,
                "usage.sample",
                at,
                json!({"gb": 0.4}),
            ),
            event(
                TENANT,
                &format!("{id}-seats"),
                c,
                "workspace.seats",
                at,
                json!({"seats": seats}),
            ),
            event(
                TENANT,
                &format!("{id}-call-1"),
                c,
                "api.request",
                at,
                json!({}),
            ),
            event(
                TENANT,
                &format!("{id}-call-2"),
                c,
                "api.request",
                at,
                json!({}),
            ),
        ]
    };

    // Hours 6 to 4 with sync off: recorded, skipped. Every event is sent twice.
    sync(false).await;
    let mut early = Vec::new();
    for (c, seats) in [("cust_truth_a", [5, 6, 7]), ("cust_truth_b", [3, 3, 4])] {
        for (hours_ago, n) in [6, 5, 4].into_iter().zip(seats) {
            early.extend(usage(c, hours_ago, 10, n));
        }
    }
    produce_events(&ns, &early).await;
    produce_events(&ns, &early).await;
    wait_for_batches(&sink, &t, "skipped", |skipped| skipped.len() == 12).await;
    sync(true).await;

    // The tenant's windows become 15 minutes long from the first hour boundary past the
    // ingest's allowance (here 1 h) after the change, asked for as hour 4 began.
    let effective = meterline_catalog::window_sizes::schedule_change(
        &pg,
        &meterline_tests::api::scope(TENANT, "env_prod"),
        15,
        hour_start(4) + time::Duration::minutes(7),
        Duration::from_secs(3600),
    )
    .await
    .expect("scheduling the change")
    .expect("a change");
    assert_eq!(effective, hour_start(2));
    // Hours 3 to 1, twice an hour (some sent again after the calls meter exists).
    let mut late = Vec::new();
    for (c, seats) in [
        ("cust_truth_a", [7, 8, 8, 9, 9, 6]),
        ("cust_truth_b", [4, 4, 5, 5, 9, 9]),
    ] {
        let instants = [3, 2, 1].into_iter().flat_map(|h| [(h, 10), (h, 40)]);
        for ((hours_ago, minute), n) in instants.zip(seats) {
            late.extend(usage(c, hours_ago, minute, n));
        }
    }
    produce_events(&ns, &late).await;
    until_events_are_kept(&ns, 72).await;

    // The calls meter is created, and mapped, only now.
    let created = post_json(
        &ingest.url("/v1/meters"),
        &t,
        &json!({"id": "calls", "event_name": "api.request", "aggregation": "COUNT"}),
    )
    .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    map_meter(&sink, "calls", "api_calls").await;
    let backfill = backfill_done(&ingest, &pg, &t, "calls").await;
    assert_eq!(backfill["events_found"], 36, "{backfill}");
    // Retries of events the backfill already gave the meter count once.
    produce_events(&ns, &late[..8]).await;

    // Ground truth per customer: 9 samples of 0.4 GB (3.6, billed as 4), 18 distinct calls,
    // and the last seats value of the month: 6 and 9.
    let mut expected = BTreeMap::new();
    for c in customers {
        expected.insert((cus[c].clone(), "gigabytes".to_owned()), 4.0);
        expected.insert((cus[c].clone(), "api_calls".to_owned()), 18.0);
    }
    // Stripe's sums (a `last` meter's events do not add up).
    let sums = || async {
        standin
            .totals()
            .await
            .into_iter()
            .filter(|((_, event), _)| event != "seats_last")
            .collect::<BTreeMap<_, _>>()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got = sums().await;
        if got == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stripe {got:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let month = (
        hour_start(6).unix_timestamp(),
        hour_start(0).unix_timestamp(),
    );
    for (c, last_seats) in [("cust_truth_a", 6.0), ("cust_truth_b", 9.0)] {
        wait_for_summaries(
            &standin,
            &cus[c],
            month,
            &[("seats", &seats_mtr, last_seats)],
        )
        .await;
    }
    // The retried copies have gone through by now, and billed nothing more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(sums().await, expected, "billed once");
    let lines = reconcile(&sink, &t, hour_start(7), hour_start(0)).await;
    for l in lines.iter().filter(|l| l["meter_id"] == "storage") {
        assert_eq!(l["expected"], "3.6", "the exact total: {l}");
        assert_eq!(l["ledger_synced"], "4", "{l}");
    }
    ns.drop_databases().await;
}

/// How Stripe's subscription period reaches meterline in [`bill_seats_over_a_subscription`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeriodLearnt {
    /// Its `customer.subscription.created` webhook, through the relay.
    Webhook,
    /// A customer import, which lists the account's subscriptions after its customers (the
    /// subscription predates the webhook endpoint, so no webhook ever names it).
    Import,
}

/// Case 2 of the billing issue, with the customer's subscription period: Stripe invoices a
/// `last` meter's value over the subscription's period, which starts at its billing anchor,
/// not on the 1st. Seats peak at 50 two days before a month's start (before the subscription),
/// at 10 three hours before it, at 4 an hour after it; the subscription's period began a day
/// before the month. Billed by calendar month, Stripe's value for the subscription period is
/// 4 (the new month's maximum); billed over the subscription period, it is 10. The period
/// becomes known after the usage was sent (`learnt`): the aggregator recomputes and the sink
/// resends the windows over it.
async fn bill_seats_over_a_subscription(learnt: PeriodLearnt) {
    let ns = Namespace::create().await;
    let standin = Standin::start(RATE).await;
    let mtr = standin.meter("seats_peak", "last").await;
    create_meter(
        &ns,
        TENANT,
        "env_prod",
        json!({"id": "seats", "event_name": "workspace.seats", "aggregation": "MAX",
               "property": "seats"}),
    )
    .await;
    let cus = standin.customer("cust_anchor").await;
    let enabled = match learnt {
        PeriodLearnt::Webhook => "customer.subscription.created",
        PeriodLearnt::Import => "customer.updated",
    };
    let (_relay, sink, t) = sink_behind_a_relay(&ns, &standin, enabled).await;
    let aggregator = spawn_aggregator(&ns, &[]).await;
    map_meter(&sink, "seats", "seats_peak").await;
    map_customer(&sink, "cust_anchor", &cus).await;

    // The latest month start at least 3 hours ago (a month ago, early on the 1st).
    let now = OffsetDateTime::now_utc();
    let month_start = |at: OffsetDateTime| {
        at.replace_day(1)
            .expect("day 1")
            .replace_time(time::Time::MIDNIGHT)
    };
    let month = if now - month_start(now) >= time::Duration::hours(3) {
        month_start(now)
    } else {
        month_start(month_start(now) - time::Duration::DAY)
    };
    let anchor = month - time::Duration::DAY + time::Duration::seconds(17 * 60 + 33);
    let seats = |id: &str, at: OffsetDateTime, n: u32| {
        event(
            TENANT,
            id,
            "cust_anchor",
            "workspace.seats",
            at,
            json!({"seats": n}),
        )
    };
    produce_events(
        &ns,
        &[
            seats("before-subscription", month - time::Duration::days(2), 50),
            seats(
                "end-of-month",
                month - time::Duration::hours(3) + time::Duration::minutes(10),
                10,
            ),
            seats(
                "new-month",
                month + time::Duration::hours(1) + time::Duration::minutes(10),
                4,
            ),
        ],
    )
    .await;
    // Stripe's value over the subscription period (summaries are minute-aligned: from the
    // minute of the anchor, which no event falls in).
    let minute = |at: OffsetDateTime| at.unix_timestamp() - at.unix_timestamp().rem_euclid(60);
    let period_end = anchor + time::Duration::days(30);
    let period = (minute(anchor), minute(period_end));
    wait_for_summaries(&standin, &cus, period, &[("seats", &mtr, 4.0)]).await;
    wait_for_batches(&sink, &t, "synced", |synced| synced.len() == 3).await;

    // Stripe names the subscription's period: the windows are billed over it.
    standin
        .subscription(
            &cus,
            &mtr,
            (anchor.unix_timestamp(), period_end.unix_timestamp()),
        )
        .await;
    if learnt == PeriodLearnt::Import {
        let start = post_json(&sink.url("/v1/stripe/migrate/customers"), &t, &json!({})).await;
        assert_eq!(start.status, 202, "{:?}", start.body);
        let id = start.body["id"].as_str().expect("a job id").to_owned();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let status = get(&sink.url(&format!("/v1/stripe/migrate/status/{id}")), &t).await;
            if status.body["status"] == "completed" {
                assert_eq!(
                    status.body["subscriptions"],
                    json!({"pages": 1, "periods": 1}),
                    "{:?}",
                    status.body
                );
                break;
            }
            assert!(Instant::now() < deadline, "import: {:?}", status.body);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    wait_for_summaries(&standin, &cus, period, &[("seats", &mtr, 10.0)]).await;
    wait_for_batches(&sink, &t, "synced", |synced| {
        let value = |at: OffsetDateTime| {
            synced
                .iter()
                .find(|w| w["window_start"] == rfc3339(hour_start_of(at)))
                .map(|w| w["aggregated_quantity"].clone())
        };
        synced.len() == 3
            && synced
                .iter()
                .all(|w| w["aggregated_quantity"] == w["accounted_quantity"])
            // Before the subscription: the calendar month's peak, kept.
            && value(month - time::Duration::days(2)) == Some(json!("50"))
            // In it: the period's peak to date, from the anchor on.
            && value(month - time::Duration::hours(3)) == Some(json!("10"))
            && value(month + time::Duration::hours(1)) == Some(json!("10"))
    })
    .await;
    let metrics = aggregator.metrics().await;
    assert!(
        metrics.contains("aggregator_billing_periods_applied_total 1"),
        "{metrics}"
    );
    ns.drop_databases().await;
}

#[tokio::test]
async fn a_max_meter_bills_its_customers_subscription_period_not_the_calendar_month() {
    bill_seats_over_a_subscription(PeriodLearnt::Webhook).await;
}

#[tokio::test]
async fn a_customer_import_reads_the_subscription_periods_that_predate_the_webhook_endpoint() {
    bill_seats_over_a_subscription(PeriodLearnt::Import).await;
}

/// Case 7 of the billing issue, the split: a `COUNT` window crossing the start of the
/// customer's subscription period bills only its calls before it; the window after it bills
/// the rest, stamped in the new period, so each call is on the invoice of the period it was
/// made in. The subscription is anchored at half past an hour `h` four hours ago: 3 calls
/// before the anchor, 4 after it in the same hour, 1 in the next hour. Billed before the
/// period is known, the crossing window's 7 are stamped at its last call, after the anchor;
/// once Stripe names the period, the crossing window takes its 7 back where Stripe filed
/// them and sends its 3 before the anchor, and the next window sends the 4 in the new period:
/// Stripe holds 3 before the anchor and 5 after it (without the split: 0 and 8, or -4 and 12
/// had the difference been stamped at the 3rd call). A late call at `h`:45 is billed in the
/// new period too.
#[tokio::test]
async fn a_count_window_crossing_a_subscription_period_start_bills_each_call_in_its_period() {
    let ns = Namespace::create().await;
    let standin = Standin::start(RATE).await;
    let mtr = standin.meter("calls_sum", "sum").await;
    create_meter(
        &ns,
        TENANT,
        "env_prod",
        json!({"id": "calls", "event_name": "api.call", "aggregation": "COUNT"}),
    )
    .await;
    let cus = standin.customer("cust_split").await;
    let (_relay, sink, t) =
        sink_behind_a_relay(&ns, &standin, "customer.subscription.created").await;
    let aggregator = spawn_aggregator(&ns, &[]).await;
    map_meter(&sink, "calls", "calls_sum").await;
    map_customer(&sink, "cust_split", &cus).await;

    let h = hour_start_of(OffsetDateTime::now_utc() - time::Duration::hours(4));
    let anchor = h + time::Duration::minutes(30);
    let minutes = |m: i64| h + time::Duration::minutes(m);
    let call =
        |id: &str, at: OffsetDateTime| event(TENANT, id, "cust_split", "api.call", at, json!({}));
    produce_events(
        &ns,
        &[
            call("before-1", minutes(5)),
            call("before-2", minutes(12)),
            call("before-3", minutes(20)),
            call("after-1", minutes(31)),
            call("after-2", minutes(40)),
            call("after-3", minutes(50)),
            call("after-4", minutes(59)),
            call("next-hour", minutes(70)),
        ],
    )
    .await;
    let unix = |at: OffsetDateTime| at.unix_timestamp();
    let before = (unix(h - time::Duration::hours(1)), unix(anchor));
    let after = (unix(anchor), unix(h + time::Duration::hours(3)));
    // Calendar months: the crossing hour is billed whole, stamped at its last call, which
    // Stripe files in the subscription's period once it has one.
    wait_for_summaries(&standin, &cus, after, &[("calls", &mtr, 8.0)]).await;
    wait_for_summaries(&standin, &cus, before, &[("calls", &mtr, 0.0)]).await;
    wait_for_batches(&sink, &t, "synced", |synced| synced.len() == 2).await;

    // Stripe names the period: the crossing hour's last minutes move to the new period.
    let period_end = anchor + time::Duration::days(30);
    standin
        .subscription(&cus, &mtr, (unix(anchor), unix(period_end)))
        .await;
    wait_for_summaries(&standin, &cus, before, &[("calls", &mtr, 3.0)]).await;
    wait_for_summaries(&standin, &cus, after, &[("calls", &mtr, 5.0)]).await;
    let quantity_of = |synced: &[Value], start: OffsetDateTime| {
        synced
            .iter()
            .find(|w| w["window_start"] == rfc3339(start))
            .map(|w| (w["aggregated_quantity"].clone(), w["event_count"].clone()))
    };
    wait_for_batches(&sink, &t, "synced", |synced| {
        synced.len() == 2
            && quantity_of(synced, h) == Some((json!("3"), json!(3)))
            && quantity_of(synced, minutes(60)) == Some((json!("5"), json!(5)))
    })
    .await;

    // A late call in the crossing hour, after the anchor: billed by the next window.
    produce_events(&ns, &[call("late-after", minutes(45))]).await;
    wait_for_summaries(&standin, &cus, after, &[("calls", &mtr, 6.0)]).await;
    wait_for_batches(&sink, &t, "synced", |synced| {
        quantity_of(synced, minutes(60)) == Some((json!("6"), json!(6)))
    })
    .await;
    wait_for_summaries(&standin, &cus, before, &[("calls", &mtr, 3.0)]).await;
    let metrics = aggregator.metrics().await;
    assert!(
        metrics.contains("aggregator_billing_periods_applied_total 1"),
        "{metrics}"
    );
    ns.drop_databases().await;
}

/// The storage issue's deduplication case: an SDK that stamps `now` on each retry sends one
/// event id twice with timestamps in different windows. Whether the first copy's window was
/// still open or already published and billed, the id counts once in total, in the first
/// copy's window, and the retry's own window is never even marked. Old rule (the newest copy
/// wins): the retry moved the event into its window, which billed it, and the published
/// window kept billing it too (Stripe 3, not 2).
#[tokio::test]
async fn an_event_id_resent_with_a_timestamp_in_another_window_counts_once() {
    let ns = Namespace::create().await;
    let standin = Standin::start(RATE).await;
    let (sink, cus) = one_customer_on_a_sum_meter(&ns, &standin, "cust_retry").await;
    let aggregator = spawn_aggregator(&ns, &[]).await;
    let t = token(TENANT, "env_prod");

    // `copy` of `id`, stamped in the hour `hours_ago` began, accepted by ingest `ingested`
    // seconds ago.
    let copy = |id: &str, hours_ago: i64, ingested: i64| RawUsageEvent {
        ingested_at: Some(
            meterline_schemas::Timestamp::new(
                OffsetDateTime::now_utc() - time::Duration::seconds(ingested),
            )
            .expect("a timestamp"),
        ),
        ..event(
            TENANT,
            id,
            "cust_retry",
            "api.request",
            hour_start(hours_ago) + time::Duration::minutes(10),
            json!({}),
        )
    };
    let billed = |calls: f64| BTreeMap::from([((cus.clone(), "api_calls".to_owned()), calls)]);
    let window = |synced: &[Value], hours_ago: i64| {
        synced
            .iter()
            .find(|w| w["window_start"] == rfc3339(hour_start(hours_ago)))
            .map(|w| w["aggregated_quantity"].clone())
    };

    // Before its window is published: the first copy (5 hours ago) and its retry (4 hours
    // ago) in one go, the retry first on the topic.
    produce_events(&ns, &[copy("evt-a", 4, 10), copy("evt-a", 5, 20)]).await;
    wait_for_totals(&standin, &sink, &billed(1.0), Duration::from_secs(90)).await;
    wait_for_batches(&sink, &t, "synced", |synced| {
        window(synced, 5) == Some(json!("1")) && window(synced, 4).is_none()
    })
    .await;

    // After its window is published and billed: the retry comes an hour later on the clock.
    produce_events(&ns, &[copy("evt-b", 3, 30)]).await;
    wait_for_totals(&standin, &sink, &billed(2.0), Duration::from_secs(90)).await;
    wait_for_batches(&sink, &t, "synced", |synced| {
        window(synced, 3) == Some(json!("1"))
    })
    .await;
    produce_events(&ns, &[copy("evt-b", 2, 0)]).await;
    // The retry is recognised (the second copy restamped, after evt-a's) and counted at its
    // first copy's time: its own window is not even marked, and Stripe still holds 2.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = aggregator.metrics().await;
        if metrics.contains("aggregator_copies_restamped_total 2") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the retry was not recognised: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Long enough for a window it had marked to be published (1 s interval, grace 0).
    tokio::time::sleep(Duration::from_secs(3)).await;
    wait_for_batches(&sink, &t, "synced", |synced| {
        window(synced, 2).is_none() && window(synced, 3) == Some(json!("1"))
    })
    .await;
    wait_for_totals(&standin, &sink, &billed(2.0), Duration::from_secs(30)).await;
    ns.drop_databases().await;
}

/// The start of the hour `at` is in.
fn hour_start_of(at: OffsetDateTime) -> OffsetDateTime {
    at.replace_time(time::Time::from_hms(at.hour(), 0, 0).expect("an hour"))
}

/// Case 7 of the billing issue: usage reported after its period's invoice is final is on no
/// invoice (Stripe does not add it to a final one), so meterline reports it instead of
/// sending it into a closed period. A subscription's period ended two days ago and its
/// invoice was finalized (`invoice.finalized` through the relay); two late calls in it fail
/// their window with the reason and count on a metric, while a late call of the current
/// period goes out. Stripe bills 5 + 4, and the 2 are there for a person to bill by hand.
#[tokio::test]
async fn a_change_after_its_periods_invoice_is_final_is_reported_not_sent() {
    let ns = Namespace::create().await;
    let standin = Standin::start(RATE).await;
    let mtr = standin.sum_meter("api_calls").await;
    calls_meter(&ns, TENANT).await;
    let cus = standin.customer("cust_invoiced").await;
    let (_relay, sink, t) = sink_behind_a_relay(&ns, &standin, "*").await;
    let _aggregator = spawn_aggregator(&ns, &[]).await;
    map_meter(&sink, "calls", "api_calls").await;
    map_customer(&sink, "cust_invoiced", &cus).await;

    let now = OffsetDateTime::now_utc();
    let renewed =
        hour_start_of(now - time::Duration::days(2)) + time::Duration::seconds(17 * 60 + 33);
    let ended = (
        (renewed - time::Duration::days(30)).unix_timestamp(),
        renewed.unix_timestamp(),
    );
    let current = (
        renewed.unix_timestamp(),
        (renewed + time::Duration::days(30)).unix_timestamp(),
    );
    // Stripe names the period that ended, then the renewal.
    let sub = standin.subscription(&cus, &mtr, ended).await;
    standin
        .control(
            &format!("accounts/{}/subscriptions", standin.key),
            json!({"id": sub, "customer": cus, "meter": mtr,
                   "current_period_start": current.0, "current_period_end": current.1}),
        )
        .await;
    let pg = ns.pg_pool().await;
    until_rows(&pg, "SELECT count(*) FROM stripe_subscription_periods", 2).await;

    let in_ended = hour_start_of(renewed - time::Duration::DAY) + time::Duration::minutes(5);
    let in_current = hour_start_of(renewed + time::Duration::hours(2)) + time::Duration::minutes(5);
    let calls = |prefix: &str, at: OffsetDateTime, n: usize| -> Vec<RawUsageEvent> {
        (0..n)
            .map(|i| {
                let id = format!("{prefix}-{i}");
                event(TENANT, &id, "cust_invoiced", "api.request", at, json!({}))
            })
            .collect()
    };
    let mut first = calls("ended", in_ended, 5);
    first.extend(calls("current", in_current, 3));
    produce_events(&ns, &first).await;
    let expected = BTreeMap::from([((cus.clone(), "api_calls".to_owned()), 8.0)]);
    wait_for_totals(&standin, &sink, &expected, Duration::from_secs(60)).await;

    // The ended period's invoice is final: a later change of its usage is reported.
    standin.finalize_invoice(&sub, ended).await;
    until_rows(
        &pg,
        "SELECT count(*) FROM stripe_subscription_periods WHERE invoice_finalized_at IS NOT NULL",
        1,
    )
    .await;
    let mut late = calls("ended-late", in_ended, 2);
    late.extend(calls("current-late", in_current, 1));
    produce_events(&ns, &late).await;
    wait_for_batches(&sink, &t, "failed", |failed| {
        failed.iter().any(|w| {
            w["window_start"] == rfc3339(hour_start_of(in_ended))
                && w["aggregated_quantity"] == "7"
                && w["last_error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("after_final_invoice"))
        })
    })
    .await;
    let expected = BTreeMap::from([((cus.clone(), "api_calls".to_owned()), 9.0)]);
    wait_for_totals(&standin, &sink, &expected, Duration::from_secs(60)).await;
    let metrics = sink.metrics().await;
    assert!(
        metrics.contains("stripe_sink_changes_after_final_invoice_total 1"),
        "{metrics}"
    );
    ns.drop_databases().await;
}

/// Case 11 of the billing issue: an edit of what a meter with usage counts never reaches
/// back. A SUM of `tokens` billed 30 in a window six hours ago; the meter becomes a COUNT
/// (a clock seven hours back, a lead of two hours: effective at the next hour boundary after
/// five hours ago). A late event in the old window still counts its tokens (35), and the
/// windows after the change count events (2 for two events of 100 and 200 tokens): Stripe
/// bills 37. Recomputing the old window under the new definition would have sent -27 (a
/// count of 3) and billed 5. Through the API: the same edit answers with the old
/// definition's end (at least `INGEST_MAX_FUTURE_SECONDS` plus a minute ahead), and one that
/// needs another Stripe formula is refused.
#[tokio::test]
async fn a_meter_redefined_keeps_its_past_windows_and_counts_under_the_new_definition_after() {
    let ns = Namespace::create().await;
    let standin = Standin::start(RATE).await;
    standin.sum_meter("tokens_used").await;
    create_meter(
        &ns,
        TENANT,
        "env_prod",
        json!({"id": "tokens", "event_name": "llm.completion", "aggregation": "SUM",
               "property": "tokens"}),
    )
    .await;
    let cus = standin.customer("cust_tokens").await;
    let sink = sink(&ns, &standin).await;
    let ingest = ServiceProcess::spawn("ingest", &ns.env()).await;
    let _aggregator = spawn_aggregator(&ns, &[]).await;
    connect(
        &sink,
        &standin,
        &[("tokens", "tokens_used")],
        &[("cust_tokens", &cus)],
    )
    .await;
    let t = token(TENANT, "env_prod");
    let completion = |id: &str, at: OffsetDateTime, tokens: u32| {
        event(
            TENANT,
            id,
            "cust_tokens",
            "llm.completion",
            at,
            json!({"tokens": tokens}),
        )
    };
    let old_window = hour_start(6);
    produce_events(
        &ns,
        &[
            completion("c-1", old_window + time::Duration::minutes(5), 10),
            completion("c-2", old_window + time::Duration::minutes(10), 20),
        ],
    )
    .await;
    let billed = |units: f64| BTreeMap::from([((cus.clone(), "tokens_used".to_owned()), units)]);
    wait_for_totals(&standin, &sink, &billed(30.0), Duration::from_secs(90)).await;

    // The edit, on a clock seven hours back with a two-hour lead.
    let asked_at = OffsetDateTime::now_utc() - time::Duration::hours(7);
    let count: meterline_schemas::MeterInput = serde_json::from_value(
        json!({"id": "tokens", "event_name": "llm.completion", "aggregation": "COUNT"}),
    )
    .unwrap();
    let replaced = meterline_catalog::meters::MeterStore::new(ns.pg_pool().await)
        .replace(
            &meterline_tests::api::scope(TENANT, "env_prod"),
            &meterline_schemas::MeterDefinition::try_from(count).unwrap(),
            asked_at,
            Duration::from_secs(2 * 3600),
        )
        .await
        .expect("an edit within the sum formula is taken")
        .expect("the meter exists");
    let effective = replaced
        .aggregation_effective_from
        .expect("the edit is scheduled");
    assert!(
        effective >= asked_at + time::Duration::hours(2),
        "{effective}"
    );
    assert!(effective > old_window + time::Duration::HOUR, "{effective}");

    let after = effective + time::Duration::minutes(30);
    produce_events(
        &ns,
        &[
            completion("c-late", old_window + time::Duration::minutes(20), 5),
            completion("c-3", after, 100),
            completion("c-4", after + time::Duration::minutes(1), 200),
        ],
    )
    .await;
    wait_for_totals(&standin, &sink, &billed(37.0), Duration::from_secs(90)).await;
    let usage = get(
        &format!(
            "{}?customer_id=cust_tokens&meter_id=tokens&from={}&to={}",
            ingest.url("/v1/usage"),
            rfc3339(old_window),
            rfc3339(hour_start_of(after) + time::Duration::HOUR),
        ),
        &t,
    )
    .await;
    assert_eq!(usage.status, 200, "{:?}", usage.body);
    let windows: Vec<(String, String)> = usage.body["data"]
        .as_array()
        .expect("windows")
        .iter()
        .filter(|w| w["event_count"] != 0)
        .map(|w| {
            (
                w["aggregation"].as_str().unwrap_or_default().to_owned(),
                w["quantity"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        windows,
        [
            ("SUM".to_owned(), "35".to_owned()),
            ("COUNT".to_owned(), "2".to_owned())
        ],
        "{:?}",
        usage.body
    );

    // Through the API: another edit within the formula is scheduled past the lead (the
    // ingest's default 300 s plus a minute), one across formulas is refused.
    let asked = OffsetDateTime::now_utc();
    let edited = post_json_put(
        &ingest.url("/v1/meters/tokens"),
        &t,
        &json!({"event_name": "llm.completion", "aggregation": "SUM", "property": "tokens"}),
    )
    .await;
    assert_eq!(edited.status, 200, "{:?}", edited.body);
    assert_eq!(edited.body["aggregation"], "SUM");
    let earlier = edited.body["earlier_definitions"]
        .as_array()
        .expect("earlier definitions");
    assert_eq!(earlier.len(), 2, "{earlier:?}");
    assert_eq!(earlier[1]["aggregation"], "COUNT");
    let until = OffsetDateTime::parse(
        earlier[1]["until"].as_str().unwrap_or_default(),
        &time::format_description::well_known::Rfc3339,
    )
    .expect("an RFC 3339 time");
    assert!(until >= asked + time::Duration::minutes(6), "{until}");
    let refused = post_json_put(
        &ingest.url("/v1/meters/tokens"),
        &t,
        &json!({"event_name": "llm.completion", "aggregation": "MAX", "property": "tokens"}),
    )
    .await;
    assert_eq!(
        (refused.status, refused.error_code()),
        (409, "meter_formula_change"),
        "{:?}",
        refused.body
    );
    let kept = get(&ingest.url("/v1/meters/tokens"), &t).await;
    assert_eq!(kept.body["aggregation"], "SUM", "{:?}", kept.body);
    wait_for_totals(&standin, &sink, &billed(37.0), Duration::from_secs(5)).await;
    ns.drop_databases().await;
}

/// Polls `count_sql` (a `SELECT count(*)`) until it counts `n`: a webhook's effect is written.
async fn until_rows(pg: &sqlx::PgPool, count_sql: &str, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found: i64 = sqlx::query_scalar(count_sql)
            .fetch_one(pg)
            .await
            .expect("counting rows");
        if found == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{found} rows, not {n}: {count_sql}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
