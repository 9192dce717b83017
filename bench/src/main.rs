//! `meterline-bench`: benchmarks against the real local stack (`dev/up`); `dev/bench` builds
//! everything in release mode and runs them.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use meterline_bench::{aggregator, ingest, relay, report};

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
                let result = ingest::run(&params).await?;
                println!("{}", result.text());
                if params.write_docs {
                    let path = meterline_tests::stack::repo_root().join("docs/benchmarks.md");
                    report::replace_section(&path, "ingest", &result.markdown())?;
                    println!("wrote the ingest section of {}", path.display());
                }
                anyhow::Ok(())
            }
            Command::Aggregator(params) => {
                let result = aggregator::run(&params).await?;
                println!("{}", result.text());
                if params.write_docs {
                    let path = meterline_tests::stack::repo_root().join("docs/benchmarks.md");
                    report::replace_section(&path, "aggregator", &result.markdown())?;
                    println!("wrote the aggregator section of {}", path.display());
                }
                anyhow::Ok(())
            }
            Command::Relay(params) => {
                let result = relay::run(&params).await?;
                println!("{}", result.text());
                if params.write_docs {
                    let path = meterline_tests::stack::repo_root().join("docs/benchmarks.md");
                    report::replace_section(&path, "relay", &result.markdown())?;
                    println!("wrote the relay section of {}", path.display());
                }
                anyhow::Ok(())
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
