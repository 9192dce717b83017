//! Reading what landed on a topic, from the first message, with a group of the test's own.

use std::time::{Duration, Instant};

use meterline_common::kafka::consumer_config;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;

use crate::Namespace;

/// One message: key, value, partition.
#[derive(Debug, Clone)]
pub struct Record {
    pub key: Option<String>,
    pub value: Vec<u8>,
    pub partition: i32,
}

/// Reads messages of `topic` until `count` arrived, then keeps listening `settle` longer to
/// catch any extra. Fails the test when fewer than `count` arrive within `within`.
pub async fn read_topic(
    ns: &Namespace,
    topic: &str,
    count: usize,
    within: Duration,
    settle: Duration,
) -> Vec<Record> {
    let group = format!("{}-reader-{}", ns.id, uuid::Uuid::now_v7().simple());
    let consumer: StreamConsumer = consumer_config(&ns.kafka, "it-reader", &group)
        .create()
        .expect("creating a reader");
    consumer.subscribe(&[topic]).expect("subscribing");
    let mut records = Vec::new();
    let deadline = Instant::now() + within;
    loop {
        let wait = if records.len() >= count {
            settle
        } else {
            deadline.saturating_duration_since(Instant::now())
        };
        match tokio::time::timeout(wait, consumer.recv()).await {
            Ok(Ok(m)) => records.push(Record {
                key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                value: m.payload().unwrap_or_default().to_vec(),
                partition: m.partition(),
            }),
            Ok(Err(e)) => panic!("reading {topic}: {e}"),
            Err(_) if records.len() >= count => return records,
            Err(_) => panic!(
                "only {} of {count} messages on {topic} within {within:?}",
                records.len()
            ),
        }
    }
}
