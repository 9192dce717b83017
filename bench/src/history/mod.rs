//! `meterline-bench history`: what window totals cost as the deployment ages (more months of
//! history at the same monthly volume), on `events_processed` ordered by event id (ClickHouse
//! migrations 1 to 3, before migration 5) and on the time-ordered layout that replaced it.
//!
//! Order of one run: for each history length, for each layout, a fresh namespace whose
//! `events_processed` has that layout (the old one rebuilt from migrations 1 to 3's own
//! statements) and a TTL longer than the history (the default 400 days would drop most of 100
//! months at the merge); every customer's history on each of two meters (`--month-events` a
//! month, spread evenly over the months before the measured hour) and `HOUR_EVENTS` events
//! per customer and meter in the measured hour inserted with the `clickhouse` crate, then
//! merged (`OPTIMIZE ... FINAL`: the steady state of a table whose background merges caught
//! up). Then two measurements:
//! - the **due hour**: the hour's windows of every customer on both meters computed
//!   `--hour-rounds` times with the aggregator's own query (`Warehouse::window_aggregates`,
//!   one query per meter for all customers, as its publication groups them), and the rows
//!   ClickHouse plans to read for them (`EXPLAIN ESTIMATE` of the same query: whole granules
//!   its index cannot skip), per window;
//! - **one window**: `reads` window totals, one customer's hour each, in turn, read one after
//!   another exactly as `GET /v1/usage` reads them (`meterline_catalog::window_totals`).
//!
//! A total that does not count the hour's events fails the run.

use std::time::{Duration, Instant};

use aggregator::clickhouse::Warehouse;
use anyhow::{bail, Context};
use meterline_catalog::window_totals::{window_aggregates, WindowPlan};
use meterline_common::clickhouse::{ProcessedRow, MIGRATIONS};
use meterline_common::retention::{set_events_ttl, RetentionDays};
use meterline_schemas::{CustomerId, EnvironmentId, MeterId, TenantId, TimeRange, Timestamp};
use meterline_tests::{api, Namespace};
use time::OffsetDateTime;

use crate::procstat::{load_average, Machine};
use crate::report::Latency;
use crate::workload::{ENVIRONMENT, TENANT};

mod report;
pub use report::{HistoryReport, Layout, Reads};

/// Events of each customer on each meter in the measured hour.
const HOUR_EVENTS: u64 = 6;
/// Days of one month of history.
const MONTH_DAYS: i64 = 30;
/// Rows per insert.
const INSERT_ROWS: usize = 200_000;
const METERS: [&str; 2] = ["api_calls", "tokens"];

#[derive(Debug, Clone, clap::Args)]
pub struct Params {
    /// History lengths in months (of 30 days) before the measured hour (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    pub months: Vec<u64>,
    /// Events of each customer on each meter per month of history.
    #[arg(long, default_value_t = 40)]
    pub month_events: u64,
    /// Customers the history is spread over.
    #[arg(long, default_value_t = 1000)]
    pub customers: u64,
    /// Single window totals read per history size and layout.
    #[arg(long, default_value_t = 50)]
    pub reads: usize,
    /// Times the due hour's windows are computed per history size and layout.
    #[arg(long, default_value_t = 5)]
    pub hour_rounds: usize,
    /// Replace the history section of docs/benchmarks.md with this run's numbers.
    #[arg(long)]
    pub write_docs: bool,
}

pub async fn run(params: &Params) -> anyhow::Result<HistoryReport> {
    if params.customers == 0
        || params.reads == 0
        || params.hour_rounds == 0
        || params.month_events == 0
        || params.months.is_empty()
        || params.months.contains(&0)
    {
        bail!(
            "--customers, --reads, --hour-rounds, --month-events and each of --months must be \
             at least 1"
        );
    }
    let machine = Machine::read();
    let date = OffsetDateTime::now_utc();
    let hour = {
        let t = date.unix_timestamp() - 2 * 3600;
        OffsetDateTime::from_unix_timestamp(t - t.rem_euclid(3600))?
    };
    let mut cells = Vec::new();
    for &months in &params.months {
        let history = months * params.month_events * params.customers * METERS.len() as u64;
        for layout in [Layout::ById, Layout::ByTime] {
            let load = load_average();
            let ns = Namespace::create().await;
            if layout == Layout::ById {
                by_id_layout(&ns).await?;
            }
            keep_history(&ns, months).await?;
            fill(&ns, params, months, hour).await?;
            let (due_hour, rows_per_window) = compute_hour(&ns, params, hour).await?;
            let latency = read_hours(&ns, params, hour).await?;
            println!(
                "{months:>3} month(s) ({history:>9} rows), {:<11}: due hour {}; \
                 {rows_per_window} rows read per window; one window {}",
                layout.name(),
                due_hour.millis(1),
                latency.millis(2)
            );
            cells.push(Reads {
                layout,
                months,
                history,
                latency,
                due_hour,
                rows_per_window,
                load,
            });
            ns.drop_databases().await;
        }
    }
    Ok(HistoryReport {
        machine,
        date,
        customers: params.customers,
        meters: METERS.len(),
        hour_events: HOUR_EVENTS,
        month_events: params.month_events,
        reads: params.reads,
        hour_rounds: params.hour_rounds,
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

/// Sets the namespace's TTL past the oldest history row, so that the merge keeps all of it.
async fn keep_history(ns: &Namespace, months: u64) -> anyhow::Result<()> {
    let days = u32::try_from((months + 2) * MONTH_DAYS as u64)?;
    let days = RetentionDays::new(days).map_err(anyhow::Error::msg)?;
    set_events_ttl(&ns.clickhouse, days)
        .await
        .context("setting the history's TTL")
}

/// The benchmark's meters, parsed.
fn meter_ids() -> anyhow::Result<Vec<MeterId>> {
    Ok(METERS
        .iter()
        .map(|m| MeterId::parse(m))
        .collect::<Result<_, _>>()?)
}

fn customer(c: u64) -> String {
    format!("cust_history_{c:04}")
}

/// `months` of history of every customer on both meters, ending a day before `hour`, and
/// `HOUR_EVENTS` each in it, then merged.
async fn fill(
    ns: &Namespace,
    params: &Params,
    months: u64,
    hour: OffsetDateTime,
) -> anyhow::Result<()> {
    let per_series = months * params.month_events;
    let span_ms = months as i64 * MONTH_DAYS * 86_400_000;
    let start = hour - time::Duration::days(months as i64 * MONTH_DAYS + 1);
    let mut rows: Vec<(String, &str, String, OffsetDateTime)> = Vec::new();
    let client = ns.clickhouse();
    // In time order, so that an insert touches one or two monthly partitions (ClickHouse
    // refuses a block spanning more than 100).
    for i in 0..per_series {
        let at = start + time::Duration::milliseconds(span_ms * i as i64 / per_series as i64);
        for c in 0..params.customers {
            for meter in METERS {
                rows.push((customer(c), meter, format!("h{c}_{i}"), at));
            }
        }
        if rows.len() >= INSERT_ROWS {
            insert(&client, &std::mem::take(&mut rows)).await?;
        }
    }
    for c in 0..params.customers {
        for meter in METERS {
            for i in 0..HOUR_EVENTS {
                let at = hour + time::Duration::seconds(i as i64 * 599);
                rows.push((customer(c), meter, format!("w{c}_{i}"), at));
            }
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

/// The due hour's windows of every customer on both meters, computed `hour_rounds` times as
/// the aggregator computes them; and the rows ClickHouse plans to read for them, per window.
async fn compute_hour(
    ns: &Namespace,
    params: &Params,
    hour: OffsetDateTime,
) -> anyhow::Result<(Latency, u64)> {
    let warehouse = Warehouse::new(ns.clickhouse());
    let (tenant, environment) = (TenantId::parse(TENANT)?, EnvironmentId::parse(ENVIRONMENT)?);
    let customers: Vec<CustomerId> = (0..params.customers)
        .map(|c| CustomerId::parse(&customer(c)))
        .collect::<Result<_, _>>()?;
    let meters = meter_ids()?;
    let range = (hour, hour + time::Duration::HOUR);
    let mut samples = Vec::with_capacity(params.hour_rounds);
    for _ in 0..params.hour_rounds {
        let started = Instant::now();
        for meter in &meters {
            let totals = warehouse
                .window_aggregates(&tenant, &environment, meter, range, &customers)
                .await?;
            let complete = totals.len() == customers.len()
                && totals.values().all(|(a, _)| a.events == HOUR_EVENTS);
            if !complete {
                bail!(
                    "the due hour of {meter} did not count {HOUR_EVENTS} events for every customer"
                );
            }
        }
        samples.push(started.elapsed());
    }
    let mut rows = 0;
    for meter in &meters {
        rows += warehouse
            .window_aggregates_rows_to_read((&tenant, &environment, meter), range, &customers)
            .await?;
    }
    Ok((
        Latency::of(samples),
        rows / (customers.len() * meters.len()) as u64,
    ))
}

async fn insert(
    client: &clickhouse::Client,
    rows: &[(String, &str, String, OffsetDateTime)],
) -> anyhow::Result<()> {
    let mut insert = client
        .insert::<ProcessedRow<'_>>("events_processed")
        .await?;
    for (customer_id, meter_id, event_id, at) in rows {
        insert
            .write(&ProcessedRow {
                tenant_id: TENANT,
                environment_id: ENVIRONMENT,
                customer_id,
                meter_id,
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
    let meters = meter_ids()?;
    let range = TimeRange::new(
        Timestamp::new(hour)?,
        Timestamp::new(hour + time::Duration::HOUR)?,
    )?;
    let plan = WindowPlan::fixed(&range, 60, 1)?;
    let mut samples: Vec<Duration> = Vec::with_capacity(params.reads);
    for read in 0..params.reads {
        let who = CustomerId::parse(&customer(read as u64 % params.customers))?;
        let meter = &meters[read % meters.len()];
        let started = Instant::now();
        let totals = window_aggregates(&client, &scope, &who, meter, &plan).await?;
        samples.push(started.elapsed());
        let events: u64 = totals.iter().map(|(_, a)| a.events).sum();
        if events != HOUR_EVENTS {
            bail!("{who}'s hour read {events} events, not {HOUR_EVENTS}");
        }
    }
    Ok(Latency::of(samples))
}
