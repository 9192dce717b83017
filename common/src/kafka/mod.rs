//! Kafka, the one consumer and producer kit every service uses: topic names, client settings
//! and topic creation here, and
//! - [`publish`]: acknowledged writes ([`Publisher`]) and the retriable/permanent split of a
//!   failed one;
//! - [`consume`]: receive-or-shutdown, the next-offset bookkeeping and the commit;
//! - [`dead_letters`]: building and writing the dead letters of a topic ([`DeadLetters`]);
//! - [`watch`]: the readiness probe and the consumer-group lag, from outside any group.
//!
//! Producers are idempotent with `acks=all`, so an acknowledged write is on every in-sync
//! replica and a retried send cannot duplicate it. Consumer groups never auto-commit: a
//! service commits an offset only after the write it covers is durable downstream.

pub mod consume;
pub mod dead_letters;
pub mod publish;
pub mod watch;

use std::time::Duration;

use meterline_schemas::Topic;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::types::RDKafkaErrorCode;

pub use consume::{commit, commit_message, next_message, read_batch, NextOffsets};
pub use dead_letters::{DeadLetter, DeadLetters};
pub use publish::{Publisher, WriteError};
pub use watch::{resume_offset, GroupWatch, KafkaProbe, PartitionLag};

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

pub(crate) fn base_config(settings: &KafkaSettings, client_id: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.brokers)
        .set("client.id", client_id)
        // Fail a request to a dead broker quickly, so readiness and 503s are prompt.
        .set("socket.connection.setup.timeout.ms", "5000")
        .set("reconnect.backoff.max.ms", "2000");
    for (name, value) in settings.security.properties() {
        config.set(name, value);
    }
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

/// How many members consumer group `group` has now (0 when it has none or does not exist).
pub async fn group_members(settings: &KafkaSettings, group: &str) -> Result<usize, Error> {
    let client: BaseConsumer =
        base_config(settings, "meterline-admin")
            .create()
            .map_err(|source| Error::Kafka {
                context: "creating a client",
                source,
            })?;
    let group = group.to_owned();
    tokio::task::spawn_blocking(move || {
        let list = client
            .fetch_group_list(Some(&group), Duration::from_secs(30))
            .map_err(|source| Error::Kafka {
                context: "describing a consumer group",
                source,
            })?;
        Ok(list.groups().iter().map(|g| g.members().len()).sum())
    })
    .await
    .map_err(|e| Error::KafkaAdmin(format!("describing a consumer group: {e}")))?
}

/// An admin client with the shared settings (brokers, TLS, SASL).
fn admin_client(settings: &KafkaSettings) -> Result<AdminClient<DefaultClientContext>, Error> {
    base_config(settings, "meterline-admin")
        .create()
        .map_err(|source| Error::Kafka {
            context: "creating admin client",
            source,
        })
}

/// Asks the brokers to delete `topics` (missing ones are no error) and returns once the
/// controller accepted it, without waiting for the deletion; for test namespaces.
pub async fn delete_topics(settings: &KafkaSettings, topics: &[String]) -> Result<(), Error> {
    let admin = admin_client(settings)?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    let options = AdminOptions::new().request_timeout(Some(Duration::from_secs(5)));
    admin
        .delete_topics(&names, &options)
        .await
        .map(drop)
        .map_err(|source| Error::Kafka {
            context: "deleting topics",
            source,
        })
}

/// Creates every topic of `topics` that does not exist yet, with `partitions` partitions.
/// Existing topics are left as they are.
pub async fn ensure_topics(
    settings: &KafkaSettings,
    topics: &[String],
    partitions: i32,
    replication: i32,
) -> Result<(), Error> {
    let admin = admin_client(settings)?;
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
