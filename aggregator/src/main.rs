//! The `aggregator` binary: configuration from the environment, then [`aggregator::startup::run`].

fn main() -> std::process::ExitCode {
    meterline_common::service::main(
        "aggregator",
        aggregator::Config::from_env,
        aggregator::startup::run,
    )
}
