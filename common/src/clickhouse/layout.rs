//! The layout of `events_processed`, and its conversion to the time-ordered one.
//!
//! Rule kept here: a window total reads only its window's rows. Migration 1 ordered the table
//! by event id with no time in the key, because a copy of an event could carry another
//! timestamp and had to collapse into the first copy's row; a window total then read and
//! merged the customer's whole history. Since migration 5 the aggregator gives every copy its
//! first copy's timestamp (`event_first_seen`), so all copies share one key even with the
//! time in it: the table is ordered by (tenant, environment, customer, meter, timestamp, event
//! id) and partitioned by month, and a window is one range of the key.
//!
//! The conversion copies the deduplicated rows into a table of the new layout, checks that
//! both hold the same rows and quantities, and swaps the two atomically. `migrate` does it
//! at once while the table is empty (a new install); a table with rows is converted only when
//! the operator asks (`meterline migrate --relayout-events`, with the aggregator stopped, so
//! no row is written to the old table after it was copied). Until then everything works on
//! the old layout, at the old cost. The old table is kept under another name for the operator
//! to drop once satisfied.

use serde::Deserialize;
use time::OffsetDateTime;

use super::{ch_err, client, Step, Topology, MIGRATIONS};
use crate::config::ClickhouseSettings;
use crate::Error;

/// The table the conversion fills before the swap.
const NEXT: &str = "events_processed_relayout";

/// The TTL migration 3 set, when the table's own cannot be read.
pub(super) const DEFAULT_TTL_DAYS: u32 = 400;

/// How `events_processed` is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventsLayout {
    /// Ordered by time within each customer and meter, partitioned by month.
    ByTime,
    /// Migration 1's: ordered by event id, with `rows` rows (before deduplication).
    ById { rows: u64 },
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct TableInfo {
    sorting_key: String,
    total_rows: Option<u64>,
    create_table_query: String,
}

/// The table whose layout this is.
const TABLE: &str = "events_processed";

/// The storage of `events_processed` on the server the client talks to, and its rows (on a
/// cluster, those of every shard).
async fn table_info(settings: &ClickhouseSettings) -> Result<TableInfo, Error> {
    let client = client(settings);
    let mut info: TableInfo = client
        .query(
            "SELECT sorting_key, total_rows, create_table_query FROM system.tables
             WHERE database = currentDatabase() AND name = ?",
        )
        .bind(Topology::of(settings).storage(TABLE))
        .fetch_one()
        .await
        .map_err(ch_err("reading the layout of events_processed"))?;
    if settings.cluster.is_some() {
        info.total_rows = Some(
            client
                .query("SELECT count() FROM events_processed")
                .fetch_one()
                .await
                .map_err(ch_err("counting events_processed"))?,
        );
    }
    Ok(info)
}

/// The layout of `events_processed` (which the migrations must have created).
pub async fn events_layout(settings: &ClickhouseSettings) -> Result<EventsLayout, Error> {
    let info = table_info(settings).await?;
    Ok(layout_of(&info.sorting_key, info.total_rows.unwrap_or(0)))
}

fn layout_of(sorting_key: &str, rows: u64) -> EventsLayout {
    if sorting_key
        .split(',')
        .any(|column| column.trim() == "timestamp")
    {
        EventsLayout::ByTime
    } else {
        EventsLayout::ById { rows }
    }
}

/// The TTL in days of a `CREATE TABLE` statement as ClickHouse shows it
/// (`TTL toDateTime(timestamp) + toIntervalDay(400)`).
fn ttl_days(create_table_query: &str) -> Option<u32> {
    let (_, after) = create_table_query.split_once(" TTL ")?;
    let (_, days) = after.split_once("toIntervalDay(")?;
    days.split(')').next()?.trim().parse().ok()
}

/// The time-ordered table, named `name`, keeping rows `ttl_days` after their timestamp. The
/// columns are those of migrations 1 and 2 in their order, so `SELECT *` copies across.
fn create_by_time(name: &str, ttl_days: u32) -> String {
    format!(
        "CREATE TABLE {name}
         (
             tenant_id      LowCardinality(String),
             environment_id LowCardinality(String),
             customer_id    String,
             meter_id       LowCardinality(String),
             event_id       String,
             timestamp      DateTime64(3, 'UTC'),
             qty_billable   Decimal(38, 9),
             sign           Int8,
             version        UInt64,
             ingested_at    DateTime64(3, 'UTC'),
             expired        UInt8 DEFAULT 0,
             unique_key     String DEFAULT ''
         )
         ENGINE = ReplacingMergeTree(version)
         PARTITION BY toYYYYMM(timestamp)
         ORDER BY (tenant_id, environment_id, customer_id, meter_id, timestamp, event_id)
         TTL toDateTime(timestamp) + INTERVAL {ttl_days} DAY"
    )
}

/// What a conversion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayout {
    /// Deduplicated rows copied.
    pub rows: u64,
    /// Where the old table is kept; `None` when it was empty and dropped.
    pub kept_as: Option<String>,
}

#[derive(Debug, PartialEq, Eq, clickhouse::Row, Deserialize)]
struct Fingerprint {
    rows: u64,
    /// The sum (wrapping) of a hash of every row's key, time and quantity: equal for the
    /// same set of rows, in constant memory however large the table.
    content: u64,
    quantity: i128,
}

/// What a copy must preserve: the deduplicated rows, each with its key, time and quantity,
/// and the signed quantity.
async fn fingerprint(client: &::clickhouse::Client, table: &str) -> Result<Fingerprint, Error> {
    client
        .query(&format!(
            "SELECT count() AS rows,
                    sum(cityHash64(tenant_id, environment_id, customer_id, meter_id, event_id,
                                   timestamp, qty_billable, sign, unique_key)) AS content,
                    sum(qty_billable * sign) AS quantity
             FROM {table} FINAL"
        ))
        .fetch_one()
        .await
        .map_err(ch_err(format!("totalling {table}")))
}

async fn execute(client: &::clickhouse::Client, sql: &str, context: &str) -> Result<(), Error> {
    client
        .query(sql)
        // A copy of a large table takes as long as it takes.
        .with_setting("max_execution_time", "0")
        .execute()
        .await
        .map_err(ch_err(context.to_owned()))
}

/// The relayout of the empty table a new install's migration 1 made: nothing to copy, the
/// table is made again in the time-ordered layout (its local tables, on a cluster).
pub(super) fn new_install_relayout(
    topology: &Topology<'_>,
    ttl_days: u32,
) -> Result<Vec<Step>, Error> {
    let failed = |reason: String| Error::ClickhouseMigration {
        version: 5,
        name: "relayout".into(),
        reason,
    };
    Ok(vec![
        topology
            .plan_storage(&format!("DROP TABLE IF EXISTS {TABLE} SYNC"))
            .map_err(failed)?,
        topology
            .plan_storage(&create_by_time(TABLE, ttl_days))
            .map_err(failed)?,
    ])
}

/// Migration 5's `INSERT INTO event_first_seen`: the first copy of every stored event.
fn first_seen_backfill() -> String {
    MIGRATIONS
        .iter()
        .flat_map(|m| m.statements())
        .find(|s| s.starts_with("INSERT INTO event_first_seen"))
        .expect("migration 5 backfills event_first_seen")
}

/// Converts `events_processed` to the time-ordered layout (nothing to do when it has it).
/// Rows written to the old table while this runs would be left behind: the caller makes
/// sure nothing writes (the aggregator stopped), or that the table is empty.
pub async fn relayout_events(settings: &ClickhouseSettings) -> Result<Option<Relayout>, Error> {
    let topology = Topology::of(settings);
    let info = table_info(settings).await?;
    let rows = match layout_of(&info.sorting_key, info.total_rows.unwrap_or(0)) {
        EventsLayout::ByTime => return Ok(None),
        EventsLayout::ById { rows } => rows,
    };
    let ttl = ttl_days(&info.create_table_query).unwrap_or(DEFAULT_TTL_DAYS);
    if rows == 0 {
        topology
            .execute(
                &new_install_relayout(&topology, ttl)?,
                "laying out the empty events_processed by time",
            )
            .await?;
        return Ok(Some(Relayout {
            rows: 0,
            kept_as: None,
        }));
    }
    if settings.cluster.is_some() {
        // Every cluster install is laid out by time when its first migration runs (sharding
        // came after the time-ordered layout): rows in the old layout mean a table made by
        // hand, which this tool will not guess how to convert.
        return Err(Error::ClickhouseMigration {
            version: 5,
            name: "relayout".into(),
            reason: format!(
                "events_processed on cluster holds {rows} rows ordered by event id; a cluster's \
                 table is laid out by time when it is created: copy its rows into a new \
                 install instead"
            ),
        });
    }
    let client = client(settings);
    execute(
        &client,
        &format!("DROP TABLE IF EXISTS {NEXT} SYNC"),
        "dropping a relayout left over",
    )
    .await?;
    execute(
        &client,
        &create_by_time(NEXT, ttl),
        "creating the time-ordered table",
    )
    .await?;
    // Every copy of an event already collapsed into one row under the old key; FINAL copies
    // those rows, with the winning copy's timestamp.
    execute(
        &client,
        &format!("INSERT INTO {NEXT} SELECT * FROM events_processed FINAL"),
        "copying events_processed",
    )
    .await?;
    // The events an older aggregator stored since migration 5 ran.
    execute(&client, &first_seen_backfill(), "recording first copies").await?;
    let (old, new) = (
        fingerprint(&client, "events_processed").await?,
        fingerprint(&client, NEXT).await?,
    );
    if old != new {
        return Err(Error::ClickhouseMigration {
            version: 5,
            name: "relayout".into(),
            reason: format!(
                "the copy differs from events_processed ({new:?} against {old:?}): was the \
                 aggregator still writing? Nothing was swapped; stop it and run again"
            ),
        });
    }
    execute(
        &client,
        &format!("EXCHANGE TABLES events_processed AND {NEXT}"),
        "swapping in the time-ordered table",
    )
    .await?;
    let kept_as = format!(
        "events_processed_by_id_{}",
        OffsetDateTime::now_utc().unix_timestamp()
    );
    execute(
        &client,
        &format!("RENAME TABLE {NEXT} TO {kept_as}"),
        "keeping the old table",
    )
    .await?;
    Ok(Some(Relayout {
        rows: new.rows,
        kept_as: Some(kept_as),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_is_told_by_the_time_in_the_sorting_key() {
        assert_eq!(
            layout_of(
                "tenant_id, environment_id, customer_id, meter_id, event_id",
                7
            ),
            EventsLayout::ById { rows: 7 }
        );
        assert_eq!(
            layout_of(
                "tenant_id, environment_id, customer_id, meter_id, timestamp, event_id",
                7
            ),
            EventsLayout::ByTime
        );
        // A column merely named like it is not the time.
        assert_eq!(
            layout_of("tenant_id, timestamp_hint", 0),
            EventsLayout::ById { rows: 0 }
        );
    }

    #[test]
    fn the_ttl_is_read_back_as_clickhouse_shows_it() {
        let shown = "CREATE TABLE db.events_processed (`timestamp` DateTime64(3, 'UTC')) \
                     ENGINE = ReplacingMergeTree(version) ORDER BY (tenant_id, event_id) \
                     TTL toDateTime(timestamp) + toIntervalDay(120) SETTINGS index_granularity = 8192";
        assert_eq!(ttl_days(shown), Some(120));
        assert_eq!(ttl_days("CREATE TABLE t (x UInt8) ENGINE = Memory"), None);
    }

    #[test]
    fn the_first_copies_backfill_is_migration_5s() {
        assert!(first_seen_backfill().contains("FROM events_processed"));
    }
}
