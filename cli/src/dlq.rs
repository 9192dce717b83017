//! `meterline dlq list|inspect|replay`: the dead-letter twins (`<topic>.dlq`) seen and replayed
//! by an operator after the cause of the failures was fixed.
//!
//! Rules kept here:
//! - Replay writes each message's ORIGINAL key and bytes back to its source topic (the DLQ's
//!   twin), unchanged: the `.dlq` convention keeps them intact for exactly that. A header
//!   `meterline.replayed_from` says where the copy came from.
//! - What was replayed is remembered as committed offsets of the consumer group
//!   `<TOPIC_PREFIX>meterline-dlq-replay`, committed only after Kafka acknowledged the copies
//!   they cover. A second replay therefore starts after the first and does nothing new; a
//!   crash between a copy and its commit replays that copy again, which is harmless where
//!   consumers deduplicate (usage events count once per event id, webhooks once per Stripe
//!   event id).
//! - A replay reads up to the end of each partition as it was when the replay started. A
//!   message whose cause is not fixed fails again and comes back to the DLQ as a NEW message,
//!   after that end: it is never replayed twice by one run, and a later run offers it again.
//! - `--dry-run` reads and prints exactly what a replay would send, and writes nothing: no
//!   copy, no commit.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use meterline_common::config::KafkaSettings;
use meterline_common::kafka::{consumer_config, producer_config, resume_offset, Topics};
use meterline_schemas::{DlqHeaders, Topic};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::error::Error;

/// The group whose committed offsets record what was replayed (behind `TOPIC_PREFIX`).
pub const REPLAY_GROUP: &str = "meterline-dlq-replay";
/// The header a replayed copy carries: `<dlq topic>/<partition>/<offset>`.
pub const REPLAYED_FROM_HEADER: &str = "meterline.replayed_from";
/// Replayed copies between two commits.
const COMMIT_EVERY: usize = 100;
/// How long a read may wait for the next message that is known to exist.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// A dead-letter topic, named on the command line by its base name with or without `.dlq`
/// (`usage.raw.dlq` or `usage.raw`); `TOPIC_PREFIX` is added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DlqTopic(pub Topic);

impl std::str::FromStr for DlqTopic {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let base = text.strip_suffix(".dlq").unwrap_or(text);
        Topic::from_base_name(base).map(DlqTopic).ok_or_else(|| {
            let known: Vec<&str> = Topic::all().iter().map(|t| t.dlq_base_name()).collect();
            format!(
                "{text:?} is not a dead-letter topic; one of {}",
                known.join(", ")
            )
        })
    }
}

/// One dead-lettered message.
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    /// Every header, in order, for `inspect`.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The `dlq.*` headers, or why they could not be read.
    pub reason: Result<DlqHeaders, String>,
    /// Whether a replay already sent it back.
    pub replayed: bool,
}

impl DeadLetter {
    fn from_message(m: &OwnedMessage, committed: i64) -> Self {
        let headers: Vec<(String, Vec<u8>)> = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        let reason = DlqHeaders::from_headers(headers.iter().map(|(k, v)| (k.as_str(), v)))
            .map_err(|e| e.to_string());
        Self {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().unwrap_or_default().to_vec(),
            headers,
            reason,
            replayed: m.offset() < committed,
        }
    }

    /// One line: partition, offset, state, kind, when, key, reason.
    pub fn summary(&self) -> String {
        let (kind, when, error) = match &self.reason {
            Ok(h) => (
                h.error_kind.to_string(),
                h.failed_at.to_string(),
                h.error.clone(),
            ),
            Err(e) => (
                "-".into(),
                "-".into(),
                format!("(unreadable dlq headers: {e})"),
            ),
        };
        format!(
            "{}\t{}\t{}\t{kind}\t{when}\t{}\t{error}",
            self.partition,
            self.offset,
            if self.replayed { "replayed" } else { "pending" },
            self.key.as_deref().map(text).unwrap_or_else(|| "-".into()),
        )
    }
}

impl fmt::Display for DeadLetter {
    /// Everything about the message, for `inspect`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "partition: {}", self.partition)?;
        writeln!(f, "offset: {}", self.offset)?;
        writeln!(
            f,
            "state: {}",
            if self.replayed { "replayed" } else { "pending" }
        )?;
        writeln!(
            f,
            "key: {}",
            self.key
                .as_deref()
                .map(text)
                .unwrap_or_else(|| "(none)".into())
        )?;
        writeln!(f, "headers:")?;
        for (name, value) in &self.headers {
            writeln!(f, "  {name}: {}", text(value))?;
        }
        if let Err(e) = &self.reason {
            writeln!(f, "unreadable dlq headers: {e}")?;
        }
        writeln!(f, "payload ({} bytes):", self.payload.len())?;
        write!(f, "{}", text(&self.payload))
    }
}

/// Bytes as text when they are UTF-8, else as hex (a DLQ holds whatever a producer wrote).
fn text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => format!("(not UTF-8) hex:{}", hex(bytes)),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reader of one DLQ topic, with the replay group's committed offsets.
pub struct DlqReader {
    consumer: StreamConsumer,
    topics: Topics,
    topic: Topic,
    dlq_name: String,
}

/// Per partition: where to start reading, and the end as it was at the start.
struct Span {
    committed: i64,
    from: i64,
    end: i64,
}

fn kafka(context: &'static str) -> impl Fn(rdkafka::error::KafkaError) -> Error {
    move |source| Error::Kafka { context, source }
}

impl DlqReader {
    pub fn new(settings: &KafkaSettings, topic: DlqTopic) -> Result<Self, Error> {
        let topics = Topics::new(settings.topic_prefix.clone());
        let group = format!("{}{REPLAY_GROUP}", settings.topic_prefix);
        let consumer: StreamConsumer = consumer_config(settings, "meterline-dlq", &group)
            .create()
            .map_err(kafka("creating the dlq reader"))?;
        Ok(Self {
            consumer,
            dlq_name: topics.dlq(topic.0),
            topics,
            topic: topic.0,
        })
    }

    pub fn dlq_name(&self) -> &str {
        &self.dlq_name
    }

    pub fn source_name(&self) -> String {
        self.topics.name(self.topic)
    }

    /// Each partition's committed replay offset and its current end, read once. Metadata
    /// calls block: they run off the async threads.
    fn spans(&self, from_start: bool) -> Result<BTreeMap<i32, Span>, Error> {
        tokio::task::block_in_place(|| {
            let metadata = self
                .consumer
                .fetch_metadata(Some(&self.dlq_name), METADATA_TIMEOUT)
                .map_err(kafka("reading topic metadata"))?;
            let partitions: Vec<i32> = metadata
                .topics()
                .iter()
                .filter(|t| t.name() == self.dlq_name && t.error().is_none())
                .flat_map(|t| t.partitions().iter().map(|p| p.id()))
                .collect();
            if partitions.is_empty() {
                return Err(Error::UnknownTopic(self.dlq_name.clone()));
            }
            let mut wanted = TopicPartitionList::new();
            for p in &partitions {
                wanted.add_partition(&self.dlq_name, *p);
            }
            let committed = self
                .consumer
                .committed_offsets(wanted, METADATA_TIMEOUT)
                .map_err(kafka("reading the replay group's offsets"))?;
            let mut spans = BTreeMap::new();
            for element in committed.elements() {
                let (low, high) = self
                    .consumer
                    .fetch_watermarks(&self.dlq_name, element.partition(), METADATA_TIMEOUT)
                    .map_err(kafka("reading partition watermarks"))?;
                let committed = resume_offset(element.offset(), low);
                spans.insert(
                    element.partition(),
                    Span {
                        committed,
                        from: if from_start { low } else { committed },
                        end: high,
                    },
                );
            }
            Ok(spans)
        })
    }

    /// Reads every message of `spans` in partition and offset order, handing each to `each`;
    /// stops early when `each` says so.
    async fn read(
        &self,
        spans: &BTreeMap<i32, Span>,
        mut each: impl AsyncFnMut(OwnedMessage, i64) -> Result<bool, Error>,
    ) -> Result<(), Error> {
        for (partition, span) in spans {
            if span.from >= span.end {
                continue;
            }
            let mut assignment = TopicPartitionList::new();
            assignment
                .add_partition_offset(&self.dlq_name, *partition, Offset::Offset(span.from))
                .map_err(kafka("assigning a partition"))?;
            self.consumer
                .assign(&assignment)
                .map_err(kafka("assigning a partition"))?;
            loop {
                let message = tokio::time::timeout(READ_TIMEOUT, self.consumer.recv())
                    .await
                    .map_err(|_| Error::Stalled {
                        topic: self.dlq_name.clone(),
                        partition: *partition,
                    })?
                    .map_err(kafka("reading the dead-letter topic"))?
                    .detach();
                // A message of a partition assigned before (still buffered) is not ours.
                if message.partition() != *partition {
                    continue;
                }
                if message.offset() >= span.end {
                    break;
                }
                let last = message.offset() + 1 >= span.end;
                if !each(message, span.committed).await? || last {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Up to `limit` messages, from the start of the topic (`all`) or from the first one not
    /// yet replayed.
    pub async fn list(&self, all: bool, limit: usize) -> Result<Vec<DeadLetter>, Error> {
        let spans = self.spans(all)?;
        let mut out = Vec::new();
        self.read(&spans, async |m, committed| {
            if out.len() < limit {
                out.push(DeadLetter::from_message(&m, committed));
            }
            Ok(out.len() < limit)
        })
        .await?;
        Ok(out)
    }

    /// The message at `partition`/`offset`.
    pub async fn inspect(&self, partition: i32, offset: i64) -> Result<DeadLetter, Error> {
        let spans = self.spans(true)?;
        let not_found = || Error::NoSuchMessage {
            topic: self.dlq_name.clone(),
            partition,
            offset,
        };
        let span = spans.get(&partition).ok_or_else(not_found)?;
        if offset < span.from || offset >= span.end {
            return Err(not_found());
        }
        let one = BTreeMap::from([(
            partition,
            Span {
                committed: span.committed,
                from: offset,
                end: offset + 1,
            },
        )]);
        let mut found = None;
        self.read(&one, async |m, committed| {
            if m.offset() == offset {
                found = Some(DeadLetter::from_message(&m, committed));
            }
            Ok(found.is_none())
        })
        .await?;
        found.ok_or_else(not_found)
    }

    /// Sends every message not yet replayed back to the source topic (or, with `dry_run`,
    /// only lists them), at most `limit`. Returns what was (or would be) replayed.
    pub async fn replay(
        &self,
        settings: &KafkaSettings,
        dry_run: bool,
        limit: usize,
        mut report: impl FnMut(&DeadLetter),
    ) -> Result<usize, Error> {
        let spans = self.spans(false)?;
        let source = self.source_name();
        let producer: FutureProducer =
            producer_config(settings, "meterline-dlq-replay", Duration::from_secs(30))
                .create()
                .map_err(kafka("creating the replay producer"))?;
        // Per partition, the offset after the last acknowledged copy, not yet committed.
        let mut done: BTreeMap<i32, i64> = BTreeMap::new();
        let mut since_commit = 0usize;
        let mut replayed = 0usize;
        let outcome = self
            .read(&spans, async |m, committed| {
                if replayed == limit {
                    return Ok(false);
                }
                let letter = DeadLetter::from_message(&m, committed);
                if !dry_run {
                    let origin = format!("{}/{}/{}", self.dlq_name, m.partition(), m.offset());
                    let headers = OwnedHeaders::new().insert(Header {
                        key: REPLAYED_FROM_HEADER,
                        value: Some(origin.as_bytes()),
                    });
                    let mut record = FutureRecord::to(&source)
                        .payload(letter.payload.as_slice())
                        .headers(headers);
                    if let Some(key) = &letter.key {
                        record = record.key(key.as_slice());
                    }
                    producer
                        .send(record, Duration::from_secs(30))
                        .await
                        .map_err(|(source, _)| Error::Kafka {
                            context: "writing a replayed message",
                            source,
                        })?;
                    // The committed offset names the next message to read: this one's + 1.
                    done.insert(m.partition(), m.offset() + 1);
                    since_commit += 1;
                    if since_commit == COMMIT_EVERY {
                        self.commit(&done)?;
                        since_commit = 0;
                    }
                }
                report(&letter);
                replayed += 1;
                Ok(replayed < limit)
            })
            .await;
        // Whatever happened, what was acknowledged is recorded, so a re-run resumes there.
        if !dry_run {
            self.commit(&done)?;
        }
        outcome.map(|()| replayed)
    }

    fn commit(&self, done: &BTreeMap<i32, i64>) -> Result<(), Error> {
        if done.is_empty() {
            return Ok(());
        }
        let mut list = TopicPartitionList::new();
        for (partition, next) in done {
            list.add_partition_offset(&self.dlq_name, *partition, Offset::Offset(*next))
                .map_err(kafka("building the commit"))?;
        }
        tokio::task::block_in_place(|| self.consumer.commit(&list, CommitMode::Sync))
            .map_err(kafka("committing replayed offsets"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_named_with_or_without_the_dlq_suffix() {
        assert_eq!("usage.raw.dlq".parse(), Ok(DlqTopic(Topic::UsageRaw)));
        assert_eq!("usage.raw".parse(), Ok(DlqTopic(Topic::UsageRaw)));
        assert_eq!(
            "stripe.webhooks.dlq".parse(),
            Ok(DlqTopic(Topic::StripeWebhooks))
        );
        let err = "usage.rawx".parse::<DlqTopic>().unwrap_err();
        assert!(err.contains("usage.raw.dlq"), "{err}");
    }

    #[test]
    fn bytes_print_as_text_or_hex() {
        assert_eq!(text(b"{\"a\":1}"), "{\"a\":1}");
        assert_eq!(text(&[0xff, 0x00]), "(not UTF-8) hex:ff00");
    }
}
