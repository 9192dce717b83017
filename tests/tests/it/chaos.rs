//! The chaos run: the whole pipeline (raw events on Kafka -> aggregator -> ClickHouse and
//! `usage.windows` -> stripe-sink -> the local Stripe) under load and faults at once. A
//! generator writes a stream of events over many customers and three meters, with 5% of the
//! messages repeating an earlier event id and 2% of the events arriving minutes late, into
//! one-minute windows with no grace period, so that windows fall due, get published and get
//! corrected while the run goes on. Meanwhile a controller SIGKILLs and restarts the
//! aggregator and the sink several times and restarts the Kafka broker and the ClickHouse
//! server once each (private instances: the shared stack is not disturbed), and Stripe answers
//! 10% of meter events with 429, 2% with 500 and lets 1% run past the sink's timeout. When it
//! settles, every (customer, meter, window) total in Stripe equals the generator's ground
//! truth: nothing lost, nothing twice.
//!
//! Small by default (20,000 events); `METERLINE_CHAOS_EVENTS=1000000` runs the same test at a
//! million. The summary is printed and written to `target/test-logs/chaos-summary-<n>.txt`.
//!
//! With `METERLINE_TEST_CLICKHOUSE=cluster` the ClickHouse is a private 2-shard x 2-replica
//! cluster instead, and its fault is one node SIGKILLed (a replica of the shard that node 1,
//! which answers the services, does not hold) and restarted; the summary then goes to
//! `chaos-summary-cluster-<n>.txt`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meterline_common::kafka::producer_config;
use meterline_schemas::Topic;
use meterline_tests::api::{post_json, token};
use meterline_tests::private::{PrivateClickhouse, PrivateClickhouseCluster, PrivateKafka};
use meterline_tests::standin::Standin;
use meterline_tests::stripe_config::put_sync_config;
use meterline_tests::usage::{create_meter, event, window_minutes_since_epoch};
use meterline_tests::{Namespace, ServiceProcess, Stack};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use time::OffsetDateTime;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

const TENANT: &str = "tenant_chaos";
const ENVIRONMENT: &str = "env_prod";
const CUSTOMERS: u64 = 50;
/// Requests per second the sink may send, and the stand-in account's own limit.
const RATE: u32 = 100;
const WINDOW_SECONDS: i64 = 60;
/// Our meter id, the Stripe meter's event name.
const METERS: [(&str, &str); 3] = [
    ("calls", "api_calls"),
    ("tokens", "tokens_used"),
    ("searches", "searches"),
];
const DEFAULT_EVENTS: u64 = 20_000;
/// The stream is spread over at least this long, so that windows fall due during it.
const MIN_GENERATION: Duration = Duration::from_secs(75);
/// The fastest the generator writes: a million events then take about 7 minutes.
const MAX_EVENTS_PER_SECOND: u64 = 2_500;

/// How many messages to send (`METERLINE_CHAOS_EVENTS`, duplicates included).
fn events_wanted() -> u64 {
    match std::env::var("METERLINE_CHAOS_EVENTS") {
        Ok(raw) => raw.trim().parse().unwrap_or_else(|_| {
            panic!("METERLINE_CHAOS_EVENTS must be a whole number of events, got {raw:?}")
        }),
        Err(_) => DEFAULT_EVENTS,
    }
}

/// SplitMix64: a reproducible stream of draws without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// A draw in `0..n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `per_mille`/1000.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The content of distinct event `i`, a pure function of `i`: a repeated id always carries
/// the same customer, tokens and path, as a client retry does.
struct Content {
    customer: String,
    tokens: i64,
    search: bool,
}

fn content(i: u64) -> Content {
    let h = mix(i ^ 0x5eed);
    Content {
        customer: format!("cust_{:03}", h % CUSTOMERS),
        tokens: ((h >> 16) % 50) as i64 + 1,
        search: (h >> 32).is_multiple_of(4),
    }
}

fn raw_event(i: u64, at_ms: i64) -> meterline_schemas::RawUsageEvent {
    let c = content(i);
    let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
        .expect("a valid instant");
    let path = if c.search { "/v1/search" } else { "/v1/items" };
    event(
        TENANT,
        &format!("chaos-{i}"),
        &c.customer,
        "api.request",
        at,
        json!({"tokens": c.tokens, "path": path}),
    )
}

/// (external customer id, meter id, window start in Unix seconds).
type WindowKey = (String, &'static str, i64);

/// What the generator sent, and the totals Stripe must end up with.
#[derive(Default)]
struct Generated {
    sent: u64,
    distinct: u64,
    duplicates: u64,
    late: u64,
    on_boundary: u64,
    truth: BTreeMap<WindowKey, i64>,
}

impl Generated {
    fn count(&mut self, i: u64, at_ms: i64) {
        let c = content(i);
        let window = (at_ms.div_euclid(1000)).div_euclid(WINDOW_SECONDS) * WINDOW_SECONDS;
        let mut add = |meter: &'static str, q: i64| {
            *self
                .truth
                .entry((c.customer.clone(), meter, window))
                .or_default() += q;
        };
        add("calls", 1);
        add("tokens", c.tokens);
        if c.search {
            add("searches", 1);
        }
    }
}

fn now_ms() -> i64 {
    (OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Writes `total` messages to `usage.raw` at an even pace over `over`, without waiting for
/// each chunk's delivery (a broker restart must not pause the stream; librdkafka holds what
/// it cannot deliver yet).
async fn generate(
    producer: FutureProducer,
    topic: String,
    total: u64,
    over: Duration,
) -> Generated {
    let mut rng = Rng(0xc4a0_5eed);
    let mut generated = Generated::default();
    // (distinct index, timestamp) of every event sent: what a duplicate repeats.
    let mut sent: Vec<(u64, i64)> = Vec::new();
    let mut deliveries: Vec<JoinHandle<Result<(), String>>> = Vec::new();
    let start = Instant::now();
    while generated.sent < total {
        let due = ((start.elapsed().as_secs_f64() / over.as_secs_f64()) * total as f64)
            .ceil()
            .min(total as f64) as u64;
        let mut chunk = Vec::new();
        while generated.sent < due {
            let now = now_ms();
            let (i, at_ms) = if !sent.is_empty() && rng.chance(50) {
                generated.duplicates += 1;
                sent[rng.below(sent.len() as u64) as usize]
            } else {
                let i = generated.distinct;
                generated.distinct += 1;
                let minute = now.div_euclid(60_000) * 60_000;
                let at_ms = if rng.chance(20) {
                    // Late: one to four minutes back, into windows already published.
                    generated.late += 1;
                    now - 60_000 - rng.below(180_000) as i64
                } else if rng.chance(10) {
                    // Exactly on the boundary (the new window), or its last millisecond before.
                    generated.on_boundary += 1;
                    if rng.chance(500) {
                        minute
                    } else {
                        minute - 1
                    }
                } else {
                    // Now, or a few seconds ago: near a boundary it lands in the window before.
                    now - rng.below(4_000) as i64
                };
                generated.count(i, at_ms);
                sent.push((i, at_ms));
                (i, at_ms)
            };
            generated.sent += 1;
            let e = raw_event(i, at_ms);
            chunk.push((e.kafka_key(), e.to_json_bytes()));
        }
        if !chunk.is_empty() {
            let producer = producer.clone();
            let topic = topic.clone();
            deliveries.push(tokio::spawn(async move {
                let sends = chunk.iter().map(|(key, payload)| {
                    producer.send(
                        FutureRecord::to(&topic).key(key).payload(payload),
                        Duration::from_secs(60),
                    )
                });
                for outcome in futures::future::join_all(sends).await {
                    outcome.map_err(|(e, _)| e.to_string())?;
                }
                Ok(())
            }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for delivery in deliveries {
        if let Err(e) = delivery.await.expect("a delivery task") {
            panic!("an event was not delivered to usage.raw: {e}");
        }
    }
    generated
}

/// The services the controller kills, and how often it did what.
struct Services {
    ns: Namespace,
    standin_base: String,
    aggregator: Option<ServiceProcess>,
    sink: Option<ServiceProcess>,
    aggregator_kills: u32,
    sink_kills: u32,
    kafka_restarts: u32,
    clickhouse_restarts: u32,
    log: Vec<String>,
}

impl Services {
    async fn spawn_aggregator(&mut self) {
        let mut env = self.ns.env();
        for (k, v) in [
            ("STRIPE_SYNC_GRACE_PERIOD_MINUTES", "0"),
            ("AGGREGATOR_BATCH_MAX_WAIT_MS", "300"),
            ("AGGREGATOR_PUBLISH_INTERVAL_MS", "500"),
        ] {
            env.push((k.into(), v.into()));
        }
        self.aggregator = Some(ServiceProcess::spawn("aggregator", &env).await);
    }

    async fn spawn_sink(&mut self) {
        let mut env = self.ns.env();
        env.push(("STRIPE_API_BASE".into(), self.standin_base.clone()));
        // The injected slow answers (3 s) outlast this: the sink sees a timeout.
        env.push(("STRIPE_API_TIMEOUT_SECONDS".into(), "2".into()));
        env.push(("STRIPE_MAX_RETRIES".into(), "2".into()));
        self.sink = Some(ServiceProcess::spawn("stripe-sink", &env).await);
    }

    /// Fails the test when a service ended without being killed.
    fn check_alive(&mut self) {
        for service in [&mut self.aggregator, &mut self.sink].into_iter().flatten() {
            if let Some(status) = service.exited() {
                panic!(
                    "{} exited on its own with {status} during the chaos run:\n{}",
                    service.name,
                    service.log_tail()
                );
            }
        }
    }

    fn note(&mut self, started: Instant, what: &str) {
        let line = format!("{:>7.1}s {what}", started.elapsed().as_secs_f64());
        eprintln!("chaos: {line}");
        self.log.push(line);
    }
}

#[derive(Debug, Clone, Copy)]
enum Action {
    KillAggregator,
    KillSink,
    KillBoth,
    RestartKafka,
    RestartClickhouse,
}

/// The controller's plan, as fractions of the generation period.
const SCHEDULE: [(f64, Action); 9] = [
    (0.10, Action::KillAggregator),
    (0.20, Action::KillSink),
    (0.30, Action::RestartKafka),
    (0.45, Action::KillAggregator),
    (0.55, Action::RestartClickhouse),
    (0.68, Action::KillSink),
    (0.80, Action::KillBoth),
    (0.92, Action::KillAggregator),
    // Just after the stream ended, while the windows of its last minute are not due yet:
    // the sink dies with work still coming.
    (1.01, Action::KillSink),
];

/// The run's private ClickHouse: one server, or a cluster (`METERLINE_TEST_CLICKHOUSE`).
enum Warehouse {
    Single(PrivateClickhouse),
    Cluster(PrivateClickhouseCluster),
}

/// The cluster node the fault hits: a replica of shard 2, not node 1 (the services' server).
const LOST_NODE: usize = 3;

impl Warehouse {
    async fn start() -> Warehouse {
        if Stack::get().clickhouse_cluster.is_some() {
            Warehouse::Cluster(PrivateClickhouseCluster::start().await)
        } else {
            Warehouse::Single(PrivateClickhouse::start().await)
        }
    }

    fn configure(&self, ns: &mut Namespace) {
        match self {
            Warehouse::Single(server) => {
                ns.clickhouse.url = server.url();
                ns.clickhouse.cluster = None;
            }
            Warehouse::Cluster(cluster) => {
                ns.clickhouse.url = cluster.url(1);
                ns.clickhouse.cluster = Some(cluster.settings());
            }
        }
    }

    /// Takes the server (or one node) down, for what the note says.
    async fn stop(&self) -> &'static str {
        match self {
            Warehouse::Single(server) => {
                server.stop().await;
                "clickhouse server stopped"
            }
            Warehouse::Cluster(cluster) => {
                cluster.kill(LOST_NODE);
                "clickhouse cluster node 3 of 4 SIGKILLed"
            }
        }
    }

    async fn resume(&self) -> &'static str {
        match self {
            Warehouse::Single(server) => {
                server.resume().await;
                "clickhouse server started again"
            }
            Warehouse::Cluster(cluster) => {
                cluster.resume(LOST_NODE).await;
                "clickhouse cluster node 3 started again"
            }
        }
    }

    fn summary_name(&self, events: u64) -> String {
        match self {
            Warehouse::Single(_) => format!("chaos-summary-{events}.txt"),
            Warehouse::Cluster(_) => format!("chaos-summary-cluster-{events}.txt"),
        }
    }
}

async fn control(
    services: Arc<Mutex<Services>>,
    kafka: Arc<PrivateKafka>,
    clickhouse: Arc<Warehouse>,
    generation: Duration,
    started: Instant,
) {
    for (at, action) in SCHEDULE {
        let when = started + generation.mul_f64(at);
        while Instant::now() < when {
            services.lock().await.check_alive();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let mut s = services.lock().await;
        s.check_alive();
        match action {
            Action::KillAggregator => {
                s.aggregator.take().expect("an aggregator").kill().await;
                s.aggregator_kills += 1;
                s.note(started, "SIGKILL aggregator");
                tokio::time::sleep(Duration::from_millis(300)).await;
                s.spawn_aggregator().await;
                s.note(started, "aggregator restarted");
            }
            Action::KillSink => {
                s.sink.take().expect("a sink").kill().await;
                s.sink_kills += 1;
                s.note(started, "SIGKILL stripe-sink");
                tokio::time::sleep(Duration::from_millis(300)).await;
                s.spawn_sink().await;
                s.note(started, "stripe-sink restarted");
            }
            Action::KillBoth => {
                s.aggregator.take().expect("an aggregator").kill().await;
                s.sink.take().expect("a sink").kill().await;
                s.aggregator_kills += 1;
                s.sink_kills += 1;
                s.note(started, "SIGKILL aggregator and stripe-sink");
                tokio::time::sleep(Duration::from_millis(300)).await;
                s.spawn_aggregator().await;
                s.spawn_sink().await;
                s.note(started, "aggregator and stripe-sink restarted");
            }
            Action::RestartKafka => {
                drop(s);
                kafka.stop().await;
                services.lock().await.note(started, "kafka broker stopped");
                tokio::time::sleep(Duration::from_secs(3)).await;
                kafka.resume().await;
                let mut s = services.lock().await;
                s.kafka_restarts += 1;
                s.note(started, "kafka broker started again");
            }
            Action::RestartClickhouse => {
                drop(s);
                let stopped = clickhouse.stop().await;
                services.lock().await.note(started, stopped);
                tokio::time::sleep(Duration::from_secs(3)).await;
                let resumed = clickhouse.resume().await;
                let mut s = services.lock().await;
                s.clickhouse_restarts += 1;
                s.note(started, resumed);
            }
        }
    }
}

/// Stripe's counted meter events summed per (customer, event name, window), from the
/// stand-in's record, with how many meter events were counted and how many were negative.
async fn stripe_windows(standin: &Standin) -> (BTreeMap<(String, String, i64), i64>, u64, u64) {
    let inspect = standin.inspect().await;
    let mut totals = BTreeMap::new();
    let (mut counted, mut negative) = (0, 0);
    for e in inspect["meter_events"].as_array().into_iter().flatten() {
        if e["counted"] != json!(true) || e["cancelled"] == json!(true) {
            continue;
        }
        let value = e["value"].as_i64().expect("a whole value");
        let timestamp = e["timestamp"].as_i64().expect("a timestamp");
        let key = (
            e["customer"].as_str().unwrap_or_default().to_owned(),
            e["event_name"].as_str().unwrap_or_default().to_owned(),
            timestamp.div_euclid(WINDOW_SECONDS) * WINDOW_SECONDS,
        );
        *totals.entry(key).or_default() += value;
        counted += 1;
        if value < 0 {
            negative += 1;
        }
    }
    (totals, counted, negative)
}

/// The differences between what Stripe holds and the truth, one line each.
fn differences(
    expected: &BTreeMap<(String, String, i64), i64>,
    got: &BTreeMap<(String, String, i64), i64>,
) -> Vec<String> {
    let keys: BTreeSet<_> = expected.keys().chain(got.keys()).collect();
    keys.into_iter()
        .filter(|k| expected.get(*k) != got.get(*k))
        .map(|k| {
            format!(
                "{} {} window {}: truth {:?}, stripe {:?}",
                k.0,
                k.1,
                k.2,
                expected.get(k),
                got.get(k)
            )
        })
        .collect()
}

#[tokio::test]
async fn every_window_total_reaches_stripe_once_through_kills_restarts_and_faults() {
    let total = events_wanted();
    let generation = MIN_GENERATION.max(Duration::from_secs(total / MAX_EVENTS_PER_SECOND));
    let run_started = Instant::now();

    // Private Kafka and ClickHouse (restarted below), the shared PostgreSQL.
    let (kafka, clickhouse) = tokio::join!(PrivateKafka::start(), Warehouse::start());
    let (kafka, clickhouse) = (Arc::new(kafka), Arc::new(clickhouse));
    let mut ns = Namespace::plan(&kafka.brokers(), &Stack::get().database_url);
    clickhouse.configure(&mut ns);
    ns.create_topics().await;
    ns.create_databases().await;

    let standin = Standin::start(RATE).await;
    let mut stripe_meters = BTreeMap::new();
    for (_, event_name) in METERS {
        stripe_meters.insert(event_name, standin.sum_meter(event_name).await);
    }
    let mut customers = BTreeMap::new();
    for c in 0..CUSTOMERS {
        let external = format!("cust_{c:03}");
        let cus = standin.customer(&external).await;
        customers.insert(external, cus);
    }
    create_meter(
        &ns,
        TENANT,
        ENVIRONMENT,
        json!({"id": "calls", "event_name": "api.request", "aggregation": "COUNT"}),
    )
    .await;
    create_meter(&ns, TENANT, ENVIRONMENT, json!({"id": "tokens", "event_name": "api.request", "aggregation": "SUM", "property": "tokens"})).await;
    create_meter(&ns, TENANT, ENVIRONMENT, json!({"id": "searches", "event_name": "api.request", "aggregation": "COUNT", "filters": [{"property": "path", "in": ["/v1/search"]}]})).await;
    // One-minute windows (the sizes table allows them; the config API's floor is 5 minutes,
    // which would make a small run wait minutes for each window). The stored config keeps
    // its smallest valid size: the sink reads windows from usage.windows, not from it.
    window_minutes_since_epoch(&ns, TENANT, ENVIRONMENT, 1).await;
    put_sync_config(&ns, TENANT, ENVIRONMENT, &[], 5, Some(RATE)).await;

    let services = Arc::new(Mutex::new(Services {
        ns: ns.clone(),
        standin_base: standin.base.clone(),
        aggregator: None,
        sink: None,
        aggregator_kills: 0,
        sink_kills: 0,
        kafka_restarts: 0,
        clickhouse_restarts: 0,
        log: Vec::new(),
    }));
    {
        let mut s = services.lock().await;
        s.spawn_aggregator().await;
        s.spawn_sink().await;
        let sink = s.sink.as_ref().expect("the sink");
        let t = token(TENANT, ENVIRONMENT);
        for (meter, event_name) in METERS {
            let answer = post_json(
                &sink.url("/v1/stripe/meters/mapping"),
                &t,
                &json!({"meter_id": meter, "provider_type": "stripe",
                        "provider_meter_id": event_name, "sync_enabled": true}),
            )
            .await;
            assert_eq!(answer.status, 201, "{:?}", answer.body);
        }
        for (external, cus) in &customers {
            let answer = post_json(
                &sink.url("/v1/stripe/customers/mapping"),
                &t,
                &json!({"customer_id": external, "provider_customer_id": cus}),
            )
            .await;
            assert_eq!(answer.status, 201, "{:?}", answer.body);
        }
    }
    standin
        .control(
            "faults",
            json!({"rate_429": 0.10, "rate_500": 0.02, "rate_slow": 0.01, "slow_ms": 3000,
                   "path_prefix": "/v1/billing/meter_events", "seed": 9}),
        )
        .await;
    let setup = run_started.elapsed();

    // The stream and the chaos, side by side.
    let started = Instant::now();
    let producer: FutureProducer =
        producer_config(&ns.kafka, "chaos-generator", Duration::from_secs(300))
            .set("queue.buffering.max.messages", "2000000")
            .create()
            .expect("creating the generator's producer");
    let (generated, ()) = tokio::join!(
        generate(producer, ns.topic(Topic::UsageRaw), total, generation),
        control(
            services.clone(),
            kafka.clone(),
            clickhouse.clone(),
            generation,
            started
        ),
    );
    let generated_in = started.elapsed();

    // Settle: Stripe's totals per (customer, meter, window) reach the truth.
    let expected: BTreeMap<(String, String, i64), i64> = generated
        .truth
        .iter()
        .map(|((customer, meter, window), q)| {
            let event_name = METERS
                .iter()
                .find(|(m, _)| m == meter)
                .map(|(_, e)| (*e).to_owned())
                .expect("a known meter");
            ((customers[customer].clone(), event_name, *window), *q)
        })
        .collect();
    let settle_within = Duration::from_secs(300 + total / 1_000);
    let deadline = Instant::now() + settle_within;
    loop {
        services.lock().await.check_alive();
        let (got, _, _) = stripe_windows(&standin).await;
        if got == expected {
            break;
        }
        if Instant::now() > deadline {
            let wrong = differences(&expected, &got);
            let s = services.lock().await;
            let sink = s.sink.as_ref().expect("the sink");
            let status = reqwest::Client::new()
                .get(sink.url("/v1/stripe/sync/status"))
                .bearer_auth(token(TENANT, ENVIRONMENT))
                .send()
                .await
                .expect("the sink answers")
                .text()
                .await
                .unwrap_or_default();
            panic!(
                "stripe's window totals differ from the truth {settle_within:?} after the stream \
                 ended: {} of {} windows wrong:\n{}\nsink status: {status}\nchaos log:\n{}",
                wrong.len(),
                expected.len(),
                wrong
                    .iter()
                    .take(40)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n"),
                s.log.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let settled_in = started.elapsed();

    // Nothing more arrives later (a resend that was still under way would count twice).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (got, counted, negative) = stripe_windows(&standin).await;
    let wrong = differences(&expected, &got);
    assert!(
        wrong.is_empty(),
        "after settling, stripe changed:\n{}",
        wrong.join("\n")
    );

    let faults = standin.faults_injected().await;
    standin.control("faults", json!({})).await;
    // The same totals through Stripe's own API: one meter event summary per window.
    for ((cus, event_name, window), q) in &expected {
        let summarised = standin
            .summarised_total(
                &stripe_meters[event_name.as_str()],
                cus,
                *window,
                window + WINDOW_SECONDS,
            )
            .await;
        assert_eq!(
            summarised, *q as f64,
            "meter event summary of {cus} {event_name} window {window}"
        );
    }
    let inspect = standin.inspect().await;
    for c in inspect["concurrency"].as_array().into_iter().flatten() {
        assert!(
            c["max_concurrent"].as_u64().unwrap_or(0) <= 1,
            "two meter events in flight for one customer and meter: {c}"
        );
    }
    let requests: u64 = inspect["requests_per_second"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["count"].as_u64().unwrap_or(0))
        .sum();

    let s = services.lock().await;
    let mut by_meter = String::new();
    for (meter, event_name) in METERS {
        let units: i64 = expected
            .iter()
            .filter(|((_, e, _), _)| e == event_name)
            .map(|(_, q)| q)
            .sum();
        let windows = expected.keys().filter(|(_, e, _)| e == event_name).count();
        let _ = write!(
            by_meter,
            "\n  {meter} ({event_name}): {units} units in {windows} windows"
        );
    }
    let summary = format!(
        "chaos run: {} messages ({} distinct events, {} duplicated ids, {} late by 1-4 min, \
         {} on a window boundary) over {} customers and {} meters, 1-minute windows, grace 0\n\
         chaos: aggregator SIGKILLed {} times, stripe-sink SIGKILLed {} times (each restarted), \
         kafka broker restarted {} time(s), clickhouse server restarted {} time(s)\n\
         stripe faults injected on meter events: {} x 429, {} x 500, {} slow past the sink's \
         timeout (3 s vs 2 s), {} dropped; {} stripe requests in all\n\
         stripe: {} meter events counted ({} negative corrections)\n\
         compared: {} (customer, meter, window) totals, all equal to the ground truth, \
         also through {} meter event summaries:{}\n\
         elapsed: setup {:.1}s, stream and controller done {:.1}s after the stream began, \
         totals equal at {:.1}s (checked from then on), total {:.1}s\n\
         timeline:\n  {}",
        generated.sent,
        generated.distinct,
        generated.duplicates,
        generated.late,
        generated.on_boundary,
        CUSTOMERS,
        METERS.len(),
        s.aggregator_kills,
        s.sink_kills,
        s.kafka_restarts,
        s.clickhouse_restarts,
        faults["too_many_requests"],
        faults["server_error"],
        faults["slow"],
        faults["dropped"],
        requests,
        counted,
        negative,
        expected.len(),
        expected.len(),
        by_meter,
        setup.as_secs_f64(),
        generated_in.as_secs_f64(),
        settled_in.as_secs_f64(),
        run_started.elapsed().as_secs_f64(),
        s.log.join("\n  "),
    );
    println!("{summary}");
    let path = meterline_tests::process::bin_dir()
        .join("../test-logs")
        .join(clickhouse.summary_name(total));
    let _ = std::fs::create_dir_all(path.parent().expect("a folder"));
    std::fs::write(&path, format!("{summary}\n")).expect("writing the summary");
    assert_eq!(s.aggregator_kills, 4);
    assert_eq!(s.sink_kills, 4);
    assert_eq!((s.kafka_restarts, s.clickhouse_restarts), (1, 1));
    drop(s);
    ns.drop_databases().await;
}
