//! Meter backfills (`meter_backfills`): usage that arrived before its meter.
//!
//! Rules kept here:
//! - A meter created, or one whose event name or filters changed, is given the matching
//!   events of the past 35 days (Stripe's limit; older ones could not be billed), once: the
//!   backfill is written in the same transaction as the meter (`schedule`), and it adds only
//!   events the meter does not have yet, so nothing the live pipeline metered is counted again.
//! - It starts [`SETTLE`] after the change: an aggregator batch resolved against the meters
//!   just before the change is in ClickHouse by then, so its events are found.
//! - The aggregator works through a backfill in (timestamp, event id) order under a lease,
//!   recording progress after each page: a crash redoes at most one page, whose copies
//!   collapse in ClickHouse.

use meterline_common::auth::TenantScope;
use meterline_common::postgres::BindScope;
use meterline_schemas::stripe_limits::MAX_EVENT_AGE;
use meterline_schemas::{EnvironmentId, MeterId, TenantId};
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};
use time::OffsetDateTime;

/// How long after the meter change a backfill waits before it starts.
pub const SETTLE: time::Duration = time::Duration::minutes(2);

/// How far past the change a backfill looks: events may be ahead of the clock (up to the
/// ingest's `INGEST_MAX_FUTURE_SECONDS`, at most a day) and already resolved without the meter.
pub const AHEAD: time::Duration = time::Duration::DAY;

/// Why a backfill was scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The meter was created.
    Created,
    /// Its event name or filters changed: events it did not match before may match now.
    MatchingChanged,
}

impl Reason {
    fn as_sql(self) -> &'static str {
        match self {
            Reason::Created => "created",
            Reason::MatchingChanged => "matching_changed",
        }
    }
}

/// A backfill as the meters API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Backfill {
    pub reason: String,
    /// `pending`, `running` or `done`.
    pub status: String,
    /// The events searched: timestamps in `[from, until)`.
    #[serde(with = "time::serde::rfc3339")]
    pub from: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub until: OffsetDateTime,
    /// Matching events the meter did not have and now does.
    pub events_found: i64,
    /// Matching events whose property the meter cannot use (not a quantity): not counted.
    pub events_unusable: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
}

const COLUMNS: &str = "reason, status, from_ts, until_ts, events_found, events_unusable, \
                       created_at, finished_at";

#[derive(sqlx::FromRow)]
struct BackfillRow {
    reason: String,
    status: String,
    from_ts: OffsetDateTime,
    until_ts: OffsetDateTime,
    events_found: i64,
    events_unusable: i64,
    created_at: OffsetDateTime,
    finished_at: Option<OffsetDateTime>,
}

impl From<BackfillRow> for Backfill {
    fn from(r: BackfillRow) -> Self {
        Backfill {
            reason: r.reason,
            status: r.status,
            from: r.from_ts,
            until: r.until_ts,
            events_found: r.events_found,
            events_unusable: r.events_unusable,
            created_at: r.created_at,
            finished_at: r.finished_at,
        }
    }
}

/// Schedules the backfill of `meter` in the transaction that changes it.
pub(crate) async fn schedule(
    tx: &mut Transaction<'_, Postgres>,
    scope: &TenantScope,
    meter: &MeterId,
    reason: Reason,
) -> Result<Backfill, sqlx::Error> {
    // The database's clock, like the meter's own timestamps.
    let row: BackfillRow = sqlx::query_as(&format!(
        "INSERT INTO meter_backfills
             (tenant_id, environment_id, meter_id, reason, from_ts, until_ts, done_until,
              not_before)
         SELECT $1, $2, $3, $4, now() - make_interval(secs => $5), now() + make_interval(secs => $6),
                now() - make_interval(secs => $5), now() + make_interval(secs => $7)
         RETURNING {COLUMNS}"
    ))
    .bind_scope(scope)
    .bind(meter.as_str())
    .bind(reason.as_sql())
    .bind(interval(MAX_EVENT_AGE))
    .bind(interval(AHEAD))
    .bind(interval(SETTLE))
    .fetch_one(&mut **tx)
    .await?;
    Ok(row.into())
}

fn interval(d: time::Duration) -> f64 {
    d.as_seconds_f64()
}

/// The latest backfill of the caller's meter, if it ever had one.
pub async fn latest(
    pool: &PgPool,
    scope: &TenantScope,
    meter: &MeterId,
) -> Result<Option<Backfill>, sqlx::Error> {
    let row: Option<BackfillRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM meter_backfills
         WHERE tenant_id = $1 AND environment_id = $2 AND meter_id = $3
         ORDER BY id DESC LIMIT 1"
    ))
    .bind_scope(scope)
    .bind(meter.as_str())
    .fetch_optional(pool)
    .await?;
    Ok(row.map(Backfill::from))
}

/// A backfill an aggregator holds: what to search and where it got to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub id: i64,
    pub tenant_id: TenantId,
    pub environment_id: EnvironmentId,
    pub meter_id: MeterId,
    pub until: OffsetDateTime,
    /// Every event before (timestamp, event id) has been looked at.
    pub done_until: OffsetDateTime,
    pub done_after_id: String,
}

/// Why a stored backfill cannot be worked on.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error("meter backfills: {0}")]
    Database(#[from] sqlx::Error),
    #[error("meter backfills: stored row {id} is invalid: {reason}")]
    Corrupt { id: i64, reason: String },
}

/// Takes the oldest backfill that is due and not held by another aggregator, for `lease`.
pub async fn claim(pool: &PgPool, lease: time::Duration) -> Result<Option<Claimed>, BackfillError> {
    let row: Option<(
        i64,
        String,
        String,
        String,
        OffsetDateTime,
        OffsetDateTime,
        String,
    )> = sqlx::query_as(
        "UPDATE meter_backfills SET status = 'running', lease_until = now() + make_interval(secs => $1)
             WHERE id = (
                 SELECT id FROM meter_backfills
                 WHERE status <> 'done' AND not_before <= now()
                   AND (lease_until IS NULL OR lease_until < now())
                 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
             RETURNING id, tenant_id, environment_id, meter_id, until_ts, done_until,
                       done_after_id",
    )
    .bind(interval(lease))
    .fetch_optional(pool)
    .await?;
    let Some((id, tenant, environment, meter, until, done_until, done_after_id)) = row else {
        return Ok(None);
    };
    let corrupt = |e: &dyn std::fmt::Display| BackfillError::Corrupt {
        id,
        reason: e.to_string(),
    };
    Ok(Some(Claimed {
        id,
        tenant_id: TenantId::parse(&tenant).map_err(|e| corrupt(&e))?,
        environment_id: EnvironmentId::parse(&environment).map_err(|e| corrupt(&e))?,
        meter_id: MeterId::parse(&meter).map_err(|e| corrupt(&e))?,
        until,
        done_until,
        done_after_id,
    }))
}

/// Records a page: the events up to (`done_until`, `done_after_id`) were looked at, `found`
/// of them given to the meter and `unusable` not usable by it; the lease is renewed. False
/// when the lease was lost (another aggregator took the backfill over; it redoes the page).
pub async fn progress(
    pool: &PgPool,
    claimed: &Claimed,
    found: i64,
    unusable: i64,
    lease: time::Duration,
) -> Result<bool, BackfillError> {
    let updated = sqlx::query(
        "UPDATE meter_backfills
         SET done_until = $2, done_after_id = $3, events_found = events_found + $4,
             events_unusable = events_unusable + $5, lease_until = now() + make_interval(secs => $6)
         WHERE id = $1 AND status = 'running' AND lease_until >= now()",
    )
    .bind(claimed.id)
    .bind(claimed.done_until)
    .bind(&claimed.done_after_id)
    .bind(found)
    .bind(unusable)
    .bind(interval(lease))
    .execute(pool)
    .await?;
    Ok(updated.rows_affected() == 1)
}

/// Marks the backfill done.
pub async fn finish(pool: &PgPool, claimed: &Claimed) -> Result<(), BackfillError> {
    sqlx::query(
        "UPDATE meter_backfills SET status = 'done', finished_at = now(), lease_until = NULL
         WHERE id = $1",
    )
    .bind(claimed.id)
    .execute(pool)
    .await?;
    Ok(())
}
