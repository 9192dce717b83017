//! `meterline-bench chaos`: runs the chaos test (`tests/tests/it/chaos.rs`) at a chosen scale
//! and writes its result to the docs, with the machine, the commit, the command and the time
//! it took, instead of a copy made by hand.
//!
//! The test spawns the debug builds of the services (what `cargo build --workspace --bins`
//! makes), so this builds them first. The test writes its summary to
//! `target/test-logs/chaos-summary-<events>.txt`; a summary left from an earlier run is removed
//! before the test starts, so the one read afterwards is this run's. A failing test fails the
//! command and leaves the docs as they were.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use tokio::process::Command;

use crate::procstat::{self, Machine};

mod report;
pub use report::ChaosReport;

#[derive(Debug, Clone, clap::Args)]
pub struct Params {
    /// Messages the chaos run writes (`METERLINE_CHAOS_EVENTS`; the test's CI default is
    /// 20,000).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Replace the chaos section of docs/benchmarks.md with this run's result.
    #[arg(long)]
    pub write_docs: bool,
}

const BUILD: [&str; 4] = ["build", "--locked", "--workspace", "--bins"];
const TEST: [&str; 9] = [
    "test",
    "--locked",
    "-p",
    "meterline-tests",
    "--test",
    "it",
    "chaos",
    "--",
    "--nocapture",
];

/// The numbers of the test's summary.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub messages: u64,
    pub distinct: u64,
    pub duplicates: u64,
    pub late: u64,
    pub aggregator_kills: u64,
    pub sink_kills: u64,
    pub kafka_restarts: u64,
    pub clickhouse_restarts: u64,
    pub stripe_429: u64,
    pub stripe_500: u64,
    pub stripe_slow: u64,
    pub stripe_requests: u64,
    pub meter_events_counted: u64,
    pub totals_compared: u64,
    /// Seconds after the stream began.
    pub stream_done: f64,
    pub totals_equal: f64,
    /// The test's own time, setup included.
    pub test_total: f64,
}

impl Summary {
    /// Reads the summary the test writes; `None` names the first line that did not match
    /// (the test's format changed, or the run did not end in equal totals).
    pub fn parse(text: &str) -> Result<Summary, String> {
        if !text.contains("all equal to the ground truth") {
            return Err("the summary does not say the totals equal the ground truth".into());
        }
        let after = |marker: &str| -> Result<f64, String> {
            let rest = &text[text
                .find(marker)
                .ok_or_else(|| format!("`{marker}` not in the summary"))?
                + marker.len()..];
            leading_number(rest).ok_or_else(|| format!("no number after `{marker}`"))
        };
        let before = |marker: &str| -> Result<f64, String> {
            let head = &text[..text
                .find(marker)
                .ok_or_else(|| format!("`{marker}` not in the summary"))?];
            let token = head.rsplit([' ', '(', '\n']).next().unwrap_or_default();
            leading_number(token).ok_or_else(|| format!("no number before `{marker}`"))
        };
        let whole = |n: f64| n as u64;
        Ok(Summary {
            messages: whole(after("chaos run: ")?),
            distinct: whole(before(" distinct events")?),
            duplicates: whole(before(" duplicated ids")?),
            late: whole(before(" late by")?),
            aggregator_kills: whole(after("aggregator SIGKILLed ")?),
            sink_kills: whole(after("stripe-sink SIGKILLed ")?),
            kafka_restarts: whole(after("kafka broker restarted ")?),
            clickhouse_restarts: whole(after("clickhouse server restarted ")?),
            stripe_429: whole(before(" x 429")?),
            stripe_500: whole(before(" x 500")?),
            stripe_slow: whole(before(" slow past")?),
            stripe_requests: whole(before(" stripe requests in all")?),
            meter_events_counted: whole(before(" meter events counted")?),
            totals_compared: whole(after("compared: ")?),
            stream_done: after("stream and controller done ")?,
            totals_equal: after("totals equal at ")?,
            test_total: after(", total ")?,
        })
    }
}

/// The number a text starts with (`12`, `404.5`; a unit right after it, as in `404.5s`, is
/// left).
fn leading_number(text: &str) -> Option<f64> {
    let text = text.trim_start();
    let end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    text[..end].trim_end_matches('.').parse().ok()
}

pub async fn run(params: &Params) -> anyhow::Result<ChaosReport> {
    if params.events == 0 {
        bail!("--events must be at least 1");
    }
    let root = meterline_tests::stack::repo_root();
    let machine = Machine::read();
    let date = time::OffsetDateTime::now_utc();
    let commit = commit(&root).await;
    let summary_path = root
        .join("target/test-logs")
        .join(format!("chaos-summary-{}.txt", params.events));
    match std::fs::remove_file(&summary_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("removing {}", summary_path.display()));
        }
    }

    let started = Instant::now();
    cargo(&root, &BUILD, None).await?;
    let build = started.elapsed();
    let load_before = procstat::load_average();
    let started = Instant::now();
    cargo(&root, &TEST, Some(params.events)).await?;
    let test = started.elapsed();
    let load_after = procstat::load_average();

    let verbatim = std::fs::read_to_string(&summary_path)
        .with_context(|| format!("reading {} after the test", summary_path.display()))?;
    let summary = Summary::parse(&verbatim)
        .map_err(|e| anyhow::anyhow!("{}: {e}", summary_path.display()))?;
    Ok(ChaosReport {
        machine,
        date,
        commit,
        events: params.events,
        load_before,
        load_after,
        build,
        test,
        summary,
        verbatim,
    })
}

/// Runs cargo in the repository with its output passed through; fails unless it succeeds.
async fn cargo(root: &Path, args: &[&str], chaos_events: Option<u64>) -> anyhow::Result<()> {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.args(args).current_dir(root);
    if let Some(events) = chaos_events {
        command.env("METERLINE_CHAOS_EVENTS", events.to_string());
    }
    eprintln!("chaos: cargo {}", args.join(" "));
    let status = command
        .status()
        .await
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed with {status}", args.join(" "));
    }
    Ok(())
}

/// `abc1234`, with the top-level folders of uncommitted changes when there are any (another
/// engineer's work in progress shares the tree; the reader should know what was built).
async fn commit(root: &Path) -> String {
    let git = |args: &'static [&'static str]| {
        let root = root.to_path_buf();
        async move {
            Command::new("git")
                .args(args)
                .current_dir(root)
                .output()
                .await
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        }
    };
    let head = git(&["rev-parse", "--short", "HEAD"])
        .await
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let status = git(&["status", "--porcelain"]).await.unwrap_or_default();
    let mut dirty: Vec<String> = status
        .lines()
        .filter_map(|l| l.get(3..))
        .map(|path| match path.split_once('/') {
            Some((top, _)) => format!("{top}/"),
            None => path.to_owned(),
        })
        .collect();
    dirty.sort();
    dirty.dedup();
    if dirty.is_empty() {
        head
    } else {
        format!("{head} with uncommitted changes in {}", dirty.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUMMARY: &str = "\
chaos run: 1000000 messages (949856 distinct events, 50144 duplicated ids, 19156 late by 1-4 min, 9227 on a window boundary) over 50 customers and 3 meters, 1-minute windows, grace 0
chaos: aggregator SIGKILLed 4 times, stripe-sink SIGKILLed 4 times (each restarted), kafka broker restarted 1 time(s), clickhouse server restarted 1 time(s)
stripe faults injected on meter events: 2498 x 429, 472 x 500, 245 slow past the sink's timeout (3 s vs 2 s), 0 dropped; 26703 stripe requests in all
stripe: 21311 meter events counted (0 negative corrections)
compared: 1755 (customer, meter, window) totals, all equal to the ground truth, also through 1755 meter event summaries:
  calls (api_calls): 949856 units in 594 windows
elapsed: setup 6.9s, stream and controller done 404.5s after the stream began, totals equal at 457.4s (checked from then on), total 487.5s
timeline:
     40.1s SIGKILL aggregator
";

    #[test]
    fn the_tests_summary_is_read() {
        let s = Summary::parse(SUMMARY).unwrap();
        assert_eq!(
            (s.messages, s.distinct, s.duplicates, s.late),
            (1_000_000, 949_856, 50_144, 19_156)
        );
        assert_eq!(
            (
                s.aggregator_kills,
                s.sink_kills,
                s.kafka_restarts,
                s.clickhouse_restarts
            ),
            (4, 4, 1, 1)
        );
        assert_eq!(
            (s.stripe_429, s.stripe_500, s.stripe_slow, s.stripe_requests),
            (2498, 472, 245, 26_703)
        );
        assert_eq!((s.meter_events_counted, s.totals_compared), (21_311, 1755));
        assert_eq!(
            (s.stream_done, s.totals_equal, s.test_total),
            (404.5, 457.4, 487.5)
        );
    }

    #[test]
    fn a_summary_without_equal_totals_is_refused() {
        let wrong = SUMMARY.replace("all equal to the ground truth", "3 differ");
        assert!(Summary::parse(&wrong).is_err());
        assert!(Summary::parse("all equal to the ground truth").is_err());
    }

    #[test]
    fn numbers_lead_text() {
        assert_eq!(leading_number("404.5s after"), Some(404.5));
        assert_eq!(leading_number(" 12 times"), Some(12.0));
        assert_eq!(leading_number("x"), None);
    }
}
