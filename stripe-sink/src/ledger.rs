//! The sync ledger in PostgreSQL (`stripe_sync_batches`, `stripe_sync_sends`, `sync_jobs`).
//!
//! Rules kept here:
//! - A window's row holds the latest total the aggregator published (the highest revision
//!   wins), the exact part of it that accepted meter events account for
//!   (`accounted_quantity`) and the whole numbers Stripe accepted (`synced_quantity`); only
//!   the part not accounted for is sent, rounded against the customer and meter's carry
//!   (`ledger/carry.rs`, [`crate::billing::round_with_carry`]).
//! - A meter event is written as a `sending` row BEFORE its request goes out, with its
//!   deterministic identifier and value; an outstanding `sending` row is always resolved
//!   (resent unchanged) before anything new is computed. A crash between Stripe's answer and
//!   the ledger's update therefore resends the same event, which Stripe recognises.
//! - At most one window per (tenant, environment, customer, meter) is in flight at a time,
//!   across every sink replica: claims take a transaction advisory lock on that key and
//!   skip keys with a live lease.
//! - Every claim takes the window's next claim number, and every write a dispatcher makes for
//!   the window names its [`Claim`]: once the lease ran out and another dispatcher claimed
//!   the window, the late one writes nothing ([`Error::ClaimLost`]) and leaves its
//!   outstanding send to the new owner, who resends it unchanged.
//!
//! Layout: the window's row, its claim and its outstanding send here; a dispatcher's writes
//! under its claim in `sends.rs`; sends in doubt or dropped by Stripe in `doubt.rs`; waiting
//! windows re-opened in `reopen.rs`; what the sync API reads in `reports.rs`; the rounding
//! carry in `carry.rs`; the window states in `state.rs`; pruning in `retention.rs`.

use meterline_accounts::audit::{self, Actor, Change};
use meterline_common::auth::TenantScope;
use meterline_common::postgres::BindScope;
use meterline_schemas::{
    CustomerId, Decimal, EnvironmentId, JobId, MeterId, TenantId, Window, WindowReason, WindowTotal,
};
use serde::Serialize;
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::QueryAs;
use sqlx::{FromRow, PgPool, Postgres};
use time::OffsetDateTime;

use crate::error::db;
use crate::Error;

mod carry;
mod doubt;
mod reopen;
mod reports;
pub mod retention;
mod sends;
mod state;
pub use doubt::Resolution;
pub use reports::{BatchFilter, BatchView, JobRow, JobView, LedgerTotals, NewJob, StatusView};
pub use state::{LedgerState, UnknownLedgerState};

/// `sql` with `scope` bound as `$1` (tenant) and `$2` (environment): the shape of every
/// read of one tenant environment's windows.
fn scoped<'q, O>(sql: &'q str, scope: &'q TenantScope) -> QueryAs<'q, Postgres, O, PgArguments>
where
    O: for<'r> FromRow<'r, PgRow>,
{
    sqlx::query_as(sql).bind_scope(scope)
}

/// A dispatcher's hold on one window: the window and the number it was claimed under.
/// Only [`Ledger::claim`] makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub batch_id: i64,
    number: i64,
}

/// A claimed window.
#[derive(Debug, Clone)]
pub struct Batch {
    pub id: i64,
    pub claim: Claim,
    pub tenant_id: TenantId,
    pub environment_id: EnvironmentId,
    pub customer_id: CustomerId,
    pub meter_id: MeterId,
    pub window: Window,
    pub aggregated_quantity: Decimal,
    pub synced_quantity: Decimal,
    pub attempts: i32,
}

#[derive(sqlx::FromRow)]
struct BatchRow {
    id: i64,
    tenant_id: String,
    environment_id: String,
    entity_id: String,
    meter_id: String,
    window_start: OffsetDateTime,
    window_end: OffsetDateTime,
    aggregated_quantity: Decimal,
    synced_quantity: Decimal,
    attempts: i32,
    claim: i64,
}

impl TryFrom<BatchRow> for Batch {
    type Error = Error;

    fn try_from(r: BatchRow) -> Result<Self, Error> {
        let corrupt = |e: meterline_schemas::SchemaError| Error::Corrupt(e.to_string());
        Ok(Batch {
            id: r.id,
            claim: Claim {
                batch_id: r.id,
                number: r.claim,
            },
            tenant_id: TenantId::parse(&r.tenant_id).map_err(corrupt)?,
            environment_id: EnvironmentId::parse(&r.environment_id).map_err(corrupt)?,
            customer_id: CustomerId::parse(&r.entity_id).map_err(corrupt)?,
            meter_id: MeterId::parse(&r.meter_id).map_err(corrupt)?,
            window: Window::new(r.window_start, r.window_end).map_err(corrupt)?,
            aggregated_quantity: r.aggregated_quantity,
            synced_quantity: r.synced_quantity,
            attempts: r.attempts,
        })
    }
}

/// A meter event written before its request.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Send {
    pub seq: i32,
    pub identifier: String,
    /// Which Idempotency-Key of the event is current (see [`Send::idempotency_key`]).
    pub key_generation: i32,
    pub value: Decimal,
    /// The exact change of the window total this event accounts for: `value` is it plus the
    /// carry, rounded.
    pub accounted: Decimal,
    pub event_name: String,
    pub provider_customer_id: String,
    pub stripe_timestamp: i64,
    pub created_at: OffsetDateTime,
    /// Since when Stripe may hold the event (an attempt unanswered, a 409 or a 5xx); `None`
    /// while every attempt was answered "not recorded" or none went out.
    pub in_doubt_since: Option<OffsetDateTime>,
    /// How the event counts once accepted.
    #[sqlx(rename = "formula", try_from = "String")]
    pub counts: Counts,
}

/// How an accepted meter event counts in its window, by the formula of its Stripe meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counts {
    /// `sum`: the event is a change, added to the window's synced sum; `accounted` is the
    /// exact change, the rest goes to the carry.
    Change,
    /// `last`: the event is the window's period-to-date value and replaces what was synced;
    /// `accounted` is the exact value. No carry: Stripe bills one value, not a sum.
    Value,
}

impl Counts {
    /// The `stripe_sync_sends.formula` of it.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Change => "sum",
            Self::Value => "last",
        }
    }
}

impl TryFrom<String> for Counts {
    type Error = String;

    fn try_from(formula: String) -> Result<Self, String> {
        match formula.as_str() {
            "sum" => Ok(Self::Change),
            "last" => Ok(Self::Value),
            other => Err(format!("send formula {other:?}")),
        }
    }
}

impl Send {
    /// The Idempotency-Key of the current attempt: the identifier while no 5xx came back,
    /// then `<identifier>-<generation>`. A retry after a lost answer keeps the key, so
    /// Stripe replays the first answer; a retry after a 5xx gets a fresh one. Double
    /// counting is prevented by the identifier, which never changes.
    pub fn idempotency_key(&self) -> String {
        if self.key_generation == 0 {
            self.identifier.clone()
        } else {
            format!("{}-{}", self.identifier, self.key_generation)
        }
    }
}

/// How a dispatcher leaves a claimed window.
#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    /// Everything owed was accepted: synced, or pending again if a newer total arrived.
    Settled,
    /// Try again at `after` seconds from now.
    RetryIn { seconds: f64, error: String },
    /// The last request got no answer (a timeout, a dropped connection): it may still be
    /// running at Stripe. The window stays in flight for `seconds`, so no other request for
    /// this customer and meter starts meanwhile (Stripe allows one at a time), then it is
    /// retried.
    Unanswered { seconds: f64, error: String },
    /// The customer has no Stripe mapping yet.
    PendingMapping,
    /// Not to be sent: no meter mapping, or sync disabled.
    Skipped(String),
    /// Older than Stripe's 35 days.
    Expired,
    /// Refused for good; waits for `POST /v1/stripe/batches/retry`.
    Failed(String),
    /// A meter event in doubt (no certain answer for 23 h, or refused after such an
    /// attempt) that Stripe's summaries cannot settle: resending could bill twice once
    /// Stripe forgot its identifier, so a person decides
    /// (`POST /v1/stripe/sync/batches/{id}/resolve`).
    NeedsReconciliation(String),
}

impl Finish {
    /// The state the window is left in; `None` for [`Finish::Settled`], whose state the
    /// database decides (synced when everything owed was accepted, else pending).
    fn state(&self) -> Option<LedgerState> {
        match self {
            Finish::Settled => None,
            Finish::RetryIn { .. } => Some(LedgerState::Pending),
            Finish::Unanswered { .. } => Some(LedgerState::InFlight),
            Finish::PendingMapping => Some(LedgerState::PendingMapping),
            Finish::Skipped(_) => Some(LedgerState::Skipped),
            Finish::Expired => Some(LedgerState::Expired),
            Finish::Failed(_) => Some(LedgerState::Failed),
            Finish::NeedsReconciliation(_) => Some(LedgerState::NeedsReconciliation),
        }
    }

    /// The SQL expression of [`Self::state`].
    fn status_sql(&self) -> String {
        match self.state() {
            Some(state) => format!("'{state}'"),
            None => format!(
                "CASE WHEN aggregated_quantity = accounted_quantity THEN '{}'
                      ELSE '{}' END",
                LedgerState::Synced,
                LedgerState::Pending,
            ),
        }
    }

    /// The error recorded with the window, and the seconds until its next attempt.
    fn error_and_delay(&self) -> (Option<&str>, f64) {
        match self {
            Finish::Settled | Finish::PendingMapping | Finish::Expired => (None, 0.0),
            Finish::RetryIn { seconds, error } | Finish::Unanswered { seconds, error } => {
                (Some(error), *seconds)
            }
            Finish::Skipped(reason)
            | Finish::Failed(reason)
            | Finish::NeedsReconciliation(reason) => (Some(reason), 0.0),
        }
    }
}

#[derive(Clone)]
pub struct Ledger {
    pool: PgPool,
}

impl Ledger {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Records a published window total. A higher revision replaces the total; any window
    /// not in flight becomes pending so the difference is checked; expired windows stay
    /// expired; a resync whose job asked for `force_rerun` also re-opens failed and skipped
    /// windows.
    pub async fn record_window(&self, total: &WindowTotal) -> Result<(), Error> {
        self.record_windows([total]).await
    }

    /// Records published window totals in one transaction, each as [`Self::record_window`]
    /// does, in the order given (two totals of one window: the later statement sees the
    /// earlier). One commit for a batch: a commit per total waited for its own WAL flush, and
    /// the minute's windows falling due at once queued behind each other for seconds.
    pub async fn record_windows<'t>(
        &self,
        totals: impl IntoIterator<Item = &'t WindowTotal>,
    ) -> Result<(), Error> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting to record totals"))?;
        for total in totals {
            record_total(&mut tx, total).await?;
        }
        tx.commit().await.map_err(db("committing window totals"))
    }
    /// Claims up to `limit` windows ready to send, at most one per (tenant, environment,
    /// customer, meter), none whose key has a live lease elsewhere. A claim holds its window
    /// for `lease`: longer than settling one window can take, so that a window is taken over
    /// only from a dispatcher that died.
    pub async fn claim(
        &self,
        limit: usize,
        lease: std::time::Duration,
    ) -> Result<Vec<Batch>, Error> {
        let mut tx = self.pool.begin().await.map_err(db("starting a claim"))?;
        // Keys with a live lease are left out here, not after the LIMIT: a few busy keys
        // must not hide every other ready window. The due rows are read in
        // `next_attempt_at` order from the partial index `stripe_sync_batches_ready` and only
        // the first LIMIT of them are taken (their ties sorted), never every due row; the
        // lease check reads the in-flight rows of `stripe_sync_batches_leased` (migration 31).
        let candidates: Vec<BatchRow> = sqlx::query_as(
            "SELECT id, tenant_id, environment_id, entity_id, meter_id, window_start, window_end,
                    aggregated_quantity, synced_quantity, attempts, claim
             FROM stripe_sync_batches b
             WHERE ((sync_status = 'pending' AND next_attempt_at <= now())
                    OR (sync_status = 'in_flight' AND lease_until < now()))
               AND NOT EXISTS (SELECT 1 FROM stripe_sync_batches o
                   WHERE o.tenant_id = b.tenant_id AND o.environment_id = b.environment_id
                     AND o.entity_id = b.entity_id AND o.meter_id = b.meter_id AND o.id <> b.id
                     AND o.sync_status = 'in_flight' AND o.lease_until >= now())
             ORDER BY next_attempt_at, id
             LIMIT $1
             FOR UPDATE SKIP LOCKED",
        )
        .bind((limit * 8).max(32) as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(db("selecting windows to send"))?;
        let mut claimed = Vec::new();
        let mut keys = std::collections::HashSet::new();
        for row in candidates {
            if claimed.len() >= limit {
                break;
            }
            let key = format!(
                "{}\u{1f}{}\u{1f}{}\u{1f}{}",
                row.tenant_id, row.environment_id, row.entity_id, row.meter_id
            );
            if !keys.insert(key.clone()) {
                continue;
            }
            // Serialises claims of one key across replicas until this transaction ends, when
            // the in_flight row below is visible to the next claimer.
            let locked: bool =
                sqlx::query_scalar("SELECT pg_try_advisory_xact_lock(hashtextextended($1, 7))")
                    .bind(&key)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(db("locking a customer and meter"))?;
            if !locked {
                continue;
            }
            let busy: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM stripe_sync_batches
                 WHERE tenant_id = $1 AND environment_id = $2 AND entity_id = $3
                   AND meter_id = $4 AND id <> $5
                   AND sync_status = 'in_flight' AND lease_until >= now())",
            )
            .bind(&row.tenant_id)
            .bind(&row.environment_id)
            .bind(&row.entity_id)
            .bind(&row.meter_id)
            .bind(row.id)
            .fetch_one(&mut *tx)
            .await
            .map_err(db("checking leases"))?;
            if busy {
                continue;
            }
            let number: i64 = sqlx::query_scalar(
                "UPDATE stripe_sync_batches
                 SET sync_status = 'in_flight', lease_until = now() + make_interval(secs => $2),
                     attempts = attempts + 1, claim = claim + 1, updated_at = now()
                 WHERE id = $1 RETURNING claim",
            )
            .bind(row.id)
            .bind(lease.as_secs_f64())
            .fetch_one(&mut *tx)
            .await
            .map_err(db("leasing a window"))?;
            claimed.push(Batch::try_from(BatchRow {
                claim: number,
                ..row
            })?);
        }
        tx.commit().await.map_err(db("committing a claim"))?;
        Ok(claimed)
    }

    /// The latest total of a claimed window (a newer revision may have arrived since the
    /// claim), the exact part of it that accepted meter events account for, and the rounding
    /// carry of its customer and meter (0 before their first send): one read for what
    /// [`crate::billing::round_with_carry`] needs.
    pub async fn current(&self, batch_id: i64, window: &Window) -> Result<Current, Error> {
        // A newer window of the period that Stripe holds (or may hold) a `last` value of
        // supersedes this one: it carries the period to date, and Stripe's `last` is the
        // period's last event. The period is the one the aggregator published the window in;
        // the calendar month from an aggregator that predates it.
        let month_end = meterline_schemas::BillingPeriod::of_window(window).end();
        sqlx::query_as(
            "SELECT b.aggregated_quantity AS total, b.accounted_quantity AS accounted,
                    COALESCE(c.carry, 0) AS carry, b.synced_quantity AS synced,
                    b.stripe_event_id IS NOT NULL AS sent, b.last_event_at,
                    COALESCE(b.period_end, $2) AS period_end,
                    EXISTS (
                        SELECT 1 FROM stripe_sync_batches n
                        JOIN stripe_sync_sends s ON s.batch_id = n.id
                        WHERE n.tenant_id = b.tenant_id AND n.environment_id = b.environment_id
                          AND n.entity_id = b.entity_id AND n.meter_id = b.meter_id
                          AND n.window_start > b.window_start
                          AND n.window_start < COALESCE(b.period_end, $2)
                          AND s.formula = 'last' AND s.status IN ('sending', 'accepted')
                    ) AS superseded,
                    m.misplaced_value, m.misplaced_accounted, m.misplaced_at
             FROM stripe_sync_batches b
             LEFT JOIN stripe_sync_carry c
               ON c.tenant_id = b.tenant_id AND c.environment_id = b.environment_id
              AND c.entity_id = b.entity_id AND c.meter_id = b.meter_id
             CROSS JOIN LATERAL (
                 SELECT COALESCE(sum(s.value), 0) AS misplaced_value,
                        COALESCE(sum(s.accounted), 0) AS misplaced_accounted,
                        max(s.stripe_timestamp) AS misplaced_at
                 FROM stripe_sync_sends s
                 WHERE s.batch_id = b.id AND s.status = 'accepted' AND s.formula = 'sum'
                   AND s.stripe_timestamp
                       >= extract(epoch FROM COALESCE(b.period_end, $2))::bigint
             ) m
             WHERE b.id = $1",
        )
        .bind(batch_id)
        .bind(month_end)
        .fetch_one(&self.pool)
        .await
        .map_err(db("reading a window"))
    }

    /// The meter event of this window still waiting for Stripe's answer, if any.
    pub async fn outstanding(&self, batch_id: i64) -> Result<Option<Send>, Error> {
        sqlx::query_as(OUTSTANDING_SEND)
            .bind(batch_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db("reading outstanding sends"))
    }

    /// How many meter events this window has had (the next one is `seq + 1`).
    pub async fn sends_so_far(&self, batch_id: i64) -> Result<i32, Error> {
        sqlx::query_scalar(
            "SELECT COALESCE(MAX(seq), 0) FROM stripe_sync_sends WHERE batch_id = $1",
        )
        .bind(batch_id)
        .fetch_one(&self.pool)
        .await
        .map_err(db("counting sends"))
    }
}

/// What [`Ledger::current`] reads of a claimed window.
#[derive(Debug, sqlx::FromRow)]
pub struct Current {
    /// The latest window total.
    pub total: Decimal,
    /// The exact part of it accepted meter events account for.
    pub accounted: Decimal,
    /// The rounding carry of the window's customer and meter.
    pub carry: Decimal,
    /// The whole numbers Stripe accepted for it (for a `last` meter: its last value).
    pub synced: Decimal,
    /// Whether Stripe accepted any meter event of it.
    pub sent: bool,
    /// For a `last` meter: a newer window of the same billing period has a meter event
    /// Stripe holds or may hold, so this window's value must not go out after it.
    pub superseded: bool,
    /// The timestamp of the latest event in the total, when the aggregator sent it.
    pub last_event_at: Option<OffsetDateTime>,
    /// The end of the billing period the window is billed in.
    pub period_end: OffsetDateTime,
    /// The accepted `sum` meter events of the window stamped at or after `period_end`, which
    /// Stripe filed in a later period than the one the window is billed in now (its period
    /// was named, or moved, after they were sent): the sum of their whole numbers, of the
    /// exact parts they account for, and the latest of their stamps (`None`: there are none).
    pub misplaced_value: Decimal,
    pub misplaced_accounted: Decimal,
    pub misplaced_at: Option<i64>,
}

/// A window's outstanding meter event (at most one: the next is written once it settled).
const OUTSTANDING_SEND: &str =
    "SELECT seq, identifier, key_generation, value, accounted, event_name,
            provider_customer_id, stripe_timestamp, created_at, in_doubt_since, formula
     FROM stripe_sync_sends WHERE batch_id = $1 AND status = 'sending'
     ORDER BY seq LIMIT 1";

/// One total into the ledger, within the caller's transaction (see [`Ledger::record_window`]).
async fn record_total(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    total: &WindowTotal,
) -> Result<(), Error> {
    let job = match &total.reason {
        WindowReason::Resync { job_id } => Some(job_id),
        _ => None,
    };
    let force: bool = match job {
        Some(job_id) => sqlx::query_scalar("SELECT force_rerun FROM sync_jobs WHERE id = $1::uuid")
            .bind(job_id.to_string())
            .fetch_optional(&mut **tx)
            .await
            .map_err(db("reading the sync job"))?
            .unwrap_or(false),
        None => false,
    };
    let initial = if total.expired {
        LedgerState::Expired
    } else {
        LedgerState::Pending
    };
    sqlx::query(
        "INSERT INTO stripe_sync_batches AS b
             (tenant_id, environment_id, entity_id, meter_id, window_start, window_end,
              aggregated_quantity, event_count, window_revision, sync_status, last_job_id,
              last_event_at, period_end)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::uuid, $13, $14)
         ON CONFLICT (tenant_id, environment_id, entity_id, meter_id, window_start)
         DO UPDATE SET
             aggregated_quantity = CASE WHEN EXCLUDED.window_revision >= b.window_revision
                 THEN EXCLUDED.aggregated_quantity ELSE b.aggregated_quantity END,
             event_count = CASE WHEN EXCLUDED.window_revision >= b.window_revision
                 THEN EXCLUDED.event_count ELSE b.event_count END,
             last_event_at = CASE WHEN EXCLUDED.window_revision >= b.window_revision
                 THEN EXCLUDED.last_event_at ELSE b.last_event_at END,
             period_end = CASE WHEN EXCLUDED.window_revision >= b.window_revision
                 THEN EXCLUDED.period_end ELSE b.period_end END,
             window_revision = GREATEST(b.window_revision, EXCLUDED.window_revision),
             last_job_id = COALESCE(EXCLUDED.last_job_id, b.last_job_id),
             sync_status = CASE
                 WHEN b.sync_status IN ('in_flight', 'needs_reconciliation', 'expired')
                     THEN b.sync_status
                 WHEN EXCLUDED.sync_status = 'expired' THEN 'expired'
                 WHEN b.sync_status IN ('failed', 'skipped') AND NOT $12 THEN b.sync_status
                 ELSE 'pending' END,
             next_attempt_at = CASE
                 WHEN b.sync_status IN ('synced', 'pending_mapping') OR $12 THEN now()
                 ELSE b.next_attempt_at END,
             attempts = CASE WHEN $12 THEN 0 ELSE b.attempts END,
             updated_at = now()",
    )
    .bind(total.tenant_id.as_str())
    .bind(total.environment_id.as_str())
    .bind(total.customer_id.as_str())
    .bind(total.meter_id.as_str())
    .bind(total.window.start())
    .bind(total.window.end())
    .bind(total.quantity)
    .bind(i64::try_from(total.event_count).unwrap_or(i64::MAX))
    .bind(i32::try_from(total.revision.get()).unwrap_or(i32::MAX))
    .bind(initial.as_str())
    .bind(job.map(ToString::to_string))
    .bind(force)
    .bind(total.last_event_at.map(|t| t.as_offset_date_time()))
    .bind(total.period_end.map(|t| t.as_offset_date_time()))
    .execute(&mut **tx)
    .await
    .map_err(db("recording a window total"))?;
    Ok(())
}

#[cfg(test)]
mod tests;
