//! Stripe customers without a usable `metadata.external_id` (`stripe_unmapped_customers`),
//! listed for a person to map them by hand.
//!
//! Rule kept here: a row's status follows the customer: `unmapped` while it has no active
//! mapping, `mapped` once it has one (an external id arrived, or it was mapped by hand),
//! `deleted` after `customer.deleted`. The rows are written only where those changes happen
//! (the webhook ordering and the manual mapping rule), in the same transaction.

use meterline_common::auth::TenantScope;
use serde::Serialize;
use time::OffsetDateTime;

use super::{page, MappingError, Page, UnmappedCustomers, MAX_PAGE};

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

/// Filters and paging of the unmapped customer list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmappedQuery {
    /// `unmapped` (default), `mapped` or `deleted`.
    pub status: &'static str,
    pub limit: u32,
    /// Customers whose id sorts after this one (the list is ordered by Stripe customer id).
    pub starting_after: Option<String>,
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
