//! The writer of `stripe.webhooks`: an idempotent producer with `acks=all`.
//!
//! Rule kept here: a publish counts as done only when Kafka acknowledged it, and every publish
//! resolves within the produce timeout (librdkafka's `message.timeout.ms`), so a delivery is
//! never left hanging on a dead broker. A failed publish may still have reached the broker (a
//! timeout after the request was sent); the delivery is then answered 503, Stripe redelivers,
//! and the event may appear twice on the topic: consumers deduplicate on `event_id`.

use std::time::{Duration, Instant};

use meterline_common::config::KafkaSettings;
use meterline_common::kafka::{Publisher, Topics, WriteError};
use meterline_schemas::{StripeWebhook, Topic};

use crate::metrics;

/// Why a publish failed: Kafka's retriable/permanent split ([`WriteError`]) as the relay
/// answers it.
pub type PublishError = WriteError;

pub struct WebhookPublisher {
    publisher: Publisher,
    topic: String,
}

impl WebhookPublisher {
    pub fn new(settings: &KafkaSettings, timeout: Duration) -> Result<Self, crate::Error> {
        Ok(Self {
            publisher: Publisher::new(settings, "webhook-relay", timeout)?,
            topic: Topics::new(settings.topic_prefix.clone()).name(Topic::StripeWebhooks),
        })
    }

    /// Publishes `message` keyed by its tenant environment (so one environment's events stay
    /// in order) and waits for Kafka's acknowledgement.
    pub async fn publish(&self, message: &StripeWebhook) -> Result<(), PublishError> {
        let started = Instant::now();
        let outcome = self
            .publisher
            .write(
                &self.topic,
                message.kafka_key().as_bytes(),
                &message.to_json_bytes(),
            )
            .await;
        match outcome {
            Ok(()) => metrics::published(started.elapsed()),
            Err(_) => metrics::publish_failed(started.elapsed()),
        }
        outcome
    }

    /// Waits for queued publishes to finish, for a graceful shutdown.
    pub fn flush(&self) {
        self.publisher.flush();
    }
}
