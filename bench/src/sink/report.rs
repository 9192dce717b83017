//! The sink pacing benchmark's result: the terminal block and the `sink` section of
//! `docs/benchmarks.md`: the achieved meter event rate against each configured limit, next to
//! a plain client with no limiter.

use std::fmt::Write as _;
use std::time::Duration;

use time::OffsetDateTime;

use super::{Pace, METERS};
use crate::procstat::Machine;
use crate::report::{thousands, verdict, Head, Report};

/// One configured limit's phase.
pub struct LimitPhase {
    pub limit: u32,
    pub windows: usize,
    /// From writing the window totals to the first meter event arriving.
    pub first_after: Duration,
    pub pace: Pace,
}

pub struct SinkReport {
    pub machine: Machine,
    pub date: OffsetDateTime,
    pub customers: usize,
    pub concurrency: usize,
    pub baseline: Pace,
    pub phases: Vec<LimitPhase>,
}

impl SinkReport {
    /// What opens the terminal block and the docs section.
    fn head(&self) -> Head<'_> {
        let head = Head::new("sink", &self.machine, self.date).titled("sink pacing benchmark");
        let head = head.load(self.baseline.load_before, "", "before the baseline");
        self.phases.iter().fold(head, |head, p| {
            head.load(p.pace.load_before, "", format!("before {}/s", p.limit))
        })
    }

    fn limit_ok(phase: &LimitPhase) -> bool {
        phase.pace.busiest_second <= phase.limit as usize && phase.pace.too_many == 0
    }
}

impl Report for SinkReport {
    fn text(&self) -> String {
        let mut s = self.head().text();
        let b = &self.baseline;
        let _ = writeln!(
            s,
            "baseline     {:>8.1} meter events/s  plain client, {} connections, no limiter ({} events in {:.2}s, busiest second {})",
            b.rate(),
            self.concurrency,
            b.accepted,
            b.span.as_secs_f64(),
            b.busiest_second
        );
        for p in &self.phases {
            let _ = writeln!(
                s,
                "limit {:>5}/s {:>7.1} meter events/s  ({:.2}x the limit; busiest second {}; {} x 429, {} other errors; {} windows; first after {:.2}s)  {}",
                p.limit,
                p.pace.rate(),
                p.pace.rate() / f64::from(p.limit),
                p.pace.busiest_second,
                p.pace.too_many,
                p.pace.other,
                p.windows,
                p.first_after.as_secs_f64(),
                verdict(Self::limit_ok(p))
            );
        }
        s
    }

    fn markdown(&self) -> String {
        let mut s = self.head().markdown();
        let _ = writeln!(
            s,
            "| parameters | {} customers x {} `sum` meters, hourly windows ending 1 h and more ago; per configured limit, limit x {} s window totals written to `usage.windows` at once; the stand-in account's own limit is the configured one |",
            thousands(self.customers as f64),
            METERS.len(),
            self.phases
                .first()
                .map(|p| p.windows / p.limit.max(1) as usize)
                .unwrap_or_default()
        );
        let b = &self.baseline;
        let _ = writeln!(
            s,
            "| **baseline**: plain HTTP client, {} connections, no limiter, account without a practical limit | **{} meter events/s** ({} accepted in {:.2} s; busiest 1-second span {}; {} x 429) |",
            self.concurrency,
            thousands(b.rate()),
            thousands(b.accepted as f64),
            b.span.as_secs_f64(),
            thousands(b.busiest_second as f64),
            b.too_many
        );
        let _ = writeln!(
            s,
            "\n| configured limit | window totals | **achieved** (first to last arrival) | achieved / limit | busiest 1-second span | 429s | other errors | first meter event after the totals were written | baseline / achieved | within the limit |\n\
             |---|---|---|---|---|---|---|---|---|---|"
        );
        for p in &self.phases {
            let _ = writeln!(
                s,
                "| {}/s | {} | **{:.2}/s** ({:.1} s) | {:.3} | {} | {} | {} | {:.2} s | {:.0}x | **{}** |",
                p.limit,
                thousands(p.windows as f64),
                p.pace.rate(),
                p.pace.span.as_secs_f64(),
                p.pace.rate() / f64::from(p.limit),
                p.pace.busiest_second,
                p.pace.too_many,
                p.pace.other,
                p.first_after.as_secs_f64(),
                b.rate() / p.pace.rate().max(f64::MIN_POSITIVE),
                verdict(Self::limit_ok(p))
            );
        }
        let _ = writeln!(
            s,
            "\nEvery phase: Stripe's counted totals per customer and meter equal the window totals loaded (checked; the run fails otherwise)."
        );
        s
    }
}
