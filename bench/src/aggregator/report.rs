//! The aggregator benchmark's result: the terminal block and the `aggregator` section of
//! `docs/benchmarks.md`: the backlog's rate next to the direct insert (judged on the median
//! round), the backlog's publication and the live phase's publish lag.

use std::fmt::Write as _;
use std::time::Duration;

use super::{aggregator_rate, measured_events, ROWS_PER_EVENT};
use crate::procstat::Machine;
use crate::profile::Profile;
use crate::report::{
    cpu_table, goals_markdown, goals_text, profile_section, ratio_goals, ratio_lines, ratio_rows,
    thousands, Goal, Head, Latency, PerUnit, Phase, Report,
};
use crate::rounds::RoundRates;

/// The goals the aggregator benchmark is held to.
pub const AGGREGATOR_GOAL_RATIO: f64 = 0.5;
pub const AGGREGATOR_GOAL_EVENTS_PER_SECOND: f64 = 100_000.0;

/// The time a backlog's windows took to be published, once hours past due.
pub struct BacklogPublication {
    /// From the last row landing to no backlog window left dirty; `None` when that did not
    /// happen within the benchmark's patience.
    pub after_last_row: Option<Duration>,
}

/// The live phase: events of the present, 1-minute windows, totals read on `usage.windows`.
pub struct LiveReport {
    pub customers: usize,
    pub rate: usize,
    pub events: u64,
    /// How long events were sent.
    pub sending: Duration,
    /// (customer, meter, window) the events fed.
    pub windows: usize,
    /// Windows whose first revision was never read.
    pub missing: usize,
    /// Windows never read with their full event count.
    pub incomplete: usize,
    /// Windows published more than once (an event landed after the first publication).
    pub republished: usize,
    /// Read time of revision 1 - window end.
    pub first: Latency,
    /// Read time of the first total carrying every event sent for the window - window end.
    pub complete: Latency,
    /// The aggregator's `aggregator_window_publish_lag_seconds` over the phase: observations
    /// and the upper bounds of the buckets of p50 and p99.
    pub histogram: Option<(u64, f64, f64)>,
    /// The whole phase (sending, then reading the last totals) and the CPU used in it.
    pub phase: Phase,
}

pub struct AggregatorReport {
    pub machine: Machine,
    pub date: time::OffsetDateTime,
    pub load_before_baseline: f64,
    pub load_before_aggregator: f64,
    pub load_before_live: f64,
    /// The rounds before the last, whose numbers the rest of the report details.
    pub earlier_rounds: Vec<RoundRates>,
    pub events: usize,
    pub customers: usize,
    pub batch_events: usize,
    pub partitions: i32,
    /// `STRIPE_SYNC_GRACE_PERIOD_MINUTES` given to the aggregator (0 unless diagnosing).
    pub grace_minutes: u64,
    /// (customer, meter, hour) windows of the backlog.
    pub backlog_windows: usize,
    /// The direct insert of the backlog's rows.
    pub baseline: Phase,
    /// Rows already there when `count()` first showed any: excluded from the measured rate.
    pub first_rows: u64,
    /// The aggregator consuming the backlog, from the first rows landing to the last.
    pub consume: Phase,
    /// From spawning the aggregator to the first rows landing.
    pub startup: Duration,
    /// From spawning the aggregator to the last rows landing.
    pub from_spawn: Duration,
    /// `aggregator_clickhouse_insert_duration_seconds` sum and count after the backlog.
    pub insert_seconds: Option<f64>,
    pub inserts: Option<f64>,
    /// `aggregator_batch_windows_marked` sum and count after the backlog: the rows the
    /// marking wrote to PostgreSQL, and the batches.
    pub windows_marked: Option<f64>,
    pub marked_batches: Option<f64>,
    pub publication: BacklogPublication,
    /// `aggregator_windows_published_total` by reason at the end of the run.
    pub windows_published: Vec<(&'static str, u64)>,
    pub live: Option<LiveReport>,
    pub peak_rss_kib: Option<u64>,
    pub profile: Result<Profile, String>,
    pub profile_events: usize,
}

impl AggregatorReport {
    /// What opens the terminal block and the docs section.
    fn head(&self) -> Head<'_> {
        Head::new("aggregator", &self.machine, self.date)
            .before_baseline(self.load_before_baseline)
            .load(
                self.load_before_aggregator,
                "before aggregator",
                "before the aggregator",
            )
            .load(
                self.load_before_live,
                "before live",
                "before the live phase",
            )
    }

    pub fn rows(&self) -> usize {
        self.events * ROWS_PER_EVENT
    }

    pub fn baseline_rate(&self) -> f64 {
        self.baseline.rate(self.events)
    }

    /// Events/s from the first rows landing to the last, by the rule each round's rate
    /// follows (the module's `aggregator_rate`).
    pub fn aggregator_rate(&self) -> f64 {
        aggregator_rate(
            self.rows() as u64,
            self.first_rows,
            self.consume.elapsed,
            self.from_spawn,
        )
    }

    pub fn from_spawn_rate(&self) -> f64 {
        self.events as f64 / self.from_spawn.as_secs_f64()
    }

    pub fn ratio(&self) -> f64 {
        self.aggregator_rate() / self.baseline_rate()
    }

    /// Every round, the last (detailed) one included, in the order they ran.
    pub fn rounds(&self) -> Vec<RoundRates> {
        RoundRates::with_last(
            &self.earlier_rounds,
            self.load_before_baseline,
            self.baseline_rate(),
            self.aggregator_rate(),
        )
    }

    /// Judged on the round of median ratio (the lower middle one of an even count).
    fn goals(&self) -> [Goal; 2] {
        ratio_goals(
            self.rounds(),
            "aggregator",
            "the direct insert",
            AGGREGATOR_GOAL_RATIO,
            AGGREGATOR_GOAL_EVENTS_PER_SECOND,
            self.machine.cores,
        )
    }

    fn parameters(&self) -> String {
        format!(
            "{} backlog events ({} rows: a COUNT and a SUM meter on one event name), {} \
             customers, 3 hourly windows ending 1 to 3 hours before the current hour ({} windows), {} partitions, \
             aggregator defaults (batches of up to {} events), grace {} min",
            thousands(self.events as f64),
            thousands(self.rows() as f64),
            thousands(self.customers as f64),
            thousands(self.backlog_windows as f64),
            self.partitions,
            thousands(self.batch_events as f64),
            self.grace_minutes,
        )
    }

    fn live_parameters(live: &LiveReport) -> String {
        format!(
            "{} customers of a tenant with 1-minute windows, {} events/s for {:.0} s \
             ({} events, {} windows)",
            thousands(live.customers as f64),
            thousands(live.rate as f64),
            live.sending.as_secs_f64(),
            thousands(live.events as f64),
            thousands(live.windows as f64)
        )
    }

    fn insert_text(&self) -> Option<String> {
        let (sum, count) = (self.insert_seconds?, self.inserts?);
        if count <= 0.0 {
            return None;
        }
        Some(format!(
            "{sum:.2} s in {count:.0} inserts (mean {:.0} ms), {:.0}% of the time from spawn",
            sum * 1000.0 / count,
            100.0 * sum / self.from_spawn.as_secs_f64()
        ))
    }

    fn marked_text(&self) -> Option<String> {
        let (sum, count) = (self.windows_marked?, self.marked_batches?);
        if count <= 0.0 {
            return None;
        }
        Some(format!(
            "{} rows in {count:.0} batches (mean {:.0} a batch, {:.3} per event)",
            thousands(sum),
            sum / count,
            sum / self.events.max(1) as f64
        ))
    }

    fn published_text(&self) -> String {
        self.windows_published
            .iter()
            .map(|(reason, n)| format!("{} {reason}", thousands(*n as f64)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn backlog_publication_text(&self) -> String {
        match self.publication.after_last_row {
            Some(d) => format!(
                "every backlog window published {:.1} s after the last row landed",
                d.as_secs_f64()
            ),
            None if self.grace_minutes > 0 => format!(
                "not due during the run (grace {} min, a diagnostic run)",
                self.grace_minutes
            ),
            None => "backlog windows still dirty after 600 s".to_owned(),
        }
    }

    fn lag_text(l: &Latency) -> String {
        format!("{} ({} windows)", l.seconds(), l.count)
    }

    fn histogram_text(live: &LiveReport) -> String {
        match live.histogram {
            Some((n, p50, p99)) => format!(
                "p50 <= {} s, p99 <= {} s ({n} windows; bucket upper bounds)",
                p50, p99
            ),
            None => "no observations".to_owned(),
        }
    }

    /// The live phase's rows of the docs table.
    fn live_rows(&self, s: &mut String, live: &LiveReport) {
        let _ = writeln!(s, "| live phase | {} |", Self::live_parameters(live));
        let _ = writeln!(
            s,
            "| **publish lag**: window end -> first total read on usage.windows | **{}** |",
            Self::lag_text(&live.first)
        );
        let _ = writeln!(
            s,
            "| window end -> total with every event read | {} |",
            Self::lag_text(&live.complete)
        );
        let _ = writeln!(
            s,
            "| `aggregator_window_publish_lag_seconds` over the live phase | {} |",
            Self::histogram_text(live)
        );
        let _ = writeln!(
            s,
            "| live windows never read / never complete / republished | {} / {} / {} |",
            live.missing, live.incomplete, live.republished
        );
    }
}

/// An events rate and the rate of rows it makes, grouped in thousands.
fn events_and_rows(rate: f64) -> (String, String) {
    (thousands(rate), thousands(rate * ROWS_PER_EVENT as f64))
}

impl Report for AggregatorReport {
    fn text(&self) -> String {
        let mut s = self.head().text();
        let m = &self.machine;
        let _ = writeln!(s, "parameters   {}", self.parameters());
        let (events, rows) = events_and_rows(self.baseline_rate());
        let _ = writeln!(
            s,
            "baseline     {events:>10} events/s  {rows:>10} rows/s  ({:.2}s, direct clickhouse-crate inserts)",
            self.baseline.elapsed.as_secs_f64()
        );
        let (events, rows) = events_and_rows(self.aggregator_rate());
        let _ = writeln!(
            s,
            "aggregator   {events:>10} events/s  {rows:>10} rows/s  ({:.2}s from the first rows to the last, {} rows before)",
            self.consume.elapsed.as_secs_f64(),
            thousands(self.first_rows as f64)
        );
        let _ = writeln!(
            s,
            "from spawn   {:>10} events/s  ({:.2}s, of which {:.2}s until the first rows)",
            thousands(self.from_spawn_rate()),
            self.from_spawn.as_secs_f64(),
            self.startup.as_secs_f64()
        );
        ratio_lines(&mut s, "aggregator", self.ratio(), self.rounds());
        if let Some(insert) = self.insert_text() {
            let _ = writeln!(s, "inserts      {insert}");
        }
        if let Some(marked) = self.marked_text() {
            let _ = writeln!(s, "marking      {marked} written to aggregation_windows");
        }
        let _ = writeln!(
            s,
            "backlog      {}; windows published (backlog and live): {}",
            self.backlog_publication_text(),
            self.published_text()
        );
        if let Some(rss) = self.peak_rss_kib {
            let _ = writeln!(
                s,
                "peak rss     {:.0} MiB (aggregator VmHWM)",
                rss as f64 / 1024.0
            );
        }
        self.baseline.cpu_text(&mut s, "baseline", m.cores);
        self.consume.cpu_text(&mut s, "consume", m.cores);
        if let Some(live) = &self.live {
            let _ = writeln!(s, "live         {}", Self::live_parameters(live));
            let _ = writeln!(s, "lag first    {}", Self::lag_text(&live.first));
            let _ = writeln!(s, "lag complete {}", Self::lag_text(&live.complete));
            let _ = writeln!(s, "lag metric   {}", Self::histogram_text(live));
            let _ = writeln!(
                s,
                "windows      {} never read, {} never complete, {} republished",
                live.missing, live.incomplete, live.republished
            );
            live.phase.cpu_text(&mut s, "live", m.cores);
        }
        profile_section(&mut s, false, &self.profile, |p| {
            format!(
                "aggregator, {} samples over {} more backlog events",
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
        let (events, rows) = events_and_rows(self.baseline_rate());
        let _ = writeln!(
            s,
            "| baseline: direct insert (clickhouse crate) | **{events} events/s** ({rows} rows/s, {:.2} s) |",
            self.baseline.elapsed.as_secs_f64()
        );
        let (events, rows) = events_and_rows(self.aggregator_rate());
        let _ = writeln!(
            s,
            "| aggregator: usage.raw -> events_processed | **{events} events/s** ({rows} rows/s, {:.2} s from the first rows landing to the last; {} rows were in before) |",
            self.consume.elapsed.as_secs_f64(),
            thousands(self.first_rows as f64)
        );
        let _ = writeln!(
            s,
            "| aggregator, from spawn | {} events/s ({:.2} s, of which {:.2} s until the first rows) |",
            thousands(self.from_spawn_rate()),
            self.from_spawn.as_secs_f64(),
            self.startup.as_secs_f64()
        );
        ratio_rows(
            &mut s,
            "aggregator",
            self.ratio(),
            self.rounds(),
            "Each round is a baseline then the aggregator on fresh namespaces and a backlog of its own",
        );
        if let Some(insert) = self.insert_text() {
            let _ = writeln!(s, "| ClickHouse inserts (aggregator metric) | {insert} |");
        }
        if let Some(marked) = self.marked_text() {
            let _ = writeln!(
                s,
                "| windows marked: `aggregation_windows` rows written (aggregator metric) | {marked} |"
            );
        }
        let _ = writeln!(
            s,
            "| backlog windows | {}; windows published by the end of the live phase (backlog and live): {} |",
            self.backlog_publication_text(),
            self.published_text()
        );
        if let Some(rss) = self.peak_rss_kib {
            let _ = writeln!(
                s,
                "| aggregator peak RSS | {:.0} MiB (VmHWM at the end of the live phase) |",
                rss as f64 / 1024.0
            );
        }
        if let Some(live) = &self.live {
            self.live_rows(&mut s, live);
        }
        goals_markdown(&mut s, &self.goals());

        cpu_table(
            &mut s,
            &[
                "baseline phase",
                "consume phase (measured interval)",
                "consume phase, per 100,000 events",
                "live phase",
            ],
            &[
                "aggregator",
                "clickhouse server",
                "kafka broker",
                "postgresql (all backends)",
                "meterline-bench",
            ],
            &[
                Some(&self.baseline),
                Some(&self.consume),
                self.live.as_ref().map(|l| &l.phase),
            ],
            PerUnit {
                phase: 1,
                unit: 100_000.0,
                count: measured_events(self.rows() as u64, self.first_rows).max(1.0),
            },
            m.cores,
        );
        profile_section(&mut s, true, &self.profile, |p| {
            format!(
                "Profile of the aggregator (`perf record -g -e cpu-clock`, {} samples) while a \
                 restarted aggregator consumed {} more backlog events, so the measured phase \
                 above ran without a profiler",
                p.samples,
                thousands(self.profile_events as f64)
            )
        });
        s
    }
}
