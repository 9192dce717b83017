//! The ingest benchmark's result: the terminal block and the `ingest` section of
//! `docs/benchmarks.md`, judged on the median round's ratio to the raw producer.

use std::fmt::Write as _;

use crate::procstat::Machine;
use crate::profile::Profile;
use crate::report::{
    goals_markdown, goals_text, profile_section, ratio_goals, ratio_lines, ratio_rows, thousands,
    two_phase_cpu_table, Goal, Head, Latency, Phase, Report,
};
use crate::rounds::RoundRates;

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
    pub baseline: Phase,
    pub ingest: Phase,
    pub latency: Latency,
    /// The profile of the profiled pass, or why there is none.
    pub profile: Result<Profile, String>,
    pub profile_events: usize,
}

impl IngestReport {
    /// What opens the terminal block and the docs section.
    fn head(&self) -> Head<'_> {
        Head::new("ingest", &self.machine, self.date)
            .before_baseline(self.load_before_baseline)
            .load(self.load_before_ingest, "before ingest", "before ingest")
    }

    pub fn ratio(&self) -> f64 {
        self.ingest.rate(self.events) / self.baseline.rate(self.events)
    }

    /// Every round, the last (detailed) one included, in the order they ran.
    pub fn rounds(&self) -> Vec<RoundRates> {
        RoundRates::with_last(
            &self.earlier_rounds,
            self.load_before_baseline,
            self.baseline.rate(self.events),
            self.ingest.rate(self.events),
        )
    }

    fn goals(&self) -> [Goal; 2] {
        ratio_goals(
            self.rounds(),
            "ingest",
            "the raw producer",
            GOAL_RATIO,
            GOAL_EVENTS_PER_SECOND,
            self.machine.cores,
        )
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
}

impl Report for IngestReport {
    fn text(&self) -> String {
        let mut s = self.head().text();
        let m = &self.machine;
        let _ = writeln!(s, "parameters   {}", self.parameters());
        let _ = writeln!(
            s,
            "baseline     {:>10} events/s  ({:.2}s, raw rdkafka producer)",
            thousands(self.baseline.rate(self.events)),
            self.baseline.elapsed.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "ingest       {:>10} events/s  ({:.2}s, HTTP in -> Kafka acked)",
            thousands(self.ingest.rate(self.events)),
            self.ingest.elapsed.as_secs_f64()
        );
        ratio_lines(&mut s, "ingest", self.ratio(), self.rounds());
        let _ = writeln!(
            s,
            "latency      {} over {} bulk requests",
            self.latency.millis(0),
            self.latency.count
        );
        self.baseline.cpu_text(&mut s, "baseline", m.cores);
        self.ingest.cpu_text(&mut s, "ingest", m.cores);
        profile_section(&mut s, false, &self.profile, |p| {
            format!(
                "ingest, {} samples over {} re-sent events",
                p.samples, self.profile_events
            )
        });
        goals_text(&mut s, &self.goals());
        s
    }

    fn markdown(&self) -> String {
        let m = &self.machine;
        let mut s = self.head().markdown();
        let _ = writeln!(s, "| parameters | {} |", self.parameters());
        let _ = writeln!(
            s,
            "| baseline: raw producer | **{} events/s** ({:.2} s) |",
            thousands(self.baseline.rate(self.events)),
            self.baseline.elapsed.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "| ingest: HTTP in -> Kafka acked | **{} events/s** ({:.2} s) |",
            thousands(self.ingest.rate(self.events)),
            self.ingest.elapsed.as_secs_f64()
        );
        ratio_rows(
            &mut s,
            "ingest",
            self.ratio(),
            self.rounds(),
            "Each round is the baseline then a fresh ingest on fresh namespaces",
        );
        let _ = writeln!(
            s,
            "| bulk request latency | {} ({} requests) |",
            self.latency.millis(0),
            self.latency.count
        );
        goals_markdown(&mut s, &self.goals());

        two_phase_cpu_table(
            &mut s,
            "ingest",
            &["ingest", "kafka broker", "meterline-bench (load generator)"],
            [&self.baseline, &self.ingest],
            (100_000.0, self.events as f64, "events"),
            m.cores,
        );
        profile_section(&mut s, true, &self.profile, |p| {
            format!(
                "Profile of ingest (`perf record -g -e cpu-clock`, {} samples) during a separate \
                 pass re-sending {} events, so the measured pass above ran without a profiler",
                p.samples,
                thousands(self.profile_events as f64)
            )
        });
        s
    }
}
