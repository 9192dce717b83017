//! `meterline dlq` on the real stack, with the failure that really lands in `usage.raw.dlq`
//! while the aggregator runs: events whose meter reads a property they carry with an
//! unusable value (`invalid_quantity`). Such an event still feeds its other meters; only the
//! misconfigured one misses it. The operator fixes the meter, replays the dead letters, and
//! each event then counts exactly once in every meter, also when the replay is run twice
//! (the second run sends nothing) and although the replay re-delivers events that had
//! already fed the other meters (their copies collapse on the event id).

use std::time::{Duration, Instant};

use meterline_catalog::meters::MeterStore;
use meterline_common::kafka::consumer_config;
use meterline_schemas::{Decimal, MeterDefinition, MeterInput, Topic};
use meterline_tests::api::scope;
use meterline_tests::namespace::TEST_PARTITIONS;
use meterline_tests::process::run_command;
use meterline_tests::usage::{
    create_meter, event, hour_start, produce_events, spawn_aggregator, Expected, WindowWatcher,
};
use meterline_tests::Namespace;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::json;

const TENANT: &str = "tenant_dlq";

/// Every message ever written to `topic` (the sum of its partitions' end offsets).
fn messages_in(ns: &Namespace, topic: &str) -> i64 {
    let client: BaseConsumer = consumer_config(&ns.kafka, "it-watermarks", "it-watermarks")
        .create()
        .unwrap();
    (0..TEST_PARTITIONS)
        .map(|p| {
            client
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap()
                .1
        })
        .sum()
}

async fn meterline(ns: &Namespace, args: &[&str]) -> String {
    let env = ns.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let output = run_command("meterline", &env, args).await;
    assert!(output.status.success(), "meterline {args:?}: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

/// The data lines of `meterline dlq list` (without its header line).
async fn listed(ns: &Namespace, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["dlq", "list", "usage.raw.dlq"];
    args.extend_from_slice(extra);
    meterline(ns, &args)
        .await
        .lines()
        .skip(1)
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn a_replayed_dead_letter_counts_exactly_once_even_when_replayed_twice() {
    let ns = Namespace::create().await;
    ns.stop_merges().await;
    let aggregator = spawn_aggregator(&ns, &[]).await;
    create_meter(
        &ns,
        TENANT,
        "env_prod",
        json!({"id": "calls", "event_name": "job.finished", "aggregation": "COUNT"}),
    )
    .await;
    // The mistake: `duration` is an ISO 8601 text; the milliseconds are in `duration_ms`.
    let wrong = json!({"id": "runtime", "event_name": "job.finished", "aggregation": "SUM",
                       "property": "duration"});
    create_meter(&ns, TENANT, "env_prod", wrong).await;

    let w0 = hour_start(4);
    let at = |m: i64| w0 + time::Duration::minutes(m);
    let events = vec![
        event(
            TENANT,
            "job-1",
            "cust_a",
            "job.finished",
            at(1),
            json!({"duration": "PT5S", "duration_ms": 5000}),
        ),
        event(
            TENANT,
            "job-2",
            "cust_a",
            "job.finished",
            at(2),
            json!({"duration": "PT2S", "duration_ms": 2000}),
        ),
        event(
            TENANT,
            "job-3",
            "cust_a",
            "job.finished",
            at(3),
            json!({"duration": "PT0.5S", "duration_ms": 500}),
        ),
    ];
    produce_events(&ns, &events).await;
    let raw = ns.topic(Topic::UsageRaw);
    let key = |m: &str| ("cust_a".to_owned(), m.to_owned(), w0.unix_timestamp());
    let dec = |s: &str| s.parse::<Decimal>().unwrap();

    // Each event counted as a call; the runtime meter could not use it.
    let mut windows = WindowWatcher::new(&ns);
    windows
        .wait_for(
            &Expected::from([(key("calls"), (dec("3"), 3))]),
            Duration::from_secs(90),
        )
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let pending = loop {
        let lines = listed(&ns, &[]).await;
        if lines.len() == 3 || Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(pending.len(), 3, "{pending:?}\n{}", aggregator.log_tail());
    for line in &pending {
        assert!(line.contains("\tpending\tinvalid_quantity\t"), "{line}");
        assert!(line.contains("meter runtime"), "{line}");
    }
    // One of them in full: the original bytes and the reason.
    let fields: Vec<&str> = pending[0].split('\t').collect();
    let shown = meterline(
        &ns,
        &[
            "dlq",
            "inspect",
            "usage.raw.dlq",
            "--partition",
            fields[0],
            "--offset",
            fields[1],
        ],
    )
    .await;
    assert!(
        shown.contains("dlq.error_kind: invalid_quantity"),
        "{shown}"
    );
    assert!(shown.contains("\"duration_ms\""), "{shown}");
    assert!(
        shown.contains(&format!("dlq.source_topic: {raw}")),
        "{shown}"
    );

    // The fix: the meter reads the milliseconds.
    let fixed: MeterInput = serde_json::from_value(json!({"id": "runtime",
        "event_name": "job.finished", "aggregation": "SUM", "property": "duration_ms"}))
    .unwrap();
    MeterStore::new(ns.pg_pool().await)
        .replace(
            &scope(TENANT, "env_prod"),
            &MeterDefinition::try_from(fixed).unwrap(),
            time::OffsetDateTime::now_utc(),
            std::time::Duration::from_secs(360),
        )
        .await
        .unwrap()
        .expect("the meter exists");

    // A dry run shows the three and writes nothing.
    let before = messages_in(&ns, &raw);
    assert_eq!(before, 3);
    let dry = meterline(&ns, &["dlq", "replay", "usage.raw.dlq", "--dry-run"]).await;
    assert!(dry.contains("3 message(s) would replay"), "{dry}");
    assert_eq!(messages_in(&ns, &raw), before, "a dry run writes nothing");
    assert_eq!(
        listed(&ns, &[]).await.len(),
        3,
        "a dry run remembers nothing"
    );

    let replay = meterline(&ns, &["dlq", "replay", "usage.raw.dlq"]).await;
    assert!(
        replay.contains(&format!("3 message(s) replayed from {raw}.dlq to {raw}")),
        "{replay}"
    );
    let expected = Expected::from([
        (key("calls"), (dec("3"), 3)),
        (key("runtime"), (dec("7500"), 3)),
    ]);
    windows.wait_for(&expected, Duration::from_secs(90)).await;

    // Again: nothing left to replay, nothing written.
    let again = meterline(&ns, &["dlq", "replay", "usage.raw.dlq"]).await;
    assert!(again.contains("0 message(s) replayed"), "{again}");
    assert_eq!(
        messages_in(&ns, &raw),
        6,
        "three originals and three replayed copies"
    );
    assert!(listed(&ns, &[]).await.is_empty());
    let all = listed(&ns, &["--all"]).await;
    assert_eq!(all.len(), 3, "{all:?}");
    assert!(all.iter().all(|l| l.contains("\treplayed\t")), "{all:?}");

    // Whatever else the aggregator still does, the totals stay: once per event.
    windows.read_for(Duration::from_secs(3)).await;
    assert_eq!(windows.totals(), expected);
    let runtime_rows: u64 = ns
        .clickhouse()
        .query("SELECT count() FROM events_processed FINAL WHERE meter_id = 'runtime'")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(runtime_rows, 3);
    // No replayed copy failed again.
    assert_eq!(messages_in(&ns, &format!("{raw}.dlq")), 3);
    ns.drop_databases().await;
}
