//! The consumer of `stripe.webhooks`: verified Stripe events, relayed by webhook-relay.
//!
//! - `customer.created` / `customer.updated` / `customer.deleted` maintain the customer
//!   mappings (`metadata.external_id` -> `cus_...`) under the ordering rule of
//!   [`crate::mappings`]: deliveries are at-least-once and unordered, an event older than what
//!   its customer already has changes nothing, and a deleted customer stays deleted.
//! - `v1.billing.meter.error_report_triggered` / `v1.billing.meter.no_meter_found` are recorded
//!   as meter error reports. These are Stripe's *thin* events: the delivered body carries the
//!   event id, type, time and related meter only; the details (error code, message, meter event
//!   identifiers) are in `data`, which is fetched from `GET /v2/core/events/{id}` with the
//!   tenant's API key (audited, purpose `error_report`). Only when they cannot be had (no
//!   config, a refused key) is the report recorded as one row without identifier.
//! - Every accepted meter event a report names was dropped by Stripe after its 200: the
//!   ledger takes its units back out of the synced sums and fails its window
//!   ([`Ledger::dropped_by_stripe`]), so a retry after the cause is fixed sends them once.
//! - `customer.subscription.*` events record the subscription's current period
//!   ([`crate::mappings::periods_of`]): the customer's billing periods from then on, for the
//!   aggregator's period-to-date values and every meter event's timestamp. Older events than
//!   the one a period was last set by change nothing.
//! - `invoice.finalized` of a subscription's invoice marks the periods it bills invoiced: a
//!   later change of their usage is reported on the window (failed, with the reason) and
//!   counted, not sent, since Stripe would put it on no invoice.
//! - Every other type is counted and skipped.
//!
//! Rule kept here: a message's offset is committed only after the write it causes is durable
//! (the mapping transaction committed, or the message acknowledged on `stripe.webhooks.dlq`).
//! Database trouble is retried with backoff, in order, so one environment's events (one key,
//! one partition) are never applied out of delivery order by this consumer. A message that is
//! not a valid `stripe.webhooks` message, or that the database refuses as data, goes to the
//! dead-letter topic with the reason in `dlq.*` headers. On shutdown the message in hand is
//! finished and committed; only a retry wait is cut short, leaving that message uncommitted
//! for the next start.

use std::time::Duration;

use meterline_accounts::audit::{Actor, Purpose};
use meterline_accounts::stripe_config::StripeConfigStore;
use meterline_common::kafka::{commit_message, next_message, DeadLetter, DeadLetters};
use meterline_common::retry::{Backoff, Retriable};
use meterline_schemas::{DlqErrorKind, StripeEventType, StripeWebhook, Topic};
use rdkafka::consumer::StreamConsumer;
use rdkafka::message::{BorrowedMessage, Message};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::ledger::Ledger;
use crate::mappings::{
    finalized_invoice, periods_of, CustomerEvent, CustomerEventKind, ErrorReport, ErrorReportEntry,
    ExternalId, FinalizedInvoice, MappingStore, StripeCustomerId, INVOICE_FINALIZED,
    SUBSCRIPTION_EVENTS,
};
use crate::stripe::StripeClient;
use crate::{metrics, Error};
use meterline_catalog::billing_periods::SubscriptionPeriod;

const SERVICE: &str = "stripe-sink";

/// Between the attempts of a write: from 100 ms, doubling, to 10 s.
fn write_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(100), Duration::from_secs(10))
}

/// Stripe's thin meter error events this consumer records.
pub const ERROR_REPORT_TRIGGERED: &str = "v1.billing.meter.error_report_triggered";
pub const NO_METER_FOUND: &str = "v1.billing.meter.no_meter_found";

/// What a webhook asks of the sink.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Customer(CustomerEvent),
    ErrorReport(ErrorReport),
    /// The periods a subscription event names.
    Subscription(Vec<SubscriptionPeriod>),
    /// A subscription's invoice made final.
    InvoiceFinalized(FinalizedInvoice),
    /// A type the sink has no use for.
    Ignore,
}

/// Reads what `hook` asks for. An error is a message that claims a handled type but lacks
/// what that type must carry (it goes to the dead-letter topic).
pub fn classify(hook: &StripeWebhook) -> Result<Action, String> {
    let event_type = hook.event_type.as_str();
    if let Some(kind) = CustomerEventKind::from_event_type(event_type) {
        return customer_event(hook, kind).map(Action::Customer);
    }
    if event_type == ERROR_REPORT_TRIGGERED || event_type == NO_METER_FOUND {
        return error_report(hook).map(Action::ErrorReport);
    }
    let object = || {
        hook.payload
            .get("data")
            .and_then(|d| d.get("object"))
            .and_then(Value::as_object)
            .ok_or_else(|| format!("{event_type} without data.object"))
    };
    if event_type.starts_with(SUBSCRIPTION_EVENTS) {
        return periods_of(object()?, hook.created).map(Action::Subscription);
    }
    if event_type == INVOICE_FINALIZED {
        return Ok(finalized_invoice(object()?, hook.created)?
            .map_or(Action::Ignore, Action::InvoiceFinalized));
    }
    Ok(Action::Ignore)
}

fn non_empty_str<'a>(object: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    object
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn customer_event(hook: &StripeWebhook, kind: CustomerEventKind) -> Result<CustomerEvent, String> {
    let object = hook
        .payload
        .get("data")
        .and_then(|d| d.get("object"))
        .and_then(Value::as_object)
        .ok_or_else(|| format!("{} without data.object", hook.event_type))?;
    let id = object
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{} without data.object.id", hook.event_type))?;
    let customer = StripeCustomerId::parse(id).map_err(|e| format!("data.object.id: {e}"))?;
    let external_id =
        ExternalId::from_metadata(object.get("metadata").and_then(|m| m.get("external_id")));
    Ok(CustomerEvent {
        event_id: hook.event_id.clone(),
        kind,
        created: hook.created,
        customer,
        external_id,
        email: non_empty_str(object, "email").map(str::to_owned),
        name: non_empty_str(object, "name").map(str::to_owned),
        livemode: hook.livemode,
    })
}

fn error_report(hook: &StripeWebhook) -> Result<ErrorReport, String> {
    let occurred_at = OffsetDateTime::from_unix_timestamp(hook.created)
        .map_err(|e| format!("created {}: {e}", hook.created))?;
    let stripe_meter_id = hook
        .payload
        .get("related_object")
        .and_then(Value::as_object)
        .and_then(|o| non_empty_str(o, "id"))
        .map(str::to_owned);
    let mut entries = Vec::new();
    let error_types = hook
        .payload
        .get("data")
        .and_then(|d| d.get("reason"))
        .and_then(|r| r.get("error_types"))
        .and_then(Value::as_array);
    for error_type in error_types.into_iter().flatten() {
        let code = error_type
            .get("code")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let samples = error_type
            .get("sample_errors")
            .and_then(Value::as_array)
            .filter(|s| !s.is_empty());
        let Some(samples) = samples else {
            entries.push(ErrorReportEntry {
                error_code: code,
                ..ErrorReportEntry::default()
            });
            continue;
        };
        for sample in samples {
            let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_owned);
            let request = sample.get("request");
            entries.push(ErrorReportEntry {
                identifier: text(request.and_then(|r| r.get("identifier")))
                    .filter(|i| !i.is_empty()),
                error_code: code.clone(),
                error_message: text(sample.get("error_message")),
                meter_event_name: text(request.and_then(|r| r.get("event_name"))),
                provider_customer_id: text(
                    request
                        .and_then(|r| r.get("payload"))
                        .and_then(|p| p.get("stripe_customer_id")),
                ),
            });
        }
    }
    // One row per (event, identifier): several error types without identifier collapse.
    let mut seen = std::collections::HashSet::new();
    entries.retain(|e| seen.insert(e.identifier.clone()));
    Ok(ErrorReport {
        stripe_event_id: hook.event_id.clone(),
        event_type: hook.event_type.clone(),
        occurred_at,
        stripe_meter_id,
        raw: Value::Object(hook.payload.clone()),
        entries,
    })
}

/// The bounded metric label of a recorded error report type.
fn report_label(event_type: &StripeEventType) -> &'static str {
    if event_type.as_str() == NO_METER_FOUND {
        "no_meter_found"
    } else {
        "error_report_triggered"
    }
}

/// Consumes `stripe.webhooks` until `shutdown`; unusable messages go to
/// `stripe.webhooks.dlq` through `dead_letters`.
pub async fn consume(
    mappings: MappingStore,
    reports: Reports,
    consumer: StreamConsumer,
    dead_letters: DeadLetters,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    while let Some(message) = next_message(&consumer, &shutdown).await {
        metrics::webhook_event_consumed();
        if !handle(&mappings, &reports, &dead_letters, &message, &shutdown).await {
            // Shutdown cut a retry short: leave the message uncommitted for the next start.
            return Ok(());
        }
        // A failed commit re-delivers the message; applying it again changes nothing.
        commit_message(&consumer, &message, true);
    }
    Ok(())
}

/// What error reports need besides the mappings: the ledger, to take the units of a dropped
/// meter event back out, and the tenant's key and Stripe, to fetch a thin report's details.
#[derive(Clone)]
pub struct Reports {
    pub ledger: Ledger,
    pub configs: StripeConfigStore,
    pub stripe: StripeClient,
}

/// Applies one message. False when shutdown interrupted a retry (nothing to commit).
async fn handle(
    mappings: &MappingStore,
    reports: &Reports,
    dead_letters: &DeadLetters,
    message: &BorrowedMessage<'_>,
    shutdown: &CancellationToken,
) -> bool {
    let hook = match StripeWebhook::from_json_bytes(message.payload().unwrap_or_default()) {
        Ok(hook) => hook,
        Err(e) => {
            return dead_letter(
                dead_letters,
                message,
                e.to_string(),
                e.dlq_error_kind(),
                shutdown,
            )
            .await
        }
    };
    let action = match classify(&hook) {
        Ok(action) => action,
        Err(reason) => {
            return dead_letter(
                dead_letters,
                message,
                reason,
                DlqErrorKind::VALIDATION,
                shutdown,
            )
            .await
        }
    };
    let (tenant, environment) = (&hook.tenant_id, &hook.environment_id);
    let done = match action {
        Action::Ignore => {
            metrics::webhook_event_ignored("unhandled_type");
            tracing::debug!(event_id = %hook.event_id, event_type = %hook.event_type, "event type not handled");
            return true;
        }
        Action::Customer(event) => {
            let event = &event;
            let write = || async move {
                mappings
                    .customers()
                    .upsert_from_webhook(tenant, environment, event)
                    .await
            };
            write_retried("customer_mapping", write, shutdown)
                .await
                .map(|outcome| record_customer_outcome(&hook, &outcome))
        }
        Action::ErrorReport(report) => {
            apply_error_report(mappings, reports, &hook, report, shutdown).await
        }
        Action::Subscription(periods) => record_periods(mappings, &hook, &periods, shutdown).await,
        Action::InvoiceFinalized(invoice) => {
            let write = || mappings.record_invoice_finalized(tenant, environment, &invoice);
            write_retried("invoice_finalized", write, shutdown)
                .await
                .map(|periods| {
                    tracing::info!(
                        tenant_id = %tenant,
                        environment_id = %environment,
                        subscription_id = %invoice.subscription_id,
                        periods,
                        "invoice finalized: later changes of its periods are reported, not sent"
                    );
                })
        }
    };
    match done {
        Ok(()) => true,
        Err(NotWritten::Refused(e)) => {
            dead_letter(dead_letters, message, e, database_refused(), shutdown).await
        }
        Err(NotWritten::ShuttingDown) => false,
    }
}

/// Records the periods of a subscription event, each once.
async fn record_periods(
    mappings: &MappingStore,
    hook: &StripeWebhook,
    periods: &[SubscriptionPeriod],
    shutdown: &CancellationToken,
) -> Result<(), NotWritten> {
    let (tenant, environment) = (&hook.tenant_id, &hook.environment_id);
    let mut changed = 0;
    for period in periods {
        let write = || mappings.record_subscription_period(tenant, environment, period);
        if write_retried("subscription_period", write, shutdown).await? {
            changed += 1;
        }
    }
    if changed == 0 {
        metrics::webhook_event_ignored("stale");
    }
    tracing::info!(
        tenant_id = %tenant,
        environment_id = %environment,
        event_id = %hook.event_id,
        periods = periods.len(),
        changed,
        "subscription periods recorded"
    );
    Ok(())
}

/// Records an error report (its details fetched first when the webhook was thin) and takes
/// the units of every accepted meter event it names back out of the ledger's synced sums.
async fn apply_error_report(
    mappings: &MappingStore,
    reports: &Reports,
    hook: &StripeWebhook,
    thin_or_full: ErrorReport,
    shutdown: &CancellationToken,
) -> Result<(), NotWritten> {
    let (tenant, environment) = (&hook.tenant_id, &hook.environment_id);
    let report = if thin_or_full.entries.is_empty() {
        details(reports, hook, shutdown)
            .await?
            .unwrap_or(thin_or_full)
    } else {
        thin_or_full
    };
    let write = || async {
        mappings
            .record_error_report(tenant, environment, &report)
            .await
    };
    let new_rows = write_retried("error_report", write, shutdown).await?;
    record_error_report(hook, &report, new_rows);
    for entry in &report.entries {
        let Some(identifier) = &entry.identifier else {
            continue;
        };
        let reason = format!(
            "stripe accepted meter event {identifier} and then dropped it ({}: {}); its units \
             are owed again: fix the cause (the customer mapping, the meter), then retry the \
             window",
            entry.error_code.as_deref().unwrap_or("no code"),
            entry.error_message.as_deref().unwrap_or("no message"),
        );
        let drop = || reports.ledger.dropped_by_stripe(identifier, &reason);
        if let Some(batch_id) = write_retried("dropped_send", drop, shutdown).await? {
            metrics::meter_event_dropped();
            tracing::warn!(
                tenant_id = %tenant,
                environment_id = %environment,
                batch_id,
                identifier = %identifier,
                "stripe dropped an accepted meter event: its units are owed again"
            );
        }
    }
    Ok(())
}

/// The details of a thin error report, read with the tenant's key
/// (`GET /v2/core/events/{id}`). Stripe trouble of the moment is retried with backoff, in
/// order, like a database write; `None` when they cannot be had (no config, a refused key,
/// an unreadable answer): the report is then recorded thin, and said so in the log.
async fn details(
    reports: &Reports,
    hook: &StripeWebhook,
    shutdown: &CancellationToken,
) -> Result<Option<ErrorReport>, NotWritten> {
    let actor = Actor::Webhook {
        event_id: hook.event_id.to_string(),
    };
    let mut backoff = write_backoff();
    loop {
        let key = reports
            .configs
            .api_key(
                &hook.tenant_id,
                &hook.environment_id,
                &actor,
                Purpose::ErrorReport,
            )
            .await;
        let error = match key {
            Ok(None) => {
                tracing::warn!(event_id = %hook.event_id, "no stripe config: a thin error report is recorded without its details");
                return Ok(None);
            }
            Ok(Some(key)) => match reports
                .stripe
                .fetch_event(&key, hook.event_id.as_str())
                .await
            {
                Ok(event) => {
                    let mut detailed = hook.clone();
                    detailed.payload.insert(
                        "data".to_owned(),
                        event.get("data").cloned().unwrap_or(Value::Null),
                    );
                    return Ok(error_report(&detailed).ok());
                }
                Err(e) if e.is_retriable() => e.to_string(),
                Err(e) => {
                    tracing::warn!(event_id = %hook.event_id, error = %e, "stripe refused the details of a thin error report: recorded without them");
                    return Ok(None);
                }
            },
            Err(e) => e.to_string(),
        };
        metrics::webhook_retry("error_report_details");
        tracing::warn!(event_id = %hook.event_id, %error, "fetching an error report's details failed, retrying");
        if !backoff.wait(shutdown).await {
            return Err(NotWritten::ShuttingDown);
        }
    }
}

/// Why a retried write did not happen.
enum NotWritten {
    /// The database refused the data: retrying cannot help.
    Refused(String),
    /// Shutdown began during a retry wait: the message stays uncommitted.
    ShuttingDown,
}

/// Runs `write` until it succeeds, the database refuses it, or shutdown begins; database
/// trouble of the moment is retried with backoff, in order.
async fn write_retried<T, E, F, Fut>(
    step: &'static str,
    mut write: F,
    shutdown: &CancellationToken,
) -> Result<T, NotWritten>
where
    E: Retriable + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = write_backoff();
    loop {
        let error = match write().await {
            Ok(value) => return Ok(value),
            Err(e) if !e.is_retriable() => return Err(NotWritten::Refused(e.to_string())),
            Err(e) => e,
        };
        metrics::webhook_retry(step);
        tracing::warn!(
            step,
            %error,
            retry_in_ms = backoff.upcoming().as_millis() as u64,
            "applying a webhook event failed, retrying"
        );
        if !backoff.wait(shutdown).await {
            return Err(NotWritten::ShuttingDown);
        }
    }
}

fn record_error_report(hook: &StripeWebhook, report: &ErrorReport, new_rows: u32) {
    if new_rows > 0 {
        metrics::meter_error_report_recorded(report_label(&report.event_type));
    }
    tracing::warn!(
        tenant_id = %hook.tenant_id,
        environment_id = %hook.environment_id,
        event_id = %hook.event_id,
        event_type = %hook.event_type,
        samples = report.entries.len(),
        details = !report.entries.is_empty(),
        "stripe reported meter event errors"
    );
}

fn database_refused() -> DlqErrorKind {
    DlqErrorKind::parse("database_refused").unwrap_or(DlqErrorKind::VALIDATION)
}

fn record_customer_outcome(hook: &StripeWebhook, outcome: &crate::mappings::WebhookOutcome) {
    if !outcome.applied {
        metrics::webhook_event_ignored("stale");
        tracing::info!(
            tenant_id = %hook.tenant_id,
            environment_id = %hook.environment_id,
            event_id = %hook.event_id,
            event_type = %hook.event_type,
            "customer event not newer than the customer's last one; nothing changed"
        );
        return;
    }
    metrics::customer_mappings_created("webhook", u64::from(outcome.created));
    metrics::customer_mappings_updated(u64::from(outcome.updated));
    metrics::customer_mappings_retired("webhook", u64::from(outcome.retired));
    if outcome.unmapped {
        metrics::unmapped_customer_recorded();
    }
    tracing::info!(
        tenant_id = %hook.tenant_id,
        environment_id = %hook.environment_id,
        event_id = %hook.event_id,
        event_type = %hook.event_type,
        created = outcome.created,
        updated = outcome.updated,
        retired = outcome.retired,
        unmapped = outcome.unmapped,
        "customer event applied"
    );
}

/// Sends `message` to the dead-letter topic, retrying until acknowledged. False when shutdown
/// interrupted the retries (the message stays uncommitted).
async fn dead_letter(
    dead_letters: &DeadLetters,
    message: &BorrowedMessage<'_>,
    error: String,
    kind: DlqErrorKind,
    shutdown: &CancellationToken,
) -> bool {
    let letter = DeadLetter::of(Topic::StripeWebhooks, message, SERVICE, error, kind);
    let mut backoff = write_backoff();
    while let Err(e) = dead_letters.send(&letter).await {
        metrics::webhook_retry("dead_letter");
        tracing::warn!(error = %e, "writing to the dead-letter topic failed, retrying");
        if !backoff.wait(shutdown).await {
            return false;
        }
    }
    metrics::webhook_event_rejected(&letter.headers.error_kind);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hook(event_type: &str, created: i64, payload: Value) -> StripeWebhook {
        StripeWebhook::from_json_bytes(
            json!({
                "schema_version": 1,
                "tenant_id": "acme",
                "environment_id": "prod",
                "event_id": "evt_1",
                "event_type": event_type,
                "livemode": false,
                "created": created,
                "received_at": "2024-05-01T12:00:01Z",
                "payload": payload,
            })
            .to_string()
            .as_bytes(),
        )
        .expect("a valid message")
    }

    fn customer_payload(metadata: Value) -> Value {
        json!({"id": "evt_1", "object": "event", "type": "customer.created",
               "data": {"object": {"id": "cus_1", "object": "customer", "email": "a@b.c",
                                   "name": null, "metadata": metadata}}})
    }

    fn customer(action: Action) -> CustomerEvent {
        match action {
            Action::Customer(c) => c,
            other => panic!("not a customer event: {other:?}"),
        }
    }

    #[test]
    fn customer_events_carry_the_external_id() {
        let event = customer(
            classify(&hook(
                "customer.updated",
                1_714_564_800,
                customer_payload(json!({"external_id": "flexprice_customer_123"})),
            ))
            .unwrap(),
        );
        assert_eq!(event.kind, CustomerEventKind::Updated);
        assert_eq!(event.created, 1_714_564_800);
        assert_eq!(event.customer.as_str(), "cus_1");
        assert_eq!(
            event.external_id,
            ExternalId::Present(
                meterline_schemas::CustomerId::parse("flexprice_customer_123").unwrap()
            )
        );
        assert_eq!(event.email.as_deref(), Some("a@b.c"));
        assert_eq!(event.name, None);
    }

    #[test]
    fn missing_or_invalid_external_ids() {
        for (metadata, want) in [
            (json!({}), ExternalId::Missing),
            (json!({"external_id": ""}), ExternalId::Missing),
            (json!({"external_id": null}), ExternalId::Missing),
            (json!({"external_id": 42}), ExternalId::Invalid),
            (json!({"external_id": "a\u{0}b"}), ExternalId::Invalid),
            (json!({"external_id": "x".repeat(256)}), ExternalId::Invalid),
        ] {
            let event = customer(
                classify(&hook(
                    "customer.created",
                    1,
                    customer_payload(metadata.clone()),
                ))
                .unwrap(),
            );
            assert_eq!(event.external_id, want, "{metadata}");
        }
        let no_metadata = json!({"data": {"object": {"id": "cus_1"}}});
        let event = customer(classify(&hook("customer.deleted", 1, no_metadata)).unwrap());
        assert_eq!(event.external_id, ExternalId::Missing);
        assert_eq!(event.kind, CustomerEventKind::Deleted);
    }

    #[test]
    fn customer_events_without_a_customer_are_refused() {
        for payload in [
            json!({}),
            json!({"data": {}}),
            json!({"data": {"object": {"object": "customer"}}}),
            json!({"data": {"object": {"id": "sub_1"}}}),
        ] {
            assert!(
                classify(&hook("customer.created", 1, payload.clone())).is_err(),
                "{payload}"
            );
        }
    }

    #[test]
    fn other_types_are_ignored() {
        for t in ["invoice.paid", "customer.discount.created"] {
            assert_eq!(classify(&hook(t, 1, json!({}))).unwrap(), Action::Ignore);
        }
    }

    #[test]
    fn subscription_events_name_their_periods_or_go_to_the_dead_letters() {
        let subscription = json!({"data": {"object": {
            "id": "sub_1", "object": "subscription", "customer": "cus_1",
            "items": {"data": [{"current_period_start": 1_764_000_000,
                                "current_period_end": 1_766_592_000,
                                "price": {"recurring": {"meter": "mtr_1"}}}]}
        }}});
        for t in [
            "customer.subscription.created",
            "customer.subscription.updated",
            "customer.subscription.deleted",
        ] {
            let Action::Subscription(periods) =
                classify(&hook(t, 7, subscription.clone())).unwrap()
            else {
                panic!("{t} is not a subscription action");
            };
            assert_eq!(periods.len(), 1, "{t}");
            assert_eq!(periods[0].event_created, 7);
            assert!(
                classify(&hook(t, 1, json!({}))).is_err(),
                "{t} without data"
            );
        }
    }

    fn report(action: Action) -> ErrorReport {
        match action {
            Action::ErrorReport(r) => r,
            other => panic!("not an error report: {other:?}"),
        }
    }

    #[test]
    fn thin_error_reports_are_recorded_without_details() {
        let thin = json!({"id": "evt_test_1", "object": "v2.core.event",
                          "type": ERROR_REPORT_TRIGGERED, "created": "2024-09-26T17:46:22.134Z",
                          "livemode": false, "context": null, "reason": null,
                          "related_object": {"id": "mtr_1", "type": "billing.meter",
                                             "url": "/v1/billing/meters/mtr_1"}});
        let r = report(classify(&hook(ERROR_REPORT_TRIGGERED, 1_727_372_782, thin)).unwrap());
        assert_eq!(r.stripe_meter_id.as_deref(), Some("mtr_1"));
        assert!(r.entries.is_empty());
        assert_eq!(r.occurred_at.unix_timestamp(), 1_727_372_782);
        assert_eq!(report_label(&r.event_type), "error_report_triggered");
    }

    #[test]
    fn detailed_error_reports_have_one_entry_per_sample() {
        let full = json!({"id": "evt_test_2", "type": NO_METER_FOUND,
            "data": {"reason": {"error_count": 3, "error_types": [
                {"code": "meter_event_customer_not_found", "error_count": 2, "sample_errors": [
                    {"error_message": "no customer cus_x", "request": {"identifier": "id-1"}},
                    {"error_message": "no customer cus_y", "request": {"identifier": "id-2"}}]},
                {"code": "timestamp_too_far_in_past", "error_count": 1, "sample_errors": []}]}}});
        let r = report(classify(&hook(NO_METER_FOUND, 1, full)).unwrap());
        assert_eq!(r.stripe_meter_id, None);
        assert_eq!(report_label(&r.event_type), "no_meter_found");
        let ids: Vec<_> = r.entries.iter().map(|e| e.identifier.clone()).collect();
        assert_eq!(ids, [Some("id-1".into()), Some("id-2".into()), None]);
        assert_eq!(
            r.entries[0].error_code.as_deref(),
            Some("meter_event_customer_not_found")
        );
        assert_eq!(
            r.entries[1].error_message.as_deref(),
            Some("no customer cus_y")
        );
        assert_eq!(
            r.entries[2].error_code.as_deref(),
            Some("timestamp_too_far_in_past")
        );
    }
}
