//! ClickHouse: writing metered events into `events_processed` and reading window aggregates.
//!
//! Rule kept here: totals are read only over deduplicated rows (`FINAL`), so every copy of an
//! event id counts once, whatever was merged in the background. Quantities are
//! `Decimal(38, 9)`: sent and read as integers scaled by 10^9.

use std::collections::HashMap;

use clickhouse::{Client, Row};
use meterline_schemas::{CustomerId, EnvironmentId, MeterId, TenantId};
use serde::Deserialize;
use time::OffsetDateTime;

use meterline_catalog::window_totals::{to_scaled, AGGREGATES_SQL};
use meterline_common::clickhouse::{unix_millis, ProcessedRow};

use crate::billing::{MeteredEvent, WindowAggregates};
use crate::Error;

#[derive(Debug, Row, Deserialize)]
struct AggregateRow {
    customer_id: String,
    events: u64,
    total: i128,
    maximum: i128,
    latest: i128,
    unique: u64,
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

    /// The aggregates of `meter` over `[from, to)` (a window, or a billing period to a
    /// window's end) for each of `customers` that has events there.
    pub async fn window_aggregates(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
        meter: &MeterId,
        (from, to): (OffsetDateTime, OffsetDateTime),
        customers: &[CustomerId],
    ) -> Result<HashMap<CustomerId, WindowAggregates>, Error> {
        let customer_ids: Vec<&str> = customers.iter().map(CustomerId::as_str).collect();
        let rows: Vec<AggregateRow> = self
            .client
            .query(&format!(
                "SELECT customer_id, {AGGREGATES_SQL}
                 FROM events_processed FINAL
                 WHERE tenant_id = ? AND environment_id = ? AND meter_id = ?
                   AND timestamp >= fromUnixTimestamp64Milli(?, 'UTC')
                   AND timestamp < fromUnixTimestamp64Milli(?, 'UTC')
                   AND customer_id IN ?
                 GROUP BY customer_id"
            ))
            .bind(tenant.as_str())
            .bind(environment.as_str())
            .bind(meter.as_str())
            .bind(unix_millis(from))
            .bind(unix_millis(to))
            .bind(customer_ids)
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
                Ok((customer, aggregates))
            })
            .collect()
    }
}
