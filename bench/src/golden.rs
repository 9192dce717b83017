//! Every report rendered from fixed numbers and compared byte for byte with the files in
//! `bench/golden/`: the terminal block and the docs section keep their exact format whatever
//! code moves around them. `METERLINE_BENCH_BLESS=1 cargo test -p meterline-bench` rewrites
//! the files after an intended change of format (review the diff).

use std::path::Path;
use std::time::Duration;

use crate::aggregator::{AggregatorReport, BacklogPublication, LiveReport};
use crate::chaos::{ChaosReport, Summary};
use crate::history::{HistoryReport, Layout, Reads};
use crate::ingest::IngestReport;
use crate::pipeline::{self, PipelineReport, ServiceMemory};
use crate::procstat::{ComponentCpu, CpuTimes, Machine, Memory};
use crate::profile::{Entry, Profile};
use crate::relay::RelayReport;
use crate::report::{Latency, Phase, Report};
use crate::rounds::RoundRates;
use crate::sink::{LimitPhase, Pace, SinkReport};

fn check(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(name);
    if std::env::var_os("METERLINE_BENCH_BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    assert_eq!(actual, expected, "{name} differs from {}", path.display());
}

fn machine() -> Machine {
    Machine {
        cores: 2,
        model: "Test CPU @ 2.00GHz".to_owned(),
        memory_gib: 7.75,
        load_at_start: 0.5,
    }
}

fn date() -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(1_764_680_000).unwrap()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn latency(base: u64) -> Latency {
    Latency {
        count: 500,
        p50: ms(base),
        p90: ms(base * 2),
        p99: ms(base * 3 + 1),
        max: ms(base * 5 + 7),
    }
}

fn cpu(names: &[&'static str], scale: f64) -> Vec<ComponentCpu> {
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            ComponentCpu::new(
                name,
                CpuTimes {
                    user: scale * (i as f64 + 1.0) + 0.123,
                    system: scale * 0.5 * (i as f64 + 1.0),
                },
            )
        })
        .collect()
}

fn phase(elapsed_ms: u64, names: &[&'static str], scale: f64) -> Phase {
    Phase {
        elapsed: ms(elapsed_ms),
        cpu: cpu(names, scale),
    }
}

/// A profile, or (`taken` false) the reason there is none.
fn profile(taken: bool, reason: &str) -> Result<Profile, String> {
    if !taken {
        return Err(reason.to_owned());
    }
    let long = format!(
        "core::ptr::drop_in_place<{}>",
        "alloc::vec::Vec<u8>|`x`".repeat(8)
    );
    Ok(Profile {
        samples: 3975,
        entries: vec![
            Entry {
                percent: 20.5,
                dso: "ingest".into(),
                symbol: "serde_json::de::Deserializer<R>::parse_str".into(),
            },
            Entry {
                percent: 10.0,
                dso: "[kernel.kallsyms]".into(),
                symbol: "tcp_sendmsg".into(),
            },
            Entry {
                percent: 5.25,
                dso: "ingest".into(),
                symbol: "LZ4_compress_fast_extState".into(),
            },
            Entry {
                percent: 4.0,
                dso: "libc.so.6".into(),
                symbol: long,
            },
        ],
    })
}

fn round(load: f64, baseline: f64, rate: f64) -> RoundRates {
    RoundRates {
        load_before_baseline: load,
        baseline_rate: baseline,
        rate,
    }
}

fn ingest(profiled: bool) -> IngestReport {
    let names = ["ingest", "kafka broker", "meterline-bench (load generator)"];
    IngestReport {
        machine: machine(),
        date: date(),
        load_before_baseline: 0.71,
        load_before_ingest: 1.234,
        earlier_rounds: vec![
            round(0.5, 210_000.0, 98_765.4),
            round(0.6, 190_000.0, 101_234.5),
        ],
        events: 500_000,
        batch: 1000,
        concurrency: 8,
        customers: 1000,
        partitions: 3,
        body_bytes: 123_456_789,
        baseline: phase(2_345, &names[1..], 1.5),
        ingest: phase(4_567, &names, 2.25),
        latency: latency(12),
        profile: profile(profiled, "disabled (--profile-events 0)"),
        profile_events: 200_000,
    }
}

fn live() -> LiveReport {
    LiveReport {
        customers: 500,
        rate: 2000,
        events: 300_123,
        sending: ms(150_400),
        windows: 3012,
        missing: 1,
        incomplete: 2,
        republished: 3,
        first: latency(800),
        complete: latency(1200),
        histogram: Some((3000, 1.0, 2.5)),
        phase: phase(
            158_900,
            &["aggregator", "kafka broker", "meterline-bench"],
            0.75,
        ),
    }
}

fn aggregator(full: bool) -> AggregatorReport {
    let names = [
        "aggregator",
        "clickhouse server",
        "kafka broker",
        "postgresql (all backends)",
        "meterline-bench",
    ];
    AggregatorReport {
        machine: machine(),
        date: date(),
        load_before_baseline: 0.4,
        load_before_aggregator: 0.8,
        load_before_live: 1.6,
        earlier_rounds: vec![round(0.3, 310_000.0, 160_000.0)],
        events: 1_000_000,
        customers: 2000,
        batch_events: 50_000,
        partitions: 3,
        grace_minutes: if full { 0 } else { 180 },
        backlog_windows: 12_000,
        baseline: phase(3_210, &names[1..], 1.0),
        first_rows: if full { 100_000 } else { 0 },
        consume: phase(6_543, &names, 3.0),
        startup: ms(1_234),
        from_spawn: ms(7_777),
        insert_seconds: full.then_some(2.5),
        inserts: full.then_some(40.0),
        windows_marked: full.then_some(12_000.0),
        marked_batches: full.then_some(40.0),
        publication: BacklogPublication {
            after_last_row: full.then(|| ms(4_321)),
        },
        windows_published: vec![("due", 12_000), ("late", 7)],
        live: full.then(live),
        peak_rss_kib: full.then_some(123_456),
        profile: profile(full, "`perf` could not be run: not found"),
        profile_events: 300_000,
    }
}

fn relay() -> RelayReport {
    let names = [
        "webhook-relay",
        "kafka broker",
        "postgresql (all backends)",
        "meterline-bench (load generator)",
    ];
    RelayReport {
        machine: machine(),
        date: date(),
        load_before_baseline: 0.25,
        load_before_relay: 0.5,
        deliveries: 20_000,
        concurrency: 16,
        partitions: 3,
        average_body_bytes: 1042,
        baseline: phase(2_000, &names[1..], 0.5),
        baseline_latency: latency(2),
        relay: phase(3_500, &names, 1.25),
        relay_latency: latency(3),
        published: 20_000,
    }
}

fn pace(accepted: usize, span: u64, load: f64) -> Pace {
    Pace {
        requests: accepted + 3,
        accepted,
        too_many: 2,
        other: 1,
        span: ms(span),
        busiest_second: 26,
        load_before: load,
    }
}

fn sink() -> SinkReport {
    SinkReport {
        machine: machine(),
        date: date(),
        customers: 100,
        concurrency: 8,
        baseline: pace(20_000, 4_321, 0.3),
        phases: vec![
            LimitPhase {
                limit: 25,
                windows: 1000,
                first_after: ms(1_234),
                pace: Pace {
                    too_many: 0,
                    busiest_second: 25,
                    ..pace(1000, 39_960, 0.4)
                },
            },
            LimitPhase {
                limit: 100,
                windows: 4000,
                first_after: ms(987),
                pace: pace(4000, 39_990, 0.5),
            },
        ],
    }
}

fn pipeline(rate: u64) -> PipelineReport {
    let memory = |name, idle, peak, end| ServiceMemory {
        name,
        idle: Memory {
            rss_kib: idle,
            peak_kib: idle,
        },
        end: Memory {
            rss_kib: end,
            peak_kib: peak,
        },
    };
    PipelineReport {
        machine: machine(),
        date: date(),
        load_before_baseline: 0.2,
        load_before_pipeline: 0.9,
        params: pipeline::Params {
            seconds: 60,
            batch: 1000,
            concurrency: 8,
            rate,
            customers: 200,
            stripe_rate: 1000,
            webhook_rate: 50,
            batch_wait_ms: 1000,
            baseline_messages: 300,
            write_docs: false,
        },
        baseline: latency(4),
        events: 3_456_000,
        requests: latency(90),
        load: phase(
            60_123,
            &["ingest", "aggregator", "kafka broker", "meterline-bench"],
            5.0,
        ),
        rows_at_load_end: 6_800_000,
        rows_expected: 6_912_000,
        catch_up: ms(2_345),
        windows: 400,
        first: latency(1_500),
        complete: latency(2_500),
        published: Some((ms(1_100), 400)),
        recorded: latency(1_200),
        send_written: latency(1_450),
        meter_events: 812,
        too_many: 0,
        webhooks: 3000,
        memory: vec![
            memory("ingest", 10_240, 81_920, 40_960),
            memory("aggregator", 20_480, 204_800, 102_400),
        ],
    }
}

fn chaos() -> ChaosReport {
    ChaosReport {
        machine: machine(),
        date: date(),
        commit: "abc1234 with uncommitted changes in bench/".to_owned(),
        events: 1_000_000,
        load_before: 0.3,
        load_after: 1.7,
        build: ms(95_000),
        test: ms(490_000),
        summary: Summary {
            messages: 1_000_000,
            distinct: 949_856,
            duplicates: 50_144,
            late: 19_156,
            aggregator_kills: 4,
            sink_kills: 4,
            kafka_restarts: 1,
            clickhouse_restarts: 1,
            stripe_429: 2498,
            stripe_500: 472,
            stripe_slow: 245,
            stripe_requests: 26_703,
            meter_events_counted: 21_311,
            totals_compared: 1755,
            stream_done: 404.5,
            totals_equal: 457.4,
            test_total: 487.5,
        },
        verbatim: "chaos run: 1000000 messages\ncompared: 1755 totals, all equal\n\n".to_owned(),
    }
}

/// Both renderings of `report`: `<name>.txt` and `<name>.md`.
fn check_report(name: &str, report: &dyn Report) {
    check(&format!("{name}.txt"), &report.text());
    check(&format!("{name}.md"), &report.markdown());
}

#[test]
fn ingest_report_format() {
    check_report("ingest", &ingest(true));
    check_report("ingest-unprofiled", &ingest(false));
}

#[test]
fn aggregator_report_format() {
    check_report("aggregator", &aggregator(true));
    check_report("aggregator-minimal", &aggregator(false));
}

#[test]
fn relay_report_format() {
    check_report("relay", &relay());
}

#[test]
fn sink_report_format() {
    check_report("sink", &sink());
}

#[test]
fn pipeline_report_format() {
    check_report("pipeline", &pipeline(0));
    check_report("pipeline-paced", &pipeline(50_000));
}

#[test]
fn chaos_report_format() {
    check_report("chaos", &chaos());
}

fn history() -> HistoryReport {
    let reads = |layout, months, base, rows| Reads {
        layout,
        months,
        history: months * 80_000,
        latency: latency(base),
        due_hour: latency(base * 10),
        rows_per_window: rows,
        load: 0.75,
    };
    HistoryReport {
        machine: machine(),
        date: date(),
        customers: 1000,
        meters: 2,
        hour_events: 6,
        month_events: 40,
        reads: 50,
        hour_rounds: 5,
        cells: vec![
            reads(Layout::ById, 1, 4, 40),
            reads(Layout::ByTime, 1, 4, 12),
            reads(Layout::ById, 100, 96, 4_000),
            reads(Layout::ByTime, 100, 5, 14),
        ],
    }
}

#[test]
fn history_report_format() {
    check_report("history", &history());
}
