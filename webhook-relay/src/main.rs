//! The `webhook-relay` binary: configuration from the environment, then [`webhook_relay::startup::run`].

fn main() -> std::process::ExitCode {
    meterline_common::service::main(
        "webhook-relay",
        webhook_relay::Config::from_env,
        webhook_relay::startup::run,
    )
}
