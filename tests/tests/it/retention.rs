//! Retention on the real stack: `meterline prune` deletes completed sync-ledger rows (with
//! their sends), webhook deduplication records and finished window registry rows older than
//! the configured age; each service prunes its own table on its own (the sink the ledger, the
//! relay its deliveries, the aggregator its window registry) and leaves the others' alone; every recent, unfinished or operator-bound row and anything within
//! Stripe's 35 days is kept; a retention under the 42-day floor is refused with exit code 2;
//! `events_processed` carries a TTL, which `RETENTION_EVENTS_DAYS` changes.

use std::time::{Duration, Instant};

use meterline_tests::process::{run_command, run_to_exit};
use meterline_tests::{Namespace, ServiceProcess};
use sqlx::PgPool;
use time::OffsetDateTime;

fn days_ago(days: i64) -> OffsetDateTime {
    OffsetDateTime::now_utc() - time::Duration::days(days)
}

/// A ledger row of a one-hour window that ended `window_days` ago, last changed
/// `updated_days` ago, with one send.
async fn ledger_row(pool: &PgPool, name: &str, status: &str, window_days: i64, updated_days: i64) {
    let end = days_ago(window_days);
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO stripe_sync_batches
             (tenant_id, environment_id, entity_id, meter_id, window_start, window_end,
              aggregated_quantity, event_count, window_revision, sync_status, created_at,
              updated_at)
         VALUES ('tenant_ret', 'env_prod', $1, 'calls', $2, $3, 1, 1, 1, $4, $5, $5)
         RETURNING id",
    )
    .bind(name)
    .bind(end - time::Duration::HOUR)
    .bind(end)
    .bind(status)
    .bind(days_ago(updated_days))
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("inserting ledger row {name}: {e}"));
    sqlx::query(
        "INSERT INTO stripe_sync_sends
             (batch_id, seq, identifier, value, event_name, provider_customer_id,
              stripe_timestamp, status, accounted)
         VALUES ($1, 1, $2, 1, 'api_calls', 'cus_1', 0, 'accepted', 1)",
    )
    .bind(id)
    .bind(format!("ml_{name}"))
    .execute(pool)
    .await
    .unwrap();
}

async fn delivery(pool: &PgPool, id: &str, days: i64) {
    sqlx::query(
        "INSERT INTO webhook_deliveries (tenant_id, environment_id, event_id, event_type, received_at)
         VALUES ('tenant_ret', 'env_prod', $1, 'customer.created', $2)",
    )
    .bind(id)
    .bind(days_ago(days))
    .execute(pool)
    .await
    .unwrap();
}

/// A window registry row of a one-hour window that ended `days` ago (a customer named `name`),
/// published once, `dirty` when it waits for a publication.
async fn registry_row(pool: &PgPool, name: &str, days: i64, dirty: bool) {
    let end = days_ago(days);
    sqlx::query(
        "INSERT INTO aggregation_windows
             (tenant_id, environment_id, customer_id, meter_id, window_start, window_end,
              due_at, dirty, revision, published_quantity, published_event_count,
              published_at)
         VALUES ('tenant_ret', 'env_prod', $1, 'calls', $2, $3, $3, $4, 1, 1, 1, $3)",
    )
    .bind(name)
    .bind(end - time::Duration::HOUR)
    .bind(end)
    .bind(dirty)
    .execute(pool)
    .await
    .unwrap_or_else(|e| panic!("inserting window registry row {name}: {e}"));
}

async fn registry(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT customer_id FROM aggregation_windows ORDER BY customer_id")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn ledger(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT entity_id FROM stripe_sync_batches ORDER BY entity_id")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn deliveries(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT event_id FROM webhook_deliveries ORDER BY event_id")
        .fetch_all(pool)
        .await
        .unwrap()
}

async fn seed(pool: &PgPool) {
    for (name, status, window, updated) in [
        ("old_synced", "synced", 100, 100),
        ("old_skipped", "skipped", 100, 100),
        ("old_expired", "expired", 100, 100),
        // Waiting for an operator, or still being worked on: kept whatever their age.
        ("old_failed", "failed", 100, 100),
        ("old_reconcile", "needs_reconciliation", 100, 100),
        ("old_pending", "pending", 100, 100),
        ("old_pending_mapping", "pending_mapping", 100, 100),
        ("old_in_flight", "in_flight", 100, 100),
        // An old window whose row changed recently (a late revision was just settled).
        ("old_window_recent_update", "synced", 100, 1),
        // Inside Stripe's 35 days, and just past them but within the floor's margin.
        ("recent_synced", "synced", 1, 1),
        ("day_34_synced", "synced", 34, 34),
        ("day_40_synced", "synced", 40, 40),
    ] {
        ledger_row(pool, name, status, window, updated).await;
    }
    for (id, days) in [
        ("evt_old", 100),
        ("evt_day_50", 50),
        ("evt_day_40", 40),
        ("evt_new", 0),
    ] {
        delivery(pool, id, days).await;
    }
    for (name, days, dirty) in [
        ("win_old", 100, false),
        ("win_day_50", 50, false),
        // Waiting for a publication (a late event just arrived): kept whatever its age.
        ("win_old_dirty", 100, true),
        ("win_day_40", 40, false),
        ("win_new", 0, false),
    ] {
        registry_row(pool, name, days, dirty).await;
    }
}

const SEEDED_REGISTRY: [&str; 5] = [
    "win_day_40",
    "win_day_50",
    "win_new",
    "win_old",
    "win_old_dirty",
];

const KEPT_LEDGER: [&str; 9] = [
    "day_34_synced",
    "day_40_synced",
    "old_failed",
    "old_in_flight",
    "old_pending",
    "old_pending_mapping",
    "old_reconcile",
    "old_window_recent_update",
    "recent_synced",
];

fn env_with<'a>(
    ns_env: &'a [(String, String)],
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    ns_env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain(extra.iter().copied())
        .collect()
}

#[tokio::test]
async fn meterline_prune_deletes_only_old_completed_records() {
    let ns = Namespace::create().await;
    let pool = ns.pg_pool().await;
    seed(&pool).await;
    let ns_env = ns.env();

    // Under the floor: refused before anything is touched.
    for (var, value) in [
        ("RETENTION_LEDGER_DAYS", "35"),
        ("RETENTION_WEBHOOK_DELIVERIES_DAYS", "3"),
        ("RETENTION_WINDOWS_DAYS", "41"),
    ] {
        let output =
            run_command("meterline", &env_with(&ns_env, &[(var, value)]), &["prune"]).await;
        assert_eq!(output.status.code(), Some(2), "{var}={value}: {output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(var) && stderr.contains("42"), "{stderr}");
    }
    assert_eq!(
        ledger(&pool).await.len(),
        12,
        "a refused run deletes nothing"
    );

    let output = run_command(
        "meterline",
        &env_with(
            &ns_env,
            &[
                ("RETENTION_LEDGER_DAYS", "42"),
                ("RETENTION_WEBHOOK_DELIVERIES_DAYS", "45"),
                ("RETENTION_WINDOWS_DAYS", "42"),
            ],
        ),
        &["prune"],
    )
    .await;
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("pruned 3 sync ledger row(s)"), "{stdout}");
    assert!(stdout.contains("2 webhook delivery record(s)"), "{stdout}");
    assert!(stdout.contains("2 window registry row(s)"), "{stdout}");
    assert_eq!(ledger(&pool).await, KEPT_LEDGER);
    assert_eq!(deliveries(&pool).await, vec!["evt_day_40", "evt_new"]);
    assert_eq!(
        registry(&pool).await,
        vec!["win_day_40", "win_new", "win_old_dirty"]
    );
    // The sends of pruned rows went with them; the others' stay.
    let sends: i64 = sqlx::query_scalar("SELECT count(*) FROM stripe_sync_sends")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(sends, KEPT_LEDGER.len() as i64);

    // A second run finds nothing more.
    let output = run_command(
        "meterline",
        &env_with(&ns_env, &[("RETENTION_LEDGER_DAYS", "42")]),
        &["prune"],
    )
    .await;
    assert!(String::from_utf8_lossy(&output.stdout).contains("pruned 0 sync ledger row(s)"));
    assert_eq!(ledger(&pool).await, KEPT_LEDGER);
    ns.drop_databases().await;
}

/// `service` refuses `var` under the floor: exit code 2 and one line naming it.
async fn refuses_a_short_retention(ns: &Namespace, service: &str, var: &str) {
    let mut env = ns.env();
    env.push((var.into(), "30".into()));
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (status, stderr) = run_to_exit(service, &env_ref).await;
    assert_eq!(status.code(), Some(2), "{service}: {stderr}");
    assert!(stderr.contains(var), "{service}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{service}: {stderr}");
}

/// The environment of a service that prunes every second with the 42-day floor.
fn pruning_env(ns: &Namespace) -> Vec<(String, String)> {
    let mut env = ns.env();
    env.push(("RETENTION_LEDGER_DAYS".into(), "42".into()));
    env.push(("RETENTION_WEBHOOK_DELIVERIES_DAYS".into(), "42".into()));
    env.push(("RETENTION_WINDOWS_DAYS".into(), "42".into()));
    env.push(("RETENTION_PRUNE_INTERVAL_SECONDS".into(), "1".into()));
    env
}

const SEEDED_DELIVERIES: [&str; 4] = ["evt_day_40", "evt_day_50", "evt_new", "evt_old"];

#[tokio::test]
async fn the_webhook_relay_prunes_its_deliveries_on_its_own_and_refuses_a_short_retention() {
    let ns = Namespace::create().await;
    let pool = ns.pg_pool().await;
    seed(&pool).await;
    let seeded_ledger = ledger(&pool).await;
    assert_eq!(deliveries(&pool).await, SEEDED_DELIVERIES);

    refuses_a_short_retention(&ns, "webhook-relay", "RETENTION_WEBHOOK_DELIVERIES_DAYS").await;

    let relay = ServiceProcess::spawn("webhook-relay", &pruning_env(&ns)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while deliveries(&pool).await.len() != 2 {
        assert!(
            Instant::now() < deadline,
            "the relay did not prune within a minute: {:?}\n{}",
            deliveries(&pool).await,
            relay.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(deliveries(&pool).await, vec!["evt_day_40", "evt_new"]);
    // Rows that became prunable later go at the next round.
    delivery(&pool, "evt_late_old", 60).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while deliveries(&pool).await.contains(&"evt_late_old".to_owned()) {
        assert!(Instant::now() < deadline, "{}", relay.log_tail());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    relay.terminate(Duration::from_secs(30)).await;
    // The ledger is the sink's to prune, the window registry the aggregator's: the relay left
    // every row of them.
    assert_eq!(ledger(&pool).await, seeded_ledger);
    assert_eq!(registry(&pool).await, SEEDED_REGISTRY);
    ns.drop_databases().await;
}

#[tokio::test]
async fn the_sink_prunes_the_ledger_on_its_own_and_refuses_a_short_retention() {
    let ns = Namespace::create().await;
    let pool = ns.pg_pool().await;
    seed(&pool).await;

    refuses_a_short_retention(&ns, "stripe-sink", "RETENTION_LEDGER_DAYS").await;

    let sink = ServiceProcess::spawn("stripe-sink", &pruning_env(&ns)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while ledger(&pool).await != KEPT_LEDGER {
        assert!(
            Instant::now() < deadline,
            "the sink did not prune within a minute: {:?}\n{}",
            ledger(&pool).await,
            sink.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Rows that became prunable later go at the next round.
    ledger_row(&pool, "late_old_synced", "synced", 60, 60).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while ledger(&pool).await.contains(&"late_old_synced".to_owned()) {
        assert!(Instant::now() < deadline, "{}", sink.log_tail());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    sink.terminate(Duration::from_secs(30)).await;
    assert_eq!(ledger(&pool).await, KEPT_LEDGER);
    // The deduplication records are the relay's to prune, the window registry the
    // aggregator's: the sink left them all.
    assert_eq!(deliveries(&pool).await, SEEDED_DELIVERIES);
    assert_eq!(registry(&pool).await, SEEDED_REGISTRY);
    ns.drop_databases().await;
}

#[tokio::test]
async fn the_aggregator_prunes_its_window_registry_on_its_own_and_refuses_a_short_retention() {
    let ns = Namespace::create().await;
    let pool = ns.pg_pool().await;
    seed(&pool).await;
    let seeded_ledger = ledger(&pool).await;

    refuses_a_short_retention(&ns, "aggregator", "RETENTION_WINDOWS_DAYS").await;

    let aggregator = ServiceProcess::spawn("aggregator", &pruning_env(&ns)).await;
    // The dirty old window is published (its meter is unknown: nothing goes out) and may then
    // go too; `meterline prune` above shows it is kept while dirty.
    let pruned = |rows: &[String]| {
        !rows.iter().any(|r| r == "win_old" || r == "win_day_50")
            && ["win_day_40", "win_new"]
                .iter()
                .all(|kept| rows.iter().any(|r| r == kept))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !pruned(&registry(&pool).await) {
        assert!(
            Instant::now() < deadline,
            "the aggregator did not prune within a minute: {:?}\n{}",
            registry(&pool).await,
            aggregator.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Rows that became prunable later go at the next round.
    registry_row(&pool, "win_late_old", 60, false).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while registry(&pool).await.contains(&"win_late_old".to_owned()) {
        assert!(Instant::now() < deadline, "{}", aggregator.log_tail());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    aggregator.terminate(Duration::from_secs(30)).await;
    assert!(pruned(&registry(&pool).await));
    // The ledger and the deduplication records are the other services' to prune.
    assert_eq!(ledger(&pool).await, seeded_ledger);
    assert_eq!(deliveries(&pool).await, SEEDED_DELIVERIES);
    ns.drop_databases().await;
}

/// The definition of the table that stores `events_processed`'s rows: on a cluster, every
/// node's local table, joined (each must carry the TTL).
async fn create_table_query(ns: &Namespace) -> String {
    let topology = meterline_common::clickhouse::Topology::of(&ns.clickhouse);
    let mut definitions = Vec::new();
    for client in topology.clients(meterline_common::clickhouse::Target::EveryNode) {
        definitions.push(
            client
                .query(
                    "SELECT create_table_query FROM system.tables WHERE database = ? AND name = ?",
                )
                .bind(&ns.clickhouse.database)
                .bind(topology.storage("events_processed"))
                .fetch_one::<String>()
                .await
                .expect("reading the table definition"),
        );
    }
    definitions.join("\n")
}

/// Whether every definition of `create_table_query` holds `ttl`.
fn every_node_has(definitions: &str, ttl: &str) -> bool {
    definitions.lines().all(|d| d.contains(ttl))
}

#[tokio::test]
async fn events_processed_has_a_ttl_that_migrate_can_change() {
    let ns = Namespace::create().await;
    let ddl = create_table_query(&ns).await;
    assert!(
        every_node_has(&ddl, "TTL toDateTime(timestamp) + toIntervalDay(400)"),
        "{ddl}"
    );

    let ns_env = ns.env();
    let output = run_command(
        "meterline",
        &env_with(&ns_env, &[("RETENTION_EVENTS_DAYS", "20")]),
        &["migrate"],
    )
    .await;
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    assert!(every_node_has(
        &create_table_query(&ns).await,
        "toIntervalDay(400)"
    ));

    let output = run_command(
        "meterline",
        &env_with(&ns_env, &[("RETENTION_EVENTS_DAYS", "90")]),
        &["migrate"],
    )
    .await;
    assert!(output.status.success(), "{output:?}");
    let ddl = create_table_query(&ns).await;
    assert!(
        every_node_has(&ddl, "TTL toDateTime(timestamp) + toIntervalDay(90)"),
        "{ddl}"
    );
    ns.drop_databases().await;
}
