//! meterline's benchmarks, run against the real local stack (`dev/up`) by `dev/bench`.
//!
//! Layout:
//! - [`workload`]: the usage events a benchmark sends, generated once in memory before any
//!   clock starts, and their bulk request bodies.
//! - [`rng`]: the one random generator (SplitMix64), seeded, for every generated event.
//! - [`baseline`]: the raw Kafka producer a subject is compared with.
//! - [`ingest`]: the ingest benchmark (`meterline-bench ingest`): baseline, then the release
//!   `ingest` binary over HTTP, back to back in one run so the ratio shares one machine state.
//! - [`aggregator`]: the aggregator benchmark (`meterline-bench aggregator`): a backlog
//!   pre-loaded into `usage.raw`, inserted directly with the `clickhouse` crate (baseline),
//!   then consumed by the release `aggregator` binary; then a live phase for the publish lag.
//! - [`relay`]: the webhook relay benchmark (`meterline-bench relay`): latency of signed,
//!   valid deliveries through the release `webhook-relay` binary under load, next to raw Kafka
//!   produces of the same messages in the same run.
//! - [`sink`]: the stripe-sink's pacing (`meterline-bench sink`): achieved meter event rate
//!   against each configured limit, next to a plain client with no limiter.
//! - [`pipeline`]: the four services together under ingest's highest load (`meterline-bench
//!   pipeline`): window due -> Stripe latency and each service's memory, next to the bare
//!   Kafka -> Kafka -> HTTP path.
//! - [`chaos`]: runs the chaos test at a chosen scale and reports its result
//!   (`meterline-bench chaos`).
//! - [`recorder`]: a recording pass-through in front of the Stripe stand-in (arrival times of
//!   meter events to the microsecond).
//! - [`procstat`]: everything read from `/proc`: CPU seconds of the processes a phase watches
//!   (a [`procstat::Watchlist`]), resident memory, the stack servers' pids, load, the machine.
//! - [`profile`]: `perf record` of a process and its top symbols.
//! - [`report`]: the result block, and the generated sections of `docs/benchmarks.md`.
//!
//! Rule kept everywhere: every number printed or written comes from the run that prints it;
//! the docs section is replaced whole, never edited by hand.

pub mod aggregator;
pub mod baseline;
pub mod chaos;
pub mod clients;
pub mod ingest;
pub mod pipeline;
pub mod procstat;
pub mod profile;
pub mod recorder;
pub mod relay;
pub mod report;
pub mod rng;
pub mod sink;
pub mod workload;

#[cfg(test)]
mod golden;
