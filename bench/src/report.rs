//! What every benchmark's result shares: the [`Report`] trait `main` prints and writes, the
//! `Head` that opens a block and a section, latency percentiles, measured [`Phase`]s, the lines
//! and rows of rounds judged on their median ratio ([`crate::rounds`]), goals, CPU and profile
//! tables, number formatting, and the replacement of a generated section of
//! `docs/benchmarks.md`. Each benchmark's own block and section live beside it
//! (`ingest/report.rs`, `aggregator/report.rs`, ...).
//!
//! Rule kept: a result is a plain-text block for the terminal and a Markdown section that
//! replaces the text between `<!-- <name>:begin -->` and `<!-- <name>:end -->` and nothing
//! else; the formats are pinned by `golden.rs`.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::procstat::{ComponentCpu, CpuTimes, Machine, Snapshot};
use crate::profile::Profile;
use crate::rounds::{median_by_ratio, RoundRates};

/// A benchmark's result: what `meterline-bench` prints, and what `--write-docs` puts in its
/// section of `docs/benchmarks.md`.
pub trait Report {
    /// The block printed at the end of a run.
    fn text(&self) -> String;
    /// The generated Markdown of the benchmark's section.
    fn markdown(&self) -> String;
}

/// A goal of a benchmark: what it asks, what was measured, [`verdict`].
pub(crate) type Goal = (String, String, &'static str);

/// How many symbols of the profile are listed.
const TOP_SYMBOLS: usize = 12;

/// Nearest-rank percentiles of a set of latencies (requests, produces, windows).
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

    /// `p50 1.23 s, p99 4.56 s, max 7.89 s`: how late windows were.
    pub(crate) fn seconds(&self) -> String {
        format!(
            "p50 {:.2} s, p99 {:.2} s, max {:.2} s",
            self.p50.as_secs_f64(),
            self.p99.as_secs_f64(),
            self.max.as_secs_f64()
        )
    }

    /// `p50 12 ms, p99 34 ms, max 56 ms`, to `decimals` places.
    pub(crate) fn millis(&self, decimals: usize) -> String {
        format!(
            "p50 {:.*} ms, p99 {:.*} ms, max {:.*} ms",
            decimals,
            ms(self.p50),
            decimals,
            ms(self.p99),
            decimals,
            ms(self.max)
        )
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

/// A measured phase of a benchmark: how long it took, and the CPU each watched process used
/// meanwhile.
pub struct Phase {
    pub elapsed: Duration,
    pub cpu: Vec<ComponentCpu>,
}

impl Phase {
    /// The phase that took `elapsed`, with the CPU `used` in it.
    pub fn new(elapsed: Duration, used: &Snapshot) -> Phase {
        Phase {
            elapsed,
            cpu: used.components(),
        }
    }

    /// `count` (events, deliveries) a second over the phase.
    pub fn rate(&self, count: usize) -> f64 {
        count as f64 / self.elapsed.as_secs_f64()
    }

    /// The core-seconds the machine had during the phase.
    pub fn available(&self, cores: usize) -> f64 {
        self.elapsed.as_secs_f64() * cores as f64
    }

    /// The phase's CPU seconds for the terminal: the core-seconds it had, then each watched
    /// process's seconds.
    pub(crate) fn cpu_text(&self, s: &mut String, name: &str, cores: usize) {
        let _ = writeln!(
            s,
            "cpu {name:<8} {:.1} core-seconds available ({:.2}s x {} cores)",
            self.available(cores),
            self.elapsed.as_secs_f64(),
            cores
        );
        for c in &self.cpu {
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

/// The judged goals of a benchmark measured in rounds against its baseline: the median
/// round's ratio, and its rate on this machine's cores.
pub(crate) fn ratio_goals(
    rounds: Vec<RoundRates>,
    subject: &str,
    baseline: &str,
    goal_ratio: f64,
    goal_rate: f64,
    cores: usize,
) -> [Goal; 2] {
    let count = rounds.len();
    let median = median_by_ratio(rounds);
    [
        (
            format!("{subject} >= {goal_ratio}x {baseline}"),
            format!("{:.2}x (median of {count} rounds)", median.ratio()),
            verdict(median.ratio() >= goal_ratio),
        ),
        (
            format!(
                "{subject} >= {} events/s on {cores} cores",
                thousands(goal_rate)
            ),
            format!("{} events/s (the median round)", thousands(median.rate)),
            verdict(median.rate >= goal_rate),
        ),
    ]
}

/// The terminal lines of the last round's ratio and of every round's, with the median's.
pub(crate) fn ratio_lines(s: &mut String, subject: &str, ratio: f64, rounds: Vec<RoundRates>) {
    let _ = writeln!(s, "ratio        {ratio:.2}");
    let _ = writeln!(
        s,
        "rounds       ratio ({subject} / baseline events/s) of each round, the last above: {}; median {:.2}",
        rounds_text(&rounds),
        median_by_ratio(rounds).ratio()
    );
}

/// The docs rows of the same; `how` says what a round is.
pub(crate) fn ratio_rows(
    s: &mut String,
    subject: &str,
    ratio: f64,
    rounds: Vec<RoundRates>,
    how: &str,
) {
    let _ = writeln!(
        s,
        "| ratio {subject} / baseline | **{ratio:.2}** in this round |"
    );
    let _ = writeln!(
        s,
        "| every round: ratio ({subject} / baseline events/s) | {}; **median {:.2}**. {how}; the rows above and below detail the last one |",
        rounds_text(&rounds),
        median_by_ratio(rounds).ratio()
    );
}

/// The first line of a terminal block: `== <title> (<date>) ==`.
pub(crate) fn title_line(s: &mut String, title: &str, date: time::OffsetDateTime) {
    let _ = writeln!(s, "== {title} ({}) ==", date_text(date));
}

/// What opens a benchmark's terminal block and its docs section: which benchmark, when, on
/// what machine, and the 1-minute load before each phase.
pub(crate) struct Head<'a> {
    name: &'static str,
    title: String,
    machine: &'a Machine,
    date: time::OffsetDateTime,
    /// (load, as the terminal words the phase, as the docs word it).
    loads: Vec<(f64, &'static str, String)>,
}

impl<'a> Head<'a> {
    /// The head of `meterline-bench <name>`, titled `<name> benchmark`.
    pub fn new(name: &'static str, machine: &'a Machine, date: time::OffsetDateTime) -> Self {
        Head {
            name,
            title: format!("{name} benchmark"),
            machine,
            date,
            loads: Vec::new(),
        }
    }

    pub fn titled(self, title: &str) -> Self {
        Head {
            title: title.to_owned(),
            ..self
        }
    }

    /// The load before (or after) a phase; an empty `terminal` leaves it out of the terminal.
    pub fn load(mut self, load: f64, terminal: &'static str, docs: impl Into<String>) -> Self {
        self.loads.push((load, terminal, docs.into()));
        self
    }

    /// The load before the baseline phase, which every benchmark with one words the same.
    pub fn before_baseline(self, load: f64) -> Self {
        self.load(load, "before baseline", "before the baseline")
    }

    fn loads_text(&self, docs: bool) -> String {
        self.loads
            .iter()
            .filter(|(_, terminal, _)| docs || !terminal.is_empty())
            .map(|(load, terminal, words)| {
                format!("{load:.2} {}", if docs { words.as_str() } else { terminal })
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The terminal block's title and machine lines.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let m = self.machine;
        title_line(&mut s, &self.title, self.date);
        let _ = write!(
            s,
            "machine      {} cores, {}, {:.1} GiB",
            m.cores, m.model, m.memory_gib
        );
        let loads = self.loads_text(false);
        if loads.is_empty() {
            let _ = writeln!(s);
        } else {
            let _ = writeln!(s, "; load {loads}");
        }
        s
    }

    /// The docs section's generated-by line, then its table's machine and date rows.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let (m, date) = (self.machine, date_text(self.date));
        let _ = writeln!(
            s,
            "Generated by `meterline-bench {} --write-docs` on {date}; do not edit by hand.\n",
            self.name
        );
        let _ = writeln!(s, "| | |\n|---|---|");
        let _ = writeln!(
            s,
            "| machine | {} cores, {}, {:.1} GiB memory; 1-minute load {} |",
            m.cores,
            m.model,
            m.memory_gib,
            self.loads_text(true)
        );
        let _ = writeln!(s, "| date | {date} |");
        s
    }
}

/// The goals, one terminal line each.
pub(crate) fn goals_text(s: &mut String, goals: &[Goal]) {
    for (goal, measured, verdict) in goals {
        let _ = writeln!(s, "goal         {verdict}  {goal}: {measured}");
    }
}

/// The goals table of a docs section.
pub(crate) fn goals_markdown(s: &mut String, goals: &[Goal]) {
    let _ = writeln!(s, "\nGoals:\n\n| goal | measured | result |\n|---|---|---|");
    for (goal, measured, verdict) in goals {
        let _ = writeln!(s, "| {goal} | {measured} | **{verdict}** |");
    }
}

/// The profile of a run, or why there is none, for the terminal or (`markdown`) for a docs
/// section; `intro` says whose profile it is and how it was taken.
pub(crate) fn profile_section(
    s: &mut String,
    markdown: bool,
    profile: &Result<Profile, String>,
    intro: impl FnOnce(&Profile) -> String,
) {
    match (profile, markdown) {
        (Ok(p), false) => {
            let _ = writeln!(s, "profile      {}:", intro(p));
            profile_text(s, p);
        }
        (Ok(p), true) => {
            let _ = writeln!(
                s,
                "\n{}. Share of samples by component:\n\n| component | share |\n|---|---|",
                intro(p)
            );
            profile_markdown(s, p);
        }
        (Err(reason), false) => {
            let _ = writeln!(s, "profile      unavailable: {reason}");
        }
        (Err(reason), true) => {
            let _ = writeln!(s, "\nProfile: unavailable ({reason}).");
        }
    }
}

/// The head of a docs section's CPU table, one column per phase (`columns`).
fn cpu_table_head(s: &mut String, columns: &[&str]) {
    let _ = writeln!(
        s,
        "\nCPU seconds (user + system) used during each phase, from `/proc/<pid>/stat`:\n\n\
         | process | {} |\n|---|{}",
        columns.join(" | "),
        "---|".repeat(columns.len())
    );
}

/// Seconds per `unit` of `count` (events, deliveries) of one phase: a column of a CPU table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PerUnit {
    /// The phase the column follows.
    pub phase: usize,
    pub unit: f64,
    pub count: f64,
}

/// The rows of a CPU table: one per process of `names` that some phase accounted, a cell per
/// phase and the [`PerUnit`] column after its phase.
fn cpu_rows(s: &mut String, names: &[&str], phases: &[&[ComponentCpu]], per: PerUnit) {
    for name in names {
        let cpus: Vec<Option<CpuTimes>> = phases.iter().map(|p| find_cpu(p, name)).collect();
        if cpus.iter().all(Option::is_none) {
            continue;
        }
        let mut cells = vec![name.to_string()];
        for (i, cpu) in cpus.iter().enumerate() {
            cells.push(cpu_cell(*cpu));
            if i == per.phase {
                cells.push(
                    cpu.map(|c| format!("{:.2} s", c.total() * per.unit / per.count))
                        .unwrap_or_else(|| "-".to_owned()),
                );
            }
        }
        let _ = writeln!(s, "| {} |", cells.join(" | "));
    }
}

/// The docs CPU table of a benchmark's phases: a column each (`columns`, the [`PerUnit`]
/// column among them after its phase), a row per process of `names` that some phase
/// accounted, and the core-seconds each phase had. A phase that did not run (`None`) has `-`
/// for every process and nothing for its core-seconds.
pub(crate) fn cpu_table(
    s: &mut String,
    columns: &[&str],
    names: &[&str],
    phases: &[Option<&Phase>],
    per: PerUnit,
    cores: usize,
) {
    cpu_table_head(s, columns);
    let cpus: Vec<&[ComponentCpu]> = phases
        .iter()
        .map(|phase| phase.map_or(&[][..], |p| p.cpu.as_slice()))
        .collect();
    cpu_rows(s, names, &cpus, per);
    let mut available = format!("| available (wall time x {cores} cores) |");
    for (i, phase) in phases.iter().enumerate() {
        let cell = phase
            .map(|p| format!("{:.2} s", p.available(cores)))
            .unwrap_or_default();
        let _ = write!(available, " {cell} |");
        if i == per.phase {
            // The per-unit column has no core-seconds of its own.
            available.push_str(" |");
        }
    }
    let _ = writeln!(s, "{available}");
}

/// The docs CPU table of a benchmark measured in two phases, its baseline and its subject:
/// a column each, the subject's seconds per `unit` of its `count` `what` (events,
/// deliveries), and the core-seconds each phase had.
pub(crate) fn two_phase_cpu_table(
    s: &mut String,
    subject: &str,
    names: &[&str],
    [baseline, measured]: [&Phase; 2],
    (unit, count, what): (f64, f64, &str),
    cores: usize,
) {
    let columns = [
        "baseline phase",
        &format!("{subject} phase"),
        &format!("{subject} phase, per {} {what}", thousands(unit)),
    ];
    let per = PerUnit {
        phase: 1,
        unit,
        count,
    };
    cpu_table(
        s,
        &columns,
        names,
        &[Some(baseline), Some(measured)],
        per,
        cores,
    );
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
}
