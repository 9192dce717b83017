//! Meter mappings (`stripe_meter_mappings`): which Stripe meter `event_name` a meterline
//! meter is sent to, and whether its sync is enabled.
//!
//! Rules kept here: a meter has at most one mapping and a Stripe event_name serves at most
//! one meter of a tenant environment (refused as [`MappingError::MeterAlreadyMapped`] /
//! [`MappingError::ProviderMeterAlreadyMapped`]); every meter mapping created or deleted is
//! written to the audit trail ([`audit`](meterline_accounts::audit)) in the transaction that makes the change.

use meterline_accounts::audit::{Actor, Change};
use meterline_common::auth::TenantScope;
use meterline_common::postgres::BindScope;
use meterline_schemas::{
    Aggregation, EnvironmentId, EventName, MeterId, SchemaError, StripeFormula, TenantId,
};
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
    /// The Stripe meter's formula when it was read from Stripe (see [`needed_formula`]).
    pub formula: Option<StripeFormula>,
    /// The Stripe meter's id (`mtr_...`), read with its formula: what subscription items
    /// name, so a customer's periods for the meter come from the subscription that bills it.
    pub stripe_meter_id: Option<String>,
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

/// Where the sync sends a meter's windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderMeter {
    /// The Stripe meter's event_name.
    pub event_name: String,
    pub sync_enabled: bool,
    /// The Stripe meter's formula, once read (at the mapping's creation or before a send).
    pub formula: Option<StripeFormula>,
}

impl MappingStore {
    /// Where `meter_id` is sent: the Stripe event_name, whether its sync is enabled, and the
    /// Stripe meter's formula if it was read.
    pub async fn provider_meter(
        &self,
        tenant: &TenantId,
        env: &EnvironmentId,
        meter_id: &MeterId,
    ) -> Result<Option<ProviderMeter>, MappingError> {
        let row: Option<(String, bool, Option<String>)> = keyed(
            "SELECT provider_meter_id, sync_enabled, formula FROM stripe_meter_mappings
             WHERE tenant_id = $1 AND environment_id = $2 AND meter_id = $3",
            (tenant.as_str(), env.as_str()),
            meter_id.as_str(),
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(
            row.map(|(event_name, sync_enabled, formula)| ProviderMeter {
                event_name,
                sync_enabled,
                formula: formula.as_deref().and_then(StripeFormula::parse),
            }),
        )
    }

    /// Records the formula and id of the Stripe meter `meter_id` is mapped to, read from
    /// Stripe.
    pub async fn record_formula(
        &self,
        tenant: &TenantId,
        env: &EnvironmentId,
        meter_id: &MeterId,
        (formula, stripe_meter_id): (StripeFormula, &str),
    ) -> Result<(), MappingError> {
        sqlx::query(
            "UPDATE stripe_meter_mappings SET formula = $4, stripe_meter_id = $5
             WHERE tenant_id = $1 AND environment_id = $2 AND meter_id = $3",
        )
        .bind(tenant.as_str())
        .bind(env.as_str())
        .bind(meter_id.as_str())
        .bind(formula.as_str())
        .bind(stripe_meter_id)
        .execute(&self.pool)
        .await?;
        Ok(())
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
                  sync_enabled, formula, stripe_meter_id)
             VALUES ($1, $2, $3, 'stripe', $4, $5, $6, $7)
             ON CONFLICT DO NOTHING
             RETURNING {METER_COLUMNS}"
        ))
        .bind(t)
        .bind(e)
        .bind(input.meter_id.as_str())
        .bind(input.provider_meter_id.as_str())
        .bind(input.sync_enabled)
        .bind(input.formula.map(StripeFormula::as_str))
        .bind(input.stripe_meter_id.as_deref())
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
        .bind_scope(scope)
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

/// Whether a Stripe meter of `formula` bills `aggregation` correctly: `Err` with the formula
/// it needs. `sum` for COUNT and SUM (each window's change is added up), `last` for MAX,
/// LATEST and COUNT_UNIQUE (the period-to-date value of the period's last window is billed);
/// never `count`, which would bill the number of windows.
pub fn needed_formula(
    aggregation: &Aggregation,
    formula: StripeFormula,
) -> Result<(), StripeFormula> {
    let needed = aggregation.stripe_formula();
    if needed == formula {
        Ok(())
    } else {
        Err(needed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_aggregation_needs_its_stripe_formula() {
        let p = meterline_schemas::PropertyName::parse("seats").unwrap();
        assert_eq!(
            needed_formula(&Aggregation::Count, StripeFormula::Sum),
            Ok(())
        );
        assert_eq!(
            needed_formula(&Aggregation::Count, StripeFormula::Count),
            Err(StripeFormula::Sum)
        );
        assert_eq!(
            needed_formula(&Aggregation::Sum(p.clone()), StripeFormula::Last),
            Err(StripeFormula::Sum)
        );
        assert_eq!(
            needed_formula(&Aggregation::Latest(p.clone()), StripeFormula::Last),
            Ok(())
        );
        assert_eq!(
            needed_formula(&Aggregation::Max(p), StripeFormula::Sum),
            Err(StripeFormula::Last)
        );
    }

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
