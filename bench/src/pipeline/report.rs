//! The pipeline benchmark's result: the terminal block and the `pipeline` section of
//! `docs/benchmarks.md`: window due -> Stripe latency, ingest's sustained rate, each service's
//! memory and CPU, next to the bare Kafka -> Kafka -> HTTP path.

use std::fmt::Write as _;
use std::time::Duration;

use time::OffsetDateTime;

use super::{Params, SERVICES};
use crate::procstat::{Machine, Memory};
use crate::report::{cpu_cell, find_cpu, ms, thousands, title_line, Head, Latency, Phase, Report};

pub struct ServiceMemory {
    pub name: &'static str,
    /// After start-up and configuration, before the load.
    pub idle: Memory,
    /// At the end of the run (`peak_kib` is the peak of the whole run).
    pub end: Memory,
}

pub struct PipelineReport {
    pub machine: Machine,
    pub date: OffsetDateTime,
    pub load_before_baseline: f64,
    pub load_before_pipeline: f64,
    pub params: Params,
    pub baseline: Latency,
    pub events: u64,
    pub requests: Latency,
    /// How long ingest was loaded, and the CPU each process used meanwhile.
    pub load: Phase,
    /// Rows in `events_processed` when the load ended, and the rows expected (2 per event).
    pub rows_at_load_end: u64,
    pub rows_expected: u64,
    /// From the load's end until every row was in ClickHouse.
    pub catch_up: Duration,
    pub windows: usize,
    /// Window due -> its first meter event received.
    pub first: Latency,
    /// Window due -> the meter event that made Stripe's total complete.
    pub complete: Latency,
    /// Window due -> its first total acknowledged on `usage.windows`: the aggregator's mean,
    /// and the publications it averages.
    pub published: Option<(Duration, u64)>,
    /// Window due -> its first total recorded in the sink's ledger (`created_at`).
    pub recorded: Latency,
    /// Window due -> its first meter event written to the ledger, claimed and about to go
    /// out (`stripe_sync_sends.created_at`).
    pub send_written: Latency,
    pub meter_events: usize,
    pub too_many: usize,
    pub webhooks: u64,
    pub memory: Vec<ServiceMemory>,
}

impl ServiceMemory {
    /// Idle, peak and end, in MiB.
    fn mib(&self) -> (f64, f64, f64) {
        let mib = |kib: u64| kib as f64 / 1024.0;
        (
            mib(self.idle.rss_kib),
            mib(self.end.peak_kib),
            mib(self.end.rss_kib),
        )
    }
}

impl PipelineReport {
    /// What opens the terminal block and the docs section.
    fn head(&self) -> Head<'_> {
        Head::new("pipeline", &self.machine, self.date)
            .load(self.load_before_baseline, "", "before the baseline")
            .load(self.load_before_pipeline, "", "before the pipeline's load")
    }

    pub fn rate(&self) -> f64 {
        self.events as f64 / self.load.elapsed.as_secs_f64()
    }

    fn latency_text(l: &Latency) -> String {
        format!("{} ({} windows)", l.seconds(), thousands(l.count as f64))
    }

    fn baseline_text(&self) -> String {
        format!(
            "{} ({} messages, 20 a second)",
            self.baseline.millis(1),
            self.baseline.count
        )
    }

    fn load_text(&self) -> String {
        if self.params.rate == 0 {
            format!(
                "{} clients posting bulk requests of {} events back to back (as fast as ingest answers) for {} s",
                self.params.concurrency,
                thousands(self.params.batch as f64),
                self.params.seconds
            )
        } else {
            format!(
                "{} events/s in bulk requests of {} from {} clients for {} s",
                thousands(self.params.rate as f64),
                thousands(self.params.batch as f64),
                self.params.concurrency,
                self.params.seconds
            )
        }
    }

    fn published_text(&self) -> Option<String> {
        let (mean, count) = self.published?;
        Some(format!(
            "mean {:.2} s over {} first publications (aggregator metric `aggregator_window_publish_lag_seconds`)",
            mean.as_secs_f64(),
            thousands(count as f64)
        ))
    }

    fn kept_up(&self) -> String {
        format!(
            "{} of {} rows in `events_processed` when the load ended ({:.1}%); all of them {:.1} s later",
            thousands(self.rows_at_load_end as f64),
            thousands(self.rows_expected as f64),
            100.0 * self.rows_at_load_end as f64 / self.rows_expected.max(1) as f64,
            self.catch_up.as_secs_f64()
        )
    }
}

impl Report for PipelineReport {
    fn text(&self) -> String {
        let mut s = String::new();
        title_line(&mut s, "pipeline benchmark", self.date);
        let _ = writeln!(
            s,
            "load         {}; aggregator batch wait {} ms",
            self.load_text(),
            self.params.batch_wait_ms
        );
        let _ = writeln!(
            s,
            "sustained    {} events/s ({} events in {:.1}s)",
            thousands(self.rate()),
            thousands(self.events as f64),
            self.load.elapsed.as_secs_f64()
        );
        let _ = writeln!(s, "aggregator   {}", self.kept_up());
        let _ = writeln!(s, "due->first   {}", Self::latency_text(&self.first));
        let _ = writeln!(s, "due->total   {}", Self::latency_text(&self.complete));
        if let Some(published) = self.published_text() {
            let _ = writeln!(s, "due->topic   {published}");
        }
        let _ = writeln!(s, "due->ledger  {}", Self::latency_text(&self.recorded));
        let _ = writeln!(s, "due->send    {}", Self::latency_text(&self.send_written));
        let _ = writeln!(s, "baseline     {}", self.baseline_text());
        for m in &self.memory {
            let (idle, peak, end) = m.mib();
            let _ = writeln!(
                s,
                "memory       {:<14} idle {idle:>6.1} MiB, peak {peak:>7.1} MiB, end {end:>7.1} MiB",
                m.name
            );
        }
        s
    }

    fn markdown(&self) -> String {
        let m = &self.machine;
        let p = &self.params;
        let mut s = self.head().markdown();
        let _ = writeln!(
            s,
            "| parameters | {}; {} customers, a COUNT and a SUM meter on `api.request`, 1-minute windows, grace 0, aggregator batch wait {} ms; Stripe account limit and sink rate {}/s; {} signed webhook deliveries/s to the relay meanwhile |",
            self.load_text(),
            thousands(p.customers as f64),
            p.batch_wait_ms,
            thousands(f64::from(p.stripe_rate)),
            p.webhook_rate
        );
        let _ = writeln!(
            s,
            "| **ingest sustained** | **{} events/s** ({} events accepted in {:.1} s; bulk request p50 {:.0} ms, p99 {:.0} ms) |",
            thousands(self.rate()),
            thousands(self.events as f64),
            self.load.elapsed.as_secs_f64(),
            ms(self.requests.p50),
            ms(self.requests.p99)
        );
        let _ = writeln!(s, "| aggregator kept up? | {} |", self.kept_up());
        let _ = writeln!(
            s,
            "| **window due -> first meter event received by Stripe** | **{}** |",
            Self::latency_text(&self.first)
        );
        let _ = writeln!(
            s,
            "| window due -> Stripe's total complete | {} |",
            Self::latency_text(&self.complete)
        );
        if let Some(published) = self.published_text() {
            let _ = writeln!(
                s,
                "| window due -> its total on `usage.windows` (the aggregator's share) | {published} |"
            );
        }
        let _ = writeln!(
            s,
            "| window due -> its first total recorded in the sink's ledger | {} |",
            Self::latency_text(&self.recorded)
        );
        let _ = writeln!(
            s,
            "| window due -> its first meter event claimed and written to the ledger, about to go out | {} |",
            Self::latency_text(&self.send_written)
        );
        let _ = writeln!(
            s,
            "| baseline: produce -> consume -> produce (acked) -> consume -> one POST to the stand-in | {} |",
            self.baseline_text()
        );
        let _ = writeln!(
            s,
            "| checked | Stripe's counted total of each of the {} windows equals the events ingest accepted for it; {} meter events accepted, {} answered 429; {} webhook deliveries answered 200 |",
            thousands(self.windows as f64),
            thousands(self.meter_events as f64),
            self.too_many,
            thousands(self.webhooks as f64)
        );
        let _ = writeln!(
            s,
            "\nResident memory of each service (`/proc/<pid>/status`): idle is `VmRSS` after start-up and configuration, before the load (the baseline); peak is `VmHWM` at the end of the run, the most it ever held.\n\n\
             | service | idle (baseline) | peak during the run | at the end | peak / idle |\n|---|---|---|---|---|"
        );
        for mem in &self.memory {
            let (idle, peak, end) = mem.mib();
            let growth = mem.end.peak_kib as f64 / mem.idle.rss_kib.max(1) as f64;
            let _ = writeln!(
                s,
                "| {} | {idle:.1} MiB | **{peak:.1} MiB** | {end:.1} MiB | {growth:.1}x |",
                mem.name
            );
        }
        let _ = writeln!(
            s,
            "\nCPU seconds (user + system) during the load ({:.1} s, {:.1} core-seconds available):\n\n| process | load phase |\n|---|---|",
            self.load.elapsed.as_secs_f64(),
            self.load.available(m.cores)
        );
        for name in SERVICES.iter().copied().chain([
            "kafka broker",
            "clickhouse server",
            "postgresql (all backends)",
            "meterline-bench",
        ]) {
            if let Some(cpu) = find_cpu(&self.load.cpu, name) {
                let _ = writeln!(s, "| {name} | {} |", cpu_cell(Some(cpu)));
            }
        }
        s
    }
}
