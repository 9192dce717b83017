//! The shared local stack started by `dev/up`, described by the `KEY=value` lines it writes
//! to `dev/.env`. Variables set in the test's own environment win, so CI or a developer can
//! point the tests at another stack.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use meterline_common::config::{ClickhouseCluster, ClusterEngine};

#[derive(Debug, Clone)]
pub struct Stack {
    pub kafka_brokers: String,
    pub clickhouse_url: String,
    /// The loopback cluster (`dev/up --clickhouse-cluster`) when the tests run against it:
    /// `METERLINE_TEST_CLICKHOUSE=cluster`. `clickhouse_url` is then its first node.
    pub clickhouse_cluster: Option<ClickhouseCluster>,
    /// The project database; namespaces create their own databases through it.
    pub database_url: String,
    pub jwt_secret: String,
    pub encryption_keys: String,
}

/// The repository root (the tests crate lives in `<root>/tests`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the repository")
        .to_path_buf()
}

impl Stack {
    /// The stack, read once per test process. Panics with what to do when it is missing:
    /// a test that needs a server fails, it never skips.
    pub fn get() -> &'static Stack {
        static STACK: OnceLock<Stack> = OnceLock::new();
        STACK.get_or_init(|| {
            let path = repo_root().join("dev/.env");
            let file = std::fs::read_to_string(&path).unwrap_or_default();
            let mut vars: HashMap<String, String> = file
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .collect();
            for key in [
                "KAFKA_BROKERS",
                "CLICKHOUSE_URL",
                "DATABASE_URL",
                "JWT_SECRET",
                "ENCRYPTION_KEYS",
            ] {
                if let Ok(v) = std::env::var(key) {
                    vars.insert(key.to_owned(), v);
                }
            }
            let get = |key: &str| {
                vars.get(key).cloned().unwrap_or_else(|| {
                    panic!(
                        "the local stack is not configured ({key} missing from {} and the \
                         environment): run dev/up first",
                        path.display()
                    )
                })
            };
            let (clickhouse_url, clickhouse_cluster) =
                match std::env::var("METERLINE_TEST_CLICKHOUSE").as_deref() {
                    Err(_) | Ok("" | "single") => (get("CLICKHOUSE_URL"), None),
                    Ok("cluster") => {
                        let nodes: Vec<String> = get("CLICKHOUSE_TEST_CLUSTER_NODES")
                            .split(',')
                            .map(str::to_owned)
                            .collect();
                        (
                            nodes[0].clone(),
                            Some(ClickhouseCluster {
                                name: get("CLICKHOUSE_TEST_CLUSTER"),
                                engine: ClusterEngine::Plain { nodes },
                            }),
                        )
                    }
                    Ok(other) => panic!(
                        "METERLINE_TEST_CLICKHOUSE is single or cluster (dev/up \
                         --clickhouse-cluster), not {other:?}"
                    ),
                };
            Stack {
                kafka_brokers: get("KAFKA_BROKERS"),
                clickhouse_url,
                clickhouse_cluster,
                database_url: get("DATABASE_URL"),
                jwt_secret: get("JWT_SECRET"),
                encryption_keys: get("ENCRYPTION_KEYS"),
            }
        })
    }
}

/// `url` with its database name replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_end = base
        .find("://")
        .map(|i| i + 3)
        .and_then(|start| base[start..].find('/').map(|i| start + i))
        .unwrap_or(base.len());
    let mut out = format!("{}/{}", &base[..authority_end], database);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_is_replaced() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/meterline", "t1"),
            "postgres://u:p@h:5432/t1"
        );
        assert_eq!(
            with_database("postgres://u:p@h:5432/meterline?sslmode=disable", "t1"),
            "postgres://u:p@h:5432/t1?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "t1"), "postgres://h/t1");
    }
}
