//! The writer of `usage.raw`: an idempotent producer with `acks=all`.
//!
//! Rule kept here: a write counts as done only when Kafka acknowledged it, and every write
//! resolves within the produce timeout (librdkafka's `message.timeout.ms`), so a request
//! never hangs on a dead broker. A failed write may still have reached the broker (a timeout
//! after the request was sent): that is why the answer tells the client to retry with the
//! same event ids, which count once downstream.

use std::time::{Duration, Instant};

use meterline_common::config::KafkaSettings;
pub use meterline_common::kafka::WriteError;
use meterline_common::kafka::{Publisher, Topics};
use meterline_schemas::{RawUsageEvent, Topic};

use crate::metrics;

pub struct UsageWriter {
    publisher: Publisher,
    topic: String,
}

impl UsageWriter {
    pub fn new(settings: &KafkaSettings, timeout: Duration) -> Result<Self, crate::Error> {
        Ok(Self {
            publisher: Publisher::new(settings, "ingest", timeout)?,
            topic: Topics::new(settings.topic_prefix.clone()).name(Topic::UsageRaw),
        })
    }

    /// Writes every event, keyed by customer so one customer's events stay in order, and
    /// returns one outcome per event, in order.
    pub async fn write_all(&self, events: &[RawUsageEvent]) -> Vec<Result<(), WriteError>> {
        let started = Instant::now();
        let encoded: Vec<(String, Vec<u8>)> = events
            .iter()
            .map(|e| (e.kafka_key(), e.to_json_bytes()))
            .collect();
        let outcomes = self.publisher.send_all(&self.topic, &encoded).await;
        metrics::produce_finished(started.elapsed(), &outcomes);
        outcomes
    }

    /// Waits for queued writes to finish, for a graceful shutdown.
    pub fn flush(&self) {
        self.publisher.flush();
    }
}
