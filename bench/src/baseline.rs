//! The baseline: a raw rdkafka `FutureProducer`, configured exactly as ingest's writer
//! (`producer_config`: idempotent, `acks=all`, lz4, `linger.ms=5`), writing the same messages
//! ingest would write (`RawUsageEvent::to_json_bytes()` values, `kafka_key()` keys).
//!
//! Each of the `concurrency` tasks takes one batch at a time, encodes it and waits for the
//! acknowledgement of every message before it takes the next, as ingest does per bulk request:
//! the difference between the two is then what HTTP, JSON parsing and validation cost. The
//! relay's baseline writes its `stripe.webhooks` messages through the same producer, one at a
//! time ([`RawProducer::write`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use meterline_common::config::KafkaSettings;
use meterline_common::kafka::producer_config;
use meterline_schemas::RawUsageEvent;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::workload::Workload;

/// Ingest's default `KAFKA_PRODUCE_TIMEOUT_MS`.
pub const PRODUCE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct RawProducer {
    producer: FutureProducer,
    topic: String,
}

impl RawProducer {
    pub fn new(settings: &KafkaSettings, topic: String) -> anyhow::Result<Self> {
        let producer = producer_config(settings, "meterline-bench", PRODUCE_TIMEOUT)
            .create()
            .context("creating the baseline producer")?;
        Ok(Self { producer, topic })
    }

    /// Writes one message and waits for Kafka's acknowledgement.
    pub async fn write(&self, key: &str, payload: &[u8]) -> anyhow::Result<()> {
        self.producer
            .send(
                FutureRecord::to(&self.topic).key(key).payload(payload),
                Timeout::After(PRODUCE_TIMEOUT),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("kafka refused a baseline write: {e}"))?;
        Ok(())
    }

    /// Writes `events` and waits until Kafka acknowledged every one.
    pub async fn write_batch(&self, events: &[RawUsageEvent]) -> anyhow::Result<()> {
        let encoded: Vec<(String, Vec<u8>)> = events
            .iter()
            .map(|e| (e.kafka_key(), e.to_json_bytes()))
            .collect();
        let writes = encoded
            .iter()
            .map(|(key, payload)| self.write(key, payload));
        for outcome in futures::future::join_all(writes).await {
            outcome?;
        }
        Ok(())
    }
}

/// Writes every batch of `workload` with `concurrency` tasks; returns the elapsed time.
pub async fn run(
    producer: Arc<RawProducer>,
    workload: Arc<Workload>,
    concurrency: usize,
) -> anyhow::Result<Duration> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (producer, workload, next) = (producer.clone(), workload.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= workload.batch_count() {
                    return anyhow::Ok(());
                }
                producer.write_batch(workload.batch_events(index)).await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.context("a baseline task panicked")??;
    }
    Ok(started.elapsed())
}
