//! Kafka through the real broker: produce with the services' producer settings, consume in a
//! consumer group, and resume from the committed offset after a restart.

use std::time::Duration;

use meterline_common::kafka::{consumer_config, producer_config};
use meterline_schemas::Topic;
use meterline_tests::Namespace;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

async fn produce(ns: &Namespace, topic: &str, key: &str, values: &[String]) {
    let producer: FutureProducer =
        producer_config(&ns.kafka, "it-producer", Duration::from_secs(10))
            .create()
            .expect("creating producer");
    for value in values {
        producer
            .send(
                FutureRecord::to(topic).key(key).payload(value),
                Duration::from_secs(10),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
    }
}

fn consumer(ns: &Namespace, group: &str, topic: &str) -> StreamConsumer {
    let consumer: StreamConsumer = consumer_config(&ns.kafka, "it-consumer", group)
        .create()
        .expect("creating consumer");
    consumer.subscribe(&[topic]).expect("subscribing");
    consumer
}

async fn next_value(consumer: &StreamConsumer) -> (String, i32, i64) {
    let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("a message within 30 s")
        .expect("a message without error");
    let value = String::from_utf8(message.payload().expect("a payload").to_vec()).unwrap();
    (value, message.partition(), message.offset())
}

#[tokio::test]
async fn committed_offset_survives_a_consumer_restart() {
    let ns = Namespace::create().await;
    let topic = ns.topic(Topic::UsageRaw);
    let group = format!("{}-group", ns.id);
    // One key: every message lands in one partition, in order.
    let values: Vec<String> = (0..10).map(|i| format!("message-{i}")).collect();
    produce(&ns, &topic, "tenant:env:customer", &values).await;

    let first = consumer(&ns, &group, &topic);
    let mut seen = Vec::new();
    let mut last = None;
    for _ in 0..4 {
        let (value, partition, offset) = next_value(&first).await;
        seen.push(value);
        last = Some((partition, offset));
    }
    assert_eq!(seen, values[..4]);
    let (partition, offset) = last.unwrap();
    // The committed offset is the NEXT message to read, hence + 1.
    let mut commit = TopicPartitionList::new();
    commit
        .add_partition_offset(&topic, partition, Offset::Offset(offset + 1))
        .unwrap();
    first.commit(&commit, CommitMode::Sync).expect("committing");
    drop(first);

    let second = consumer(&ns, &group, &topic);
    let mut rest = Vec::new();
    for _ in 4..10 {
        rest.push(next_value(&second).await.0);
    }
    assert_eq!(
        rest,
        values[4..],
        "the restarted consumer resumes after the commit"
    );
    // And nothing more: no message was redelivered.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), second.recv())
            .await
            .is_err(),
        "no message after the last one"
    );
    ns.drop_databases().await;
}

#[tokio::test]
async fn uncommitted_messages_are_delivered_again() {
    let ns = Namespace::create().await;
    let topic = ns.topic(Topic::UsageWindows);
    let group = format!("{}-group", ns.id);
    let values: Vec<String> = (0..3).map(|i| format!("window-{i}")).collect();
    produce(&ns, &topic, "k", &values).await;

    let first = consumer(&ns, &group, &topic);
    for expected in &values {
        assert_eq!(&next_value(&first).await.0, expected);
    }
    // A crash before the commit: the group must hand the same messages to the next consumer.
    drop(first);
    let second = consumer(&ns, &group, &topic);
    for expected in &values {
        assert_eq!(&next_value(&second).await.0, expected);
    }
    ns.drop_databases().await;
}
