//! Dead letters: messages that can never be processed, moved to the `<topic>.dlq` twin of
//! their topic with the original key and bytes unchanged and the reason in `dlq.*` headers
//! ([`DlqHeaders`]), so that nothing is silently dropped and `meterline dlq replay` can put
//! them back once fixed.
//!
//! Rule kept here: a dead letter is written before the offset of its message is committed;
//! a service retries the write until Kafka acknowledged it, or leaves the message
//! uncommitted.

use std::time::Duration;

use meterline_schemas::{DlqErrorKind, DlqHeaders, Timestamp, Topic};
use rdkafka::message::Message;

use super::{Publisher, Topics};
use crate::config::KafkaSettings;
use crate::Error;

/// How long one dead-letter write may wait for Kafka before it is retried.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// A message bound for its dead-letter topic: its original key and bytes, and why.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub source: Topic,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: DlqHeaders,
}

impl DeadLetter {
    /// The dead letter of `message`, read from `source` by `service`.
    pub fn of(
        source: Topic,
        message: &impl Message,
        service: &str,
        error: String,
        kind: DlqErrorKind,
    ) -> Self {
        DeadLetter {
            source,
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().unwrap_or_default().to_vec(),
            headers: DlqHeaders {
                error,
                error_kind: kind,
                source_topic: message.topic().to_owned(),
                source_partition: message.partition(),
                source_offset: message.offset(),
                service: service.to_owned(),
                failed_at: Timestamp::now(),
            },
        }
    }
}

/// Writes dead letters to the twins of every topic a service reads.
#[derive(Clone)]
pub struct DeadLetters {
    publisher: Publisher,
    topics: Topics,
}

impl DeadLetters {
    pub fn new(settings: &KafkaSettings, client_id: &str) -> Result<Self, Error> {
        Ok(Self {
            publisher: Publisher::new(settings, client_id, WRITE_TIMEOUT)?,
            topics: Topics::new(settings.topic_prefix.clone()),
        })
    }

    /// Writes one dead letter; returns once Kafka acknowledged it.
    pub async fn send(&self, letter: &DeadLetter) -> Result<(), Error> {
        self.publisher
            .send(
                &self.topics.dlq(letter.source),
                letter.key.as_deref(),
                &letter.payload,
                &letter.headers.to_headers(),
            )
            .await
            .map_err(|source| Error::Kafka {
                context: "writing to a dead-letter topic",
                source,
            })?;
        tracing::warn!(
            topic = %letter.headers.source_topic,
            partition = letter.headers.source_partition,
            offset = letter.headers.source_offset,
            reason = %letter.headers.error,
            "message sent to the dead-letter topic"
        );
        Ok(())
    }
}
