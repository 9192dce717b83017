//! One test's private slice of the stack: its own topics (a unique `TOPIC_PREFIX`), its own
//! ClickHouse database and its own PostgreSQL database, created and migrated with the same
//! code a deploy runs (`meterline setup`). Tests therefore run in parallel and never see each
//! other's data.

use meterline_common::config::{
    ClickhouseSettings, ClusterEngine, KafkaSettings, PostgresSettings,
};
use meterline_common::kafka::{self, Topics};
use meterline_common::{clickhouse, postgres};
use meterline_schemas::Topic;
use sqlx::PgPool;

use crate::stack::{with_database, Stack};

/// Partitions of each test topic: more than one, so ordering and rebalancing are exercised.
pub const TEST_PARTITIONS: i32 = 3;

#[derive(Debug, Clone)]
pub struct Namespace {
    /// Unique per namespace, such as `t0193f2c4d5e6`.
    pub id: String,
    pub kafka: KafkaSettings,
    pub clickhouse: ClickhouseSettings,
    pub postgres: PostgresSettings,
}

impl Namespace {
    /// Deletes the namespace's topics, best effort. Left in place they add up to thousands of
    /// partitions over a few test runs, and a broker restart then takes longer than `dev/up`
    /// waits for it.
    async fn delete_topics(&self) {
        // A test's private broker may be gone by now: never wait long for an answer.
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            kafka::delete_topics(&self.kafka, &self.topics().all()),
        )
        .await;
    }

    /// A fresh namespace on the shared stack, fully set up.
    pub async fn create() -> Namespace {
        let stack = Stack::get();
        let ns = Namespace::plan(&stack.kafka_brokers, &stack.database_url);
        ns.create_topics().await;
        ns.create_databases().await;
        ns
    }

    /// The names and settings of a new namespace, with nothing created yet. Tests that run a
    /// private server pass its address here and then call the `create_*` steps they need.
    pub fn plan(kafka_brokers: &str, admin_database_url: &str) -> Namespace {
        let stack = Stack::get();
        let id = format!("t{}", uuid::Uuid::now_v7().simple());
        Namespace {
            kafka: KafkaSettings {
                brokers: kafka_brokers.to_owned(),
                topic_prefix: format!("{id}."),
                security: Default::default(),
            },
            clickhouse: ClickhouseSettings {
                url: stack.clickhouse_url.clone(),
                database: id.clone(),
                user: None,
                password: None,
                cluster: stack.clickhouse_cluster.clone(),
                ca_certificates: None,
            },
            postgres: PostgresSettings {
                url: with_database(admin_database_url, &id),
            },
            id,
        }
    }

    pub fn topics(&self) -> Topics {
        Topics::new(self.kafka.topic_prefix.clone())
    }

    /// The full topic name of `topic` in this namespace.
    pub fn topic(&self, topic: Topic) -> String {
        self.topics().name(topic)
    }

    pub async fn create_topics(&self) {
        kafka::ensure_topics(&self.kafka, &self.topics().all(), TEST_PARTITIONS, 1)
            .await
            .unwrap_or_else(|e| panic!("creating topics of namespace {}: {e}", self.id));
    }

    /// Creates and migrates this namespace's PostgreSQL and ClickHouse databases.
    ///
    /// The ClickHouse migration is tried again for up to 20 s: a node of the loopback cluster
    /// can be restarting just then (this ClickHouse build aborts when a peer resets a
    /// distributed insert, and `dev/up` starts it again: `dev/clickhouse/restart-on-crash`).
    /// Every ClickHouse migration can be applied twice (`IF NOT EXISTS`, `MODIFY`).
    pub async fn create_databases(&self) {
        self.create_postgres().await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            match clickhouse::migrate(&self.clickhouse).await {
                Ok(_) => return,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!(
                        "migrating clickhouse database {} (trying again): {e}",
                        self.id
                    );
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                }
                Err(e) => panic!("migrating clickhouse database {}: {e}", self.id),
            }
        }
    }

    /// Creates and migrates this namespace's PostgreSQL database, using the admin URL's
    /// server and role.
    pub async fn create_postgres(&self) {
        let admin_url = with_database(&self.postgres.url, "meterline");
        let admin = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("connecting to postgres (is dev/up running?): {e}"));
        // The id is generated above from a UUID: a safe identifier.
        sqlx::query(&format!("CREATE DATABASE \"{}\"", self.id))
            .execute(&admin)
            .await
            .unwrap_or_else(|e| panic!("creating database {}: {e}", self.id));
        admin.close().await;
        postgres::migrate(&self.pg_pool().await)
            .await
            .unwrap_or_else(|e| panic!("migrating database {}: {e}", self.id));
    }

    pub async fn pg_pool(&self) -> PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(5)
            .connect(&self.postgres.url)
            .await
            .unwrap_or_else(|e| panic!("connecting to database {}: {e}", self.id))
    }

    /// Stops background merges of `events_processed`, so that copies of an event stay in
    /// separate parts: a total that is right only because a merge happened to deduplicate
    /// first would otherwise pass by luck.
    pub async fn stop_merges(&self) {
        self.run_on_storage("SYSTEM STOP MERGES events_processed")
            .await;
    }

    /// Runs `sql`, written for one server, where it belongs on this namespace's ClickHouse
    /// (on each node's local table, on a cluster).
    pub async fn run_on_storage(&self, sql: &str) {
        let topology = clickhouse::Topology::of(&self.clickhouse);
        let steps = topology
            .plan(sql)
            .unwrap_or_else(|e| panic!("planning {sql} in {}: {e}", self.id));
        topology
            .execute(&steps, sql)
            .await
            .unwrap_or_else(|e| panic!("{sql} in {}: {e}", self.id));
    }

    pub fn clickhouse(&self) -> ::clickhouse::Client {
        clickhouse::client(&self.clickhouse)
    }

    /// The environment a service needs to run inside this namespace.
    pub fn env(&self) -> Vec<(String, String)> {
        let stack = Stack::get();
        // Tests run side by side on one broker: an aggregator joining another test's consumer
        // group would rebalance it, and a rebalance redelivers what was not committed yet.
        let aggregator_group = format!("{}meterline-aggregator", self.kafka.topic_prefix);
        let mut env: Vec<(String, String)> = [
            ("KAFKA_BROKERS", self.kafka.brokers.as_str()),
            ("TOPIC_PREFIX", self.kafka.topic_prefix.as_str()),
            ("AGGREGATOR_GROUP_ID", aggregator_group.as_str()),
            ("CLICKHOUSE_URL", self.clickhouse.url.as_str()),
            ("CLICKHOUSE_DATABASE", self.clickhouse.database.as_str()),
            ("DATABASE_URL", self.postgres.url.as_str()),
            ("JWT_SECRET", stack.jwt_secret.as_str()),
            ("ENCRYPTION_KEYS", stack.encryption_keys.as_str()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        if let Some(cluster) = &self.clickhouse.cluster {
            env.push(("CLICKHOUSE_CLUSTER".into(), cluster.name.clone()));
            if let ClusterEngine::Plain { nodes } = &cluster.engine {
                env.push(("CLICKHOUSE_CLUSTER_ENGINE".into(), "plain".into()));
                env.push(("CLICKHOUSE_CLUSTER_NODES".into(), nodes.join(",")));
            }
        }
        env
    }

    /// Drops the namespace's databases and deletes its topics. Call at the end of a passing
    /// test; a failing one leaves its data and its topics to look at.
    pub async fn drop_databases(&self) {
        self.delete_topics().await;
        let topology = clickhouse::Topology::of(&self.clickhouse);
        for client in topology.clients(clickhouse::Target::EveryNode) {
            let _ = client
                .query(&format!("DROP DATABASE IF EXISTS {}", self.id))
                .execute()
                .await;
        }
        let admin_url = with_database(&self.postgres.url, "meterline");
        if let Ok(admin) = sqlx::PgPool::connect(&admin_url).await {
            let _ = sqlx::query(&format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.id
            ))
            .execute(&admin)
            .await;
        }
    }
}
