//! Sends whose fate Stripe did not tell at once: settled later from Stripe's meter event
//! summaries, by an operator's audited decision, or taken back when Stripe's asynchronous
//! error report says it dropped an event it had accepted.
//!
//! Rule kept here: a send in doubt is settled once, as accepted or refused, never both; a
//! dropped send's units leave the window's synced and accounted sums exactly once.

use super::sends::{accept_in, undo_acceptance_in};
use super::*;
use meterline_common::postgres::BindScope;

impl Ledger {
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
        .bind_scope(scope)
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
}

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
