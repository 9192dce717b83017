//! meterline's message contracts: the Rust types every service parses Kafka messages into, and
//! the JSON Schemas (`schemas/json/`) that tell a non-Rust producer the same rules.
//!
//! Rule kept here: parse at the edge. A service turns bytes into these types with
//! `from_json_bytes` before anything else happens; past that point nothing is a bare `String`
//! with a hidden contract, and every type here can only hold a valid value.
//!
//! # Layout
//! - [`error`]: [`SchemaError`], the one error type; its text is safe for a DLQ header.
//! - [`ids`]: tenant, environment, meter, customer, event, job ids and short labels.
//! - [`meter`]: [`MeterDefinition`] (event name, [`Aggregation`], property filters), built
//!   valid from its flat JSON form [`MeterInput`]; which events feed it and with what quantity.
//! - [`timestamp`]: [`Timestamp`], an RFC 3339 instant written in UTC with `Z`.
//! - [`window`]: [`Window`] (tumbling, UTC-aligned `[start, end)`) and [`TimeRange`].
//! - [`topic`]: [`Topic`] names, DLQ twins, schema files, and the [`TopicMessage`] trait.
//! - One module per topic, each message versioned (`"schema_version": 1`):
//!   [`usage_raw`] ([`RawUsageEvent`]), [`usage_windows`] ([`WindowTotal`]),
//!   [`usage_resync`] ([`ResyncRequest`]), [`stripe_webhooks`] ([`StripeWebhook`]).
//! - [`dlq`]: the `<topic>.dlq` convention, [`DlqHeaders`].
//! - [`stripe_limits`]: Stripe's own limits on meter events (35 days back, 5 minutes ahead,
//!   15 digits, identifier length), the one home every service reads them from.
//! - [`json_schema`]: the schema documents generated from these types.

pub mod billing_period;
pub mod dlq;
pub mod error;
pub mod ids;
pub mod json_schema;
pub mod meter;
pub mod stripe_limits;
pub mod stripe_webhooks;
pub mod timestamp;
pub mod topic;
pub mod usage_raw;
pub mod usage_resync;
pub mod usage_windows;
pub mod window;

mod codec;

pub use billing_period::{BillingPeriod, PeriodCalendar, StripeFormula};
pub use codec::{DECIMAL_PATTERN, SCHEMA_VERSION};
pub use dlq::{DlqErrorKind, DlqHeaders};
pub use error::SchemaError;
pub use ids::{
    CustomerId, EnvironmentId, EventId, EventName, EventSource, JobId, MeterId, StripeEventId,
    StripeEventType, TenantId,
};
pub use meter::{
    Aggregation, FilterInput, FilterValue, MeterDefinition, MeterInput, PropertyFilter,
    PropertyName, QuantityError,
};
pub use stripe_webhooks::StripeWebhook;
pub use timestamp::Timestamp;
pub use topic::{Topic, TopicMessage};
pub use usage_raw::RawUsageEvent;
pub use usage_resync::ResyncRequest;
pub use usage_windows::{WindowReason, WindowTotal};
pub use window::{TimeRange, Window};

// Re-exported so services name the exact versions these types use.
pub use rust_decimal::Decimal;
pub use time::OffsetDateTime;
