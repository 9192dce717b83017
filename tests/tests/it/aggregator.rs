//! The aggregator on the real stack: events written to `usage.raw` become deduplicated rows
//! in ClickHouse and window totals on `usage.windows` that equal a ground truth computed
//! here, through duplicates, late events, window boundaries, bad messages, a SIGKILL in the
//! middle of a stream, and two replicas.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use meterline_schemas::{
    BillingPeriod, Decimal, JobId, RawUsageEvent, ResyncRequest, TimeRange, Timestamp, Topic,
    WindowReason,
};
use meterline_tests::kafka::read_topic;
use meterline_tests::private::PrivateClickhouseCluster;
use meterline_tests::usage::{
    create_meter, event, hour_start, produce_events, produce_raw, spawn_aggregator, Expected,
    WindowWatcher,
};
use meterline_tests::{Namespace, Stack};
use rdkafka::message::Headers;
use serde_json::json;
use time::OffsetDateTime;

const TENANT: &str = "tenant_agg";

fn dec(s: &str) -> Decimal {
    s.parse().unwrap()
}

fn minutes(m: i64) -> time::Duration {
    time::Duration::minutes(m)
}

fn key(customer: &str, meter: &str, start: OffsetDateTime) -> (String, String, i64) {
    (customer.into(), meter.into(), start.unix_timestamp())
}

#[tokio::test]
async fn totals_equal_the_ground_truth_for_every_aggregation() {
    let ns = Namespace::create().await;
    ns.stop_merges().await;
    let aggregator = spawn_aggregator(&ns, &[]).await;
    // Meters created after the aggregator started: they apply without a restart.
    for meter in [
        json!({"id": "calls", "event_name": "api.request", "aggregation": "COUNT"}),
        json!({"id": "bytes", "event_name": "api.request", "aggregation": "SUM", "property": "bytes"}),
        json!({"id": "peak", "event_name": "api.request", "aggregation": "MAX", "property": "latency_ms"}),
        json!({"id": "users", "event_name": "api.request", "aggregation": "COUNT_UNIQUE", "property": "user"}),
        json!({"id": "seats", "event_name": "seats.updated", "aggregation": "LATEST", "property": "seats"}),
    ] {
        create_meter(&ns, TENANT, "env_prod", meter).await;
    }
    let w0 = hour_start(5);
    let w1 = w0 + time::Duration::HOUR;
    let e = |id: &str, customer: &str, name: &str, at, props| {
        event(TENANT, id, customer, name, at, props)
    };
    let first = e(
        "a1",
        "cust_a",
        "api.request",
        w0 + minutes(1),
        json!({"bytes": 10, "latency_ms": 5, "user": "u1"}),
    );
    let events = vec![
        first.clone(),
        e(
            "a2",
            "cust_a",
            "api.request",
            w0 + minutes(20),
            json!({"bytes": "20.5", "latency_ms": 50, "user": "u2"}),
        ),
        e(
            "a3",
            "cust_a",
            "api.request",
            w1 - time::Duration::SECOND,
            json!({"bytes": 30, "latency_ms": 7, "user": "u1"}),
        ),
        // A client retry: the same id again.
        first.clone(),
        // Exactly at the end of W0: it belongs to W1.
        e(
            "a4",
            "cust_a",
            "api.request",
            w1,
            json!({"bytes": 1, "latency_ms": 3, "user": "u1"}),
        ),
        e(
            "b1",
            "cust_b",
            "seats.updated",
            w0 + minutes(10),
            json!({"seats": 5}),
        ),
        e(
            "b2",
            "cust_b",
            "seats.updated",
            w0 + minutes(50),
            json!({"seats": 3}),
        ),
        // Counts as a call and a user, but its bytes are unusable: dead-lettered for "bytes".
        e(
            "b3",
            "cust_b",
            "api.request",
            w0 + minutes(5),
            json!({"bytes": "lots", "user": "u9"}),
        ),
        // Matches no meter.
        e("c1", "cust_c", "other.event", w0 + minutes(5), json!({})),
    ];
    produce_events(&ns, &events).await;

    let mut expected: Expected = BTreeMap::from([
        (key("cust_a", "calls", w0), (dec("3"), 3)),
        (key("cust_a", "bytes", w0), (dec("60.5"), 3)),
        (key("cust_a", "peak", w0), (dec("50"), 3)),
        (key("cust_a", "users", w0), (dec("2"), 3)),
        (key("cust_a", "calls", w1), (dec("1"), 1)),
        (key("cust_a", "bytes", w1), (dec("1"), 1)),
        (key("cust_a", "peak", w1), (dec("3"), 1)),
        (key("cust_a", "users", w1), (dec("1"), 1)),
        (key("cust_b", "seats", w0), (dec("3"), 2)),
        (key("cust_b", "calls", w0), (dec("1"), 1)),
        (key("cust_b", "users", w0), (dec("1"), 1)),
    ]);
    // A maximum and a distinct count carry the billing period to date (for Stripe's `last`
    // formula): W1's include W0's events when both are in one calendar month.
    let one_period = BillingPeriod::containing(w0) == BillingPeriod::containing(w1);
    if one_period {
        expected.insert(key("cust_a", "peak", w1), (dec("50"), 4));
        expected.insert(key("cust_a", "users", w1), (dec("2"), 4));
    }
    let mut windows = WindowWatcher::new(&ns);
    windows.wait_for(&expected, Duration::from_secs(60)).await;
    for total in &windows.seen {
        assert_eq!(total.revision.get(), 1, "{total:?}");
        assert_eq!(total.reason, WindowReason::Due);
        assert!(!total.expired);
        assert_eq!(total.window.size_minutes(), 60);
    }

    // A late event for W0 of cust_a: the window goes out again, corrected, revision 2. With
    // it, the duplicate once more, in a later batch than the first copies and after its
    // window was published: a late event too, counted once still.
    produce_events(
        &ns,
        &[
            first.clone(),
            e(
                "a5",
                "cust_a",
                "api.request",
                w0 + minutes(30),
                json!({"bytes": 100, "latency_ms": 500, "user": "u3"}),
            ),
        ],
    )
    .await;
    expected.insert(key("cust_a", "calls", w0), (dec("4"), 4));
    expected.insert(key("cust_a", "bytes", w0), (dec("160.5"), 4));
    expected.insert(key("cust_a", "peak", w0), (dec("500"), 4));
    expected.insert(key("cust_a", "users", w0), (dec("3"), 4));
    if one_period {
        // The later window of the period carries the late event too, and goes out again.
        expected.insert(key("cust_a", "peak", w1), (dec("500"), 5));
        expected.insert(key("cust_a", "users", w1), (dec("3"), 5));
    }
    windows.wait_for(&expected, Duration::from_secs(60)).await;
    let latest = windows.latest();
    let late = &latest[&key("cust_a", "bytes", w0)];
    assert_eq!(
        (late.revision.get(), late.reason.clone()),
        (2, WindowReason::Late)
    );
    // Windows of additive meters the late event did not touch were not published again.
    assert_eq!(latest[&key("cust_a", "bytes", w1)].revision.get(), 1);
    assert_eq!(latest[&key("cust_a", "calls", w1)].revision.get(), 1);

    // The unusable value went to the dead-letter topic, bytes intact, reason in headers.
    let dead = read_topic(
        &ns,
        &ns.topic(Topic::UsageRaw)
            .replace("usage.raw", "usage.raw.dlq"),
        1,
        Duration::from_secs(30),
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(dead.len(), 1);
    let b3 = events.iter().find(|e| e.id.as_str() == "b3").unwrap();
    assert_eq!(dead[0].value, b3.to_json_bytes());

    let metrics = reqwest::get(aggregator.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("aggregator_events_rejected_total{reason=\"invalid_quantity\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("aggregator_events_unmetered_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("aggregator_late_events_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "aggregator_windows_published_total{{reason=\"late\"}} {}",
            if one_period { 6 } else { 4 }
        )),
        "{metrics}"
    );
    ns.drop_databases().await;
}

/// The storage issue's first-copy rule for every meter kind: copies of an event stamped in
/// the next window with other properties (an SDK stamping `now` and rebuilding the payload on
/// each retry) count nowhere but in the first copy's window, with the first copy's values:
/// in the same batch as the first copy and in a later one, after its window was published.
/// The SUM is fractional, the MAX, LATEST and COUNT_UNIQUE values of the copies would each
/// change a total, and the next window holds only its own event.
#[tokio::test]
async fn copies_stamped_at_another_time_count_once_in_the_first_copys_window_for_every_meter_kind()
{
    let ns = Namespace::create().await;
    let aggregator = spawn_aggregator(&ns, &[]).await;
    for meter in [
        json!({"id": "calls", "event_name": "api.request", "aggregation": "COUNT"}),
        json!({"id": "bytes", "event_name": "api.request", "aggregation": "SUM", "property": "bytes"}),
        json!({"id": "peak", "event_name": "api.request", "aggregation": "MAX", "property": "latency_ms"}),
        json!({"id": "users", "event_name": "api.request", "aggregation": "COUNT_UNIQUE", "property": "user"}),
        json!({"id": "seats", "event_name": "seats.updated", "aggregation": "LATEST", "property": "seats"}),
    ] {
        create_meter(&ns, TENANT, "env_prod", meter).await;
    }
    let w0 = hour_start(5);
    let w1 = w0 + time::Duration::HOUR;
    let call = |id: &str, at, bytes: &str, latency: u32, user: &str| {
        event(
            TENANT,
            id,
            "cust_a",
            "api.request",
            at,
            json!({"bytes": bytes, "latency_ms": latency, "user": user}),
        )
    };
    let seats = |id: &str, at, seats: u32| {
        event(
            TENANT,
            id,
            "cust_b",
            "seats.updated",
            at,
            json!({"seats": seats}),
        )
    };
    // Accepted by ingest `seconds` ago (copies of one millisecond are ordered by a hash).
    let ingested = |e: RawUsageEvent, seconds: i64| RawUsageEvent {
        ingested_at: Some(
            Timestamp::new(OffsetDateTime::now_utc() - time::Duration::seconds(seconds)).unwrap(),
        ),
        ..e
    };
    // First copies in W0, and in the same batch a retry of a1 stamped in W1, accepted later
    // and written first.
    produce_events(
        &ns,
        &[
            ingested(call("a1", w1 + minutes(5), "999.25", 900, "u9"), 10),
            ingested(call("a1", w0 + minutes(10), "20.5", 50, "u1"), 20),
            ingested(seats("b1", w0 + minutes(20), 5), 20),
        ],
    )
    .await;
    let mut expected: Expected = BTreeMap::from([
        (key("cust_a", "calls", w0), (dec("1"), 1)),
        (key("cust_a", "bytes", w0), (dec("20.5"), 1)),
        (key("cust_a", "peak", w0), (dec("50"), 1)),
        (key("cust_a", "users", w0), (dec("1"), 1)),
        (key("cust_b", "seats", w0), (dec("5"), 1)),
    ]);
    let mut windows = WindowWatcher::new(&ns);
    windows.wait_for(&expected, Duration::from_secs(60)).await;

    // After W0 was published: retries of a1 and b1 stamped in W1 with other values, and one
    // event of W1 of its own.
    produce_events(
        &ns,
        &[
            call("a1", w1 + minutes(20), "1000.75", 950, "u8"),
            seats("b1", w1 + minutes(30), 99),
            call("a2", w1 + minutes(40), "1.25", 7, "u2"),
        ],
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = aggregator.metrics().await;
        if metrics.contains("aggregator_copies_restamped_total 3") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the retries were not recognised: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    expected.extend([
        (key("cust_a", "calls", w1), (dec("1"), 1)),
        (key("cust_a", "bytes", w1), (dec("1.25"), 1)),
        (key("cust_a", "peak", w1), (dec("7"), 1)),
        (key("cust_a", "users", w1), (dec("1"), 1)),
    ]);
    // A maximum and a distinct count carry the billing period to date: W1's include a1.
    if BillingPeriod::containing(w0) == BillingPeriod::containing(w1) {
        expected.insert(key("cust_a", "peak", w1), (dec("50"), 2));
        expected.insert(key("cust_a", "users", w1), (dec("2"), 2));
    }
    windows.wait_for(&expected, Duration::from_secs(60)).await;
    // W0 was never published again: nothing in it changed.
    for total in windows.latest().values() {
        assert_eq!(total.revision.get(), 1, "{total:?}");
    }
    ns.drop_databases().await;
}

#[tokio::test]
async fn a_malformed_message_goes_to_the_dlq_with_its_reason_and_bytes() {
    let ns = Namespace::create().await;
    let aggregator = spawn_aggregator(&ns, &[]).await;
    create_meter(
        &ns,
        TENANT,
        "env_prod",
        json!({"id": "calls", "event_name": "x", "aggregation": "COUNT"}),
    )
    .await;
    let garbage = b"{\"schema_version\": 1, \"id\": ".to_vec();
    let good = event(TENANT, "ok-1", "cust", "x", hour_start(3), json!({}));
    produce_raw(
        &ns,
        &[
            ("k".into(), garbage.clone()),
            (good.kafka_key(), good.to_json_bytes()),
        ],
    )
    .await;

    let dlq = ns.topics().dlq(Topic::UsageRaw);
    let consumer: rdkafka::consumer::StreamConsumer =
        meterline_common::kafka::consumer_config(&ns.kafka, "it", &format!("{}-dlq", ns.id))
            .create()
            .unwrap();
    rdkafka::consumer::Consumer::subscribe(&consumer, &[&dlq]).unwrap();
    let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("a dead letter within 30 s")
        .unwrap();
    use rdkafka::message::Message;
    assert_eq!(
        message.payload(),
        Some(garbage.as_slice()),
        "original bytes intact"
    );
    assert_eq!(message.key(), Some(b"k".as_slice()));
    let headers = message.headers().expect("headers");
    let get = |name: &str| {
        headers
            .iter()
            .find(|h| h.key == name)
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(get("dlq.error_kind").as_deref(), Some("parse"));
    assert!(get("dlq.error").is_some_and(|e| !e.is_empty()));
    assert_eq!(get("dlq.source_topic"), Some(ns.topic(Topic::UsageRaw)));
    assert_eq!(get("dlq.service").as_deref(), Some("aggregator"));

    // The good event in the same batch still counts.
    let mut windows = WindowWatcher::new(&ns);
    windows
        .wait_for(
            &BTreeMap::from([(key("cust", "calls", hour_start(3)), (dec("1"), 1))]),
            Duration::from_secs(60),
        )
        .await;
    let metrics = reqwest::get(aggregator.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("aggregator_events_rejected_total{reason=\"parse\"} 1"),
        "{metrics}"
    );
    ns.drop_databases().await;
}

/// A deterministic stream: `n` distinct events over `customers` customers and three hourly
/// windows, every 20th sent twice (retries); returns the stream and its ground truth for a
/// COUNT meter (`calls`) and a SUM meter (`units`).
fn stream(n: usize, customers: usize, base: OffsetDateTime) -> (Vec<RawUsageEvent>, Expected) {
    let mut events = Vec::new();
    let mut truth: HashMap<(String, String, i64), (Decimal, u64)> = HashMap::new();
    for i in 0..n {
        let customer = format!("cust_{:03}", i % customers);
        // Spread over three hours; some land exactly on an hour boundary.
        let offset = time::Duration::seconds(((i * 7919) % (3 * 3600)) as i64);
        let at = base + offset;
        let units = (i % 13) as i64 + 1;
        let e = event(
            TENANT,
            &format!("evt-{i}"),
            &customer,
            "api.request",
            at,
            json!({"units": units}),
        );
        let start = at.unix_timestamp() - at.unix_timestamp().rem_euclid(3600);
        for (meter, q) in [("calls", Decimal::ONE), ("units", Decimal::from(units))] {
            let t = truth
                .entry((customer.clone(), meter.into(), start))
                .or_default();
            t.0 += q;
            t.1 += 1;
        }
        if i % 20 == 0 {
            events.push(e.clone());
        }
        events.push(e);
    }
    (events, truth.into_iter().collect())
}

async fn stream_meters(ns: &Namespace) {
    create_meter(
        ns,
        TENANT,
        "env_prod",
        json!({"id": "calls", "event_name": "api.request", "aggregation": "COUNT"}),
    )
    .await;
    create_meter(ns, TENANT, "env_prod", json!({"id": "units", "event_name": "api.request", "aggregation": "SUM", "property": "units"})).await;
}

#[tokio::test]
async fn a_sigkilled_aggregator_loses_nothing_and_counts_nothing_twice() {
    let ns = Namespace::create().await;
    ns.stop_merges().await;
    stream_meters(&ns).await;
    let (events, truth) = stream(12_000, 150, hour_start(6));
    let small_batches = [("AGGREGATOR_BATCH_MAX_EVENTS", "400")];
    let first = spawn_aggregator(&ns, &small_batches).await;
    let producer_ns = ns.clone();
    let chunks: Vec<Vec<RawUsageEvent>> = events.chunks(600).map(<[_]>::to_vec).collect();
    let writer = tokio::spawn(async move {
        for chunk in chunks {
            produce_events(&producer_ns, &chunk).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // Kill it in the middle of the stream, mid-batch, without any chance to commit.
    tokio::time::sleep(Duration::from_millis(900)).await;
    first.kill().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second = spawn_aggregator(&ns, &small_batches).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    second.kill().await;
    let _third = spawn_aggregator(&ns, &small_batches).await;
    writer.await.unwrap();

    let mut windows = WindowWatcher::new(&ns);
    windows.wait_for(&truth, Duration::from_secs(120)).await;
    ns.drop_databases().await;
}

/// The rows and quantity of one node's share of `events_processed`, deduplicated.
async fn node_rows(cluster: &PrivateClickhouseCluster, ns: &Namespace, node: usize) -> (u64, i128) {
    let mut settings = ns.clickhouse.clone();
    settings.url = cluster.url(node);
    meterline_common::clickhouse::client(&settings)
        .query("SELECT count(), sum(qty_billable) FROM events_processed_local FINAL")
        .fetch_one()
        .await
        .unwrap_or_else(|e| panic!("reading node {node}'s rows: {e}"))
}

/// On a 2-shard x 2-replica cluster, one replica of each shard is SIGKILLed in turn while
/// events stream in and restarted a few seconds later: inserts that reach a shard with a
/// replica down fail and are retried whole (the tables deduplicate), reads go to the live
/// replica. Every window total still equals the truth, each shard's replicas end up with the
/// same rows, and both shards hold some: the customers were spread.
#[tokio::test]
async fn a_clickhouse_node_sigkilled_mid_stream_leaves_every_total_equal_to_the_truth() {
    let cluster = PrivateClickhouseCluster::start().await;
    let mut ns = Namespace::plan(&Stack::get().kafka_brokers, &Stack::get().database_url);
    ns.clickhouse.url = cluster.url(1);
    ns.clickhouse.cluster = Some(cluster.settings());
    ns.create_topics().await;
    ns.create_databases().await;
    ns.stop_merges().await;
    stream_meters(&ns).await;
    let (events, truth) = stream(8_000, 120, hour_start(7));
    let _aggregator = spawn_aggregator(&ns, &[("AGGREGATOR_BATCH_MAX_EVENTS", "400")]).await;
    let chunks: Vec<Vec<RawUsageEvent>> = events.chunks(400).map(<[_]>::to_vec).collect();
    let producer_ns = ns.clone();
    let writer = tokio::spawn(async move {
        for chunk in chunks {
            produce_events(&producer_ns, &chunk).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // Node 1 answers the aggregator's queries; its shard partner and a replica of the other
    // shard are the ones lost.
    for node in [4, 2] {
        tokio::time::sleep(Duration::from_millis(800)).await;
        cluster.kill(node);
        tokio::time::sleep(Duration::from_secs(3)).await;
        cluster.resume(node).await;
    }
    writer.await.unwrap();

    let mut windows = WindowWatcher::new(&ns);
    windows.wait_for(&truth, Duration::from_secs(180)).await;
    let (shard1, shard2) = (
        node_rows(&cluster, &ns, 1).await,
        node_rows(&cluster, &ns, 3).await,
    );
    assert_eq!(
        shard1,
        node_rows(&cluster, &ns, 2).await,
        "shard 1's replicas differ"
    );
    assert_eq!(
        shard2,
        node_rows(&cluster, &ns, 4).await,
        "shard 2's replicas differ"
    );
    assert!(
        shard1.0 > 0 && shard2.0 > 0,
        "one shard holds every row: {shard1:?} {shard2:?}"
    );
    // Two meters per event, each copy collapsed: the stream's distinct events, twice.
    assert_eq!(shard1.0 + shard2.0, 2 * 8_000);
    ns.drop_databases().await;
}

#[tokio::test]
async fn two_replicas_publish_no_conflicting_totals() {
    let ns = Namespace::create().await;
    ns.stop_merges().await;
    stream_meters(&ns).await;
    let (events, truth) = stream(6_000, 80, hour_start(9));
    let batches = [("AGGREGATOR_BATCH_MAX_EVENTS", "300")];
    let _a = spawn_aggregator(&ns, &batches).await;
    let _b = spawn_aggregator(&ns, &batches).await;
    for chunk in events.chunks(500) {
        produce_events(&ns, chunk).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut windows = WindowWatcher::new(&ns);
    windows.wait_for(&truth, Duration::from_secs(120)).await;
    windows.read_for(Duration::from_secs(2)).await;
    // One revision of a window always carries one total, and revisions never repeat with
    // another total, whichever replica published them.
    type Revision = (String, String, i64, u32);
    let mut by_revision: HashMap<Revision, HashSet<(Decimal, u64)>> = HashMap::new();
    for t in &windows.seen {
        let (c, m, s) = meterline_tests::usage::window_id(t);
        by_revision
            .entry((c, m, s, t.revision.get()))
            .or_default()
            .insert((t.quantity.normalize(), t.event_count));
    }
    let conflicts: Vec<_> = by_revision.iter().filter(|(_, v)| v.len() > 1).collect();
    assert!(conflicts.is_empty(), "conflicting totals: {conflicts:?}");
    ns.drop_databases().await;
}

#[tokio::test]
async fn resync_republishes_the_windows_in_range_with_the_job_id() {
    let ns = Namespace::create().await;
    let _aggregator = spawn_aggregator(&ns, &[]).await;
    stream_meters(&ns).await;
    let w0 = hour_start(4);
    let events = vec![
        event(
            TENANT,
            "r1",
            "cust_r",
            "api.request",
            w0 + minutes(5),
            json!({"units": 2}),
        ),
        event(
            TENANT,
            "r2",
            "cust_r",
            "api.request",
            w0 + minutes(65),
            json!({"units": 3}),
        ),
        event(
            TENANT,
            "r3",
            "cust_s",
            "api.request",
            w0 + minutes(5),
            json!({"units": 4}),
        ),
    ];
    produce_events(&ns, &events).await;
    let mut windows = WindowWatcher::new(&ns);
    let w1 = w0 + time::Duration::HOUR;
    let truth = BTreeMap::from([
        (key("cust_r", "calls", w0), (dec("1"), 1)),
        (key("cust_r", "units", w0), (dec("2"), 1)),
        (key("cust_r", "calls", w1), (dec("1"), 1)),
        (key("cust_r", "units", w1), (dec("3"), 1)),
        (key("cust_s", "calls", w0), (dec("1"), 1)),
        (key("cust_s", "units", w0), (dec("4"), 1)),
    ]);
    windows.wait_for(&truth, Duration::from_secs(60)).await;

    // Resync cust_r over a range that overlaps only W0.
    let job = JobId::generate();
    let request = ResyncRequest {
        job_id: job.clone(),
        tenant_id: events[0].tenant_id.clone(),
        environment_id: events[0].environment_id.clone(),
        customer_id: Some(events[0].customer_id.clone()),
        meter_id: None,
        range: TimeRange::new(
            Timestamp::new(w0 + minutes(10)).unwrap(),
            Timestamp::new(w0 + minutes(20)).unwrap(),
        )
        .unwrap(),
        force_rerun: true,
        requested_at: Timestamp::now(),
    };
    let producer: rdkafka::producer::FutureProducer =
        meterline_common::kafka::producer_config(&ns.kafka, "it", Duration::from_secs(10))
            .create()
            .unwrap();
    producer
        .send(
            rdkafka::producer::FutureRecord::to(&ns.topic(Topic::UsageResync))
                .key(&request.kafka_key())
                .payload(&request.to_json_bytes()),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let before = windows.seen.len();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while windows.seen.len() < before + 2 && std::time::Instant::now() < deadline {
        windows.read_for(Duration::from_millis(500)).await;
    }
    windows.read_for(Duration::from_secs(1)).await;
    let resynced: Vec<_> = windows.seen[before..].to_vec();
    let mut ids: Vec<_> = resynced
        .iter()
        .map(meterline_tests::usage::window_id)
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![key("cust_r", "calls", w0), key("cust_r", "units", w0)],
        "only cust_r's W0"
    );
    for t in &resynced {
        assert_eq!(
            t.reason,
            WindowReason::Resync {
                job_id: job.clone()
            }
        );
        assert_eq!(t.revision.get(), 1, "unchanged totals keep their revision");
    }
    assert_eq!(windows.totals(), truth);
    ns.drop_databases().await;
}

#[tokio::test]
async fn events_older_than_35_days_are_counted_but_flagged_expired() {
    let ns = Namespace::create().await;
    let aggregator = spawn_aggregator(&ns, &[]).await;
    stream_meters(&ns).await;
    let old = hour_start(24 * 40);
    produce_events(
        &ns,
        &[event(
            TENANT,
            "old-1",
            "cust_o",
            "api.request",
            old + minutes(1),
            json!({"units": 7}),
        )],
    )
    .await;
    let mut windows = WindowWatcher::new(&ns);
    windows
        .wait_for(
            &BTreeMap::from([
                (key("cust_o", "calls", old), (dec("1"), 1)),
                (key("cust_o", "units", old), (dec("7"), 1)),
            ]),
            Duration::from_secs(60),
        )
        .await;
    assert!(windows.seen.iter().all(|t| t.expired), "{:?}", windows.seen);
    let metrics = reqwest::get(aggregator.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("aggregator_expired_events_total 1"),
        "{metrics}"
    );
    ns.drop_databases().await;
}
