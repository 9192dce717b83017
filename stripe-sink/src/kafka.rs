//! Kafka for the sink: the publisher of resync requests (`usage.resync`).

use std::time::Duration;

use meterline_common::config::KafkaSettings;
use meterline_common::kafka::{Publisher, Topics};
use meterline_schemas::{ResyncRequest, Topic};

use crate::Error;

/// How long a request waits for Kafka before the API answers 503.
const TIMEOUT: Duration = Duration::from_secs(5);

pub struct ResyncPublisher {
    publisher: Publisher,
    topic: String,
}

impl ResyncPublisher {
    pub fn new(settings: &KafkaSettings) -> Result<Self, Error> {
        Ok(Self {
            publisher: Publisher::new(settings, "stripe-sink", TIMEOUT)?,
            topic: Topics::new(settings.topic_prefix.clone()).name(Topic::UsageResync),
        })
    }

    /// Publishes a request; returns once Kafka acknowledged it.
    pub async fn request(&self, request: &ResyncRequest) -> Result<(), Error> {
        self.publisher
            .write(
                &self.topic,
                request.kafka_key().as_bytes(),
                &request.to_json_bytes(),
            )
            .await
            .map_err(Error::Publish)
    }
}
