//! The aggregator benchmark's backlog: events of 3 past hours written to `usage.raw` before
//! the aggregator starts, kept compact so that the baseline can insert the very rows the
//! aggregator will write (`meterline_common::clickhouse::ProcessedRow` and `RawRow`, the types
//! it writes them with: two metered rows and the event as it arrived, per event).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use anyhow::Context;
use meterline_common::clickhouse::{ProcessedRow, RawRow};
use meterline_schemas::{
    CustomerId, EnvironmentId, EventId, EventName, OffsetDateTime, RawUsageEvent, TenantId,
    Timestamp, Topic,
};
use meterline_tests::Namespace;
use serde_json::{json, Map, Value};

use super::{BATCH_EVENTS, COUNT_METER, EVENT_NAME, PRELOAD_CHUNK, ROWS_PER_EVENT, SUM_METER};
use crate::baseline::RawProducer;
use crate::rng::SplitMix64;
use crate::workload::{object, ENVIRONMENT, TENANT};

/// Backlog events as the generator made them, kept compact for the baseline's rows.
pub(super) struct Backlog {
    events: Vec<Compact>,
    customers: Vec<String>,
}

pub(super) struct Compact {
    customer: u32,
    event_id: String,
    timestamp: OffsetDateTime,
    tokens: u64,
    ingested_at: OffsetDateTime,
    /// The `usage.raw` message, which the aggregator keeps in `events_raw`.
    payload: String,
}

impl Backlog {
    /// Distinct (customer, meter, window) of the backlog.
    pub(super) fn windows(&self) -> usize {
        let keys: HashSet<(u32, i64)> = self
            .events
            .iter()
            .map(|e| {
                let t = e.timestamp.unix_timestamp();
                (e.customer, t - t.rem_euclid(3600))
            })
            .collect();
        keys.len() * ROWS_PER_EVENT
    }

    /// The rows the aggregator writes for these events, in event order.
    pub(super) fn rows(&self) -> Vec<ProcessedRow<'_>> {
        let mut rows = Vec::with_capacity(self.events.len() * ROWS_PER_EVENT);
        for e in &self.events {
            let customer = self.customers[e.customer as usize].as_str();
            for (meter, quantity) in [(COUNT_METER, 1), (SUM_METER, e.tokens)] {
                rows.push(ProcessedRow {
                    tenant_id: TENANT,
                    environment_id: ENVIRONMENT,
                    customer_id: customer,
                    meter_id: meter,
                    event_id: &e.event_id,
                    timestamp: e.timestamp,
                    // Decimal(38, 9): the quantity scaled by 10^9, as the aggregator sends it.
                    qty_billable: i128::from(quantity) * 1_000_000_000,
                    sign: 1,
                    version: (e.ingested_at.unix_timestamp_nanos() / 1_000_000) as u64,
                    ingested_at: e.ingested_at,
                    expired: 0,
                    unique_key: "",
                });
            }
        }
        rows
    }

    /// The events as the aggregator keeps them in `events_raw`, in event order.
    pub(super) fn raw_rows(&self) -> Vec<RawRow<'_>> {
        self.events
            .iter()
            .map(|e| RawRow {
                tenant_id: TENANT,
                environment_id: ENVIRONMENT,
                event_name: EVENT_NAME,
                customer_id: self.customers[e.customer as usize].as_str(),
                event_id: &e.event_id,
                timestamp: e.timestamp,
                ingested_at: e.ingested_at,
                version: (e.ingested_at.unix_timestamp_nanos() / 1_000_000) as u64,
                payload: &e.payload,
            })
            .collect()
    }
}

/// Inserts `rows` into the namespace's `events_processed` and `raw` into its `events_raw`,
/// per aggregator batch the two inserts at once and the batches one after the other, as the
/// aggregator does; returns the elapsed time.
pub(super) async fn direct_insert(
    ns: &Namespace,
    rows: &[ProcessedRow<'_>],
    raw: &[RawRow<'_>],
) -> anyhow::Result<Duration> {
    let client = ns.clickhouse();
    let started = Instant::now();
    for (chunk, raw) in rows
        .chunks(BATCH_EVENTS * ROWS_PER_EVENT)
        .zip(raw.chunks(BATCH_EVENTS))
    {
        // A macro, not a generic function: the crate's rows are written through their
        // lifetime-generic `Row::Value`, which a generic bound cannot name.
        macro_rules! insert {
            ($row:ty, $table:literal, $rows:expr) => {
                async {
                    let mut insert = client
                        .insert::<$row>($table)
                        .await
                        .context(concat!("starting a baseline insert into ", $table))?;
                    for row in $rows {
                        insert.write(row).await.context("writing a baseline row")?;
                    }
                    insert.end().await.context("ending a baseline insert")
                }
            };
        }
        futures::try_join!(
            insert!(ProcessedRow<'_>, "events_processed", chunk),
            insert!(RawRow<'_>, "events_raw", raw),
        )?;
    }
    Ok(started.elapsed())
}

/// Writes `count` backlog events to `usage.raw`, keeping their compact form.
pub(super) async fn preload(
    ns: &Namespace,
    generator: &mut Generator,
    count: usize,
) -> anyhow::Result<Backlog> {
    let producer = RawProducer::new(&ns.kafka, ns.topic(Topic::UsageRaw))?;
    let mut events = Vec::with_capacity(count);
    let mut left = count;
    while left > 0 {
        let n = left.min(PRELOAD_CHUNK);
        let (chunk, customers) = generator.backlog_events(n)?;
        producer.write_batch(&chunk).await?;
        events.extend(chunk.into_iter().zip(customers).map(|(e, customer)| {
            Compact {
                customer,
                timestamp: e.timestamp.as_offset_date_time(),
                tokens: e.properties["tokens"].as_u64().unwrap_or(0),
                ingested_at: e
                    .ingested_at
                    .map_or(e.timestamp.as_offset_date_time(), |t| {
                        t.as_offset_date_time()
                    }),
                payload: String::from_utf8_lossy(&e.to_json_bytes()).into_owned(),
                event_id: e.id.into_string(),
            }
        }));
        left -= n;
    }
    Ok(Backlog {
        events,
        customers: (0..generator.customers).map(customer_name).collect(),
    })
}

fn customer_name(index: usize) -> String {
    format!("cust_{index:06}")
}

/// Backlog events: spread over `customers` customers and the 3 whole hours before the
/// previous one (windows that ended 1 to 3 hours before the current hour began), with
/// LLM-usage-like properties. A fixed seed gives the same shapes.
pub(super) struct Generator {
    rng: SplitMix64,
    customers: usize,
    /// The start of the oldest of the 3 hours.
    first_hour: i64,
}

impl Generator {
    pub(super) fn new(customers: usize) -> Self {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        Self {
            rng: SplitMix64::new(0x6167_6772_6567_6174),
            customers,
            first_hour: now - now.rem_euclid(3600) - 4 * 3600,
        }
    }

    /// `n` events, and the index of each one's customer.
    fn backlog_events(&mut self, n: usize) -> anyhow::Result<(Vec<RawUsageEvent>, Vec<u32>)> {
        let tenant = TenantId::parse(TENANT)?;
        let environment = EnvironmentId::parse(ENVIRONMENT)?;
        let name = EventName::parse(EVENT_NAME)?;
        let ingested_at = Timestamp::now();
        let mut events = Vec::with_capacity(n);
        let mut customers = Vec::with_capacity(n);
        for _ in 0..n {
            let customer = self.rng.below(self.customers as u64) as u32;
            let ms = self.first_hour * 1000 + self.rng.below(3 * 3_600_000) as i64;
            let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)?;
            events.push(RawUsageEvent {
                id: EventId::generate(),
                tenant_id: tenant.clone(),
                environment_id: environment.clone(),
                customer_id: CustomerId::parse(&customer_name(customer as usize))?,
                event_name: name.clone(),
                timestamp: Timestamp::new(at)?,
                properties: properties(&mut self.rng),
                source: None,
                ingested_at: Some(ingested_at),
            });
            customers.push(customer);
        }
        Ok((events, customers))
    }
}

pub(super) fn properties(rng: &mut SplitMix64) -> Map<String, Value> {
    const REGIONS: [&str; 4] = ["eu-west-1", "us-east-1", "us-west-2", "ap-southeast-1"];
    object(json!({
        "model": if rng.below(3) == 0 { "large-2" } else { "small-3" },
        "tokens": rng.below(4000) + 1,
        "region": REGIONS[rng.below(4) as usize],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backlog_rows_match_the_aggregator_s_rows() {
        let mut g = Generator::new(10);
        let (events, customers) = g.backlog_events(3).unwrap();
        assert!(customers.iter().all(|c| *c < 10));
        let backlog = Backlog {
            events: events
                .iter()
                .map(|e| Compact {
                    customer: 1,
                    event_id: e.id.as_str().to_owned(),
                    timestamp: e.timestamp.as_offset_date_time(),
                    tokens: e.properties["tokens"].as_u64().unwrap(),
                    ingested_at: e.ingested_at.unwrap().as_offset_date_time(),
                    payload: String::from_utf8_lossy(&e.to_json_bytes()).into_owned(),
                })
                .collect(),
            customers: (0..10).map(customer_name).collect(),
        };
        let rows = backlog.rows();
        assert_eq!(rows.len(), 6);
        assert_eq!(rows[0].meter_id, COUNT_METER);
        assert_eq!(rows[0].qty_billable, 1_000_000_000);
        assert_eq!(
            rows[1].qty_billable,
            i128::from(backlog.events[0].tokens) * 1_000_000_000
        );
        assert_eq!(rows[1].customer_id, "cust_000001");
        let raw = backlog.raw_rows();
        assert_eq!(raw.len(), 3);
        let kept = RawUsageEvent::from_json_bytes(raw[0].payload.as_bytes()).unwrap();
        assert_eq!(
            kept, events[0],
            "the payload is the message the aggregator reads"
        );
        // Every event falls in one of the 3 hours before the previous hour: 1 to 5 hours old.
        let now = OffsetDateTime::now_utc();
        for e in &events {
            let age = now - e.timestamp.as_offset_date_time();
            assert!(age > time::Duration::HOUR && age < time::Duration::hours(5));
        }
    }
}
