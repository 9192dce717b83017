//! `meterline-bench history`: what one window total costs as the customers' history grows, on
//! `events_processed` ordered by event id (ClickHouse migrations 1 to 3, before migration 5)
//! and on the time-ordered layout that replaced it.
//!
//! Order of one run: for each history size, for each layout, a fresh namespace whose
//! `events_processed` has that layout (the old one rebuilt from migrations 1 to 3's own
//! statements); every customer's history (spread evenly over the 90 days before the measured
//! hour) and 60 events in the measured hour inserted with the `clickhouse` crate, then merged
//! (`OPTIMIZE ... FINAL`: the steady state of a table whose background merges caught up); then
//! `reads` window totals, one customer's hour each, in turn, read one after another exactly as
//! `GET /v1/usage` reads them (`meterline_catalog::window_totals`). A read that does not give
//! the hour's 60 events fails the run.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use meterline_catalog::window_totals::{window_aggregates, WindowPlan};
use meterline_common::clickhouse::{ProcessedRow, MIGRATIONS};
use meterline_schemas::{CustomerId, MeterId, TimeRange, Timestamp};
use meterline_tests::{api, Namespace};
use time::OffsetDateTime;

use crate::procstat::{load_average, Machine};
use crate::report::Latency;
use crate::workload::{ENVIRONMENT, TENANT};

mod report;
pub use report::{HistoryReport, Layout, Reads};

/// Events of each customer in the measured hour.
const HOUR_EVENTS: u64 = 60;
/// The history ends this long before the measured hour and spans this many days.
const HISTORY_DAYS: i64 = 90;
/// Rows per insert.
const INSERT_ROWS: usize = 200_000;
const METER: &str = "api_calls";

#[derive(Debug, Clone, clap::Args)]
pub struct Params {
    /// History sizes: rows before the measured hour, over all customers (comma separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0,1000000,4000000,8000000"
    )]
    pub history: Vec<u64>,
    /// Customers the history is spread over.
    #[arg(long, default_value_t = 10)]
    pub customers: u64,
    /// Window totals read per history size and layout.
    #[arg(long, default_value_t = 50)]
    pub reads: usize,
    /// Replace the history section of docs/benchmarks.md with this run's numbers.
    #[arg(long)]
    pub write_docs: bool,
}

pub async fn run(params: &Params) -> anyhow::Result<HistoryReport> {
    if params.customers == 0 || params.reads == 0 || params.history.is_empty() {
        bail!("--customers, --reads and --history must be at least 1, 1 and one size");
    }
    let machine = Machine::read();
    let date = OffsetDateTime::now_utc();
    let hour = {
        let t = date.unix_timestamp() - 2 * 3600;
        OffsetDateTime::from_unix_timestamp(t - t.rem_euclid(3600))?
    };
    let mut cells = Vec::new();
    for &history in &params.history {
        for layout in [Layout::ById, Layout::ByTime] {
            let load = load_average();
            let ns = Namespace::create().await;
            if layout == Layout::ById {
                by_id_layout(&ns).await?;
            }
            fill(&ns, params.customers, history, hour).await?;
            let latency = read_hours(&ns, params, hour).await?;
            println!(
                "history {history:>9} rows, {:<11}: {}",
                layout.name(),
                latency.millis(2)
            );
            cells.push(Reads {
                layout,
                history,
                latency,
                load,
            });
            ns.drop_databases().await;
        }
    }
    Ok(HistoryReport {
        machine,
        date,
        customers: params.customers,
        hour_events: HOUR_EVENTS,
        history_days: HISTORY_DAYS,
        reads: params.reads,
        cells,
    })
}

/// Replaces the namespace's `events_processed` by the table migrations 1 to 3 made.
async fn by_id_layout(ns: &Namespace) -> anyhow::Result<()> {
    let client = ns.clickhouse();
    client
        .query("DROP TABLE events_processed SYNC")
        .execute()
        .await?;
    for statement in MIGRATIONS
        .iter()
        .filter(|m| m.version <= 3)
        .flat_map(|m| m.statements())
    {
        client
            .query(&statement)
            .execute()
            .await
            .with_context(|| format!("creating the old layout: {statement}"))?;
    }
    Ok(())
}

fn customer(c: u64) -> String {
    format!("cust_history_{c:04}")
}

/// `history` rows over `customers` customers before `hour`, and [`HOUR_EVENTS`] each in it,
/// then merged.
async fn fill(
    ns: &Namespace,
    customers: u64,
    history: u64,
    hour: OffsetDateTime,
) -> anyhow::Result<()> {
    let per_customer = history / customers;
    let span_ms = HISTORY_DAYS * 86_400_000;
    let start = hour - time::Duration::days(HISTORY_DAYS + 1);
    let mut rows: Vec<(String, String, OffsetDateTime)> = Vec::new();
    let client = ns.clickhouse();
    for c in 0..customers {
        for i in 0..per_customer {
            let offset = span_ms * i as i64 / per_customer.max(1) as i64;
            let at = start + time::Duration::milliseconds(offset);
            rows.push((customer(c), format!("h{c}_{i}"), at));
        }
        for i in 0..HOUR_EVENTS {
            let at = hour + time::Duration::seconds(i as i64 * 59);
            rows.push((customer(c), format!("w{c}_{i}"), at));
        }
        if rows.len() >= INSERT_ROWS {
            insert(&client, &std::mem::take(&mut rows)).await?;
        }
    }
    insert(&client, &rows).await?;
    client
        .query("OPTIMIZE TABLE events_processed FINAL")
        .with_setting("max_execution_time", "0")
        .execute()
        .await
        .context("merging events_processed")?;
    Ok(())
}

async fn insert(
    client: &clickhouse::Client,
    rows: &[(String, String, OffsetDateTime)],
) -> anyhow::Result<()> {
    let mut insert = client
        .insert::<ProcessedRow<'_>>("events_processed")
        .await?;
    for (customer_id, event_id, at) in rows {
        insert
            .write(&ProcessedRow {
                tenant_id: TENANT,
                environment_id: ENVIRONMENT,
                customer_id,
                meter_id: METER,
                event_id,
                timestamp: *at,
                qty_billable: 1_000_000_000,
                sign: 1,
                version: 1,
                ingested_at: *at,
                expired: 0,
                unique_key: "",
            })
            .await?;
    }
    insert.end().await.context("inserting history")
}

/// `reads` window totals, one customer's `hour` each, in turn.
async fn read_hours(
    ns: &Namespace,
    params: &Params,
    hour: OffsetDateTime,
) -> anyhow::Result<Latency> {
    let client = ns.clickhouse();
    let scope = api::scope(TENANT, ENVIRONMENT);
    let meter = MeterId::parse(METER)?;
    let range = TimeRange::new(
        Timestamp::new(hour)?,
        Timestamp::new(hour + time::Duration::HOUR)?,
    )?;
    let plan = WindowPlan::fixed(&range, 60, 1)?;
    let mut samples: Vec<Duration> = Vec::with_capacity(params.reads);
    for read in 0..params.reads {
        let who = CustomerId::parse(&customer(read as u64 % params.customers))?;
        let started = Instant::now();
        let totals = window_aggregates(&client, &scope, &who, &meter, &plan).await?;
        samples.push(started.elapsed());
        let events: u64 = totals.iter().map(|(_, a)| a.events).sum();
        if events != HOUR_EVENTS {
            bail!("{who}'s hour read {events} events, not {HOUR_EVENTS}");
        }
    }
    Ok(Latency::of(samples))
}
