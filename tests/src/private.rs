//! Throwaway servers for tests that stop a dependency: a private Apache Kafka broker,
//! ClickHouse server or PostgreSQL instance, started by the same `dev/*.sh` scripts as the
//! shared stack but in a temporary folder on free ports, and removed when dropped.

use std::path::{Path, PathBuf};

use tempfile::TempDir;
use tokio::process::Command;

use crate::process::free_port;
use crate::stack::repo_root;
use crate::tls::TestCa;

async fn script(args: &[&str]) {
    let script = repo_root().join("dev").join(args[0]);
    let output = Command::new(&script)
        .args(&args[1..])
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        output.status.success(),
        "{} {:?} failed ({}):\n{}\n{}",
        script.display(),
        &args[1..],
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn dir_str(dir: &TempDir) -> &str {
    path_str(dir.path())
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

fn temp_dir(kind: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("meterline-{kind}-"))
        .tempdir()
        .expect("creating a temporary folder")
}

/// Stops a server when the test ends, even when it panics.
fn stop_blocking(script_name: &str, args: &[&str]) {
    let _ = std::process::Command::new(repo_root().join("dev").join(script_name))
        .args(args)
        .output();
}

/// A private single-node Kafka broker.
pub struct PrivateKafka {
    dir: TempDir,
    port: u16,
    controller_port: u16,
    /// The SASL_SSL listener's port and what it needs, when there is one.
    secure: Option<SecureListener>,
}

/// A SASL_SSL listener: TLS with the CA's server certificate, requiring a client certificate
/// the CA signed (mutual TLS), then SCRAM (SHA-256 and SHA-512) and PLAIN logins of one user.
struct SecureListener {
    port: u16,
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
    user: String,
    password: String,
}

impl PrivateKafka {
    pub async fn start() -> PrivateKafka {
        let kafka = PrivateKafka {
            dir: temp_dir("kafka"),
            port: free_port(),
            controller_port: free_port(),
            secure: None,
        };
        kafka.resume().await;
        kafka
    }

    /// A broker with a SASL_SSL listener as well ([`Self::secure_brokers`]) serving `ca`'s
    /// server certificate and requiring a client certificate signed by `ca`
    /// ([`TestCa::client_pem`]), where `user` logs in with `password` (SCRAM credentials
    /// created with Kafka's own storage tool). Its plaintext listener is for the harness's
    /// admin work.
    pub async fn start_sasl_ssl(ca: &TestCa, user: &str, password: &str) -> PrivateKafka {
        let kafka = PrivateKafka {
            dir: temp_dir("kafka"),
            port: free_port(),
            controller_port: free_port(),
            secure: Some(SecureListener {
                port: free_port(),
                cert: ca.server_pem(),
                key: ca.server_key(),
                client_ca: ca.ca_pem(),
                user: user.to_owned(),
                password: password.to_owned(),
            }),
        };
        kafka.resume().await;
        kafka
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The SASL_SSL listener's address.
    pub fn secure_brokers(&self) -> String {
        let secure = self
            .secure
            .as_ref()
            .expect("a broker started with SASL_SSL");
        format!("127.0.0.1:{}", secure.port)
    }

    pub async fn stop(&self) {
        script(&["kafka.sh", "stop", dir_str(&self.dir)]).await;
    }

    /// Sets `user`'s SCRAM password (SHA-256 and SHA-512) on the running broker, with Kafka's
    /// own tool over the plaintext listener, as an operator rotating it would.
    pub async fn set_scram_password(&self, user: &str, password: &str) {
        script(&["kafka.sh", "scram", &self.port.to_string(), user, password]).await;
    }

    /// Starts the broker again on the same ports and data.
    pub async fn resume(&self) {
        let port = self.port.to_string();
        let controller_port = self.controller_port.to_string();
        let mut args = vec![
            "kafka.sh",
            "start",
            dir_str(&self.dir),
            &port,
            &controller_port,
        ];
        let secure_port;
        if let Some(secure) = &self.secure {
            secure_port = secure.port.to_string();
            args.extend([
                "--sasl-ssl",
                &secure_port,
                path_str(&secure.cert),
                path_str(&secure.key),
                &secure.user,
                &secure.password,
                path_str(&secure.client_ca),
            ]);
        }
        script(&args).await;
    }
}

impl Drop for PrivateKafka {
    fn drop(&mut self) {
        stop_blocking("kafka.sh", &["stop", dir_str(&self.dir)]);
    }
}

/// A private ClickHouse server.
pub struct PrivateClickhouse {
    dir: TempDir,
    http_port: u16,
    tcp_port: u16,
}

impl PrivateClickhouse {
    pub async fn start() -> PrivateClickhouse {
        let server = PrivateClickhouse {
            dir: temp_dir("clickhouse"),
            http_port: free_port(),
            tcp_port: free_port(),
        };
        server.resume().await;
        server
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub async fn stop(&self) {
        script(&["clickhouse.sh", "stop", dir_str(&self.dir)]).await;
    }

    pub async fn resume(&self) {
        script(&[
            "clickhouse.sh",
            "start",
            dir_str(&self.dir),
            &self.http_port.to_string(),
            &self.tcp_port.to_string(),
        ])
        .await;
    }
}

impl Drop for PrivateClickhouse {
    fn drop(&mut self) {
        stop_blocking("clickhouse.sh", &["stop", dir_str(&self.dir)]);
    }
}

/// A private 2-shard x 2-replica ClickHouse cluster of four loopback servers (plain engines,
/// the `Distributed` table writing every replica), for tests that stop one node.
pub struct PrivateClickhouseCluster {
    dir: TempDir,
    http_ports: Vec<u16>,
    tcp_ports: Vec<u16>,
}

/// The cluster's name in the nodes' `<remote_servers>`.
pub const PRIVATE_CLUSTER: &str = "private";

impl PrivateClickhouseCluster {
    pub async fn start() -> PrivateClickhouseCluster {
        let cluster = PrivateClickhouseCluster {
            dir: temp_dir("clickhouse-cluster"),
            http_ports: (0..4).map(|_| free_port()).collect(),
            tcp_ports: (0..4).map(|_| free_port()).collect(),
        };
        let list = |ports: &[u16]| {
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        script(&[
            "clickhouse.sh",
            "cluster-start",
            dir_str(&cluster.dir),
            PRIVATE_CLUSTER,
            &list(&cluster.http_ports),
            &list(&cluster.tcp_ports),
            // As the shared stack's (dev/clickhouse/restart-on-crash says why); a node this
            // test kills stays down, see `kill`.
            "--restart-on-crash",
        ])
        .await;
        cluster
    }

    /// The HTTP URL of node `n` (1 to 4; nodes 1 and 2 hold shard 1, 3 and 4 shard 2).
    pub fn url(&self, n: usize) -> String {
        format!("http://127.0.0.1:{}", self.http_ports[n - 1])
    }

    /// The cluster as meterline is configured for it, with node 1 answering queries.
    pub fn settings(&self) -> meterline_common::config::ClickhouseCluster {
        meterline_common::config::ClickhouseCluster {
            name: PRIVATE_CLUSTER.to_owned(),
            engine: meterline_common::config::ClusterEngine::Plain {
                nodes: (1..=4).map(|n| self.url(n)).collect(),
            },
        }
    }

    fn node_dir(&self, n: usize) -> String {
        format!("{}/node{n}", dir_str(&self.dir))
    }

    /// SIGKILLs node `n`: no clean shutdown, as when a machine is lost. The whole process
    /// group goes, the server and what would restart it, so the node stays down until
    /// [`Self::resume`].
    pub fn kill(&self, n: usize) {
        let pid = std::fs::read_to_string(format!("{}/clickhouse.pid", self.node_dir(n)))
            .unwrap_or_else(|e| panic!("reading node {n}'s pid: {e}"));
        let pid: i32 = pid.trim().parse().expect("a pid");
        // SAFETY: kill(2) on the process group of a server this test started (its first
        // process leads a session of its own: dev/lib.sh start_detached).
        let killed = unsafe { libc::kill(-pid, libc::SIGKILL) };
        assert_eq!(killed, 0, "killing node {n} (process group {pid})");
    }

    /// Starts node `n` again on its ports and data.
    pub async fn resume(&self, n: usize) {
        script(&[
            "clickhouse.sh",
            "start",
            &self.node_dir(n),
            &self.http_ports[n - 1].to_string(),
            &self.tcp_ports[n - 1].to_string(),
            "--restart-on-crash",
        ])
        .await;
    }
}

impl Drop for PrivateClickhouseCluster {
    fn drop(&mut self) {
        stop_blocking("clickhouse.sh", &["cluster-stop", dir_str(&self.dir)]);
    }
}

/// A private PostgreSQL instance with the `meterline` role and database.
pub struct PrivatePostgres {
    dir: TempDir,
    port: u16,
    /// The certificate and key it serves TLS with, when it accepts TCP logins over TLS only.
    tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

impl PrivatePostgres {
    pub async fn start() -> PrivatePostgres {
        let server = PrivatePostgres {
            dir: temp_dir("postgres"),
            port: free_port(),
            tls: None,
        };
        server.resume().await;
        server
    }

    /// An instance with `ssl = on` serving `ca`'s server certificate, accepting TCP logins
    /// over TLS only (`hostssl`, password): a plaintext client is refused.
    pub async fn start_tls(ca: &TestCa) -> PrivatePostgres {
        let server = PrivatePostgres {
            dir: temp_dir("postgres"),
            port: free_port(),
            tls: Some((ca.server_pem(), ca.server_key(), ca.ca_pem())),
        };
        server.resume().await;
        server
    }

    /// The URL of its `meterline` database; over TLS with the server verified against the
    /// test's CA (`sslmode=verify-full`) when the instance serves TLS.
    pub fn database_url(&self) -> String {
        let base = format!(
            "postgres://meterline:meterline@127.0.0.1:{}/meterline",
            self.port
        );
        match &self.tls {
            Some((_, _, ca)) => format!("{base}?sslmode=verify-full&sslrootcert={}", ca.display()),
            None => base,
        }
    }

    pub async fn stop(&self) {
        script(&["postgres.sh", "stop-private", dir_str(&self.dir)]).await;
    }

    pub async fn resume(&self) {
        let port = self.port.to_string();
        let mut args = vec!["postgres.sh", "start-private", dir_str(&self.dir), &port];
        if let Some((cert, key, _)) = &self.tls {
            args.extend(["--tls", path_str(cert), path_str(key)]);
        }
        script(&args).await;
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        stop_blocking("postgres.sh", &["stop-private", dir_str(&self.dir)]);
    }
}
