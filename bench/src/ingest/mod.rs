//! `meterline-bench ingest`: how many events per second ingest turns from bulk HTTP requests
//! into acknowledged Kafka writes, next to a raw producer writing the same messages.
//!
//! Order of one run: generate the events (untimed); baseline on a fresh namespace; ingest on
//! another fresh namespace, measured with no profiler attached, CPU seconds of ingest, the
//! broker and this process read from `/proc` around it; then, when `perf` works, a separate
//! profiled pass over part of the events. The ratio therefore compares two phases a few
//! seconds apart on the same machine state.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use meterline_schemas::Topic;
use meterline_tests::{api, Namespace, Stack};

use crate::baseline::{self, RawProducer};
use crate::clients::{http_client, post_bulk, run_clients};
use crate::procstat::{self, Machine, Server, Snapshot, Watchlist};
use crate::profile::{self, Profile, Recording};
use crate::report::{Latency, Phase};
use crate::rounds::{self, Baseline, Round as _, RoundRates};
use crate::workload::{Workload, ENVIRONMENT, TENANT};
use meterline_tests::ServiceProcess;

mod report;
pub use report::{IngestReport, GOAL_EVENTS_PER_SECOND, GOAL_RATIO};

#[derive(Debug, Clone, clap::Args)]
pub struct Params {
    /// Events to send.
    #[arg(long, default_value_t = 500_000)]
    pub events: usize,
    /// Events per bulk request (and per baseline batch).
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Concurrent HTTP clients (and baseline tasks).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Distinct customers the events are spread over.
    #[arg(long, default_value_t = 1000)]
    pub customers: usize,
    /// Events re-sent to ingest under `perf record` after the measured pass; 0: no profile.
    #[arg(long, default_value_t = 200_000)]
    pub profile_events: usize,
    /// Rounds of the baseline then ingest, each pair on fresh namespaces (and a fresh ingest);
    /// the goals are judged on the median round, and the last one is profiled. On a shared
    /// machine one round's ratio moves by more than a tenth, mostly with the baseline.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Replace the ingest section of docs/benchmarks.md with this run's numbers.
    #[arg(long)]
    pub write_docs: bool,
}

pub async fn run(params: &Params) -> anyhow::Result<IngestReport> {
    if params.concurrency == 0 || params.rounds == 0 {
        bail!("--concurrency and --rounds must be at least 1");
    }
    let machine = Machine::read();
    let date = time::OffsetDateTime::now_utc();
    // Before generating anything: a run without the stack stops here, saying what to do.
    Stack::get();
    let scope = api::scope(TENANT, ENVIRONMENT);
    let token = api::token(TENANT, ENVIRONMENT);

    let started = Instant::now();
    let workload = Arc::new(Workload::generate(
        params.events,
        params.customers,
        params.batch,
        &scope,
    )?);
    eprintln!(
        "generated {} events in {} requests ({:.1} MiB of bodies) in {:.1}s",
        workload.events.len(),
        workload.batch_count(),
        workload.body_bytes() as f64 / (1 << 20) as f64,
        started.elapsed().as_secs_f64()
    );
    let [broker_pid] = procstat::stack_pids([Server::KafkaBroker]);
    let watched = Watchlist::new()
        .process("ingest", None)
        .process("kafka broker", broker_pid)
        .this_process("meterline-bench (load generator)");

    let (earlier_rounds, round) = rounds::run_rounds(params.rounds, workload.events.len(), || {
        measure_round(params, &workload, &token, &watched)
    })
    .await?;

    let profile = profile::separate_pass(params.profile_events, || {
        profiled_pass(&round.driver, &round.ingest, params)
    })
    .await;

    let report = IngestReport {
        machine,
        date,
        load_before_baseline: round.baseline.load_before,
        load_before_ingest: round.load_before_ingest,
        earlier_rounds,
        events: workload.events.len(),
        batch: params.batch,
        concurrency: params.concurrency,
        customers: params.customers,
        partitions: meterline_tests::namespace::TEST_PARTITIONS,
        body_bytes: workload.body_bytes(),
        baseline: Phase::new(round.baseline.elapsed, &round.baseline.cpu),
        ingest: Phase::new(round.ingest_elapsed, &round.ingest_cpu),
        latency: Latency::of(round.latencies.clone()),
        profile,
        profile_events: params.profile_events.min(workload.events.len()),
    };
    round.finish().await;
    Ok(report)
}

/// One round's baseline and ingest, ingest still running (for the profiled pass).
struct Round {
    baseline_ns: Namespace,
    ns: Namespace,
    ingest: ServiceProcess,
    driver: Driver,
    baseline: Baseline,
    load_before_ingest: f64,
    ingest_elapsed: Duration,
    latencies: Vec<Duration>,
    ingest_cpu: Snapshot,
}

impl rounds::Round for Round {
    fn rates(&self, events: usize) -> RoundRates {
        let rate = events as f64 / self.ingest_elapsed.as_secs_f64();
        self.baseline.rates(events, rate)
    }

    async fn finish(self) {
        drop(self.driver);
        self.ingest.terminate(Duration::from_secs(10)).await;
        self.baseline_ns.drop_databases().await;
        self.ns.drop_databases().await;
    }
}

/// The baseline's raw producer on a fresh namespace, then a fresh ingest on another, sending
/// the same events.
async fn measure_round(
    params: &Params,
    workload: &Arc<Workload>,
    token: &str,
    watched: &Watchlist,
) -> anyhow::Result<Round> {
    // Baseline.
    let baseline_ns = Namespace::create().await;
    let producer = Arc::new(RawProducer::new(
        &baseline_ns.kafka,
        baseline_ns.topic(Topic::UsageRaw),
    )?);
    // Metadata and connections first, outside the clock.
    producer.write_batch(workload.batch_events(0)).await?;
    eprintln!("baseline: raw producer, {} tasks", params.concurrency);
    let baseline = Baseline::measure(
        watched,
        baseline::run(producer.clone(), Arc::clone(workload), params.concurrency),
    )
    .await?;
    drop(producer);

    // Subject: the release ingest binary.
    let ns = Namespace::create().await;
    let mut env = ns.env();
    let largest_body = workload.bodies.iter().map(|b| b.len()).max().unwrap_or(0);
    env.push((
        "INGEST_MAX_BULK_EVENTS".into(),
        params.batch.max(2000).to_string(),
    ));
    env.push((
        "INGEST_MAX_BULK_BODY_BYTES".into(),
        (largest_body * 2).clamp(8 << 20, 256 << 20).to_string(),
    ));
    // The harness finds the release binaries beside this one, in target/release.
    let ingest = ServiceProcess::spawn("ingest", &env).await;
    let ingest_pid = ingest.pid().context("the ingest process has a pid")?;
    let driver = Driver::new(
        &ingest,
        token.to_owned(),
        Arc::clone(workload),
        params.concurrency,
    )?;
    driver.warm_up().await?;
    eprintln!(
        "ingest: pid {}, {} http clients, bulk requests of {}",
        ingest_pid, params.concurrency, params.batch
    );
    let load_before_ingest = procstat::load_average();
    let watched = watched.with_pid("ingest", ingest_pid);
    let ((ingest_elapsed, latencies), ingest_cpu) =
        watched.during(driver.run(workload.batch_count())).await?;

    Ok(Round {
        baseline_ns,
        ns,
        ingest,
        driver,
        baseline,
        load_before_ingest,
        ingest_elapsed,
        latencies,
        ingest_cpu,
    })
}

/// Re-sends the first `profile_events` events with `perf record` attached to ingest.
async fn profiled_pass(
    driver: &Driver,
    ingest: &ServiceProcess,
    params: &Params,
) -> Result<Profile, String> {
    let data = ingest.log.with_extension("perf.data");
    let pid = ingest
        .pid()
        .ok_or_else(|| "the ingest process has no pid".to_owned())?;
    let recording = Recording::start(pid, data).map_err(|e| format!("{e:#}"))?;
    // perf needs a moment to attach to every thread.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let batches = params.profile_events.div_ceil(params.batch);
    let sent = driver.run(batches.min(driver.workload.batch_count())).await;
    recording.finish_after(sent)
}

/// `concurrency` HTTP clients sharing one connection pool, posting the workload's bodies.
struct Driver {
    client: reqwest::Client,
    url: String,
    token: String,
    workload: Arc<Workload>,
    concurrency: usize,
}

impl Driver {
    fn new(
        ingest: &ServiceProcess,
        token: String,
        workload: Arc<Workload>,
        concurrency: usize,
    ) -> anyhow::Result<Driver> {
        Ok(Driver {
            client: http_client(concurrency, Duration::from_secs(60))?,
            url: ingest.url("/v1/events/bulk"),
            token,
            workload,
            concurrency,
        })
    }

    /// One request per client, so every connection is open before the clock starts.
    async fn warm_up(&self) -> anyhow::Result<()> {
        let posts = (0..self.concurrency).map(|_| self.post(0));
        for outcome in futures::future::join_all(posts).await {
            outcome?;
        }
        Ok(())
    }

    /// Posts batches `0..batches`; returns the elapsed time and every request's latency.
    async fn run(&self, batches: usize) -> anyhow::Result<(Duration, Vec<Duration>)> {
        run_clients(self.concurrency, batches, |index| self.post(index)).await
    }

    /// Posts bulk body `index`; anything but 202 fails the run.
    async fn post(&self, index: usize) -> anyhow::Result<Duration> {
        let body = self.workload.bodies[index].clone();
        let which = format!(" to bulk request {index}");
        post_bulk(&self.client, &self.url, &self.token, body, &which).await
    }
}
