//! Consuming a topic: receive-or-shutdown, the next-offset bookkeeping and the commit.
//!
//! Rule kept here: offsets are stored only by [`commit`] and [`commit_message`], which a
//! service calls after the write that covers the messages is durable; nothing commits on its
//! own (see [`super::consumer_config`]). The committed offset names the NEXT message to read, so a
//! message at offset n is covered by committing n + 1. A failed commit (for example after a
//! rebalance took the partitions) re-delivers the messages to their new owner: duplicates,
//! which every consumer absorbs, never a loss.

use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::shutdown::pause;

/// How long to wait after a consumer error before asking again: errors such as a broker
/// going away repeat until it is back, and a tight loop would only fill the log.
const ERROR_PAUSE: Duration = Duration::from_millis(200);

/// The next message, or `None` once shutdown began (a message not yet received is not work
/// in hand). Consumer errors are logged and waited out.
pub async fn next_message<'c>(
    consumer: &'c StreamConsumer,
    shutdown: &CancellationToken,
) -> Option<BorrowedMessage<'c>> {
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            received = consumer.recv() => match received {
                Ok(m) => return Some(m),
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consumer error");
                    if !pause(ERROR_PAUSE, shutdown).await {
                        return None;
                    }
                }
            },
        }
    }
}

/// Reads up to `max_messages` messages, waiting at most `max_wait` after the first. Empty
/// only when shutdown began before any message arrived. The messages stay in the consumer's
/// buffers (borrowed): a batch is resolved where it was read, and only what the later stages
/// need is copied out of it.
pub async fn read_batch<'c>(
    consumer: &'c StreamConsumer,
    max_messages: usize,
    max_wait: Duration,
    shutdown: &CancellationToken,
) -> Vec<BorrowedMessage<'c>> {
    let mut batch = Vec::new();
    let Some(first) = next_message(consumer, shutdown).await else {
        return batch;
    };
    batch.push(first);
    // One timer for the whole batch: a timer per message cost a clock read and a timer
    // registration per event.
    let deadline = tokio::time::sleep(max_wait);
    tokio::pin!(deadline);
    while batch.len() < max_messages {
        tokio::select! {
            received = consumer.recv() => match received {
                Ok(m) => batch.push(m),
                Err(e) => tracing::warn!(error = %e, "kafka consumer error"),
            },
            _ = &mut deadline => break,
        }
    }
    batch
}

/// Per topic and partition, the offset to commit once the messages seen are done: the one
/// after the last of them. A batch spans a handful of partitions, so a list searched by
/// borrowed topic name costs no allocation per message, where a map keyed by an owned name
/// cost one.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NextOffsets(Vec<(String, i32, i64)>);

impl NextOffsets {
    pub fn of<'m, M: Message + 'm>(messages: impl IntoIterator<Item = &'m M>) -> Self {
        let mut next = NextOffsets::default();
        for m in messages {
            next.add(m.topic(), m.partition(), m.offset());
        }
        next
    }

    /// Counts the message at `offset` of `topic`/`partition` as done.
    pub fn add(&mut self, topic: &str, partition: i32, offset: i64) {
        let after = offset + 1;
        match self
            .0
            .iter_mut()
            .find(|(t, p, _)| *p == partition && t == topic)
        {
            Some((_, _, next)) => *next = (*next).max(after),
            None => self.0.push((topic.to_owned(), partition, after)),
        }
    }
}

/// Commits `offsets`: synchronously (the commit has reached the group coordinator when this
/// returns), or queued when `wait` is false. A failure is logged; see the module rule for
/// why it loses nothing.
pub fn commit(consumer: &StreamConsumer, offsets: &NextOffsets, wait: bool) {
    let mut list = TopicPartitionList::new();
    for (topic, partition, offset) in &offsets.0 {
        if let Err(e) = list.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            tracing::error!(%topic, partition, error = %e, "building the commit");
            return;
        }
    }
    log_failed(consumer.commit(&list, mode(wait)));
}

/// Commits the offset after `message` (librdkafka adds the 1), for a consumer that finishes
/// one message at a time: no offset list is built per message.
pub fn commit_message(consumer: &StreamConsumer, message: &BorrowedMessage<'_>, wait: bool) {
    log_failed(consumer.commit_message(message, mode(wait)));
}

fn mode(wait: bool) -> CommitMode {
    if wait {
        CommitMode::Sync
    } else {
        CommitMode::Async
    }
}

fn log_failed(outcome: rdkafka::error::KafkaResult<()>) {
    if let Err(e) = outcome {
        tracing::warn!(error = %e, "committing offsets failed; the messages will be re-delivered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_offset_to_commit_is_the_one_after_the_last_message_of_each_partition() {
        let mut next = NextOffsets::default();
        next.add("usage.raw", 0, 7);
        next.add("usage.raw", 1, 3);
        next.add("usage.raw", 0, 9);
        next.add("usage.raw", 0, 8);
        next.add("usage.resync", 0, 1);
        assert_eq!(
            next.0,
            vec![
                ("usage.raw".to_owned(), 0, 10),
                ("usage.raw".to_owned(), 1, 4),
                ("usage.resync".to_owned(), 0, 2),
            ]
        );
    }
}
