//! Kafka for the aggregator: the publisher of `usage.windows`.
//!
//! Rule kept here: offsets are committed only by the pipeline, after the work they cover is
//! durable (rows in ClickHouse and windows marked, or window totals acknowledged by Kafka);
//! every write here is acknowledged by all in-sync replicas before it counts as done.

use std::time::Duration;

use meterline_common::config::KafkaSettings;
use meterline_common::kafka::{producer_config, Topics};
use meterline_schemas::{Topic, WindowTotal};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::Error;

/// How long a write may wait for Kafka before the pipeline retries it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes to `usage.windows`.
pub struct Writer {
    producer: FutureProducer,
    windows_topic: String,
}

impl Writer {
    pub fn new(settings: &KafkaSettings) -> Result<Self, Error> {
        let topics = Topics::new(settings.topic_prefix.clone());
        Ok(Self {
            producer: producer_config(settings, "aggregator", WRITE_TIMEOUT)
                .create()
                .map_err(|source| Error::Kafka {
                    context: "creating the producer",
                    source,
                })?,
            windows_topic: topics.name(Topic::UsageWindows),
        })
    }

    /// Publishes window totals, keyed by (tenant, environment, customer, meter) so that the
    /// revisions of one window stay in order; returns once all are acknowledged.
    pub async fn publish_windows(&self, totals: &[WindowTotal]) -> Result<(), Error> {
        let encoded: Vec<(String, Vec<u8>)> = totals
            .iter()
            .map(|t| (t.kafka_key(), t.to_json_bytes()))
            .collect();
        let sends = encoded.iter().map(|(key, payload)| {
            self.producer.send(
                FutureRecord::to(&self.windows_topic)
                    .key(key)
                    .payload(payload),
                Timeout::After(WRITE_TIMEOUT),
            )
        });
        for outcome in futures::future::join_all(sends).await {
            outcome.map_err(|(source, _)| Error::Kafka {
                context: "publishing window totals",
                source,
            })?;
        }
        Ok(())
    }
}
