//! The `stripe-sink` binary: configuration from the environment, then [`stripe_sink::startup::run`].

fn main() -> std::process::ExitCode {
    meterline_common::service::main(
        "stripe-sink",
        stripe_sink::Config::from_env,
        stripe_sink::startup::run,
    )
}
