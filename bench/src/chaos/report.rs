//! The chaos run's result: the terminal line and the `chaos` section of `docs/benchmarks.md`,
//! the test's own summary quoted verbatim below the table.

use std::fmt::Write as _;
use std::time::Duration;

use super::{Summary, BUILD, TEST};
use crate::procstat::Machine;
use crate::report::{date_text, thousands, Head, Report};

pub struct ChaosReport {
    pub machine: Machine,
    pub date: time::OffsetDateTime,
    pub commit: String,
    pub events: u64,
    pub load_before: f64,
    pub load_after: f64,
    pub build: Duration,
    pub test: Duration,
    pub summary: Summary,
    /// The summary as the test wrote it.
    pub verbatim: String,
}

impl ChaosReport {
    /// What opens the terminal block and the docs section.
    fn head(&self) -> Head<'_> {
        Head::new("chaos", &self.machine, self.date)
            .load(self.load_before, "", "before the test")
            .load(self.load_after, "", "after")
    }

    fn command(&self) -> String {
        format!(
            "cargo {} && METERLINE_CHAOS_EVENTS={} cargo {}",
            BUILD.join(" "),
            self.events,
            TEST.join(" ")
        )
    }
}

impl Report for ChaosReport {
    fn text(&self) -> String {
        let s = &self.summary;
        format!(
            "== chaos run ({}) ==\ncommit       {}\n{} messages: {} window totals equal to the ground truth; \
             totals equal {:.1}s after the stream began (stream done at {:.1}s); test {:.0}s, build {:.0}s\n",
            date_text(self.date),
            self.commit,
            thousands(s.messages as f64),
            thousands(s.totals_compared as f64),
            s.totals_equal,
            s.stream_done,
            self.test.as_secs_f64(),
            self.build.as_secs_f64()
        )
    }

    fn markdown(&self) -> String {
        let s = &self.summary;
        let mut out = self.head().markdown();
        let _ = writeln!(out, "| commit | {} |", self.commit);
        let _ = writeln!(out, "| command | `{}` |", self.command());
        let _ = writeln!(
            out,
            "| stream | {} messages: {} distinct events, {} repeated ids, {} late by 1-4 min |",
            thousands(s.messages as f64),
            thousands(s.distinct as f64),
            thousands(s.duplicates as f64),
            thousands(s.late as f64)
        );
        let _ = writeln!(
            out,
            "| **result** | **{} (customer, meter, window) totals in Stripe, all equal to the ground truth** ({} meter events counted) |",
            thousands(s.totals_compared as f64),
            thousands(s.meter_events_counted as f64)
        );
        let _ = writeln!(
            out,
            "| timing | stream and controller done {:.1} s after the stream began; **totals equal at {:.1} s** ({:.1} s after); the test {:.0} s in all (its own count: {:.0} s), the debug build before it {:.0} s |",
            s.stream_done,
            s.totals_equal,
            s.totals_equal - s.stream_done,
            self.test.as_secs_f64(),
            s.test_total,
            self.build.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "| faults | aggregator SIGKILLed {} times, stripe-sink {} times, Kafka broker restarted {}, ClickHouse server {}; Stripe answered {} x 429, {} x 500, {} too slow, of {} requests |",
            s.aggregator_kills,
            s.sink_kills,
            s.kafka_restarts,
            s.clickhouse_restarts,
            thousands(s.stripe_429 as f64),
            thousands(s.stripe_500 as f64),
            thousands(s.stripe_slow as f64),
            thousands(s.stripe_requests as f64)
        );
        let _ = writeln!(
            out,
            "\nThe test's summary, verbatim (`target/test-logs/chaos-summary-{}.txt`):\n\n```text\n{}\n```",
            self.events,
            self.verbatim.trim_end()
        );
        out
    }
}
