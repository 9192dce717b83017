//! Watching Kafka from outside any consumer group: the readiness probe, every message ever
//! written to a topic, and how far a group's committed offsets are behind.
//!
//! Rule kept here: these clients join no group and commit nothing, so watching can never move
//! a service's position.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};

use super::base_config;
use crate::config::KafkaSettings;
use crate::Error;

/// A metadata-only client: readiness (can we fetch cluster metadata from a broker right now?)
/// and how many messages were ever written to a topic. One per service; it joins no group.
pub struct KafkaProbe {
    client: std::sync::Arc<BaseConsumer>,
}

impl KafkaProbe {
    pub fn new(settings: &KafkaSettings, client_id: &str) -> Result<Self, Error> {
        let client: BaseConsumer = base_config(settings, client_id)
            .create()
            .map_err(|source| Error::Kafka {
                context: "creating the metadata client",
                source,
            })?;
        Ok(Self {
            client: std::sync::Arc::new(client),
        })
    }

    pub async fn check(&self, timeout: Duration) -> Result<(), String> {
        let client = self.client.clone();
        tokio::task::spawn_blocking(move || {
            client
                .fetch_metadata(None, timeout)
                .map(|_| ())
                .map_err(|e| format!("metadata request failed: {e}"))
        })
        .await
        .map_err(|e| format!("readiness task failed: {e}"))?
    }

    /// The sum of the end offsets of every partition of `topic`: every message ever written
    /// to it (transaction markers included), whatever retention has since removed. It never
    /// goes down, so its increase is the number of messages written in a period.
    pub async fn end_offsets_total(&self, topic: &str, timeout: Duration) -> Result<i64, Error> {
        let client = self.client.clone();
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || -> Result<i64, Error> {
            partitions(&client, &topic, timeout)?
                .into_iter()
                .map(|partition| {
                    client
                        .fetch_watermarks(&topic, partition, timeout)
                        .map(|(_, high)| high)
                        .map_err(|source| Error::Kafka {
                            context: "reading partition watermarks",
                            source,
                        })
                })
                .sum()
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))?
    }
}

/// Watches a consumer group from outside: how far its committed offsets are behind the end of
/// each partition of a topic. Committed offsets, not a member's position, so the lag seen is
/// what a restart would replay, and it is the same whichever replica reports it. The client
/// carries the group id only to ask for the group's offsets; it never joins the group.
pub struct GroupWatch {
    client: std::sync::Arc<BaseConsumer>,
    topic: String,
}

/// One partition's committed offset and end offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLag {
    pub partition: i32,
    /// Messages after the group's committed offset (the whole partition when none is
    /// committed yet, since a new group starts at the earliest offset).
    pub lag: i64,
}

impl GroupWatch {
    pub fn new(
        settings: &KafkaSettings,
        client_id: &str,
        group_id: &str,
        topic: &str,
    ) -> Result<Self, Error> {
        let client: BaseConsumer = base_config(settings, client_id)
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|source| Error::Kafka {
                context: "creating a consumer group watch",
                source,
            })?;
        Ok(Self {
            client: std::sync::Arc::new(client),
            topic: topic.to_owned(),
        })
    }

    /// The lag of every partition of the topic. Blocking calls run off the async threads.
    pub async fn lag(&self, timeout: Duration) -> Result<Vec<PartitionLag>, Error> {
        let client = self.client.clone();
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<PartitionLag>, Error> {
            let kafka = |context: &'static str| move |source| Error::Kafka { context, source };
            let mut wanted = rdkafka::TopicPartitionList::new();
            for partition in partitions(&client, &topic, timeout)? {
                wanted.add_partition(&topic, partition);
            }
            let committed = client
                .committed_offsets(wanted, timeout)
                .map_err(kafka("reading committed offsets"))?;
            committed
                .elements()
                .iter()
                .map(|element| {
                    let (low, high) = client
                        .fetch_watermarks(&topic, element.partition(), timeout)
                        .map_err(kafka("reading partition watermarks"))?;
                    let from = resume_offset(element.offset(), low);
                    Ok(PartitionLag {
                        partition: element.partition(),
                        lag: (high - from).max(0),
                    })
                })
                .collect()
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))?
    }
}

/// Where a group resumes reading a partition whose earliest retained offset is `low`: its
/// committed offset, or `low` when it has none yet or retention removed what it points at.
pub fn resume_offset(committed: rdkafka::Offset, low: i64) -> i64 {
    committed.to_raw().filter(|o| *o >= low).unwrap_or(low)
}

fn partitions(client: &BaseConsumer, topic: &str, timeout: Duration) -> Result<Vec<i32>, Error> {
    let metadata = client
        .fetch_metadata(Some(topic), timeout)
        .map_err(|source| Error::Kafka {
            context: "reading topic metadata",
            source,
        })?;
    Ok(metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect())
}
