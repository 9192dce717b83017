//! ClickHouse: writing metered events into `events_processed`, the first copy of each event
//! into `event_first_seen` and looking it up, and reading window aggregates.
//!
//! Rule kept here: totals are read only over deduplicated rows (`FINAL`), so every copy of an
//! event id counts once, whatever was merged in the background. Quantities are
//! `Decimal(38, 9)`: sent and read as integers scaled by 10^9.

use std::collections::HashMap;

use clickhouse::{Client, Row};
use meterline_schemas::{CustomerId, EnvironmentId, MeterId, TenantId};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use meterline_catalog::window_totals::{to_scaled, AGGREGATES_SQL};
use meterline_common::clickhouse::{unix_millis, ProcessedRow, RawRow};

use crate::billing::{MeteredEvent, RawEvent, WindowAggregates};
use crate::first_copy::{identity_hash, ByEvent, EventKey, Stamp};
use crate::Error;

/// Events looked up in `event_first_seen` per query: their 8-byte hashes are written into the
/// query's text (about a megabyte, under the `max_query_size` the lookup sets), so a batch of
/// the default 50,000 events takes one query.
const LOOKUP_CHUNK: usize = 65_536;

/// A row of `event_first_seen` (`0005_event_first_seen.sql`).
#[derive(Debug, Row, Serialize, Deserialize)]
struct FirstSeenRow<'a> {
    tenant_id: &'a str,
    environment_id: &'a str,
    customer_id: &'a str,
    event_id: &'a str,
    #[serde(with = "clickhouse::serde::time::datetime64::millis")]
    timestamp: OffsetDateTime,
    version: u64,
    #[serde(with = "clickhouse::serde::time::datetime64::millis")]
    ingested_at: OffsetDateTime,
}

/// A first copy as the lookup reads it back (aliases apart from the columns: an alias named
/// like a column would stand for it inside the other aggregates).
#[derive(Debug, Row, Deserialize)]
struct StoredFirstCopy {
    tenant_id: String,
    environment_id: String,
    customer_id: String,
    event_id: String,
    #[serde(with = "clickhouse::serde::time::datetime64::millis")]
    first_timestamp: OffsetDateTime,
    first_version: u64,
    #[serde(with = "clickhouse::serde::time::datetime64::millis")]
    first_ingested_at: OffsetDateTime,
}

#[derive(Debug, Row, Deserialize)]
struct AggregateRow {
    customer_id: String,
    events: u64,
    total: i128,
    maximum: i128,
    latest: i128,
    unique: u64,
    #[serde(with = "clickhouse::serde::time::datetime64::millis")]
    last_at: OffsetDateTime,
}

/// An event of `events_raw`, as a backfill reads it.
#[derive(Debug, Row, Deserialize)]
pub struct StoredRawEvent {
    pub event_id: String,
    #[serde(with = "clickhouse::serde::time::datetime64::millis")]
    pub timestamp: OffsetDateTime,
    #[serde(with = "clickhouse::serde::time::datetime64::millis")]
    pub ingested_at: OffsetDateTime,
    pub payload: String,
}

/// Where a backfill reads from: the meter, its event name, and the events after `after`
/// (timestamp, event id) and before `until`.
pub struct BackfillPage<'a> {
    pub tenant: &'a TenantId,
    pub environment: &'a EnvironmentId,
    pub meter: &'a MeterId,
    pub event_name: &'a str,
    pub after: (OffsetDateTime, &'a str),
    pub until: OffsetDateTime,
    pub limit: u64,
}

#[derive(Clone)]
pub struct Warehouse {
    client: Client,
}

impl Warehouse {
    pub fn new(client: Client) -> Self {
        Self { client }
    }

    /// Inserts `rows` in one insert; returns once ClickHouse acknowledged all of them.
    pub async fn insert<'r>(
        &self,
        rows: impl IntoIterator<Item = &'r MeteredEvent, IntoIter: Send> + Send,
    ) -> Result<(), Error> {
        let mut rows = rows.into_iter().peekable();
        if rows.peek().is_none() {
            return Ok(());
        }
        let ch = |e| Error::Clickhouse {
            context: "inserting events_processed",
            source: e,
        };
        let mut insert = self
            .client
            .insert::<ProcessedRow<'_>>("events_processed")
            .await
            .map_err(ch)?;
        for r in rows {
            let qty_billable = to_scaled(r.quantity).ok_or_else(|| {
                Error::Quantity(format!("quantity {} is out of range", r.quantity))
            })?;
            insert
                .write(&ProcessedRow {
                    tenant_id: r.event.tenant_id.as_str(),
                    environment_id: r.event.environment_id.as_str(),
                    customer_id: r.event.customer_id.as_str(),
                    meter_id: r.meter_id.as_str(),
                    event_id: r.event.id.as_str(),
                    timestamp: r.timestamp,
                    qty_billable,
                    sign: 1,
                    version: r.version,
                    ingested_at: r.ingested_at,
                    expired: u8::from(r.expired),
                    unique_key: &r.unique_key,
                })
                .await
                .map_err(ch)?;
        }
        insert.end().await.map_err(ch)
    }

    /// The first copies stored of the events of `keys` (those never seen have none).
    pub async fn stored_first_copies<'a>(
        &self,
        keys: impl Iterator<Item = EventKey<'a>>,
    ) -> Result<ByEvent<'a, Stamp>, Error> {
        let keys: Vec<EventKey<'a>> = keys.collect();
        let mut stored = ByEvent::default();
        for chunk in keys.chunks(LOOKUP_CHUNK) {
            // Positions rather than the keys themselves: a key found by the row's strings
            // would borrow the row.
            let wanted: ByEvent<'a, usize> =
                chunk.iter().enumerate().map(|(i, key)| (*key, i)).collect();
            let hashes: Vec<u64> = chunk.iter().map(identity_hash).collect();
            // The table is ordered by the hash of the identity: the chunk's hashes select the
            // granules, and the exact identities are matched below.
            let rows: Vec<StoredFirstCopy> = self
                .client
                .query(
                    "SELECT tenant_id, environment_id, customer_id, event_id,
                            argMax(timestamp, version) AS first_timestamp,
                            max(version) AS first_version,
                            argMax(ingested_at, version) AS first_ingested_at
                     FROM event_first_seen
                     WHERE id_hash IN ?
                     GROUP BY tenant_id, environment_id, customer_id, event_id",
                )
                .bind(hashes)
                .with_setting("max_query_size", "16777216")
                .fetch_all()
                .await
                .map_err(|e| Error::Clickhouse {
                    context: "looking up first copies",
                    source: e,
                })?;
            for row in rows {
                let found = (
                    row.tenant_id.as_str(),
                    row.environment_id.as_str(),
                    row.customer_id.as_str(),
                    row.event_id.as_str(),
                );
                if let Some(&at) = wanted.get(&found) {
                    stored.insert(
                        chunk[at],
                        Stamp {
                            timestamp: row.first_timestamp,
                            version: row.first_version,
                            ingested_at: row.first_ingested_at,
                        },
                    );
                }
            }
        }
        Ok(stored)
    }

    /// Records the first copies of events seen for the first time, in one insert.
    pub async fn record_first_copies(&self, new: &[(EventKey<'_>, Stamp)]) -> Result<(), Error> {
        if new.is_empty() {
            return Ok(());
        }
        let ch = |e| Error::Clickhouse {
            context: "recording first copies",
            source: e,
        };
        let mut insert = self
            .client
            .insert::<FirstSeenRow<'_>>("event_first_seen")
            .await
            .map_err(ch)?;
        for ((tenant_id, environment_id, customer_id, event_id), stamp) in new {
            insert
                .write(&FirstSeenRow {
                    tenant_id,
                    environment_id,
                    customer_id,
                    event_id,
                    timestamp: stamp.timestamp,
                    version: stamp.version,
                    ingested_at: stamp.ingested_at,
                })
                .await
                .map_err(ch)?;
        }
        insert.end().await.map_err(ch)
    }

    /// Inserts `events` into `events_raw` in one insert.
    pub async fn insert_raw<'r>(
        &self,
        events: impl IntoIterator<Item = &'r RawEvent, IntoIter: Send> + Send,
    ) -> Result<(), Error> {
        let mut events = events.into_iter().peekable();
        if events.peek().is_none() {
            return Ok(());
        }
        let ch = |e| Error::Clickhouse {
            context: "inserting events_raw",
            source: e,
        };
        let mut insert = self
            .client
            .insert::<RawRow<'_>>("events_raw")
            .await
            .map_err(ch)?;
        for r in events {
            insert
                .write(&RawRow {
                    tenant_id: r.event.tenant_id.as_str(),
                    environment_id: r.event.environment_id.as_str(),
                    event_name: r.event.event_name.as_str(),
                    customer_id: r.event.customer_id.as_str(),
                    event_id: r.event.id.as_str(),
                    timestamp: r.event.timestamp.as_offset_date_time(),
                    ingested_at: r.ingested_at,
                    version: r.version(),
                    payload: &r.payload,
                })
                .await
                .map_err(ch)?;
        }
        insert.end().await.map_err(ch)
    }

    /// The next events of `events_raw` with the page's event name that `events_processed`
    /// holds no row of for its meter, in (timestamp, event id) order, deduplicated.
    pub async fn raw_events_without_meter(
        &self,
        page: &BackfillPage<'_>,
    ) -> Result<Vec<StoredRawEvent>, Error> {
        let (after, after_id) = page.after;
        self.client
            .query(
                "SELECT event_id, timestamp, ingested_at, payload
                 FROM events_raw FINAL
                 WHERE tenant_id = ? AND environment_id = ? AND event_name = ?
                   AND timestamp < fromUnixTimestamp64Milli(?, 'UTC')
                   AND (timestamp > fromUnixTimestamp64Milli(?, 'UTC')
                        OR (timestamp = fromUnixTimestamp64Milli(?, 'UTC') AND event_id > ?))
                   AND event_id NOT IN (
                       SELECT event_id FROM events_processed
                       WHERE tenant_id = ? AND environment_id = ? AND meter_id = ?
                         AND timestamp >= fromUnixTimestamp64Milli(?, 'UTC')
                         AND timestamp < fromUnixTimestamp64Milli(?, 'UTC'))
                 ORDER BY timestamp, event_id
                 LIMIT ?",
            )
            .bind(page.tenant.as_str())
            .bind(page.environment.as_str())
            .bind(page.event_name)
            .bind(unix_millis(page.until))
            .bind(unix_millis(after))
            .bind(unix_millis(after))
            .bind(after_id)
            .bind(page.tenant.as_str())
            .bind(page.environment.as_str())
            .bind(page.meter.as_str())
            .bind(unix_millis(after))
            .bind(unix_millis(page.until))
            .bind(page.limit)
            .fetch_all()
            .await
            .map_err(|e| Error::Clickhouse {
                context: "reading events_raw for a backfill",
                source: e,
            })
    }

    /// The query of [`Warehouse::window_aggregates`], bound; with `estimate`, instead the rows
    /// ClickHouse plans to read for it (`EXPLAIN ESTIMATE`, summed over its tables).
    fn window_aggregates_query(
        &self,
        estimate: bool,
        (tenant, environment, meter): (&TenantId, &EnvironmentId, &MeterId),
        (from, to): (OffsetDateTime, OffsetDateTime),
        customers: &[CustomerId],
    ) -> ::clickhouse::query::Query {
        let customer_ids: Vec<&str> = customers.iter().map(CustomerId::as_str).collect();
        let sql = format!(
            "SELECT customer_id, {AGGREGATES_SQL}, max(timestamp) AS last_at
             FROM events_processed FINAL
             WHERE tenant_id = ? AND environment_id = ? AND meter_id = ?
               AND timestamp >= fromUnixTimestamp64Milli(?, 'UTC')
               AND timestamp < fromUnixTimestamp64Milli(?, 'UTC')
               AND customer_id IN ?
             GROUP BY customer_id"
        );
        let sql = if estimate {
            format!("SELECT toUInt64(sum(rows)) FROM (EXPLAIN ESTIMATE {sql})")
        } else {
            sql
        };
        self.client
            .query(&sql)
            .bind(tenant.as_str())
            .bind(environment.as_str())
            .bind(meter.as_str())
            .bind(unix_millis(from))
            .bind(unix_millis(to))
            .bind(customer_ids)
    }

    /// The rows ClickHouse plans to read for [`Warehouse::window_aggregates`] with the same
    /// arguments (`EXPLAIN ESTIMATE`: whole granules its index cannot skip), for the history
    /// benchmark, which shows it does not grow with the history.
    pub async fn window_aggregates_rows_to_read(
        &self,
        meter: (&TenantId, &EnvironmentId, &MeterId),
        range: (OffsetDateTime, OffsetDateTime),
        customers: &[CustomerId],
    ) -> Result<u64, Error> {
        self.window_aggregates_query(true, meter, range, customers)
            .fetch_one::<u64>()
            .await
            .map_err(|e| Error::Clickhouse {
                context: "estimating a window read",
                source: e,
            })
    }

    /// The aggregates of `meter` over `[from, to)` (a window, or a billing period to a
    /// window's end) for each of `customers` that has events there, with the timestamp of the
    /// latest of those events.
    pub async fn window_aggregates(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
        meter: &MeterId,
        range: (OffsetDateTime, OffsetDateTime),
        customers: &[CustomerId],
    ) -> Result<HashMap<CustomerId, (WindowAggregates, OffsetDateTime)>, Error> {
        let rows: Vec<AggregateRow> = self
            .window_aggregates_query(false, (tenant, environment, meter), range, customers)
            .fetch_all()
            .await
            .map_err(|e| Error::Clickhouse {
                context: "reading window aggregates",
                source: e,
            })?;
        rows.into_iter()
            .map(|row| {
                let customer = CustomerId::parse(&row.customer_id)
                    .map_err(|e| Error::Quantity(format!("stored customer id: {e}")))?;
                let aggregates = WindowAggregates::from_scaled(
                    row.events,
                    row.total,
                    row.maximum,
                    row.latest,
                    row.unique,
                )?;
                Ok((customer, (aggregates, row.last_at)))
            })
            .collect()
    }
}
