//! The error type of the `meterline` command's modules (`main` wraps it in anyhow).

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Common(#[from] meterline_common::Error),
    #[error("kafka: {context}: {source}")]
    Kafka {
        context: &'static str,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    #[error("topic {0} does not exist (is TOPIC_PREFIX right?)")]
    UnknownTopic(String),
    #[error("no message at {topic} partition {partition} offset {offset}")]
    NoSuchMessage {
        topic: String,
        partition: i32,
        offset: i64,
    },
    #[error(
        "{topic} partition {partition}: no message arrived although the partition has more; \
         nothing after the last one reported was replayed (re-run to resume)"
    )]
    Stalled { topic: String, partition: i32 },
}
