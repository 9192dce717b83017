//! Stripe customers without a usable `metadata.external_id` (`stripe_unmapped_customers`),
//! listed for a person to map them by hand.
//!
//! Rule kept here: a row's status follows the customer: `unmapped` while it has no active
//! mapping, `mapped` once it has one (an external id arrived, or it was mapped by hand),
//! `deleted` after `customer.deleted`. The rows are written only where those changes happen
//! (the webhook ordering and the manual mapping rule), in the same transaction.

use meterline_common::auth::TenantScope;
use meterline_common::postgres::BindScope;
use serde::Serialize;
use time::OffsetDateTime;

use super::webhook_order::{CustomerEvent, CustomerEventKind, EventOrder};
use super::{page, page_limit, MappingError, Page, Scope, Tx, UnmappedCustomers};

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
        let (limit, fetch) = page_limit(query.limit);
        let rows: Vec<UnmappedCustomer> = sqlx::query_as(
            "SELECT provider_customer_id, email, name, reason, status, last_event_id,
                    last_event_created, created_at, updated_at
             FROM stripe_unmapped_customers
             WHERE tenant_id = $1 AND environment_id = $2 AND status = $3
               AND ($4::text IS NULL OR provider_customer_id > $4)
             ORDER BY provider_customer_id
             LIMIT $5",
        )
        .bind_scope(scope)
        .bind(query.status)
        .bind(&query.starting_after)
        .bind(fetch)
        .fetch_all(self.pool)
        .await?;
        Ok(page(rows, limit))
    }
}

/// Follows one applied customer event (see [`super::webhook_order`]): a customer deleted or
/// now carrying an external id has its row (if any) marked `deleted`, `mapped` or `unmapped`
/// again; one without a usable external id is recorded (or refreshed) with the reason.
/// Returns whether the customer is now recorded as unmapped.
pub(super) async fn follow_event(
    tx: &mut Tx,
    (t, e): Scope<'_>,
    event: &CustomerEvent,
    order: &EventOrder,
) -> Result<bool, sqlx::Error> {
    let customer = event.customer.as_str();
    let deleted = event.kind == CustomerEventKind::Deleted;
    if deleted || event.external_id.customer_id().is_some() {
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
        return Ok(false);
    }
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
    .bind(event.external_id.unmapped_reason())
    .bind(&order.event_id)
    .bind(order.created)
    .fetch_one(&mut **tx)
    .await?;
    Ok(status == "unmapped")
}

/// A Stripe customer just mapped by hand is no longer unmapped.
pub(super) async fn mark_mapped(
    tx: &mut Tx,
    (t, e): Scope<'_>,
    provider_customer_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE stripe_unmapped_customers SET status = 'mapped', updated_at = now()
         WHERE tenant_id = $1 AND environment_id = $2 AND provider_customer_id = $3
           AND status = 'unmapped'",
    )
    .bind(t)
    .bind(e)
    .bind(provider_customer_id)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
