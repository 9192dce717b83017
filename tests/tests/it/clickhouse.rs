//! ClickHouse through the real server with the `clickhouse` crate: migrations, a batch insert
//! read back, and deduplication of repeated event ids.

use meterline_common::clickhouse::{migrate, MIGRATIONS};
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
