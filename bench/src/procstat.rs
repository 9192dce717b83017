//! What `/proc` tells about processes and the machine: CPU seconds of a process (all its
//! threads), the pid of the local Kafka broker, and the machine a run happened on.

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

/// Reads `utime` and `stime` (fields 14 and 15) of `/proc/<pid>/stat`.
pub fn cpu_times(pid: u32) -> anyhow::Result<CpuTimes> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_stat(&text, clock_ticks()).with_context(|| format!("parsing {path}"))
}

fn parse_stat(text: &str, ticks_per_second: f64) -> anyhow::Result<CpuTimes> {
    // The command name (field 2) is in parentheses and may contain spaces or parentheses:
    // fields are counted after the last `)`, where field 3 (the state) comes first.
    let rest = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .context("no `)` after the command name")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
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

/// The pid of the Kafka broker: from `dev/.state/kafka/kafka.pid` when that process runs,
/// otherwise the process listening on the first broker's port (a stack started from another
/// checkout of the repository has its pid file there, not here).
pub fn kafka_broker_pid(repo_root: &Path, brokers: &str) -> Option<u32> {
    let from_file = std::fs::read_to_string(repo_root.join("dev/.state/kafka/kafka.pid"))
        .ok()
        .and_then(|text| text.trim().parse::<u32>().ok())
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists());
    from_file.or_else(|| {
        let port = brokers
            .split(',')
            .next()?
            .rsplit(':')
            .next()?
            .parse()
            .ok()?;
        listening_pid(port)
    })
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
/// The process listening on the port of `url` (`scheme://[user@]host:port/...`).
pub fn listening_pid_of_url(url: &str) -> Option<u32> {
    let authority = url.split("://").nth(1)?.split('/').next()?;
    let address = authority.rsplit('@').next()?;
    listening_pid(address.rsplit(':').next()?.parse().ok()?)
}

/// CPU times of `root` and of its children (the backends of a postmaster), by pid.
pub fn process_tree_cpu(root: u32) -> std::collections::HashMap<u32, CpuTimes> {
    let mut out = std::collections::HashMap::new();
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
            .and_then(|text| {
                // Field 4 (the parent pid), counted after the command name's last `)`.
                let rest = &text[text.rfind(')')? + 1..];
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            });
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
pub fn tree_since(
    now: &std::collections::HashMap<u32, CpuTimes>,
    was: &std::collections::HashMap<u32, CpuTimes>,
) -> std::collections::HashMap<u32, CpuTimes> {
    now.iter()
        .map(|(pid, cpu)| (*pid, cpu.since(was.get(pid).copied().unwrap_or_default())))
        .collect()
}

pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
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
    }
}

/// A process whose CPU a phase accounts.
#[derive(Debug, Clone, Copy)]
pub enum Watched {
    /// One process.
    Process(u32),
    /// A process and its children: a postmaster and its backends.
    Tree(u32),
}

#[derive(Debug, Clone)]
enum Reading {
    Process(CpuTimes),
    Tree(std::collections::HashMap<u32, CpuTimes>),
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

/// CPU times of named processes at one instant, or (after [`Snapshot::since`]) used between
/// two instants.
#[derive(Debug, Clone)]
pub struct Snapshot {
    readings: Vec<(&'static str, Reading)>,
}

impl Snapshot {
    /// Reads every process of `watched` whose pid was found (`None`: left out, its CPU is
    /// not accounted), in that order.
    pub fn take(watched: &[(&'static str, Option<Watched>)]) -> anyhow::Result<Snapshot> {
        let mut readings = Vec::new();
        for (name, process) in watched {
            let reading = match process {
                None => continue,
                Some(Watched::Process(pid)) => Reading::Process(cpu_times(*pid)?),
                Some(Watched::Tree(root)) => Reading::Tree(process_tree_cpu(*root)),
            };
            readings.push((*name, reading));
        }
        Ok(Snapshot { readings })
    }

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
    pub fn components(&self) -> Vec<crate::report::ComponentCpu> {
        self.readings
            .iter()
            .map(|(name, reading)| crate::report::ComponentCpu::new(name, reading.total()))
            .collect()
    }
}
