//! The ingest benchmark's result: the terminal block and the `ingest` section of
//! `docs/benchmarks.md`, judged on the median round's ratio to the raw producer.

use std::fmt::Write as _;
use std::time::Duration;

use crate::procstat::{ComponentCpu, Machine};
use crate::profile::Profile;
use crate::report::{
    cpu_cell, date_text, find_cpu, median_by_ratio, ms, profile_markdown, profile_text,
    rounds_text, thousands, verdict, Latency, RoundRates,
};

/// The goals the ingest benchmark is held to.
pub const GOAL_RATIO: f64 = 0.5;
pub const GOAL_EVENTS_PER_SECOND: f64 = 50_000.0;

pub struct IngestReport {
    pub machine: Machine,
    pub date: time::OffsetDateTime,
    pub load_before_baseline: f64,
    pub load_before_ingest: f64,
    /// The rounds before the last, whose numbers the rest of the report details.
    pub earlier_rounds: Vec<RoundRates>,
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
        date_text(self.date)
    }

    /// Every round, the last (detailed) one included, in the order they ran.
    pub fn rounds(&self) -> Vec<RoundRates> {
        let mut rounds = self.earlier_rounds.clone();
        rounds.push(RoundRates {
            load_before_baseline: self.load_before_baseline,
            baseline_rate: self.baseline_rate(),
            rate: self.ingest_rate(),
        });
        rounds
    }

    fn goals(&self) -> [(String, String, &'static str); 2] {
        let median = median_by_ratio(self.rounds());
        let rounds = self.rounds().len();
        [
            (
                format!("ingest >= {GOAL_RATIO}x the raw producer"),
                format!("{:.2}x (median of {rounds} rounds)", median.ratio()),
                verdict(median.ratio() >= GOAL_RATIO),
            ),
            (
                format!(
                    "ingest >= {} events/s on {} cores",
                    thousands(GOAL_EVENTS_PER_SECOND),
                    self.machine.cores
                ),
                format!("{} events/s (the median round)", thousands(median.rate)),
                verdict(median.rate >= GOAL_EVENTS_PER_SECOND),
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
            "rounds       ratio (ingest / baseline events/s) of each round, the last above: {}; median {:.2}",
            rounds_text(&self.rounds()),
            median_by_ratio(self.rounds()).ratio()
        );
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
                profile_text(&mut s, p);
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
        let _ = writeln!(
            s,
            "| ratio ingest / baseline | **{:.2}** in this round |",
            self.ratio()
        );
        let _ = writeln!(
            s,
            "| every round: ratio (ingest / baseline events/s) | {}; **median {:.2}**. Each round is the baseline then a fresh ingest on fresh namespaces; the rows above and below detail the last one |",
            rounds_text(&self.rounds()),
            median_by_ratio(self.rounds()).ratio()
        );
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
        for name in names {
            let base = find_cpu(&self.baseline_cpu, name);
            let ing = find_cpu(&self.ingest_cpu, name);
            if base.is_none() && ing.is_none() {
                continue;
            }
            let per = ing
                .map(|c| format!("{:.2} s", c.total() * 100_000.0 / self.events as f64))
                .unwrap_or_else(|| "-".to_owned());
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {per} |",
                cpu_cell(base),
                cpu_cell(ing)
            );
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
                profile_markdown(&mut s, p);
            }
            Err(reason) => {
                let _ = writeln!(s, "\nProfile: unavailable ({reason}).");
            }
        }
        s
    }
}
