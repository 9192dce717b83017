//! `meterline-bench sink`: the stripe-sink's pacing. Window totals loaded on `usage.windows`
//! go out to a Stripe stand-in account whose own limit is the one configured in the sink
//! (as Stripe's would be), and the achieved meter event rate is set against that limit:
//! overall, and in the busiest one-second span, which must never exceed it.
//!
//! Order of one run: the baseline first (a plain HTTP client, no limiter, posting the same kind
//! of meter events to an account with no practical limit: what the stand-in and loopback can
//! take), then one phase per configured limit, each on a fresh namespace with a fresh stand-in.
//! A phase spawns the release `stripe-sink`, maps the customers and meters through its API,
//! then writes every window total at once, so that from the first send on the sink always has
//! work waiting and only its pacing decides the rate. Stripe's totals must equal what was
//! loaded, or the run fails.
//!
//! Arrival times come from the [`Recorder`] in front of the stand-in (microseconds), not from
//! the stand-in's whole-second receipt times.

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use meterline_common::kafka::producer_config;
use meterline_schemas::{
    CustomerId, Decimal, EnvironmentId, MeterId, TenantId, Timestamp, Topic, Window, WindowReason,
    WindowTotal,
};
use meterline_tests::api::{post_json, token};
use meterline_tests::standin::Standin;
use meterline_tests::stripe_config::put_sync_config;
use meterline_tests::{Namespace, ServiceProcess};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use time::OffsetDateTime;

use crate::baseline::PRODUCE_TIMEOUT;
use crate::procstat::{self, Machine};
use crate::recorder::{busiest_span, Receipt, Recorder};
use crate::workload::{ENVIRONMENT, TENANT};

mod report;
pub use report::{LimitPhase, SinkReport};

/// Our meter id and the Stripe meter's event name, both `sum` meters in Stripe.
pub const METERS: [(&str, &str); 2] = [("calls", "api_calls"), ("tokens", "tokens_used")];

/// The baseline account's limit: far above anything loopback reaches.
const UNLIMITED: u32 = 1_000_000;

#[derive(Debug, Clone, clap::Args)]
pub struct Params {
    /// Rate limits to configure, meter events per second, one phase each (Stripe's test
    /// mode allows 25; live mode 1,000).
    #[arg(long, value_delimiter = ',', default_values_t = [25u32, 100])]
    pub limits: Vec<u32>,
    /// Seconds of sending each phase loads at its limit (window totals = limit x seconds).
    #[arg(long, default_value_t = 40)]
    pub seconds: u32,
    /// Customers the window totals are spread over (each with both meters).
    #[arg(long, default_value_t = 100)]
    pub customers: usize,
    /// Meter events the baseline posts.
    #[arg(long, default_value_t = 20_000)]
    pub baseline_events: usize,
    /// Concurrent baseline clients (each owns whole customers: one request in flight per
    /// customer and meter, as Stripe requires).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Replace the sink section of docs/benchmarks.md with this run's numbers.
    #[arg(long)]
    pub write_docs: bool,
}

/// One window total to send: customer index, meter index, window, value.
#[derive(Debug, Clone)]
struct Loaded {
    customer: usize,
    meter: usize,
    window: Window,
    value: i64,
}

/// `count` window totals over `customers` customers and both meters, in hourly windows
/// ending one hour and more before the current hour (well past due, within Stripe's 35 days).
fn window_totals(count: usize, customers: usize) -> anyhow::Result<Vec<Loaded>> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let this_hour = now - now.rem_euclid(3600);
    let per_hour = customers * METERS.len();
    anyhow::ensure!(
        count.div_ceil(per_hour) <= 35 * 24 - 2,
        "{count} window totals over {customers} customers reach past Stripe's 35 days: add customers"
    );
    let mut loaded = Vec::with_capacity(count);
    for i in 0..count {
        let hours_back = (i / per_hour) as i64 + 1;
        let start = OffsetDateTime::from_unix_timestamp(this_hour - hours_back * 3600)?;
        loaded.push(Loaded {
            customer: (i % per_hour) / METERS.len(),
            meter: i % METERS.len(),
            window: Window::new(start, start + time::Duration::HOUR)
                .map_err(|e| anyhow::anyhow!("a window: {e}"))?,
            value: (i as i64 * 7919) % 1000 + 1,
        });
    }
    Ok(loaded)
}

fn external_id(customer: usize) -> String {
    format!("cust_{customer:05}")
}

/// A stand-in at `limit` behind a recorder, with both meters and `customers` customers
/// (external id -> `cus_...`).
pub struct Stripe {
    pub standin: Standin,
    pub recorder: Recorder,
    pub customers: Vec<String>,
}

impl Stripe {
    pub async fn start(limit: u32, customers: usize) -> anyhow::Result<Stripe> {
        let standin = Standin::start(limit).await;
        for (_, event_name) in METERS {
            standin.sum_meter(event_name).await;
        }
        let mut ids = Vec::with_capacity(customers);
        for c in 0..customers {
            ids.push(standin.customer(&external_id(c)).await);
        }
        let recorder = Recorder::start(&standin.base).await?;
        Ok(Stripe {
            standin,
            recorder,
            customers: ids,
        })
    }

    /// Where a client posts meter events: through the recorder.
    pub fn meter_events_url(&self) -> String {
        format!("{}/v1/billing/meter_events", self.recorder.base)
    }

    /// Counted totals per (`cus_...`, event name) that `loaded` must give.
    fn expected(&self, loaded: &[Loaded]) -> BTreeMap<(String, String), f64> {
        let mut expected = BTreeMap::new();
        for l in loaded {
            *expected
                .entry((
                    self.customers[l.customer].clone(),
                    METERS[l.meter].1.to_owned(),
                ))
                .or_default() += l.value as f64;
        }
        expected
    }

    /// Fails unless the stand-in's counted totals equal `expected`.
    async fn check_totals(
        &self,
        expected: &BTreeMap<(String, String), f64>,
        what: &str,
    ) -> anyhow::Result<()> {
        let got = self.standin.totals().await;
        if &got != expected {
            let wrong = differing(expected, &got);
            bail!(
                "{what}: stripe's totals differ from what was loaded ({wrong} of {} customer \
                 meters wrong, {} totals in stripe)",
                expected.len(),
                got.len()
            );
        }
        Ok(())
    }
}

/// A meter event request as the stripe-sink makes it (the form, the identifier, the same
/// Idempotency-Key), for the baselines that post them with no limiter.
pub(crate) struct MeterEvent<'a> {
    pub event_name: &'a str,
    /// `cus_...`.
    pub customer: &'a str,
    pub value: i64,
    pub identifier: &'a str,
    /// Unix seconds.
    pub timestamp: i64,
}

impl MeterEvent<'_> {
    /// Posts the meter event to `url` with the account's `key` and reads the whole answer;
    /// its status.
    pub(crate) async fn post(
        &self,
        client: &reqwest::Client,
        url: &str,
        key: &str,
    ) -> anyhow::Result<reqwest::StatusCode> {
        let (value, timestamp) = (self.value.to_string(), self.timestamp.to_string());
        let form = [
            ("event_name", self.event_name),
            ("payload[stripe_customer_id]", self.customer),
            ("payload[value]", &value),
            ("identifier", self.identifier),
            ("timestamp", &timestamp),
        ];
        let answer = client
            .post(url)
            .bearer_auth(key)
            .header("Idempotency-Key", self.identifier)
            .form(&form)
            .send()
            .await
            .context("posting a baseline meter event")?;
        let status = answer.status();
        answer.bytes().await.context("reading an answer")?;
        Ok(status)
    }
}

/// How many entries of `expected` `got` lacks or holds with another value.
pub(crate) fn differing<K: Ord, V: PartialEq>(
    expected: &BTreeMap<K, V>,
    got: &BTreeMap<K, V>,
) -> usize {
    expected
        .iter()
        .filter(|(k, v)| got.get(*k) != Some(*v))
        .count()
}

/// The release stripe-sink in `ns`, talking to `stripe_base`.
pub async fn spawn_sink(ns: &Namespace, stripe_base: &str) -> ServiceProcess {
    let mut env = ns.env();
    env.push(("STRIPE_API_BASE".into(), stripe_base.to_owned()));
    ServiceProcess::spawn("stripe-sink", &env).await
}

/// Maps both meters and every customer of `stripe` through the sink's API.
pub async fn map_through_api(sink: &ServiceProcess, stripe: &Stripe) -> anyhow::Result<()> {
    let t = token(TENANT, ENVIRONMENT);
    for (meter, event_name) in METERS {
        let answer = post_json(
            &sink.url("/v1/stripe/meters/mapping"),
            &t,
            &json!({"meter_id": meter, "provider_type": "stripe",
                    "provider_meter_id": event_name, "sync_enabled": true}),
        )
        .await;
        anyhow::ensure!(
            answer.status == 201,
            "meter mapping: {} {}",
            answer.status,
            answer.body
        );
    }
    for (c, cus) in stripe.customers.iter().enumerate() {
        let answer = post_json(
            &sink.url("/v1/stripe/customers/mapping"),
            &t,
            &json!({"customer_id": external_id(c), "provider_customer_id": cus}),
        )
        .await;
        anyhow::ensure!(
            answer.status == 201,
            "customer mapping: {} {}",
            answer.status,
            answer.body
        );
    }
    Ok(())
}

/// What the recorder saw of one phase's meter event requests.
#[derive(Debug, Clone)]
pub struct Pace {
    pub requests: usize,
    pub accepted: usize,
    pub too_many: usize,
    /// Answers other than 2xx and 429.
    pub other: usize,
    /// First to last accepted arrival.
    pub span: Duration,
    /// Most requests (any answer) in any one-second span.
    pub busiest_second: usize,
    pub load_before: f64,
}

impl Pace {
    fn of(receipts: &[Receipt], load_before: f64) -> Pace {
        let accepted: Vec<Duration> = receipts
            .iter()
            .filter(|r| r.accepted())
            .map(|r| r.at)
            .collect();
        let arrivals: Vec<Duration> = receipts.iter().map(|r| r.at).collect();
        Pace {
            requests: receipts.len(),
            accepted: accepted.len(),
            too_many: receipts.iter().filter(|r| r.status == 429).count(),
            other: receipts
                .iter()
                .filter(|r| !r.accepted() && r.status != 429)
                .count(),
            span: match (accepted.first(), accepted.last()) {
                (Some(first), Some(last)) => *last - *first,
                _ => Duration::ZERO,
            },
            busiest_second: busiest_span(&arrivals, Duration::from_secs(1)),
            load_before,
        }
    }

    /// Accepted meter events per second from the first accepted arrival to the last: the
    /// intervals between them, so one event more than intervals.
    pub fn rate(&self) -> f64 {
        if self.accepted < 2 || self.span.is_zero() {
            return 0.0;
        }
        (self.accepted - 1) as f64 / self.span.as_secs_f64()
    }
}

pub async fn run(params: &Params) -> anyhow::Result<SinkReport> {
    if params.limits.is_empty() || params.limits.contains(&0) || params.customers == 0 {
        bail!("--limits must name positive rates and --customers must be at least 1");
    }
    if params.concurrency == 0 || params.baseline_events < 2 {
        bail!("--concurrency must be at least 1 and --baseline-events at least 2");
    }
    let machine = Machine::read();
    let date = OffsetDateTime::now_utc();

    eprintln!(
        "baseline: {} meter events from {} plain clients, no limiter",
        params.baseline_events, params.concurrency
    );
    let stripe = Stripe::start(UNLIMITED, params.customers).await?;
    let loaded = window_totals(params.baseline_events, params.customers)?;
    let load_before = procstat::load_average();
    post_plainly(&stripe, &loaded, params.concurrency).await?;
    let baseline = Pace::of(&stripe.recorder.receipts(), load_before);
    stripe
        .check_totals(&stripe.expected(&loaded), "baseline")
        .await?;
    eprintln!(
        "baseline: {:.0} meter events/s, busiest second {}",
        baseline.rate(),
        baseline.busiest_second
    );
    drop(stripe);

    let mut phases = Vec::new();
    for &limit in &params.limits {
        phases.push(limit_phase(limit, params).await?);
    }
    Ok(SinkReport {
        machine,
        date,
        customers: params.customers,
        concurrency: params.concurrency,
        baseline,
        phases,
    })
}

async fn limit_phase(limit: u32, params: &Params) -> anyhow::Result<LimitPhase> {
    let count = limit as usize * params.seconds as usize;
    eprintln!("sink at {limit}/s: {count} window totals");
    let ns = Namespace::create().await;
    let stripe = Stripe::start(limit, params.customers).await?;
    put_sync_config(&ns, TENANT, ENVIRONMENT, &[], 60, Some(limit)).await;
    let sink = spawn_sink(&ns, &stripe.recorder.base).await;
    map_through_api(&sink, &stripe).await?;
    let loaded = window_totals(count, params.customers)?;
    let load_before = procstat::load_average();
    let written = stripe.recorder.now();
    produce_windows(&ns, &loaded).await?;

    // Every window total was loaded before the first could be sent: the sink always has
    // work, so the time this takes is the pacing's (plus a margin for a slow start).
    let patience = Duration::from_secs_f64(count as f64 / f64::from(limit) * 2.0 + 120.0);
    let deadline = Instant::now() + patience;
    loop {
        let sent = distinct_accepted(&stripe.recorder.receipts());
        if sent >= count {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "sink at {limit}/s: only {sent} of {count} meter events accepted within {patience:?}; \
                 sink log:\n{}",
                sink.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Anything still in flight (a retry) lands now, or shows as a wrong total below.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let receipts = stripe.recorder.receipts();
    stripe
        .check_totals(&stripe.expected(&loaded), &format!("sink at {limit}/s"))
        .await?;
    sink.terminate(Duration::from_secs(10)).await;
    ns.drop_databases().await;
    let pace = Pace::of(&receipts, load_before);
    eprintln!(
        "sink at {limit}/s: {:.1} meter events/s, busiest second {}, {} x 429",
        pace.rate(),
        pace.busiest_second,
        pace.too_many
    );
    Ok(LimitPhase {
        limit,
        windows: count,
        first_after: receipts
            .first()
            .map(|r| r.at.saturating_sub(written))
            .unwrap_or_default(),
        pace,
    })
}

fn distinct_accepted(receipts: &[Receipt]) -> usize {
    receipts
        .iter()
        .filter(|r| r.accepted())
        .map(|r| r.identifier.as_str())
        .collect::<std::collections::HashSet<_>>()
        .len()
}

/// Writes the window totals to `usage.windows` as the aggregator would (revision 1, due).
async fn produce_windows(ns: &Namespace, loaded: &[Loaded]) -> anyhow::Result<()> {
    let producer: FutureProducer = producer_config(&ns.kafka, "meterline-bench", PRODUCE_TIMEOUT)
        .create()
        .context("creating the usage.windows producer")?;
    let topic = ns.topic(Topic::UsageWindows);
    let tenant = TenantId::parse(TENANT).map_err(|e| anyhow::anyhow!("{e}"))?;
    let environment = EnvironmentId::parse(ENVIRONMENT).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut messages = Vec::with_capacity(loaded.len());
    for l in loaded {
        let total = WindowTotal {
            tenant_id: tenant.clone(),
            environment_id: environment.clone(),
            customer_id: CustomerId::parse(&external_id(l.customer))
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            meter_id: MeterId::parse(METERS[l.meter].0).map_err(|e| anyhow::anyhow!("{e}"))?,
            window: l.window,
            quantity: Decimal::from(l.value),
            event_count: l.value as u64,
            revision: NonZeroU32::MIN,
            reason: WindowReason::Due,
            expired: false,
            computed_at: Timestamp::now(),
            last_event_at: None,
            period_end: None,
        };
        messages.push((total.kafka_key(), total.to_json_bytes()));
    }
    let sends = messages.iter().map(|(key, value)| {
        producer.send(
            FutureRecord::to(&topic).key(key).payload(value),
            PRODUCE_TIMEOUT,
        )
    });
    for outcome in futures::future::join_all(sends).await {
        outcome.map_err(|(e, _)| anyhow::anyhow!("writing a window total: {e}"))?;
    }
    Ok(())
}

/// The baseline: the same meter event requests the sink makes (form, identifier,
/// Idempotency-Key), from `concurrency` clients with no limiter, each owning whole customers.
async fn post_plainly(
    stripe: &Stripe,
    loaded: &[Loaded],
    concurrency: usize,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .context("building the baseline client")?;
    let url = stripe.meter_events_url();
    let run = std::process::id();
    let failures = AtomicUsize::new(0);
    let clients = (0..concurrency).map(|k| {
        let (client, url, failures) = (&client, &url, &failures);
        async move {
            for (i, l) in loaded.iter().enumerate() {
                if l.customer % concurrency != k {
                    continue;
                }
                let identifier = format!("bench_{run}_{i}");
                let event = MeterEvent {
                    event_name: METERS[l.meter].1,
                    customer: &stripe.customers[l.customer],
                    value: l.value,
                    identifier: &identifier,
                    timestamp: l.window.end().unix_timestamp() - 1,
                };
                let status = event.post(client, url, &stripe.standin.key).await?;
                if !status.is_success() {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok(())
        }
    });
    for outcome in futures::future::join_all(clients).await {
        outcome?;
    }
    let failed = failures.load(Ordering::Relaxed);
    if failed > 0 {
        bail!("the stand-in refused {failed} baseline meter events");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_totals_cycle_customers_and_meters_then_go_back_an_hour() {
        let loaded = window_totals(7, 3).unwrap();
        let shape: Vec<(usize, usize)> = loaded.iter().map(|l| (l.customer, l.meter)).collect();
        assert_eq!(
            shape,
            [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1), (0, 0)]
        );
        assert_eq!(
            loaded[0].window.start() - loaded[6].window.start(),
            time::Duration::HOUR
        );
        assert!(loaded[0].window.end() <= OffsetDateTime::now_utc());
        assert!(window_totals(100_000, 1).is_err(), "past 35 days");
    }

    fn receipt(ms: u64, status: u16, identifier: &str) -> Receipt {
        Receipt {
            at: Duration::from_millis(ms),
            status,
            customer: "cus_1".into(),
            event_name: "api_calls".into(),
            identifier: identifier.into(),
            value: 1,
            timestamp: 0,
        }
    }

    #[test]
    fn the_pace_counts_intervals_between_accepted_arrivals() {
        let receipts = [
            receipt(0, 200, "a"),
            receipt(100, 429, "b"),
            receipt(500, 200, "b"),
            receipt(1000, 200, "c"),
            receipt(1200, 500, "d"),
        ];
        let pace = Pace::of(&receipts, 0.0);
        assert_eq!(
            (pace.requests, pace.accepted, pace.too_many, pace.other),
            (5, 3, 1, 1)
        );
        assert_eq!(pace.rate(), 2.0);
        assert_eq!(pace.busiest_second, 3);
        assert_eq!(distinct_accepted(&receipts), 3);
    }
}
