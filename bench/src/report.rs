//! The result of a run: a plain-text block for the terminal and a Markdown section for
//! `docs/benchmarks.md`, which replaces the text between `<!-- <name>:begin -->` and
//! `<!-- <name>:end -->` and nothing else.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::procstat::{CpuTimes, Machine};
use crate::profile::Profile;

/// The goals the ingest benchmark is held to.
pub const GOAL_RATIO: f64 = 0.5;
pub const GOAL_EVENTS_PER_SECOND: f64 = 50_000.0;

/// How many symbols of the profile are listed.
const TOP_SYMBOLS: usize = 12;

pub struct ComponentCpu {
    pub name: &'static str,
    pub cpu: CpuTimes,
}

impl ComponentCpu {
    pub fn new(name: &'static str, cpu: CpuTimes) -> Self {
        Self { name, cpu }
    }
}

/// Latencies of the bulk requests.
pub struct Latency {
    pub count: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Latency {
    pub fn of(mut samples: Vec<Duration>) -> Latency {
        samples.sort_unstable();
        // Nearest rank: the smallest sample with at least p of all samples at or below it.
        let rank = |p: f64| {
            let index = ((p * samples.len() as f64).ceil() as usize).saturating_sub(1);
            samples.get(index).copied().unwrap_or_default()
        };
        Latency {
            count: samples.len(),
            p50: rank(0.50),
            p99: rank(0.99),
            max: samples.last().copied().unwrap_or_default(),
        }
    }
}

pub struct IngestReport {
    pub machine: Machine,
    pub date: time::OffsetDateTime,
    pub load_before_baseline: f64,
    pub load_before_ingest: f64,
    pub events: usize,
    pub batch: usize,
    pub concurrency: usize,
    pub customers: usize,
    pub partitions: i32,
    pub body_bytes: usize,
    pub baseline_elapsed: Duration,
    pub ingest_elapsed: Duration,
    pub latency: Latency,
    pub baseline_cpu: Vec<ComponentCpu>,
    pub ingest_cpu: Vec<ComponentCpu>,
    /// The profile of the profiled pass, or why there is none.
    pub profile: Result<Profile, String>,
    pub profile_events: usize,
}

impl IngestReport {
    pub fn baseline_rate(&self) -> f64 {
        self.events as f64 / self.baseline_elapsed.as_secs_f64()
    }

    pub fn ingest_rate(&self) -> f64 {
        self.events as f64 / self.ingest_elapsed.as_secs_f64()
    }

    pub fn ratio(&self) -> f64 {
        self.ingest_rate() / self.baseline_rate()
    }

    fn date_text(&self) -> String {
        meterline_schemas::Timestamp::new(self.date)
            .map(|t| t.to_string())
            .unwrap_or_default()
    }

    fn goals(&self) -> [(String, String, &'static str); 2] {
        let verdict = |ok: bool| if ok { "PASS" } else { "MISS" };
        [
            (
                format!("ingest >= {GOAL_RATIO}x the raw producer"),
                format!("{:.2}x", self.ratio()),
                verdict(self.ratio() >= GOAL_RATIO),
            ),
            (
                format!(
                    "ingest >= {} events/s on {} cores",
                    thousands(GOAL_EVENTS_PER_SECOND),
                    self.machine.cores
                ),
                format!("{} events/s", thousands(self.ingest_rate())),
                verdict(self.ingest_rate() >= GOAL_EVENTS_PER_SECOND),
            ),
        ]
    }

    /// The block printed at the end of a run.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(s, "== ingest benchmark ({}) ==", self.date_text());
        let _ = writeln!(
            s,
            "machine      {} cores, {}, {:.1} GiB; load {:.2} before baseline, {:.2} before ingest",
            m.cores, m.model, m.memory_gib, self.load_before_baseline, self.load_before_ingest
        );
        let _ = writeln!(s, "parameters   {}", self.parameters());
        let _ = writeln!(
            s,
            "baseline     {:>10} events/s  ({:.2}s, raw rdkafka producer)",
            thousands(self.baseline_rate()),
            self.baseline_elapsed.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "ingest       {:>10} events/s  ({:.2}s, HTTP in -> Kafka acked)",
            thousands(self.ingest_rate()),
            self.ingest_elapsed.as_secs_f64()
        );
        let _ = writeln!(s, "ratio        {:.2}", self.ratio());
        let _ = writeln!(
            s,
            "latency      p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms over {} bulk requests",
            ms(self.latency.p50),
            ms(self.latency.p99),
            ms(self.latency.max),
            self.latency.count
        );
        for (phase, cpus, elapsed) in [
            ("baseline", &self.baseline_cpu, self.baseline_elapsed),
            ("ingest", &self.ingest_cpu, self.ingest_elapsed),
        ] {
            let _ = writeln!(
                s,
                "cpu {phase:<8} {:.1} core-seconds available ({:.2}s x {} cores)",
                elapsed.as_secs_f64() * m.cores as f64,
                elapsed.as_secs_f64(),
                m.cores
            );
            for c in cpus.iter() {
                let _ = writeln!(
                    s,
                    "               {:<34} {:>6.2}s (user {:.2}, system {:.2})",
                    c.name,
                    c.cpu.total(),
                    c.cpu.user,
                    c.cpu.system
                );
            }
        }
        match &self.profile {
            Ok(p) => {
                let _ = writeln!(
                    s,
                    "profile      ingest, {} samples over {} re-sent events:",
                    p.samples, self.profile_events
                );
                for (name, share) in p.components() {
                    let _ = writeln!(s, "               {share:>5.1}%  {name}");
                }
                let _ = writeln!(s, "             top symbols:");
                for e in p.entries.iter().take(TOP_SYMBOLS) {
                    let _ = writeln!(
                        s,
                        "               {:>5.2}%  {}  {}",
                        e.percent,
                        e.dso,
                        shorten(&e.symbol)
                    );
                }
            }
            Err(reason) => {
                let _ = writeln!(s, "profile      unavailable: {reason}");
            }
        }
        for (goal, measured, verdict) in self.goals() {
            let _ = writeln!(s, "goal         {verdict}  {goal}: {measured}");
        }
        s
    }

    fn parameters(&self) -> String {
        format!(
            "{} events, bulk requests of {} events, {} concurrent clients and baseline tasks, \
             {} customers, {} partitions, {:.1} MiB of request bodies",
            thousands(self.events as f64),
            thousands(self.batch as f64),
            self.concurrency,
            thousands(self.customers as f64),
            self.partitions,
            self.body_bytes as f64 / (1 << 20) as f64
        )
    }

    /// The generated Markdown of the ingest section.
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Generated by `meterline-bench ingest --write-docs` on {}; do not edit by hand.\n",
            self.date_text()
        );
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(
            s,
            "| machine | {} cores, {}, {:.1} GiB memory; 1-minute load {:.2} before the baseline, {:.2} before ingest |",
            m.cores, m.model, m.memory_gib, self.load_before_baseline, self.load_before_ingest
        );
        let _ = writeln!(s, "| date | {} |", self.date_text());
        let _ = writeln!(s, "| parameters | {} |", self.parameters());
        let _ = writeln!(
            s,
            "| baseline: raw producer | **{} events/s** ({:.2} s) |",
            thousands(self.baseline_rate()),
            self.baseline_elapsed.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "| ingest: HTTP in -> Kafka acked | **{} events/s** ({:.2} s) |",
            thousands(self.ingest_rate()),
            self.ingest_elapsed.as_secs_f64()
        );
        let _ = writeln!(s, "| ratio ingest / baseline | **{:.2}** |", self.ratio());
        let _ = writeln!(
            s,
            "| bulk request latency | p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} requests) |",
            ms(self.latency.p50),
            ms(self.latency.p99),
            ms(self.latency.max),
            self.latency.count
        );

        let _ = writeln!(s, "\nGoals:\n\n| goal | measured | result |\n|---|---|---|");
        for (goal, measured, verdict) in self.goals() {
            let _ = writeln!(s, "| {goal} | {measured} | **{verdict}** |");
        }

        let _ = writeln!(
            s,
            "\nCPU seconds (user + system) used during each phase, from `/proc/<pid>/stat`:\n\n\
             | process | baseline phase | ingest phase | ingest phase, per 100,000 events |\n\
             |---|---|---|---|"
        );
        let names = ["ingest", "kafka broker", "meterline-bench (load generator)"];
        let find =
            |cpus: &[ComponentCpu], name: &str| cpus.iter().find(|c| c.name == name).map(|c| c.cpu);
        let cell = |cpu: Option<CpuTimes>| match cpu {
            Some(c) => format!(
                "{:.2} s (user {:.2}, system {:.2})",
                c.total(),
                c.user,
                c.system
            ),
            None => "-".to_owned(),
        };
        for name in names {
            let base = find(&self.baseline_cpu, name);
            let ing = find(&self.ingest_cpu, name);
            if base.is_none() && ing.is_none() {
                continue;
            }
            let per = ing
                .map(|c| format!("{:.2} s", c.total() * 100_000.0 / self.events as f64))
                .unwrap_or_else(|| "-".to_owned());
            let _ = writeln!(s, "| {name} | {} | {} | {per} |", cell(base), cell(ing));
        }
        let _ = writeln!(
            s,
            "| available (wall time x {} cores) | {:.2} s | {:.2} s | |",
            m.cores,
            self.baseline_elapsed.as_secs_f64() * m.cores as f64,
            self.ingest_elapsed.as_secs_f64() * m.cores as f64
        );

        match &self.profile {
            Ok(p) => {
                let _ = writeln!(
                    s,
                    "\nProfile of ingest (`perf record -g -e cpu-clock`, {} samples) during a \
                     separate pass re-sending {} events, so the measured pass above ran without \
                     a profiler. Share of samples by component:\n\n\
                     | component | share |\n|---|---|",
                    p.samples,
                    thousands(self.profile_events as f64)
                );
                for (name, share) in p.components() {
                    let _ = writeln!(s, "| {name} | {share:.1}% |");
                }
                let _ = writeln!(
                    s,
                    "\nTop symbols (self time):\n\n| share | object | symbol |\n|---|---|---|"
                );
                for e in p.entries.iter().take(TOP_SYMBOLS) {
                    let _ = writeln!(
                        s,
                        "| {:.2}% | {} | `{}` |",
                        e.percent,
                        e.dso,
                        shorten(&e.symbol).replace('|', "\\|").replace('`', "'")
                    );
                }
            }
            Err(reason) => {
                let _ = writeln!(s, "\nProfile: unavailable ({reason}).");
            }
        }
        s
    }
}

/// Replaces what lies between `<!-- name:begin -->` and `<!-- name:end -->` in `path`.
pub fn replace_section(path: &Path, name: &str, content: &str) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let updated =
        replaced(&text, name, content).with_context(|| format!("updating {}", path.display()))?;
    std::fs::write(path, updated).with_context(|| format!("writing {}", path.display()))
}

fn replaced(text: &str, name: &str, content: &str) -> anyhow::Result<String> {
    let begin = format!("<!-- {name}:begin -->");
    let end = format!("<!-- {name}:end -->");
    let (Some(b), Some(e)) = (text.find(&begin), text.find(&end)) else {
        bail!("markers {begin} and {end} not found");
    };
    if e < b {
        bail!("{end} comes before {begin}");
    }
    let head = &text[..b + begin.len()];
    let tail = &text[e..];
    Ok(format!("{head}\n{}\n{tail}", content.trim_end()))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `123456.7` as `123,457`.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A symbol without its generic arguments' full paths, for a readable table.
fn shorten(symbol: &str) -> String {
    const MAX: usize = 110;
    if symbol.chars().count() <= MAX {
        return symbol.to_owned();
    }
    let cut: String = symbol.chars().take(MAX).collect();
    format!("{cut}...")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_marked_section_is_replaced() {
        let doc = "# B\n\nintro\n\n## Ingest\n\n<!-- ingest:begin -->\nold\n<!-- ingest:end -->\n\nrest\n";
        let out = replaced(doc, "ingest", "new\n").unwrap();
        assert_eq!(
            out,
            "# B\n\nintro\n\n## Ingest\n\n<!-- ingest:begin -->\nnew\n<!-- ingest:end -->\n\nrest\n"
        );
        assert!(replaced("no markers", "ingest", "x").is_err());
    }

    #[test]
    fn latency_percentiles_use_the_nearest_rank() {
        let samples = (1..=100).map(Duration::from_millis).collect();
        let l = Latency::of(samples);
        assert_eq!(l.p50, Duration::from_millis(50));
        assert_eq!(l.p99, Duration::from_millis(99));
        assert_eq!(l.max, Duration::from_millis(100));
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(50_000.0), "50,000");
    }
}
