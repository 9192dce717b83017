//! The meter definitions store: the only code that reads or writes the PostgreSQL `meters`
//! table.
//!
//! Rule kept here: every read and write is scoped by the caller's [`TenantScope`], with both
//! `tenant_id` and `environment_id` in its `WHERE`, so no request can see or change another
//! tenant's (or environment's) meters. The one exception is
//! [`MeterStore::list_changed_since`], the aggregator's cross-tenant read for its meter cache.
//! Rows are parsed back through the same validation as API input
//! ([`MeterDefinition::try_from`]); a row that fails it is reported as
//! [`MeterStoreError::Corrupt`], never handed out. No sqlx type leaves this module.
//! A meter created, or changed in what it matches, schedules its backfill in the same
//! transaction ([`crate::backfills`]).

use meterline_schemas::{EnvironmentId, MeterDefinition, MeterId, MeterInput, TenantId};
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};
use time::OffsetDateTime;

use crate::backfills::{self, Backfill, Reason};
use crate::meter_versions::{self, Plan};
use crate::window_sizes::{self, WindowSizeError};
use meterline_common::auth::TenantScope;
use meterline_common::postgres::BindScope;

/// A meter definition as stored, with its timestamps.
///
/// Serialises flat, as the API answers: the definition's fields plus `created_at` and
/// `updated_at` in RFC 3339.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredMeter {
    #[serde(flatten)]
    pub definition: MeterDefinition,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// Whose meter a row of a cross-tenant read is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TenantScopeIds {
    pub tenant_id: TenantId,
    pub environment_id: EnvironmentId,
}

/// Why a meter store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MeterStoreError {
    /// A meter with this id already exists in the caller's tenant and environment.
    #[error("a meter with this id already exists")]
    Duplicate,
    /// The query failed. The text carries the cause because handlers log only `Display`.
    #[error("meters table query failed: {0}")]
    Database(#[source] sqlx::Error),
    /// The change would need another Stripe meter formula than the one the meter's usage
    /// was billed to ([`crate::meter_versions`]).
    #[error("meter {meter} has usage: {reason}")]
    FormulaChange {
        meter: MeterId,
        reason: crate::meter_versions::FormulaChange,
    },
    /// A stored row no longer passes validation (written by hand, or by an older rule).
    #[error("stored meter row is invalid: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for MeterStoreError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(e)
    }
}

impl From<WindowSizeError> for MeterStoreError {
    fn from(e: WindowSizeError) -> Self {
        match e {
            WindowSizeError::Database(e) => Self::Database(e),
            other => Self::Corrupt(other.to_string()),
        }
    }
}

/// A replaced meter, as [`MeterStore::replace`] answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replaced {
    pub meter: StoredMeter,
    /// Scheduled when what the meter matches changed.
    pub backfill: Option<Backfill>,
    /// When the new aggregation takes effect, when it changed for a meter with usage
    /// ([`crate::meter_versions`]); windows before keep the old one.
    pub aggregation_effective_from: Option<OffsetDateTime>,
}

/// The PostgreSQL store of meter definitions.
#[derive(Clone)]
pub struct MeterStore {
    pool: PgPool,
}

/// The columns every query returns, in this order.
const COLUMNS: &str = "id, event_name, aggregation, property, filters, created_at, updated_at";

#[derive(sqlx::FromRow)]
struct MeterRow {
    id: String,
    event_name: String,
    aggregation: String,
    property: Option<String>,
    filters: serde_json::Value,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
}

impl TryFrom<MeterRow> for StoredMeter {
    type Error = MeterStoreError;

    fn try_from(row: MeterRow) -> Result<Self, MeterStoreError> {
        let corrupt =
            |reason: String| MeterStoreError::Corrupt(format!("meter {}: {reason}", row.id));
        let filters = serde_json::from_value(row.filters.clone())
            .map_err(|e| corrupt(format!("filters: {e}")))?;
        let input = MeterInput {
            id: Some(row.id.clone()),
            event_name: row.event_name.clone(),
            aggregation: row.aggregation.clone(),
            property: row.property.clone(),
            filters: Some(filters),
        };
        let definition = MeterDefinition::try_from(input).map_err(|e| corrupt(e.to_string()))?;
        Ok(Self {
            definition,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct ScopedMeterRow {
    tenant_id: String,
    environment_id: String,
    #[sqlx(flatten)]
    meter: MeterRow,
}

/// Whether the meter has counted any usage: a window of the aggregator's registry
/// (`aggregation_windows`, written once an event of the meter is in ClickHouse).
async fn has_usage(
    tx: &mut Transaction<'_, Postgres>,
    scope: &TenantScope,
    meter: &MeterId,
) -> Result<bool, MeterStoreError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM aggregation_windows
         WHERE tenant_id = $1 AND environment_id = $2 AND meter_id = $3)",
    )
    .bind_scope(scope)
    .bind(meter.as_str())
    .fetch_one(&mut **tx)
    .await?)
}

/// The values a definition is written as: event_name, aggregation, property, filters.
fn columns_of(
    definition: &MeterDefinition,
) -> Result<(&str, &'static str, Option<&str>, serde_json::Value), MeterStoreError> {
    let filters = serde_json::to_value(&definition.filters)
        // Filters are strings, decimals and booleans: serialising them cannot fail.
        .map_err(|e| MeterStoreError::Corrupt(format!("serialising filters: {e}")))?;
    Ok((
        definition.event_name.as_str(),
        definition.aggregation.kind(),
        definition.aggregation.property().map(|p| p.as_str()),
        filters,
    ))
}

impl MeterStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Runs `sql`, an insert or update of one meter returning its row, with the scope as `$1`
    /// and `$2` and the definition's id and columns as `$3` to `$7`.
    async fn write(
        tx: &mut Transaction<'_, Postgres>,
        sql: &str,
        scope: &TenantScope,
        definition: &MeterDefinition,
    ) -> Result<Option<MeterRow>, MeterStoreError> {
        let (event_name, aggregation, property, filters) = columns_of(definition)?;
        Ok(sqlx::query_as(sql)
            .bind_scope(scope)
            .bind(definition.id.as_str())
            .bind(event_name)
            .bind(aggregation)
            .bind(property)
            .bind(filters)
            .fetch_optional(&mut **tx)
            .await?)
    }

    /// Stores a new meter in the caller's scope; [`MeterStoreError::Duplicate`] when the id is
    /// taken there (the same id in another tenant or environment is a different meter).
    pub async fn create(
        &self,
        scope: &TenantScope,
        definition: &MeterDefinition,
    ) -> Result<(StoredMeter, Backfill), MeterStoreError> {
        let mut tx = self.pool.begin().await?;
        // ON CONFLICT DO NOTHING instead of catching the unique violation: no error code
        // matching, and the transaction is not aborted.
        let row = Self::write(
            &mut tx,
            &format!(
                "INSERT INTO meters
                 (tenant_id, environment_id, id, event_name, aggregation, property, filters)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (tenant_id, environment_id, id) DO NOTHING
             RETURNING {COLUMNS}"
            ),
            scope,
            definition,
        )
        .await?;
        let stored: StoredMeter = row.ok_or(MeterStoreError::Duplicate)?.try_into()?;
        let backfill = backfills::schedule(&mut tx, scope, &definition.id, Reason::Created).await?;
        tx.commit().await?;
        Ok((stored, backfill))
    }

    /// The caller's meter with this id, if there is one.
    pub async fn get(
        &self,
        scope: &TenantScope,
        id: &MeterId,
    ) -> Result<Option<StoredMeter>, MeterStoreError> {
        let row: Option<MeterRow> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM meters
             WHERE tenant_id = $1 AND environment_id = $2 AND id = $3"
        ))
        .bind_scope(scope)
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(StoredMeter::try_from).transpose()
    }

    /// Every meter of the caller's scope, ordered by id.
    pub async fn list(&self, scope: &TenantScope) -> Result<Vec<StoredMeter>, MeterStoreError> {
        let rows: Vec<MeterRow> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM meters
             WHERE tenant_id = $1 AND environment_id = $2
             ORDER BY id"
        ))
        .bind_scope(scope)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(StoredMeter::try_from).collect()
    }

    /// Replaces the caller's meter `definition.id` (everything but its id and `created_at`),
    /// setting `updated_at`; `None` when the caller has no such meter. A new aggregation of a
    /// meter with usage applies from the first window boundary at or after `now + lead`
    /// ([`crate::meter_versions`]); one that needs another Stripe formula is refused.
    pub async fn replace(
        &self,
        scope: &TenantScope,
        definition: &MeterDefinition,
        now: OffsetDateTime,
        lead: std::time::Duration,
    ) -> Result<Option<Replaced>, MeterStoreError> {
        let mut tx = self.pool.begin().await?;
        let before: Option<MeterRow> = sqlx::query_as(&format!(
            "SELECT {COLUMNS} FROM meters
             WHERE tenant_id = $1 AND environment_id = $2 AND id = $3 FOR UPDATE"
        ))
        .bind_scope(scope)
        .bind(definition.id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(before) = before else {
            return Ok(None);
        };
        let before = StoredMeter::try_from(before)?.definition;
        let mut aggregation_effective_from = None;
        if before.aggregation != definition.aggregation
            && has_usage(&mut tx, scope, &definition.id).await?
        {
            // Its published windows must never be recomputed under the new aggregation (that
            // would re-bill usage billed under the old one): it applies from a boundary that
            // no accepted event has reached yet.
            let history = meter_versions::load(&self.pool, scope, &definition.id).await?;
            let horizon = now + lead;
            let window = window_sizes::load_scope(&self.pool, scope)
                .await?
                .window_at(horizon)
                .map_err(|e| MeterStoreError::Corrupt(e.to_string()))?;
            let boundary = if window.start() == horizon {
                horizon
            } else {
                window.end()
            };
            let plan = meter_versions::plan(
                &history,
                &before.aggregation,
                &definition.aggregation,
                horizon,
                boundary,
            )
            .map_err(|reason| MeterStoreError::FormulaChange {
                meter: definition.id.clone(),
                reason,
            })?;
            match plan {
                Plan::Unchanged => {}
                Plan::Replace { effective_from } => {
                    aggregation_effective_from = Some(effective_from);
                }
                Plan::Schedule { effective_from } => {
                    meter_versions::record(
                        &mut tx,
                        scope,
                        &definition.id,
                        &before.aggregation,
                        effective_from,
                    )
                    .await?;
                    aggregation_effective_from = Some(effective_from);
                }
            }
        }
        let row = Self::write(
            &mut tx,
            &format!(
                "UPDATE meters
             SET event_name = $4, aggregation = $5, property = $6, filters = $7,
                 updated_at = now()
             WHERE tenant_id = $1 AND environment_id = $2 AND id = $3
             RETURNING {COLUMNS}"
            ),
            scope,
            definition,
        )
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let stored = StoredMeter::try_from(row)?;
        // Events it did not match before may match now; the aggregation alone changing
        // re-bills nothing.
        let matching_changed =
            before.event_name != definition.event_name || before.filters != definition.filters;
        let backfill = if matching_changed {
            Some(
                backfills::schedule(&mut tx, scope, &definition.id, Reason::MatchingChanged)
                    .await?,
            )
        } else {
            None
        };
        tx.commit().await?;
        Ok(Some(Replaced {
            meter: stored,
            backfill,
            aggregation_effective_from,
        }))
    }

    /// Meters of every tenant and environment whose `updated_at` is after `updated_after`,
    /// oldest change first.
    ///
    /// The one cross-tenant read of this store, for the aggregator's meter cache (it resolves
    /// events of every tenant); no request handler may call it. `updated_at` is the writing
    /// transaction's start time, so a write committed late can carry a time before the newest
    /// one a poll has already seen: poll again from a little before the newest `updated_at`
    /// seen and treat repeats as no-ops.
    pub async fn list_changed_since(
        &self,
        updated_after: OffsetDateTime,
    ) -> Result<Vec<(TenantScopeIds, StoredMeter)>, MeterStoreError> {
        let rows: Vec<ScopedMeterRow> = sqlx::query_as(&format!(
            "SELECT tenant_id, environment_id, {COLUMNS} FROM meters
             WHERE updated_at > $1
             ORDER BY updated_at, tenant_id, environment_id, id"
        ))
        .bind(updated_after)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let corrupt = |e: meterline_schemas::SchemaError| {
                    MeterStoreError::Corrupt(format!("meter {}: {e}", row.meter.id))
                };
                let scope = TenantScopeIds {
                    tenant_id: TenantId::parse(&row.tenant_id).map_err(corrupt)?,
                    environment_id: EnvironmentId::parse(&row.environment_id).map_err(corrupt)?,
                };
                Ok((scope, StoredMeter::try_from(row.meter)?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(filters: serde_json::Value, aggregation: &str, property: Option<&str>) -> MeterRow {
        MeterRow {
            id: "tokens".into(),
            event_name: "llm.completion".into(),
            aggregation: aggregation.into(),
            property: property.map(str::to_owned),
            filters,
            created_at: time::macros::datetime!(2024-05-01 12:00:00.5 UTC),
            updated_at: time::macros::datetime!(2024-05-02 08:30:00 UTC),
        }
    }

    #[test]
    fn rows_parse_and_serialise_flat_with_rfc3339_times() {
        let stored = StoredMeter::try_from(row(
            json!([{"property": "model", "in": ["gpt-4"]}]),
            "SUM",
            Some("tokens"),
        ))
        .unwrap();
        assert_eq!(
            serde_json::to_value(&stored).unwrap(),
            json!({
                "id": "tokens",
                "event_name": "llm.completion",
                "aggregation": "SUM",
                "property": "tokens",
                "filters": [{"property": "model", "in": ["gpt-4"]}],
                "created_at": "2024-05-01T12:00:00.5Z",
                "updated_at": "2024-05-02T08:30:00Z",
            })
        );
    }

    #[test]
    fn invalid_rows_are_corrupt_not_served() {
        for bad in [
            row(json!({"not": "a list"}), "COUNT", None),
            row(json!([]), "AVERAGE", None),
            row(json!([]), "SUM", None),
            row(json!([{"property": "p", "in": []}]), "COUNT", None),
        ] {
            let err = StoredMeter::try_from(bad).unwrap_err();
            assert!(matches!(err, MeterStoreError::Corrupt(_)), "{err:?}");
            assert!(err
                .to_string()
                .starts_with("stored meter row is invalid: meter tokens: "));
        }
    }

    #[test]
    fn definitions_are_written_as_their_columns() {
        let definition = StoredMeter::try_from(row(
            json!([{"property": "tier", "in": [1, true, "x"]}]),
            "COUNT_UNIQUE",
            Some("user"),
        ))
        .unwrap()
        .definition;
        let (event_name, aggregation, property, filters) = columns_of(&definition).unwrap();
        assert_eq!(event_name, "llm.completion");
        assert_eq!(aggregation, "COUNT_UNIQUE");
        assert_eq!(property, Some("user"));
        assert_eq!(filters, json!([{"property": "tier", "in": [1, true, "x"]}]));
    }
}
