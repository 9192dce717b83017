//! Retention: how long completed sync-ledger rows, webhook deduplication records and
//! ClickHouse's `events_processed` rows are kept, and the pruning itself.
//!
//! Rules kept here:
//! - No retention may be shorter than [`MIN_RETENTION_DAYS`] (Stripe's 35 days for back-dated
//!   meter events plus a week): anything younger may still belong to a window a resync or a
//!   late event can send again, and Stripe keeps events resendable for 30 days, so a younger
//!   deduplication record may still be needed. A shorter setting is refused when the
//!   configuration is read (exit code 2), never clamped silently.
//! - Only ledger rows in a completed state ([`COMPLETED_STATES`]) are pruned, and only when
//!   both their window ended and their row last changed before the cutoff: a row still being
//!   worked on, failed, or waiting for an operator stays.
//! - Pruning deletes in small batches of rows it can lock at once (`SKIP LOCKED`), so it never
//!   waits on, or holds up, the sink; several replicas may prune at the same time.

use std::time::Duration;

use sqlx::PgPool;
use time::OffsetDateTime;

use crate::config::{ClickhouseSettings, ConfigError, Env};
use crate::Error;

/// Stripe refuses meter events older than this many days.
pub use meterline_schemas::stripe_limits::MAX_EVENT_AGE_DAYS as STRIPE_MAX_EVENT_AGE_DAYS;
/// Added to Stripe's limit: clocks, grace periods and a late resync must never meet pruning.
pub const MARGIN_DAYS: u32 = 7;
/// The shortest retention of anything.
pub const MIN_RETENTION_DAYS: u32 = STRIPE_MAX_EVENT_AGE_DAYS + MARGIN_DAYS;
/// The longest retention accepted (ten years): beyond it, a typo more likely than a wish.
pub const MAX_RETENTION_DAYS: u32 = 3650;
/// Ledger states pruning may delete: nothing is sent for them again once their window is past
/// Stripe's 35 days. `failed` and `needs_reconciliation` wait for an operator, the others are
/// still being worked on.
pub const COMPLETED_STATES: [&str; 3] = ["synced", "skipped", "expired"];
/// Rows deleted per statement.
const BATCH: i64 = 5000;

/// A retention age in whole days, at least [`MIN_RETENTION_DAYS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RetentionDays(u32);

impl RetentionDays {
    pub fn new(days: u32) -> Result<Self, String> {
        if days < MIN_RETENTION_DAYS {
            return Err(format!(
                "{days} days is below the floor of {MIN_RETENTION_DAYS} days (Stripe's \
                 {STRIPE_MAX_EVENT_AGE_DAYS} days for back-dated usage plus {MARGIN_DAYS})"
            ));
        }
        if days > MAX_RETENTION_DAYS {
            return Err(format!(
                "{days} days is above the limit of {MAX_RETENTION_DAYS} days"
            ));
        }
        Ok(Self(days))
    }

    pub fn days(self) -> u32 {
        self.0
    }

    /// The instant before which a record is older than this retention at `now`.
    pub fn cutoff(self, now: OffsetDateTime) -> OffsetDateTime {
        now - time::Duration::days(i64::from(self.0))
    }

    /// Reads `var`, `default` when unset.
    pub fn from_env(env: &Env<'_>, var: &'static str, default: u32) -> Result<Self, ConfigError> {
        let days: u32 = env.parse_or(var, default)?;
        Self::new(days).map_err(|reason| ConfigError::Malformed { var, reason })
    }
}

/// How long PostgreSQL records are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionSettings {
    /// `RETENTION_LEDGER_DAYS` (default 400): completed `stripe_sync_batches` rows (and their
    /// `stripe_sync_sends`).
    pub ledger: RetentionDays,
    /// `RETENTION_WEBHOOK_DELIVERIES_DAYS` (default 90): `webhook_deliveries` rows.
    pub webhook_deliveries: RetentionDays,
}

impl RetentionSettings {
    pub fn from_env(env: &Env<'_>) -> Result<Self, ConfigError> {
        Ok(Self {
            ledger: RetentionDays::from_env(env, "RETENTION_LEDGER_DAYS", 400)?,
            webhook_deliveries: RetentionDays::from_env(
                env,
                "RETENTION_WEBHOOK_DELIVERIES_DAYS",
                90,
            )?,
        })
    }
}

/// `RETENTION_EVENTS_DAYS` (optional): the TTL of `events_processed` that `meterline migrate`
/// sets; unset leaves the TTL as it is (400 days from migration 3).
pub fn events_ttl_from_env(env: &Env<'_>) -> Result<Option<RetentionDays>, ConfigError> {
    const VAR: &str = "RETENTION_EVENTS_DAYS";
    env.optional(VAR)
        .map(|_| RetentionDays::from_env(env, VAR, 0))
        .transpose()
}

/// `RETENTION_PRUNE_INTERVAL_SECONDS` (default 3600, 1..=86400): how often a service that
/// prunes does so.
pub fn prune_interval_from_env(env: &Env<'_>) -> Result<Duration, ConfigError> {
    Ok(Duration::from_secs(env.u64_in_range(
        "RETENTION_PRUNE_INTERVAL_SECONDS",
        3600,
        1..=86_400,
    )?))
}

/// What one pruning round deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// `stripe_sync_batches` rows (their sends went with them).
    pub ledger_batches: u64,
    pub webhook_deliveries: u64,
}

/// Deletes completed ledger rows and webhook deduplication records older than `settings` at
/// `now`, in batches, until none is left.
pub async fn prune(
    pool: &PgPool,
    settings: &RetentionSettings,
    now: OffsetDateTime,
) -> Result<Pruned, Error> {
    let states: Vec<String> = COMPLETED_STATES.iter().map(|s| (*s).to_owned()).collect();
    let ledger_cutoff = settings.ledger.cutoff(now);
    let mut pruned = Pruned::default();
    loop {
        let deleted = sqlx::query(
            "DELETE FROM stripe_sync_batches WHERE id IN (
                 SELECT id FROM stripe_sync_batches
                 WHERE sync_status = ANY($1) AND window_end < $2 AND updated_at < $2
                 LIMIT $3
                 FOR UPDATE SKIP LOCKED)",
        )
        .bind(&states)
        .bind(ledger_cutoff)
        .bind(BATCH)
        .execute(pool)
        .await
        .map_err(|source| Error::Postgres {
            context: "pruning the sync ledger",
            source,
        })?
        .rows_affected();
        pruned.ledger_batches += deleted;
        if deleted < BATCH as u64 {
            break;
        }
    }
    let deliveries_cutoff = settings.webhook_deliveries.cutoff(now);
    loop {
        let deleted = sqlx::query(
            "DELETE FROM webhook_deliveries WHERE (tenant_id, environment_id, event_id) IN (
                 SELECT tenant_id, environment_id, event_id FROM webhook_deliveries
                 WHERE received_at < $1
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED)",
        )
        .bind(deliveries_cutoff)
        .bind(BATCH)
        .execute(pool)
        .await
        .map_err(|source| Error::Postgres {
            context: "pruning webhook deliveries",
            source,
        })?
        .rows_affected();
        pruned.webhook_deliveries += deleted;
        if deleted < BATCH as u64 {
            break;
        }
    }
    Ok(pruned)
}

/// Sets the TTL of `events_processed` to `days` after each event's timestamp. ClickHouse
/// applies it to existing parts in the background.
pub async fn set_events_ttl(
    settings: &ClickhouseSettings,
    days: RetentionDays,
) -> Result<(), Error> {
    // `days` is a validated integer: safe to write into the statement.
    crate::clickhouse::client(settings)
        .query(&format!(
            "ALTER TABLE events_processed MODIFY TTL toDateTime(timestamp) + INTERVAL {} DAY",
            days.days()
        ))
        .execute()
        .await
        .map_err(|source| Error::Clickhouse {
            context: "setting the events_processed ttl".into(),
            source,
        })
}

/// Prunes every `interval` until `shutdown`; a failed round is logged and tried again at the
/// next one (pruning is never urgent).
pub async fn run_pruning(
    pool: PgPool,
    settings: RetentionSettings,
    interval: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), Error> {
    loop {
        match prune(&pool, &settings, OffsetDateTime::now_utc()).await {
            Ok(pruned) => tracing::info!(
                ledger_batches = pruned.ledger_batches,
                webhook_deliveries = pruned.webhook_deliveries,
                "retention pruning done"
            ),
            Err(e) => tracing::warn!(error = %e, "retention pruning failed; trying again later"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_is_stripes_35_days_plus_a_week() {
        assert_eq!(MIN_RETENTION_DAYS, 42);
        assert!(RetentionDays::new(41).is_err());
        assert!(RetentionDays::new(35).is_err());
        assert_eq!(RetentionDays::new(42).unwrap().days(), 42);
        assert!(RetentionDays::new(3651).is_err());
    }

    #[test]
    fn settings_from_the_environment() {
        let none: [(&str, &str); 0] = [];
        let s = RetentionSettings::from_env(&Env::new(&none)).unwrap();
        assert_eq!((s.ledger.days(), s.webhook_deliveries.days()), (400, 90));
        assert_eq!(events_ttl_from_env(&Env::new(&none)).unwrap(), None);

        let short = [("RETENTION_LEDGER_DAYS", "30")];
        let err = RetentionSettings::from_env(&Env::new(&short))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("RETENTION_LEDGER_DAYS") && err.contains("42"),
            "{err}"
        );
        let short = [("RETENTION_WEBHOOK_DELIVERIES_DAYS", "7")];
        assert!(RetentionSettings::from_env(&Env::new(&short)).is_err());
        let short = [("RETENTION_EVENTS_DAYS", "36")];
        assert!(events_ttl_from_env(&Env::new(&short)).is_err());
        let ttl = [("RETENTION_EVENTS_DAYS", "90")];
        assert_eq!(
            events_ttl_from_env(&Env::new(&ttl))
                .unwrap()
                .map(RetentionDays::days),
            Some(90)
        );
        let bad = [("RETENTION_LEDGER_DAYS", "a year")];
        assert!(RetentionSettings::from_env(&Env::new(&bad)).is_err());
    }

    #[test]
    fn cutoffs() {
        let now = time::macros::datetime!(2026-11-26 12:00 UTC);
        assert_eq!(
            RetentionDays::new(42).unwrap().cutoff(now),
            time::macros::datetime!(2026-10-15 12:00 UTC)
        );
    }
}
