//! ClickHouse: the client, the versioned SQL migrator, and the readiness probe.
//!
//! Migrations are the numbered files in `common/migrations/clickhouse`, embedded in the
//! binary. Each applied one is recorded in `schema_migrations` with a checksum of its text:
//! a file edited after it ran is refused rather than silently diverging from the database.
//! `layout.rs` converts `events_processed` to the time-ordered layout ([`relayout_events`]).
//! [`ProcessedRow`] is the row those migrations define for `events_processed`, so that the
//! aggregator and the benchmark's baseline write the same columns.

mod layout;

pub use layout::{events_layout, relayout_events, EventsLayout, Relayout};

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::config::ClickhouseSettings;
use crate::Error;

/// One versioned migration file.
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

impl Migration {
    fn checksum(&self) -> String {
        hex::encode(Sha256::digest(self.sql.as_bytes()))
    }

    /// The statements of the file, split on `;` at the end of a line.
    pub fn statements(&self) -> impl Iterator<Item = String> + '_ {
        self.sql
            .split(";\n")
            .map(|s| {
                s.lines()
                    .filter(|l| !l.trim_start().starts_with("--"))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .map(|s| s.trim().trim_end_matches(';').trim().to_owned())
            .filter(|s| !s.is_empty())
    }
}

/// A migration from its number and name: `NNNN_<name>.sql` of the migrations folder.
macro_rules! migration {
    ($version:literal, $number:literal, $name:literal) => {
        Migration {
            version: $version,
            name: $name,
            sql: include_str!(concat!(
                "../../migrations/clickhouse/",
                $number,
                "_",
                $name,
                ".sql"
            )),
        }
    };
}

/// Every migration, in order. A unit test checks this list against the folder.
pub static MIGRATIONS: &[Migration] = &[
    migration!(1, "0001", "events_processed"),
    migration!(2, "0002", "unique_key"),
    migration!(3, "0003", "events_ttl"),
    migration!(4, "0004", "events_raw"),
    migration!(5, "0005", "event_first_seen"),
];

/// A row of `events_processed` as the migrations define it (`0001_events_processed.sql`,
/// `0002_unique_key.sql`). Quantities are `Decimal(38, 9)`: the quantity scaled by 10^9.
#[derive(Debug, ::clickhouse::Row, serde::Serialize)]
pub struct ProcessedRow<'a> {
    pub tenant_id: &'a str,
    pub environment_id: &'a str,
    pub customer_id: &'a str,
    pub meter_id: &'a str,
    pub event_id: &'a str,
    #[serde(with = "clickhouse::serde::time::datetime64::millis")]
    pub timestamp: OffsetDateTime,
    pub qty_billable: i128,
    pub sign: i8,
    pub version: u64,
    #[serde(with = "clickhouse::serde::time::datetime64::millis")]
    pub ingested_at: OffsetDateTime,
    pub expired: u8,
    pub unique_key: &'a str,
}

/// A row of `events_raw` (`0004_events_raw.sql`): an event's usage.raw message, kept for the
/// meter backfill.
#[derive(Debug, ::clickhouse::Row, serde::Serialize, serde::Deserialize)]
pub struct RawRow<'a> {
    pub tenant_id: &'a str,
    pub environment_id: &'a str,
    pub event_name: &'a str,
    pub customer_id: &'a str,
    pub event_id: &'a str,
    #[serde(with = "clickhouse::serde::time::datetime64::millis")]
    pub timestamp: OffsetDateTime,
    #[serde(with = "clickhouse::serde::time::datetime64::millis")]
    pub ingested_at: OffsetDateTime,
    pub version: u64,
    pub payload: &'a str,
}

/// `at` in Unix milliseconds, the parameter of `fromUnixTimestamp64Milli(?, 'UTC')`.
pub fn unix_millis(at: OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000_000) as i64
}

/// A client bound to our database.
pub fn client(settings: &ClickhouseSettings) -> ::clickhouse::Client {
    server_client(settings).with_database(&settings.database)
}

/// A client without a database, for creating it.
fn server_client(settings: &ClickhouseSettings) -> ::clickhouse::Client {
    let mut client = ::clickhouse::Client::default().with_url(&settings.url);
    if let Some(user) = &settings.user {
        client = client.with_user(user);
    }
    if let Some(password) = &settings.password {
        client = client.with_password(password);
    }
    client
}

fn ch_err(context: impl Into<String>) -> impl FnOnce(::clickhouse::error::Error) -> Error {
    move |source| Error::Clickhouse {
        context: context.into(),
        source,
    }
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct Applied {
    version: u32,
    checksum: String,
}

#[derive(Debug, clickhouse::Row, serde::Serialize)]
struct AppliedRecord<'a> {
    version: u32,
    name: &'a str,
    checksum: String,
}

/// Creates the database if needed and applies every migration not yet recorded.
/// Returns the versions applied by this call.
pub async fn migrate(settings: &ClickhouseSettings) -> Result<Vec<u32>, Error> {
    // The database name was checked to be a plain identifier when the settings were parsed.
    server_client(settings)
        .query(&format!(
            "CREATE DATABASE IF NOT EXISTS {} ENGINE = Atomic",
            settings.database
        ))
        .execute()
        .await
        .map_err(ch_err("creating database"))?;
    let client = client(settings);
    client
        .query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version UInt32, name String, checksum String,
                applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
             ) ENGINE = MergeTree ORDER BY version",
        )
        .execute()
        .await
        .map_err(ch_err("creating schema_migrations"))?;
    let applied: Vec<Applied> = client
        .query("SELECT version, checksum FROM schema_migrations ORDER BY version")
        .fetch_all()
        .await
        .map_err(ch_err("reading schema_migrations"))?;

    let mut ran = Vec::new();
    for migration in MIGRATIONS {
        let checksum = migration.checksum();
        if let Some(done) = applied.iter().find(|a| a.version == migration.version) {
            if done.checksum != checksum {
                return Err(Error::ClickhouseMigration {
                    version: migration.version,
                    name: migration.name.to_owned(),
                    reason: "the file changed after it was applied; add a new migration instead"
                        .into(),
                });
            }
            continue;
        }
        for statement in migration.statements() {
            client.query(&statement).execute().await.map_err(|source| {
                Error::ClickhouseMigration {
                    version: migration.version,
                    name: migration.name.to_owned(),
                    reason: source.to_string(),
                }
            })?;
        }
        let mut insert = client
            .insert::<AppliedRecord<'_>>("schema_migrations")
            .await
            .map_err(ch_err("recording migration"))?;
        insert
            .write(&AppliedRecord {
                version: migration.version,
                name: migration.name,
                checksum,
            })
            .await
            .map_err(ch_err("recording migration"))?;
        insert.end().await.map_err(ch_err("recording migration"))?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "clickhouse migration applied"
        );
        ran.push(migration.version);
    }
    // A new install: the empty table takes the time-ordered layout at once.
    if events_layout(&client).await? == (EventsLayout::ById { rows: 0 }) {
        relayout_events(settings).await?;
        tracing::info!("events_processed laid out by time");
    }
    Ok(ran)
}

pub async fn check(client: &::clickhouse::Client) -> Result<(), String> {
    client
        .query("SELECT 1")
        .fetch_one::<u8>()
        .await
        .map(|_| ())
        .map_err(|e| format!("query failed: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_matches_the_folder() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/clickhouse");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|f| f.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<String> = MIGRATIONS
            .iter()
            .map(|m| format!("{:04}_{}.sql", m.version, m.name))
            .collect();
        assert_eq!(
            files, listed,
            "every file is listed in MIGRATIONS, in order"
        );
        for pair in MIGRATIONS.windows(2) {
            assert!(pair[0].version < pair[1].version);
        }
    }

    #[test]
    fn statements_split_and_drop_comments() {
        let m = Migration {
            version: 9,
            name: "t",
            sql: "-- a comment; with a semicolon\nCREATE TABLE a (x UInt8) ENGINE = Memory;\n\nCREATE TABLE b (y UInt8) ENGINE = Memory\n",
        };
        let statements: Vec<String> = m.statements().collect();
        assert_eq!(
            statements,
            vec![
                "CREATE TABLE a (x UInt8) ENGINE = Memory",
                "CREATE TABLE b (y UInt8) ENGINE = Memory"
            ]
        );
    }
}
