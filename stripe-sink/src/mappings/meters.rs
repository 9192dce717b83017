//! Meter mappings (`stripe_meter_mappings`): which Stripe meter `event_name` a meterline
//! meter is sent to, and whether its sync is enabled.
//!
//! Rules kept here: a meter has at most one mapping and a Stripe event_name serves at most
//! one meter of a tenant environment (refused as [`MappingError::MeterAlreadyMapped`] /
//! [`MappingError::ProviderMeterAlreadyMapped`]); every meter mapping created or deleted is
//! written to the audit trail ([`audit`](meterline_accounts::audit)) in the transaction that makes the change.

use meterline_accounts::audit::{Actor, Change};
use meterline_common::auth::TenantScope;
use meterline_schemas::{EnvironmentId, EventName, MeterId, SchemaError, TenantId};
use serde::Serialize;
use time::OffsetDateTime;

use super::{
    audit_change, keyed, keyed_scalar, scope_of, MappingError, MappingStore, MeterMappings,
    PROVIDER_STRIPE,
};

/// A meter mapping as created through the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterMappingInput {
    pub meter_id: MeterId,
    /// The Stripe meter's event_name.
    pub provider_meter_id: EventName,
    pub sync_enabled: bool,
}

/// A stored meter mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MeterMapping {
    pub meter_id: MeterId,
    pub provider_type: &'static str,
    pub provider_meter_id: EventName,
    pub sync_enabled: bool,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

const METER_COLUMNS: &str = "meter_id, provider_meter_id, sync_enabled, created_at, updated_at";

#[derive(sqlx::FromRow)]
struct MeterRow {
    meter_id: String,
    provider_meter_id: String,
    sync_enabled: bool,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
}

impl TryFrom<MeterRow> for MeterMapping {
    type Error = MappingError;

    fn try_from(row: MeterRow) -> Result<Self, MappingError> {
        let corrupt =
            |e: SchemaError| MappingError::Corrupt(format!("meter mapping {}: {e}", row.meter_id));
        Ok(Self {
            meter_id: MeterId::parse(&row.meter_id).map_err(corrupt)?,
            provider_type: PROVIDER_STRIPE,
            provider_meter_id: EventName::parse(&row.provider_meter_id).map_err(corrupt)?,
            sync_enabled: row.sync_enabled,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

impl MappingStore {
    /// The Stripe meter event_name `meter_id` is sent to, and whether its sync is enabled.
    pub async fn provider_meter(
        &self,
        tenant: &TenantId,
        env: &EnvironmentId,
        meter_id: &MeterId,
    ) -> Result<Option<(String, bool)>, MappingError> {
        Ok(keyed(
            "SELECT provider_meter_id, sync_enabled FROM stripe_meter_mappings
             WHERE tenant_id = $1 AND environment_id = $2 AND meter_id = $3",
            (tenant.as_str(), env.as_str()),
            meter_id.as_str(),
        )
        .fetch_optional(&self.pool)
        .await?)
    }
}

impl MeterMappings<'_> {
    /// Stores a meter mapping; [`MappingError::MeterAlreadyMapped`] when the meter has one,
    /// [`MappingError::ProviderMeterAlreadyMapped`] when another meter uses the event_name.
    pub async fn create(
        &self,
        scope: &TenantScope,
        input: &MeterMappingInput,
    ) -> Result<MeterMapping, MappingError> {
        let (t, e) = scope_of(scope);
        let mut tx = self.pool.begin().await?;
        // ON CONFLICT DO NOTHING instead of catching the unique violation: no error code
        // matching; which constraint it was is read back after.
        let row: Option<MeterRow> = sqlx::query_as(&format!(
            "INSERT INTO stripe_meter_mappings
                 (tenant_id, environment_id, meter_id, provider_type, provider_meter_id,
                  sync_enabled)
             VALUES ($1, $2, $3, 'stripe', $4, $5)
             ON CONFLICT DO NOTHING
             RETURNING {METER_COLUMNS}"
        ))
        .bind(t)
        .bind(e)
        .bind(input.meter_id.as_str())
        .bind(input.provider_meter_id.as_str())
        .bind(input.sync_enabled)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = row {
            let change = Change::MeterMappingCreated {
                meter_id: &row.meter_id,
                provider_meter_id: &row.provider_meter_id,
                sync_enabled: row.sync_enabled,
            };
            audit_change(&mut tx, (t, e), &Actor::api(scope), &change).await?;
            tx.commit().await?;
            return row.try_into();
        }
        tx.rollback().await?;
        if self.get(scope, &input.meter_id).await?.is_some() {
            return Err(MappingError::MeterAlreadyMapped(input.meter_id.to_string()));
        }
        let other: Option<String> = keyed_scalar(
            "SELECT meter_id FROM stripe_meter_mappings
             WHERE tenant_id = $1 AND environment_id = $2 AND provider_type = 'stripe'
               AND provider_meter_id = $3",
            (t, e),
            input.provider_meter_id.as_str(),
        )
        .fetch_optional(self.pool)
        .await?;
        Err(match other {
            Some(meter_id) => MappingError::ProviderMeterAlreadyMapped {
                meter_id,
                provider_meter_id: input.provider_meter_id.to_string(),
            },
            // The conflicting row was deleted in between: the caller may simply retry.
            None => MappingError::MeterAlreadyMapped(input.meter_id.to_string()),
        })
    }

    pub async fn get(
        &self,
        scope: &TenantScope,
        meter_id: &MeterId,
    ) -> Result<Option<MeterMapping>, MappingError> {
        let row: Option<MeterRow> = keyed(
            &format!(
                "SELECT {METER_COLUMNS} FROM stripe_meter_mappings
                 WHERE tenant_id = $1 AND environment_id = $2 AND meter_id = $3"
            ),
            scope_of(scope),
            meter_id.as_str(),
        )
        .fetch_optional(self.pool)
        .await?;
        row.map(MeterMapping::try_from).transpose()
    }

    /// Every meter mapping of the caller's scope, by meter id.
    pub async fn list(&self, scope: &TenantScope) -> Result<Vec<MeterMapping>, MappingError> {
        let rows: Vec<MeterRow> = sqlx::query_as(&format!(
            "SELECT {METER_COLUMNS} FROM stripe_meter_mappings
             WHERE tenant_id = $1 AND environment_id = $2
             ORDER BY meter_id"
        ))
        .bind(scope.tenant_id.as_str())
        .bind(scope.environment_id.as_str())
        .fetch_all(self.pool)
        .await?;
        rows.into_iter().map(MeterMapping::try_from).collect()
    }

    /// Deletes the meter's mapping; false when it had none.
    pub async fn delete(
        &self,
        scope: &TenantScope,
        meter_id: &MeterId,
    ) -> Result<bool, MappingError> {
        let (t, e) = scope_of(scope);
        let mut tx = self.pool.begin().await?;
        let deleted: Option<String> = keyed_scalar(
            "DELETE FROM stripe_meter_mappings
             WHERE tenant_id = $1 AND environment_id = $2 AND meter_id = $3
             RETURNING provider_meter_id",
            (t, e),
            meter_id.as_str(),
        )
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(provider_meter_id) = &deleted {
            let change = Change::MeterMappingDeleted {
                meter_id: meter_id.as_str(),
                provider_meter_id,
            };
            audit_change(&mut tx, (t, e), &Actor::api(scope), &change).await?;
        }
        tx.commit().await?;
        Ok(deleted.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_rows_are_refused() {
        let row = MeterRow {
            meter_id: "bad id".into(),
            provider_meter_id: "api.request".into(),
            sync_enabled: true,
            created_at: OffsetDateTime::UNIX_EPOCH,
            updated_at: OffsetDateTime::UNIX_EPOCH,
        };
        assert!(matches!(
            MeterMapping::try_from(row),
            Err(MappingError::Corrupt(_))
        ));
    }
}
