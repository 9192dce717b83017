//! Retention of the sync ledger: completed `stripe_sync_batches` rows (and, by the foreign
//! key's cascade, their `stripe_sync_sends`) older than `RETENTION_LEDGER_DAYS` are deleted,
//! by the sink every `RETENTION_PRUNE_INTERVAL_SECONDS` and by `meterline prune`.
//!
//! Rules kept here:
//! - Only rows in a completed state ([`LedgerState::COMPLETED`]) are pruned, and only when both
//!   their window ended and their row last changed before the cutoff: a row still being worked
//!   on, failed, or waiting for an operator stays.
//! - The retention is never under the floor of [`meterline_common::retention`] (Stripe's 35
//!   days plus a week): a younger row may still belong to a window a resync or a late event
//!   sends again, and its ledger entry is what stops a second billing.
//! - Deletes go in small batches of rows locked with `SKIP LOCKED`, so pruning never waits on,
//!   or holds up, the sync; several replicas may prune at the same time.

use meterline_common::config::{ConfigError, Env};
use meterline_common::retention::{delete_in_batches, RetentionDays};
use sqlx::PgPool;
use time::OffsetDateTime;

use super::LedgerState;

/// `RETENTION_LEDGER_DAYS` (default 400): how long completed ledger rows are kept.
pub fn retention_from_env(env: &Env<'_>) -> Result<RetentionDays, ConfigError> {
    RetentionDays::from_env(env, "RETENTION_LEDGER_DAYS", 400)
}

/// Deletes completed ledger rows older than `retention` at `now`; gives how many went.
pub async fn prune(
    pool: &PgPool,
    retention: RetentionDays,
    now: OffsetDateTime,
) -> Result<u64, meterline_common::Error> {
    let completed = LedgerState::names(LedgerState::COMPLETED).map(|s| format!("'{s}'"));
    // The state names are compile-time literals of LedgerState: safe to write into the SQL.
    let delete = format!(
        "DELETE FROM stripe_sync_batches WHERE id IN (
             SELECT id FROM stripe_sync_batches
             WHERE sync_status IN ({}) AND window_end < $1 AND updated_at < $1
             LIMIT $2
             FOR UPDATE SKIP LOCKED)",
        completed.join(", ")
    );
    delete_in_batches(
        pool,
        &delete,
        retention.cutoff(now),
        "pruning the sync ledger",
    )
    .await
}
