//! What meterline bills, per tenant environment.
//!
//! Layout:
//! - [`meters`]: the meter definitions store, the only code touching the `meters` table;
//!   every query scoped by tenant and environment.
//! - [`meter_versions`]: what a meter counted before its aggregation changed, and until
//!   when: a change applies from a window boundary no accepted event has reached.
//! - [`backfills`]: usage that arrived before its meter, given to it once from ClickHouse's
//!   `events_raw` when the meter is created or changes what it matches.
//! - [`billing_periods`]: the subscription periods Stripe names for each customer, which
//!   replace calendar months as billing periods wherever they are known.
//! - [`window_sizes`]: each tenant's window size history, changed only on boundaries of both
//!   sizes so that windows never overlap.
//! - [`window_totals`]: window totals of a customer and meter read from ClickHouse exactly as
//!   the sync computes them (deduplicated rows, the same aggregates and windows).
//! - [`scope_map`]: a map keyed by tenant and environment, searched without copying ids.

pub mod backfills;
pub mod billing_periods;
pub mod meter_versions;
pub mod meters;
pub mod scope_map;
pub mod window_sizes;
pub mod window_totals;
