//! Kafka for the aggregator: the consumer groups of `usage.raw` and `usage.resync`, the
//! dead-letter writer, and the publisher of `usage.windows`.
//!
//! Rule kept here: offsets are committed only by the pipeline, after the work they cover is
//! durable (rows in ClickHouse and windows marked, or window totals acknowledged by Kafka);
//! every write here is acknowledged by all in-sync replicas before it counts as done.

use std::time::Duration;

use meterline_common::config::KafkaSettings;
use meterline_common::kafka::{consumer_config, producer_config, Topics};
use meterline_schemas::{DlqHeaders, Topic, WindowTotal};
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::Error;

/// How long a write may wait for Kafka before the pipeline retries it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

pub fn consumer(
    settings: &KafkaSettings,
    group: &str,
    topic: &str,
) -> Result<StreamConsumer, Error> {
    use rdkafka::consumer::Consumer;
    let consumer: StreamConsumer = consumer_config(settings, "aggregator", group)
        .create()
        .map_err(|source| Error::Kafka {
            context: "creating a consumer",
            source,
        })?;
    consumer
        .subscribe(&[topic])
        .map_err(|source| Error::Kafka {
            context: "subscribing",
            source,
        })?;
    Ok(consumer)
}

/// Writes to `usage.windows` and the dead-letter topics.
pub struct Writer {
    producer: FutureProducer,
    topics: Topics,
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
            topics,
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

    /// Sends one message to the dead-letter twin of `source`: the original key and bytes,
    /// the reason in headers; returns once acknowledged.
    pub async fn dead_letter(
        &self,
        source: Topic,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: &DlqHeaders,
    ) -> Result<(), Error> {
        let mut kafka_headers = OwnedHeaders::new();
        for (name, value) in headers.to_headers() {
            kafka_headers = kafka_headers.insert(Header {
                key: name,
                value: Some(value.as_bytes()),
            });
        }
        let dlq_topic = self.topics.dlq(source);
        let mut record = FutureRecord::to(&dlq_topic)
            .payload(payload)
            .headers(kafka_headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        self.producer
            .send(record, Timeout::After(WRITE_TIMEOUT))
            .await
            .map(|_| ())
            .map_err(|(source, _)| Error::Kafka {
                context: "writing to the dead-letter topic",
                source,
            })
    }
}
