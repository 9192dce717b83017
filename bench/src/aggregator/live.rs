//! The aggregator benchmark's live phase: events of the present for a tenant with 1-minute
//! windows, at a steady rate, and every total of that tenant read from `usage.windows` with
//! the instant it was read: the publish lag is read time - the window's due time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use meterline_common::kafka::{consumer_config, producer_config};
use meterline_schemas::{
    CustomerId, EnvironmentId, EventId, EventName, OffsetDateTime, RawUsageEvent, TenantId,
    Timestamp, Topic, WindowTotal,
};
use meterline_tests::Namespace;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use super::backlog::properties;
use super::{LiveReport, Params, COUNT_METER, EVENT_NAME, LIVE_TENANT, SUM_METER};
use crate::baseline::PRODUCE_TIMEOUT;
use crate::report::{Latency, Phase};
use crate::rng::SplitMix64;
use crate::workload::ENVIRONMENT;

/// The live phase: events of the live tenant (1-minute windows) at `--live-rate`, and every
/// total of that tenant read from `usage.windows` with the instant it was read.
pub(super) async fn live_phase(ns: &Namespace, params: &Params) -> anyhow::Result<LiveReport> {
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
        windows: expected.len(),
        missing: expected.keys().filter(|k| !first.contains_key(*k)).count(),
        incomplete: expected
            .keys()
            .filter(|k| !complete.contains_key(*k))
            .count(),
        republished: republished.len(),
        first: Latency::of(first.into_values().collect()),
        complete: Latency::of(complete.into_values().collect()),
        // Measured around this function by the caller, with the aggregator's own histogram.
        histogram: None,
        phase: Phase {
            elapsed: Duration::ZERO,
            cpu: Vec::new(),
        },
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
