//! ClickHouse: the client, the versioned SQL migrator, and the readiness probe.
//!
//! Migrations are the numbered files in `common/migrations/clickhouse`, embedded in the
//! binary. Each applied one is recorded in `schema_migrations` with a checksum of its text:
//! a file edited after it ran is refused rather than silently diverging from the database.
//! `layout.rs` converts `events_processed` to the time-ordered layout ([`relayout_events`]);
//! `cluster.rs` turns each statement into its form on a sharded cluster ([`Topology`]).
//! [`ProcessedRow`] is the row those migrations define for `events_processed`, so that the
//! aggregator and the benchmark's baseline write the same columns.

mod cluster;
mod http;
mod layout;

pub use cluster::{Step, Target, Topology};
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
    client_at(settings, &settings.url)
}

/// A client of our database on the server at `url` (one node of a cluster).
fn client_at(settings: &ClickhouseSettings, url: &str) -> ::clickhouse::Client {
    let mut client = http::client(settings).with_url(url);
    if let Some(user) = &settings.user {
        client = client.with_user(user);
    }
    if let Some(password) = &settings.password {
        client = client.with_password(password);
    }
    if let Some(cluster) = &settings.cluster {
        // `cluster.rs` says why: inserts stored on every shard before they return, and IN
        // subqueries between tables sharded alike answered on each shard.
        client = client
            .with_setting("distributed_foreground_insert", "1")
            .with_setting("distributed_product_mode", "local");
        if cluster.engine == crate::config::ClusterEngine::Replicated {
            // A total must not be read from a replica that lacks some of its rows: an insert
            // returns once a majority of the shard's replicas hold it (all of them, with two),
            // and a read skips a replica whose replication queue is more than 5 s behind,
            // failing (and being retried) rather than falling back to a stale one.
            client = client
                .with_setting("insert_quorum", "auto")
                .with_setting("max_replica_delay_for_distributed_queries", "5")
                .with_setting("fallback_to_stale_replicas_for_distributed_queries", "0");
        }
    }
    client.with_database(&settings.database)
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

/// A client of the server at `url` without a database, for creating it.
fn server_client_at(settings: &ClickhouseSettings, url: &str) -> ::clickhouse::Client {
    let mut client = http::client(settings).with_url(url);
    if let Some(user) = &settings.user {
        client = client.with_user(user);
    }
    if let Some(password) = &settings.password {
        client = client.with_password(password);
    }
    client
}

/// Creates the database if needed and applies every migration not yet recorded, on one
/// server or across the cluster (`cluster.rs`). Returns the versions applied by this call.
pub async fn migrate(settings: &ClickhouseSettings) -> Result<Vec<u32>, Error> {
    let topology = Topology::of(settings);
    let database = topology.create_database();
    // Before the database exists, the clients must not name it.
    let urls: Vec<&str> = match (&settings.cluster, database.target) {
        (
            Some(crate::config::ClickhouseCluster {
                engine: crate::config::ClusterEngine::Plain { nodes },
                ..
            }),
            Target::EveryNode,
        ) => nodes.iter().map(String::as_str).collect(),
        _ => vec![settings.url.as_str()],
    };
    for url in urls {
        // The database name was checked to be a plain identifier when the settings were parsed.
        server_client_at(settings, url)
            .query(&database.sql)
            .execute()
            .await
            .map_err(ch_err("creating database"))?;
    }
    topology
        .execute(
            &[topology.schema_migrations()],
            "creating schema_migrations",
        )
        .await?;
    let client = client(settings);
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
        let failed = |reason: String| Error::ClickhouseMigration {
            version: migration.version,
            name: migration.name.to_owned(),
            reason,
        };
        for statement in migration.statements() {
            let steps = topology.plan(&statement).map_err(failed)?;
            topology
                .execute(&steps, "applying a migration")
                .await
                .map_err(|e| failed(e.to_string()))?;
        }
        for client in topology.clients(topology.migration_record_target()) {
            let mut insert = client
                .insert::<AppliedRecord<'_>>("schema_migrations")
                .await
                .map_err(ch_err("recording migration"))?;
            insert
                .write(&AppliedRecord {
                    version: migration.version,
                    name: migration.name,
                    checksum: checksum.clone(),
                })
                .await
                .map_err(ch_err("recording migration"))?;
            insert.end().await.map_err(ch_err("recording migration"))?;
        }
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "clickhouse migration applied"
        );
        ran.push(migration.version);
    }
    // A new install: the empty table takes the time-ordered layout at once.
    if events_layout(settings).await? == (EventsLayout::ById { rows: 0 }) {
        relayout_events(settings).await?;
        tracing::info!("events_processed laid out by time");
    }
    Ok(ran)
}

/// Every statement `migrate` runs on a new install of this topology, in order, without
/// running any: what `meterline migrate --print-ddl` shows an operator to review (or to
/// run by hand) before the first migration on a production cluster.
pub fn planned_ddl(settings: &ClickhouseSettings) -> Result<Vec<Step>, Error> {
    let topology = Topology::of(settings);
    let mut steps = vec![topology.create_database(), topology.schema_migrations()];
    for migration in MIGRATIONS {
        for statement in migration.statements() {
            steps.extend(topology.plan(&statement).map_err(|reason| {
                Error::ClickhouseMigration {
                    version: migration.version,
                    name: migration.name.to_owned(),
                    reason,
                }
            })?);
        }
    }
    steps.extend(layout::new_install_relayout(
        &topology,
        layout::DEFAULT_TTL_DAYS,
    )?);
    Ok(steps)
}

pub async fn check(client: &::clickhouse::Client) -> Result<(), String> {
    client
        .query("SELECT 1")
        .fetch_one::<u8>()
        .await
        .map(|_| ())
        .map_err(|e| format!("query failed: {}", crate::error::with_causes(&e)))
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
