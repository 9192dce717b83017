//! Retention: the floor and form of every retention setting, the TTL of ClickHouse's
//! `events_processed`, and [`PrunedTable`], the batched delete and pruning loop each service
//! runs over the tables it owns (the sink its sync ledger in `stripe_sink::ledger::retention`,
//! the relay its deduplication records in `webhook_relay::deliveries`; `meterline prune` runs
//! both).
//!
//! Rules kept here:
//! - No retention may be shorter than [`MIN_RETENTION_DAYS`] (Stripe's 35 days for back-dated
//!   meter events plus a week): anything younger may still belong to a window a resync or a
//!   late event can send again, and Stripe keeps events resendable for 30 days, so a younger
//!   deduplication record may still be needed. A shorter setting is refused when the
//!   configuration is read (exit code 2), never clamped silently.
//! - Pruning deletes in small batches of rows it can lock at once (`SKIP LOCKED`), so it never
//!   waits on, or holds up, the sink; several replicas may prune at the same time.

use std::time::Duration;

use sqlx::PgPool;
use time::OffsetDateTime;

use crate::config::{ClickhouseSettings, ConfigError, Env};
use crate::shutdown::pause;
use crate::Error;

/// Stripe refuses meter events older than this many days.
pub use meterline_schemas::stripe_limits::MAX_EVENT_AGE_DAYS as STRIPE_MAX_EVENT_AGE_DAYS;
/// Added to Stripe's limit: clocks, grace periods and a late resync must never meet pruning.
pub const MARGIN_DAYS: u32 = 7;
/// The shortest retention of anything.
pub const MIN_RETENTION_DAYS: u32 = STRIPE_MAX_EVENT_AGE_DAYS + MARGIN_DAYS;
/// The longest retention accepted (ten years): beyond it, a typo more likely than a wish.
pub const MAX_RETENTION_DAYS: u32 = 3650;
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
    env.seconds_in_range("RETENTION_PRUNE_INTERVAL_SECONDS", 3600, 1..=86_400)
}

/// A table a service prunes: the one description of its records, the variable and default
/// of their retention, and the delete. Each service declares the tables it owns next to the
/// code that writes them.
#[derive(Debug)]
pub struct PrunedTable {
    /// What the rows are, for the log (`sync ledger`).
    pub records: &'static str,
    /// The error context of a failed delete (`pruning the sync ledger`).
    pub context: &'static str,
    /// The variable of the retention in days, and its default.
    pub var: &'static str,
    pub default_days: u32,
    /// Deletes at most `$2` rows older than `$1`: `... LIMIT $2 FOR UPDATE SKIP LOCKED`, so
    /// pruning never waits on or holds up the service's own writes.
    pub delete: &'static str,
}

impl PrunedTable {
    /// The table's retention from its variable; under [`MIN_RETENTION_DAYS`] is refused.
    pub fn retention_from_env(&self, env: &Env<'_>) -> Result<RetentionDays, ConfigError> {
        RetentionDays::from_env(env, self.var, self.default_days)
    }

    /// Deletes the rows older than `retention` at `now`, `BATCH` at a time, until fewer than
    /// a batch go; gives how many went.
    pub async fn prune(
        &self,
        pool: &PgPool,
        retention: RetentionDays,
        now: OffsetDateTime,
    ) -> Result<u64, Error> {
        let cutoff = retention.cutoff(now);
        let mut total = 0;
        loop {
            let deleted = sqlx::query(self.delete)
                .bind(cutoff)
                .bind(BATCH)
                .execute(pool)
                .await
                .map_err(|source| Error::Postgres {
                    context: self.context,
                    source,
                })?
                .rows_affected();
            total += deleted;
            if deleted < BATCH as u64 {
                return Ok(total);
            }
        }
    }
}

/// Sets the TTL of `events_processed` to `days` after each event's timestamp. ClickHouse
/// applies it to existing parts in the background.
pub async fn set_events_ttl(
    settings: &ClickhouseSettings,
    days: RetentionDays,
) -> Result<(), Error> {
    // `days` is a validated integer: safe to write into the statement.
    let sql = format!(
        "ALTER TABLE events_processed MODIFY TTL toDateTime(timestamp) + INTERVAL {} DAY",
        days.days()
    );
    let topology = crate::clickhouse::Topology::of(settings);
    let steps = topology
        .plan(&sql)
        .map_err(|reason| Error::ClickhouseMigration {
            version: 3,
            name: "events_ttl".into(),
            reason,
        })?;
    topology
        .execute(&steps, "setting the events_processed ttl")
        .await
}

/// Prunes `table` every `interval` until `shutdown`; a failed round is logged and tried again
/// at the next one (pruning is never urgent).
pub async fn run_pruning(
    table: &'static PrunedTable,
    pool: PgPool,
    retention: RetentionDays,
    interval: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(), Error> {
    loop {
        match table
            .prune(&pool, retention, OffsetDateTime::now_utc())
            .await
        {
            Ok(deleted) => {
                tracing::info!(records = table.records, deleted, "retention pruning done")
            }
            Err(e) => tracing::warn!(
                records = table.records,
                error = %e,
                "retention pruning failed; trying again later"
            ),
        }
        if !pause(interval, &shutdown).await {
            return Ok(());
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
        let env = Env::new(&none);
        assert_eq!(
            RetentionDays::from_env(&env, "RETENTION_LEDGER_DAYS", 400)
                .unwrap()
                .days(),
            400
        );
        assert_eq!(events_ttl_from_env(&env).unwrap(), None);

        let short = [("RETENTION_LEDGER_DAYS", "30")];
        let err = RetentionDays::from_env(&Env::new(&short), "RETENTION_LEDGER_DAYS", 400)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("RETENTION_LEDGER_DAYS") && err.contains("42"),
            "{err}"
        );
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
        assert!(RetentionDays::from_env(&Env::new(&bad), "RETENTION_LEDGER_DAYS", 400).is_err());
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
