//! meterline's benchmarks, run against the real local stack (`dev/up`) by `dev/bench`.
//!
//! Layout: one folder per benchmark, its `mod.rs` running it and its `report.rs` holding its
//! result (the terminal block and its section of `docs/benchmarks.md`); what several share
//! beside them.
//! - [`ingest`]: `meterline-bench ingest`: the raw producer (baseline), then the release
//!   `ingest` binary over HTTP, in rounds back to back so the ratio shares one machine state.
//! - [`aggregator`]: `meterline-bench aggregator`: a backlog pre-loaded into `usage.raw`
//!   (`backlog.rs`), inserted directly with the `clickhouse` crate (baseline), then consumed by
//!   the release `aggregator` binary; then a live phase for the publish lag (`live.rs`) and the
//!   aggregator's own metrics (`metrics.rs`).
//! - [`relay`]: `meterline-bench relay`: latency of signed, valid deliveries through the
//!   release `webhook-relay` under load, next to raw Kafka produces of the same messages.
//! - [`sink`]: `meterline-bench sink`: the stripe-sink's achieved meter event rate against
//!   each configured limit, next to a plain client with no limiter; the Stripe stand-in behind
//!   the recorder, shared with the pipeline.
//! - [`pipeline`]: `meterline-bench pipeline`: the four services together under ingest's
//!   highest load: window due -> Stripe latency and each service's memory, next to the bare
//!   Kafka -> Kafka -> HTTP path (`bare.rs`).
//! - [`history`]: `meterline-bench history`: one window total's latency as the customers'
//!   history grows, on `events_processed` ordered by event id and ordered by time.
//! - [`chaos`]: `meterline-bench chaos`: runs the chaos test at a chosen scale and reports its
//!   result.
//! - [`report`]: what the results share: latency percentiles, the lines and rows of rounds,
//!   the [`report::Report`] trait, heads, CPU and profile tables, number formatting, and the
//!   replacement of a docs section.
//! - [`rounds`]: ingest's and the aggregator's rounds, run back to back, and the median round
//!   they are judged on.
//! - [`workload`]: the usage events a benchmark sends, generated once in memory before any
//!   clock starts, and their bulk request bodies.
//! - [`rng`]: the one random generator (SplitMix64), seeded, for every generated event.
//! - [`baseline`]: the raw Kafka producer ingest and the relay are compared with, which also
//!   pre-loads the aggregator's backlog.
//! - [`clients`]: concurrent load clients sharing a counter of work, timed requests, ingest's
//!   bulk post.
//! - [`recorder`]: a recording pass-through in front of the Stripe stand-in (arrival times of
//!   meter events to the microsecond).
//! - [`procstat`]: everything read from `/proc`: CPU seconds of the processes a phase watches
//!   (a [`procstat::Watchlist`]), resident memory, the stack servers' pids, load, the machine.
//! - [`profile`]: `perf record` of a process and its top symbols, taken in a separate pass
//!   after the measured phases.
//! - `golden` (tests): every report rendered from fixed numbers, compared with `bench/golden/`.
//!
//! Rule kept everywhere: every number printed or written comes from the run that prints it;
//! the docs section is replaced whole, never edited by hand.

pub mod aggregator;
pub mod baseline;
pub mod chaos;
pub mod clients;
pub mod history;
pub mod ingest;
pub mod pipeline;
pub mod procstat;
pub mod profile;
pub mod recorder;
pub mod relay;
pub mod report;
pub mod rng;
pub mod rounds;
pub mod sink;
pub mod workload;

#[cfg(test)]
mod golden;
