//! Subscription periods (`stripe_subscription_periods`): the billing periods Stripe names for
//! each customer, which replace calendar months wherever they are known
//! ([`PeriodCalendar`]).
//!
//! Rules kept here:
//! - stripe-sink records the current period of every subscription it hears of
//!   (`customer.subscription.created` / `.updated` / `.deleted`), one row per (subscription,
//!   period start), so past periods stay known after a renewal. Deliveries are unordered: an
//!   event older than the one that last set a row changes nothing. A subscription that ended
//!   before its period did (an immediate cancel) ends that period when it ended.
//! - A customer's periods for a meter are those of its subscriptions whose metered prices bill
//!   the meter's Stripe meter; when no subscription names it (the meter's Stripe id not read
//!   yet, a price not metered), all the customer's subscriptions', the later-starting period
//!   winning where two overlap. A customer without a mapping, or without a subscription
//!   known, is billed by calendar month.
//! - Stripe bills a period's usage on the invoice it finalizes after the period
//!   (`invoice.finalized`, whose `period_start`/`period_end` look back one period): every
//!   period of the subscription ending in that range is marked invoiced, and usage reported
//!   for it after then would be on no invoice (Stripe does not add it to a final one).
//! - Every change leaves its row unmarked; the aggregator then re-marks the customer's
//!   windows from the period's start, so values already published under the
//!   old periods are recomputed and sent again (a row whose customer is not mapped yet waits
//!   for the mapping, and is applied once it exists).

use std::collections::HashMap;

use meterline_common::retention::PrunedTable;
use meterline_schemas::{CustomerId, EnvironmentId, MeterId, PeriodCalendar, TenantId};
use sqlx::PgPool;
use time::OffsetDateTime;

/// A subscription's current period, as one Stripe event names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionPeriod {
    /// `sub_...`.
    pub subscription_id: String,
    /// `cus_...`.
    pub provider_customer_id: String,
    pub start: OffsetDateTime,
    /// Exclusive; after `start`.
    pub end: OffsetDateTime,
    /// The Stripe meters (`mtr_...`) its metered prices bill.
    pub meter_ids: Vec<String>,
    /// Stripe's `created` of the event (Unix seconds).
    pub event_created: i64,
}

/// Records `period` for a tenant environment; `false` when a newer event already set it, or
/// it changes nothing.
pub async fn record(
    pool: &PgPool,
    tenant: &TenantId,
    environment: &EnvironmentId,
    period: &SubscriptionPeriod,
) -> Result<bool, sqlx::Error> {
    let written = sqlx::query(
        "INSERT INTO stripe_subscription_periods AS s
             (tenant_id, environment_id, subscription_id, provider_customer_id, period_start,
              period_end, meter_ids, last_event_created)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (tenant_id, environment_id, subscription_id, period_start) DO UPDATE
         SET provider_customer_id = EXCLUDED.provider_customer_id,
             period_end = EXCLUDED.period_end, meter_ids = EXCLUDED.meter_ids,
             last_event_created = EXCLUDED.last_event_created,
             windows_marked = false, updated_at = now()
         WHERE s.last_event_created <= EXCLUDED.last_event_created
           AND (s.provider_customer_id, s.period_end, s.meter_ids)
               IS DISTINCT FROM
               (EXCLUDED.provider_customer_id, EXCLUDED.period_end, EXCLUDED.meter_ids)",
    )
    .bind(tenant.as_str())
    .bind(environment.as_str())
    .bind(&period.subscription_id)
    .bind(&period.provider_customer_id)
    .bind(period.start)
    .bind(period.end)
    .bind(&period.meter_ids)
    .bind(period.event_created)
    .execute(pool)
    .await?;
    Ok(written.rows_affected() > 0)
}

/// Marks invoiced the periods of `subscription_id` that end in the usage period
/// `(start, end]` of an invoice Stripe finalized at `finalized_at`; how many.
pub async fn record_invoice_finalized(
    pool: &PgPool,
    tenant: &TenantId,
    environment: &EnvironmentId,
    subscription_id: &str,
    (start, end): (OffsetDateTime, OffsetDateTime),
    finalized_at: OffsetDateTime,
) -> Result<u64, sqlx::Error> {
    let marked = sqlx::query(
        "UPDATE stripe_subscription_periods SET invoice_finalized_at = $6
         WHERE tenant_id = $1 AND environment_id = $2 AND subscription_id = $3
           AND period_end > $4 AND period_end <= $5 AND invoice_finalized_at IS NULL",
    )
    .bind(tenant.as_str())
    .bind(environment.as_str())
    .bind(subscription_id)
    .bind(start)
    .bind(end)
    .bind(finalized_at)
    .execute(pool)
    .await?;
    Ok(marked.rows_affected())
}

/// When the invoice of the period of `provider_customer_id` that ends at `period_end` was
/// finalized, if it was.
pub async fn invoice_finalized(
    pool: &PgPool,
    tenant: &TenantId,
    environment: &EnvironmentId,
    provider_customer_id: &str,
    period_end: OffsetDateTime,
) -> Result<Option<OffsetDateTime>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT min(invoice_finalized_at) FROM stripe_subscription_periods
         WHERE tenant_id = $1 AND environment_id = $2 AND provider_customer_id = $3
           AND period_end = $4",
    )
    .bind(tenant.as_str())
    .bind(environment.as_str())
    .bind(provider_customer_id)
    .bind(period_end)
    .fetch_one(pool)
    .await
}

/// One customer and meter whose billing periods are wanted.
pub type CustomerMeter = (TenantId, EnvironmentId, CustomerId, MeterId);

/// The billing periods of each customer and meter in `keys` (calendar months where none is
/// known): one query for all of them.
pub async fn calendars(
    pool: &PgPool,
    mut keys: Vec<CustomerMeter>,
) -> Result<HashMap<CustomerMeter, PeriodCalendar>, sqlx::Error> {
    keys.sort_unstable();
    keys.dedup();
    let mut calendars: HashMap<CustomerMeter, PeriodCalendar> = HashMap::new();
    if keys.is_empty() {
        return Ok(calendars);
    }
    let column = |f: fn(&CustomerMeter) -> &str| keys.iter().map(f).collect::<Vec<&str>>();
    let rows: Vec<(i64, OffsetDateTime, OffsetDateTime, bool)> = sqlx::query_as(
        "SELECT k.i, p.period_start, p.period_end,
                COALESCE(mm.stripe_meter_id = ANY(p.meter_ids), false)
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) WITH ORDINALITY
              AS k(tenant_id, environment_id, customer_id, meter_id, i)
         JOIN entity_integration_mappings m
           ON m.tenant_id = k.tenant_id AND m.environment_id = k.environment_id
          AND m.provider_type = 'stripe' AND m.entity_type = 'customer'
          AND m.entity_id = k.customer_id AND m.status = 'active'
         JOIN stripe_subscription_periods p
           ON p.tenant_id = k.tenant_id AND p.environment_id = k.environment_id
          AND p.provider_customer_id = m.provider_entity_id
         LEFT JOIN stripe_meter_mappings mm
           ON mm.tenant_id = k.tenant_id AND mm.environment_id = k.environment_id
          AND mm.meter_id = k.meter_id",
    )
    .bind(column(|k| k.0.as_str()))
    .bind(column(|k| k.1.as_str()))
    .bind(column(|k| k.2.as_str()))
    .bind(column(|k| k.3.as_str()))
    .fetch_all(pool)
    .await?;
    let mut found: HashMap<usize, Vec<(OffsetDateTime, OffsetDateTime, bool)>> = HashMap::new();
    for (i, start, end, bills_meter) in rows {
        // WITH ORDINALITY counts from 1.
        found
            .entry((i - 1) as usize)
            .or_default()
            .push((start, end, bills_meter));
    }
    for (i, periods) in found {
        let names_meter = periods.iter().any(|(_, _, bills)| *bills);
        let calendar = PeriodCalendar::from_periods(
            periods
                .into_iter()
                .filter(|(_, _, bills)| *bills || !names_meter)
                .map(|(start, end, _)| (start, end)),
        );
        calendars.insert(keys[i].clone(), calendar);
    }
    for key in keys {
        calendars.entry(key).or_default();
    }
    Ok(calendars)
}

/// Subscription periods as retention prunes them: a period that ended more than the
/// retention ago holds no window Stripe still takes (at least Stripe's 35 days plus a week).
pub const PERIODS: PrunedTable = PrunedTable {
    records: "subscription periods",
    context: "pruning subscription periods",
    // Kept as long as the sync ledger whose windows they bill.
    var: "RETENTION_LEDGER_DAYS",
    default_days: 400,
    delete: "DELETE FROM stripe_subscription_periods
             WHERE (tenant_id, environment_id, subscription_id, period_start) IN (
                 SELECT tenant_id, environment_id, subscription_id, period_start
                 FROM stripe_subscription_periods
                 WHERE period_end < $1 AND updated_at < $1
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED)",
};
