//! Where each statement runs: on one server, or across a sharded cluster.
//!
//! Rule kept here: every row of one customer lives on one shard. On a cluster
//! (`CLICKHOUSE_CLUSTER`) each table of the migrations becomes a local table on every node,
//! `<table>_local`, holding that node's shard, and a `Distributed` table under the table's own
//! name over them, sharded on `cityHash64(customer_id)`. All copies of an event share its
//! customer (the customer is part of its identity), so they meet in one shard's table and
//! `FINAL` collapses them there as on one server; a window total is a sum over one customer,
//! answered by one shard. The queries of the services are therefore the same on one server and
//! on a cluster: they name the `Distributed` table, which sends each query to one replica of
//! every shard, and IN subqueries between our tables run shard-locally
//! (`distributed_product_mode = 'local'`), which the shared sharding key makes exact.
//!
//! Inserts are foreground (`distributed_foreground_insert = 1`): an insert returns once every
//! shard took its rows, so the aggregator commits its Kafka offsets only after the rows are
//! stored; a failed insert is retried whole, which the tables' deduplication makes harmless.
//! A total must never be read from a replica that lacks rows (it would bill too little): with
//! plain engines the `Distributed` table writes every replica before the insert returns; with
//! replicated ones the insert waits for a majority of replicas and reads skip a replica more
//! than 5 s behind (the client settings in `mod.rs`), while windows are read a grace period
//! after their last event.
//!
//! The migrations are written for one server; [`Topology::plan`] turns each statement into the
//! cluster's: a `CREATE TABLE` into the local table and the `Distributed` one, an `ALTER` of
//! columns into both, any other `ALTER` (a TTL) into the local table only, an `INSERT ...
//! SELECT` unchanged (it runs once, through the `Distributed` tables). With the `replicated`
//! engine the local tables are `Replicated*MergeTree` and each DDL statement runs once with
//! `ON CLUSTER`; with `plain` they are plain engines and each DDL statement runs on every
//! node listed in `CLICKHOUSE_CLUSTER_NODES`.

use crate::config::{ClickhouseCluster, ClickhouseSettings, ClusterEngine};
use crate::Error;

/// The suffix of the local table that holds a node's shard of a table.
const LOCAL: &str = "_local";

/// Where one statement runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Once, on the server of `CLICKHOUSE_URL` (which on a cluster forwards it as needed).
    Once,
    /// On every node of a `plain` cluster, one after another.
    EveryNode,
}

/// One statement and where it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub sql: String,
    pub target: Target,
}

impl Step {
    fn once(sql: String) -> Step {
        Step {
            sql,
            target: Target::Once,
        }
    }
}

/// A statement split into its verb, the table it names and the rest.
struct Statement<'a> {
    head: &'a str,
    table: &'a str,
    tail: &'a str,
}

/// The statements the migrations and their tools use, longest first.
const HEADS: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS ",
    "CREATE TABLE ",
    "DROP TABLE IF EXISTS ",
    "DROP TABLE ",
    "ALTER TABLE ",
    "INSERT INTO ",
    "SYSTEM STOP MERGES ",
    "SYSTEM START MERGES ",
];

fn split(sql: &str) -> Option<Statement<'_>> {
    let head = HEADS.iter().find(|h| sql.starts_with(**h))?;
    let rest = &sql[head.len()..];
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '(')
        .unwrap_or(rest.len());
    Some(Statement {
        head,
        table: &rest[..end],
        tail: &rest[end..],
    })
}

/// ALTER actions that change columns: the `Distributed` table must show the same columns.
const COLUMN_ACTIONS: &[&str] = &[
    "ADD COLUMN",
    "DROP COLUMN",
    "MODIFY COLUMN",
    "RENAME COLUMN",
    "COMMENT COLUMN",
];

/// meterline's tables as laid out on one server or on a cluster.
#[derive(Debug, Clone, Copy)]
pub struct Topology<'a> {
    settings: &'a ClickhouseSettings,
}

impl<'a> Topology<'a> {
    pub fn of(settings: &'a ClickhouseSettings) -> Self {
        Self { settings }
    }

    fn cluster(&self) -> Option<&'a ClickhouseCluster> {
        self.settings.cluster.as_ref()
    }

    /// The table that stores the rows of `table` on the server the client talks to: the
    /// table itself on one server, its local table on a cluster.
    pub fn storage(&self, table: &str) -> String {
        match self.cluster() {
            None => table.to_owned(),
            Some(_) => format!("{table}{LOCAL}"),
        }
    }

    /// ` ON CLUSTER name` for replicated DDL, empty otherwise.
    fn on_cluster(&self) -> String {
        match self.cluster() {
            Some(ClickhouseCluster {
                name,
                engine: ClusterEngine::Replicated,
            }) => format!(" ON CLUSTER {name}"),
            _ => String::new(),
        }
    }

    /// Where DDL runs: once (one server, or `ON CLUSTER`), or on each node of a plain cluster.
    fn ddl_target(&self) -> Target {
        match self.cluster() {
            Some(ClickhouseCluster {
                engine: ClusterEngine::Plain { .. },
                ..
            }) => Target::EveryNode,
            _ => Target::Once,
        }
    }

    fn ddl(&self, sql: String) -> Step {
        Step {
            sql,
            target: self.ddl_target(),
        }
    }

    /// The statements that carry out `sql`, a statement written for one server (a
    /// migration's), on this topology. A statement of a kind the cluster layout does not know
    /// is refused rather than run on one node only.
    pub fn plan(&self, sql: &str) -> Result<Vec<Step>, String> {
        let Some(cluster) = self.cluster() else {
            return Ok(vec![Step::once(sql.to_owned())]);
        };
        let statement = split(sql).ok_or_else(|| {
            format!(
                "no cluster form is known for this statement: {}",
                sql.lines().next().unwrap_or(sql)
            )
        })?;
        let table = statement.table;
        match statement.head {
            "CREATE TABLE IF NOT EXISTS " | "CREATE TABLE " => {
                if !statement.tail.contains("customer_id ") {
                    return Err(format!(
                        "{table} has no customer_id column to be sharded on"
                    ));
                }
                let local = self.plan_storage(sql)?;
                let distributed = format!(
                    "{head}{table}{on} AS {table}{LOCAL} ENGINE = Distributed('{cluster}', \
                     '{database}', '{table}{LOCAL}', cityHash64(customer_id))",
                    head = statement.head,
                    on = self.on_cluster(),
                    cluster = cluster.name,
                    database = self.settings.database,
                );
                Ok(vec![local, self.ddl(distributed)])
            }
            "ALTER TABLE " => {
                let action = statement.tail.trim_start();
                let mut steps = vec![self.plan_storage(sql)?];
                if COLUMN_ACTIONS.iter().any(|a| action.starts_with(a)) {
                    steps.push(self.ddl(format!(
                        "ALTER TABLE {table}{on}{tail}",
                        on = self.on_cluster(),
                        tail = statement.tail
                    )));
                }
                Ok(steps)
            }
            // Through the Distributed tables, once: each shard gets its own customers' rows.
            "INSERT INTO " => Ok(vec![Step::once(sql.to_owned())]),
            _ => Ok(vec![self.plan_storage(sql)?]),
        }
    }

    /// `sql`, written against a table, applied to the table that stores its rows: on a
    /// cluster, its local table on every node, replicated when the engine is.
    pub fn plan_storage(&self, sql: &str) -> Result<Step, String> {
        if self.cluster().is_none() {
            return Ok(Step::once(sql.to_owned()));
        }
        let statement = split(sql)
            .filter(|s| s.head != "INSERT INTO ")
            .ok_or_else(|| format!("not a statement on a table's storage: {sql}"))?;
        let local = format!("{}{LOCAL}", statement.table);
        let on = self.on_cluster();
        let sql = match statement.head {
            // SYSTEM takes ON CLUSTER before the table.
            head if head.starts_with("SYSTEM ") => {
                format!("{}{on} {local}{}", head.trim_end(), statement.tail)
            }
            head if head.starts_with("CREATE TABLE") => format!(
                "{head}{local}{on}{}",
                self.replicated_engine(statement.tail)?
            ),
            head => format!("{head}{local}{on}{}", statement.tail),
        };
        Ok(self.ddl(sql))
    }

    /// A table definition's `ENGINE = XMergeTree(args)` as `ReplicatedXMergeTree` with the
    /// conventional Keeper path and replica macros, when the cluster replicates.
    fn replicated_engine(&self, definition: &str) -> Result<String, String> {
        if !matches!(
            self.cluster(),
            Some(ClickhouseCluster {
                engine: ClusterEngine::Replicated,
                ..
            })
        ) {
            return Ok(definition.to_owned());
        }
        let marker = "ENGINE = ";
        let at = definition
            .find(marker)
            .ok_or("a table definition without ENGINE = ")?
            + marker.len();
        let (before, engine) = definition.split_at(at);
        let name_end = engine
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(engine.len());
        let (name, after) = engine.split_at(name_end);
        if !name.ends_with("MergeTree") {
            return Err(format!("{name} has no replicated form"));
        }
        // Every shard's replicas share one path in Keeper; {shard}, {replica}, {database}
        // and {table} are the servers' macros (`<macros>` in their configuration).
        let path = "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'";
        let rest = match after.strip_prefix("()") {
            Some(rest) => format!("({path}){rest}"),
            None => match after.strip_prefix('(') {
                Some(rest) => format!("({path}, {rest}"),
                None => format!("({path}){after}"),
            },
        };
        Ok(format!("{before}Replicated{name}{rest}"))
    }

    /// Creates our database where the tables will be.
    pub fn create_database(&self) -> Step {
        self.ddl(format!(
            "CREATE DATABASE IF NOT EXISTS {}{} ENGINE = Atomic",
            self.settings.database,
            self.on_cluster()
        ))
    }

    /// The table of applied migrations. Not sharded: every node that holds our tables knows
    /// which migrations made them. On a replicated cluster it is one replicated table across
    /// all shards (one Keeper path without `{shard}`); on a plain one, a table on each node,
    /// written on each node.
    pub fn schema_migrations(&self) -> Step {
        let engine = match self.cluster() {
            Some(ClickhouseCluster {
                engine: ClusterEngine::Replicated,
                ..
            }) => {
                "ReplicatedMergeTree('/clickhouse/meterline/{database}/schema_migrations', \
                   '{replica}')"
            }
            _ => "MergeTree",
        };
        self.ddl(format!(
            "CREATE TABLE IF NOT EXISTS schema_migrations{on} (
                version UInt32, name String, checksum String,
                applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
             ) ENGINE = {engine} ORDER BY version",
            on = self.on_cluster()
        ))
    }

    /// Where a record of `schema_migrations` is written: on each node of a plain cluster,
    /// once otherwise.
    pub fn migration_record_target(&self) -> Target {
        self.ddl_target()
    }

    /// The clients a step runs on.
    pub fn clients(&self, target: Target) -> Vec<::clickhouse::Client> {
        match (target, self.cluster()) {
            (
                Target::EveryNode,
                Some(ClickhouseCluster {
                    engine: ClusterEngine::Plain { nodes },
                    ..
                }),
            ) => nodes
                .iter()
                .map(|node| super::client_at(self.settings, node))
                .collect(),
            _ => vec![super::client(self.settings)],
        }
    }

    /// Runs `steps` in order, each where it belongs.
    pub async fn execute(&self, steps: &[Step], context: &str) -> Result<(), Error> {
        for step in steps {
            for client in self.clients(step.target) {
                client
                    .query(&step.sql)
                    // A copy or a backfill of a large table takes as long as it takes.
                    .with_setting("max_execution_time", "0")
                    .execute()
                    .await
                    .map_err(super::ch_err(context.to_owned()))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(cluster: Option<ClickhouseCluster>) -> ClickhouseSettings {
        ClickhouseSettings {
            url: "http://h:8123".into(),
            database: "meterline".into(),
            user: None,
            password: None,
            cluster,
            ca_certificates: None,
        }
    }

    fn replicated() -> ClickhouseSettings {
        settings(Some(ClickhouseCluster {
            name: "main".into(),
            engine: ClusterEngine::Replicated,
        }))
    }

    fn plain() -> ClickhouseSettings {
        settings(Some(ClickhouseCluster {
            name: "main".into(),
            engine: ClusterEngine::Plain {
                nodes: vec!["http://a:8123".into(), "http://b:8123".into()],
            },
        }))
    }

    fn sqls(steps: Vec<Step>) -> Vec<String> {
        steps.into_iter().map(|s| s.sql).collect()
    }

    const CREATE: &str =
        "CREATE TABLE IF NOT EXISTS events_raw\n(\n    customer_id    String,\n    \
                          version UInt64\n)\nENGINE = ReplacingMergeTree(version)\nORDER BY \
                          customer_id";

    #[test]
    fn one_server_runs_every_statement_as_written() {
        let one = settings(None);
        let topology = Topology::of(&one);
        for sql in [CREATE, "ALTER TABLE t MODIFY TTL x", "SELECT 1"] {
            assert_eq!(
                topology.plan(sql).unwrap(),
                vec![Step::once(sql.to_owned())]
            );
        }
        assert_eq!(topology.storage("events_processed"), "events_processed");
    }

    #[test]
    fn a_replicated_cluster_gets_replicated_local_tables_and_a_distributed_table_on_cluster() {
        let s = replicated();
        let steps = Topology::of(&s).plan(CREATE).unwrap();
        assert!(steps.iter().all(|s| s.target == Target::Once));
        assert_eq!(
            sqls(steps),
            vec![
                "CREATE TABLE IF NOT EXISTS events_raw_local ON CLUSTER main\n(\n    customer_id    \
                 String,\n    version UInt64\n)\nENGINE = ReplicatedReplacingMergeTree(\
                 '/clickhouse/tables/{shard}/{database}/{table}', '{replica}', version)\nORDER BY \
                 customer_id"
                    .to_owned(),
                "CREATE TABLE IF NOT EXISTS events_raw ON CLUSTER main AS events_raw_local ENGINE = \
                 Distributed('main', 'meterline', 'events_raw_local', cityHash64(customer_id))"
                    .to_owned(),
            ]
        );
    }

    #[test]
    fn a_plain_cluster_runs_ddl_on_every_node_with_plain_engines() {
        let s = plain();
        let topology = Topology::of(&s);
        let steps = topology.plan(CREATE).unwrap();
        assert!(steps.iter().all(|s| s.target == Target::EveryNode));
        assert!(steps[0]
            .sql
            .starts_with("CREATE TABLE IF NOT EXISTS events_raw_local\n("));
        assert!(steps[0]
            .sql
            .contains("ENGINE = ReplacingMergeTree(version)"));
        assert!(!steps[1].sql.contains("ON CLUSTER"));
        assert_eq!(topology.clients(Target::EveryNode).len(), 2);
        assert_eq!(topology.clients(Target::Once).len(), 1);
    }

    #[test]
    fn column_changes_reach_both_tables_and_a_ttl_only_the_local_one() {
        let s = replicated();
        let topology = Topology::of(&s);
        assert_eq!(
            sqls(
                topology
                    .plan("ALTER TABLE events_processed ADD COLUMN IF NOT EXISTS k String")
                    .unwrap()
            ),
            vec![
                "ALTER TABLE events_processed_local ON CLUSTER main ADD COLUMN IF NOT EXISTS k String",
                "ALTER TABLE events_processed ON CLUSTER main ADD COLUMN IF NOT EXISTS k String",
            ]
        );
        assert_eq!(
            sqls(
                topology
                    .plan("ALTER TABLE events_processed MODIFY TTL toDateTime(timestamp) + INTERVAL 9 DAY")
                    .unwrap()
            ),
            vec!["ALTER TABLE events_processed_local ON CLUSTER main MODIFY TTL toDateTime(timestamp) + INTERVAL 9 DAY"]
        );
        assert_eq!(
            sqls(
                topology
                    .plan("SYSTEM STOP MERGES events_processed")
                    .unwrap()
            ),
            vec!["SYSTEM STOP MERGES ON CLUSTER main events_processed_local"]
        );
    }

    #[test]
    fn an_insert_select_runs_once_through_the_distributed_tables() {
        let s = plain();
        let sql = "INSERT INTO event_first_seen SELECT * FROM events_processed FINAL";
        assert_eq!(
            Topology::of(&s).plan(sql).unwrap(),
            vec![Step::once(sql.to_owned())]
        );
    }

    #[test]
    fn what_cannot_be_sharded_on_the_customer_is_refused() {
        let s = replicated();
        let topology = Topology::of(&s);
        let err = topology
            .plan("CREATE TABLE t (x UInt8) ENGINE = MergeTree ORDER BY x")
            .unwrap_err();
        assert!(err.contains("customer_id"), "{err}");
        let err = topology.plan("RENAME TABLE a TO b").unwrap_err();
        assert!(err.contains("no cluster form"), "{err}");
        let err = topology
            .plan("CREATE TABLE t (customer_id String) ENGINE = Memory")
            .unwrap_err();
        assert!(err.contains("Memory has no replicated form"), "{err}");
    }

    #[test]
    fn every_migration_has_a_cluster_form() {
        for s in [replicated(), plain()] {
            let topology = Topology::of(&s);
            for migration in super::super::MIGRATIONS {
                for statement in migration.statements() {
                    let steps = topology
                        .plan(&statement)
                        .unwrap_or_else(|e| panic!("migration {}: {e}", migration.version));
                    assert!(!steps.is_empty());
                }
            }
        }
    }
}
