//! Service binaries as child processes: each on a free port of 127.0.0.1, configured by
//! environment variables, its output kept in `target/test-logs/` and shown when it misbehaves.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// Where cargo put the binaries of this build (`target/<profile>`), found from the running
/// executable's own path: a test binary lives one level deeper, in `target/<profile>/deps`,
/// a workspace binary (such as the benchmark) right there.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the running binary has a path");
    let dir = exe.parent().expect("a binary lives in a folder");
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().unwrap_or(dir).to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The path of a workspace binary, failing with what to run when it was not built.
pub fn bin_path(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    path
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}

fn log_dir() -> PathBuf {
    let dir = bin_dir().join("../test-logs");
    std::fs::create_dir_all(&dir).expect("creating target/test-logs");
    dir
}

/// A running service binary.
pub struct ServiceProcess {
    pub name: String,
    pub addr: SocketAddr,
    pub log: PathBuf,
    child: Child,
}

impl ServiceProcess {
    /// Starts `name` with exactly `env` (plus `HTTP_ADDR` on a free port) and waits until its
    /// `/healthz` answers. Panics with the end of its log if it exits or does not answer.
    pub async fn spawn(name: &str, env: &[(String, String)]) -> ServiceProcess {
        let port = free_port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let log = log_dir().join(format!("{name}-{port}.log"));
        let out = std::fs::File::create(&log).expect("creating a log file");
        let err = out.try_clone().expect("cloning the log file handle");
        let child = Command::new(bin_path(name))
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("HTTP_ADDR", addr.to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let mut process = ServiceProcess {
            name: name.to_owned(),
            addr,
            log,
            child,
        };
        process.wait_healthy(Duration::from_secs(30)).await;
        process
    }

    /// The process id, for CPU and memory accounting.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The service's `/metrics` text.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .expect("the service answers /metrics")
            .text()
            .await
            .expect("reading /metrics")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    async fn wait_healthy(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        let client = reqwest::Client::new();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited with {status} before answering /healthz:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if let Ok(r) = client.get(self.url("/healthz")).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not answer /healthz within {within:?}:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How the process ended, when it ended on its own (`None` while it runs): a test that
    /// kills services on purpose checks that none of them died of anything else.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last lines the process wrote.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Every line the process wrote so far.
    pub fn log_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Sends SIGTERM and waits for the exit, failing the test if it takes longer than `within`.
    pub async fn terminate(mut self, within: Duration) -> ExitStatus {
        self.signal(libc::SIGTERM);
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.expect("waiting for the child"),
            Err(_) => panic!(
                "{} did not stop within {within:?} of SIGTERM:\n{}",
                self.name,
                self.log_tail()
            ),
        }
    }

    /// SIGKILL: the crash a test wants to survive.
    pub async fn kill(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait().await;
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on the pid of our own child, which we have not reaped yet.
            unsafe {
                libc::kill(pid as libc::pid_t, signal);
            }
        }
    }
}

/// Runs a binary with `args` to completion with exactly `env`, returning all it printed.
pub async fn run_command(name: &str, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    Command::new(bin_path(name))
        .env_clear()
        .envs(env.iter().copied())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {name}: {e}"))
}

/// Runs a binary to completion with exactly `env`, returning its exit status and stderr.
pub async fn run_to_exit(name: &str, env: &[(&str, &str)]) -> (ExitStatus, String) {
    let output = Command::new(bin_path(name))
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {name}: {e}"));
    (
        output.status,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}
