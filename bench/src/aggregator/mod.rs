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
//!
//! Here: the rounds, the consume phase and the profiled pass; the backlog and the baseline's
//! rows in `backlog`, the live phase in `live`, the aggregator's `/metrics` in `metrics`, the
//! result's text and docs section in `report`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use meterline_schemas::{OffsetDateTime, Topic};
use meterline_tests::usage::create_meter;
use meterline_tests::{Namespace, ServiceProcess};
use serde_json::json;

use crate::procstat::{self, Machine, Server, Snapshot, Watchlist};
use crate::profile::{self, Profile, Recording};
use crate::report::Phase;
use crate::rounds::{self, Baseline, RoundRates};
use crate::workload::{ENVIRONMENT, TENANT};

mod backlog;
mod live;
pub(crate) mod metrics;
mod report;

use backlog::{direct_insert, preload, Backlog, Generator};
use live::live_phase;
use metrics::{metric_value, publish_lag_histogram, scrape};
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
    let [broker_pid, clickhouse_pid, postgres_pid] =
        procstat::stack_pids([Server::KafkaBroker, Server::ClickHouse, Server::Postgres]);
    let watched = Watchlist::new()
        .process("aggregator", None)
        .process("clickhouse server", clickhouse_pid)
        .process("kafka broker", broker_pid)
        .tree("postgresql (all backends)", postgres_pid)
        .this_process("meterline-bench");

    let (earlier_rounds, mut round) = rounds::run_rounds(params.rounds, params.events, || {
        measure_round(params, &watched)
    })
    .await?;
    let metrics_after_backlog = scrape(&round.aggregator).await?;

    // 5. The backlog's windows, published once hours past due.
    let publication = if params.grace_minutes == 0 {
        wait_backlog_published(&round.pool, round.backlog.windows(), round.consumed.done).await?
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
        let before = scrape(&round.aggregator).await?;
        let cpu_before = round.watched.snapshot()?;
        let started = Instant::now();
        let mut live = live_phase(&round.ns, params).await?;
        let cpu = round.watched.snapshot()?.since(&cpu_before);
        live.phase = Phase::new(started.elapsed(), &cpu);
        let after = scrape(&round.aggregator).await?;
        live.histogram = publish_lag_histogram(&before, &after);
        Some(live)
    };
    let peak_rss_kib = procstat::memory(round.aggregator_pid)
        .ok()
        .map(|m| m.peak_kib);
    let metrics_end = scrape(&round.aggregator).await?;
    round.aggregator.terminate(Duration::from_secs(30)).await;

    // 7. Profiled pass on a restarted aggregator.
    let profile = profile::separate_pass(params.profile_events, || {
        profiled_pass(
            &round.ns,
            &round.env,
            &mut round.generator,
            params,
            round.target,
        )
    })
    .await;
    round.ns.drop_databases().await;

    Ok(AggregatorReport {
        machine,
        date,
        load_before_baseline: round.baseline.load_before,
        load_before_aggregator: round.load_before_aggregator,
        load_before_live,
        earlier_rounds,
        events: params.events,
        customers: params.customers,
        batch_events: BATCH_EVENTS,
        grace_minutes: params.grace_minutes,
        partitions: meterline_tests::namespace::TEST_PARTITIONS,
        backlog_windows: round.backlog.windows(),
        baseline: Phase::new(round.baseline.elapsed, &round.baseline.cpu),
        first_rows: round.consumed.first_rows,
        consume: Phase::new(
            round.consumed.done - round.consumed.first,
            &round.consumed.cpu,
        ),
        startup: round.consumed.first - round.spawned_at,
        from_spawn: round.consumed.done - round.spawned_at,
        insert_seconds: metric_value(
            &metrics_after_backlog,
            "aggregator_clickhouse_insert_duration_seconds_sum",
        ),
        inserts: metric_value(
            &metrics_after_backlog,
            "aggregator_clickhouse_insert_duration_seconds_count",
        ),
        windows_marked: metric_value(
            &metrics_after_backlog,
            "aggregator_batch_windows_marked_sum",
        ),
        marked_batches: metric_value(
            &metrics_after_backlog,
            "aggregator_batch_windows_marked_count",
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
    baseline: Baseline,
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

impl rounds::Round for Round {
    fn rates(&self, events: usize) -> RoundRates {
        let consumed = &self.consumed;
        let rate = aggregator_rate(
            self.target,
            consumed.first_rows,
            consumed.done - consumed.first,
            consumed.done - self.spawned_at,
        );
        self.baseline.rates(events, rate)
    }

    async fn finish(self) {
        self.aggregator.terminate(Duration::from_secs(30)).await;
        self.ns.drop_databases().await;
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
    let raw = backlog.raw_rows();
    let baseline = Baseline::measure(watched, direct_insert(&baseline_ns, &rows, &raw)).await?;
    let baseline_count = count_rows(&baseline_ns).await?;
    if baseline_count != rows.len() as u64 {
        bail!(
            "the baseline inserted {} rows but events_processed holds {baseline_count}",
            rows.len()
        );
    }
    drop(rows);
    drop(raw);
    baseline_ns.drop_databases().await;
    eprintln!(
        "baseline: {} rows inserted directly in {:.2}s",
        baseline_count,
        baseline.elapsed.as_secs_f64()
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
        baseline,
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

/// Events of the measured interval: those whose rows landed after `count()` first showed
/// any (rows already in then are left out).
pub(crate) fn measured_events(target_rows: u64, first_rows: u64) -> f64 {
    target_rows.saturating_sub(first_rows) as f64 / ROWS_PER_EVENT as f64
}

/// Events/s from the first rows landing to the last ([`measured_events`]); from spawn when
/// the first poll already saw every row.
pub(crate) fn aggregator_rate(
    target_rows: u64,
    first_rows: u64,
    measured: Duration,
    from_spawn: Duration,
) -> f64 {
    let events = measured_events(target_rows, first_rows);
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

/// Restarts the aggregator on `profile_events` more backlog events with `perf record`
/// attached; `rows_before` rows are already in `events_processed`.
async fn profiled_pass(
    ns: &Namespace,
    env: &[(String, String)],
    generator: &mut Generator,
    params: &Params,
    rows_before: u64,
) -> Result<Profile, String> {
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
    let profile = recording.finish_after(consumed);
    aggregator.terminate(Duration::from_secs(30)).await;
    profile
}
