//! Customer and meter mappings between meterline and Stripe, unmapped Stripe customers, and
//! Stripe's meter error reports: the only code that reads or writes
//! `entity_integration_mappings`, `stripe_customer_states`, `stripe_unmapped_customers`,
//! `stripe_meter_mappings` and `stripe_meter_error_reports`.
//!
//! This file holds the store's handles ([`MappingStore`] and one handle per concern), the
//! shared [`Page`] and [`MappingError`]; each concern keeps its own rules in its own file:
//! - `customers.rs`: customer mappings (manual ones, the scope lock, the audit of changes);
//! - `webhook_order.rs`: the ordering of Stripe's `customer.*` events and of imports;
//! - `unmapped.rs`: Stripe customers without a usable external id;
//! - `meters.rs`: meter mappings;
//! - `error_reports.rs`: Stripe's asynchronous meter error reports;
//! - `subscriptions.rs`: subscription periods from `customer.subscription.*` events (the
//!   table itself is `meterline_catalog::billing_periods`, which the aggregator reads).
//!
//! Rules kept everywhere below:
//! - Every read and write is scoped by tenant AND environment. Handlers pass their
//!   [`TenantScope`]; the consumer and the sync pass the ids of the message they work on.
//! - Values are validated before they get here ([`StripeCustomerId`], [`CustomerId`],
//!   [`EventName`], [`MeterId`]) and rows are parsed back through the same rules; a row that
//!   fails is [`MappingError::Corrupt`], never handed out. No sqlx type leaves this module.
//!
//! [`TenantScope`]: meterline_common::auth::TenantScope
//! [`CustomerId`]: meterline_schemas::CustomerId
//! [`EventName`]: meterline_schemas::EventName
//! [`MeterId`]: meterline_schemas::MeterId

mod customers;
mod error_reports;
mod meters;
mod subscriptions;
mod unmapped;
mod webhook_order;

use meterline_accounts::audit::{self, Actor, Change};
use meterline_common::auth::TenantScope;
use meterline_common::retry::Retriable;
use serde::Serialize;
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::{QueryAs, QueryScalar};
use sqlx::{FromRow, PgPool, Postgres, Transaction};

pub(crate) use customers::{begin_locked, Writer};
pub use customers::{
    BulkOutcome, CustomerMapping, CustomerMappingQuery, MappingSource, MappingStatus,
    StripeCustomerId,
};
pub use error_reports::{ErrorReport, ErrorReportEntry, StoredErrorReport};
pub use meters::{needed_formula, MeterMapping, MeterMappingInput, ProviderMeter};
pub use subscriptions::{
    finalized_invoice, periods_of, FinalizedInvoice, INVOICE_FINALIZED, SUBSCRIPTION_EVENTS,
};
pub use unmapped::{UnmappedCustomer, UnmappedQuery};
pub(crate) use webhook_order::import_snapshot;
pub use webhook_order::{
    CustomerEvent, CustomerEventKind, EventOrder, ExternalId, Imported, WebhookOutcome,
};

/// `provider_type` of every row this store writes.
pub const PROVIDER_STRIPE: &str = "stripe";
/// `entity_type` of customer mappings.
pub const ENTITY_CUSTOMER: &str = "customer";

/// Longest page of a list answer.
pub const MAX_PAGE: u32 = 100;
/// Page size when the caller names none.
pub const DEFAULT_PAGE: u32 = 10;

/// A page of a list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub has_more: bool,
}

/// The page size a list answers for `requested` (1 to [`MAX_PAGE`]), and the `LIMIT` it
/// queries: one row more, which tells [`page`] whether more follow.
fn page_limit(requested: u32) -> (u32, i64) {
    let limit = requested.clamp(1, MAX_PAGE);
    (limit, i64::from(limit) + 1)
}

fn page<T>(mut rows: Vec<T>, limit: u32) -> Page<T> {
    let has_more = rows.len() > limit as usize;
    rows.truncate(limit as usize);
    Page {
        data: rows,
        has_more,
    }
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

impl Retriable for MappingError {
    /// Whether retrying the same write can succeed: connection and server trouble can pass;
    /// data the database refuses (SQLSTATE classes 22 and 23) will be refused again.
    fn is_retriable(&self) -> bool {
        match self {
            Self::Database(e) => meterline_common::retry::postgres_retriable(e),
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

/// A tenant environment as the queries bind it: tenant id `$1`, environment id `$2`.
type Scope<'a> = (&'a str, &'a str);

fn scope_of(scope: &TenantScope) -> Scope<'_> {
    (scope.tenant_id.as_str(), scope.environment_id.as_str())
}

/// Writes `change` to the audit trail inside `tx`, the transaction that makes it.
async fn audit_change(
    tx: &mut Tx,
    (tenant, env): Scope<'_>,
    actor: &Actor,
    change: &Change<'_>,
) -> Result<(), sqlx::Error> {
    audit::record(&mut **tx, tenant, env, actor, change).await
}

/// `sql` with `scope` bound as `$1`, `$2` and `key` as `$3`: the shape of every lookup of one
/// key (a customer, a Stripe customer, a meter) in a tenant environment.
fn keyed<'q, O>(sql: &'q str, (tenant, env): Scope<'q>, key: &'q str) -> PgQueryAs<'q, O>
where
    O: for<'r> FromRow<'r, PgRow>,
{
    sqlx::query_as(sql).bind(tenant).bind(env).bind(key)
}

/// [`keyed`] for a query that answers one column.
fn keyed_scalar<'q, O>(sql: &'q str, (tenant, env): Scope<'q>, key: &'q str) -> PgQueryScalar<'q, O>
where
    (O,): for<'r> FromRow<'r, PgRow>,
{
    sqlx::query_scalar(sql).bind(tenant).bind(env).bind(key)
}

type PgQueryAs<'q, O> = QueryAs<'q, Postgres, O, PgArguments>;
type PgQueryScalar<'q, O> = QueryScalar<'q, Postgres, O, PgArguments>;

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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_say_whether_more_follow() {
        let p = page(vec![1, 2, 3], 2);
        assert_eq!(p.data, [1, 2]);
        assert!(p.has_more);
        let p = page(vec![1, 2], 2);
        assert!(!p.has_more);
    }

    #[test]
    fn refused_data_is_not_retried() {
        assert!(MappingError::Database(sqlx::Error::PoolTimedOut).is_retriable());
        assert!(!MappingError::Corrupt("x".into()).is_retriable());
    }
}
