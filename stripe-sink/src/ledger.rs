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

use meterline_accounts::audit::{self, Actor, Change};
use meterline_common::auth::TenantScope;
use meterline_schemas::{
    CustomerId, Decimal, EnvironmentId, JobId, MeterId, TenantId, Window, WindowReason, WindowTotal,
};
use serde::Serialize;
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::QueryAs;
use sqlx::{FromRow, PgPool, Postgres};
use time::OffsetDateTime;

use crate::Error;

mod carry;
pub mod retention;
mod state;
pub use state::{LedgerState, UnknownLedgerState};

/// `sql` with `scope` bound as `$1` (tenant) and `$2` (environment): the shape of every
/// read of one tenant environment's windows.
fn scoped<'q, O>(sql: &'q str, scope: &'q TenantScope) -> QueryAs<'q, Postgres, O, PgArguments>
where
    O: for<'r> FromRow<'r, PgRow>,
{
    sqlx::query_as(sql)
        .bind(scope.tenant_id.as_str())
        .bind(scope.environment_id.as_str())
}

fn db(context: &'static str) -> impl FnOnce(sqlx::Error) -> Error {
    move |source| Error::Postgres { context, source }
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
        let job = match &total.reason {
            WindowReason::Resync { job_id } => Some(job_id),
            _ => None,
        };
        let force: bool = match job {
            Some(job_id) => {
                sqlx::query_scalar("SELECT force_rerun FROM sync_jobs WHERE id = $1::uuid")
                    .bind(job_id.to_string())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db("reading the sync job"))?
                    .unwrap_or(false)
            }
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
        .execute(&self.pool)
        .await
        .map_err(db("recording a window total"))?;
        Ok(())
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
        // must not hide every other ready window.
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
                    ) AS superseded
             FROM stripe_sync_batches b
             LEFT JOIN stripe_sync_carry c
               ON c.tenant_id = b.tenant_id AND c.environment_id = b.environment_id
              AND c.entity_id = b.entity_id AND c.meter_id = b.meter_id
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

    /// Starts a write for the window `claim` holds: a transaction in which the window's row
    /// is locked, so no other claim of it can start before the write commits.
    /// [`Error::ClaimLost`] once the window was claimed again.
    async fn hold(&self, claim: Claim) -> Result<sqlx::Transaction<'static, Postgres>, Error> {
        let mut tx = self.pool.begin().await.map_err(db("starting a write"))?;
        let held: Option<i64> = sqlx::query_scalar(
            "SELECT id FROM stripe_sync_batches WHERE id = $1 AND claim = $2 FOR UPDATE",
        )
        .bind(claim.batch_id)
        .bind(claim.number)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("checking a claim"))?;
        match held {
            Some(_) => Ok(tx),
            None => Err(Error::ClaimLost {
                batch_id: claim.batch_id,
            }),
        }
    }

    /// Writes a meter event before it is sent.
    pub async fn begin_send(&self, claim: Claim, send: &Send) -> Result<(), Error> {
        let mut tx = self.hold(claim).await?;
        sqlx::query(
            "INSERT INTO stripe_sync_sends (batch_id, seq, identifier, value, event_name,
                 provider_customer_id, stripe_timestamp, status, accounted, formula)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'sending', $8, $9)",
        )
        .bind(claim.batch_id)
        .bind(send.seq)
        .bind(&send.identifier)
        .bind(send.value)
        .bind(&send.event_name)
        .bind(&send.provider_customer_id)
        .bind(send.stripe_timestamp)
        .bind(send.accounted)
        .bind(send.counts.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db("writing a send"))?;
        tx.commit().await.map_err(db("committing a send"))
    }

    /// After a 5xx answer: the next attempt uses a new Idempotency-Key, because Stripe
    /// replays a stored 500 for the old one.
    pub async fn next_key_generation(&self, claim: Claim, send: &mut Send) -> Result<(), Error> {
        let mut tx = self.hold(claim).await?;
        send.key_generation = sqlx::query_scalar(
            "UPDATE stripe_sync_sends SET key_generation = key_generation + 1
             WHERE batch_id = $1 AND seq = $2 RETURNING key_generation",
        )
        .bind(claim.batch_id)
        .bind(send.seq)
        .fetch_one(&mut *tx)
        .await
        .map_err(db("renewing an idempotency key"))?;
        tx.commit()
            .await
            .map_err(db("committing an idempotency key"))
    }

    /// An attempt of the send got no certain "not recorded" (no answer, a 409, a 5xx):
    /// Stripe may hold it from now on. The first time is kept.
    pub async fn in_doubt(&self, claim: Claim, send: &mut Send) -> Result<(), Error> {
        if send.in_doubt_since.is_some() {
            return Ok(());
        }
        let mut tx = self.hold(claim).await?;
        send.in_doubt_since = sqlx::query_scalar(
            "UPDATE stripe_sync_sends SET in_doubt_since = COALESCE(in_doubt_since, now())
             WHERE batch_id = $1 AND seq = $2 RETURNING in_doubt_since",
        )
        .bind(claim.batch_id)
        .bind(send.seq)
        .fetch_one(&mut *tx)
        .await
        .map_err(db("marking a send in doubt"))?;
        tx.commit().await.map_err(db("committing a send in doubt"))
    }

    /// Stripe accepted (or already held) the event: it counts as synced, and the change it
    /// accounts for as accounted, the carry moving by their difference, in one transaction.
    pub async fn accepted(&self, claim: Claim, send: &Send) -> Result<(), Error> {
        let mut tx = self.hold(claim).await?;
        accept_in(&mut tx, claim.batch_id, send).await?;
        tx.commit().await.map_err(db("committing an acceptance"))
    }

    /// A send in doubt settled from Stripe's meter event summaries (`recorded` or not),
    /// audited as the sync's decision with `reason`, in one transaction.
    pub async fn resolved_from_stripe(
        &self,
        batch: &Batch,
        send: &Send,
        recorded: bool,
        reason: &str,
    ) -> Result<(), Error> {
        let mut tx = self.hold(batch.claim).await?;
        settle_doubt_in(&mut tx, batch.id, send, recorded, reason).await?;
        audit::record(
            &mut *tx,
            batch.tenant_id.as_str(),
            batch.environment_id.as_str(),
            &Actor::Sync,
            &resolution_change(
                batch.customer_id.as_str(),
                batch.meter_id.as_str(),
                send,
                recorded,
                reason,
            ),
        )
        .await
        .map_err(db("auditing a resolution"))?;
        tx.commit().await.map_err(db("committing a resolution"))
    }

    /// An operator's decision on a window in `needs_reconciliation`: its outstanding meter
    /// event was `recorded` by Stripe (it counts as synced) or not (its units go out again
    /// under a new identifier). The window goes back to pending to send whatever is still
    /// owed; the decision is audited with `reason`, in the same transaction.
    pub async fn resolve(
        &self,
        scope: &TenantScope,
        batch_id: i64,
        recorded: bool,
        reason: &str,
        actor: &Actor,
    ) -> Result<Resolution, Error> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(db("starting a resolution"))?;
        let window: Option<(String, String, String)> = sqlx::query_as(
            "SELECT sync_status, entity_id, meter_id FROM stripe_sync_batches
             WHERE id = $1 AND tenant_id = $2 AND environment_id = $3 FOR UPDATE",
        )
        .bind(batch_id)
        .bind(scope.tenant_id.as_str())
        .bind(scope.environment_id.as_str())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("reading a window to resolve"))?;
        let Some((status, customer_id, meter_id)) = window else {
            return Ok(Resolution::NoSuchWindow);
        };
        if status != LedgerState::NeedsReconciliation.to_string() {
            return Ok(Resolution::NotInReconciliation(status));
        }
        let send: Option<Send> = sqlx::query_as(OUTSTANDING_SEND)
            .bind(batch_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(db("reading the send to resolve"))?;
        let Some(send) = send else {
            return Ok(Resolution::NothingOutstanding);
        };
        settle_doubt_in(&mut tx, batch_id, &send, recorded, reason).await?;
        sqlx::query(
            "UPDATE stripe_sync_batches
             SET sync_status = 'pending', next_attempt_at = now(), attempts = 0,
                 last_error = NULL, updated_at = now()
             WHERE id = $1",
        )
        .bind(batch_id)
        .execute(&mut *tx)
        .await
        .map_err(db("re-opening a resolved window"))?;
        audit::record(
            &mut *tx,
            scope.tenant_id.as_str(),
            scope.environment_id.as_str(),
            actor,
            &resolution_change(&customer_id, &meter_id, &send, recorded, reason),
        )
        .await
        .map_err(db("auditing a resolution"))?;
        tx.commit().await.map_err(db("committing a resolution"))?;
        Ok(Resolution::Resolved {
            identifier: send.identifier,
            value: send.value,
        })
    }

    /// Stripe dropped the accepted meter event `identifier` after answering 200 (its
    /// asynchronous error report names it): the send is `dropped`, its units leave the
    /// window's synced sums (and the carry what it moved), and the window is `failed` with
    /// `reason`, so that after the cause is fixed a retry sends them once, under a new
    /// identifier. The claim number moves on, so a dispatcher holding the window writes
    /// nothing more (not the acceptance of a send the report overtook). `None` when no
    /// accepted or outstanding send has that identifier (not ours, or dropped already: a
    /// repeated report changes nothing).
    pub async fn dropped_by_stripe(
        &self,
        identifier: &str,
        reason: &str,
    ) -> Result<Option<i64>, Error> {
        let mut tx = self.pool.begin().await.map_err(db("starting a drop"))?;
        // A report can overtake the acceptance it follows (the webhook is faster than the
        // dispatcher's write): a send still `sending` was received and dropped too.
        let send: Option<(i64, i32, Decimal, Decimal, String, String)> = sqlx::query_as(
            "SELECT batch_id, seq, value, accounted, formula, status FROM stripe_sync_sends
             WHERE identifier = $1 AND status IN ('accepted', 'sending')",
        )
        .bind(identifier)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db("finding a dropped send"))?;
        let Some((batch_id, seq, value, accounted, formula, status)) = send else {
            return Ok(None);
        };
        // The window's row first, as every other write of it does.
        sqlx::query("SELECT id FROM stripe_sync_batches WHERE id = $1 FOR UPDATE")
            .bind(batch_id)
            .execute(&mut *tx)
            .await
            .map_err(db("locking a window"))?;
        let dropped = sqlx::query(
            "UPDATE stripe_sync_sends SET status = 'dropped', error = $3
             WHERE batch_id = $1 AND seq = $2 AND status = $4",
        )
        .bind(batch_id)
        .bind(seq)
        .bind(reason)
        .bind(&status)
        .execute(&mut *tx)
        .await
        .map_err(db("dropping a send"))?;
        if dropped.rows_affected() != 1 {
            return Ok(None);
        }
        // Only an accepted send moved the sums.
        let counts = Counts::try_from(formula).map_err(Error::Corrupt)?;
        if status == "accepted" {
            undo_acceptance_in(&mut tx, batch_id, counts, value, accounted).await?;
        }
        sqlx::query(
            "UPDATE stripe_sync_batches
             SET sync_status = 'failed', last_error = $2, lease_until = NULL,
                 claim = claim + 1, updated_at = now()
             WHERE id = $1",
        )
        .bind(batch_id)
        .bind(reason)
        .execute(&mut *tx)
        .await
        .map_err(db("failing a window with a dropped send"))?;
        tx.commit().await.map_err(db("committing a drop"))?;
        Ok(Some(batch_id))
    }

    /// The whole units of every accepted meter event of `event_name` for the Stripe
    /// customer stamped in `[start, end)` (Unix seconds), across all windows: what Stripe's
    /// summaries of that range hold if meterline is the meter's only writer.
    pub async fn accepted_units(
        &self,
        provider_customer_id: &str,
        event_name: &str,
        start: i64,
        end: i64,
    ) -> Result<Decimal, Error> {
        sqlx::query_scalar(
            "SELECT COALESCE(sum(value), 0) FROM stripe_sync_sends
             WHERE status = 'accepted' AND provider_customer_id = $1 AND event_name = $2
               AND stripe_timestamp >= $3 AND stripe_timestamp < $4",
        )
        .bind(provider_customer_id)
        .bind(event_name)
        .bind(start)
        .bind(end)
        .fetch_one(&self.pool)
        .await
        .map_err(db("summing accepted sends"))
    }

    /// A new value of a `last` window that rounds to the value Stripe already holds for it:
    /// accounted for without a meter event.
    pub async fn unchanged_value(&self, claim: Claim, total: Decimal) -> Result<(), Error> {
        let mut tx = self.hold(claim).await?;
        sqlx::query(
            "UPDATE stripe_sync_batches SET accounted_quantity = $2, updated_at = now()
             WHERE id = $1",
        )
        .bind(claim.batch_id)
        .bind(total)
        .execute(&mut *tx)
        .await
        .map_err(db("accounting for an unchanged value"))?;
        tx.commit()
            .await
            .map_err(db("committing an unchanged value"))
    }

    /// Stripe refused the event for good and no attempt of it is in doubt: it did not count.
    pub async fn refused(&self, claim: Claim, send: &Send, error: &str) -> Result<(), Error> {
        let mut tx = self.hold(claim).await?;
        sqlx::query(
            "UPDATE stripe_sync_sends SET status = 'refused', error = $3, answered_at = now()
             WHERE batch_id = $1 AND seq = $2 AND status = 'sending'
               AND in_doubt_since IS NULL",
        )
        .bind(claim.batch_id)
        .bind(send.seq)
        .bind(error)
        .execute(&mut *tx)
        .await
        .map_err(db("refusing a send"))?;
        tx.commit().await.map_err(db("committing a refusal"))
    }

    /// Releases a claimed window.
    pub async fn finish(&self, claim: Claim, finish: &Finish) -> Result<(), Error> {
        let status_sql = finish.status_sql();
        let (error, delay) = finish.error_and_delay();
        let attempts_reset = matches!(finish, Finish::Settled);
        let mut tx = self.hold(claim).await?;
        sqlx::query(&format!(
            "UPDATE stripe_sync_batches
             SET sync_status = {status_sql},
                 lease_until = CASE WHEN {status_sql} = 'in_flight'
                     THEN now() + make_interval(secs => $3) END,
                 last_error = $2,
                 next_attempt_at = now() + make_interval(secs => $3),
                 attempts = CASE WHEN $4 THEN 0 ELSE attempts END,
                 updated_at = now()
             WHERE id = $1"
        ))
        .bind(claim.batch_id)
        .bind(error)
        .bind(delay)
        .bind(attempts_reset)
        .execute(&mut *tx)
        .await
        .map_err(db("finishing a window"))?;
        tx.commit().await.map_err(db("committing a finish"))
    }

    /// Windows waiting for a customer mapping that now exists become pending.
    pub async fn release_mapped(&self) -> Result<u64, Error> {
        let done = sqlx::query(
            "UPDATE stripe_sync_batches b SET sync_status = 'pending', next_attempt_at = now(),
                 updated_at = now()
             WHERE b.sync_status = 'pending_mapping' AND EXISTS (
                 SELECT 1 FROM entity_integration_mappings m
                 WHERE m.tenant_id = b.tenant_id AND m.environment_id = b.environment_id
                   AND m.entity_type = 'customer' AND m.provider_type = 'stripe'
                   AND m.entity_id = b.entity_id AND m.status = 'active')",
        )
        .execute(&self.pool)
        .await
        .map_err(db("releasing mapped windows"))?;
        Ok(done.rows_affected())
    }

    /// Re-opens `skipped` windows whose reason is gone: their tenant environment's Stripe
    /// config has sync on again and their meter has a Stripe mapping with sync on (created or
    /// turned on since). Only windows Stripe still takes (ending after `oldest_end`, which is
    /// Stripe's 35 days back) are re-opened; they go back to `pending`, and the dispatcher
    /// sends what is still owed against what Stripe already accepted, so nothing goes twice.
    /// The caller skips this while `STRIPE_INTEGRATION_ENABLED` is false.
    ///
    /// The search starts from the meter mappings and configs, not from the ledger: with
    /// `changed_since`, only scopes whose mapping or config changed since then are looked at
    /// (by the ledger's `(tenant, environment, status)` index), so a loop that runs every
    /// second costs nothing while nothing changes. `None` looks at every enabled scope (at
    /// start). Gives the windows re-opened and the database's clock at the statement, from
    /// which the caller takes its next `changed_since`.
    pub async fn release_enabled(
        &self,
        oldest_end: OffsetDateTime,
        changed_since: Option<OffsetDateTime>,
    ) -> Result<(u64, OffsetDateTime), Error> {
        let (reopened, at): (i64, OffsetDateTime) = sqlx::query_as(
            "WITH enabled AS (
                 SELECT m.tenant_id, m.environment_id, m.meter_id
                 FROM stripe_meter_mappings m
                 JOIN stripe_configs c
                   ON c.tenant_id = m.tenant_id AND c.environment_id = m.environment_id
                 WHERE m.sync_enabled AND c.sync_enabled
                   AND ($2::timestamptz IS NULL OR m.updated_at >= $2 OR c.updated_at >= $2)),
             reopened AS (
                 UPDATE stripe_sync_batches b SET sync_status = 'pending',
                     next_attempt_at = now(), updated_at = now(), last_error = NULL
                 FROM enabled e
                 WHERE b.tenant_id = e.tenant_id AND b.environment_id = e.environment_id
                   AND b.sync_status = 'skipped' AND b.meter_id = e.meter_id
                   AND b.window_end > $1
                 RETURNING 1)
             SELECT (SELECT count(*) FROM reopened), now()",
        )
        .bind(oldest_end)
        .bind(changed_since)
        .fetch_one(&self.pool)
        .await
        .map_err(db("re-opening skipped windows"))?;
        Ok((reopened.max(0) as u64, at))
    }

    /// Creates a manual sync job.
    pub async fn create_job(&self, scope: &TenantScope, job: &NewJob) -> Result<(), Error> {
        sqlx::query(
            "INSERT INTO sync_jobs (id, tenant_id, environment_id, entity_type, entity_id,
                 meter_id, time_from, time_to, force_rerun)
             VALUES ($1::uuid, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(job.id.to_string())
        .bind(scope.tenant_id.as_str())
        .bind(scope.environment_id.as_str())
        .bind(&job.entity_type)
        .bind(job.entity_id.as_ref().map(CustomerId::as_str))
        .bind(job.meter_id.as_ref().map(MeterId::as_str))
        .bind(job.from)
        .bind(job.to)
        .bind(job.force_rerun)
        .execute(&self.pool)
        .await
        .map_err(db("creating a sync job"))?;
        Ok(())
    }

    /// A job of `scope` and the states of the windows it covers.
    pub async fn job(&self, scope: &TenantScope, id: &JobId) -> Result<Option<JobView>, Error> {
        let row: Option<JobRow> = sqlx::query_as(
            "SELECT id::text AS id, entity_type, entity_id, meter_id, time_from, time_to,
                    force_rerun, created_at
             FROM sync_jobs WHERE id = $1::uuid AND tenant_id = $2 AND environment_id = $3",
        )
        .bind(id.to_string())
        .bind(scope.tenant_id.as_str())
        .bind(scope.environment_id.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db("reading a sync job"))?;
        let Some(row) = row else { return Ok(None) };
        let counts: Vec<(String, i64)> = scoped(
            "SELECT sync_status, count(*) FROM stripe_sync_batches
             WHERE tenant_id = $1 AND environment_id = $2
               AND ($3::text IS NULL OR entity_id = $3) AND ($4::text IS NULL OR meter_id = $4)
               AND window_start < $6 AND window_end > $5
             GROUP BY sync_status ORDER BY sync_status",
            scope,
        )
        .bind(&row.entity_id)
        .bind(&row.meter_id)
        .bind(row.time_from)
        .bind(row.time_to)
        .fetch_all(&self.pool)
        .await
        .map_err(db("counting a job's windows"))?;
        let resynced: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM stripe_sync_batches
             WHERE tenant_id = $1 AND environment_id = $2 AND last_job_id = $3::uuid",
        )
        .bind(scope.tenant_id.as_str())
        .bind(scope.environment_id.as_str())
        .bind(id.to_string())
        .fetch_one(&self.pool)
        .await
        .map_err(db("counting resynced windows"))?;
        Ok(Some(JobView {
            windows_by_status: counts.into_iter().collect(),
            windows_resynced: resynced,
            job: row,
        }))
    }

    /// Counts by status, the last success, the oldest window still owed, pending mappings.
    pub async fn status(&self, scope: &TenantScope) -> Result<StatusView, Error> {
        let counts: Vec<(String, i64)> = scoped(
            "SELECT sync_status, count(*) FROM stripe_sync_batches
             WHERE tenant_id = $1 AND environment_id = $2 GROUP BY sync_status",
            scope,
        )
        .fetch_all(&self.pool)
        .await
        .map_err(db("counting windows"))?;
        let (last_success, oldest_owed): (Option<OffsetDateTime>, Option<OffsetDateTime>) = scoped(
            "SELECT max(synced_at),
                    min(window_end) FILTER (WHERE sync_status IN
                        ('pending', 'in_flight', 'pending_mapping'))
             FROM stripe_sync_batches WHERE tenant_id = $1 AND environment_id = $2",
            scope,
        )
        .fetch_one(&self.pool)
        .await
        .map_err(db("reading sync progress"))?;
        let now = OffsetDateTime::now_utc();
        let counts: std::collections::BTreeMap<String, i64> = counts.into_iter().collect();
        Ok(StatusView {
            pending_mappings: counts
                .get(LedgerState::PendingMapping.as_str())
                .copied()
                .unwrap_or(0),
            windows_by_status: counts,
            last_success_at: last_success,
            lag_seconds: oldest_owed.map(|t| (now - t).whole_seconds().max(0)),
        })
    }

    /// Windows of `scope`, newest first, filtered and paged by id.
    pub async fn batches(
        &self,
        scope: &TenantScope,
        f: &BatchFilter,
    ) -> Result<Vec<BatchView>, Error> {
        scoped(
            "SELECT id, entity_id, meter_id, window_start, window_end, aggregated_quantity,
                    event_count, window_revision, synced_quantity, accounted_quantity,
                    sync_status, attempts,
                    stripe_event_id, last_error, created_at, updated_at, synced_at
             FROM stripe_sync_batches
             WHERE tenant_id = $1 AND environment_id = $2
               AND ($3::text IS NULL OR sync_status = $3)
               AND ($4::text IS NULL OR entity_id = $4)
               AND ($5::text IS NULL OR meter_id = $5)
               AND ($6::bigint IS NULL OR id < $6)
             ORDER BY id DESC LIMIT $7",
            scope,
        )
        .bind(&f.status)
        .bind(f.customer_id.as_ref().map(CustomerId::as_str))
        .bind(f.meter_id.as_ref().map(MeterId::as_str))
        .bind(f.before_id)
        .bind(f.limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db("listing windows"))
    }

    /// Re-opens failed (and needs-reconciliation, when asked) windows of `scope`; `ids`
    /// narrows it. Returns how many.
    pub async fn retry(
        &self,
        scope: &TenantScope,
        ids: Option<&[i64]>,
        include_reconciliation: bool,
    ) -> Result<u64, Error> {
        let done = sqlx::query(
            "UPDATE stripe_sync_batches
             SET sync_status = 'pending', next_attempt_at = now(), attempts = 0, updated_at = now()
             WHERE tenant_id = $1 AND environment_id = $2
               AND (sync_status = 'failed' OR ($4 AND sync_status = 'needs_reconciliation'))
               AND ($3::bigint[] IS NULL OR id = ANY($3))",
        )
        .bind(scope.tenant_id.as_str())
        .bind(scope.environment_id.as_str())
        .bind(ids)
        .bind(include_reconciliation)
        .execute(&self.pool)
        .await
        .map_err(db("retrying windows"))?;
        Ok(done.rows_affected())
    }

    /// Per (customer, meter) of `scope` over `[from, to)`, for the reconciliation report: the
    /// whole numbers Stripe accepted, the exact quantity they account for, and the exact
    /// total of the latest window totals; for a meter mapped to a `last` Stripe meter, those
    /// of the range's latest window.
    pub async fn synced_totals(
        &self,
        scope: &TenantScope,
        customer: Option<&CustomerId>,
        meter: Option<&MeterId>,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<LedgerTotals>, Error> {
        // A `last` meter's windows carry the period to date and Stripe bills the last one:
        // its line is the range's latest window, not a sum.
        scoped(
            "WITH b AS (
                 SELECT b.entity_id, b.meter_id, b.window_start, b.synced_quantity,
                        b.accounted_quantity, b.aggregated_quantity,
                        COALESCE(m.formula = 'last', false) AS last
                 FROM stripe_sync_batches b
                 LEFT JOIN stripe_meter_mappings m
                   ON m.tenant_id = b.tenant_id AND m.environment_id = b.environment_id
                  AND m.meter_id = b.meter_id
                 WHERE b.tenant_id = $1 AND b.environment_id = $2
                   AND ($3::text IS NULL OR b.entity_id = $3)
                   AND ($4::text IS NULL OR b.meter_id = $4)
                   AND b.window_start >= $5 AND b.window_end <= $6),
             latest AS (
                 SELECT DISTINCT ON (entity_id, meter_id) * FROM b WHERE last
                 ORDER BY entity_id, meter_id, window_start DESC)
             SELECT entity_id, meter_id, sum(synced_quantity) AS synced,
                    sum(accounted_quantity) AS accounted, sum(aggregated_quantity) AS exact
             FROM b WHERE NOT last GROUP BY entity_id, meter_id
             UNION ALL
             SELECT entity_id, meter_id, synced_quantity, accounted_quantity,
                    aggregated_quantity
             FROM latest
             ORDER BY entity_id, meter_id",
            scope,
        )
        .bind(customer.map(CustomerId::as_str))
        .bind(meter.map(MeterId::as_str))
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await
        .map_err(db("summing the ledger"))
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
}

/// One line of [`Ledger::synced_totals`].
#[derive(Debug, sqlx::FromRow)]
pub struct LedgerTotals {
    pub entity_id: String,
    pub meter_id: String,
    /// Whole numbers Stripe accepted.
    pub synced: Decimal,
    /// The exact quantity those account for.
    pub accounted: Decimal,
    /// The exact total of the latest window totals.
    pub exact: Decimal,
}

/// A manual sync request.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: JobId,
    pub entity_type: String,
    pub entity_id: Option<CustomerId>,
    pub meter_id: Option<MeterId>,
    pub from: OffsetDateTime,
    pub to: OffsetDateTime,
    pub force_rerun: bool,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct JobRow {
    pub id: String,
    pub entity_type: String,
    pub entity_id: Option<String>,
    pub meter_id: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub time_from: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub time_to: OffsetDateTime,
    pub force_rerun: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Serialize)]
pub struct JobView {
    #[serde(flatten)]
    pub job: JobRow,
    pub windows_by_status: std::collections::BTreeMap<String, i64>,
    pub windows_resynced: i64,
}

#[derive(Debug, Serialize)]
pub struct StatusView {
    pub windows_by_status: std::collections::BTreeMap<String, i64>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_success_at: Option<OffsetDateTime>,
    /// Seconds since the end of the oldest window still owed to Stripe.
    pub lag_seconds: Option<i64>,
    pub pending_mappings: i64,
}

#[derive(Debug, Default)]
pub struct BatchFilter {
    pub status: Option<String>,
    pub customer_id: Option<CustomerId>,
    pub meter_id: Option<MeterId>,
    pub before_id: Option<i64>,
    pub limit: i64,
}

#[derive(Debug, Serialize, sqlx::FromRow)]
pub struct BatchView {
    pub id: i64,
    pub entity_id: String,
    pub meter_id: String,
    #[serde(with = "time::serde::rfc3339")]
    pub window_start: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub window_end: OffsetDateTime,
    pub aggregated_quantity: Decimal,
    pub event_count: i64,
    pub window_revision: i32,
    /// The whole numbers Stripe accepted for this window.
    pub synced_quantity: Decimal,
    /// The exact part of `aggregated_quantity` those account for; the two differ by what the
    /// customer and meter's rounding carried into or out of this window.
    pub accounted_quantity: Decimal,
    pub sync_status: String,
    pub attempts: i32,
    pub stripe_event_id: Option<String>,
    pub last_error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub synced_at: Option<OffsetDateTime>,
}

/// A window's outstanding meter event (at most one: the next is written once it settled).
const OUTSTANDING_SEND: &str =
    "SELECT seq, identifier, key_generation, value, accounted, event_name,
            provider_customer_id, stripe_timestamp, created_at, in_doubt_since, formula
     FROM stripe_sync_sends WHERE batch_id = $1 AND status = 'sending'
     ORDER BY seq LIMIT 1";

/// What became of an operator's resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    Resolved {
        identifier: String,
        value: Decimal,
    },
    NoSuchWindow,
    /// The window is in this other state: nothing to decide.
    NotInReconciliation(String),
    /// The window has no meter event outstanding.
    NothingOutstanding,
}

/// Marks `send` accepted and moves the window's sums by it; only a send still outstanding
/// moves them, so never twice.
async fn accept_in(
    tx: &mut sqlx::Transaction<'static, Postgres>,
    batch_id: i64,
    send: &Send,
) -> Result<(), Error> {
    let updated = sqlx::query(
        "UPDATE stripe_sync_sends SET status = 'accepted', answered_at = now()
         WHERE batch_id = $1 AND seq = $2 AND status = 'sending'",
    )
    .bind(batch_id)
    .bind(send.seq)
    .execute(&mut **tx)
    .await
    .map_err(db("accepting a send"))?;
    if updated.rows_affected() == 1 {
        // A `last` value replaces what was synced; a change adds to it.
        sqlx::query(
            "UPDATE stripe_sync_batches
             SET synced_quantity = CASE WHEN $5 THEN $2 ELSE synced_quantity + $2 END,
                 accounted_quantity = CASE WHEN $5 THEN $4 ELSE accounted_quantity + $4 END,
                 stripe_event_id = $3, synced_at = now(), updated_at = now()
             WHERE id = $1",
        )
        .bind(batch_id)
        .bind(send.value)
        .bind(&send.identifier)
        .bind(send.accounted)
        .bind(send.counts == Counts::Value)
        .execute(&mut **tx)
        .await
        .map_err(db("recording an accepted send"))?;
        if send.counts == Counts::Change {
            carry::add(tx, batch_id, send.accounted - send.value).await?;
        }
    }
    Ok(())
}

/// Takes an accepted send back out of its window's sums, the inverse of [`accept_in`]: a
/// change leaves the synced and accounted sums (and the carry what it moved); a `last`
/// window returns to its latest value still accepted, or to nothing.
async fn undo_acceptance_in(
    tx: &mut sqlx::Transaction<'static, Postgres>,
    batch_id: i64,
    counts: Counts,
    value: Decimal,
    accounted: Decimal,
) -> Result<(), Error> {
    match counts {
        Counts::Change => {
            sqlx::query(
                "UPDATE stripe_sync_batches
                 SET synced_quantity = synced_quantity - $2,
                     accounted_quantity = accounted_quantity - $3
                 WHERE id = $1",
            )
            .bind(batch_id)
            .bind(value)
            .bind(accounted)
            .execute(&mut **tx)
            .await
            .map_err(db("taking dropped units out"))?;
            carry::add(tx, batch_id, value - accounted).await?;
        }
        Counts::Value => {
            // What Stripe holds for the window is its latest value still accepted.
            sqlx::query(
                "UPDATE stripe_sync_batches b
                 SET synced_quantity = COALESCE(p.value, 0),
                     accounted_quantity = COALESCE(p.accounted, 0),
                     stripe_event_id = p.identifier
                 FROM (SELECT $1::bigint AS id) w
                 LEFT JOIN LATERAL (
                     SELECT value, accounted, identifier FROM stripe_sync_sends
                     WHERE batch_id = $1 AND status = 'accepted'
                     ORDER BY seq DESC LIMIT 1) p ON true
                 WHERE b.id = w.id",
            )
            .bind(batch_id)
            .execute(&mut **tx)
            .await
            .map_err(db("restoring the value stripe holds"))?;
        }
    }
    Ok(())
}

/// Settles a send in doubt: accepted when Stripe `recorded` it, else refused (its units are
/// owed again), whatever attempts of it were in doubt.
async fn settle_doubt_in(
    tx: &mut sqlx::Transaction<'static, Postgres>,
    batch_id: i64,
    send: &Send,
    recorded: bool,
    reason: &str,
) -> Result<(), Error> {
    if recorded {
        return accept_in(tx, batch_id, send).await;
    }
    sqlx::query(
        "UPDATE stripe_sync_sends SET status = 'refused', error = $3, answered_at = now()
         WHERE batch_id = $1 AND seq = $2 AND status = 'sending'",
    )
    .bind(batch_id)
    .bind(send.seq)
    .bind(format!("not recorded by stripe: {reason}"))
    .execute(&mut **tx)
    .await
    .map_err(db("settling a send in doubt"))?;
    Ok(())
}

fn resolution_change<'a>(
    customer_id: &'a str,
    meter_id: &'a str,
    send: &'a Send,
    recorded: bool,
    reason: &'a str,
) -> Change<'a> {
    Change::MeterEventResolved {
        customer_id,
        meter_id,
        identifier: &send.identifier,
        value: send.value,
        recorded,
        reason,
    }
}

#[cfg(test)]
mod tests;
