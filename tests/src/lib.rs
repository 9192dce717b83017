//! The test harness of meterline: every integration test runs against the REAL local stack
//! (`dev/up`: Apache Kafka, ClickHouse, PostgreSQL) inside a namespace of its own.
//!
//! Layout:
//! - [`stack`]: where the shared local stack is (read from `dev/.env`); a test fails loudly,
//!   never skips, when it is not there.
//! - [`api`]: bearer tokens and JSON requests against a service's HTTP API.
//! - [`kafka`]: reading back what landed on a topic.
//! - [`namespace`]: one test's private topics (a unique `TOPIC_PREFIX`), ClickHouse database
//!   and PostgreSQL database, created and migrated exactly as a deploy would.
//! - [`process`]: spawning a service binary on a free port with its configuration pointed at a
//!   namespace, then stopping it politely (SIGTERM) or not (SIGKILL).
//! - [`standin`]: the local Stripe, in-process: customers, meters, faults, clock, inspection.
//! - [`stripe_config`]: tenants' Stripe configurations written straight to the store.
//! - [`usage`]: meters, events straight into `usage.raw`, and window totals watched on
//!   `usage.windows`.
//! - [`private`]: throwaway Kafka, ClickHouse and PostgreSQL instances for tests that must
//!   stop a dependency without disturbing the tests running beside them.

pub mod api;
pub mod kafka;
pub mod namespace;
pub mod private;
pub mod process;
pub mod stack;
pub mod standin;
pub mod stripe_config;
pub mod tls;
pub mod usage;

pub use namespace::Namespace;
pub use process::ServiceProcess;
pub use stack::Stack;
