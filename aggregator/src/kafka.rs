//! Kafka for the aggregator: the lag of the `usage.raw` partitions this instance owns, and
//! the publisher of `usage.windows` (batches are read with the shared `read_batch`).
//!
//! Rule kept here: offsets are committed only by the pipeline, after the work they cover is
//! durable (rows in ClickHouse and windows marked, or window totals acknowledged by Kafka);
//! every write here is acknowledged by all in-sync replicas before it counts as done.

use std::sync::Arc;
use std::time::Duration;

use meterline_common::config::KafkaSettings;
use meterline_common::kafka::{Publisher, Topics};
use meterline_common::shutdown::pause;
use meterline_schemas::{Topic, WindowTotal};
use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio_util::sync::CancellationToken;

use crate::{metrics, Error};

/// How long a write may wait for Kafka before the pipeline retries it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Writes to `usage.windows`.
pub struct Writer {
    publisher: Publisher,
    topic: String,
}

impl Writer {
    pub fn new(settings: &KafkaSettings) -> Result<Self, Error> {
        Ok(Self {
            publisher: Publisher::new(settings, "aggregator", WRITE_TIMEOUT)?,
            topic: Topics::new(settings.topic_prefix.clone()).name(Topic::UsageWindows),
        })
    }

    /// Publishes window totals, keyed by (tenant, environment, customer, meter) so that the
    /// revisions of one window stay in order; returns once all are acknowledged.
    pub async fn publish_windows(&self, totals: &[WindowTotal]) -> Result<(), Error> {
        let encoded: Vec<(String, Vec<u8>)> = totals
            .iter()
            .map(|t| (t.kafka_key(), t.to_json_bytes()))
            .collect();
        match self
            .publisher
            .send_all(&self.topic, &encoded)
            .await
            .into_iter()
            .find_map(Result::err)
        {
            None => Ok(()),
            Some(e) => Err(Error::Publish(e)),
        }
    }
}

/// Reports, every `every`, how far behind the end of each owned partition the group is.
pub async fn report_lag(
    consumer: Arc<StreamConsumer>,
    every: Duration,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    loop {
        if !pause(every, &shutdown).await {
            return Ok(());
        }
        let consumer = consumer.clone();
        let lags = tokio::task::spawn_blocking(move || -> Vec<(i32, i64)> {
            let Ok(assignment) = consumer.assignment() else {
                return Vec::new();
            };
            let Ok(positions) = consumer.position() else {
                return Vec::new();
            };
            assignment
                .elements()
                .iter()
                .filter_map(|tp| {
                    let (_, high) = consumer
                        .fetch_watermarks(tp.topic(), tp.partition(), Duration::from_secs(5))
                        .ok()?;
                    let position = positions
                        .find_partition(tp.topic(), tp.partition())
                        .and_then(|p| p.offset().to_raw())
                        .filter(|o| *o >= 0)
                        .unwrap_or(0);
                    Some((tp.partition(), (high - position).max(0)))
                })
                .collect()
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))?;
        for (partition, lag) in lags {
            metrics::consumer_lag(partition, lag);
        }
    }
}
