//! Watching Kafka from outside any consumer group: the readiness probe, every message ever
//! written to a topic, and how far a group's committed offsets are behind.
//!
//! Rule kept here: these clients join no group and commit nothing, so watching can never move
//! a service's position.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};

use super::base_config;
use crate::config::KafkaSettings;
use crate::Error;

/// A metadata-only client: readiness (can we fetch cluster metadata from a broker right now?)
/// and how many messages were ever written to a topic. One per service; it joins no group.
pub struct KafkaProbe {
    client: std::sync::Arc<BaseConsumer<ProbeContext>>,
}

/// How long a broker error explains a failed probe: the probe runs every few seconds.
const ERROR_RECENT: Duration = Duration::from_secs(30);

/// Keeps the probe client's last connection failure: a failed metadata request says only
/// "broker transport failure", while librdkafka logged the cause (a refused login, an
/// untrusted certificate, a plaintext client at a TLS listener) from its own threads.
#[derive(Default)]
pub struct ProbeContext {
    last_error: Mutex<Option<(Instant, String)>>,
}

impl ClientContext for ProbeContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        use RDKafkaLogLevel::{Alert, Critical, Debug, Emerg, Error, Info, Notice, Warning};
        if fac == "FAIL" || matches!(level, Emerg | Alert | Critical | Error) {
            self.note(log_message.to_owned());
        }
        // As rdkafka's own default, into our logs.
        match level {
            Emerg | Alert | Critical | Error => {
                tracing::error!(target: "librdkafka", "librdkafka: {fac} {log_message}")
            }
            Warning => tracing::warn!(target: "librdkafka", "librdkafka: {fac} {log_message}"),
            Notice | Info => {
                tracing::info!(target: "librdkafka", "librdkafka: {fac} {log_message}")
            }
            Debug => tracing::debug!(target: "librdkafka", "librdkafka: {fac} {log_message}"),
        }
    }
}

impl ConsumerContext for ProbeContext {}

/// Serves the probe client's queue (it subscribes to nothing: no message comes back), so its
/// log lines reach the log and [`ProbeContext`] sees the last failure. `after_failure`: for
/// up to 100 ms, as the failure's own lines may still be on their way.
fn serve_events(client: &BaseConsumer<ProbeContext>, after_failure: bool) {
    let wait = if after_failure {
        Duration::from_millis(100)
    } else {
        Duration::ZERO
    };
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // An error event only says "all brokers down"; the log line before it said why.
        if client.poll(left).is_none() {
            return;
        }
    }
}

impl ProbeContext {
    fn note(&self, said: String) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((Instant::now(), said));
    }

    fn recent_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .filter(|(at, _)| at.elapsed() < ERROR_RECENT)
            .map(|(_, said)| said.clone())
    }
}

impl KafkaProbe {
    pub fn new(settings: &KafkaSettings, client_id: &str) -> Result<Self, Error> {
        let client: BaseConsumer<ProbeContext> = base_config(settings, client_id)
            .create_with_context(ProbeContext::default())
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
            let outcome = client.fetch_metadata(None, timeout).map(|_| ());
            // The client's log lines and errors wait in its queue until it is polled; after
            // a failure, long enough to read the cause.
            serve_events(&client, outcome.is_err());
            outcome.map_err(|e| match client.context().recent_error() {
                Some(cause) => format!("metadata request failed: {e}; {cause}"),
                None => format!("metadata request failed: {e}"),
            })
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

fn partitions<C: ConsumerContext>(
    client: &BaseConsumer<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, Error> {
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
