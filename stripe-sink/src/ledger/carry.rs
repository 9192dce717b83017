//! The rounding carry of each customer and meter (`stripe_sync_carry`): the exact quantity
//! its accepted meter events account for minus the whole numbers Stripe accepted, over all
//! its windows. [`crate::billing::round_with_carry`] rounds each change against it, so what
//! Stripe bills stays within half a unit of the exact usage however the usage is split into
//! windows.
//!
//! The carry only ever moves by adding to it, in the transaction that accounts for a change
//! and under the claim of the window it is accounted in. It lives apart from the windows, so
//! pruning old ledger rows keeps the fraction they carried.

use meterline_schemas::Decimal;
use sqlx::PgConnection;

use super::{db, Claim, Ledger};
use crate::Error;

/// Adds `amount` to the carry of the customer and meter of window `batch_id`.
pub(super) async fn add(
    conn: &mut PgConnection,
    batch_id: i64,
    amount: Decimal,
) -> Result<(), Error> {
    if amount.is_zero() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO stripe_sync_carry AS c (tenant_id, environment_id, entity_id, meter_id, carry)
         SELECT tenant_id, environment_id, entity_id, meter_id, $2
         FROM stripe_sync_batches WHERE id = $1
         ON CONFLICT (tenant_id, environment_id, entity_id, meter_id)
         DO UPDATE SET carry = c.carry + EXCLUDED.carry, updated_at = now()",
    )
    .bind(batch_id)
    .bind(amount)
    .execute(conn)
    .await
    .map_err(db("moving the rounding carry"))?;
    Ok(())
}

impl Ledger {
    /// A change of the window total that rounds to no meter event: it is accounted for and
    /// carried, so the next change of this customer and meter sends it.
    pub async fn carried(&self, claim: Claim, change: Decimal) -> Result<(), Error> {
        let mut tx = self.hold(claim).await?;
        sqlx::query(
            "UPDATE stripe_sync_batches
             SET accounted_quantity = accounted_quantity + $2, updated_at = now()
             WHERE id = $1",
        )
        .bind(claim.batch_id)
        .bind(change)
        .execute(&mut *tx)
        .await
        .map_err(db("accounting for a carried change"))?;
        add(&mut tx, claim.batch_id, change).await?;
        tx.commit().await.map_err(db("committing a carried change"))
    }
}
