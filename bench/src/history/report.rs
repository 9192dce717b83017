//! The history benchmark's result: the terminal block and the `history` section of
//! `docs/benchmarks.md`: by months of history, on each layout, the due hour's windows (time
//! and rows read per window) and one window total's latency; and the goal: flat from the
//! shortest history to the longest, within 1.5x, on the time-ordered layout.

use std::fmt::Write as _;

use crate::procstat::Machine;
use crate::report::{ms, thousands, Head, Latency, Report};

/// A layout of `events_processed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Ordered by event id: migrations 1 to 3, before migration 5.
    ById,
    /// Ordered by time within customer and meter, partitioned by month.
    ByTime,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::ById => "by event id",
            Layout::ByTime => "by time",
        }
    }
}

/// The window reads of one history length on one layout.
pub struct Reads {
    pub layout: Layout,
    /// Months of history before the measured hour.
    pub months: u64,
    /// Rows before the measured hour, over all customers and meters.
    pub history: u64,
    /// One customer's window total, as `GET /v1/usage` reads it.
    pub latency: Latency,
    /// Every window of the due hour, computed as the aggregator does.
    pub due_hour: Latency,
    /// Rows ClickHouse plans to read for the due hour, per window.
    pub rows_per_window: u64,
    /// The 1-minute load before its namespace was filled.
    pub load: f64,
}

pub struct HistoryReport {
    pub machine: Machine,
    pub date: time::OffsetDateTime,
    pub customers: u64,
    pub meters: usize,
    pub hour_events: u64,
    pub month_events: u64,
    pub reads: usize,
    pub hour_rounds: usize,
    pub cells: Vec<Reads>,
}

/// The goal: the time-ordered layout's cost at the longest history within this factor of its
/// cost at the shortest.
const FLAT: f64 = 1.5;

impl HistoryReport {
    fn head(&self) -> Head<'_> {
        let load = self.cells.first().map_or(0.0, |c| c.load);
        Head::new("history", &self.machine, self.date).load(load, "at start", "at the start")
    }

    fn parameters(&self) -> String {
        format!(
            "{} customers x {} meters, each with {} events in the measured hour and {} a month \
             (of 30 days) of history before it, evenly spread; the due hour: its {} windows \
             computed {} times per history length and layout with the aggregator's query \
             (one per meter, every customer), rows read per window from `EXPLAIN ESTIMATE` of \
             it; one window: {} totals read one customer's hour each, in turn, as `GET \
             /v1/usage` reads them; tables merged (`OPTIMIZE FINAL`) first",
            self.customers,
            self.meters,
            self.hour_events,
            self.month_events,
            thousands((self.customers * self.meters as u64) as f64),
            self.hour_rounds,
            self.reads,
        )
    }

    /// The history lengths in months, in the run's order.
    fn lengths(&self) -> Vec<u64> {
        let mut lengths: Vec<u64> = Vec::new();
        for cell in &self.cells {
            if !lengths.contains(&cell.months) {
                lengths.push(cell.months);
            }
        }
        lengths
    }

    fn cell(&self, months: u64, layout: Layout) -> Option<&Reads> {
        self.cells
            .iter()
            .find(|c| c.months == months && c.layout == layout)
    }

    /// One row per history length and layout: the months (and rows), the layout, the due
    /// hour's p50, rows read per window, and one window's p50 / p90.
    fn rows(&self) -> Vec<[String; 5]> {
        let mut rows = Vec::new();
        for months in self.lengths() {
            for layout in [Layout::ById, Layout::ByTime] {
                let Some(c) = self.cell(months, layout) else {
                    continue;
                };
                rows.push([
                    format!(
                        "{months} month{} ({} rows)",
                        if months == 1 { "" } else { "s" },
                        thousands(c.history as f64)
                    ),
                    layout.name().to_owned(),
                    format!("{:.1} ms", ms(c.due_hour.p50)),
                    thousands(c.rows_per_window as f64),
                    format!("{:.2} / {:.2} ms", ms(c.latency.p50), ms(c.latency.p90)),
                ]);
            }
        }
        rows
    }

    /// The goal on the time-ordered layout: (what, smallest, largest, ratio, met).
    fn goals(&self) -> Vec<(&'static str, String, String, f64, bool)> {
        let lengths = self.lengths();
        let (Some(first), Some(last)) = (
            lengths.first().and_then(|m| self.cell(*m, Layout::ByTime)),
            lengths.last().and_then(|m| self.cell(*m, Layout::ByTime)),
        ) else {
            return Vec::new();
        };
        let time = ms(last.due_hour.p50) / ms(first.due_hour.p50).max(f64::MIN_POSITIVE);
        let rows = last.rows_per_window as f64 / (first.rows_per_window as f64).max(1.0);
        vec![
            (
                "due hour p50",
                format!("{:.1} ms", ms(first.due_hour.p50)),
                format!("{:.1} ms", ms(last.due_hour.p50)),
                time,
                time <= FLAT,
            ),
            (
                "rows read per window",
                thousands(first.rows_per_window as f64),
                thousands(last.rows_per_window as f64),
                rows,
                rows <= FLAT,
            ),
        ]
    }
}

impl Report for HistoryReport {
    fn text(&self) -> String {
        let mut s = self.head().text();
        let _ = writeln!(s, "parameters   {}", self.parameters());
        let _ = writeln!(
            s,
            "{:>28}  {:<11}  {:>12}  {:>10}  {:>20}",
            "history", "layout", "due hour p50", "rows/window", "one window p50/p90"
        );
        for [size, layout, hour, rows, one] in self.rows() {
            let _ = writeln!(
                s,
                "{size:>28}  {layout:<11}  {hour:>12}  {rows:>10}  {one:>20}"
            );
        }
        for (what, first, last, ratio, met) in self.goals() {
            let _ = writeln!(
                s,
                "goal         by time, {what}: {first} -> {last} ({ratio:.2}x, at most {FLAT}x): {}",
                if met { "PASS" } else { "MISS" }
            );
        }
        s
    }

    fn markdown(&self) -> String {
        let mut s = self.head().markdown();
        let _ = writeln!(s, "| parameters | {} |", self.parameters());
        let _ = writeln!(
            s,
            "\n| history before the hour (rows: all customers and meters) | layout | due hour: \
             every window, p50 | rows read per window | one window (`GET /v1/usage`): p50 / \
             p90 |\n|---|---|---|---|---|"
        );
        for row in self.rows() {
            let _ = writeln!(s, "| {} |", row.join(" | "));
        }
        let _ = writeln!(
            s,
            "\n| goal (ordered by time) | shortest history | longest history | ratio | result \
             |\n|---|---|---|---|---|"
        );
        for (what, first, last, ratio, met) in self.goals() {
            let _ = writeln!(
                s,
                "| {what} within {FLAT}x | {first} | {last} | {ratio:.2}x | **{}** |",
                if met { "PASS" } else { "MISS" }
            );
        }
        s
    }
}
