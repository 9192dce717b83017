//! The result of a run: a plain-text block for the terminal and a Markdown section for
//! `docs/benchmarks.md`, which replaces the text between `<!-- <name>:begin -->` and
//! `<!-- <name>:end -->` and nothing else.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::procstat::{ComponentCpu, CpuTimes, Machine};
use crate::profile::Profile;

/// The goals the ingest benchmark is held to.
pub const GOAL_RATIO: f64 = 0.5;
pub const GOAL_EVENTS_PER_SECOND: f64 = 50_000.0;

/// The goals the aggregator benchmark is held to.
pub const AGGREGATOR_GOAL_RATIO: f64 = 0.5;
pub const AGGREGATOR_GOAL_EVENTS_PER_SECOND: f64 = 100_000.0;

/// How many symbols of the profile are listed.
const TOP_SYMBOLS: usize = 12;

/// Latencies of the bulk requests.
pub struct Latency {
    pub count: usize,
    pub p50: Duration,
    pub p90: Duration,
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
            p90: rank(0.90),
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

/// The profile's components and top symbols, for the terminal.
fn profile_text(s: &mut String, p: &Profile) {
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

/// The profile's components and top symbols, as the two Markdown tables of a section (the
/// components table's header is written by the caller, after its own introduction).
fn profile_markdown(s: &mut String, p: &Profile) {
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

/// `12.34 s (user 10.00, system 2.34)`, or `-` when the process was not accounted.
pub(crate) fn cpu_cell(cpu: Option<CpuTimes>) -> String {
    match cpu {
        Some(c) => format!(
            "{:.2} s (user {:.2}, system {:.2})",
            c.total(),
            c.user,
            c.system
        ),
        None => "-".to_owned(),
    }
}

pub(crate) fn find_cpu(cpus: &[ComponentCpu], name: &str) -> Option<CpuTimes> {
    cpus.iter().find(|c| c.name == name).map(|c| c.cpu)
}

pub(crate) fn date_text(date: time::OffsetDateTime) -> String {
    meterline_schemas::Timestamp::new(date)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

pub(crate) fn verdict(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "MISS"
    }
}

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
    /// The whole phase (sending, then reading the last totals): the CPU interval.
    pub elapsed: Duration,
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
    pub cpu: Vec<ComponentCpu>,
}

/// The two rates of one round of a benchmark that is judged on a ratio: its baseline's and
/// its subject's (ingest, the aggregator), events per second.
#[derive(Debug, Clone, Copy)]
pub struct RoundRates {
    pub load_before_baseline: f64,
    pub baseline_rate: f64,
    pub rate: f64,
}

impl RoundRates {
    pub fn ratio(&self) -> f64 {
        self.rate / self.baseline_rate
    }
}

/// Every round as "ratio (subject / baseline events/s)", in the order they ran.
fn rounds_text(rounds: &[RoundRates]) -> String {
    rounds
        .iter()
        .map(|r| {
            format!(
                "{:.2} ({} / {})",
                r.ratio(),
                thousands(r.rate),
                thousands(r.baseline_rate)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The round of median ratio; of an even count the lower middle one, so that a tie never
/// flatters the result.
fn median_by_ratio(mut rounds: Vec<RoundRates>) -> RoundRates {
    rounds.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
    rounds[(rounds.len() - 1) / 2]
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
    pub baseline_elapsed: Duration,
    /// Rows already there when `count()` first showed any: excluded from the measured rate.
    pub first_rows: u64,
    /// From the first rows landing to the last.
    pub measured_elapsed: Duration,
    /// From spawning the aggregator to the first rows landing.
    pub startup: Duration,
    /// From spawning the aggregator to the last rows landing.
    pub from_spawn: Duration,
    pub aggregator_cpu: Vec<ComponentCpu>,
    pub baseline_cpu: Vec<ComponentCpu>,
    /// `aggregator_clickhouse_insert_duration_seconds` sum and count after the backlog.
    pub insert_seconds: Option<f64>,
    pub inserts: Option<f64>,
    pub publication: BacklogPublication,
    /// `aggregator_windows_published_total` by reason at the end of the run.
    pub windows_published: Vec<(&'static str, u64)>,
    pub live: Option<LiveReport>,
    pub peak_rss_kib: Option<u64>,
    pub profile: Result<Profile, String>,
    pub profile_events: usize,
}

impl AggregatorReport {
    pub fn rows(&self) -> usize {
        self.events * 2
    }

    pub fn baseline_rate(&self) -> f64 {
        self.events as f64 / self.baseline_elapsed.as_secs_f64()
    }

    /// Events of the measured interval (after the first rows landed).
    fn measured_events(&self) -> f64 {
        (self.rows() as f64 - self.first_rows as f64) / 2.0
    }

    /// Events/s from the first rows landing to the last; from spawn when the first poll
    /// already saw everything.
    pub fn aggregator_rate(&self) -> f64 {
        if self.measured_events() > 0.0 && !self.measured_elapsed.is_zero() {
            self.measured_events() / self.measured_elapsed.as_secs_f64()
        } else {
            self.from_spawn_rate()
        }
    }

    pub fn from_spawn_rate(&self) -> f64 {
        self.events as f64 / self.from_spawn.as_secs_f64()
    }

    pub fn ratio(&self) -> f64 {
        self.aggregator_rate() / self.baseline_rate()
    }

    /// Every round, the last (detailed) one included, in the order they ran.
    pub fn rounds(&self) -> Vec<RoundRates> {
        let mut rounds = self.earlier_rounds.clone();
        rounds.push(RoundRates {
            load_before_baseline: self.load_before_baseline,
            baseline_rate: self.baseline_rate(),
            rate: self.aggregator_rate(),
        });
        rounds
    }

    /// The round of median ratio (the lower middle one of an even count): what the goals
    /// are judged on.
    pub fn median_round(&self) -> RoundRates {
        median_by_ratio(self.rounds())
    }

    fn goals(&self) -> [(String, String, &'static str); 2] {
        let median = self.median_round();
        let rounds = self.rounds().len();
        [
            (
                format!("aggregator >= {AGGREGATOR_GOAL_RATIO}x the direct insert"),
                format!("{:.2}x (median of {} rounds)", median.ratio(), rounds),
                verdict(median.ratio() >= AGGREGATOR_GOAL_RATIO),
            ),
            (
                format!(
                    "aggregator >= {} events/s on {} cores",
                    thousands(AGGREGATOR_GOAL_EVENTS_PER_SECOND),
                    self.machine.cores
                ),
                format!("{} events/s (the median round)", thousands(median.rate)),
                verdict(median.rate >= AGGREGATOR_GOAL_EVENTS_PER_SECOND),
            ),
        ]
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
        format!(
            "p50 {:.2} s, p99 {:.2} s, max {:.2} s ({} windows)",
            l.p50.as_secs_f64(),
            l.p99.as_secs_f64(),
            l.max.as_secs_f64(),
            l.count
        )
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

    /// The block printed at the end of a run.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(s, "== aggregator benchmark ({}) ==", date_text(self.date));
        let _ = writeln!(
            s,
            "machine      {} cores, {}, {:.1} GiB; load {:.2} before baseline, {:.2} before aggregator, {:.2} before live",
            m.cores,
            m.model,
            m.memory_gib,
            self.load_before_baseline,
            self.load_before_aggregator,
            self.load_before_live
        );
        let _ = writeln!(s, "parameters   {}", self.parameters());
        let _ = writeln!(
            s,
            "baseline     {:>10} events/s  {:>10} rows/s  ({:.2}s, direct clickhouse-crate inserts)",
            thousands(self.baseline_rate()),
            thousands(self.baseline_rate() * 2.0),
            self.baseline_elapsed.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "aggregator   {:>10} events/s  {:>10} rows/s  ({:.2}s from the first rows to the last, {} rows before)",
            thousands(self.aggregator_rate()),
            thousands(self.aggregator_rate() * 2.0),
            self.measured_elapsed.as_secs_f64(),
            thousands(self.first_rows as f64)
        );
        let _ = writeln!(
            s,
            "from spawn   {:>10} events/s  ({:.2}s, of which {:.2}s until the first rows)",
            thousands(self.from_spawn_rate()),
            self.from_spawn.as_secs_f64(),
            self.startup.as_secs_f64()
        );
        let _ = writeln!(s, "ratio        {:.2}", self.ratio());
        let _ = writeln!(
            s,
            "rounds       ratio (aggregator / baseline events/s) of each round, the last above: {}; median {:.2}",
            rounds_text(&self.rounds()),
            self.median_round().ratio()
        );
        if let Some(insert) = self.insert_text() {
            let _ = writeln!(s, "inserts      {insert}");
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
        let phases = [
            ("baseline", &self.baseline_cpu, self.baseline_elapsed),
            ("consume", &self.aggregator_cpu, self.measured_elapsed),
        ];
        for (phase, cpus, elapsed) in phases {
            cpu_text(&mut s, phase, cpus, elapsed, m.cores);
        }
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
            cpu_text(&mut s, "live", &live.cpu, live.elapsed, m.cores);
        }
        match &self.profile {
            Ok(p) => {
                let _ = writeln!(
                    s,
                    "profile      aggregator, {} samples over {} more backlog events:",
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

    /// The generated Markdown of the aggregator section.
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Generated by `meterline-bench aggregator --write-docs` on {}; do not edit by hand.\n",
            date_text(self.date)
        );
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(
            s,
            "| machine | {} cores, {}, {:.1} GiB memory; 1-minute load {:.2} before the baseline, {:.2} before the aggregator, {:.2} before the live phase |",
            m.cores,
            m.model,
            m.memory_gib,
            self.load_before_baseline,
            self.load_before_aggregator,
            self.load_before_live
        );
        let _ = writeln!(s, "| date | {} |", date_text(self.date));
        let _ = writeln!(s, "| parameters | {} |", self.parameters());
        let _ = writeln!(
            s,
            "| baseline: direct insert (clickhouse crate) | **{} events/s** ({} rows/s, {:.2} s) |",
            thousands(self.baseline_rate()),
            thousands(self.baseline_rate() * 2.0),
            self.baseline_elapsed.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "| aggregator: usage.raw -> events_processed | **{} events/s** ({} rows/s, {:.2} s from the first rows landing to the last; {} rows were in before) |",
            thousands(self.aggregator_rate()),
            thousands(self.aggregator_rate() * 2.0),
            self.measured_elapsed.as_secs_f64(),
            thousands(self.first_rows as f64)
        );
        let _ = writeln!(
            s,
            "| aggregator, from spawn | {} events/s ({:.2} s, of which {:.2} s until the first rows) |",
            thousands(self.from_spawn_rate()),
            self.from_spawn.as_secs_f64(),
            self.startup.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "| ratio aggregator / baseline | **{:.2}** in this round |",
            self.ratio()
        );
        let _ = writeln!(
            s,
            "| every round: ratio (aggregator / baseline events/s) | {}; **median {:.2}**. Each round is a baseline then the aggregator on fresh namespaces and a backlog of its own; the rows above and below detail the last one |",
            rounds_text(&self.rounds()),
            self.median_round().ratio()
        );
        if let Some(insert) = self.insert_text() {
            let _ = writeln!(s, "| ClickHouse inserts (aggregator metric) | {insert} |");
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

        let _ = writeln!(s, "\nGoals:\n\n| goal | measured | result |\n|---|---|---|");
        for (goal, measured, verdict) in self.goals() {
            let _ = writeln!(s, "| {goal} | {measured} | **{verdict}** |");
        }

        let live_cpu = self.live.as_ref().map(|l| l.cpu.as_slice()).unwrap_or(&[]);
        let _ = writeln!(
            s,
            "\nCPU seconds (user + system) used during each phase, from `/proc/<pid>/stat`:\n\n\
             | process | baseline phase | consume phase (measured interval) | consume phase, per 100,000 events | live phase |\n\
             |---|---|---|---|---|"
        );
        let measured_events = self.measured_events().max(1.0);
        for name in [
            "aggregator",
            "clickhouse server",
            "kafka broker",
            "postgresql (all backends)",
            "meterline-bench",
        ] {
            let base = find_cpu(&self.baseline_cpu, name);
            let agg = find_cpu(&self.aggregator_cpu, name);
            let live = find_cpu(live_cpu, name);
            if base.is_none() && agg.is_none() && live.is_none() {
                continue;
            }
            let per = agg
                .map(|c| format!("{:.2} s", c.total() * 100_000.0 / measured_events))
                .unwrap_or_else(|| "-".to_owned());
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {per} | {} |",
                cpu_cell(base),
                cpu_cell(agg),
                cpu_cell(live)
            );
        }
        let live_available = self
            .live
            .as_ref()
            .map(|l| format!("{:.2} s", l.elapsed.as_secs_f64() * m.cores as f64))
            .unwrap_or_default();
        let _ = writeln!(
            s,
            "| available (wall time x {} cores) | {:.2} s | {:.2} s | | {live_available} |",
            m.cores,
            self.baseline_elapsed.as_secs_f64() * m.cores as f64,
            self.measured_elapsed.as_secs_f64() * m.cores as f64
        );

        match &self.profile {
            Ok(p) => {
                let _ = writeln!(
                    s,
                    "\nProfile of the aggregator (`perf record -g -e cpu-clock`, {} samples) while a \
                     restarted aggregator consumed {} more backlog events, so the measured phase \
                     above ran without a profiler. Share of samples by component:\n\n\
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

/// The relay benchmark: signed deliveries through the release `webhook-relay`, and raw
/// produces of the same `stripe.webhooks` messages.
pub struct RelayReport {
    pub machine: Machine,
    pub date: time::OffsetDateTime,
    pub load_before_baseline: f64,
    pub load_before_relay: f64,
    pub deliveries: usize,
    pub concurrency: usize,
    pub partitions: i32,
    pub average_body_bytes: usize,
    pub baseline_elapsed: Duration,
    pub baseline_latency: Latency,
    pub relay_elapsed: Duration,
    pub relay_latency: Latency,
    /// Messages the measured pass added to `stripe.webhooks` (watermarks).
    pub published: usize,
    pub baseline_cpu: Vec<ComponentCpu>,
    pub relay_cpu: Vec<ComponentCpu>,
}

impl RelayReport {
    pub fn baseline_rate(&self) -> f64 {
        self.deliveries as f64 / self.baseline_elapsed.as_secs_f64()
    }

    pub fn relay_rate(&self) -> f64 {
        self.deliveries as f64 / self.relay_elapsed.as_secs_f64()
    }

    fn parameters(&self) -> String {
        format!(
            "{} distinct signed `customer.created` deliveries (about {} bytes each) to one tenant \
             environment, {} concurrent keep-alive clients and baseline tasks, {} partitions \
             (every message has the tenant environment's key, so all go to one)",
            thousands(self.deliveries as f64),
            thousands(self.average_body_bytes as f64),
            self.concurrency,
            self.partitions
        )
    }

    fn latency_text(l: &Latency) -> String {
        format!(
            "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            ms(l.p50),
            ms(l.p90),
            ms(l.p99),
            ms(l.max)
        )
    }

    /// The relay's p50 and p99 beyond the baseline's, in ms.
    fn overhead(&self) -> (f64, f64) {
        (
            ms(self.relay_latency.p50) - ms(self.baseline_latency.p50),
            ms(self.relay_latency.p99) - ms(self.baseline_latency.p99),
        )
    }

    /// The block printed at the end of a run.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(s, "== relay benchmark ({}) ==", date_text(self.date));
        let _ = writeln!(
            s,
            "machine      {} cores, {}, {:.1} GiB; load {:.2} before baseline, {:.2} before relay",
            m.cores, m.model, m.memory_gib, self.load_before_baseline, self.load_before_relay
        );
        let _ = writeln!(s, "parameters   {}", self.parameters());
        let _ = writeln!(
            s,
            "baseline     {}  ({} produces/s, {:.2}s, raw produce -> ack)",
            Self::latency_text(&self.baseline_latency),
            thousands(self.baseline_rate()),
            self.baseline_elapsed.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "relay        {}  ({} deliveries/s, {:.2}s, request -> 200)",
            Self::latency_text(&self.relay_latency),
            thousands(self.relay_rate()),
            self.relay_elapsed.as_secs_f64()
        );
        let (p50, p99) = self.overhead();
        let _ = writeln!(
            s,
            "beyond kafka p50 +{p50:.2} ms, p99 +{p99:.2} ms over the baseline"
        );
        let _ = writeln!(
            s,
            "checked      {} answers 200 (none duplicate); {} messages added to stripe.webhooks",
            self.relay_latency.count, self.published
        );
        cpu_text(
            &mut s,
            "baseline",
            &self.baseline_cpu,
            self.baseline_elapsed,
            m.cores,
        );
        cpu_text(
            &mut s,
            "relay",
            &self.relay_cpu,
            self.relay_elapsed,
            m.cores,
        );
        s
    }

    /// The generated Markdown of the relay section.
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Generated by `meterline-bench relay --write-docs` on {}; do not edit by hand.\n",
            date_text(self.date)
        );
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(
            s,
            "| machine | {} cores, {}, {:.1} GiB memory; 1-minute load {:.2} before the baseline, {:.2} before the relay |",
            m.cores, m.model, m.memory_gib, self.load_before_baseline, self.load_before_relay
        );
        let _ = writeln!(s, "| date | {} |", date_text(self.date));
        let _ = writeln!(s, "| parameters | {} |", self.parameters());
        let _ = writeln!(
            s,
            "| **relay: signed request -> 200** (Kafka acked) | **{}** ({} deliveries/s, {:.2} s) |",
            Self::latency_text(&self.relay_latency),
            thousands(self.relay_rate()),
            self.relay_elapsed.as_secs_f64()
        );
        let _ = writeln!(
            s,
            "| baseline: raw produce -> ack of the same messages, one at a time per task | {} ({} produces/s, {:.2} s) |",
            Self::latency_text(&self.baseline_latency),
            thousands(self.baseline_rate()),
            self.baseline_elapsed.as_secs_f64()
        );
        let (p50, p99) = self.overhead();
        let _ = writeln!(
            s,
            "| relay beyond the baseline | p50 +{p50:.2} ms, p99 +{p99:.2} ms |"
        );
        let _ = writeln!(
            s,
            "| checked | all {} answers 200 and none a duplicate; {} messages added to stripe.webhooks (watermarks) |",
            thousands(self.relay_latency.count as f64),
            thousands(self.published as f64)
        );

        let _ = writeln!(
            s,
            "\nCPU seconds (user + system) used during each phase, from `/proc/<pid>/stat`:\n\n\
             | process | baseline phase | relay phase | relay phase, per 10,000 deliveries |\n\
             |---|---|---|---|"
        );
        for name in [
            "webhook-relay",
            "kafka broker",
            "postgresql (all backends)",
            "meterline-bench (load generator)",
        ] {
            let base = find_cpu(&self.baseline_cpu, name);
            let relay = find_cpu(&self.relay_cpu, name);
            if base.is_none() && relay.is_none() {
                continue;
            }
            let per = relay
                .map(|c| format!("{:.2} s", c.total() * 10_000.0 / self.deliveries as f64))
                .unwrap_or_else(|| "-".to_owned());
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {per} |",
                cpu_cell(base),
                cpu_cell(relay)
            );
        }
        let _ = writeln!(
            s,
            "| available (wall time x {} cores) | {:.2} s | {:.2} s | |",
            m.cores,
            self.baseline_elapsed.as_secs_f64() * m.cores as f64,
            self.relay_elapsed.as_secs_f64() * m.cores as f64
        );
        s
    }
}

/// CPU seconds of a phase, for the terminal.
fn cpu_text(s: &mut String, phase: &str, cpus: &[ComponentCpu], elapsed: Duration, cores: usize) {
    let _ = writeln!(
        s,
        "cpu {phase:<8} {:.1} core-seconds available ({:.2}s x {} cores)",
        elapsed.as_secs_f64() * cores as f64,
        elapsed.as_secs_f64(),
        cores
    );
    for c in cpus {
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

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `123456.7` as `123,457`.
pub(crate) fn thousands(value: f64) -> String {
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

    #[test]
    fn the_median_round_is_the_middle_ratio_and_the_lower_of_two() {
        let round = |aggregator: f64, baseline: f64| RoundRates {
            load_before_baseline: 0.0,
            baseline_rate: baseline,
            rate: aggregator,
        };
        let three = vec![round(60.0, 100.0), round(40.0, 100.0), round(100.0, 200.0)];
        assert_eq!(median_by_ratio(three).ratio(), 0.5);
        let two = vec![round(60.0, 100.0), round(40.0, 100.0)];
        assert_eq!(median_by_ratio(two).rate, 40.0);
    }
}
