//! `meterline-bench aggregator`: how many events per second the aggregator turns from
//! `usage.raw` into rows of `events_processed`, next to a direct insert of the same rows with
//! the `clickhouse` crate, and how long after a window ends its total is on `usage.windows`.
//!
//! Order of one run:
//! 1. Two fresh namespaces. In the aggregator's: a COUNT and a SUM meter on one event name
//!    (every event gives 2 rows) for the backlog tenant and for the live tenant, and a
//!    1-minute window size for the live tenant.
//! 2. The backlog: `--events` events (the 3 hourly windows before the previous hour, so
//!    every window is due at once with grace 0) written to `usage.raw` with a raw producer,
//!    untimed.
//! 3. Baseline: the same rows the aggregator will write (2 per event), inserted into the other
//!    namespace's `events_processed` with the `clickhouse` crate, sequentially, in inserts of
//!    the aggregator's default batch (50,000 events = 100,000 rows); then that database is
//!    dropped so its merges do not run beside the next phase.
//! 4. The release `aggregator` binary starts on the backlog; `count()` of `events_processed`
//!    is polled. The rate is measured from the first rows landing to the last (startup,
//!    the consumer group join and the first batch are excluded; the time from spawn is
//!    reported too). CPU seconds of the aggregator, ClickHouse and the broker from `/proc`.
//! 5. The backlog's windows are published (all at once, being hours past due); the time that
//!    takes is reported, it is not the lag of the issue.
//! 6. Live phase: `--live-customers` customers of the live tenant send `--live-rate` events/s
//!    with the current time for about `--live-seconds`, stopping at a minute boundary. Each
//!    first-revision total read from `usage.windows` gives a lag: read time - window end (the
//!    window's due time with grace 0). The aggregator's own publish-lag histogram over the same
//!    phase is reported beside it.
//! 7. Optionally a profiled pass: the aggregator is restarted on `--profile-events` more
//!    backlog events with `perf record` attached, so the measured pass ran without a profiler.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clickhouse::Row;
use meterline_common::kafka::{consumer_config, producer_config};
use meterline_schemas::{
    CustomerId, EnvironmentId, EventId, EventName, OffsetDateTime, RawUsageEvent, TenantId,
    Timestamp, Topic, WindowTotal,
};
use meterline_tests::usage::create_meter;
use meterline_tests::{stack, Namespace, ServiceProcess, Stack};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::baseline::{RawProducer, PRODUCE_TIMEOUT};
use crate::procstat::{self, Machine, Snapshot, Watchlist};
use crate::profile::{self, Profile, Recording};
use crate::report::{Latency, RoundRates};
use crate::rng::SplitMix64;
use crate::workload::{object, ENVIRONMENT, TENANT};

mod report;
pub use report::{
    AggregatorReport, BacklogPublication, LiveReport, AGGREGATOR_GOAL_EVENTS_PER_SECOND,
    AGGREGATOR_GOAL_RATIO,
};

/// The tenant of the live phase; its windows are 1 minute long.
pub const LIVE_TENANT: &str = "bench_live";
/// The aggregator's default `AGGREGATOR_BATCH_MAX_EVENTS`: the baseline inserts this many
/// events' rows at a time.
pub const BATCH_EVENTS: usize = 50_000;
/// Rows per event: one per meter (COUNT and SUM on the same event name).
pub const ROWS_PER_EVENT: usize = 2;
const EVENT_NAME: &str = "llm.tokens";
const COUNT_METER: &str = "requests";
const SUM_METER: &str = "tokens";
/// Events per write while pre-loading `usage.raw`.
const PRELOAD_CHUNK: usize = 20_000;
/// How often `count()` of `events_processed` is read during a consume phase.
const POLL: Duration = Duration::from_millis(50);
/// The longest a consume phase may take before the run fails.
const CONSUME_TIMEOUT: Duration = Duration::from_secs(1200);

#[derive(Debug, Clone, clap::Args)]
pub struct Params {
    /// Backlog events pre-loaded into usage.raw before the aggregator starts.
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Distinct customers of the backlog.
    #[arg(long, default_value_t = 2000)]
    pub customers: usize,
    /// Customers sending events in the live phase (1-minute windows).
    #[arg(long, default_value_t = 500)]
    pub live_customers: usize,
    /// Events per second sent in the live phase.
    #[arg(long, default_value_t = 2000)]
    pub live_rate: usize,
    /// Seconds of the live phase, rounded up to the next minute boundary; 0: no live phase.
    #[arg(long, default_value_t = 150)]
    pub live_seconds: u64,
    /// Backlog events consumed by a restarted aggregator under `perf record` after the
    /// measured phases; 0: no profile.
    #[arg(long, default_value_t = 300_000)]
    pub profile_events: usize,
    /// `STRIPE_SYNC_GRACE_PERIOD_MINUTES` of the aggregator. A diagnostic: with a few hours,
    /// the backlog's windows (ended 1 to 3 hours before the current hour) are not due and
    /// nothing is published while the backlog is consumed; lags are then measured from
    /// end + grace.
    #[arg(long, default_value_t = 0)]
    pub grace_minutes: u64,
    /// Rounds of the baseline then the aggregator, each pair on fresh namespaces and its own
    /// pre-loaded backlog; the goals are judged on the median round. The last round then goes
    /// on to the publication, live and profile phases. On a shared machine one round's ratio
    /// moves by a tenth from run to run, mostly with the baseline.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Replace the aggregator section of docs/benchmarks.md with this run's numbers.
    #[arg(long)]
    pub write_docs: bool,
}

pub async fn run(params: &Params) -> anyhow::Result<AggregatorReport> {
    if params.events == 0 || params.customers == 0 || params.rounds == 0 {
        bail!("--events, --customers and --rounds must be at least 1");
    }
    if params.live_seconds > 0 && (params.live_customers == 0 || params.live_rate == 0) {
        bail!("--live-customers and --live-rate must be at least 1 with a live phase");
    }
    let machine = Machine::read();
    let date = time::OffsetDateTime::now_utc();
    let stack = Stack::get();
    let root = stack::repo_root();
    let broker_pid = procstat::kafka_broker_pid(&root, &stack.kafka_brokers);
    let clickhouse_pid = procstat::clickhouse_server_pid(&root, &stack.clickhouse_url);
    let postgres_pid = procstat::listening_pid_of_url(&stack.database_url);
    procstat::warn_unaccounted(&[
        ("kafka broker", broker_pid),
        ("clickhouse server", clickhouse_pid),
        ("postgresql server", postgres_pid),
    ]);
    let watched = Watchlist::new()
        .process("aggregator", None)
        .process("clickhouse server", clickhouse_pid)
        .process("kafka broker", broker_pid)
        .tree("postgresql (all backends)", postgres_pid)
        .this_process("meterline-bench");

    let mut earlier_rounds = Vec::new();
    for number in 1..params.rounds {
        let round = measure_round(params, &watched).await?;
        earlier_rounds.push(round.rates(params.events));
        eprintln!(
            "round {number} of {}: ratio {:.2}",
            params.rounds,
            round.rates(params.events).ratio()
        );
        round.aggregator.terminate(Duration::from_secs(30)).await;
        round.ns.drop_databases().await;
    }
    let Round {
        ns,
        pool,
        mut generator,
        backlog,
        load_before_baseline,
        baseline_elapsed,
        baseline_cpu,
        env,
        load_before_aggregator,
        spawned_at,
        aggregator,
        aggregator_pid,
        watched,
        target,
        consumed,
    } = measure_round(params, &watched).await?;
    let metrics_after_backlog = scrape(&aggregator).await?;

    // 5. The backlog's windows, published once hours past due.
    let publication = if params.grace_minutes == 0 {
        wait_backlog_published(&pool, backlog.windows(), consumed.done).await?
    } else {
        BacklogPublication {
            after_last_row: None,
        }
    };

    // 6. Live phase.
    let load_before_live = procstat::load_average();
    let live = if params.live_seconds == 0 {
        None
    } else {
        let before = scrape(&aggregator).await?;
        let cpu_before = watched.snapshot()?;
        let started = Instant::now();
        let mut live = live_phase(&ns, params).await?;
        let cpu = watched.snapshot()?.since(&cpu_before);
        live.elapsed = started.elapsed();
        let after = scrape(&aggregator).await?;
        live.histogram = publish_lag_histogram(&before, &after);
        live.cpu = cpu.components();
        Some(live)
    };
    let peak_rss_kib = procstat::memory(aggregator_pid).ok().map(|m| m.peak_kib);
    let metrics_end = scrape(&aggregator).await?;
    aggregator.terminate(Duration::from_secs(30)).await;

    // 7. Profiled pass on a restarted aggregator.
    let profile = if params.profile_events == 0 {
        Err("disabled (--profile-events 0)".to_owned())
    } else {
        profiled_pass(&ns, &env, &mut generator, params, target).await
    };
    if let Err(reason) = &profile {
        eprintln!("profile: {reason}");
    }
    ns.drop_databases().await;

    Ok(AggregatorReport {
        machine,
        date,
        load_before_baseline,
        load_before_aggregator,
        load_before_live,
        earlier_rounds,
        events: params.events,
        customers: params.customers,
        batch_events: BATCH_EVENTS,
        grace_minutes: params.grace_minutes,
        partitions: meterline_tests::namespace::TEST_PARTITIONS,
        backlog_windows: backlog.windows(),
        baseline_elapsed,
        first_rows: consumed.first_rows,
        measured_elapsed: consumed.done - consumed.first,
        startup: consumed.first - spawned_at,
        from_spawn: consumed.done - spawned_at,
        aggregator_cpu: consumed.cpu.components(),
        baseline_cpu: baseline_cpu.components(),
        insert_seconds: metric_value(
            &metrics_after_backlog,
            "aggregator_clickhouse_insert_duration_seconds_sum",
        ),
        inserts: metric_value(
            &metrics_after_backlog,
            "aggregator_clickhouse_insert_duration_seconds_count",
        ),
        publication,
        windows_published: ["due", "late"]
            .map(|r| {
                let name = format!("aggregator_windows_published_total{{reason=\"{r}\"}}");
                (r, metric_value(&metrics_end, &name).unwrap_or(0.0) as u64)
            })
            .to_vec(),
        live,
        peak_rss_kib,
        profile,
        profile_events: params.profile_events,
    })
}

/// One round's namespaces, backlog, baseline and aggregator, the aggregator still running
/// after consuming the backlog.
struct Round {
    ns: Namespace,
    pool: sqlx::PgPool,
    generator: Generator,
    backlog: Backlog,
    load_before_baseline: f64,
    baseline_elapsed: Duration,
    baseline_cpu: Snapshot,
    env: Vec<(String, String)>,
    load_before_aggregator: f64,
    spawned_at: Instant,
    aggregator: ServiceProcess,
    aggregator_pid: u32,
    /// What the round's phases account, the aggregator's pid included.
    watched: Watchlist,
    target: u64,
    consumed: Consumed,
}

impl Round {
    fn rates(&self, events: usize) -> RoundRates {
        RoundRates {
            load_before_baseline: self.load_before_baseline,
            baseline_rate: events as f64 / self.baseline_elapsed.as_secs_f64(),
            rate: aggregator_rate(
                self.target,
                self.consumed.first_rows,
                self.consumed.done - self.consumed.first,
                self.consumed.done - self.spawned_at,
            ),
        }
    }
}

/// Steps 1 to 4 of a round: fresh namespaces and meters, the backlog pre-loaded, the
/// baseline's direct insert of its rows, then the aggregator consuming it.
async fn measure_round(params: &Params, watched: &Watchlist) -> anyhow::Result<Round> {
    // 1. Namespaces, meters, the live tenant's window size.
    let baseline_ns = Namespace::create().await;
    let ns = Namespace::create().await;
    for tenant in [TENANT, LIVE_TENANT] {
        create_meter(
            &ns,
            tenant,
            ENVIRONMENT,
            json!({"id": COUNT_METER, "event_name": EVENT_NAME, "aggregation": "COUNT"}),
        )
        .await;
        create_meter(
            &ns,
            tenant,
            ENVIRONMENT,
            json!({"id": SUM_METER, "event_name": EVENT_NAME, "aggregation": "SUM", "property": "tokens"}),
        )
        .await;
    }
    let pool = ns.pg_pool().await;
    sqlx::query(
        "INSERT INTO aggregation_window_sizes
             (tenant_id, environment_id, effective_from, window_minutes)
         VALUES ($1, $2, $3, 1)",
    )
    .bind(LIVE_TENANT)
    .bind(ENVIRONMENT)
    .bind(OffsetDateTime::UNIX_EPOCH)
    .execute(&pool)
    .await
    .context("setting the live tenant's window size")?;

    // 2. The backlog, in usage.raw before the aggregator starts.
    let started = Instant::now();
    let mut generator = Generator::new(params.customers);
    let backlog = preload(&ns, &mut generator, params.events).await?;
    eprintln!(
        "pre-loaded {} events into {} in {:.1}s",
        params.events,
        ns.topic(Topic::UsageRaw),
        started.elapsed().as_secs_f64()
    );

    // 3. Baseline: the same rows, inserted directly.
    let rows = backlog.rows();
    let load_before_baseline = procstat::load_average();
    let cpu_before = watched.snapshot()?;
    let baseline_elapsed = direct_insert(&baseline_ns, &rows).await?;
    let baseline_cpu = watched.snapshot()?.since(&cpu_before);
    let baseline_count = count_rows(&baseline_ns).await?;
    if baseline_count != rows.len() as u64 {
        bail!(
            "the baseline inserted {} rows but events_processed holds {baseline_count}",
            rows.len()
        );
    }
    drop(rows);
    baseline_ns.drop_databases().await;
    eprintln!(
        "baseline: {} rows inserted directly in {:.2}s",
        baseline_count,
        baseline_elapsed.as_secs_f64()
    );

    // 4. The aggregator on the backlog.
    let mut env = ns.env();
    env.push((
        "STRIPE_SYNC_GRACE_PERIOD_MINUTES".into(),
        params.grace_minutes.to_string(),
    ));
    let load_before_aggregator = procstat::load_average();
    let spawned_at = Instant::now();
    let aggregator = ServiceProcess::spawn("aggregator", &env).await;
    let aggregator_pid = aggregator
        .pid()
        .context("the aggregator process has a pid")?;
    eprintln!("aggregator: pid {aggregator_pid}, consuming the backlog");
    let target = (params.events * ROWS_PER_EVENT) as u64;
    let watched = watched.with_pid("aggregator", aggregator_pid);
    let consumed = consume(&ns, target, aggregator_pid, &watched).await?;
    Ok(Round {
        ns,
        pool,
        generator,
        backlog,
        load_before_baseline,
        baseline_elapsed,
        baseline_cpu,
        env,
        load_before_aggregator,
        spawned_at,
        aggregator,
        aggregator_pid,
        watched,
        target,
        consumed,
    })
}

/// Events/s from the first rows landing to the last (rows already in when they were first
/// seen are left out); from spawn when the first poll already saw every row.
pub(crate) fn aggregator_rate(
    target_rows: u64,
    first_rows: u64,
    measured: Duration,
    from_spawn: Duration,
) -> f64 {
    let events = target_rows.saturating_sub(first_rows) as f64 / ROWS_PER_EVENT as f64;
    if events > 0.0 && !measured.is_zero() {
        events / measured.as_secs_f64()
    } else {
        target_rows as f64 / ROWS_PER_EVENT as f64 / from_spawn.as_secs_f64()
    }
}

/// What the consume phase measured.
struct Consumed {
    /// When `count()` first showed rows, and how many.
    first: Instant,
    first_rows: u64,
    /// When `count()` reached the target.
    done: Instant,
    /// CPU between `first` and `done`.
    cpu: Snapshot,
}

/// Polls `count()` of `events_processed` until it reaches `target`; CPU seconds are read when
/// the first rows land and when the last do.
async fn consume(
    ns: &Namespace,
    target: u64,
    aggregator_pid: u32,
    watched: &Watchlist,
) -> anyhow::Result<Consumed> {
    let deadline = Instant::now() + CONSUME_TIMEOUT;
    let mut first: Option<(Instant, u64, Snapshot)> = None;
    let mut last_report = Instant::now();
    loop {
        let rows = count_rows(ns).await?;
        let now = Instant::now();
        if rows > 0 && first.is_none() {
            first = Some((now, rows, watched.snapshot()?));
        }
        if rows >= target {
            let (first, first_rows, before) = first.context("rows were seen")?;
            let cpu = watched.snapshot()?.since(&before);
            if rows > target {
                eprintln!("note: {rows} rows for {target} expected (redelivered copies)");
            }
            return Ok(Consumed {
                first,
                first_rows,
                done: now,
                cpu,
            });
        }
        if !procstat::is_running(aggregator_pid) {
            bail!("the aggregator exited with {rows} of {target} rows inserted");
        }
        if now > deadline {
            bail!("only {rows} of {target} rows after {CONSUME_TIMEOUT:?}");
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!("  {rows} of {target} rows");
            last_report = Instant::now();
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Rows in the namespace's `events_processed`.
pub(crate) async fn count_rows(ns: &Namespace) -> anyhow::Result<u64> {
    ns.clickhouse()
        .query("SELECT count() FROM events_processed")
        .fetch_one::<u64>()
        .await
        .context("counting events_processed")
}

/// Waits until every backlog window is registered and none is dirty any more.
async fn wait_backlog_published(
    pool: &sqlx::PgPool,
    windows: usize,
    rows_done: Instant,
) -> anyhow::Result<BacklogPublication> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let (total, dirty): (i64, i64) = sqlx::query_as(
            "SELECT count(*), count(*) FILTER (WHERE dirty) FROM aggregation_windows
             WHERE tenant_id = $1",
        )
        .bind(TENANT)
        .fetch_one(pool)
        .await
        .context("reading aggregation_windows")?;
        if total as usize >= windows && dirty == 0 {
            return Ok(BacklogPublication {
                after_last_row: Some(rows_done.elapsed()),
            });
        }
        if Instant::now() > deadline {
            eprintln!("backlog windows: {dirty} of {total} still dirty after 600s; going on");
            return Ok(BacklogPublication {
                after_last_row: None,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Backlog events as the generator made them, kept compact for the baseline's rows.
struct Backlog {
    events: Vec<Compact>,
    customers: Vec<String>,
}

struct Compact {
    customer: u32,
    event_id: String,
    timestamp: OffsetDateTime,
    tokens: u64,
    ingested_at: OffsetDateTime,
}

impl Backlog {
    /// Distinct (customer, meter, window) of the backlog.
    fn windows(&self) -> usize {
        let keys: HashSet<(u32, i64)> = self
            .events
            .iter()
            .map(|e| {
                let t = e.timestamp.unix_timestamp();
                (e.customer, t - t.rem_euclid(3600))
            })
            .collect();
        keys.len() * ROWS_PER_EVENT
    }

    /// The rows the aggregator writes for these events, in event order.
    fn rows(&self) -> Vec<DirectRow<'_>> {
        let mut rows = Vec::with_capacity(self.events.len() * ROWS_PER_EVENT);
        for e in &self.events {
            let customer = self.customers[e.customer as usize].as_str();
            for (meter, quantity) in [(COUNT_METER, 1), (SUM_METER, e.tokens)] {
                rows.push(DirectRow {
                    tenant_id: TENANT,
                    environment_id: ENVIRONMENT,
                    customer_id: customer,
                    meter_id: meter,
                    event_id: &e.event_id,
                    timestamp: e.timestamp,
                    // Decimal(38, 9): the quantity scaled by 10^9, as the aggregator sends it.
                    qty_billable: i128::from(quantity) * 1_000_000_000,
                    sign: 1,
                    version: (e.ingested_at.unix_timestamp_nanos() / 1_000_000) as u64,
                    ingested_at: e.ingested_at,
                    expired: 0,
                    unique_key: "",
                });
            }
        }
        rows
    }
}

/// A row of `events_processed`, field for field the aggregator's `ProcessedRow`
/// (`aggregator/src/clickhouse.rs`, private there).
#[derive(Debug, Row, Serialize)]
struct DirectRow<'a> {
    tenant_id: &'a str,
    environment_id: &'a str,
    customer_id: &'a str,
    meter_id: &'a str,
    event_id: &'a str,
    #[serde(with = "clickhouse::serde::time::datetime64::millis")]
    timestamp: OffsetDateTime,
    qty_billable: i128,
    sign: i8,
    version: u64,
    #[serde(with = "clickhouse::serde::time::datetime64::millis")]
    ingested_at: OffsetDateTime,
    expired: u8,
    unique_key: &'a str,
}

/// Inserts `rows` into the namespace's `events_processed`, one insert per aggregator batch,
/// one after the other, as the aggregator does; returns the elapsed time.
async fn direct_insert(ns: &Namespace, rows: &[DirectRow<'_>]) -> anyhow::Result<Duration> {
    let client = ns.clickhouse();
    let started = Instant::now();
    for chunk in rows.chunks(BATCH_EVENTS * ROWS_PER_EVENT) {
        let mut insert = client
            .insert::<DirectRow<'_>>("events_processed")
            .await
            .context("starting a baseline insert")?;
        for row in chunk {
            insert.write(row).await.context("writing a baseline row")?;
        }
        insert.end().await.context("ending a baseline insert")?;
    }
    Ok(started.elapsed())
}

/// Writes `count` backlog events to `usage.raw`, keeping their compact form.
async fn preload(
    ns: &Namespace,
    generator: &mut Generator,
    count: usize,
) -> anyhow::Result<Backlog> {
    let producer = RawProducer::new(&ns.kafka, ns.topic(Topic::UsageRaw))?;
    let mut events = Vec::with_capacity(count);
    let mut left = count;
    while left > 0 {
        let n = left.min(PRELOAD_CHUNK);
        let (chunk, customers) = generator.backlog_events(n)?;
        producer.write_batch(&chunk).await?;
        events.extend(chunk.into_iter().zip(customers).map(|(e, customer)| {
            Compact {
                customer,
                timestamp: e.timestamp.as_offset_date_time(),
                tokens: e.properties["tokens"].as_u64().unwrap_or(0),
                ingested_at: e
                    .ingested_at
                    .map_or(e.timestamp.as_offset_date_time(), |t| {
                        t.as_offset_date_time()
                    }),
                event_id: e.id.into_string(),
            }
        }));
        left -= n;
    }
    Ok(Backlog {
        events,
        customers: (0..generator.customers).map(customer_name).collect(),
    })
}

fn customer_name(index: usize) -> String {
    format!("cust_{index:06}")
}

/// Backlog events: spread over `customers` customers and the 3 whole hours before the
/// previous one (windows that ended 1 to 3 hours before the current hour began), with
/// LLM-usage-like properties. A fixed seed gives the same shapes.
struct Generator {
    rng: SplitMix64,
    customers: usize,
    /// The start of the oldest of the 3 hours.
    first_hour: i64,
}

impl Generator {
    fn new(customers: usize) -> Self {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        Self {
            rng: SplitMix64::new(0x6167_6772_6567_6174),
            customers,
            first_hour: now - now.rem_euclid(3600) - 4 * 3600,
        }
    }

    /// `n` events, and the index of each one's customer.
    fn backlog_events(&mut self, n: usize) -> anyhow::Result<(Vec<RawUsageEvent>, Vec<u32>)> {
        let tenant = TenantId::parse(TENANT)?;
        let environment = EnvironmentId::parse(ENVIRONMENT)?;
        let name = EventName::parse(EVENT_NAME)?;
        let ingested_at = Timestamp::now();
        let mut events = Vec::with_capacity(n);
        let mut customers = Vec::with_capacity(n);
        for _ in 0..n {
            let customer = self.rng.below(self.customers as u64) as u32;
            let ms = self.first_hour * 1000 + self.rng.below(3 * 3_600_000) as i64;
            let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)?;
            events.push(RawUsageEvent {
                id: EventId::generate(),
                tenant_id: tenant.clone(),
                environment_id: environment.clone(),
                customer_id: CustomerId::parse(&customer_name(customer as usize))?,
                event_name: name.clone(),
                timestamp: Timestamp::new(at)?,
                properties: properties(&mut self.rng),
                source: None,
                ingested_at: Some(ingested_at),
            });
            customers.push(customer);
        }
        Ok((events, customers))
    }
}

fn properties(rng: &mut SplitMix64) -> Map<String, Value> {
    const REGIONS: [&str; 4] = ["eu-west-1", "us-east-1", "us-west-2", "ap-southeast-1"];
    object(json!({
        "model": if rng.below(3) == 0 { "large-2" } else { "small-3" },
        "tokens": rng.below(4000) + 1,
        "region": REGIONS[rng.below(4) as usize],
    }))
}

/// The live phase: events of the live tenant (1-minute windows) at `--live-rate`, and every
/// total of that tenant read from `usage.windows` with the instant it was read.
async fn live_phase(ns: &Namespace, params: &Params) -> anyhow::Result<LiveReport> {
    let watcher = Watcher::start(ns)?;
    watcher.wait_assigned(Duration::from_secs(30)).await?;

    let producer: FutureProducer =
        producer_config(&ns.kafka, "meterline-bench-live", PRODUCE_TIMEOUT)
            .create()
            .context("creating the live producer")?;
    let topic = ns.topic(Topic::UsageRaw);
    let tenant = TenantId::parse(LIVE_TENANT)?;
    let environment = EnvironmentId::parse(ENVIRONMENT)?;
    let name = EventName::parse(EVENT_NAME)?;
    let customers: Vec<CustomerId> = (0..params.live_customers)
        .map(|i| CustomerId::parse(&format!("cust_l{i:05}")))
        .collect::<Result<_, _>>()?;
    let mut rng = SplitMix64::new(0x6c69_7665);

    let started = OffsetDateTime::now_utc();
    let end = started + time::Duration::seconds(params.live_seconds as i64);
    let end_s = end.unix_timestamp();
    let stop = OffsetDateTime::from_unix_timestamp(end_s + (60 - end_s.rem_euclid(60)) % 60)?;
    eprintln!(
        "live phase: {} customers, {} events/s, until {} ({:.0}s)",
        params.live_customers,
        params.live_rate,
        Timestamp::new(stop)?,
        (stop - started).as_seconds_f64()
    );
    // Events sent per (customer index, window start).
    let mut sent: HashMap<(usize, i64), u64> = HashMap::new();
    let tick = Duration::from_millis(100);
    let per_tick = params.live_rate.div_ceil(10).max(1);
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next_customer = 0usize;
    let mut events_sent = 0u64;
    'send: loop {
        ticker.tick().await;
        let mut messages = Vec::with_capacity(per_tick);
        for _ in 0..per_tick {
            let now = OffsetDateTime::now_utc();
            if now >= stop {
                break;
            }
            let c = next_customer;
            next_customer = (next_customer + 1) % customers.len();
            let event = RawUsageEvent {
                id: EventId::generate(),
                tenant_id: tenant.clone(),
                environment_id: environment.clone(),
                customer_id: customers[c].clone(),
                event_name: name.clone(),
                timestamp: Timestamp::new(now)?,
                properties: properties(&mut rng),
                source: None,
                ingested_at: Some(Timestamp::new(now)?),
            };
            let t = now.unix_timestamp();
            *sent.entry((c, t - t.rem_euclid(60))).or_default() += 1;
            messages.push((event.kafka_key(), event.to_json_bytes()));
        }
        let sends = messages.iter().map(|(key, payload)| {
            producer.send(
                FutureRecord::to(&topic).key(key).payload(payload),
                Timeout::After(PRODUCE_TIMEOUT),
            )
        });
        for outcome in futures::future::join_all(sends).await {
            outcome.map_err(|(e, _)| anyhow::anyhow!("kafka refused a live event: {e}"))?;
        }
        events_sent += messages.len() as u64;
        if messages.len() < per_tick {
            break 'send;
        }
    }
    let sending = OffsetDateTime::now_utc() - started;

    // Every (customer, meter, window) sent must come out with its full count.
    let expected: HashMap<(String, String, i64), u64> = sent
        .iter()
        .flat_map(|(&(c, start), &n)| {
            [COUNT_METER, SUM_METER]
                .map(|m| ((customers[c].as_str().to_owned(), m.to_owned(), start), n))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let complete = watcher.complete(&expected);
        if complete == expected.len() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A little longer, for late revisions of the last windows.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = watcher.stop();

    let mut first: BTreeMap<(String, String, i64), Duration> = BTreeMap::new();
    let mut complete: BTreeMap<(String, String, i64), Duration> = BTreeMap::new();
    let mut republished = HashSet::new();
    for (total, read_at) in &seen {
        let key = (
            total.customer_id.as_str().to_owned(),
            total.meter_id.as_str().to_owned(),
            total.window.start().unix_timestamp(),
        );
        let due = total.window.end() + time::Duration::minutes(params.grace_minutes as i64);
        let lag = (*read_at - due).max(time::Duration::ZERO);
        let lag = Duration::try_from(lag).unwrap_or_default();
        if total.revision.get() == 1 {
            first.entry(key.clone()).or_insert(lag);
        } else {
            republished.insert(key.clone());
        }
        if expected.get(&key) == Some(&total.event_count) {
            complete.entry(key).or_insert(lag);
        }
    }
    Ok(LiveReport {
        customers: params.live_customers,
        rate: params.live_rate,
        events: events_sent,
        sending: Duration::try_from(sending).unwrap_or_default(),
        elapsed: Duration::ZERO,
        windows: expected.len(),
        missing: expected.keys().filter(|k| !first.contains_key(*k)).count(),
        incomplete: expected
            .keys()
            .filter(|k| !complete.contains_key(*k))
            .count(),
        republished: republished.len(),
        first: Latency::of(first.into_values().collect()),
        complete: Latency::of(complete.into_values().collect()),
        histogram: None,
        cpu: Vec::new(),
    })
}

/// Reads the live tenant's totals from `usage.windows`, with the instant each was read.
struct Watcher {
    consumer: Arc<StreamConsumer>,
    seen: Arc<Mutex<Vec<(WindowTotal, OffsetDateTime)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    fn start(ns: &Namespace) -> anyhow::Result<Watcher> {
        let group = format!("{}-bench-windows", ns.id);
        // Only what is published from now on: the backlog's windows are not read.
        let consumer: StreamConsumer = consumer_config(&ns.kafka, "meterline-bench", &group)
            .set("auto.offset.reset", "latest")
            .create()
            .context("creating the usage.windows reader")?;
        consumer
            .subscribe(&[&ns.topic(Topic::UsageWindows)])
            .context("subscribing to usage.windows")?;
        let consumer = Arc::new(consumer);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (consumer, seen) = (consumer.clone(), seen.clone());
            async move {
                loop {
                    match consumer.recv().await {
                        Ok(m) => {
                            let read_at = OffsetDateTime::now_utc();
                            let Ok(total) =
                                WindowTotal::from_json_bytes(m.payload().unwrap_or_default())
                            else {
                                eprintln!("usage.windows: an invalid total");
                                continue;
                            };
                            if total.tenant_id.as_str() == LIVE_TENANT {
                                seen.lock().expect("not poisoned").push((total, read_at));
                            }
                        }
                        Err(e) => {
                            eprintln!("usage.windows: {e}");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            }
        });
        Ok(Watcher {
            consumer,
            seen,
            task,
        })
    }

    /// Waits until the group gave the reader its partitions and their positions are known.
    async fn wait_assigned(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let assigned = self.consumer.assignment().map(|a| a.count()).unwrap_or(0);
            if assigned > 0 {
                // The positions are fetched (at the end, `latest`) right after assignment.
                tokio::time::sleep(Duration::from_secs(1)).await;
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the usage.windows reader got no partitions within {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many expected windows were read with their full event count.
    fn complete(&self, expected: &HashMap<(String, String, i64), u64>) -> usize {
        let seen = self.seen.lock().expect("not poisoned");
        let done: HashSet<(String, String, i64)> = seen
            .iter()
            .filter_map(|(t, _)| {
                let key = (
                    t.customer_id.as_str().to_owned(),
                    t.meter_id.as_str().to_owned(),
                    t.window.start().unix_timestamp(),
                );
                (expected.get(&key) == Some(&t.event_count)).then_some(key)
            })
            .collect();
        done.len()
    }

    fn stop(self) -> Vec<(WindowTotal, OffsetDateTime)> {
        self.task.abort();
        std::mem::take(&mut *self.seen.lock().expect("not poisoned"))
    }
}

/// Restarts the aggregator on `profile_events` more backlog events with `perf record`
/// attached; `rows_before` rows are already in `events_processed`.
async fn profiled_pass(
    ns: &Namespace,
    env: &[(String, String)],
    generator: &mut Generator,
    params: &Params,
    rows_before: u64,
) -> Result<Profile, String> {
    let scratch = std::env::temp_dir();
    if let Some(reason) = profile::unavailable_reason(&scratch) {
        return Err(reason);
    }
    let fail = |e: anyhow::Error| format!("{e:#}");
    // The live phase added rows: count what is there now.
    let before = count_rows(ns).await.map_err(fail)?.max(rows_before);
    preload(ns, generator, params.profile_events)
        .await
        .map_err(fail)?;
    let aggregator = ServiceProcess::spawn("aggregator", env).await;
    let pid = aggregator
        .pid()
        .ok_or_else(|| "the aggregator has no pid".to_owned())?;
    let data = aggregator.log.with_extension("perf.data");
    let recording = Recording::start(pid, data).map_err(fail)?;
    let target = before + (params.profile_events * ROWS_PER_EVENT) as u64;
    let watched = Watchlist::new()
        .process("aggregator", Some(pid))
        .this_process("meterline-bench");
    let consumed = consume(ns, target, pid, &watched).await;
    let profile = recording.finish().map_err(fail);
    aggregator.terminate(Duration::from_secs(30)).await;
    consumed.map_err(|e| format!("the profiled pass failed: {e:#}"))?;
    profile
}

/// The aggregator's `/metrics` text.
async fn scrape(aggregator: &ServiceProcess) -> anyhow::Result<String> {
    reqwest::get(aggregator.url("/metrics"))
        .await
        .context("reading the aggregator's /metrics")?
        .text()
        .await
        .context("reading the aggregator's /metrics")
}

/// The value of the sample named exactly `name` (labels included) in a Prometheus text.
fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (sample, value) = line.rsplit_once(' ')?;
        (sample == name).then(|| value.parse().ok()).flatten()
    })
}

/// The buckets `(le, cumulative count)` of a histogram.
fn buckets(text: &str, histogram: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{histogram}_bucket{{le=\"");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (le, value) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, value.trim().parse().ok()?))
        })
        .collect()
}

/// The aggregator's publish-lag histogram between two scrapes: observations, and the upper
/// bounds of the buckets holding the median and the 99th percentile.
fn publish_lag_histogram(before: &str, after: &str) -> Option<(u64, f64, f64)> {
    const NAME: &str = "aggregator_window_publish_lag_seconds";
    let before = buckets(before, NAME);
    let after = buckets(after, NAME);
    let diff: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, n)| {
            let was = before
                .iter()
                .find(|(b, _)| *b == le)
                .map_or(0.0, |(_, n)| *n);
            (le, n - was)
        })
        .collect();
    let total = diff.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let bound = |p: f64| {
        diff.iter()
            .find(|(_, n)| *n >= p * total)
            .map_or(f64::INFINITY, |(le, _)| *le)
    };
    Some((total as u64, bound(0.5), bound(0.99)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "\
# TYPE aggregator_window_publish_lag_seconds histogram
aggregator_window_publish_lag_seconds_bucket{le=\"0.5\"} 0
aggregator_window_publish_lag_seconds_bucket{le=\"1\"} 10
aggregator_window_publish_lag_seconds_bucket{le=\"2.5\"} 100
aggregator_window_publish_lag_seconds_bucket{le=\"+Inf\"} 120
aggregator_window_publish_lag_seconds_sum 300
aggregator_window_publish_lag_seconds_count 120
aggregator_windows_published_total{reason=\"due\"} 120
";

    #[test]
    fn metrics_are_read_from_the_prometheus_text() {
        assert_eq!(
            metric_value(
                METRICS,
                "aggregator_windows_published_total{reason=\"due\"}"
            ),
            Some(120.0)
        );
        assert_eq!(
            metric_value(METRICS, "aggregator_window_publish_lag_seconds_sum"),
            Some(300.0)
        );
        assert_eq!(
            buckets(METRICS, "aggregator_window_publish_lag_seconds").len(),
            4
        );
        let before = "aggregator_window_publish_lag_seconds_bucket{le=\"+Inf\"} 20\n\
                      aggregator_window_publish_lag_seconds_bucket{le=\"1\"} 0\n";
        // 100 new observations: 10 at <= 1 s, 90 more at <= 2.5 s, 0 above.
        assert_eq!(
            publish_lag_histogram(before, METRICS),
            Some((100, 2.5, 2.5))
        );
    }

    #[test]
    fn backlog_rows_match_the_aggregator_s_rows() {
        let mut g = Generator::new(10);
        let (events, customers) = g.backlog_events(3).unwrap();
        assert!(customers.iter().all(|c| *c < 10));
        let backlog = Backlog {
            events: events
                .iter()
                .map(|e| Compact {
                    customer: 1,
                    event_id: e.id.as_str().to_owned(),
                    timestamp: e.timestamp.as_offset_date_time(),
                    tokens: e.properties["tokens"].as_u64().unwrap(),
                    ingested_at: e.ingested_at.unwrap().as_offset_date_time(),
                })
                .collect(),
            customers: (0..10).map(customer_name).collect(),
        };
        let rows = backlog.rows();
        assert_eq!(rows.len(), 6);
        assert_eq!(rows[0].meter_id, COUNT_METER);
        assert_eq!(rows[0].qty_billable, 1_000_000_000);
        assert_eq!(
            rows[1].qty_billable,
            i128::from(backlog.events[0].tokens) * 1_000_000_000
        );
        assert_eq!(rows[1].customer_id, "cust_000001");
        // Every event falls in one of the 3 hours before the previous hour: 1 to 5 hours old.
        let now = OffsetDateTime::now_utc();
        for e in &events {
            let age = now - e.timestamp.as_offset_date_time();
            assert!(age > time::Duration::HOUR && age < time::Duration::hours(5));
        }
    }
}
