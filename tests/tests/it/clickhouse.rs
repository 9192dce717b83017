//! ClickHouse through the real server with the `clickhouse` crate: migrations, a batch insert
//! read back, deduplication of repeated event ids, and the time-ordered layout of
//! `events_processed` (a window read without the customer's history, and the conversion of a
//! table laid out by event id).

use std::time::{Duration, Instant};

use meterline_catalog::window_totals::{window_aggregates, WindowAggregates, WindowPlan};
use meterline_common::clickhouse::{events_layout, migrate, EventsLayout, MIGRATIONS};
use meterline_common::kafka::group_members;
use meterline_schemas::{CustomerId, MeterId, TimeRange, Timestamp};
use meterline_tests::api::scope;
use meterline_tests::process::run_command;
use meterline_tests::usage::spawn_aggregator;
use meterline_tests::Namespace;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

#[derive(Debug, Clone, ::clickhouse::Row, Serialize, Deserialize, PartialEq)]
struct ProcessedRow {
    tenant_id: String,
    environment_id: String,
    customer_id: String,
    meter_id: String,
    event_id: String,
    #[serde(with = "::clickhouse::serde::time::datetime64::millis")]
    timestamp: OffsetDateTime,
    /// Decimal(38, 9) travels as its scaled integer.
    qty_billable: i128,
    sign: i8,
    version: u64,
    #[serde(with = "::clickhouse::serde::time::datetime64::millis")]
    ingested_at: OffsetDateTime,
    expired: u8,
}

const SCALE: i128 = 1_000_000_000;

fn row(i: u64, qty: i128, version: u64) -> ProcessedRow {
    let at = OffsetDateTime::from_unix_timestamp(1_767_225_600 + i as i64).unwrap();
    ProcessedRow {
        tenant_id: "tenant_123".into(),
        environment_id: "env_prod".into(),
        customer_id: format!("customer_{}", i % 10),
        meter_id: "api_calls".into(),
        event_id: format!("evt_{i}"),
        timestamp: at,
        qty_billable: qty * SCALE,
        sign: 1,
        version,
        ingested_at: at,
        expired: 0,
    }
}

async fn insert(ns: &Namespace, rows: &[ProcessedRow]) {
    let client = ns.clickhouse();
    let mut insert = client
        .insert::<ProcessedRow>("events_processed")
        .await
        .expect("starting insert");
    for r in rows {
        insert.write(r).await.expect("writing a row");
    }
    insert.end().await.expect("ending insert");
}

#[tokio::test]
async fn a_batch_is_read_back_whole() {
    let ns = Namespace::create().await;
    let rows: Vec<ProcessedRow> = (0..10_000).map(|i| row(i, (i % 7) as i128, 1)).collect();
    insert(&ns, &rows).await;

    let back: Vec<ProcessedRow> = ns
        .clickhouse()
        .query("SELECT ?fields FROM events_processed ORDER BY event_id")
        .fetch_all()
        .await
        .expect("reading back");
    let mut expected = rows.clone();
    expected.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    assert_eq!(back, expected);
    ns.drop_databases().await;
}

#[tokio::test]
async fn repeated_event_ids_count_once_under_final() {
    let ns = Namespace::create().await;
    let rows: Vec<ProcessedRow> = (0..1_000).map(|i| row(i, 2, 1)).collect();
    // The same 1,000 events delivered again in a second insert, and 100 once more.
    insert(&ns, &rows).await;
    insert(&ns, &rows).await;
    insert(&ns, &rows[..100]).await;

    let (count, total): (u64, i128) = ns
        .clickhouse()
        .query("SELECT count(), sum(qty_billable) FROM events_processed FINAL")
        .fetch_one()
        .await
        .expect("querying totals");
    assert_eq!(count, 1_000);
    assert_eq!(total, 2_000 * SCALE);
    ns.drop_databases().await;
}

#[tokio::test]
async fn migrations_are_recorded_and_not_rerun() {
    let ns = Namespace::create().await;
    let again = migrate(&ns.clickhouse).await.expect("migrating again");
    assert!(again.is_empty(), "a second run applies nothing: {again:?}");
    let versions: Vec<u32> = ns
        .clickhouse()
        .query("SELECT version FROM schema_migrations ORDER BY version")
        .fetch_all()
        .await
        .expect("reading schema_migrations");
    let expected: Vec<u32> = MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(versions, expected);
    ns.drop_databases().await;
}

/// `events_processed` as migrations 1 to 3 laid it out before migration 5: ordered by event
/// id, no time in the key (here with a 120-day TTL, which the conversion keeps).
const BY_ID_LAYOUT: &str = "CREATE TABLE events_processed
    (
        tenant_id LowCardinality(String), environment_id LowCardinality(String),
        customer_id String, meter_id LowCardinality(String), event_id String,
        timestamp DateTime64(3, 'UTC'), qty_billable Decimal(38, 9), sign Int8,
        version UInt64, ingested_at DateTime64(3, 'UTC'), expired UInt8 DEFAULT 0,
        unique_key String DEFAULT ''
    )
    ENGINE = ReplacingMergeTree(version)
    ORDER BY (tenant_id, environment_id, customer_id, meter_id, event_id)
    TTL toDateTime(timestamp) + INTERVAL 120 DAY";

/// The most rows a read of one hour may read here: the hour's rows and the granules around
/// them (8,192 rows each), nowhere near the customer's 300,000 rows of history.
const WINDOW_READ_LIMIT: &str = "24576";

/// The whole table's deduplicated rows and quantity.
async fn table_totals(ns: &Namespace) -> (u64, i128) {
    ns.clickhouse()
        .query("SELECT count(), sum(qty_billable) FROM events_processed FINAL")
        .fetch_one()
        .await
        .expect("totalling events_processed")
}

/// A customer with 90 days of history (300,000 events) and one hour of 50 events, some resent
/// with a later timestamp. On the layout by event id, reading that hour reads the whole
/// history; `meterline migrate --relayout-events` is refused while an aggregator runs and
/// changes nothing, then, with it stopped, converts the table: every total is the same, the
/// hour is read without the history, and the old table is kept.
#[tokio::test]
async fn a_window_total_reads_its_window_not_the_customers_history_once_converted() {
    let ns = Namespace::create().await;
    let client = ns.clickhouse();
    assert_eq!(
        events_layout(&ns.clickhouse)
            .await
            .expect("reading the layout"),
        EventsLayout::ByTime,
        "a new install is laid out by time at once"
    );
    for sql in ["DROP TABLE events_processed SYNC", BY_ID_LAYOUT] {
        client
            .query(sql)
            .execute()
            .await
            .expect("recreating the old layout");
    }

    let now = OffsetDateTime::now_utc();
    let hour = {
        let t = now.unix_timestamp() - 2 * 3600;
        OffsetDateTime::from_unix_timestamp(t - t.rem_euclid(3600)).unwrap()
    };
    let stamped = |event: String, at: OffsetDateTime, version: u64| ProcessedRow {
        tenant_id: "tenant_123".into(),
        environment_id: "env_prod".into(),
        customer_id: "customer_big".into(),
        meter_id: "api_calls".into(),
        event_id: event,
        timestamp: at,
        qty_billable: 3 * SCALE,
        sign: 1,
        version,
        ingested_at: at,
        expired: 0,
    };
    let history: Vec<ProcessedRow> = (0..300_000i64)
        .map(|i| {
            let at = hour - time::Duration::days(90) + time::Duration::seconds(i * 25);
            stamped(format!("old_{i}"), at, 10)
        })
        .collect();
    insert(&ns, &history).await;
    let in_hour: Vec<ProcessedRow> = (0..50i64)
        .map(|i| {
            stamped(
                format!("now_{i}"),
                hour + time::Duration::seconds(i * 60),
                10,
            )
        })
        .collect();
    // Ten of them resent an hour later with a later stamp: the old key collapsed them.
    let resent: Vec<ProcessedRow> = in_hour[..10]
        .iter()
        .map(|r| stamped(r.event_id.clone(), r.timestamp + time::Duration::HOUR, 5))
        .collect();
    insert(&ns, &in_hour).await;
    insert(&ns, &resent).await;

    // The hour's total as `GET /v1/usage` and the sync read it, by a client that may read at
    // most WINDOW_READ_LIMIT rows (ClickHouse refuses a query that would read more).
    let ns_ref = &ns;
    let read_hour = |limit: Option<&'static str>| async move {
        let range = TimeRange::new(
            Timestamp::new(hour).unwrap(),
            Timestamp::new(hour + time::Duration::HOUR).unwrap(),
        )
        .unwrap();
        let plan = WindowPlan::fixed(&range, 60, 10).unwrap();
        let client = match limit {
            Some(rows) => ns_ref.clickhouse().with_setting("max_rows_to_read", rows),
            None => ns_ref.clickhouse(),
        };
        window_aggregates(
            &client,
            &scope("tenant_123", "env_prod"),
            &CustomerId::parse("customer_big").unwrap(),
            &MeterId::parse("api_calls").unwrap(),
            &plan,
        )
        .await
        .map(|totals| {
            totals
                .into_iter()
                .map(|(_, a)| a)
                .collect::<Vec<WindowAggregates>>()
        })
    };
    let before = read_hour(None).await.expect("reading the hour");
    assert_eq!(before.len(), 1);
    assert_eq!(before[0].events, 50);
    let bounded = read_hour(Some(WINDOW_READ_LIMIT)).await;
    let refused = bounded.expect_err("the old layout reads the customer's history");
    assert!(refused.to_string().contains("rows"), "{refused}");
    let whole_before = table_totals(&ns).await;
    assert_eq!(whole_before.0, 300_050);

    // An aggregator in the namespace's group: refused, nothing changed.
    let ns_env = ns.env();
    let env: Vec<(&str, &str)> = ns_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let group = ns_env
        .iter()
        .find(|(k, _)| k == "AGGREGATOR_GROUP_ID")
        .map(|(_, v)| v.clone())
        .unwrap();
    let members = || async {
        group_members(&ns.kafka, &group)
            .await
            .expect("asking Kafka")
    };
    let aggregator = spawn_aggregator(&ns, &[]).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while members().await == 0 {
        assert!(
            Instant::now() < deadline,
            "the aggregator never joined its group"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The aggregator says at start that the table still has the old layout.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !aggregator
        .log_lines()
        .iter()
        .any(|l| l.contains("still ordered by event id"))
    {
        assert!(
            Instant::now() < deadline,
            "no layout warning: {}",
            aggregator.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let refused = run_command("meterline", &env, &["migrate", "--relayout-events"]).await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{refused:?}");
    assert!(stderr.contains("aggregator"), "{stderr}");
    assert!(matches!(
        events_layout(&ns.clickhouse).await.unwrap(),
        EventsLayout::ById { .. }
    ));

    let exit = aggregator.terminate(Duration::from_secs(30)).await;
    assert!(exit.success(), "{exit:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while members().await > 0 {
        assert!(
            Instant::now() < deadline,
            "the aggregator never left its group"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let converted = run_command("meterline", &env, &["migrate", "--relayout-events"]).await;
    let stdout = String::from_utf8_lossy(&converted.stdout);
    assert!(converted.status.success(), "{converted:?}");
    assert!(stdout.contains("300050 rows copied"), "{stdout}");
    assert!(
        stdout.contains("kept as events_processed_by_id_"),
        "{stdout}"
    );

    assert_eq!(
        events_layout(&ns.clickhouse).await.unwrap(),
        EventsLayout::ByTime
    );
    // The same read within the limit: the window and a few granules around it.
    let after = read_hour(Some(WINDOW_READ_LIMIT))
        .await
        .expect("the time-ordered layout reads the hour without the history");
    assert_eq!(after, before, "the hour's total is unchanged");
    assert_eq!(
        table_totals(&ns).await,
        whole_before,
        "every row and unit kept"
    );
    let ddl: String = client
        .query(
            "SELECT create_table_query FROM system.tables
             WHERE database = currentDatabase() AND name = 'events_processed'",
        )
        .fetch_one()
        .await
        .unwrap();
    assert!(ddl.contains("toIntervalDay(120)"), "the TTL is kept: {ddl}");
    // The first copies of the hour's events are known: a copy resent now bills in the hour.
    let known: u64 = client
        .query(
            "SELECT count() FROM event_first_seen
             WHERE customer_id = 'customer_big' AND event_id LIKE 'now_%'",
        )
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(known, 50);
    // A second run has nothing to do.
    let again = run_command("meterline", &env, &["migrate", "--relayout-events"]).await;
    assert!(again.status.success(), "{again:?}");
    assert!(!String::from_utf8_lossy(&again.stdout).contains("rows copied"));
    ns.drop_databases().await;
}
