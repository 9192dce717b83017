//! Driving the usage pipeline from a test: meters written straight to the store, events
//! written straight to `usage.raw` (the topic's public contract), and window totals watched
//! on `usage.windows` until they reach an expected state.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meterline_catalog::meters::MeterStore;
use meterline_common::kafka::{consumer_config, producer_config};
use meterline_schemas::{
    CustomerId, Decimal, EnvironmentId, EventId, EventName, MeterDefinition, MeterInput,
    RawUsageEvent, TenantId, Timestamp, Topic, WindowTotal,
};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;
use time::OffsetDateTime;

use crate::api::scope;
use crate::{Namespace, ServiceProcess};

/// The start of the hour `hours_ago` hours before now: windows there are long due.
pub fn hour_start(hours_ago: i64) -> OffsetDateTime {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    OffsetDateTime::from_unix_timestamp(now - now.rem_euclid(3600) - hours_ago * 3600)
        .expect("a time within the representable range")
}

/// The aggregator in `ns`, publishing windows as soon as they end (no grace period) and
/// batching for at most 200 ms, plus `extra` settings.
pub async fn spawn_aggregator(ns: &Namespace, extra: &[(&str, &str)]) -> ServiceProcess {
    let mut env = ns.env();
    for (k, v) in [
        ("STRIPE_SYNC_GRACE_PERIOD_MINUTES", "0"),
        ("AGGREGATOR_BATCH_MAX_WAIT_MS", "200"),
        ("AGGREGATOR_PUBLISH_INTERVAL_MS", "200"),
    ]
    .iter()
    .chain(extra)
    {
        env.push(((*k).into(), (*v).into()));
    }
    ServiceProcess::spawn("aggregator", &env).await
}

/// Stores a meter for `tenant`/`environment` from its JSON form.
pub async fn create_meter(ns: &Namespace, tenant: &str, environment: &str, meter: Value) {
    let input: MeterInput = serde_json::from_value(meter).expect("a meter document");
    let definition = MeterDefinition::try_from(input).expect("a valid meter");
    MeterStore::new(ns.pg_pool().await)
        .create(&scope(tenant, environment), &definition)
        .await
        .expect("storing the meter");
}

/// Makes every window of `tenant`/`environment` `minutes` long, for all time (a size change
/// effective at the Unix epoch), so that a test can have short windows fall due while it runs.
pub async fn window_minutes_since_epoch(
    ns: &Namespace,
    tenant: &str,
    environment: &str,
    minutes: u32,
) {
    let pool = ns.pg_pool().await;
    meterline_catalog::window_sizes::schedule_change(
        &pool,
        &scope(tenant, environment),
        minutes,
        OffsetDateTime::UNIX_EPOCH,
        Duration::ZERO,
    )
    .await
    .expect("storing the window size");
    pool.close().await;
}

/// A usage event as a producer would write it.
pub fn event(
    tenant: &str,
    id: &str,
    customer: &str,
    name: &str,
    at: OffsetDateTime,
    properties: Value,
) -> RawUsageEvent {
    RawUsageEvent {
        id: EventId::parse(id).expect("event id"),
        tenant_id: TenantId::parse(tenant).expect("tenant id"),
        environment_id: EnvironmentId::parse("env_prod").expect("environment id"),
        customer_id: CustomerId::parse(customer).expect("customer id"),
        event_name: EventName::parse(name).expect("event name"),
        timestamp: Timestamp::new(at).expect("timestamp"),
        properties: properties.as_object().cloned().unwrap_or_default(),
        source: None,
        ingested_at: Some(Timestamp::now()),
    }
}

/// Writes raw payloads (valid or not) to the namespace's `usage.raw`, with their keys.
pub async fn produce_raw(ns: &Namespace, messages: &[(String, Vec<u8>)]) {
    let producer: FutureProducer = producer_config(&ns.kafka, "it-usage", Duration::from_secs(30))
        .create()
        .expect("creating a producer");
    let topic = ns.topic(Topic::UsageRaw);
    let sends = messages.iter().map(|(key, payload)| {
        producer.send(
            FutureRecord::to(&topic).key(key).payload(payload),
            Duration::from_secs(30),
        )
    });
    for outcome in futures::future::join_all(sends).await {
        outcome.unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
    }
}

/// Writes events to the namespace's `usage.raw`, keyed as the contract says.
pub async fn produce_events(ns: &Namespace, events: &[RawUsageEvent]) {
    let messages: Vec<(String, Vec<u8>)> = events
        .iter()
        .map(|e| (e.kafka_key(), e.to_json_bytes()))
        .collect();
    produce_raw(ns, &messages).await;
}

/// (customer, meter, window start as Unix seconds): one window of one tenant environment.
pub type WindowId = (String, String, i64);

/// What a test expects a window to total: quantity and event count.
pub type Expected = BTreeMap<WindowId, (Decimal, u64)>;

pub fn window_id(total: &WindowTotal) -> WindowId {
    (
        total.customer_id.as_str().to_owned(),
        total.meter_id.as_str().to_owned(),
        total.window.start().unix_timestamp(),
    )
}

/// Everything published on `usage.windows`, read by a group of the test's own.
pub struct WindowWatcher {
    consumer: StreamConsumer,
    /// Every message, in arrival order.
    pub seen: Vec<WindowTotal>,
}

impl WindowWatcher {
    pub fn new(ns: &Namespace) -> Self {
        let group = format!("{}-windows-{}", ns.id, uuid::Uuid::now_v7().simple());
        let consumer: StreamConsumer = consumer_config(&ns.kafka, "it-windows", &group)
            .create()
            .expect("creating a consumer");
        consumer
            .subscribe(&[&ns.topic(Topic::UsageWindows)])
            .expect("subscribing to usage.windows");
        Self {
            consumer,
            seen: Vec::new(),
        }
    }

    /// The highest revision of each window seen so far.
    pub fn latest(&self) -> BTreeMap<WindowId, WindowTotal> {
        let mut latest: BTreeMap<WindowId, WindowTotal> = BTreeMap::new();
        for total in &self.seen {
            let id = window_id(total);
            match latest.get(&id) {
                Some(known) if known.revision >= total.revision => {}
                _ => {
                    latest.insert(id, total.clone());
                }
            }
        }
        latest
    }

    /// The latest totals as (quantity, event count).
    pub fn totals(&self) -> Expected {
        self.latest()
            .into_iter()
            .map(|(id, t)| (id, (t.quantity.normalize(), t.event_count)))
            .collect()
    }

    /// Reads until the latest totals equal `expected`, failing with the difference after
    /// `within`.
    pub async fn wait_for(&mut self, expected: &Expected, within: Duration) {
        let expected: Expected = expected
            .iter()
            .map(|(k, (q, c))| (k.clone(), (q.normalize(), *c)))
            .collect();
        let deadline = Instant::now() + within;
        loop {
            if self.totals() == expected {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let got = self.totals();
                let wrong: Vec<String> = expected
                    .iter()
                    .filter(|(k, v)| got.get(*k) != Some(*v))
                    .take(10)
                    .map(|(k, v)| format!("{k:?}: expected {v:?}, got {:?}", got.get(k)))
                    .collect();
                let extra: Vec<&WindowId> = got
                    .keys()
                    .filter(|k| !expected.contains_key(*k))
                    .take(10)
                    .collect();
                panic!(
                    "usage.windows did not reach the expected totals within {within:?}: \
                     {} of {} windows wrong, e.g. {wrong:#?}; unexpected windows: {extra:?}",
                    expected
                        .iter()
                        .filter(|(k, v)| got.get(*k) != Some(*v))
                        .count(),
                    expected.len()
                );
            }
            self.read_for(left.min(Duration::from_millis(500))).await;
        }
    }

    /// Reads whatever arrives during `period`.
    pub async fn read_for(&mut self, period: Duration) {
        let until = tokio::time::Instant::now() + period;
        loop {
            tokio::select! {
                received = self.consumer.recv() => {
                    let message = received.expect("reading usage.windows");
                    let total = WindowTotal::from_json_bytes(message.payload().unwrap_or_default())
                        .expect("usage.windows carries valid window totals");
                    self.seen.push(total);
                }
                _ = tokio::time::sleep_until(until) => return,
            }
        }
    }
}
