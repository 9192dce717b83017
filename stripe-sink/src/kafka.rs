//! Kafka for the sink: the publisher of resync requests (`usage.resync`).

use std::time::Duration;

use meterline_common::config::KafkaSettings;
use meterline_common::kafka::{producer_config, Topics};
use meterline_schemas::{ResyncRequest, Topic};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::Error;

/// How long a request waits for Kafka before the API answers 503.
const TIMEOUT: Duration = Duration::from_secs(5);

pub struct ResyncPublisher {
    producer: FutureProducer,
    topic: String,
}

impl ResyncPublisher {
    pub fn new(settings: &KafkaSettings) -> Result<Self, Error> {
        Ok(Self {
            producer: producer_config(settings, "stripe-sink", TIMEOUT)
                .create()
                .map_err(|source| Error::Kafka {
                    context: "creating the resync producer",
                    source,
                })?,
            topic: Topics::new(settings.topic_prefix.clone()).name(Topic::UsageResync),
        })
    }

    /// Publishes a request; returns once Kafka acknowledged it.
    pub async fn request(&self, request: &ResyncRequest) -> Result<(), Error> {
        self.producer
            .send(
                FutureRecord::to(&self.topic)
                    .key(&request.kafka_key())
                    .payload(&request.to_json_bytes()),
                Timeout::After(TIMEOUT),
            )
            .await
            .map(|_| ())
            .map_err(|(source, _)| Error::Kafka {
                context: "publishing a resync request",
                source,
            })
    }
}
