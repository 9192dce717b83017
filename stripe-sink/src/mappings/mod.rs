//! Customer and meter mappings between meterline and Stripe, unmapped Stripe customers, and
//! Stripe's meter error reports: the only code that reads or writes
//! `entity_integration_mappings`, `stripe_customer_states`, `stripe_unmapped_customers`,
//! `stripe_meter_mappings` and `stripe_meter_error_reports`.
//!
//! Rules kept here:
//! - Every read and write is scoped by tenant AND environment. Handlers pass their
//!   [`TenantScope`]; the consumer and the sync pass the ids of the message they work on.
//! - Values are validated before they get here ([`StripeCustomerId`], [`CustomerId`],
//!   [`EventName`], [`MeterId`]) and rows are parsed back through the same rules; a row that
//!   fails is [`MappingError::Corrupt`], never handed out. No sqlx type leaves this module.
//! - Webhook ordering (deliveries are at-least-once and unordered): each Stripe customer keeps
//!   the newest `customer.*` event applied to it, ordered by [`EventOrder`] (`created`, then
//!   created < updated < deleted within one second, then the higher event id). An event that is
//!   not newer than the customer's newest changes nothing, and a deleted customer stays deleted.
//!   The webhook mappings are then a function of those newest events: an external id maps to
//!   the live customer whose newest event carries it (if several do, the one with the newest
//!   event), so the final mappings are the same whatever order the deliveries came in.
//! - Manual mappings stand until retired through the API, with two exceptions: a webhook that
//!   maps the same external id or the same Stripe customer replaces it (Stripe's
//!   `metadata.external_id` is the source of truth when present), and `customer.deleted`
//!   retires every mapping to the deleted customer.
//! - Writes to customer mappings of one tenant environment are serialised by a transaction-
//!   scoped advisory lock, so the consumer and the API never interleave a check and a write.
//! - Imported customers ([`crate::import`]) go through the very rule of webhooks: each listed
//!   customer is applied as a snapshot event ([`CustomerEvent::snapshot`]) dated just before
//!   the list was read, so a webhook event newer than the list wins and an older one is stale.
//!   Mappings made by webhooks and imports alike follow Stripe's metadata; manual ones stand.
//! - Every mapping created or retired, and every meter mapping created or deleted, is written
//!   to the audit trail ([`audit`]) in the transaction that makes the change.

use meterline_common::audit::{self, Actor, Change};
use meterline_common::auth::TenantScope;
use meterline_schemas::{
    CustomerId, EnvironmentId, EventName, MeterId, SchemaError, StripeEventId, StripeEventType,
    TenantId,
};
use serde::Serialize;
use serde_json::Value;
use sqlx::{PgPool, Postgres, Transaction};
use time::OffsetDateTime;

/// `provider_type` of every row this store writes.
pub const PROVIDER_STRIPE: &str = "stripe";
/// `entity_type` of customer mappings.
pub const ENTITY_CUSTOMER: &str = "customer";

/// Longest page of a list answer.
pub const MAX_PAGE: u32 = 100;
/// Page size when the caller names none.
pub const DEFAULT_PAGE: u32 = 10;

// ---------------------------------------------------------------------------------------------
// Validated values

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

// ---------------------------------------------------------------------------------------------
// Webhook input

/// The three `customer.*` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CustomerEventKind {
    Created,
    Updated,
    Deleted,
}

impl CustomerEventKind {
    pub fn from_event_type(event_type: &str) -> Option<Self> {
        match event_type {
            "customer.created" => Some(Self::Created),
            "customer.updated" => Some(Self::Updated),
            "customer.deleted" => Some(Self::Deleted),
            _ => None,
        }
    }

    /// Order inside one second of `created`: an update comes after the creation, a deletion
    /// after both.
    fn rank(self) -> i16 {
        match self {
            Self::Created => 0,
            Self::Updated => 1,
            Self::Deleted => 2,
        }
    }
}

/// Where one customer event stands among the events of its Stripe customer. Stripe's
/// `created` has one-second resolution, so same-second events are common: the kind breaks the
/// tie (created < updated < deleted), then the event id (an arbitrary but deterministic
/// choice, so every delivery order ends in the same state).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EventOrder {
    pub created: i64,
    pub rank: i16,
    pub event_id: String,
}

/// What a customer event says about our customer id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExternalId {
    /// `metadata.external_id`, a valid [`CustomerId`].
    Present(CustomerId),
    /// No `metadata.external_id` (or an empty one).
    Missing,
    /// Present but not a valid customer id (too long, control characters, not a string).
    Invalid,
}

impl ExternalId {
    /// Reads `metadata.external_id` of a Stripe customer (absent when `None`).
    pub fn from_metadata(value: Option<&Value>) -> Self {
        match value {
            None | Some(Value::Null) => Self::Missing,
            Some(Value::String(s)) if s.is_empty() => Self::Missing,
            Some(Value::String(s)) => match CustomerId::parse(s) {
                Ok(id) => Self::Present(id),
                Err(_) => Self::Invalid,
            },
            Some(_) => Self::Invalid,
        }
    }
}

/// One `customer.created` / `customer.updated` / `customer.deleted` event, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerEvent {
    pub event_id: StripeEventId,
    pub kind: CustomerEventKind,
    /// Stripe's `created` of the event, Unix seconds.
    pub created: i64,
    pub customer: StripeCustomerId,
    pub external_id: ExternalId,
    pub email: Option<String>,
    pub name: Option<String>,
    pub livemode: bool,
}

impl CustomerEvent {
    /// A customer as an import listed it, applied like a `customer.updated` event created at
    /// `observed` (Unix seconds, taken a margin before the list was requested): webhook events
    /// created after it win, older ones are stale, exactly as between two webhook events.
    /// Its id, `import_<job id>`, names where the state came from.
    pub fn snapshot(
        job_id: &str,
        observed: i64,
        customer: StripeCustomerId,
        external_id: ExternalId,
        email: Option<String>,
        name: Option<String>,
        livemode: bool,
    ) -> Result<Self, SchemaError> {
        Ok(Self {
            event_id: StripeEventId::parse(&format!("import_{job_id}"))?,
            kind: CustomerEventKind::Updated,
            created: observed,
            customer,
            external_id,
            email: email.filter(|e| !e.is_empty()),
            name: name.filter(|n| !n.is_empty()),
            livemode,
        })
    }

    pub fn order(&self) -> EventOrder {
        EventOrder {
            created: self.created,
            rank: self.kind.rank(),
            event_id: self.event_id.as_str().to_owned(),
        }
    }

    fn metadata(&self) -> Value {
        serde_json::json!({
            "email": self.email,
            "name": self.name,
            "livemode": self.livemode,
        })
    }
}

/// What applying one customer event did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookOutcome {
    /// False when the event was not newer than what the customer already had (a duplicate or a
    /// late delivery): nothing changed.
    pub applied: bool,
    /// Mappings made active.
    pub created: u32,
    /// Active mappings refreshed by a newer event of their customer.
    pub updated: u32,
    /// Active mappings retired.
    pub retired: u32,
    /// The customer was recorded as unmapped.
    pub unmapped: bool,
}

// ---------------------------------------------------------------------------------------------
// Stored values

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

/// A Stripe customer without a usable `metadata.external_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct UnmappedCustomer {
    pub provider_customer_id: String,
    pub email: Option<String>,
    pub name: Option<String>,
    /// `missing_external_id` or `invalid_external_id`.
    pub reason: String,
    /// `unmapped`, `mapped` (an external id arrived, or it was mapped by hand) or `deleted`.
    pub status: String,
    pub last_event_id: String,
    pub last_event_created: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

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

/// One of Stripe's asynchronous meter event error reports, as the consumer parsed it.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorReport {
    pub stripe_event_id: StripeEventId,
    /// `v1.billing.meter.error_report_triggered` or `v1.billing.meter.no_meter_found`.
    pub event_type: StripeEventType,
    pub occurred_at: OffsetDateTime,
    /// The meter (`mtr_...`) of the thin event's `related_object`, if it names one.
    pub stripe_meter_id: Option<String>,
    /// The event as received.
    pub raw: Value,
    /// One entry per sample error; empty for a thin event whose details (`data`) were not
    /// fetched, which is recorded as one row without identifier.
    pub entries: Vec<ErrorReportEntry>,
}

/// One sample error of a report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorReportEntry {
    /// The failed meter event's `identifier`.
    pub identifier: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub meter_event_name: Option<String>,
    pub provider_customer_id: Option<String>,
}

/// A stored error report row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredErrorReport {
    pub stripe_event_id: String,
    pub event_type: String,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub meter_event_name: Option<String>,
    pub stripe_meter_id: Option<String>,
    pub provider_customer_id: Option<String>,
    pub identifier: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
}

#[derive(sqlx::FromRow)]
struct ErrorReportRow {
    stripe_event_id: String,
    event_type: String,
    error_code: Option<String>,
    error_message: Option<String>,
    meter_event_name: Option<String>,
    stripe_meter_id: Option<String>,
    provider_customer_id: Option<String>,
    identifier: String,
    occurred_at: OffsetDateTime,
}

impl From<ErrorReportRow> for StoredErrorReport {
    fn from(row: ErrorReportRow) -> Self {
        Self {
            stripe_event_id: row.stripe_event_id,
            event_type: row.event_type,
            error_code: row.error_code,
            error_message: row.error_message,
            meter_event_name: row.meter_event_name,
            stripe_meter_id: row.stripe_meter_id,
            provider_customer_id: row.provider_customer_id,
            identifier: Some(row.identifier).filter(|i| !i.is_empty()),
            occurred_at: row.occurred_at,
        }
    }
}

/// A page of a list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub has_more: bool,
}

fn page<T>(mut rows: Vec<T>, limit: u32) -> Page<T> {
    let has_more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    Page {
        data: rows,
        has_more,
    }
}

/// Filters and paging of the customer mapping list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerMappingQuery {
    /// None: every status.
    pub status: Option<MappingStatus>,
    /// 1..=[`MAX_PAGE`].
    pub limit: u32,
    /// Rows with a larger id than this one (the list is ordered by id).
    pub starting_after: Option<i64>,
}

/// Filters and paging of the unmapped customer list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmappedQuery {
    /// `unmapped` (default), `mapped` or `deleted`.
    pub status: &'static str,
    pub limit: u32,
    /// Customers whose id sorts after this one (the list is ordered by Stripe customer id).
    pub starting_after: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Why a mapping store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    /// The customer already has an active mapping.
    #[error("customer {customer_id} is already mapped to {provider_customer_id}")]
    CustomerAlreadyMapped {
        customer_id: String,
        provider_customer_id: String,
    },
    /// The Stripe customer is already the active mapping of another customer.
    #[error("stripe customer {provider_customer_id} is already mapped to customer {customer_id}")]
    ProviderCustomerAlreadyMapped {
        customer_id: String,
        provider_customer_id: String,
    },
    /// A `customer.deleted` event was received for this Stripe customer.
    #[error("stripe customer {0} was deleted")]
    ProviderCustomerDeleted(String),
    /// The meter already has a mapping.
    #[error("meter {0} already has a stripe mapping")]
    MeterAlreadyMapped(String),
    /// Another meter is already sent to this Stripe meter.
    #[error("stripe meter event_name {provider_meter_id} is already mapped to meter {meter_id}")]
    ProviderMeterAlreadyMapped {
        meter_id: String,
        provider_meter_id: String,
    },
    /// The query failed. The text carries the cause because handlers log only `Display`.
    #[error("mappings query failed: {0}")]
    Database(#[source] sqlx::Error),
    /// A stored row no longer passes validation.
    #[error("stored mapping row is invalid: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for MappingError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(e)
    }
}

impl MappingError {
    /// Whether retrying the same write can succeed: connection and server trouble can pass;
    /// data the database refuses (SQLSTATE classes 22 and 23) will be refused again.
    pub fn is_retriable(&self) -> bool {
        match self {
            Self::Database(sqlx::Error::Database(e)) => !e
                .code()
                .is_some_and(|code| code.starts_with("22") || code.starts_with("23")),
            Self::Database(_) => true,
            _ => false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The store

/// The PostgreSQL store of mappings and error reports.
#[derive(Clone)]
pub struct MappingStore {
    pool: PgPool,
}

/// Customer mappings: `MappingStore::customers()`.
pub struct CustomerMappings<'a> {
    pool: &'a PgPool,
}

/// Unmapped Stripe customers: `MappingStore::unmapped()`.
pub struct UnmappedCustomers<'a> {
    pool: &'a PgPool,
}

/// Meter mappings: `MappingStore::meters()`.
pub struct MeterMappings<'a> {
    pool: &'a PgPool,
}

type Tx = Transaction<'static, Postgres>;

/// Serialises customer mapping writes of one tenant environment until the transaction ends.
async fn lock_scope(tx: &mut Tx, tenant: &str, env: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(format!("meterline.customer_mappings:{tenant}:{env}"))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The active mapping of `customer_id`, locked: (row id, provider customer, source).
async fn active_for_entity(
    tx: &mut Tx,
    tenant: &str,
    env: &str,
    customer_id: &str,
) -> Result<Option<(i64, String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, provider_entity_id, source FROM entity_integration_mappings
         WHERE tenant_id = $1 AND environment_id = $2 AND provider_type = 'stripe'
           AND entity_type = 'customer' AND entity_id = $3 AND status = 'active'
         FOR UPDATE",
    )
    .bind(tenant)
    .bind(env)
    .bind(customer_id)
    .fetch_optional(&mut **tx)
    .await
}

/// Who is changing customer mappings: the audit trail's actor, and the `source` of the
/// mappings the change creates.
pub(crate) struct Writer<'a> {
    pub actor: &'a Actor,
    pub source: MappingSource,
}

/// Records a retirement in the audit trail.
async fn audit_retired(
    tx: &mut Tx,
    tenant: &str,
    env: &str,
    actor: &Actor,
    (customer_id, provider_customer_id): (&str, &str),
    reason: &str,
) -> Result<(), sqlx::Error> {
    audit::record(
        &mut **tx,
        tenant,
        env,
        actor,
        &Change::CustomerMappingRetired {
            customer_id,
            provider_customer_id,
            reason,
        },
    )
    .await
}

/// Retires the active mappings to `provider_customer_id`, except those of `keep_entity`.
async fn retire_provider(
    tx: &mut Tx,
    (tenant, env): (&str, &str),
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
            tenant,
            env,
            actor,
            (entity, provider_customer_id),
            reason,
        )
        .await?;
    }
    Ok(retired.len() as u32)
}

async fn retire_row(
    tx: &mut Tx,
    (tenant, env): (&str, &str),
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
    audit_retired(tx, tenant, env, actor, (&entity, &provider), reason).await
}

impl MappingStore {
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    pub fn customers(&self) -> CustomerMappings<'_> {
        CustomerMappings { pool: &self.pool }
    }

    pub fn unmapped(&self) -> UnmappedCustomers<'_> {
        UnmappedCustomers { pool: &self.pool }
    }

    pub fn meters(&self) -> MeterMappings<'_> {
        MeterMappings { pool: &self.pool }
    }

    /// The Stripe customer (`cus_...`) `customer_id` is actively mapped to, for the sync.
    pub async fn provider_customer(
        &self,
        tenant: &TenantId,
        env: &EnvironmentId,
        customer_id: &CustomerId,
    ) -> Result<Option<String>, MappingError> {
        Ok(sqlx::query_scalar(
            "SELECT provider_entity_id FROM entity_integration_mappings
             WHERE tenant_id = $1 AND environment_id = $2 AND provider_type = 'stripe'
               AND entity_type = 'customer' AND entity_id = $3 AND status = 'active'",
        )
        .bind(tenant.as_str())
        .bind(env.as_str())
        .bind(customer_id.as_str())
        .fetch_optional(&self.pool)
        .await?)
    }

    /// The Stripe meter event_name `meter_id` is sent to, and whether its sync is enabled.
    pub async fn provider_meter(
        &self,
        tenant: &TenantId,
        env: &EnvironmentId,
        meter_id: &MeterId,
    ) -> Result<Option<(String, bool)>, MappingError> {
        Ok(sqlx::query_as(
            "SELECT provider_meter_id, sync_enabled FROM stripe_meter_mappings
             WHERE tenant_id = $1 AND environment_id = $2 AND meter_id = $3",
        )
        .bind(tenant.as_str())
        .bind(env.as_str())
        .bind(meter_id.as_str())
        .fetch_optional(&self.pool)
        .await?)
    }

    /// Records an error report; a repeated delivery changes nothing. Returns the number of rows
    /// that were new. Details recorded later for the same event (after fetching it) replace the
    /// row without identifier that its thin delivery left.
    pub async fn record_error_report(
        &self,
        tenant: &TenantId,
        env: &EnvironmentId,
        report: &ErrorReport,
    ) -> Result<u32, MappingError> {
        let mut tx = self.pool.begin().await?;
        let placeholder = [ErrorReportEntry::default()];
        let entries: &[ErrorReportEntry] = if report.entries.is_empty() {
            &placeholder
        } else {
            sqlx::query(
                "DELETE FROM stripe_meter_error_reports
                 WHERE tenant_id = $1 AND environment_id = $2 AND stripe_event_id = $3
                   AND identifier = '' AND error_code IS NULL",
            )
            .bind(tenant.as_str())
            .bind(env.as_str())
            .bind(report.stripe_event_id.as_str())
            .execute(&mut *tx)
            .await?;
            &report.entries
        };
        let mut inserted = 0;
        for entry in entries {
            let new: bool = sqlx::query_scalar(
                "INSERT INTO stripe_meter_error_reports
                     (tenant_id, environment_id, stripe_event_id, event_type, error_code,
                      error_message, meter_event_name, stripe_meter_id, provider_customer_id,
                      identifier, occurred_at, raw)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                 ON CONFLICT (tenant_id, environment_id, stripe_event_id, identifier) DO UPDATE
                 SET error_code = COALESCE(stripe_meter_error_reports.error_code, EXCLUDED.error_code),
                     error_message =
                         COALESCE(stripe_meter_error_reports.error_message, EXCLUDED.error_message),
                     meter_event_name = COALESCE(stripe_meter_error_reports.meter_event_name,
                                                 EXCLUDED.meter_event_name),
                     provider_customer_id = COALESCE(stripe_meter_error_reports.provider_customer_id,
                                                     EXCLUDED.provider_customer_id)
                 RETURNING (xmax = 0)",
            )
            .bind(tenant.as_str())
            .bind(env.as_str())
            .bind(report.stripe_event_id.as_str())
            .bind(report.event_type.as_str())
            .bind(&entry.error_code)
            .bind(&entry.error_message)
            .bind(&entry.meter_event_name)
            .bind(&report.stripe_meter_id)
            .bind(&entry.provider_customer_id)
            .bind(entry.identifier.as_deref().unwrap_or(""))
            .bind(report.occurred_at)
            .bind(&report.raw)
            .fetch_one(&mut *tx)
            .await?;
            inserted += u32::from(new);
        }
        tx.commit().await?;
        Ok(inserted)
    }

    /// The error reports naming any of `identifiers` (meter event identifiers), newest first.
    pub async fn error_reports_for_identifiers(
        &self,
        scope: &TenantScope,
        identifiers: &[String],
    ) -> Result<Vec<StoredErrorReport>, MappingError> {
        if identifiers.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<ErrorReportRow> = sqlx::query_as(
            "SELECT stripe_event_id, event_type, error_code, error_message, meter_event_name,
                    stripe_meter_id, provider_customer_id, identifier, occurred_at
             FROM stripe_meter_error_reports
             WHERE tenant_id = $1 AND environment_id = $2 AND identifier = ANY($3)
             ORDER BY occurred_at DESC, stripe_event_id, identifier",
        )
        .bind(scope.tenant_id.as_str())
        .bind(scope.environment_id.as_str())
        .bind(identifiers)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(StoredErrorReport::from).collect())
    }
}

impl CustomerMappings<'_> {
    /// Applies one `customer.*` event under the ordering rule of this module.
    pub async fn upsert_from_webhook(
        &self,
        tenant: &TenantId,
        env: &EnvironmentId,
        event: &CustomerEvent,
    ) -> Result<WebhookOutcome, MappingError> {
        let (t, e) = (tenant.as_str(), env.as_str());
        let mut tx = self.pool.begin().await?;
        lock_scope(&mut tx, t, e).await?;
        let actor = Actor::Webhook {
            event_id: event.event_id.as_str().to_owned(),
        };
        let writer = Writer {
            actor: &actor,
            source: MappingSource::Webhook,
        };
        let outcome = apply_event(&mut tx, (t, e), event, &writer).await?;
        tx.commit().await?;
        Ok(outcome)
    }
}

/// Applies one customer event (a webhook's, or an import's snapshot) inside `tx`, which holds
/// the scope's lock ([`lock_scope`]).
pub(crate) async fn apply_event(
    tx: &mut Tx,
    (t, e): (&str, &str),
    event: &CustomerEvent,
    writer: &Writer<'_>,
) -> Result<WebhookOutcome, MappingError> {
    let customer = event.customer.as_str();
    let order = event.order();

    let previous: Option<(Option<String>, bool, String, i64, i16)> = sqlx::query_as(
        "SELECT external_id, deleted, last_event_id, last_event_created, last_event_rank
         FROM stripe_customer_states
         WHERE tenant_id = $1 AND environment_id = $2 AND provider_customer_id = $3",
    )
    .bind(t)
    .bind(e)
    .bind(customer)
    .fetch_optional(&mut **tx)
    .await?;
    let mut outcome = WebhookOutcome::default();
    if let Some((_, deleted, id, created, rank)) = &previous {
        let newest = EventOrder {
            created: *created,
            rank: *rank,
            event_id: id.clone(),
        };
        // A deleted customer is never revived, whatever `created` a later event claims.
        if *deleted || order <= newest {
            return Ok(outcome);
        }
    }
    outcome.applied = true;

    let deleted = event.kind == CustomerEventKind::Deleted;
    let external_id = match &event.external_id {
        ExternalId::Present(id) => Some(id.as_str()),
        ExternalId::Missing | ExternalId::Invalid => None,
    };
    sqlx::query(
        "INSERT INTO stripe_customer_states
             (tenant_id, environment_id, provider_customer_id, external_id, deleted,
              last_event_id, last_event_created, last_event_rank)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (tenant_id, environment_id, provider_customer_id) DO UPDATE
         SET external_id = EXCLUDED.external_id, deleted = EXCLUDED.deleted,
             last_event_id = EXCLUDED.last_event_id,
             last_event_created = EXCLUDED.last_event_created,
             last_event_rank = EXCLUDED.last_event_rank, updated_at = now()",
    )
    .bind(t)
    .bind(e)
    .bind(customer)
    .bind(external_id)
    .bind(deleted)
    .bind(&order.event_id)
    .bind(order.created)
    .bind(order.rank)
    .execute(&mut **tx)
    .await?;

    if deleted {
        outcome.retired += retire_provider(
            tx,
            (t, e),
            customer,
            None,
            writer.actor,
            "stripe customer deleted",
        )
        .await?;
    }
    // The external ids whose owner may have changed: the one the customer had, and the
    // one it has now.
    let mut affected: Vec<&str> = Vec::new();
    if let Some((Some(old), ..)) = &previous {
        affected.push(old);
    }
    if let Some(new) = external_id {
        if !affected.contains(&new) {
            affected.push(new);
        }
    }
    for entity in affected {
        reconcile(tx, (t, e), entity, event, writer, &mut outcome).await?;
    }

    if deleted || external_id.is_some() {
        sqlx::query(
            "UPDATE stripe_unmapped_customers
             SET status = CASE WHEN $4 THEN 'deleted'
                          WHEN EXISTS (SELECT 1 FROM entity_integration_mappings m
                                       WHERE m.tenant_id = $1 AND m.environment_id = $2
                                         AND m.provider_type = 'stripe'
                                         AND m.entity_type = 'customer'
                                         AND m.provider_entity_id = $3
                                         AND m.status = 'active') THEN 'mapped'
                          ELSE 'unmapped' END,
                 last_event_id = $5, last_event_created = $6, updated_at = now()
             WHERE tenant_id = $1 AND environment_id = $2 AND provider_customer_id = $3",
        )
        .bind(t)
        .bind(e)
        .bind(customer)
        .bind(deleted)
        .bind(&order.event_id)
        .bind(order.created)
        .execute(&mut **tx)
        .await?;
    } else {
        let reason = match event.external_id {
            ExternalId::Invalid => "invalid_external_id",
            _ => "missing_external_id",
        };
        let status: String = sqlx::query_scalar(
            "INSERT INTO stripe_unmapped_customers
                 (tenant_id, environment_id, provider_customer_id, email, name, reason,
                  last_event_id, last_event_created, status)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8,
                     CASE WHEN EXISTS (SELECT 1 FROM entity_integration_mappings m
                                       WHERE m.tenant_id = $1 AND m.environment_id = $2
                                         AND m.provider_type = 'stripe'
                                         AND m.entity_type = 'customer'
                                         AND m.provider_entity_id = $3
                                         AND m.status = 'active')
                          THEN 'mapped' ELSE 'unmapped' END)
             ON CONFLICT (tenant_id, environment_id, provider_customer_id) DO UPDATE
             SET email = EXCLUDED.email, name = EXCLUDED.name, reason = EXCLUDED.reason,
                 last_event_id = EXCLUDED.last_event_id,
                 last_event_created = EXCLUDED.last_event_created,
                 status = EXCLUDED.status, updated_at = now()
             RETURNING status",
        )
        .bind(t)
        .bind(e)
        .bind(customer)
        .bind(&event.email)
        .bind(&event.name)
        .bind(reason)
        .bind(&order.event_id)
        .bind(order.created)
        .fetch_one(&mut **tx)
        .await?;
        outcome.unmapped = status == "unmapped";
    }
    Ok(outcome)
}

/// Makes the active mapping of `entity` match its owner: the live Stripe customer whose
/// newest event carries it (the newest such event wins).
async fn reconcile(
    tx: &mut Tx,
    (t, e): (&str, &str),
    entity: &str,
    event: &CustomerEvent,
    writer: &Writer<'_>,
    outcome: &mut WebhookOutcome,
) -> Result<(), sqlx::Error> {
    let owner: Option<(String, String, i64)> = sqlx::query_as(
        "SELECT provider_customer_id, last_event_id, last_event_created
         FROM stripe_customer_states
         WHERE tenant_id = $1 AND environment_id = $2 AND external_id = $3 AND NOT deleted
         ORDER BY last_event_created DESC, last_event_rank DESC, last_event_id DESC
         LIMIT 1",
    )
    .bind(t)
    .bind(e)
    .bind(entity)
    .fetch_optional(&mut **tx)
    .await?;
    let active = active_for_entity(tx, t, e, entity).await?;
    match (owner, active) {
        (None, None) => {}
        (None, Some((id, _, source))) => {
            // Nobody claims the external id any more; a manual mapping stays, one made
            // from Stripe's metadata (webhook or import) goes with it.
            if source != MappingSource::Manual.as_str() {
                retire_row(
                    tx,
                    (t, e),
                    id,
                    writer.actor,
                    "external id no longer on the stripe customer",
                )
                .await?;
                outcome.retired += 1;
            }
        }
        (Some((owner, event_id, created)), Some((id, provider, _))) if provider == owner => {
            if owner == event.customer.as_str() {
                sqlx::query(
                    "UPDATE entity_integration_mappings
                     SET last_event_id = $2, last_event_created = $3, metadata = $4,
                         updated_at = now()
                     WHERE id = $1",
                )
                .bind(id)
                .bind(event_id)
                .bind(created)
                .bind(event.metadata())
                .execute(&mut **tx)
                .await?;
                outcome.updated += 1;
            }
        }
        (Some((owner, event_id, created)), active) => {
            if let Some((id, ..)) = active {
                retire_row(
                    tx,
                    (t, e),
                    id,
                    writer.actor,
                    "external id now on another stripe customer",
                )
                .await?;
                outcome.retired += 1;
            }
            outcome.retired += retire_provider(
                tx,
                (t, e),
                &owner,
                Some(entity),
                writer.actor,
                "stripe customer now carries another external id",
            )
            .await?;
            let metadata = if owner == event.customer.as_str() {
                event.metadata()
            } else {
                serde_json::json!({})
            };
            sqlx::query(
                "INSERT INTO entity_integration_mappings
                     (tenant_id, environment_id, entity_type, entity_id, provider_type,
                      provider_entity_id, status, source, last_event_id, last_event_created,
                      metadata)
                 VALUES ($1, $2, 'customer', $3, 'stripe', $4, 'active', $8, $5, $6, $7)",
            )
            .bind(t)
            .bind(e)
            .bind(entity)
            .bind(&owner)
            .bind(event_id)
            .bind(created)
            .bind(metadata)
            .bind(writer.source.as_str())
            .execute(&mut **tx)
            .await?;
            audit::record(
                &mut **tx,
                t,
                e,
                writer.actor,
                &Change::CustomerMappingCreated {
                    customer_id: entity,
                    provider_customer_id: &owner,
                    source: writer.source.as_str(),
                },
            )
            .await?;
            outcome.created += 1;
        }
    }
    Ok(())
}

/// A transaction of a tenant environment's customer mappings, holding its lock: an import
/// applies one page of customers in it together with the update of its job row.
pub(crate) type ScopeTx = Tx;

/// Begins a transaction holding the customer mapping lock of `(tenant, env)`.
pub(crate) async fn begin_locked(
    pool: &PgPool,
    (tenant, env): (&str, &str),
) -> Result<ScopeTx, sqlx::Error> {
    let mut tx = pool.begin().await?;
    lock_scope(&mut tx, tenant, env).await?;
    Ok(tx)
}

/// What importing one listed customer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Imported {
    /// Its external id is now mapped to it; `retired` earlier mappings gave way.
    Created { retired: u32 },
    /// Its external id was already mapped to it.
    Unchanged,
    /// It carries an external id the rules leave mapped elsewhere, or not at all.
    Conflict { customer_id: String, reason: String },
    /// It has no usable external id (`missing_external_id`, `invalid_external_id`);
    /// `retired` mappings it used to have.
    Unmapped { reason: &'static str, retired: u32 },
}

/// Applies an import's snapshot of one customer ([`CustomerEvent::snapshot`]) inside `tx`.
///
/// A snapshot that says what the customer's state already says (same external id, not
/// deleted) is not news and writes nothing: a second import changes nothing, and two Stripe
/// customers carrying one external id keep the mapping the first import gave them instead
/// of trading it back and forth.
pub(crate) async fn import_snapshot(
    tx: &mut ScopeTx,
    (t, e): (&str, &str),
    event: &CustomerEvent,
    writer: &Writer<'_>,
) -> Result<Imported, MappingError> {
    let customer = event.customer.as_str();
    let state: Option<(Option<String>, bool)> = sqlx::query_as(
        "SELECT external_id, deleted FROM stripe_customer_states
         WHERE tenant_id = $1 AND environment_id = $2 AND provider_customer_id = $3",
    )
    .bind(t)
    .bind(e)
    .bind(customer)
    .fetch_optional(&mut **tx)
    .await?;
    let external = match &event.external_id {
        ExternalId::Present(id) => Some(id.as_str()),
        ExternalId::Missing | ExternalId::Invalid => None,
    };
    let known = matches!(&state, Some((ext, false)) if ext.as_deref() == external);
    let outcome = if known {
        WebhookOutcome::default()
    } else {
        apply_event(tx, (t, e), event, writer).await?
    };
    let Some(external) = external else {
        let reason = match event.external_id {
            ExternalId::Invalid => "invalid_external_id",
            _ => "missing_external_id",
        };
        return Ok(Imported::Unmapped {
            reason,
            retired: outcome.retired,
        });
    };
    let deleted = matches!(state, Some((_, true)));
    Ok(match active_for_entity(tx, t, e, external).await? {
        Some((_, provider, _)) if provider == customer && outcome.created > 0 => {
            Imported::Created {
                retired: outcome.retired,
            }
        }
        Some((_, provider, _)) if provider == customer => Imported::Unchanged,
        Some((_, provider, source)) => Imported::Conflict {
            customer_id: external.to_owned(),
            reason: format!("customer {external} is mapped to {provider} (source {source})"),
        },
        None => Imported::Conflict {
            customer_id: external.to_owned(),
            reason: if deleted {
                "the stripe customer was deleted".to_owned()
            } else {
                format!(
                    "customer {external} has no active mapping: it was retired, or a newer \
                     stripe event took the external id away"
                )
            },
        },
    })
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
    (t, e): (&str, &str),
    actor: &Actor,
    customer_id: &CustomerId,
    provider_customer_id: &StripeCustomerId,
) -> Result<MappingRow, MappingError> {
    if let Some((_, provider, _)) = active_for_entity(tx, t, e, customer_id.as_str()).await? {
        return Err(MappingError::CustomerAlreadyMapped {
            customer_id: customer_id.to_string(),
            provider_customer_id: provider,
        });
    }
    let taken: Option<String> = sqlx::query_scalar(
        "SELECT entity_id FROM entity_integration_mappings
         WHERE tenant_id = $1 AND environment_id = $2 AND provider_type = 'stripe'
           AND entity_type = 'customer' AND provider_entity_id = $3 AND status = 'active'",
    )
    .bind(t)
    .bind(e)
    .bind(provider_customer_id.as_str())
    .fetch_optional(&mut **tx)
    .await?;
    if let Some(other) = taken {
        return Err(MappingError::ProviderCustomerAlreadyMapped {
            customer_id: other,
            provider_customer_id: provider_customer_id.to_string(),
        });
    }
    let deleted: Option<bool> = sqlx::query_scalar(
        "SELECT deleted FROM stripe_customer_states
         WHERE tenant_id = $1 AND environment_id = $2 AND provider_customer_id = $3",
    )
    .bind(t)
    .bind(e)
    .bind(provider_customer_id.as_str())
    .fetch_optional(&mut **tx)
    .await?;
    if deleted == Some(true) {
        return Err(MappingError::ProviderCustomerDeleted(
            provider_customer_id.to_string(),
        ));
    }
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
    audit::record(
        &mut **tx,
        t,
        e,
        actor,
        &Change::CustomerMappingCreated {
            customer_id: customer_id.as_str(),
            provider_customer_id: provider_customer_id.as_str(),
            source: MappingSource::Manual.as_str(),
        },
    )
    .await?;
    sqlx::query(
        "UPDATE stripe_unmapped_customers SET status = 'mapped', updated_at = now()
         WHERE tenant_id = $1 AND environment_id = $2 AND provider_customer_id = $3
           AND status = 'unmapped'",
    )
    .bind(t)
    .bind(e)
    .bind(provider_customer_id.as_str())
    .execute(&mut **tx)
    .await?;
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
        let (t, e) = (scope.tenant_id.as_str(), scope.environment_id.as_str());
        let mut tx = self.pool.begin().await?;
        lock_scope(&mut tx, t, e).await?;
        let row = create_manual_in(
            &mut tx,
            (t, e),
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
        let (t, e) = (scope.tenant_id.as_str(), scope.environment_id.as_str());
        let actor = Actor::api(scope);
        let mut tx = self.pool.begin().await?;
        lock_scope(&mut tx, t, e).await?;
        let mut outcomes = Vec::with_capacity(rows.len());
        for (customer_id, provider_customer_id) in rows {
            if let Some((_, provider, _)) =
                active_for_entity(&mut tx, t, e, customer_id.as_str()).await?
            {
                if provider == provider_customer_id.as_str() {
                    outcomes.push(BulkOutcome::Unchanged);
                    continue;
                }
            }
            // Every refusal of create_manual_in comes from a SELECT, before any write: the
            // transaction stays usable for the next row.
            match create_manual_in(&mut tx, (t, e), &actor, customer_id, provider_customer_id).await
            {
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
        let row: Option<MappingRow> = sqlx::query_as(&format!(
            "SELECT {MAPPING_COLUMNS} FROM entity_integration_mappings
             WHERE tenant_id = $1 AND environment_id = $2 AND provider_type = 'stripe'
               AND entity_type = 'customer' AND entity_id = $3 AND status = 'active'"
        ))
        .bind(scope.tenant_id.as_str())
        .bind(scope.environment_id.as_str())
        .bind(customer_id.as_str())
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
        let limit = query.limit.clamp(1, MAX_PAGE);
        let rows: Vec<MappingRow> = sqlx::query_as(&format!(
            "SELECT {MAPPING_COLUMNS} FROM entity_integration_mappings
             WHERE tenant_id = $1 AND environment_id = $2 AND provider_type = 'stripe'
               AND entity_type = 'customer'
               AND ($3::text IS NULL OR status = $3)
               AND ($4::bigint IS NULL OR id > $4)
             ORDER BY id
             LIMIT $5"
        ))
        .bind(scope.tenant_id.as_str())
        .bind(scope.environment_id.as_str())
        .bind(query.status.map(MappingStatus::as_str))
        .bind(query.starting_after)
        .bind(i64::from(limit) + 1)
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
        let (t, e) = (scope.tenant_id.as_str(), scope.environment_id.as_str());
        let mut tx = self.pool.begin().await?;
        lock_scope(&mut tx, t, e).await?;
        let retired: Option<String> = sqlx::query_scalar(
            "UPDATE entity_integration_mappings
             SET status = 'retired', retired_at = now(), updated_at = now()
             WHERE tenant_id = $1 AND environment_id = $2 AND provider_type = 'stripe'
               AND entity_type = 'customer' AND entity_id = $3 AND status = 'active'
             RETURNING provider_entity_id",
        )
        .bind(t)
        .bind(e)
        .bind(customer_id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(provider) = &retired {
            audit_retired(
                &mut tx,
                t,
                e,
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

impl UnmappedCustomers<'_> {
    /// Stripe customers of the caller's scope with status `query.status`, by customer id.
    pub async fn list(
        &self,
        scope: &TenantScope,
        query: &UnmappedQuery,
    ) -> Result<Page<UnmappedCustomer>, MappingError> {
        let limit = query.limit.clamp(1, MAX_PAGE);
        let rows: Vec<UnmappedCustomer> = sqlx::query_as(
            "SELECT provider_customer_id, email, name, reason, status, last_event_id,
                    last_event_created, created_at, updated_at
             FROM stripe_unmapped_customers
             WHERE tenant_id = $1 AND environment_id = $2 AND status = $3
               AND ($4::text IS NULL OR provider_customer_id > $4)
             ORDER BY provider_customer_id
             LIMIT $5",
        )
        .bind(scope.tenant_id.as_str())
        .bind(scope.environment_id.as_str())
        .bind(query.status)
        .bind(&query.starting_after)
        .bind(i64::from(limit) + 1)
        .fetch_all(self.pool)
        .await?;
        Ok(page(rows, limit))
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
        let (t, e) = (scope.tenant_id.as_str(), scope.environment_id.as_str());
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
            audit::record(
                &mut *tx,
                t,
                e,
                &Actor::api(scope),
                &Change::MeterMappingCreated {
                    meter_id: &row.meter_id,
                    provider_meter_id: &row.provider_meter_id,
                    sync_enabled: row.sync_enabled,
                },
            )
            .await?;
            tx.commit().await?;
            return row.try_into();
        }
        tx.rollback().await?;
        if self.get(scope, &input.meter_id).await?.is_some() {
            return Err(MappingError::MeterAlreadyMapped(input.meter_id.to_string()));
        }
        let other: Option<String> = sqlx::query_scalar(
            "SELECT meter_id FROM stripe_meter_mappings
             WHERE tenant_id = $1 AND environment_id = $2 AND provider_type = 'stripe'
               AND provider_meter_id = $3",
        )
        .bind(t)
        .bind(e)
        .bind(input.provider_meter_id.as_str())
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
        let row: Option<MeterRow> = sqlx::query_as(&format!(
            "SELECT {METER_COLUMNS} FROM stripe_meter_mappings
             WHERE tenant_id = $1 AND environment_id = $2 AND meter_id = $3"
        ))
        .bind(scope.tenant_id.as_str())
        .bind(scope.environment_id.as_str())
        .bind(meter_id.as_str())
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
        let (t, e) = (scope.tenant_id.as_str(), scope.environment_id.as_str());
        let mut tx = self.pool.begin().await?;
        let deleted: Option<String> = sqlx::query_scalar(
            "DELETE FROM stripe_meter_mappings
             WHERE tenant_id = $1 AND environment_id = $2 AND meter_id = $3
             RETURNING provider_meter_id",
        )
        .bind(t)
        .bind(e)
        .bind(meter_id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(provider_meter_id) = &deleted {
            audit::record(
                &mut *tx,
                t,
                e,
                &Actor::api(scope),
                &Change::MeterMappingDeleted {
                    meter_id: meter_id.as_str(),
                    provider_meter_id,
                },
            )
            .await?;
        }
        tx.commit().await?;
        Ok(deleted.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn order(created: i64, kind: CustomerEventKind, id: &str) -> EventOrder {
        EventOrder {
            created,
            rank: kind.rank(),
            event_id: id.to_owned(),
        }
    }

    #[test]
    fn event_order_is_created_then_kind_then_id() {
        use CustomerEventKind::*;
        assert!(order(10, Created, "evt_b") < order(11, Created, "evt_a"));
        assert!(order(10, Deleted, "evt_z") < order(11, Created, "evt_a"));
        assert!(order(10, Created, "evt_z") < order(10, Updated, "evt_a"));
        assert!(order(10, Updated, "evt_z") < order(10, Deleted, "evt_a"));
        assert!(order(10, Updated, "evt_a") < order(10, Updated, "evt_b"));
        assert_eq!(order(10, Updated, "evt_a"), order(10, Updated, "evt_a"));
    }

    #[test]
    fn pages_say_whether_more_follow() {
        let p = page(vec![1, 2, 3], 2);
        assert_eq!(p.data, [1, 2]);
        assert!(p.has_more);
        let p = page(vec![1, 2], 2);
        assert!(!p.has_more);
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

    #[test]
    fn refused_data_is_not_retried() {
        assert!(MappingError::Database(sqlx::Error::PoolTimedOut).is_retriable());
        assert!(!MappingError::Corrupt("x".into()).is_retriable());
    }
}
