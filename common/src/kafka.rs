//! Kafka: topic names, client settings, topic creation, the readiness probe, and the watches
//! that report a consumer group's lag and what reached a topic.
//!
//! Producers are idempotent with `acks=all`, so an acknowledged write is on every in-sync
//! replica and a retried send cannot duplicate it. Consumer groups never auto-commit: a
//! service commits an offset only after the write it covers is durable downstream.

use std::time::Duration;

use meterline_schemas::{DlqHeaders, Topic};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::util::Timeout;

use crate::config::KafkaSettings;
use crate::Error;

/// Topic names of one deployment: the base names of [`Topic`] behind `TOPIC_PREFIX`.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn name(&self, topic: Topic) -> String {
        topic.name_with_prefix(&self.prefix)
    }

    pub fn dlq(&self, topic: Topic) -> String {
        topic.dlq_name_with_prefix(&self.prefix)
    }

    /// Every topic and its dead-letter twin.
    pub fn all(&self) -> Vec<String> {
        Topic::all()
            .iter()
            .flat_map(|t| [self.name(*t), self.dlq(*t)])
            .collect()
    }
}

fn base_config(settings: &KafkaSettings, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.brokers)
        .set("client.id", client_id)
        // Fail a request to a dead broker quickly, so readiness and 503s are prompt.
        .set("socket.connection.setup.timeout.ms", "5000")
        .set("reconnect.backoff.max.ms", "2000");
    config
}

/// An idempotent, `acks=all` producer. `delivery_timeout` bounds how long a send may wait for
/// the broker before it fails: the bound within which a caller learns nothing was stored.
pub fn producer_config(
    settings: &KafkaSettings,
    client_id: &str,
    delivery_timeout: Duration,
) -> ClientConfig {
    let mut config = base_config(settings, client_id);
    config
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .set(
            "message.timeout.ms",
            delivery_timeout.as_millis().to_string(),
        );
    config
}

/// A consumer in group `group_id` that never commits on its own: offsets are committed by the
/// service after the work they cover is durable. A new group starts at the earliest offset so
/// that no message written before the first start is skipped.
pub fn consumer_config(settings: &KafkaSettings, client_id: &str, group_id: &str) -> ClientConfig {
    let mut config = base_config(settings, client_id);
    config
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        // librdkafka's default of 1 MiB per partition and fetch capped a backlog's replay at
        // about 290,000 small messages/s on our stack (measured with kcat); 8 MiB lets the
        // aggregator's batches fill as fast as it meters them. Memory stays bounded by
        // queued.max.messages.kbytes (64 MiB per consumer).
        .set("max.partition.fetch.bytes", "8388608");
    config
}

/// A consumer in group `group_id` (see [`consumer_config`]) subscribed to `topic`.
pub fn subscribe(
    settings: &KafkaSettings,
    client_id: &str,
    group_id: &str,
    topic: &str,
) -> Result<StreamConsumer, Error> {
    let consumer: StreamConsumer = consumer_config(settings, client_id, group_id)
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

/// Creates every topic of `topics` that does not exist yet, with `partitions` partitions.
/// Existing topics are left as they are.
pub async fn ensure_topics(
    settings: &KafkaSettings,
    topics: &[String],
    partitions: i32,
    replication: i32,
) -> Result<(), Error> {
    let admin: AdminClient<DefaultClientContext> = base_config(settings, "meterline-admin")
        .create()
        .map_err(|source| Error::Kafka {
            context: "creating admin client",
            source,
        })?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|name| {
            NewTopic::new(name, partitions, TopicReplication::Fixed(replication))
                // Window totals and raw usage are replayed by resyncs long after they were
                // written; keep them 35 days, Stripe's own limit for back-dated usage.
                .set("retention.ms", "3024000000")
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(|source| Error::Kafka {
            context: "creating topics",
            source,
        })?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(Error::KafkaAdmin(format!("creating topic {topic}: {code}")))
            }
        }
    }
    Ok(())
}

/// Writes messages that could not be processed to the dead-letter twin of their topic: the
/// original key and bytes unchanged, the reason in headers ([`DlqHeaders`]).
pub struct DeadLetters {
    producer: FutureProducer,
    topics: Topics,
}

impl DeadLetters {
    pub fn new(settings: &KafkaSettings, client_id: &str) -> Result<Self, Error> {
        Ok(Self {
            producer: producer_config(settings, client_id, Duration::from_secs(30))
                .create()
                .map_err(|source| Error::Kafka {
                    context: "creating the dead-letter producer",
                    source,
                })?,
            topics: Topics::new(settings.topic_prefix.clone()),
        })
    }

    /// Sends one message to the twin of `source`; returns once Kafka acknowledged it.
    pub async fn send(
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
        let topic = self.topics.dlq(source);
        let mut record = FutureRecord::to(&topic)
            .payload(payload)
            .headers(kafka_headers);
        if let Some(key) = key {
            record = record.key(key);
        }
        self.producer
            .send(record, Timeout::After(Duration::from_secs(30)))
            .await
            .map(|_| ())
            .map_err(|(source, _)| Error::Kafka {
                context: "writing to a dead-letter topic",
                source,
            })
    }
}

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
