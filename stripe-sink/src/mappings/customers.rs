//! Customer mappings (`entity_integration_mappings`): the validated values they hold, list,
//! get, manual creation (one or a bulk upload), retirement, and the lookup of the sync.
//!
//! Rules kept here:
//! - Manual mappings stand until retired through the API, with two exceptions: a webhook that
//!   maps the same external id or the same Stripe customer replaces it (Stripe's
//!   `metadata.external_id` is the source of truth when present), and `customer.deleted`
//!   retires every mapping to the deleted customer (both in [`super::webhook_order`]).
//! - Writes to customer mappings of one tenant environment are serialised by a transaction-
//!   scoped advisory lock ([`begin_locked`]), so the consumer and the API never interleave a
//!   check and a write.
//! - Every mapping created or retired is written to the audit trail ([`audit`](meterline_accounts::audit)) in the
//!   transaction that makes the change.

use meterline_accounts::audit::{Actor, Change};
use meterline_common::auth::TenantScope;
use meterline_common::postgres::BindScope;
use meterline_schemas::{CustomerId, EnvironmentId, SchemaError, TenantId};
use serde::Serialize;
use serde_json::Value;
use sqlx::PgPool;
use time::OffsetDateTime;

use super::{
    audit_change, keyed, keyed_scalar, page, page_limit, scope_of, unmapped, webhook_order,
    CustomerMappings, MappingError, MappingStore, Page, Scope, Tx, ENTITY_CUSTOMER,
    PROVIDER_STRIPE,
};

/// A Stripe customer id: `cus_` followed by ASCII letters, digits and `_`, at most 255
/// characters in all.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(into = "String")]
pub struct StripeCustomerId(String);

impl StripeCustomerId {
    pub fn parse(value: &str) -> Result<Self, SchemaError> {
        let invalid = |reason: &str| SchemaError::InvalidValue {
            field: "provider_customer_id",
            reason: reason.to_owned(),
        };
        let rest = value
            .strip_prefix("cus_")
            .ok_or_else(|| invalid("must be a Stripe customer id (cus_...)"))?;
        if rest.is_empty() || value.len() > 255 {
            return Err(invalid("must be cus_ followed by 1 to 251 characters"));
        }
        if !rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(invalid(
                "may contain only ASCII letters, digits and '_' after cus_",
            ));
        }
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<StripeCustomerId> for String {
    fn from(value: StripeCustomerId) -> String {
        value.0
    }
}

impl std::fmt::Display for StripeCustomerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Status of a customer mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MappingStatus {
    Active,
    Retired,
}

impl MappingStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Retired => "retired",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "active" => Some(Self::Active),
            "retired" => Some(Self::Retired),
            _ => None,
        }
    }
}

/// Where a customer mapping came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MappingSource {
    Webhook,
    Manual,
    Import,
}

impl MappingSource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
            Self::Manual => "manual",
            Self::Import => "import",
        }
    }

    fn parse(value: &str) -> Option<Self> {
        match value {
            "webhook" => Some(Self::Webhook),
            "manual" => Some(Self::Manual),
            "import" => Some(Self::Import),
            _ => None,
        }
    }
}

/// A customer mapping as the API answers it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CustomerMapping {
    /// The row id; `starting_after` of the list takes it.
    pub id: i64,
    pub customer_id: CustomerId,
    pub entity_type: &'static str,
    pub provider_type: &'static str,
    pub provider_customer_id: StripeCustomerId,
    pub status: MappingStatus,
    pub source: MappingSource,
    pub last_event_id: Option<String>,
    pub last_event_created: Option<i64>,
    pub metadata: Value,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub retired_at: Option<OffsetDateTime>,
}

const MAPPING_COLUMNS: &str = "id, entity_id, provider_entity_id, status, source, last_event_id, \
     last_event_created, metadata, created_at, updated_at, retired_at";

#[derive(sqlx::FromRow)]
struct MappingRow {
    id: i64,
    entity_id: String,
    provider_entity_id: String,
    status: String,
    source: String,
    last_event_id: Option<String>,
    last_event_created: Option<i64>,
    metadata: Value,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
    retired_at: Option<OffsetDateTime>,
}

impl TryFrom<MappingRow> for CustomerMapping {
    type Error = MappingError;

    fn try_from(row: MappingRow) -> Result<Self, MappingError> {
        let corrupt = |what: String| MappingError::Corrupt(format!("mapping {}: {what}", row.id));
        Ok(Self {
            id: row.id,
            customer_id: CustomerId::parse(&row.entity_id).map_err(|e| corrupt(e.to_string()))?,
            entity_type: ENTITY_CUSTOMER,
            provider_type: PROVIDER_STRIPE,
            provider_customer_id: StripeCustomerId::parse(&row.provider_entity_id)
                .map_err(|e| corrupt(e.to_string()))?,
            status: MappingStatus::parse(&row.status)
                .ok_or_else(|| corrupt(format!("status {:?}", row.status)))?,
            source: MappingSource::parse(&row.source)
                .ok_or_else(|| corrupt(format!("source {:?}", row.source)))?,
            last_event_id: row.last_event_id,
            last_event_created: row.last_event_created,
            metadata: row.metadata,
            created_at: row.created_at,
            updated_at: row.updated_at,
            retired_at: row.retired_at,
        })
    }
}

/// Filters and paging of the customer mapping list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerMappingQuery {
    /// None: every status.
    pub status: Option<MappingStatus>,
    /// 1..=[`MAX_PAGE`](super::MAX_PAGE).
    pub limit: u32,
    /// Rows with a larger id than this one (the list is ordered by id).
    pub starting_after: Option<i64>,
}

/// A transaction of a tenant environment's customer mappings, holding its lock: an import
/// applies one page of customers in it together with the update of its job row.
pub(crate) type ScopeTx = Tx;

/// Begins a transaction holding the customer mapping lock of `(tenant, env)`: writes to
/// customer mappings of one tenant environment are serialised until it ends.
pub(crate) async fn begin_locked(
    pool: &PgPool,
    (tenant, env): Scope<'_>,
) -> Result<ScopeTx, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("meterline.customer_mappings:{tenant}:{env}"))
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

/// The active mapping of `customer_id`, locked: (row id, provider customer, source).
pub(super) async fn active_for_entity(
    tx: &mut Tx,
    scope: Scope<'_>,
    customer_id: &str,
) -> Result<Option<(i64, String, String)>, sqlx::Error> {
    keyed(
        "SELECT id, provider_entity_id, source FROM entity_integration_mappings
         WHERE tenant_id = $1 AND environment_id = $2 AND provider_type = 'stripe'
           AND entity_type = 'customer' AND entity_id = $3 AND status = 'active'
         FOR UPDATE",
        scope,
        customer_id,
    )
    .fetch_optional(&mut **tx)
    .await
}

/// Who is changing customer mappings: the audit trail's actor, and the `source` of the
/// mappings the change creates.
pub(crate) struct Writer<'a> {
    pub actor: &'a Actor,
    pub source: MappingSource,
}

/// Records a new mapping in the audit trail.
pub(super) async fn audit_created(
    tx: &mut Tx,
    scope: Scope<'_>,
    actor: &Actor,
    (customer_id, provider_customer_id): (&str, &str),
    source: MappingSource,
) -> Result<(), sqlx::Error> {
    let source = source.as_str();
    let change = Change::CustomerMappingCreated {
        customer_id,
        provider_customer_id,
        source,
    };
    audit_change(tx, scope, actor, &change).await
}

/// Records a retirement in the audit trail.
async fn audit_retired(
    tx: &mut Tx,
    scope: Scope<'_>,
    actor: &Actor,
    (customer_id, provider_customer_id): (&str, &str),
    reason: &str,
) -> Result<(), sqlx::Error> {
    let change = Change::CustomerMappingRetired {
        customer_id,
        provider_customer_id,
        reason,
    };
    audit_change(tx, scope, actor, &change).await
}

/// Retires the active mappings to `provider_customer_id`, except those of `keep_entity`.
pub(super) async fn retire_provider(
    tx: &mut Tx,
    (tenant, env): Scope<'_>,
    provider_customer_id: &str,
    keep_entity: Option<&str>,
    actor: &Actor,
    reason: &str,
) -> Result<u32, sqlx::Error> {
    let retired: Vec<String> = sqlx::query_scalar(
        "UPDATE entity_integration_mappings
         SET status = 'retired', retired_at = now(), updated_at = now()
         WHERE tenant_id = $1 AND environment_id = $2 AND provider_type = 'stripe'
           AND entity_type = 'customer' AND provider_entity_id = $3 AND status = 'active'
           AND ($4::text IS NULL OR entity_id <> $4)
         RETURNING entity_id",
    )
    .bind(tenant)
    .bind(env)
    .bind(provider_customer_id)
    .bind(keep_entity)
    .fetch_all(&mut **tx)
    .await?;
    for entity in &retired {
        audit_retired(
            tx,
            (tenant, env),
            actor,
            (entity, provider_customer_id),
            reason,
        )
        .await?;
    }
    Ok(retired.len() as u32)
}

pub(super) async fn retire_row(
    tx: &mut Tx,
    scope: Scope<'_>,
    id: i64,
    actor: &Actor,
    reason: &str,
) -> Result<(), sqlx::Error> {
    let (entity, provider): (String, String) = sqlx::query_as(
        "UPDATE entity_integration_mappings
         SET status = 'retired', retired_at = now(), updated_at = now()
         WHERE id = $1
         RETURNING entity_id, provider_entity_id",
    )
    .bind(id)
    .fetch_one(&mut **tx)
    .await?;
    audit_retired(tx, scope, actor, (&entity, &provider), reason).await
}

impl MappingStore {
    /// The Stripe customer (`cus_...`) `customer_id` is actively mapped to, for the sync.
    pub async fn provider_customer(
        &self,
        tenant: &TenantId,
        env: &EnvironmentId,
        customer_id: &CustomerId,
    ) -> Result<Option<String>, MappingError> {
        Ok(keyed_scalar(
            "SELECT provider_entity_id FROM entity_integration_mappings
             WHERE tenant_id = $1 AND environment_id = $2 AND provider_type = 'stripe'
               AND entity_type = 'customer' AND entity_id = $3 AND status = 'active'",
            (tenant.as_str(), env.as_str()),
            customer_id.as_str(),
        )
        .fetch_optional(&self.pool)
        .await?)
    }
}

/// What one row of a bulk upload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BulkOutcome {
    Created,
    /// The customer was already mapped to this very Stripe customer.
    Unchanged,
    /// Refused by the mapping rules; the reason.
    Conflict(String),
}

/// The manual mapping rule inside `tx` (which holds the scope's lock): refused when the
/// customer or the Stripe customer already has an active mapping or the Stripe customer was
/// deleted; otherwise the mapping is created and audited.
async fn create_manual_in(
    tx: &mut Tx,
    scope: Scope<'_>,
    actor: &Actor,
    customer_id: &CustomerId,
    provider_customer_id: &StripeCustomerId,
) -> Result<MappingRow, MappingError> {
    if let Some((_, provider, _)) = active_for_entity(tx, scope, customer_id.as_str()).await? {
        return Err(MappingError::CustomerAlreadyMapped {
            customer_id: customer_id.to_string(),
            provider_customer_id: provider,
        });
    }
    let taken: Option<String> = keyed_scalar(
        "SELECT entity_id FROM entity_integration_mappings
         WHERE tenant_id = $1 AND environment_id = $2 AND provider_type = 'stripe'
           AND entity_type = 'customer' AND provider_entity_id = $3 AND status = 'active'",
        scope,
        provider_customer_id.as_str(),
    )
    .fetch_optional(&mut **tx)
    .await?;
    if let Some(other) = taken {
        return Err(MappingError::ProviderCustomerAlreadyMapped {
            customer_id: other,
            provider_customer_id: provider_customer_id.to_string(),
        });
    }
    let state = webhook_order::customer_state(tx, scope, provider_customer_id.as_str()).await?;
    if state.is_some_and(|state| state.deleted) {
        return Err(MappingError::ProviderCustomerDeleted(
            provider_customer_id.to_string(),
        ));
    }
    let (t, e) = scope;
    let row: MappingRow = sqlx::query_as(&format!(
        "INSERT INTO entity_integration_mappings
             (tenant_id, environment_id, entity_type, entity_id, provider_type,
              provider_entity_id, status, source)
         VALUES ($1, $2, 'customer', $3, 'stripe', $4, 'active', 'manual')
         RETURNING {MAPPING_COLUMNS}"
    ))
    .bind(t)
    .bind(e)
    .bind(customer_id.as_str())
    .bind(provider_customer_id.as_str())
    .fetch_one(&mut **tx)
    .await?;
    let mapping = (customer_id.as_str(), provider_customer_id.as_str());
    audit_created(tx, scope, actor, mapping, MappingSource::Manual).await?;
    unmapped::mark_mapped(tx, scope, provider_customer_id.as_str()).await?;
    Ok(row)
}

impl CustomerMappings<'_> {
    /// Maps `customer_id` to `provider_customer_id` by hand (source `manual`).
    pub async fn create_manual(
        &self,
        scope: &TenantScope,
        customer_id: &CustomerId,
        provider_customer_id: &StripeCustomerId,
    ) -> Result<CustomerMapping, MappingError> {
        let mut tx = begin_locked(self.pool, scope_of(scope)).await?;
        let row = create_manual_in(
            &mut tx,
            scope_of(scope),
            &Actor::api(scope),
            customer_id,
            provider_customer_id,
        )
        .await?;
        tx.commit().await?;
        row.try_into()
    }

    /// Maps each row by hand (as [`Self::create_manual`]) in one transaction: a row whose
    /// mapping already exists is `unchanged`, one the rules refuse is a `conflict` with the
    /// reason, and the others are `created`. Rows are applied in order, so a later row sees
    /// the mappings of the earlier ones.
    pub async fn create_manual_bulk(
        &self,
        scope: &TenantScope,
        rows: &[(CustomerId, StripeCustomerId)],
    ) -> Result<Vec<BulkOutcome>, MappingError> {
        let ids = scope_of(scope);
        let actor = Actor::api(scope);
        let mut tx = begin_locked(self.pool, ids).await?;
        let mut outcomes = Vec::with_capacity(rows.len());
        for (customer_id, provider_customer_id) in rows {
            if let Some((_, provider, _)) =
                active_for_entity(&mut tx, ids, customer_id.as_str()).await?
            {
                if provider == provider_customer_id.as_str() {
                    outcomes.push(BulkOutcome::Unchanged);
                    continue;
                }
            }
            // Every refusal of create_manual_in comes from a SELECT, before any write: the
            // transaction stays usable for the next row.
            match create_manual_in(&mut tx, ids, &actor, customer_id, provider_customer_id).await {
                Ok(_) => outcomes.push(BulkOutcome::Created),
                Err(
                    e @ (MappingError::CustomerAlreadyMapped { .. }
                    | MappingError::ProviderCustomerAlreadyMapped { .. }
                    | MappingError::ProviderCustomerDeleted(_)),
                ) => outcomes.push(BulkOutcome::Conflict(e.to_string())),
                Err(e) => return Err(e),
            }
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    /// The active mapping of `customer_id`, if any.
    pub async fn get(
        &self,
        scope: &TenantScope,
        customer_id: &CustomerId,
    ) -> Result<Option<CustomerMapping>, MappingError> {
        let row: Option<MappingRow> = keyed(
            &format!(
                "SELECT {MAPPING_COLUMNS} FROM entity_integration_mappings
                 WHERE tenant_id = $1 AND environment_id = $2 AND provider_type = 'stripe'
                   AND entity_type = 'customer' AND entity_id = $3 AND status = 'active'"
            ),
            scope_of(scope),
            customer_id.as_str(),
        )
        .fetch_optional(self.pool)
        .await?;
        row.map(CustomerMapping::try_from).transpose()
    }

    /// Customer mappings of the caller's scope, oldest first (by row id).
    pub async fn list(
        &self,
        scope: &TenantScope,
        query: &CustomerMappingQuery,
    ) -> Result<Page<CustomerMapping>, MappingError> {
        let (limit, fetch) = page_limit(query.limit);
        let rows: Vec<MappingRow> = sqlx::query_as(&format!(
            "SELECT {MAPPING_COLUMNS} FROM entity_integration_mappings
             WHERE tenant_id = $1 AND environment_id = $2 AND provider_type = 'stripe'
               AND entity_type = 'customer'
               AND ($3::text IS NULL OR status = $3)
               AND ($4::bigint IS NULL OR id > $4)
             ORDER BY id
             LIMIT $5"
        ))
        .bind_scope(scope)
        .bind(query.status.map(MappingStatus::as_str))
        .bind(query.starting_after)
        .bind(fetch)
        .fetch_all(self.pool)
        .await?;
        let rows = rows
            .into_iter()
            .map(CustomerMapping::try_from)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page(rows, limit))
    }

    /// Retires the active mapping of `customer_id`; false when there was none.
    ///
    /// A webhook mapping comes back with the customer's next Stripe event that still carries
    /// the external id: Stripe's metadata is the source of truth.
    pub async fn retire(
        &self,
        scope: &TenantScope,
        customer_id: &CustomerId,
    ) -> Result<bool, MappingError> {
        let ids = scope_of(scope);
        let mut tx = begin_locked(self.pool, ids).await?;
        let retired: Option<String> = keyed_scalar(
            "UPDATE entity_integration_mappings
             SET status = 'retired', retired_at = now(), updated_at = now()
             WHERE tenant_id = $1 AND environment_id = $2 AND provider_type = 'stripe'
               AND entity_type = 'customer' AND entity_id = $3 AND status = 'active'
             RETURNING provider_entity_id",
            ids,
            customer_id.as_str(),
        )
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(provider) = &retired {
            audit_retired(
                &mut tx,
                ids,
                &Actor::api(scope),
                (customer_id.as_str(), provider),
                "retired through the api",
            )
            .await?;
        }
        tx.commit().await?;
        Ok(retired.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn stripe_customer_ids() {
        for ok in ["cus_1", "cus_NffrFeUfNV2Hib", "cus_000001abc_def"] {
            assert_eq!(StripeCustomerId::parse(ok).unwrap().as_str(), ok);
        }
        for bad in [
            "", "cus_", "cus", "cust_1", "CUS_1", "cus_a b", "cus_é", "sub_1",
        ] {
            let err = StripeCustomerId::parse(bad).unwrap_err().to_string();
            assert!(
                err.starts_with("invalid provider_customer_id: "),
                "{bad:?}: {err}"
            );
        }
        assert!(StripeCustomerId::parse(&format!("cus_{}", "a".repeat(251))).is_ok());
        assert!(StripeCustomerId::parse(&format!("cus_{}", "a".repeat(252))).is_err());
    }

    #[test]
    fn mapping_rows_serialise_with_both_ids() {
        let row = MappingRow {
            id: 7,
            entity_id: "flexprice_customer_123".into(),
            provider_entity_id: "cus_1".into(),
            status: "active".into(),
            source: "webhook".into(),
            last_event_id: Some("evt_1".into()),
            last_event_created: Some(1_714_564_800),
            metadata: serde_json::json!({"email": null}),
            created_at: time::macros::datetime!(2024-05-01 12:00:00 UTC),
            updated_at: time::macros::datetime!(2024-05-01 12:00:00 UTC),
            retired_at: None,
        };
        let mapping = CustomerMapping::try_from(row).unwrap();
        let json = serde_json::to_value(&mapping).unwrap();
        assert_eq!(json["customer_id"], "flexprice_customer_123");
        assert_eq!(json["provider_customer_id"], "cus_1");
        assert_eq!(json["provider_type"], "stripe");
        assert_eq!(json["entity_type"], "customer");
        assert_eq!(json["status"], "active");
        assert_eq!(json["source"], "webhook");
        assert_eq!(json["created_at"], "2024-05-01T12:00:00Z");
        assert_eq!(json["retired_at"], Value::Null);
    }
}
