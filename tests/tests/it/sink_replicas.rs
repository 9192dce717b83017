//! Several stripe-sink replicas on one Stripe account: together they stay under the account's
//! rate limit in every one-second span (Stripe limits the account, not a process), through a
//! replica SIGKILLed mid-send and a replica added, and every total still equals the truth;
//! one replica's outage opens the account's circuit breaker for a replica that never failed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meterline_tests::api::{post_json, send, token};
use meterline_tests::standin::Standin;
use meterline_tests::usage::{event, hour_start, produce_events, spawn_aggregator};
use meterline_tests::{Namespace, ServiceProcess};
use serde_json::json;

use crate::sink::{calls_meter, sink_retrying};

const TENANT: &str = "tenant_replicas";

/// A replica whose claims run out soon after it dies: no retries within a claim keep its lease
/// (and so a killed replica's hold on its customers' next windows) at 38 s.
async fn sink(ns: &Namespace, standin: &Standin) -> ServiceProcess {
    sink_retrying(ns, standin, 0).await
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

/// The stand-in's account limit in these tests (test mode's).
const LIMIT: u32 = 25;

/// A namespace, a stand-in whose account allows [`LIMIT`] requests a second, `replicas` sink
/// replicas, and the tenant configured through them (each call to another replica: they all
/// read the same PostgreSQL) with `customers` customers mapped.
struct Fleet {
    ns: Namespace,
    standin: Standin,
    replicas: Vec<ServiceProcess>,
    /// External id -> Stripe customer id.
    customers: BTreeMap<String, String>,
}

impl Fleet {
    async fn start(replicas: usize, customers: usize) -> Fleet {
        let ns = Namespace::create().await;
        let standin = Standin::start(LIMIT).await;
        standin.sum_meter("api_calls").await;
        calls_meter(&ns, TENANT).await;
        let mut mapped = BTreeMap::new();
        for i in 0..customers {
            let external = format!("cust_{i:02}");
            mapped.insert(external.clone(), standin.customer(&external).await);
        }
        let mut sinks = Vec::new();
        for _ in 0..replicas {
            sinks.push(sink(&ns, &standin).await);
        }
        let replica = |n: usize| &sinks[n % sinks.len()];
        let t = token(TENANT, "env_prod");
        let config = send(
            reqwest::Client::new()
                .put(replica(0).url("/v1/stripe/config"))
                .bearer_auth(&t)
                .json(&json!({"api_key": standin.key, "sync_enabled": true,
                              "rate_limit_per_second": LIMIT})),
        )
        .await;
        assert_eq!(config.status, 200, "{:?}", config.body);
        let answer = post_json(
            &replica(1).url("/v1/stripe/meters/mapping"),
            &t,
            &json!({"meter_id": "calls", "provider_meter_id": "api_calls", "sync_enabled": true}),
        )
        .await;
        assert_eq!(answer.status, 201, "{:?}", answer.body);
        for (external, cus) in &mapped {
            let answer = post_json(
                &replica(2).url("/v1/stripe/customers/mapping"),
                &t,
                &json!({"customer_id": external, "provider_customer_id": cus}),
            )
            .await;
            assert_eq!(answer.status, 201, "{:?}", answer.body);
        }
        Fleet {
            ns,
            standin,
            replicas: sinks,
            customers: mapped,
        }
    }

    /// One call of each customer in each of the hourly windows `hours` ago, produced to raw
    /// usage; Stripe's total per customer that equals it.
    async fn send_windows(
        &self,
        hours: std::ops::RangeInclusive<i64>,
    ) -> (usize, BTreeMap<(String, String), f64>) {
        let mut events = Vec::new();
        let mut expected = BTreeMap::new();
        for (n, (external, cus)) in self.customers.iter().enumerate() {
            for hours_ago in hours.clone() {
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
        produce_events(&self.ns, &events).await;
        (events.len(), expected)
    }

    /// Waits until Stripe's totals equal `expected`.
    async fn until_stripe_holds(&self, expected: &BTreeMap<(String, String), f64>) {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let totals = self.standin.totals().await;
            if &totals == expected {
                return;
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
    }

    /// When each meter event request reached the stand-in (its clock, ms), in order.
    async fn meter_request_times(&self) -> Vec<i64> {
        let inspect = self.standin.inspect().await;
        let mut times: Vec<i64> = inspect["meter_request_times_ms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_i64())
            .collect();
        times.sort_unstable();
        times
    }
}

// Two threads: the stand-in stamps each request's arrival in this process, and on one
// thread it would wait while the test parses the stand-in's answers (seen: 100 ms stalls,
// then requests stamped together).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_replicas_share_the_accounts_rate_limit_through_a_kill_and_a_new_replica() {
    // 30 customers x 13 hourly windows: 390 meter events, about 17 s at the limit.
    let mut fleet = Fleet::start(3, 30).await;
    let _aggregator = spawn_aggregator(&fleet.ns, &[]).await;
    let (windows, expected) = fleet.send_windows(2..=14).await;

    // A third of the windows in Stripe: all three replicas have been sending.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    while units_in_stripe(&fleet.standin).await < windows as f64 / 3.0 {
        assert!(
            Instant::now() < deadline,
            "a third of the windows in stripe"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (i, replica) in fleet.replicas.iter().enumerate() {
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
    fleet.replicas.remove(0).kill().await;
    let joined = sink(&fleet.ns, &fleet.standin).await;
    fleet.replicas.push(joined);

    fleet.until_stripe_holds(&expected).await;
    eprintln!("every total in stripe after {:?}", started.elapsed());
    assert!(
        accepted(&fleet.replicas[2]).await > 0,
        "the replica added mid-run sends too"
    );
    let times = fleet.meter_request_times().await;
    let requests = times.len();
    assert!(
        requests >= windows,
        "every window was sent at least once: {requests} requests"
    );
    let busiest = fleet.standin.inspect().await["meter_requests_in_busiest_second"]
        .as_u64()
        .expect("the stand-in counts the busiest second");
    assert!(
        busiest <= u64::from(LIMIT),
        "the account saw {busiest} meter event requests within one second (limit {LIMIT}/s); \
         the gaps between requests there (ms): {:?}",
        busiest_span_gaps(&times, busiest as usize)
    );
    eprintln!(
        "{requests} meter event requests over {} ms, at most {busiest} in any one second",
        times.last().unwrap_or(&0) - times.first().unwrap_or(&0)
    );
    fleet.ns.drop_databases().await;
}

/// Meter event requests this replica held back because the account's breaker was open
/// (`stripe_sink_stripe_requests_total{outcome="circuit_open"}`).
async fn held_by_the_breaker(sink: &ServiceProcess) -> u64 {
    sink.metrics()
        .await
        .lines()
        .find_map(|l| {
            l.strip_prefix("stripe_sink_stripe_requests_total{outcome=\"circuit_open\"} ")
        })
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replicas_outage_opens_the_accounts_breaker_for_a_replica_that_never_failed() {
    // One replica meets an outage: every meter event outlives the sink's 2 s time limit.
    let mut fleet = Fleet::start(1, 10).await;
    fleet
        .standin
        .control(
            "faults",
            json!({"path_prefix": "/v1/billing/meter_events", "rate_slow": 1.0, "slow_ms": 3000}),
        )
        .await;
    let _aggregator = spawn_aggregator(&fleet.ns, &[]).await;
    let (_, expected) = fleet.send_windows(2..=4).await;
    // Ten timeouts in a row open its breaker, for the account: the shared row says until when.
    let pg = fleet.ns.pg_pool().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let open_until_ms = loop {
        let open: Option<(f64,)> = sqlx::query_as(
            "SELECT extract(epoch FROM open_until)::float8 * 1000 FROM stripe_account_pacing
             WHERE open_until > clock_timestamp()",
        )
        .fetch_optional(&pg)
        .await
        .expect("reading the shared breaker");
        if let Some((ms,)) = open {
            break ms as i64;
        }
        assert!(Instant::now() < deadline, "the outage opens the breaker");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Stripe recovers; the replica that saw the outage dies, and one that has seen no
    // failure takes over while the breaker is open, with new windows falling due.
    fleet.standin.control("faults", json!({})).await;
    fleet.replicas.remove(0).kill().await;
    let joined = sink(&fleet.ns, &fleet.standin).await;
    fleet.replicas.push(joined);
    let (_, more) = fleet.send_windows(5..=6).await;
    let mut expected = expected;
    for (customer, units) in more {
        *expected.entry(customer).or_insert(0.0) += units;
    }
    let opened_ms = open_until_ms - 15_000;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as i64;
    let until_closed = (open_until_ms - now_ms).max(0) as u64;
    tokio::time::sleep(Duration::from_millis(until_closed)).await;
    assert!(
        held_by_the_breaker(&fleet.replicas[0]).await > 0,
        "the new replica had windows to send and was held back by the breaker it shares"
    );
    // Nothing reached Stripe while the breaker was open (after the requests already on
    // their way when it opened), from either replica.
    let times = fleet.meter_request_times().await;
    let while_open: Vec<i64> = times
        .iter()
        .filter(|t| (opened_ms + 500..open_until_ms - 100).contains(*t))
        .map(|t| t - opened_ms)
        .collect();
    assert!(
        while_open.is_empty(),
        "meter events reached stripe while the breaker was open (ms after it opened): {while_open:?}"
    );
    // After the cool-down its probe succeeds, the breaker closes, and every total arrives
    // exactly once (the dead replica's claims once their leases ran out).
    fleet.until_stripe_holds(&expected).await;
    let closed: (bool,) = sqlx::query_as("SELECT open_until IS NULL FROM stripe_account_pacing")
        .fetch_one(&pg)
        .await
        .expect("reading the shared breaker");
    assert!(closed.0, "the successful probe closed the shared breaker");
    fleet.ns.drop_databases().await;
}
