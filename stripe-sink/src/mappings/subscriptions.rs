//! Subscription periods from Stripe's `customer.subscription.*` events: the billing periods
//! that replace calendar months for the customer (stored by
//! [`meterline_catalog::billing_periods`], read by the aggregator).
//!
//! Rules kept here:
//! - The period is on the subscription's items in current API versions
//!   (`items.data[].current_period_start` / `_end`) and on the subscription itself in older
//!   ones; both are read, the items first. Items may have periods of their own (a yearly
//!   licence beside a monthly metered price): each distinct period start becomes one period,
//!   carrying the Stripe meters (`price.recurring.meter`) of its items.
//! - A subscription that ended (`ended_at`, as `customer.subscription.deleted` carries it)
//!   before its period's planned end ends that period then: usage after it is on no invoice
//!   of this subscription.
//! - `invoice.finalized` of a subscription's invoice marks the periods it bills invoiced
//!   (its `period_start`/`period_end` are the usage period, one period back); the sync then
//!   reports a change of such a period's usage instead of sending it, since Stripe would put
//!   it on no invoice. An invoice of no subscription bills no meter usage and is ignored.

use meterline_catalog::billing_periods::{self, SubscriptionPeriod};
use meterline_schemas::{EnvironmentId, TenantId};
use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::{MappingError, MappingStore};

/// Stripe's subscription event types start with this.
pub const SUBSCRIPTION_EVENTS: &str = "customer.subscription.";
/// Stripe's event of an invoice made final.
pub const INVOICE_FINALIZED: &str = "invoice.finalized";

/// A subscription's invoice Stripe finalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalizedInvoice {
    /// `sub_...`.
    pub subscription_id: String,
    /// The usage period it bills, `(start, end]` as Stripe's `period_start`/`period_end`.
    pub usage_period: (OffsetDateTime, OffsetDateTime),
    pub finalized_at: OffsetDateTime,
}

/// The subscription invoice an `invoice.finalized` object names; `None` for an invoice of no
/// subscription; an error names what it lacks.
pub fn finalized_invoice(
    invoice: &Map<String, Value>,
    event_created: i64,
) -> Result<Option<FinalizedInvoice>, String> {
    // `parent.subscription_details.subscription` since API version 2025-03-31, `subscription`
    // before it.
    let subscription = invoice
        .get("parent")
        .and_then(|p| p.get("subscription_details"))
        .and_then(|d| d.get("subscription"))
        .or_else(|| invoice.get("subscription"));
    let subscription = match subscription {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(id)) => id.as_str(),
        Some(Value::Object(expanded)) => expanded
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default(),
        Some(_) => "",
    };
    if !subscription.starts_with("sub_") {
        return Err("the invoice's subscription is not a subscription id (sub_...)".into());
    }
    let at = |key: &str| {
        invoice
            .get(key)
            .and_then(Value::as_i64)
            .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok())
            .ok_or_else(|| format!("the invoice has no {key}"))
    };
    let finalized_at = invoice
        .get("status_transitions")
        .and_then(|t| t.get("finalized_at"))
        .and_then(Value::as_i64)
        .unwrap_or(event_created);
    Ok(Some(FinalizedInvoice {
        subscription_id: subscription.to_owned(),
        usage_period: (at("period_start")?, at("period_end")?),
        finalized_at: OffsetDateTime::from_unix_timestamp(finalized_at)
            .map_err(|e| format!("finalized_at {finalized_at}: {e}"))?,
    }))
}

/// The periods a subscription object names; an error names what it lacks.
pub fn periods_of(
    subscription: &Map<String, Value>,
    event_created: i64,
) -> Result<Vec<SubscriptionPeriod>, String> {
    let id = subscription
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| id.starts_with("sub_"))
        .ok_or("data.object.id is not a subscription id (sub_...)")?;
    let customer = match subscription.get("customer") {
        Some(Value::String(id)) => Some(id.as_str()),
        Some(Value::Object(expanded)) => expanded.get("id").and_then(Value::as_str),
        _ => None,
    }
    .filter(|c| c.starts_with("cus_"))
    .ok_or("data.object.customer is not a customer id (cus_...)")?;
    let at = |object: &Map<String, Value>, key: &str| {
        object
            .get(key)
            .and_then(Value::as_i64)
            .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok())
    };
    let items = subscription
        .get("items")
        .and_then(|i| i.get("data"))
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    // (start, end, meters) per distinct start.
    let mut found: Vec<(OffsetDateTime, OffsetDateTime, Vec<String>)> = Vec::new();
    for item in items.iter().filter_map(Value::as_object) {
        let period = at(item, "current_period_start").zip(at(item, "current_period_end"));
        let Some((start, end)) = period.or_else(|| {
            at(subscription, "current_period_start").zip(at(subscription, "current_period_end"))
        }) else {
            continue;
        };
        let meter = item
            .get("price")
            .and_then(|p| p.get("recurring"))
            .and_then(|r| r.get("meter"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        match found.iter_mut().find(|(s, _, _)| *s == start) {
            Some((_, known_end, meters)) => {
                if let Some(meter) = meter {
                    // A metered item's period is the one that bills the meter.
                    *known_end = end;
                    meters.push(meter);
                }
            }
            None => found.push((start, end, meter.into_iter().collect())),
        }
    }
    if found.is_empty() {
        let start = at(subscription, "current_period_start");
        let end = at(subscription, "current_period_end");
        let (start, end) = start
            .zip(end)
            .ok_or("the subscription names no current period (on its items or itself)")?;
        found.push((start, end, Vec::new()));
    }
    let ended = at(subscription, "ended_at");
    Ok(found
        .into_iter()
        .filter_map(|(start, end, mut meter_ids)| {
            let end = ended.map_or(end, |ended| end.min(ended));
            meter_ids.sort_unstable();
            meter_ids.dedup();
            (start < end).then(|| SubscriptionPeriod {
                subscription_id: id.to_owned(),
                provider_customer_id: customer.to_owned(),
                start,
                end,
                meter_ids,
                event_created,
            })
        })
        .collect())
}

impl MappingStore {
    /// Records a subscription's period; `false` when a newer event already set it or it
    /// changes nothing.
    pub async fn record_subscription_period(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
        period: &SubscriptionPeriod,
    ) -> Result<bool, MappingError> {
        Ok(billing_periods::record(&self.pool, tenant, environment, period).await?)
    }

    /// Marks invoiced the periods `invoice` bills; how many.
    pub async fn record_invoice_finalized(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
        invoice: &FinalizedInvoice,
    ) -> Result<u64, MappingError> {
        Ok(billing_periods::record_invoice_finalized(
            &self.pool,
            tenant,
            environment,
            &invoice.subscription_id,
            invoice.usage_period,
            invoice.finalized_at,
        )
        .await?)
    }

    /// When the invoice of the period of `provider_customer_id` ending at `period_end` was
    /// finalized, if it was.
    pub async fn invoice_finalized(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
        provider_customer_id: &str,
        period_end: OffsetDateTime,
    ) -> Result<Option<OffsetDateTime>, MappingError> {
        Ok(billing_periods::invoice_finalized(
            &self.pool,
            tenant,
            environment,
            provider_customer_id,
            period_end,
        )
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use time::macros::datetime;

    fn object(value: Value) -> Map<String, Value> {
        value.as_object().cloned().expect("an object")
    }

    #[test]
    fn periods_are_read_from_the_items_then_the_subscription() {
        let basil = object(json!({
            "id": "sub_1", "object": "subscription", "customer": "cus_9",
            "items": {"object": "list", "data": [
                {"id": "si_1", "current_period_start": 1_764_000_000, "current_period_end": 1_766_592_000,
                 "price": {"recurring": {"interval": "month", "meter": "mtr_seats"}}},
                {"id": "si_2", "current_period_start": 1_764_000_000, "current_period_end": 1_766_592_000,
                 "price": {"recurring": {"interval": "month", "meter": null}}},
                {"id": "si_3", "current_period_start": 1_760_000_000, "current_period_end": 1_791_536_000,
                 "price": {"recurring": {"interval": "year"}}}
            ]}
        }));
        let periods = periods_of(&basil, 42).unwrap();
        assert_eq!(periods.len(), 2, "{periods:?}");
        assert_eq!(periods[0].meter_ids, vec!["mtr_seats".to_owned()]);
        assert_eq!(periods[0].start.unix_timestamp(), 1_764_000_000);
        assert_eq!(periods[0].end.unix_timestamp(), 1_766_592_000);
        assert_eq!(periods[0].provider_customer_id, "cus_9");
        assert_eq!(periods[0].event_created, 42);
        assert!(periods[1].meter_ids.is_empty());

        // An older API version: the period on the subscription, the customer expanded.
        let legacy = object(json!({
            "id": "sub_2", "customer": {"id": "cus_8", "object": "customer"},
            "current_period_start": 1_764_000_000, "current_period_end": 1_766_592_000,
            "items": {"data": [{"id": "si_4", "price": {"recurring": {"meter": "mtr_x"}}}]}
        }));
        let periods = periods_of(&legacy, 1).unwrap();
        assert_eq!(periods.len(), 1);
        assert_eq!(periods[0].meter_ids, vec!["mtr_x".to_owned()]);
        assert_eq!(periods[0].provider_customer_id, "cus_8");
    }

    #[test]
    fn an_ended_subscription_ends_its_period_then() {
        let canceled = object(json!({
            "id": "sub_3", "customer": "cus_7", "status": "canceled",
            "ended_at": datetime!(2026-12-02 08:00 UTC).unix_timestamp(),
            "current_period_start": datetime!(2026-11-14 09:17:33 UTC).unix_timestamp(),
            "current_period_end": datetime!(2026-12-14 09:17:33 UTC).unix_timestamp()
        }));
        let periods = periods_of(&canceled, 1).unwrap();
        assert_eq!(periods[0].end, datetime!(2026-12-02 08:00 UTC));
        // Ended at its very start: no period at all.
        let mut at_start = canceled.clone();
        at_start.insert("ended_at".into(), at_start["current_period_start"].clone());
        assert!(periods_of(&at_start, 1).unwrap().is_empty());
    }

    #[test]
    fn a_finalized_invoice_names_its_subscription_and_usage_period() {
        let basil = object(json!({
            "id": "in_1", "object": "invoice", "status": "open",
            "parent": {"type": "subscription_details",
                       "subscription_details": {"subscription": "sub_1"}},
            "period_start": 1_764_000_000, "period_end": 1_766_592_000,
            "status_transitions": {"finalized_at": 1_766_595_600}
        }));
        let invoice = finalized_invoice(&basil, 9)
            .unwrap()
            .expect("a subscription invoice");
        assert_eq!(invoice.subscription_id, "sub_1");
        assert_eq!(invoice.usage_period.1.unix_timestamp(), 1_766_592_000);
        assert_eq!(invoice.finalized_at.unix_timestamp(), 1_766_595_600);
        let legacy = object(json!({"id": "in_2", "subscription": "sub_2",
                                   "period_start": 1, "period_end": 2}));
        let invoice = finalized_invoice(&legacy, 9)
            .unwrap()
            .expect("a subscription invoice");
        assert_eq!(
            invoice.finalized_at.unix_timestamp(),
            9,
            "the event's time without one"
        );
        let one_off = object(json!({"id": "in_3", "subscription": null, "parent": null}));
        assert_eq!(finalized_invoice(&one_off, 9).unwrap(), None);
        let broken = object(json!({"id": "in_4", "subscription": "sub_4"}));
        assert!(finalized_invoice(&broken, 9)
            .unwrap_err()
            .contains("period_start"));
    }

    #[test]
    fn a_subscription_without_what_it_must_carry_is_refused() {
        for (object, reason) in [
            (
                json!({"id": "in_1", "customer": "cus_1"}),
                "subscription id",
            ),
            (json!({"id": "sub_1", "customer": 7}), "customer id"),
            (
                json!({"id": "sub_1", "customer": "cus_1"}),
                "no current period",
            ),
        ] {
            let err = periods_of(&object.as_object().cloned().unwrap(), 1).unwrap_err();
            assert!(err.contains(reason), "{err}");
        }
    }
}
