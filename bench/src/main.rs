//! `meterline-bench`: benchmarks against the real local stack (`dev/up`); `dev/bench` builds
//! everything in release mode and runs them.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meterline_bench::report::{self, Report};
use meterline_bench::{aggregator, chaos, history, ingest, pipeline, relay, sink};

#[derive(Parser)]
#[command(
    name = "meterline-bench",
    about = "meterline benchmarks on the local stack"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Ingest (HTTP bulk -> Kafka acked) against a raw Kafka producer, in one run.
    Ingest(ingest::Params),
    /// Aggregator (usage.raw -> ClickHouse) against direct inserts of the same rows, in one
    /// run, then the publish lag of live windows.
    Aggregator(aggregator::Params),
    /// Webhook relay latency (signed delivery -> Kafka acked -> 200) against raw produces of
    /// the same messages, in one run.
    Relay(relay::Params),
    /// Stripe-sink pacing: achieved meter event rate against each configured limit, next to
    /// a plain client with no limiter, in one run.
    Sink(sink::Params),
    /// The whole pipeline under ingest's highest load: latency from a window falling due to
    /// Stripe receiving it, and each service's memory, next to the bare Kafka and HTTP path.
    Pipeline(pipeline::Params),
    /// One window total's latency as the customers' history grows, on events_processed
    /// ordered by event id (before ClickHouse migration 5) and ordered by time.
    History(history::Params),
    /// Runs the chaos test (debug builds) at a chosen scale and reports its result.
    Chaos(chaos::Params),
}

/// Prints a result and, with `--write-docs`, replaces its section of docs/benchmarks.md.
fn finish(section: &str, write_docs: bool, report: &impl Report) -> anyhow::Result<()> {
    println!("{}", report.text());
    if write_docs {
        let path = meterline_tests::stack::repo_root().join("docs/benchmarks.md");
        report::replace_section(&path, section, &report.markdown())?;
        println!("wrote the {section} section of {}", path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("meterline-bench: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Ingest(p) => finish("ingest", p.write_docs, &ingest::run(&p).await?),
            Command::Aggregator(p) => {
                finish("aggregator", p.write_docs, &aggregator::run(&p).await?)
            }
            Command::Relay(p) => finish("relay", p.write_docs, &relay::run(&p).await?),
            Command::Sink(p) => finish("sink", p.write_docs, &sink::run(&p).await?),
            Command::Pipeline(p) => finish("pipeline", p.write_docs, &pipeline::run(&p).await?),
            Command::History(p) => finish("history", p.write_docs, &history::run(&p).await?),
            Command::Chaos(p) => finish("chaos", p.write_docs, &chaos::run(&p).await?),
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meterline-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
