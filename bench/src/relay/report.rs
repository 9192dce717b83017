//! The relay benchmark's result: the terminal block and the `relay` section of
//! `docs/benchmarks.md`: the relay's latency next to raw produces of the same messages.

use std::fmt::Write as _;

use crate::procstat::Machine;
use crate::report::{ms, thousands, two_phase_cpu_table, Head, Latency, Phase, Report};

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
    pub baseline: Phase,
    pub baseline_latency: Latency,
    pub relay: Phase,
    pub relay_latency: Latency,
    /// Messages the measured pass added to `stripe.webhooks` (watermarks).
    pub published: usize,
}

impl RelayReport {
    /// What opens the terminal block and the docs section.
    fn head(&self) -> Head<'_> {
        Head::new("relay", &self.machine, self.date)
            .before_baseline(self.load_before_baseline)
            .load(self.load_before_relay, "before relay", "before the relay")
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

    /// The baseline's and the relay's latency, and their rate and time
    /// (`<rate> <what>/s, <seconds><unit>`).
    fn passes(&self, unit: &str) -> [(String, String); 2] {
        let pass = |latency: &Latency, phase: &Phase, what: &str| {
            let rate = thousands(phase.rate(self.deliveries));
            let seconds = phase.elapsed.as_secs_f64();
            let rate = format!("{rate} {what}/s, {seconds:.2}{unit}");
            (Self::latency_text(latency), rate)
        };
        [
            pass(&self.baseline_latency, &self.baseline, "produces"),
            pass(&self.relay_latency, &self.relay, "deliveries"),
        ]
    }
}

impl Report for RelayReport {
    fn text(&self) -> String {
        let mut s = self.head().text();
        let m = &self.machine;
        let _ = writeln!(s, "parameters   {}", self.parameters());
        let [(base_latency, base_rate), (latency, rate)] = self.passes("s");
        let _ = writeln!(
            s,
            "baseline     {base_latency}  ({base_rate}, raw produce -> ack)"
        );
        let _ = writeln!(s, "relay        {latency}  ({rate}, request -> 200)");
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
        self.baseline.cpu_text(&mut s, "baseline", m.cores);
        self.relay.cpu_text(&mut s, "relay", m.cores);
        s
    }

    fn markdown(&self) -> String {
        let m = &self.machine;
        let mut s = self.head().markdown();
        let _ = writeln!(s, "| parameters | {} |", self.parameters());
        let [(base_latency, base_rate), (latency, rate)] = self.passes(" s");
        let _ = writeln!(
            s,
            "| **relay: signed request -> 200** (Kafka acked) | **{latency}** ({rate}) |"
        );
        let _ = writeln!(
            s,
            "| baseline: raw produce -> ack of the same messages, one at a time per task | {base_latency} ({base_rate}) |"
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
        let names = [
            "webhook-relay",
            "kafka broker",
            "postgresql (all backends)",
            "meterline-bench (load generator)",
        ];
        let phases = [&self.baseline, &self.relay];
        let per = (10_000.0, self.deliveries as f64, "deliveries");
        two_phase_cpu_table(&mut s, "relay", &names, phases, per, m.cores);
        s
    }
}
