//! `meterline-bench pipeline`: the four release services together on one fresh namespace,
//! ingest loaded as hard as its HTTP clients can push (or at `--rate`), one-minute windows
//! due the moment they end (grace 0), and the Stripe stand-in behind the [`Recorder`](crate::recorder::Recorder).
//!
//! What it measures: for every (customer, meter, window), the time from the window falling
//! due to the stand-in receiving its first meter event, and to receiving the one that made
//! Stripe's total equal to every event ingest acknowledged for it; the events per second
//! ingest sustained and how long the aggregator needed after the load to have every event in
//! ClickHouse; each service's resident memory idle after start-up and its peak (`VmHWM`) at
//! the end. The webhook relay gets a steady stream of signed deliveries meanwhile, so that its
//! memory is taken under load too.
//!
//! The baseline, in the same run on another fresh namespace: the bare plumbing the pipeline's
//! path is made of, with none of meterline's work: a message produced to one topic, consumed
//! and produced (acknowledged) to a second topic, consumed, then one meter event POSTed to the
//! stand-in; timed per message from the first produce to the POST's answer (`bare.rs`).
//!
//! The run fails unless Stripe's counted total of every window equals what ingest accepted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use meterline_tests::stripe_config::put_sync_config;
use meterline_tests::usage::{create_meter, window_minutes_since_epoch};
use meterline_tests::{api, Namespace, ServiceProcess, Stack};
use serde_json::json;
use time::OffsetDateTime;

use crate::aggregator::count_rows;
use crate::clients::{http_client, post_bulk};
use crate::procstat::{self, Machine, Memory, Watchlist};
use crate::recorder::Receipt;
use crate::relay::{event_body, signed_delivery, unix_now, SECRET};
use crate::report::{Latency, Phase};
use crate::rng::SplitMix64;
use crate::sink::{differing, map_through_api, spawn_sink, Stripe, METERS};
use crate::workload::{ENVIRONMENT, TENANT};

mod bare;
mod report;

use bare::bare_path;
pub use report::{PipelineReport, ServiceMemory};

const WINDOW_SECONDS: i64 = 60;
const SERVICES: [&str; 4] = ["ingest", "aggregator", "stripe-sink", "webhook-relay"];

#[derive(Debug, Clone, clap::Args)]
pub struct Params {
    /// Seconds ingest is loaded.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Events per bulk request.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Concurrent HTTP clients posting to ingest.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Events per second in all; 0: each client posts its next request as soon as the last
    /// was answered (the most ingest takes).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Customers the events are spread over (each feeds both meters).
    #[arg(long, default_value_t = 200)]
    pub customers: usize,
    /// The Stripe account's limit and the sink's configured rate, meter events per second
    /// (live mode's meter event limit: 1,000).
    #[arg(long, default_value_t = 1000)]
    pub stripe_rate: u32,
    /// Signed webhook deliveries per second sent to the relay during the load.
    #[arg(long, default_value_t = 50)]
    pub webhook_rate: u32,
    /// Messages timed through the baseline path (20 a second).
    #[arg(long, default_value_t = 300)]
    pub baseline_messages: usize,
    /// The aggregator's `AGGREGATOR_BATCH_MAX_WAIT_MS` (its default: 1000). A window is
    /// published once no batch marked it for twice this, so it bounds the latency from below.
    #[arg(long, default_value_t = 1000)]
    pub batch_wait_ms: u64,
    /// Replace the pipeline section of docs/benchmarks.md with this run's numbers.
    #[arg(long)]
    pub write_docs: bool,
}

/// (customer index, meter index, window start in Unix seconds).
type WindowKey = (usize, usize, i64);

pub async fn run(params: &Params) -> anyhow::Result<PipelineReport> {
    if params.batch == 0 || params.concurrency == 0 || params.customers == 0 {
        bail!("--batch, --concurrency and --customers must be at least 1");
    }
    if params.seconds == 0 || params.baseline_messages == 0 || params.stripe_rate == 0 {
        bail!("--seconds, --baseline-messages and --stripe-rate must be at least 1");
    }
    let machine = Machine::read();
    let date = OffsetDateTime::now_utc();

    eprintln!(
        "baseline: {} messages through kafka -> kafka -> one POST",
        params.baseline_messages
    );
    let load_before_baseline = procstat::load_average();
    let baseline = bare_path(params).await?;

    // The pipeline.
    let ns = Namespace::create().await;
    let stripe = Stripe::start(params.stripe_rate, params.customers).await?;
    create_meter(
        &ns,
        TENANT,
        ENVIRONMENT,
        json!({"id": "calls", "event_name": "api.request", "aggregation": "COUNT"}),
    )
    .await;
    create_meter(
        &ns,
        TENANT,
        ENVIRONMENT,
        json!({"id": "tokens", "event_name": "api.request", "aggregation": "SUM",
               "property": "tokens"}),
    )
    .await;
    // One-minute windows straight in the sizes table (the config API's floor is 5 minutes);
    // the stored configuration keeps a valid size, the sink reads windows from usage.windows.
    window_minutes_since_epoch(&ns, TENANT, ENVIRONMENT, 1).await;
    put_sync_config(
        &ns,
        TENANT,
        ENVIRONMENT,
        &[SECRET],
        5,
        Some(params.stripe_rate),
    )
    .await;
    let mut ingest_env = ns.env();
    ingest_env.push((
        "INGEST_MAX_BULK_EVENTS".into(),
        params.batch.max(2000).to_string(),
    ));
    ingest_env.push(("INGEST_MAX_BULK_BODY_BYTES".into(), (64 << 20).to_string()));
    let ingest = ServiceProcess::spawn("ingest", &ingest_env).await;
    let mut aggregator_env = ns.env();
    aggregator_env.push(("STRIPE_SYNC_GRACE_PERIOD_MINUTES".into(), "0".into()));
    aggregator_env.push((
        "AGGREGATOR_BATCH_MAX_WAIT_MS".into(),
        params.batch_wait_ms.to_string(),
    ));
    let aggregator = ServiceProcess::spawn("aggregator", &aggregator_env).await;
    let sink = spawn_sink(&ns, &stripe.recorder.base).await;
    let relay = ServiceProcess::spawn("webhook-relay", &ns.env()).await;
    map_through_api(&sink, &stripe).await?;
    let services = [&ingest, &aggregator, &sink, &relay];
    let pids: Vec<u32> = services
        .iter()
        .map(|s| s.pid().context("a service has a pid"))
        .collect::<anyhow::Result<_>>()?;
    // Let start-up work (consumer group joins, first polls) finish before the idle reading.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle: Vec<Memory> = pids
        .iter()
        .map(|pid| procstat::memory(*pid))
        .collect::<anyhow::Result<_>>()?;

    let stack = Stack::get();
    let root = meterline_tests::stack::repo_root();
    let watched = SERVICES
        .iter()
        .zip(&pids)
        .fold(Watchlist::new(), |list, (name, pid)| {
            list.process(name, Some(*pid))
        })
        .process(
            "kafka broker",
            procstat::kafka_broker_pid(&root, &stack.kafka_brokers),
        )
        .process(
            "clickhouse server",
            procstat::listening_pid_of_url(&stack.clickhouse_url),
        )
        .tree(
            "postgresql (all backends)",
            procstat::listening_pid_of_url(&stack.database_url),
        )
        .this_process("meterline-bench");

    eprintln!(
        "pipeline: {} s of load, {} clients, bulk requests of {}, {}",
        params.seconds,
        params.concurrency,
        params.batch,
        if params.rate == 0 {
            "as fast as ingest answers".to_owned()
        } else {
            format!("{} events/s", params.rate)
        }
    );
    let load_before_pipeline = procstat::load_average();
    let cpu_before = watched.snapshot()?;
    let stop_webhooks = Arc::new(AtomicBool::new(false));
    let webhooks = tokio::spawn(webhook_stream(
        relay.url(&format!("/webhooks/stripe/{TENANT}/{ENVIRONMENT}")),
        params.webhook_rate,
        stop_webhooks.clone(),
    ));
    let load = Load::new(&ingest, params)?;
    let (load_elapsed, latencies) = load.run(params).await?;
    stop_webhooks.store(true, Ordering::Relaxed);
    let rows_at_load_end = count_rows(&ns).await?;
    let load_ended = Instant::now();
    let cpu = watched.snapshot()?.since(&cpu_before);
    let webhooks = webhooks.await.context("the webhook stream panicked")??;
    let truth = load.truth();
    let events = load.events.load(Ordering::Relaxed);
    eprintln!(
        "pipeline: {events} events in {:.1} s ({:.0}/s); {rows_at_load_end} of {} rows in clickhouse",
        load_elapsed.as_secs_f64(),
        events as f64 / load_elapsed.as_secs_f64(),
        events * 2
    );

    // The aggregator catches up.
    let rows_expected = events * 2;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let rows = count_rows(&ns).await?;
        if rows >= rows_expected {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {rows} of {rows_expected} rows in events_processed 600 s after the load");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let catch_up = load_ended.elapsed();

    // Stripe receives every window: the last one falls due at the end of the load's last
    // minute.
    let last_due = truth.keys().map(|k| k.2).max().unwrap_or_default() + WINDOW_SECONDS;
    let patience = (last_due - unix_now()).max(0) as u64 + 300;
    let deadline = Instant::now() + Duration::from_secs(patience);
    loop {
        let got = stripe_totals(&stripe.recorder.receipts(), &stripe.customers);
        if got == truth {
            break;
        }
        if Instant::now() > deadline {
            let wrong = differing(&truth, &got);
            bail!(
                "{wrong} of {} windows still differ in stripe {patience} s after the load; sink log:\n{}",
                truth.len(),
                sink.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A late send still under way would show now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let receipts = stripe.recorder.receipts();
    check_counted(&stripe, &truth).await?;
    let (first, complete) = window_latencies(&receipts, &stripe, &truth);
    let published = publish_lag_mean(&aggregator).await?;
    let (recorded, send_written) = ledger_stages(&ns).await?;

    let memory = SERVICES
        .iter()
        .zip(&pids)
        .zip(idle)
        .map(|((name, pid), idle)| {
            Ok(ServiceMemory {
                name,
                idle,
                end: procstat::memory(*pid)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    for service in [ingest, aggregator, sink, relay] {
        service.terminate(Duration::from_secs(15)).await;
    }
    ns.drop_databases().await;

    Ok(PipelineReport {
        machine,
        date,
        load_before_baseline,
        load_before_pipeline,
        params: params.clone(),
        baseline,
        events,
        requests: Latency::of(latencies),
        load: Phase::new(load_elapsed, &cpu),
        rows_at_load_end,
        rows_expected,
        catch_up,
        windows: truth.len(),
        first,
        complete,
        published,
        recorded,
        send_written,
        meter_events: receipts.iter().filter(|r| r.accepted()).count(),
        too_many: receipts.iter().filter(|r| r.status == 429).count(),
        webhooks,
        memory,
    })
}

/// The customer index and tokens of event `n`: the same in every client task, without shared
/// state.
fn content(n: u64, customers: usize) -> (usize, i64) {
    let h = SplitMix64::at(n);
    ((h % customers as u64) as usize, ((h >> 32) % 50) as i64 + 1)
}

/// Events stamped with the time their request is built, posted to ingest; what ingest
/// accepted is the ground truth.
struct Load {
    client: reqwest::Client,
    url: String,
    token: String,
    run: i64,
    customers: usize,
    next_event: AtomicU64,
    events: AtomicU64,
    truth: Mutex<BTreeMap<WindowKey, i64>>,
}

impl Load {
    fn new(ingest: &ServiceProcess, params: &Params) -> anyhow::Result<Load> {
        Ok(Load {
            client: http_client(params.concurrency, Duration::from_secs(60))?,
            url: ingest.url("/v1/events/bulk"),
            token: api::token(TENANT, ENVIRONMENT),
            run: unix_now(),
            customers: params.customers,
            next_event: AtomicU64::new(0),
            events: AtomicU64::new(0),
            truth: Mutex::new(BTreeMap::new()),
        })
    }

    fn truth(&self) -> BTreeMap<WindowKey, i64> {
        self.truth.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Posts for `params.seconds`; the elapsed time (to the last answer) and every request's
    /// latency.
    async fn run(&self, params: &Params) -> anyhow::Result<(Duration, Vec<Duration>)> {
        let started = Instant::now();
        let until = started + Duration::from_secs(params.seconds);
        let tickets = AtomicUsize::new(0);
        let clients = (0..params.concurrency).map(|_| async {
            let mut latencies = Vec::new();
            loop {
                let ticket = tickets.fetch_add(1, Ordering::Relaxed);
                if params.rate > 0 {
                    // Open loop: request n is due at n x batch / rate seconds.
                    let due = started
                        + Duration::from_secs_f64(
                            ticket as f64 * params.batch as f64 / params.rate as f64,
                        );
                    tokio::time::sleep_until(due.into()).await;
                }
                if Instant::now() >= until {
                    return anyhow::Ok(latencies);
                }
                latencies.push(self.post(params.batch).await?);
            }
        });
        let mut all = Vec::new();
        for outcome in futures::future::join_all(clients).await {
            all.extend(outcome?);
        }
        Ok((started.elapsed(), all))
    }

    /// One bulk request of `batch` events stamped now; anything but 202 fails the run.
    async fn post(&self, batch: usize) -> anyhow::Result<Duration> {
        let first = self.next_event.fetch_add(batch as u64, Ordering::Relaxed);
        let now = OffsetDateTime::now_utc();
        let stamp = meterline_schemas::Timestamp::new(now)
            .map_err(|e| anyhow::anyhow!("a timestamp: {e}"))?
            .to_string();
        let window = now.unix_timestamp().div_euclid(WINDOW_SECONDS) * WINDOW_SECONDS;
        let mut body = String::with_capacity(batch * 140 + 16);
        body.push_str("{\"events\":[");
        for n in first..first + batch as u64 {
            let (customer, tokens) = content(n, self.customers);
            if n > first {
                body.push(',');
            }
            let _ = write!(
                body,
                "{{\"id\":\"pl{}x{n}\",\"customer_id\":\"cust_{customer:05}\",\"event_name\":\"api.request\",\"timestamp\":\"{stamp}\",\"properties\":{{\"tokens\":{tokens}}}}}",
                self.run
            );
        }
        body.push_str("]}");
        let elapsed =
            post_bulk(&self.client, &self.url, &self.token, Bytes::from(body), "").await?;
        let mut truth = self.truth.lock().unwrap_or_else(|p| p.into_inner());
        for n in first..first + batch as u64 {
            let (customer, tokens) = content(n, self.customers);
            *truth.entry((customer, 0, window)).or_default() += 1;
            *truth.entry((customer, 1, window)).or_default() += tokens;
        }
        drop(truth);
        self.events.fetch_add(batch as u64, Ordering::Relaxed);
        Ok(elapsed)
    }
}

/// Signed `customer.created` deliveries to the relay at `rate` a second until `stop`; how
/// many were delivered. Any answer but 200 fails the run.
async fn webhook_stream(url: String, rate: u32, stop: Arc<AtomicBool>) -> anyhow::Result<u64> {
    if rate == 0 {
        return Ok(0);
    }
    let client = reqwest::Client::new();
    let run = unix_now();
    let started = Instant::now();
    let mut sent = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let due = started + Duration::from_secs_f64(sent as f64 / f64::from(rate));
        tokio::time::sleep_until(due.into()).await;
        let body = event_body(&format!("evt_pipe{run}x{sent:08}"), sent as usize);
        let answer = signed_delivery(&client, &url, body)
            .send()
            .await
            .context("delivering a webhook")?;
        if answer.status() != reqwest::StatusCode::OK {
            bail!("webhook-relay answered {} to a delivery", answer.status());
        }
        sent += 1;
    }
    Ok(sent)
}

/// Stripe's totals per window from the accepted meter events (each identifier once).
fn stripe_totals(receipts: &[Receipt], customers: &[String]) -> BTreeMap<WindowKey, i64> {
    let index = customer_index(customers);
    let mut seen = HashSet::new();
    let mut totals = BTreeMap::new();
    for r in receipts {
        if !r.accepted() || !seen.insert(r.identifier.as_str()) {
            continue;
        }
        if let Some(key) = window_of(r, &index) {
            *totals.entry(key).or_default() += r.value;
        }
    }
    totals
}

/// `cus_...` -> the customer's index.
fn customer_index(customers: &[String]) -> HashMap<&str, usize> {
    customers
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect()
}

fn window_of(r: &Receipt, customers: &HashMap<&str, usize>) -> Option<WindowKey> {
    let customer = *customers.get(r.customer.as_str())?;
    let meter = METERS.iter().position(|(_, e)| *e == r.event_name)?;
    Some((
        customer,
        meter,
        r.timestamp.div_euclid(WINDOW_SECONDS) * WINDOW_SECONDS,
    ))
}

/// Fails unless the stand-in's own counted meter events give `truth` per window.
async fn check_counted(stripe: &Stripe, truth: &BTreeMap<WindowKey, i64>) -> anyhow::Result<()> {
    let index = customer_index(&stripe.customers);
    let inspect = stripe.standin.inspect().await;
    let mut counted: BTreeMap<WindowKey, i64> = BTreeMap::new();
    for e in inspect["meter_events"].as_array().into_iter().flatten() {
        if e["counted"] != json!(true) || e["cancelled"] == json!(true) {
            continue;
        }
        let receipt = Receipt {
            at: Duration::ZERO,
            status: 200,
            customer: e["customer"].as_str().unwrap_or_default().to_owned(),
            event_name: e["event_name"].as_str().unwrap_or_default().to_owned(),
            identifier: String::new(),
            value: e["value"].as_i64().unwrap_or_default(),
            timestamp: e["timestamp"].as_i64().unwrap_or_default(),
        };
        if let Some(key) = window_of(&receipt, &index) {
            *counted.entry(key).or_default() += receipt.value;
        }
    }
    if &counted != truth {
        let wrong = differing(truth, &counted);
        bail!(
            "stripe's counted totals differ from what ingest accepted in {wrong} of {} windows",
            truth.len()
        );
    }
    Ok(())
}

/// The aggregator's own mean from a window falling due to its total acknowledged on
/// `usage.windows`, and how many first publications it averages
/// (`aggregator_window_publish_lag_seconds`): the aggregator's share of the latency.
async fn publish_lag_mean(aggregator: &ServiceProcess) -> anyhow::Result<Option<(Duration, u64)>> {
    use crate::aggregator::metrics::{metric_value, scrape};
    let text = scrape(aggregator).await?;
    let name = "aggregator_window_publish_lag_seconds";
    let sum = metric_value(&text, &format!("{name}_sum"));
    let count = metric_value(&text, &format!("{name}_count"));
    Ok(match (sum, count) {
        (Some(sum), Some(count)) if count > 0.0 => {
            Some((Duration::from_secs_f64(sum / count), count as u64))
        }
        _ => None,
    })
}

/// Per window, from the sink's ledger: due (its end, grace 0) to its first total recorded,
/// and to its first meter event written (claimed, looked up, paced: about to go out). With
/// the stand-in's receipts these split the latency between the sink's intake, its claim and
/// pacing, and the request itself.
async fn ledger_stages(ns: &Namespace) -> anyhow::Result<(Latency, Latency)> {
    let pool = ns.pg_pool().await;
    let rows: Vec<(f64, Option<f64>)> = sqlx::query_as(
        "SELECT extract(epoch FROM b.created_at - b.window_end)::float8,
                extract(epoch FROM (SELECT min(s.created_at) FROM stripe_sync_sends s
                                    WHERE s.batch_id = b.id) - b.window_end)::float8
         FROM stripe_sync_batches b",
    )
    .fetch_all(&pool)
    .await
    .context("reading the ledger's timestamps")?;
    pool.close().await;
    let after_due = |seconds: f64| Duration::from_secs_f64(seconds.max(0.0));
    Ok((
        Latency::of(rows.iter().map(|(r, _)| after_due(*r)).collect()),
        Latency::of(rows.iter().filter_map(|(_, s)| s.map(after_due)).collect()),
    ))
}

/// Per window: due (its end, grace 0) to the first accepted meter event, and to the one
/// after which Stripe's total equalled the truth.
fn window_latencies(
    receipts: &[Receipt],
    stripe: &Stripe,
    truth: &BTreeMap<WindowKey, i64>,
) -> (Latency, Latency) {
    let index = customer_index(&stripe.customers);
    let mut seen = HashSet::new();
    let mut sums: BTreeMap<WindowKey, i64> = BTreeMap::new();
    let mut first: BTreeMap<WindowKey, i64> = BTreeMap::new();
    let mut complete: BTreeMap<WindowKey, i64> = BTreeMap::new();
    for r in receipts {
        if !r.accepted() || !seen.insert(r.identifier.as_str()) {
            continue;
        }
        let Some(key) = window_of(r, &index) else {
            continue;
        };
        let at = stripe.recorder.unix_ms(r.at);
        first.entry(key).or_insert(at);
        let sum = sums.entry(key).or_default();
        *sum += r.value;
        if Some(&*sum) == truth.get(&key) {
            complete.insert(key, at);
        } else {
            complete.remove(&key);
        }
    }
    let after_due = |at: &BTreeMap<WindowKey, i64>| -> Vec<Duration> {
        at.iter()
            .map(|(key, ms)| {
                let due_ms = (key.2 + WINDOW_SECONDS) * 1000;
                Duration::from_millis((ms - due_ms).max(0) as u64)
            })
            .collect()
    };
    (
        Latency::of(after_due(&first)),
        Latency::of(after_due(&complete)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_spread_over_every_customer_with_tokens_in_range() {
        let mut seen = HashSet::new();
        for n in 0..2000 {
            let (customer, tokens) = content(n, 20);
            assert!(customer < 20 && (1..=50).contains(&tokens));
            seen.insert(customer);
        }
        assert_eq!(seen.len(), 20);
        assert_eq!(content(7, 20), content(7, 20));
    }
}
