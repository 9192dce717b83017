//! The writer of `usage.raw`: an idempotent producer with `acks=all`.
//!
//! Rule kept here: a write counts as done only when Kafka acknowledged it, and every write
//! resolves within the produce timeout (librdkafka's `message.timeout.ms`), so a request
//! never hangs on a dead broker. A failed write may still have reached the broker (a timeout
//! after the request was sent): that is why the answer tells the client to retry with the
//! same event ids, which count once downstream.

use std::time::{Duration, Instant};

use meterline_common::config::KafkaSettings;
use meterline_common::kafka::{producer_config, Topics};
use meterline_schemas::{RawUsageEvent, Topic};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::metrics;

/// Why one write failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// Kafka did not acknowledge in time or could not be reached: retry later.
    #[error("kafka did not acknowledge the write in time")]
    Unavailable,
    /// Kafka refused this message for good (for example over the broker's size limit).
    #[error("kafka refused the message")]
    Refused,
}

pub struct UsageWriter {
    producer: FutureProducer,
    topic: String,
    timeout: Duration,
}

impl UsageWriter {
    pub fn new(settings: &KafkaSettings, timeout: Duration) -> Result<Self, crate::Error> {
        let producer: FutureProducer = producer_config(settings, "ingest", timeout)
            .create()
            .map_err(|source| meterline_common::Error::Kafka {
                context: "creating the usage.raw producer",
                source,
            })?;
        Ok(Self {
            producer,
            topic: Topics::new(settings.topic_prefix.clone()).name(Topic::UsageRaw),
            timeout,
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
        let sends = encoded.iter().map(|(key, payload)| {
            self.producer.send(
                FutureRecord::to(&self.topic).key(key).payload(payload),
                Timeout::After(self.timeout),
            )
        });
        let outcomes: Vec<Result<(), WriteError>> = futures::future::join_all(sends)
            .await
            .into_iter()
            .map(|outcome| outcome.map(|_| ()).map_err(|(e, _)| classify(&e)))
            .collect();
        metrics::produce_finished(started.elapsed(), &outcomes);
        if outcomes.iter().any(Result::is_err) {
            self.log_fatal_state();
        }
        outcomes
    }

    /// An idempotent producer can hit a fatal error (such as a fencing); it then refuses every
    /// write until recreated. Log it loudly: readiness and the 503s show it too.
    fn log_fatal_state(&self) {
        if let Some((code, reason)) = self.producer.client().fatal_error() {
            tracing::error!(%code, %reason, "kafka producer in fatal state");
        }
    }

    /// Waits for queued writes to finish, for a graceful shutdown.
    pub fn flush(&self) {
        if let Err(e) = self.producer.flush(Timeout::After(self.timeout)) {
            tracing::warn!(error = %e, "flushing the usage.raw producer on shutdown");
        }
    }
}

fn classify(error: &KafkaError) -> WriteError {
    match error.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage,
        ) => WriteError::Refused,
        _ => WriteError::Unavailable,
    }
}
