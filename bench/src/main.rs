//! `meterline-bench`: benchmarks against the real local stack (`dev/up`); `dev/bench` builds
//! everything in release mode and runs them.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meterline_bench::{aggregator, chaos, ingest, pipeline, relay, report, sink};

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
    /// Runs the chaos test (debug builds) at a chosen scale and reports its result.
    Chaos(chaos::Params),
}

/// Prints a result and, with `--write-docs`, replaces its section of docs/benchmarks.md.
fn finish(section: &str, write_docs: bool, text: String, markdown: String) -> anyhow::Result<()> {
    println!("{text}");
    if write_docs {
        let path = meterline_tests::stack::repo_root().join("docs/benchmarks.md");
        report::replace_section(&path, section, &markdown)?;
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
            Command::Ingest(params) => {
                let r = ingest::run(&params).await?;
                finish("ingest", params.write_docs, r.text(), r.markdown())
            }
            Command::Aggregator(params) => {
                let r = aggregator::run(&params).await?;
                finish("aggregator", params.write_docs, r.text(), r.markdown())
            }
            Command::Relay(params) => {
                let r = relay::run(&params).await?;
                finish("relay", params.write_docs, r.text(), r.markdown())
            }
            Command::Sink(params) => {
                let r = sink::run(&params).await?;
                finish("sink", params.write_docs, r.text(), r.markdown())
            }
            Command::Pipeline(params) => {
                let r = pipeline::run(&params).await?;
                finish("pipeline", params.write_docs, r.text(), r.markdown())
            }
            Command::Chaos(params) => {
                let r = chaos::run(&params).await?;
                finish("chaos", params.write_docs, r.text(), r.markdown())
            }
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
