//! Windows that waited re-open: `pending_mapping` ones once their customer is mapped, and
//! `skipped` ones once sync is on again and their meter has a mapping (within Stripe's 35
//! days); the dispatcher then sends only what is still owed.

use super::*;

impl Ledger {
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
}
