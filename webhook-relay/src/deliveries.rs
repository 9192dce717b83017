//! The deduplication log in PostgreSQL (`webhook_deliveries`): which Stripe events each tenant
//! environment already relayed. The only code touching that table; every query is scoped by
//! tenant and environment.
//!
//! Rules kept here:
//! - A row is written only AFTER Kafka acknowledged the event it names. A crash between the
//!   two can therefore only cause a redelivery to be published again (consumers deduplicate
//!   on the event id), never an event to be marked relayed without being published.
//! - Rows older than `RETENTION_WEBHOOK_DELIVERIES_DAYS` are pruned ([`DELIVERIES`]), never under
//!   the floor of [`meterline_common::retention`]: Stripe redelivers an event for up to 3
//!   days, and a record younger than the floor may still be needed.

use meterline_common::retention::PrunedTable;
use meterline_schemas::{EnvironmentId, StripeEventId, StripeEventType, TenantId, Timestamp};
use sqlx::PgPool;

/// The deduplication records as retention prunes them (`RETENTION_WEBHOOK_DELIVERIES_DAYS`,
/// default 90 days).
pub const DELIVERIES: PrunedTable = PrunedTable {
    records: "webhook deliveries",
    context: "pruning webhook deliveries",
    var: "RETENTION_WEBHOOK_DELIVERIES_DAYS",
    default_days: 90,
    delete: "DELETE FROM webhook_deliveries WHERE (tenant_id, environment_id, event_id) IN (
                 SELECT tenant_id, environment_id, event_id FROM webhook_deliveries
                 WHERE received_at < $1
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED)",
};

#[derive(Clone)]
pub struct DeliveryLog {
    pool: PgPool,
}

impl DeliveryLog {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Whether `event_id` was already relayed for this tenant environment.
    pub async fn seen(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
        event_id: &StripeEventId,
    ) -> Result<bool, sqlx::Error> {
        let found: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM webhook_deliveries
             WHERE tenant_id = $1 AND environment_id = $2 AND event_id = $3",
        )
        .bind(tenant.as_str())
        .bind(environment.as_str())
        .bind(event_id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(found.is_some())
    }

    /// Records a relayed event; a row already there (a concurrent delivery elsewhere) is kept.
    pub async fn record(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
        event_id: &StripeEventId,
        event_type: &StripeEventType,
        received_at: Timestamp,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO webhook_deliveries
                 (tenant_id, environment_id, event_id, event_type, received_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant_id, environment_id, event_id) DO NOTHING",
        )
        .bind(tenant.as_str())
        .bind(environment.as_str())
        .bind(event_id.as_str())
        .bind(event_type.as_str())
        .bind(received_at.as_offset_date_time())
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
