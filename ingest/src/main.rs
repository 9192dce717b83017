//! The `ingest` binary: configuration from the environment, then [`ingest::startup::run`].

fn main() -> std::process::ExitCode {
    meterline_common::service::main("ingest", ingest::Config::from_env, ingest::startup::run)
}
