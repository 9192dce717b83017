//! The history benchmark's result: the terminal block and the `history` section of
//! `docs/benchmarks.md`: a window total's latency by history size, on each layout.

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

/// The window reads of one history size on one layout.
pub struct Reads {
    pub layout: Layout,
    /// Rows before the measured hour, over all customers.
    pub history: u64,
    pub latency: Latency,
    /// The 1-minute load before its namespace was filled.
    pub load: f64,
}

pub struct HistoryReport {
    pub machine: Machine,
    pub date: time::OffsetDateTime,
    pub customers: u64,
    pub hour_events: u64,
    pub history_days: i64,
    pub reads: usize,
    pub cells: Vec<Reads>,
}

impl HistoryReport {
    fn head(&self) -> Head<'_> {
        let load = self.cells.first().map_or(0.0, |c| c.load);
        Head::new("history", &self.machine, self.date).load(load, "at start", "at the start")
    }

    fn parameters(&self) -> String {
        format!(
            "{} customers, each with {} events in the measured hour and an equal share of the \
             history spread over the {} days before it; one meter; {} window totals read per \
             history size and layout, one customer's hour each, in turn, as `GET /v1/usage` \
             reads them; tables merged (`OPTIMIZE FINAL`) before the reads",
            self.customers, self.hour_events, self.history_days, self.reads
        )
    }

    /// One row per history size, in the run's order: the size, its reads on each layout
    /// (p50 / p90), and the ratio of their p50s.
    fn rows(&self) -> Vec<[String; 4]> {
        let mut sizes: Vec<u64> = Vec::new();
        for cell in &self.cells {
            if !sizes.contains(&cell.history) {
                sizes.push(cell.history);
            }
        }
        sizes
            .into_iter()
            .map(|size| {
                let of = |layout| {
                    self.cells
                        .iter()
                        .find(|c| c.history == size && c.layout == layout)
                        .map(|c| &c.latency)
                };
                let (by_id, by_time) = (of(Layout::ById), of(Layout::ByTime));
                let cell = |latency: Option<&Latency>| {
                    latency.map_or("-".to_owned(), |l| {
                        format!("{:.2} / {:.2} ms", ms(l.p50), ms(l.p90))
                    })
                };
                let ratio = match (by_id, by_time) {
                    (Some(a), Some(b)) if !b.p50.is_zero() => {
                        format!("{:.1}x", ms(a.p50) / ms(b.p50))
                    }
                    _ => "-".to_owned(),
                };
                [thousands(size as f64), cell(by_id), cell(by_time), ratio]
            })
            .collect()
    }
}

impl Report for HistoryReport {
    fn text(&self) -> String {
        let mut s = self.head().text();
        let _ = writeln!(s, "parameters   {}", self.parameters());
        let _ = writeln!(
            s,
            "{:>12}  {:>22}  {:>22}  {:>8}",
            "history", "by event id p50/p90", "by time p50/p90", "ratio"
        );
        for [size, by_id, by_time, ratio] in self.rows() {
            let _ = writeln!(s, "{size:>12}  {by_id:>22}  {by_time:>22}  {ratio:>8}");
        }
        s
    }

    fn markdown(&self) -> String {
        let mut s = self.head().markdown();
        let _ = writeln!(s, "| parameters | {} |", self.parameters());
        let _ = writeln!(
            s,
            "\n| history rows (all customers) | ordered by event id: p50 / p90 | ordered by time: \
             p50 / p90 | p50 by event id / by time |\n|---|---|---|---|"
        );
        for row in self.rows() {
            let _ = writeln!(s, "| {} |", row.join(" | "));
        }
        s
    }
}
