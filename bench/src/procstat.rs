//! Everything the benchmarks read from `/proc`: CPU seconds of processes (all threads, or a
//! postmaster with its backends), resident memory, whether a process still runs, the pids of
//! the local stack's servers, the 1-minute load and the machine a run happened on.
//!
//! Rule kept: no other module of `bench/` opens a file under `/proc`; a phase names the
//! processes it accounts once, in a [`Watchlist`], in the order its report lists them, and
//! reads CPU through that list.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;

use anyhow::Context;

/// User and system CPU seconds a process has used since it started (all threads).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTimes {
    pub user: f64,
    pub system: f64,
}

impl CpuTimes {
    pub fn total(&self) -> f64 {
        self.user + self.system
    }

    /// What was used between `before` and `self`.
    pub fn since(&self, before: CpuTimes) -> CpuTimes {
        CpuTimes {
            user: self.user - before.user,
            system: self.system - before.system,
        }
    }
}

/// The CPU one named process (or tree) used during a phase, as a report lists it.
pub struct ComponentCpu {
    pub name: &'static str,
    pub cpu: CpuTimes,
}

impl ComponentCpu {
    pub fn new(name: &'static str, cpu: CpuTimes) -> Self {
        Self { name, cpu }
    }
}

/// Reads `utime` and `stime` (fields 14 and 15) of `/proc/<pid>/stat`.
pub fn cpu_times(pid: u32) -> anyhow::Result<CpuTimes> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_stat(&text, clock_ticks()).with_context(|| format!("parsing {path}"))
}

/// The fields of a `/proc/<pid>/stat` line from field 3 (the state) on. The command name
/// (field 2) is in parentheses and may contain spaces or parentheses: fields are counted
/// after its last `)`.
fn stat_fields(text: &str) -> Option<Vec<&str>> {
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().collect())
}

fn parse_stat(text: &str, ticks_per_second: f64) -> anyhow::Result<CpuTimes> {
    let fields = stat_fields(text).context("no `)` after the command name")?;
    let field = |n: usize| -> anyhow::Result<f64> {
        let value: u64 = fields
            .get(n - 3)
            .with_context(|| format!("field {n} missing"))?
            .parse()
            .with_context(|| format!("field {n} is not a number"))?;
        Ok(value as f64 / ticks_per_second)
    };
    Ok(CpuTimes {
        user: field(14)?,
        system: field(15)?,
    })
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// Whether a process with this pid exists (a child that exited and was reaped does not).
pub fn is_running(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid of a local server: from its pid file under `dev/.state/` when that process runs,
/// otherwise the process listening on `port` (a stack started from another checkout of the
/// repository has its pid file there, not here).
fn server_pid(repo_root: &Path, pid_file: &str, port: Option<u16>) -> Option<u32> {
    let from_file = std::fs::read_to_string(repo_root.join("dev/.state").join(pid_file))
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
        .filter(|pid| is_running(*pid));
    from_file.or_else(|| listening_pid(port?))
}

/// The pid of the Kafka broker (`dev/.state/kafka/kafka.pid`, or the first broker's port).
pub fn kafka_broker_pid(repo_root: &Path, brokers: &str) -> Option<u32> {
    let port = brokers
        .split(',')
        .next()
        .and_then(|b| b.rsplit(':').next()?.parse().ok());
    server_pid(repo_root, "kafka/kafka.pid", port)
}

/// The pid of the ClickHouse server (`dev/.state/clickhouse/clickhouse.pid`, or the port of
/// `url`).
pub fn clickhouse_server_pid(repo_root: &Path, url: &str) -> Option<u32> {
    server_pid(repo_root, "clickhouse/clickhouse.pid", url_port(url))
}

/// The port of `scheme://[user@]host:port/...`.
fn url_port(url: &str) -> Option<u16> {
    let authority = url.split("://").nth(1)?.split('/').next()?;
    let address = authority.rsplit('@').next()?;
    address.rsplit(':').next()?.parse().ok()
}

/// The process listening on the port of `url` (`scheme://[user@]host:port/...`).
pub fn listening_pid_of_url(url: &str) -> Option<u32> {
    listening_pid(url_port(url)?)
}

/// The process with a TCP socket listening on `port`, found through the socket's inode.
pub fn listening_pid(port: u16) -> Option<u32> {
    let inode = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .find_map(|table| {
            let text = std::fs::read_to_string(table).ok()?;
            text.lines().skip(1).find_map(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                let local_port = cols.get(1)?.rsplit(':').next()?;
                let listening = cols.get(3) == Some(&"0A");
                (listening && u16::from_str_radix(local_port, 16).ok()? == port)
                    .then(|| cols.get(9).map(|s| (*s).to_owned()))
                    .flatten()
            })
        })?;
    let wanted = format!("socket:[{inode}]");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let fds = std::fs::read_dir(entry.path().join("fd")).ok()?;
            fds.flatten()
                .any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == wanted.as_str())
                })
                .then_some(pid)
        })
}

/// A server of the local stack (`dev/up`) whose CPU a benchmark accounts.
#[derive(Debug, Clone, Copy)]
pub enum Server {
    KafkaBroker,
    ClickHouse,
    /// The postmaster (its backends are its children).
    Postgres,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::KafkaBroker => "kafka broker",
            Server::ClickHouse => "clickhouse server",
            Server::Postgres => "postgresql server",
        }
    }
}

/// The pid of each of `servers` on the local stack, in that order; says on stderr which
/// were not found (their CPU is then not accounted).
pub fn stack_pids<const N: usize>(servers: [Server; N]) -> [Option<u32>; N] {
    let stack = meterline_tests::Stack::get();
    let root = meterline_tests::stack::repo_root();
    servers.map(|server| {
        let pid = match server {
            Server::KafkaBroker => kafka_broker_pid(&root, &stack.kafka_brokers),
            Server::ClickHouse => clickhouse_server_pid(&root, &stack.clickhouse_url),
            Server::Postgres => listening_pid_of_url(&stack.database_url),
        };
        if pid.is_none() {
            eprintln!(
                "the {}'s pid was not found: its cpu is not accounted",
                server.name()
            );
        }
        pid
    })
}

/// Resident memory of a process, from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Memory {
    /// `VmRSS`: resident now.
    pub rss_kib: u64,
    /// `VmHWM`: the most it was ever resident (the kernel's high-water mark), so a peak
    /// between two samples is not missed.
    pub peak_kib: u64,
}

pub fn memory(pid: u32) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_status(&text).with_context(|| format!("no VmRSS and VmHWM in {path}"))
}

fn parse_status(text: &str) -> Option<Memory> {
    let kib = |key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    Some(Memory {
        rss_kib: kib("VmRSS:")?,
        peak_kib: kib("VmHWM:")?,
    })
}

/// The machine a run happened on.
#[derive(Debug, Clone)]
pub struct Machine {
    pub cores: usize,
    pub model: String,
    pub memory_gib: f64,
    /// The 1-minute load average when the run started.
    pub load_at_start: f64,
}

impl Machine {
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, model)| model.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let memory_kib: f64 = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        Machine {
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            model,
            memory_gib: memory_kib / (1024.0 * 1024.0),
            load_at_start: load_average(),
        }
    }
}

/// The 1-minute load average.
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// CPU times of `root` and of its children (the backends of a postmaster), by pid.
fn process_tree_cpu(root: u32) -> HashMap<u32, CpuTimes> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let parent = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|text| stat_fields(&text)?.get(1)?.parse::<u32>().ok());
        if pid == root || parent == Some(root) {
            if let Ok(cpu) = cpu_times(pid) {
                out.insert(pid, cpu);
            }
        }
    }
    out
}

/// CPU each process of a tree used between two [`process_tree_cpu`] readings; a process
/// that started in between used all of its CPU in the interval.
fn tree_since(
    now: &HashMap<u32, CpuTimes>,
    was: &HashMap<u32, CpuTimes>,
) -> HashMap<u32, CpuTimes> {
    now.iter()
        .map(|(pid, cpu)| (*pid, cpu.since(was.get(pid).copied().unwrap_or_default())))
        .collect()
}

/// A process whose CPU a phase accounts.
#[derive(Debug, Clone, Copy)]
enum Watched {
    /// One process.
    Process(u32),
    /// A process and its children: a postmaster and its backends.
    Tree(u32),
}

/// The processes a phase accounts, each under the name its report gives it, in the order
/// the report lists them. A process whose pid is not known (`None`) is left out of every
/// reading.
#[derive(Debug, Clone, Default)]
pub struct Watchlist(Vec<(&'static str, Option<Watched>)>);

impl Watchlist {
    pub fn new() -> Self {
        Self::default()
    }

    /// One process (all its threads).
    pub fn process(mut self, name: &'static str, pid: Option<u32>) -> Self {
        self.0.push((name, pid.map(Watched::Process)));
        self
    }

    /// A process and its children: a postmaster and its backends.
    pub fn tree(mut self, name: &'static str, root: Option<u32>) -> Self {
        self.0.push((name, root.map(Watched::Tree)));
        self
    }

    /// This process: the benchmark's own load generator.
    pub fn this_process(self, name: &'static str) -> Self {
        self.process(name, Some(std::process::id()))
    }

    /// The same list with the process `name` now known as `pid` (a subject spawned after the
    /// list was made).
    pub fn with_pid(&self, name: &str, pid: u32) -> Self {
        let mut list = self.clone();
        for (n, watched) in &mut list.0 {
            if *n == name {
                *watched = Some(Watched::Process(pid));
            }
        }
        list
    }

    /// Reads every known process, in the list's order.
    pub fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let mut readings = Vec::new();
        for (name, process) in &self.0 {
            let reading = match process {
                None => continue,
                Some(Watched::Process(pid)) => Reading::Process(cpu_times(*pid)?),
                Some(Watched::Tree(root)) => Reading::Tree(process_tree_cpu(*root)),
            };
            readings.push((*name, reading));
        }
        Ok(Snapshot { readings })
    }

    /// Runs `phase` between two readings: what it gave, and what each process used meanwhile.
    pub async fn during<T>(
        &self,
        phase: impl Future<Output = anyhow::Result<T>>,
    ) -> anyhow::Result<(T, Snapshot)> {
        let before = self.snapshot()?;
        let outcome = phase.await?;
        Ok((outcome, self.snapshot()?.since(&before)))
    }
}

#[derive(Debug, Clone)]
enum Reading {
    Process(CpuTimes),
    Tree(HashMap<u32, CpuTimes>),
}

impl Reading {
    fn total(&self) -> CpuTimes {
        match self {
            Reading::Process(cpu) => *cpu,
            Reading::Tree(tree) => tree.values().fold(CpuTimes::default(), |sum, c| CpuTimes {
                user: sum.user + c.user,
                system: sum.system + c.system,
            }),
        }
    }
}

/// CPU times of named processes at one instant ([`Watchlist::snapshot`]), or (after
/// [`Snapshot::since`]) used between two instants.
#[derive(Debug, Clone)]
pub struct Snapshot {
    readings: Vec<(&'static str, Reading)>,
}

impl Snapshot {
    /// What each process used since `before`; a process not read then is left out.
    pub fn since(&self, before: &Snapshot) -> Snapshot {
        let readings = self
            .readings
            .iter()
            .filter_map(|(name, now)| {
                let (_, was) = before.readings.iter().find(|(n, _)| n == name)?;
                let used = match (now, was) {
                    (Reading::Process(now), Reading::Process(was)) => {
                        Reading::Process(now.since(*was))
                    }
                    (Reading::Tree(now), Reading::Tree(was)) => Reading::Tree(tree_since(now, was)),
                    _ => return None,
                };
                Some((*name, used))
            })
            .collect();
        Snapshot { readings }
    }

    /// Each process's CPU, a tree's summed, for the report.
    pub fn components(&self) -> Vec<ComponentCpu> {
        self.readings
            .iter()
            .map(|(name, reading)| ComponentCpu::new(name, reading.total()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        let line = "42 (my (odd) name) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0";
        let cpu = parse_stat(line, 100.0).unwrap();
        assert_eq!(
            cpu,
            CpuTimes {
                user: 2.5,
                system: 0.75
            }
        );
        assert_eq!(stat_fields(line).unwrap()[1], "1", "the parent pid");
    }

    #[test]
    fn status_gives_resident_and_peak_memory() {
        let status =
            "Name:\tingest\nVmPeak:\t  900000 kB\nVmHWM:\t   51200 kB\nVmRSS:\t   40960 kB\n";
        assert_eq!(
            parse_status(status),
            Some(Memory {
                rss_kib: 40960,
                peak_kib: 51200
            })
        );
        assert_eq!(parse_status("Name:\tzombie\n"), None);
        assert!(memory(std::process::id()).is_ok_and(|m| m.peak_kib >= m.rss_kib));
    }

    #[test]
    fn our_own_process_has_cpu_times() {
        assert!(cpu_times(std::process::id()).is_ok());
        assert!(is_running(std::process::id()));
    }

    #[test]
    fn ports_are_read_from_urls() {
        assert_eq!(url_port("postgres://u:p@127.0.0.1:5433/db"), Some(5433));
        assert_eq!(url_port("http://localhost:8123"), Some(8123));
        assert_eq!(url_port("localhost"), None);
    }

    #[test]
    fn a_watchlist_reads_its_known_processes_in_order() {
        let list = Watchlist::new()
            .process("subject", None)
            .this_process("meterline-bench");
        let names = |s: &Snapshot| s.components().iter().map(|c| c.name).collect::<Vec<_>>();
        assert_eq!(names(&list.snapshot().unwrap()), ["meterline-bench"]);
        let list = list.with_pid("subject", std::process::id());
        let before = list.snapshot().unwrap();
        assert_eq!(
            names(&list.snapshot().unwrap().since(&before)),
            ["subject", "meterline-bench"]
        );
    }
}
