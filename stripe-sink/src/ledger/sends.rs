//! A dispatcher's writes to the ledger under its claim: a meter event written as `sending`
//! before its request goes out, its key generation and doubt, and how it ended (accepted,
//! refused, unchanged, or the window finished).
//!
//! Rule kept here: every write runs in a transaction that locks the window's row and checks
//! the [`Claim`] it is made under ([`Ledger::hold`]), so a dispatcher whose lease ran out
//! writes nothing over the next claim.

use super::*;

impl Ledger {
    /// Starts a write for the window `claim` holds: a transaction in which the window's row
    /// is locked, so no other claim of it can start before the write commits.
    /// [`Error::ClaimLost`] once the window was claimed again.
    pub(super) async fn hold(
        &self,
        claim: Claim,
    ) -> Result<sqlx::Transaction<'static, Postgres>, Error> {
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
        send.key_generation = self
            .update_send(
                claim,
                send.seq,
                "UPDATE stripe_sync_sends SET key_generation = key_generation + 1
                 WHERE batch_id = $1 AND seq = $2 RETURNING key_generation",
                "renewing an idempotency key",
            )
            .await?;
        Ok(())
    }

    /// An attempt of the send got no certain "not recorded" (no answer, a 409, a 5xx):
    /// Stripe may hold it from now on. The first time is kept.
    pub async fn in_doubt(&self, claim: Claim, send: &mut Send) -> Result<(), Error> {
        if send.in_doubt_since.is_some() {
            return Ok(());
        }
        send.in_doubt_since = self
            .update_send(
                claim,
                send.seq,
                "UPDATE stripe_sync_sends SET in_doubt_since = COALESCE(in_doubt_since, now())
                 WHERE batch_id = $1 AND seq = $2 RETURNING in_doubt_since",
                "marking a send in doubt",
            )
            .await?;
        Ok(())
    }

    /// One column of the claimed window's send `seq` changed by `sql` (`$1` the window,
    /// `$2` the send, returning the column's new value) under `claim`, and committed.
    async fn update_send<T>(
        &self,
        claim: Claim,
        seq: i32,
        sql: &'static str,
        context: &'static str,
    ) -> Result<T, Error>
    where
        T: std::marker::Send + Unpin,
        (T,): for<'r> FromRow<'r, PgRow>,
    {
        let mut tx = self.hold(claim).await?;
        let value = sqlx::query_scalar(sql)
            .bind(claim.batch_id)
            .bind(seq)
            .fetch_one(&mut *tx)
            .await
            .map_err(db(context))?;
        tx.commit().await.map_err(db(context))?;
        Ok(value)
    }

    /// Stripe accepted (or already held) the event: it counts as synced, and the change it
    /// accounts for as accounted, the carry moving by their difference, in one transaction.
    pub async fn accepted(&self, claim: Claim, send: &Send) -> Result<(), Error> {
        let mut tx = self.hold(claim).await?;
        accept_in(&mut tx, claim.batch_id, send).await?;
        tx.commit().await.map_err(db("committing an acceptance"))
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
}

/// Marks `send` accepted and moves the window's sums by it; only a send still outstanding
/// moves them, so never twice.
pub(super) async fn accept_in(
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
pub(super) async fn undo_acceptance_in(
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
