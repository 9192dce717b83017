//! Several stripe-sink replicas on one Stripe account: together they stay under the account's
//! rate limit in every one-second span (Stripe limits the account, not a process), through a
//! replica SIGKILLed mid-send and a replica added, and every total still equals the truth.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meterline_tests::api::{post_json, send, token};
use meterline_tests::standin::Standin;
use meterline_tests::usage::{event, hour_start, produce_events, spawn_aggregator};
use meterline_tests::{Namespace, ServiceProcess};
use serde_json::json;

use crate::sink::calls_meter;

const TENANT: &str = "tenant_replicas";

/// A replica whose claims run out soon after it dies: no retries within a claim keep its lease
/// (and so the killed replica's hold on its customers' next windows) at 38 s.
async fn sink(ns: &Namespace, standin: &Standin) -> ServiceProcess {
    let mut env = ns.env();
    env.push(("STRIPE_API_BASE".into(), standin.base.clone()));
    env.push(("STRIPE_API_TIMEOUT_SECONDS".into(), "2".into()));
    env.push(("STRIPE_MAX_RETRIES".into(), "0".into()));
    ServiceProcess::spawn("stripe-sink", &env).await
}

/// Meter events this replica's requests got accepted (`stripe_sink_stripe_requests_total`).
async fn accepted(sink: &ServiceProcess) -> u64 {
    let metrics = sink.metrics().await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("stripe_sink_stripe_requests_total{outcome=\"accepted\"} "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// The units Stripe has counted so far, over every customer.
async fn units_in_stripe(standin: &Standin) -> f64 {
    standin.totals().await.values().sum()
}

/// The gaps between the requests of the first one-second span that holds `busiest` of the
/// sorted `times` (ms), to show how the span came about.
fn busiest_span_gaps(times: &[i64], busiest: usize) -> Vec<i64> {
    times
        .windows(busiest.max(2))
        .find(|span| span[span.len() - 1] - span[0] < 1000)
        .map(|span| span.windows(2).map(|w| w[1] - w[0]).collect())
        .unwrap_or_default()
}

// Two threads: the stand-in stamps each request's arrival in this process, and on one
// thread it would wait while the test parses the stand-in's answers (seen: 100 ms stalls,
// then requests stamped together).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_replicas_share_the_accounts_rate_limit_through_a_kill_and_a_new_replica() {
    const LIMIT: u32 = 25;
    const CUSTOMERS: usize = 30;
    // 13 hourly windows per customer: 390 meter events, about 16 s at the limit.
    const HOURS: std::ops::RangeInclusive<i64> = 2..=14;
    let ns = Namespace::create().await;
    let standin = Standin::start(LIMIT).await;
    standin.sum_meter("api_calls").await;
    calls_meter(&ns, TENANT).await;
    let mut customers = BTreeMap::new();
    for i in 0..CUSTOMERS {
        let external = format!("cust_{i:02}");
        customers.insert(external.clone(), standin.customer(&external).await);
    }
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(sink(&ns, &standin).await);
    }
    // Configured through one replica: the others read the same PostgreSQL.
    let t = token(TENANT, "env_prod");
    let config = send(
        reqwest::Client::new()
            .put(replicas[0].url("/v1/stripe/config"))
            .bearer_auth(&t)
            .json(&json!({"api_key": standin.key, "sync_enabled": true,
                          "rate_limit_per_second": LIMIT})),
    )
    .await;
    assert_eq!(config.status, 200, "{:?}", config.body);
    let answer = post_json(
        &replicas[1].url("/v1/stripe/meters/mapping"),
        &t,
        &json!({"meter_id": "calls", "provider_meter_id": "api_calls", "sync_enabled": true}),
    )
    .await;
    assert_eq!(answer.status, 201, "{:?}", answer.body);
    let mappings: Vec<_> = customers
        .iter()
        .map(|(external, cus)| json!({"customer_id": external, "provider_customer_id": cus}))
        .collect();
    for mapping in mappings {
        let answer = post_json(
            &replicas[2].url("/v1/stripe/customers/mapping"),
            &t,
            &mapping,
        )
        .await;
        assert_eq!(answer.status, 201, "{:?}", answer.body);
    }

    let _aggregator = spawn_aggregator(&ns, &[]).await;
    let mut events = Vec::new();
    let mut expected = BTreeMap::new();
    for (n, (external, cus)) in customers.iter().enumerate() {
        for hours_ago in HOURS {
            events.push(event(
                TENANT,
                &format!("{external}-{hours_ago}"),
                external,
                "api.request",
                hour_start(hours_ago) + time::Duration::minutes(n as i64),
                json!({}),
            ));
            *expected
                .entry((cus.clone(), "api_calls".to_owned()))
                .or_insert(0.0) += 1.0;
        }
    }
    let windows = events.len() as f64;
    produce_events(&ns, &events).await;

    // A third of the windows in Stripe: all three replicas have been sending.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    while units_in_stripe(&standin).await < windows / 3.0 {
        assert!(
            Instant::now() < deadline,
            "a third of the windows in stripe"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (i, replica) in replicas.iter().enumerate() {
        assert!(
            accepted(replica).await > 0,
            "replica {i} sends too: the three share the work"
        );
    }
    eprintln!(
        "a third of the windows in stripe after {:?}",
        started.elapsed()
    );
    // One dies mid-second (SIGKILL, its claims and slots left behind), one joins.
    replicas.remove(0).kill().await;
    replicas.push(sink(&ns, &standin).await);

    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let totals = standin.totals().await;
        if totals == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stripe's totals equal the events sent: {} of {} customers differ",
            expected
                .iter()
                .filter(|(k, v)| totals.get(*k) != Some(*v))
                .count(),
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("every total in stripe after {:?}", started.elapsed());
    assert!(
        accepted(&replicas[2]).await > 0,
        "the replica added mid-run sends too"
    );
    let inspect = standin.inspect().await;
    let mut times: Vec<i64> = inspect["meter_request_times_ms"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t.as_i64())
        .collect();
    times.sort_unstable();
    let requests = times.len();
    assert!(
        requests >= events.len(),
        "every window was sent at least once: {requests} requests"
    );
    eprintln!(
        "first requests (ms from the first): {:?}",
        times
            .iter()
            .take(30)
            .map(|t| t - times[0])
            .collect::<Vec<_>>()
    );
    let busiest = inspect["meter_requests_in_busiest_second"]
        .as_u64()
        .expect("the stand-in counts the busiest second");
    assert!(
        busiest <= u64::from(LIMIT),
        "the account saw {busiest} meter event requests within one second (limit {LIMIT}/s); \
         the gaps between requests there (ms): {:?}",
        busiest_span_gaps(&times, busiest as usize)
    );
    eprintln!(
        "first requests (ms from the first): {:?}",
        times
            .iter()
            .take(30)
            .map(|t| t - times[0])
            .collect::<Vec<_>>()
    );
    eprintln!(
        "{requests} meter event requests over {} ms, at most {busiest} in any one second",
        times.last().unwrap_or(&0) - times.first().unwrap_or(&0)
    );
    ns.drop_databases().await;
}
