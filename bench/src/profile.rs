//! A CPU profile of one process with `perf record`, summarized as its top symbols and as the
//! share of each component (serde_json, librdkafka, hyper, lz4, the kernel...).
//!
//! Sampling uses the `cpu-clock` software event: it works in virtual machines that expose no
//! hardware counters (where `perf stat -e instructions` says `<not supported>`).
//!
//! Rule kept: a benchmark profiles a separate pass after its measured phases
//! ([`separate_pass`]), so that what it measured ran without a profiler; a report without a
//! profile says why.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// A running `perf record -g -p <pid>`.
pub struct Recording {
    child: std::process::Child,
    data: PathBuf,
}

/// The profile of a benchmark's separate pass over `events` more events (its
/// `--profile-events`), or why there is none: none asked for, `perf record` not working here,
/// or `pass` failing. The reason is said on stderr too.
pub async fn separate_pass<Fut>(
    events: usize,
    pass: impl FnOnce() -> Fut,
) -> Result<Profile, String>
where
    Fut: Future<Output = Result<Profile, String>>,
{
    let profile = if events == 0 {
        Err("disabled (--profile-events 0)".to_owned())
    } else if let Some(reason) = unavailable_reason(&std::env::temp_dir()) {
        Err(reason)
    } else {
        pass().await
    };
    if let Err(reason) = &profile {
        eprintln!("profile: {reason}");
    }
    profile
}

/// Whether `perf record` works here; the reason when it does not.
fn unavailable_reason(scratch: &Path) -> Option<String> {
    let data = scratch.join("perf-probe.data");
    let outcome = Command::new("perf")
        .args(["record", "-q", "-e", "cpu-clock", "-o"])
        .arg(&data)
        .args(["--", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output();
    let _ = std::fs::remove_file(&data);
    match outcome {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "`perf record` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("`perf` could not be run: {e}")),
    }
}

impl Recording {
    pub fn start(pid: u32, data: PathBuf) -> anyhow::Result<Recording> {
        let child = Command::new("perf")
            .args(["record", "-q", "-g", "-e", "cpu-clock", "-F", "999", "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf record")?;
        Ok(Recording { child, data })
    }

    /// Stops the recording (SIGINT, as perf expects) and summarizes it.
    pub fn finish(mut self) -> anyhow::Result<Profile> {
        // SAFETY: kill(2) on the pid of our own child, which we have not reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGINT);
        }
        self.child.wait().context("waiting for perf record")?;
        let out = Command::new("perf")
            .args(["report", "--stdio", "--no-children", "-n", "-g", "none"])
            .args(["--sort", "dso,sym", "-i"])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()
            .context("running perf report")?;
        if !out.status.success() {
            bail!("perf report failed on {}", self.data.display());
        }
        let profile = Profile::parse(&String::from_utf8_lossy(&out.stdout));
        if profile.samples == 0 {
            bail!("perf recorded no samples in {}", self.data.display());
        }
        Ok(profile)
    }

    /// Stops the recording once the pass it watched ended with `pass`, and summarizes it; the
    /// pass failing wins over the recording's outcome (a profile of a failed pass is no result).
    pub fn finish_after<T>(self, pass: anyhow::Result<T>) -> Result<Profile, String> {
        let profile = self.finish().map_err(|e| format!("{e:#}"));
        pass.map_err(|e| format!("the profiled pass failed: {e:#}"))?;
        profile
    }
}

/// One line of the report: share of samples, binary or library, symbol.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub percent: f64,
    pub dso: String,
    pub symbol: String,
}

#[derive(Debug, Clone, Default)]
pub struct Profile {
    pub samples: u64,
    /// Every symbol, largest first.
    pub entries: Vec<Entry>,
}

impl Profile {
    /// Parses `perf report -n --sort dso,sym` output: percent, samples, object, `[.]` or
    /// `[k]`, symbol.
    fn parse(report: &str) -> Profile {
        let mut samples = 0;
        let mut entries: Vec<Entry> = report
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .filter_map(|line| {
                let mut parts = line.split_whitespace();
                let percent = parts.next()?.strip_suffix('%')?.parse().ok()?;
                let count: u64 = parts.next()?.parse().ok()?;
                let dso = parts.next()?.to_owned();
                let _kind = parts.next()?;
                let symbol = parts.collect::<Vec<_>>().join(" ");
                samples += count;
                Some(Entry {
                    percent,
                    dso,
                    symbol,
                })
            })
            .collect();
        entries.sort_by(|a, b| b.percent.total_cmp(&a.percent));
        Profile { samples, entries }
    }

    /// Share of samples per component, largest first.
    pub fn components(&self) -> Vec<(&'static str, f64)> {
        let mut shares: Vec<(&'static str, f64)> = Vec::new();
        for entry in &self.entries {
            let name = component(entry);
            match shares.iter_mut().find(|(n, _)| *n == name) {
                Some((_, share)) => *share += entry.percent,
                None => shares.push((name, entry.percent)),
            }
        }
        shares.sort_by(|a, b| b.1.total_cmp(&a.1));
        shares
    }
}

/// Which part of the process a symbol belongs to. Order matters: the first rule that matches
/// wins (`malloc` called from serde_json is still allocation: self time is counted where it is
/// spent, not where it was asked for).
fn component(entry: &Entry) -> &'static str {
    let s = entry.symbol.as_str();
    let dso = entry.dso.as_str();
    let has = |needle: &str| s.contains(needle);
    if dso.contains("kernel") || (dso == "[unknown]" && s.starts_with("0xffff")) {
        "kernel (syscalls, TCP, scheduling)"
    } else if has("LZ4") || has("lz4") {
        "lz4 compression"
    } else if has("rd_kafka") || s.starts_with("rd_") || has("rdkafka") || dso.contains("libz") {
        "librdkafka / rdkafka (incl. crc32)"
    } else if has("futures_util") || has("futures_channel") || has("futures_core") {
        "per-event futures (join_all, oneshot channels)"
    } else if has("serde_json") || has("serde_core") || has("serde::") {
        "serde_json (parse and encode)"
    } else if has("indexmap") || has("hashbrown") || has("hash_one") || has("BTreeMap") {
        "property maps (indexmap, hashbrown)"
    } else if has("hyper") || has("h1::") || has("http::") || has("httparse") {
        "hyper / http"
    } else if has("axum") || has("tower") {
        "axum / tower"
    } else if has("tokio") {
        "tokio runtime"
    } else if has("meterline_schemas") || has("ingest::") || has("meterline_common") {
        "meterline (validation, ids, timestamps)"
    } else if has("time::") {
        "time (timestamp parse and format)"
    } else if has("core::fmt") || has("itoa") || has("pad_integral") {
        "formatting (core::fmt: keys, numbers)"
    } else if has("clone") {
        "cloning (String, Vec)"
    } else if has("malloc")
        || has("free")
        || has("realloc")
        || has("memmove")
        || has("memcpy")
        || has("memset")
        || has("unlink_chunk")
        || has("alloc::")
        || has("__rdl_")
        || has("__rust_")
    {
        "allocation and memcpy (glibc malloc)"
    } else if has("pthread") || has("futex") || has("__lll") {
        "locks and thread wakeups"
    } else if dso.contains("vdso") {
        "clock reads (vdso)"
    } else if dso.contains("libc") {
        "libc (other)"
    } else {
        "other"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "\
# Total Lost Samples: 0
#
# Samples: 12K of event 'cpu-clock:pppH'
# Event count (approx.): 3000000000
#
# Overhead  Shared Object      Symbol
# ........  .................  ..................
#
    20.50%          2050  ingest             [.] serde_json::de::Deserializer<R>::parse_str
    10.00%          1000  [kernel.kallsyms]  [k] tcp_sendmsg
     5.25%           525  ingest             [.] LZ4_compress_fast_extState
     4.00%           400  libc.so.6          [.] __memmove_avx_unaligned_erms
";

    #[test]
    fn report_lines_and_components() {
        let p = Profile::parse(REPORT);
        assert_eq!(p.samples, 3975);
        assert_eq!(p.entries.len(), 4);
        assert_eq!(
            p.entries[0].symbol,
            "serde_json::de::Deserializer<R>::parse_str"
        );
        let components = p.components();
        assert_eq!(components[0], ("serde_json (parse and encode)", 20.5));
        assert_eq!(components[1].0, "kernel (syscalls, TCP, scheduling)");
        assert_eq!(components[2].0, "lz4 compression");
        assert_eq!(components[3].0, "allocation and memcpy (glibc malloc)");
    }
}
