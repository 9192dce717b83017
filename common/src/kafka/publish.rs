//! Acknowledged writes to one topic: the producer every service writes through.
//!
//! Rule kept here: a write counts as done only when Kafka acknowledged it (`acks=all`, an
//! idempotent producer), and every write resolves within the delivery timeout (librdkafka's
//! `message.timeout.ms`), so no caller hangs on a dead broker. A failed write may still have
//! reached the broker (a timeout after the request was sent): callers retry with the same
//! key and bytes, and consumers deduplicate.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use super::producer_config;
use crate::config::KafkaSettings;
use crate::Error;

/// Why one write failed: the retriable/permanent split every caller acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// Kafka did not acknowledge in time or could not be reached: the same write may
    /// succeed later.
    #[error("kafka did not acknowledge the write in time")]
    Unavailable,
    /// Kafka refused this message for good (for example over the broker's size limit):
    /// retrying cannot help.
    #[error("kafka refused the message")]
    Refused,
}

impl WriteError {
    pub fn is_retriable(self) -> bool {
        self == Self::Unavailable
    }

    fn of(error: &KafkaError) -> Self {
        match error.rdkafka_error_code() {
            Some(
                RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage,
            ) => Self::Refused,
            _ => Self::Unavailable,
        }
    }
}

/// Writes through an idempotent, `acks=all` producer; each write names its topic (a full
/// name, prefix included).
#[derive(Clone)]
pub struct Publisher {
    producer: FutureProducer,
    timeout: Duration,
}

impl Publisher {
    /// A producer named `client_id`, each write acknowledged or failed within `timeout`.
    pub fn new(
        settings: &KafkaSettings,
        client_id: &str,
        timeout: Duration,
    ) -> Result<Self, Error> {
        let producer = producer_config(settings, client_id, timeout)
            .create()
            .map_err(|source| Error::Kafka {
                context: "creating a producer",
                source,
            })?;
        Ok(Self { producer, timeout })
    }

    /// Writes one message with headers (name, value) to `topic` and waits for Kafka's
    /// acknowledgement.
    pub async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &[(&str, String)],
    ) -> Result<(), KafkaError> {
        let mut record = FutureRecord::to(topic).payload(payload);
        if !headers.is_empty() {
            let mut kafka_headers = OwnedHeaders::new();
            for (name, value) in headers {
                kafka_headers = kafka_headers.insert(Header {
                    key: name,
                    value: Some(value.as_bytes()),
                });
            }
            record = record.headers(kafka_headers);
        }
        if let Some(key) = key {
            record = record.key(key);
        }
        self.producer
            .send(record, Timeout::After(self.timeout))
            .await
            .map(|_| ())
            .map_err(|(error, _)| error)
    }

    /// Writes every (key, payload) to `topic` at once and gives one outcome per message, in
    /// order. Logs a producer's fatal state once when any write failed.
    pub async fn send_all<K: AsRef<[u8]>, P: AsRef<[u8]>>(
        &self,
        topic: &str,
        records: &[(K, P)],
    ) -> Vec<Result<(), WriteError>> {
        let sends = records
            .iter()
            .map(|(key, payload)| self.send(topic, Some(key.as_ref()), payload.as_ref(), &[]));
        let outcomes: Vec<Result<(), WriteError>> = futures::future::join_all(sends)
            .await
            .into_iter()
            .map(|outcome| outcome.map_err(|e| WriteError::of(&e)))
            .collect();
        if outcomes.iter().any(Result::is_err) {
            self.log_fatal_state();
        }
        outcomes
    }

    /// One keyed write to `topic`, the failure classified; logs it and the producer's fatal
    /// state.
    pub async fn write(&self, topic: &str, key: &[u8], payload: &[u8]) -> Result<(), WriteError> {
        self.send(topic, Some(key), payload, &[])
            .await
            .map_err(|error| {
                tracing::warn!(%topic, %error, "writing to kafka failed");
                self.log_fatal_state();
                WriteError::of(&error)
            })
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
            tracing::warn!(error = %e, "flushing a producer on shutdown");
        }
    }
}
