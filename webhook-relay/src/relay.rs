//! What happens to a verified delivery: deduplicate, publish, record.
//!
//! Rule kept here (the order matters): check the deduplication log; publish to
//! `stripe.webhooks` and wait for Kafka's acknowledgement; only then record the event as
//! relayed. A crash or failure between publish and record can only make a redelivery publish
//! the event again, never lose it. The delivery is answered 2xx only after the acknowledgement,
//! so Stripe keeps redelivering anything that is not safely on the topic.

use std::sync::Arc;

use crate::deliveries::DeliveryLog;
use crate::error::WebhookError;
use crate::extract::VerifiedDelivery;
use crate::kafka::{PublishError, WebhookPublisher};
use crate::metrics;
use crate::single_flight::SingleFlight;

/// What became of a verified delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Published and acknowledged.
    Published,
    /// Already relayed earlier: nothing published.
    Duplicate,
}

#[derive(Clone)]
pub struct Relay {
    deliveries: DeliveryLog,
    publisher: Arc<WebhookPublisher>,
    flights: Arc<SingleFlight>,
}

impl Relay {
    pub fn new(deliveries: DeliveryLog, publisher: Arc<WebhookPublisher>) -> Self {
        Self {
            deliveries,
            publisher,
            flights: Arc::default(),
        }
    }

    pub async fn relay(&self, delivery: VerifiedDelivery) -> Result<Outcome, WebhookError> {
        let VerifiedDelivery {
            tenant_id,
            environment_id,
            event,
            received_at,
        } = delivery;
        // '/' cannot occur in tenant or environment ids, so the key is unambiguous.
        let _flight = self
            .flights
            .enter(format!("{tenant_id}/{environment_id}/{}", event.id))
            .await;
        let seen = self
            .deliveries
            .seen(&tenant_id, &environment_id, &event.id)
            .await
            .map_err(|error| {
                tracing::warn!(%error, "reading the webhook deduplication log failed");
                WebhookError::PostgresUnavailable
            })?;
        if seen {
            metrics::duplicate();
            tracing::info!(
                tenant_id = %tenant_id,
                environment_id = %environment_id,
                event_id = %event.id,
                "duplicate webhook delivery, not published again"
            );
            return Ok(Outcome::Duplicate);
        }
        let message = event.into_message(tenant_id, environment_id, received_at);
        self.publisher
            .publish(&message)
            .await
            .map_err(|e| match e {
                PublishError::Unavailable => WebhookError::KafkaUnavailable,
                PublishError::Refused => WebhookError::internal(&e),
            })?;
        if let Err(error) = self
            .deliveries
            .record(
                &message.tenant_id,
                &message.environment_id,
                &message.event_id,
                &message.event_type,
                received_at,
            )
            .await
        {
            // The event is safely on the topic, so the delivery is still answered 200; only a
            // redelivery of it would be published again.
            metrics::dedup_record_failed();
            tracing::error!(%error, event_id = %message.event_id, "recording a relayed webhook failed");
        }
        tracing::info!(
            tenant_id = %message.tenant_id,
            environment_id = %message.environment_id,
            event_id = %message.event_id,
            event_type = %message.event_type,
            "webhook relayed"
        );
        Ok(Outcome::Published)
    }
}
