//! The writer of `stripe.webhooks`: an idempotent producer with `acks=all`.
//!
//! Rule kept here: a publish counts as done only when Kafka acknowledged it, and every publish
//! resolves within the produce timeout (librdkafka's `message.timeout.ms`), so a delivery is
//! never left hanging on a dead broker. A failed publish may still have reached the broker (a
//! timeout after the request was sent); the delivery is then answered 503, Stripe redelivers,
//! and the event may appear twice on the topic: consumers deduplicate on `event_id`.

use std::time::{Duration, Instant};

use meterline_common::config::KafkaSettings;
use meterline_common::kafka::{producer_config, Topics};
use meterline_schemas::{StripeWebhook, Topic};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::metrics;

/// Why a publish failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// Kafka did not acknowledge in time or could not be reached: a redelivery may succeed.
    #[error("kafka did not acknowledge the event in time")]
    Unavailable,
    /// Kafka refused this message for good (for example over the broker's size limit).
    #[error("kafka refused the event")]
    Refused,
}

pub struct WebhookPublisher {
    producer: FutureProducer,
    topic: String,
    timeout: Duration,
}

impl WebhookPublisher {
    pub fn new(settings: &KafkaSettings, timeout: Duration) -> Result<Self, crate::Error> {
        let producer: FutureProducer = producer_config(settings, "webhook-relay", timeout)
            .create()
            .map_err(|source| meterline_common::Error::Kafka {
                context: "creating the stripe.webhooks producer",
                source,
            })?;
        Ok(Self {
            producer,
            topic: Topics::new(settings.topic_prefix.clone()).name(Topic::StripeWebhooks),
            timeout,
        })
    }

    /// Publishes `message` keyed by its tenant environment (so one environment's events stay
    /// in order) and waits for Kafka's acknowledgement.
    pub async fn publish(&self, message: &StripeWebhook) -> Result<(), PublishError> {
        let started = Instant::now();
        let key = message.kafka_key();
        let payload = message.to_json_bytes();
        let outcome = self
            .producer
            .send(
                FutureRecord::to(&self.topic).key(&key).payload(&payload),
                Timeout::After(self.timeout),
            )
            .await;
        match outcome {
            Ok(_) => {
                metrics::published(started.elapsed());
                Ok(())
            }
            Err((error, _)) => {
                metrics::publish_failed(started.elapsed());
                tracing::warn!(%error, "publishing to stripe.webhooks failed");
                if let Some((code, reason)) = self.producer.client().fatal_error() {
                    tracing::error!(%code, %reason, "kafka producer in fatal state");
                }
                Err(classify(&error))
            }
        }
    }

    /// Waits for queued publishes to finish, for a graceful shutdown.
    pub fn flush(&self) {
        if let Err(e) = self.producer.flush(Timeout::After(self.timeout)) {
            tracing::warn!(error = %e, "flushing the stripe.webhooks producer on shutdown");
        }
    }
}

fn classify(error: &KafkaError) -> PublishError {
    match error.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage,
        ) => PublishError::Refused,
        _ => PublishError::Unavailable,
    }
}
