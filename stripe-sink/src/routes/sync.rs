//! Manual syncs, their jobs, the sync status, the ledger's batches, retries and the
//! reconciliation report.
//!
//! Rules kept here: a manual sync's body and the reconciliation's query say what they cover
//! (a time range, a customer or all, a meter or all) by the same rules; a value of a sync
//! route that breaks its rule is 400 `invalid_value`, and so is a query axum cannot read.

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use meterline_accounts::audit::Purpose;
use meterline_common::api::{ApiError, JsonBody};
use meterline_common::auth::TenantScope;
use meterline_schemas::{
    CustomerId, Decimal, JobId, MeterId, ResyncRequest, SchemaError, TimeRange, Timestamp,
};
use rust_decimal::prelude::ToPrimitive;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::error::{invalid_value, RouteError};
use super::AppState;
use crate::ledger::{
    BatchFilter, BatchView, JobView, LedgerState, LedgerTotals, NewJob, Resolution, StatusView,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManualSync {
    /// The customer to resync; all customers when absent.
    entity_id: Option<String>,
    #[serde(default = "customer")]
    entity_type: String,
    /// Only this meter; every meter when absent.
    meter_id: Option<String>,
    time_from: String,
    time_to: String,
    #[serde(default)]
    force_rerun: bool,
}

fn customer() -> String {
    "customer".into()
}

/// What a manual sync resyncs, or a reconciliation reports on: `[time_from, time_to)`, one
/// customer or every one, one meter or every one.
struct Coverage {
    range: TimeRange,
    customer: Option<CustomerId>,
    meter: Option<MeterId>,
}

impl Coverage {
    /// Refuses the first bad value, in this order: `time_from`, `time_to`, the range, the
    /// customer, the meter.
    fn parse(
        time_from: &str,
        time_to: &str,
        customer: Option<&str>,
        meter: Option<&str>,
    ) -> Result<Self, ApiError> {
        let from = Timestamp::parse(time_from).map_err(invalid_value)?;
        let to = Timestamp::parse(time_to).map_err(invalid_value)?;
        Ok(Self {
            range: TimeRange::new(from, to).map_err(invalid_value)?,
            customer: optional(customer, CustomerId::parse)?,
            meter: optional(meter, MeterId::parse)?,
        })
    }
}

/// An id a request may leave out (it then means every one).
fn optional<T>(
    value: Option<&str>,
    parse: fn(&str) -> Result<T, SchemaError>,
) -> Result<Option<T>, ApiError> {
    value.map(parse).transpose().map_err(invalid_value)
}

/// The query of a sync route; one axum cannot read (a malformed value, an unknown or missing
/// parameter) is refused with axum's words.
fn sync_query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| invalid_value(e.body_text()))
}

/// `POST /v1/stripe/sync/manual`: records a job and asks the aggregator to recompute the
/// windows of the range (`usage.resync`); the answer comes once Kafka took the request.
pub async fn manual(
    State(state): State<AppState>,
    scope: TenantScope,
    JsonBody(input): JsonBody<ManualSync>,
) -> Result<(StatusCode, Json<serde_json::Value>), RouteError> {
    if input.entity_type != "customer" {
        return Err(invalid_value("entity_type must be customer").into());
    }
    let Coverage {
        range,
        customer,
        meter,
    } = Coverage::parse(
        &input.time_from,
        &input.time_to,
        input.entity_id.as_deref(),
        input.meter_id.as_deref(),
    )?;
    let job = NewJob {
        id: JobId::generate(),
        entity_type: input.entity_type,
        entity_id: customer.clone(),
        meter_id: meter.clone(),
        from: range.from().as_offset_date_time(),
        to: range.to().as_offset_date_time(),
        force_rerun: input.force_rerun,
    };
    state.ledger.create_job(&scope, &job).await?;
    let request = ResyncRequest {
        job_id: job.id.clone(),
        tenant_id: scope.tenant_id.clone(),
        environment_id: scope.environment_id.clone(),
        customer_id: customer,
        meter_id: meter,
        range,
        force_rerun: input.force_rerun,
        requested_at: Timestamp::now(),
    };
    state.resync.request(&request).await.map_err(|e| {
        tracing::warn!(error = %e, "publishing a resync request failed");
        ApiError::unavailable(
            "kafka_unavailable",
            "the sync request could not be queued; retry",
            5,
        )
    })?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "job_id": job.id.to_string(), "status": "queued" })),
    ))
}

pub async fn job(
    State(state): State<AppState>,
    scope: TenantScope,
    Path(id): Path<String>,
) -> Result<Json<JobView>, RouteError> {
    let id = JobId::parse(&id).map_err(|_| ApiError::not_found("no such job"))?;
    state
        .ledger
        .job(&scope, &id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found("no such job").into())
}

#[derive(Debug, Serialize)]
pub struct StatusAnswer {
    #[serde(flatten)]
    ledger: StatusView,
    /// Circuit breaker state of each Stripe account this sink talks to (accounts are named
    /// by a hash of their key).
    circuits: Vec<Circuit>,
}

#[derive(Debug, Serialize)]
struct Circuit {
    account: String,
    state: &'static str,
}

pub async fn status(
    State(state): State<AppState>,
    scope: TenantScope,
) -> Result<Json<StatusAnswer>, RouteError> {
    let ledger = state.ledger.status(&scope).await?;
    let circuits = state
        .pacer
        .breaker_states()
        .into_iter()
        .map(|(account, s)| Circuit {
            account,
            state: s.as_str(),
        })
        .collect();
    Ok(Json(StatusAnswer { ledger, circuits }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchQuery {
    status: Option<String>,
    customer_id: Option<String>,
    meter_id: Option<String>,
    /// Paging: batches with an id below this one.
    starting_after: Option<i64>,
    limit: Option<i64>,
}

pub async fn batches(
    State(state): State<AppState>,
    scope: TenantScope,
    query: Result<Query<BatchQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, RouteError> {
    let q = sync_query(query)?;
    if let Some(s) = &q.status {
        if s.parse::<LedgerState>().is_err() {
            return Err(invalid_value(format!(
                "status must be one of {}",
                LedgerState::NAMES.join(", ")
            ))
            .into());
        }
    }
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(invalid_value("limit must be between 1 and 500").into());
    }
    let filter = BatchFilter {
        status: q.status,
        customer_id: optional(q.customer_id.as_deref(), CustomerId::parse)?,
        meter_id: optional(q.meter_id.as_deref(), MeterId::parse)?,
        before_id: q.starting_after,
        limit,
    };
    let data: Vec<BatchView> = state.ledger.batches(&scope, &filter).await?;
    let has_more = data.len() as i64 == limit;
    // Stripe reports meter event errors asynchronously (v1.billing.meter.* webhooks); each
    // batch shows those that name the identifier of its meter event.
    let identifiers: Vec<String> = data
        .iter()
        .filter_map(|b| b.stripe_event_id.clone())
        .collect();
    let reports = state
        .mappings
        .error_reports_for_identifiers(&scope, &identifiers)
        .await?;
    let data: Vec<serde_json::Value> = data
        .into_iter()
        .map(|batch| {
            let mine: Vec<_> = reports
                .iter()
                .filter(|r| r.identifier.is_some() && r.identifier == batch.stripe_event_id)
                .collect();
            let mut value = serde_json::to_value(&batch).unwrap_or_default();
            value["error_reports"] = serde_json::to_value(mine).unwrap_or_default();
            value
        })
        .collect();
    Ok(Json(
        serde_json::json!({ "data": data, "has_more": has_more }),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryInput {
    /// Only these batches; every failed batch when absent.
    batch_ids: Option<Vec<i64>>,
    /// Also re-open batches that need reconciliation (after checking Stripe by hand).
    #[serde(default)]
    include_needs_reconciliation: bool,
}

pub async fn retry(
    State(state): State<AppState>,
    scope: TenantScope,
    JsonBody(input): JsonBody<RetryInput>,
) -> Result<Json<serde_json::Value>, RouteError> {
    let retried = state
        .ledger
        .retry(
            &scope,
            input.batch_ids.as_deref(),
            input.include_needs_reconciliation,
        )
        .await?;
    Ok(Json(serde_json::json!({ "retried": retried })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveInput {
    /// Whether Stripe holds the window's outstanding meter event (as checked in Stripe).
    recorded: bool,
    /// Why: what was checked. Kept in the audit trail.
    reason: String,
}

/// The longest `reason` kept.
const MAX_REASON: usize = 500;

/// `POST /v1/stripe/sync/batches/{id}/resolve`: an operator settles the outstanding meter
/// event of a window in `needs_reconciliation`: recorded by Stripe (it counts as synced) or
/// not (its units go out again under a new identifier). Audited; the window goes back to
/// pending to send whatever is still owed.
pub async fn resolve(
    State(state): State<AppState>,
    scope: TenantScope,
    path: Result<Path<String>, PathRejection>,
    JsonBody(input): JsonBody<ResolveInput>,
) -> Result<Json<serde_json::Value>, RouteError> {
    let Path(id) = path.map_err(|e| invalid_value(e.body_text()))?;
    let id: i64 = id
        .parse()
        .map_err(|_| invalid_value(format!("batch id must be a number, not {id:?}")))?;
    let reason = input.reason.trim();
    if reason.is_empty() || reason.chars().count() > MAX_REASON {
        return Err(invalid_value(format!(
            "reason must say what was checked in stripe, in 1 to {MAX_REASON} characters"
        ))
        .into());
    }
    let actor = meterline_accounts::audit::Actor::api(&scope);
    match state
        .ledger
        .resolve(&scope, id, input.recorded, reason, &actor)
        .await?
    {
        Resolution::Resolved { identifier, value } => {
            tracing::info!(
                tenant = %scope.tenant_id,
                batch_id = id,
                identifier = %identifier,
                recorded = input.recorded,
                "meter event in doubt resolved by an operator"
            );
            Ok(Json(serde_json::json!({
                "batch_id": id,
                "identifier": identifier,
                "value": value,
                "recorded": input.recorded,
                "sync_status": LedgerState::Pending.to_string(),
            })))
        }
        Resolution::NoSuchWindow => Err(ApiError::not_found(format!("no window {id}")).into()),
        Resolution::NotInReconciliation(status) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_in_reconciliation",
            format!("window {id} is {status}; only needs_reconciliation windows are resolved"),
        )
        .into()),
        Resolution::NothingOutstanding => Err(ApiError::new(
            StatusCode::CONFLICT,
            "nothing_outstanding",
            format!("window {id} has no meter event in doubt; retry it instead"),
        )
        .into()),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileQuery {
    customer_id: Option<String>,
    meter_id: Option<String>,
    time_from: String,
    time_to: String,
}

#[derive(Debug, Serialize)]
struct ReconcileLine {
    customer_id: String,
    meter_id: String,
    /// The exact total of the latest window totals: the usage itself, not rounded.
    expected: Decimal,
    /// The exact part of `expected` that accepted meter events account for.
    ledger_accounted: Decimal,
    /// The whole numbers the ledger says Stripe accepted.
    ledger_synced: Decimal,
    /// What Stripe's meter event summaries say, when they could be read.
    stripe: Option<f64>,
    status: &'static str,
    note: Option<String>,
}

/// A line matches when Stripe holds what the ledger says it accepted, everything is
/// accounted for, and the whole numbers are within the rounding rule of the exact total
/// (within 1 over any run of windows; `billing::round_with_carry`).
fn reconciled(stripe: f64, totals: &LedgerTotals) -> bool {
    let synced = totals.synced.to_f64().unwrap_or(f64::NAN);
    (stripe - synced).abs() < 1e-6
        && totals.accounted == totals.exact
        && (totals.synced - totals.exact).abs() <= Decimal::ONE
}

/// `GET /v1/stripe/reconcile`: per customer and meter, the expected total, the ledger's
/// synced sum and Stripe's meter event summaries over the range.
pub async fn reconcile(
    State(state): State<AppState>,
    scope: TenantScope,
    query: Result<Query<ReconcileQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, RouteError> {
    let q = sync_query(query)?;
    let Coverage {
        range,
        customer,
        meter,
    } = Coverage::parse(
        &q.time_from,
        &q.time_to,
        q.customer_id.as_deref(),
        q.meter_id.as_deref(),
    )?;
    let (from, to) = (range.from(), range.to());
    let totals = state
        .ledger
        .synced_totals(
            &scope,
            customer.as_ref(),
            meter.as_ref(),
            from.as_offset_date_time(),
            to.as_offset_date_time(),
        )
        .await?;
    let key = super::config::stored_api_key(&state, &scope, Purpose::Reconcile).await?;
    let mut lines = Vec::new();
    let mut meter_ids: std::collections::HashMap<String, Option<String>> = Default::default();
    for line in totals {
        let mut note = None;
        let stripe_total = async {
            let c = CustomerId::parse(&line.entity_id).ok()?;
            let m = MeterId::parse(&line.meter_id).ok()?;
            let cus = state
                .mappings
                .provider_customer(&scope.tenant_id, &scope.environment_id, &c)
                .await
                .ok()??;
            let event_name = state
                .mappings
                .provider_meter(&scope.tenant_id, &scope.environment_id, &m)
                .await
                .ok()??
                .event_name;
            let stripe_meter = match meter_ids.get(&event_name) {
                Some(id) => id.clone(),
                None => {
                    let id = state
                        .stripe
                        .find_meter(&key, &event_name)
                        .await
                        .ok()?
                        .map(|m| m.id);
                    meter_ids.insert(event_name.clone(), id.clone());
                    id
                }
            }?;
            state
                .stripe
                .summarised_total(
                    &key,
                    &stripe_meter,
                    &cus,
                    from.unix_timestamp(),
                    to.unix_timestamp(),
                )
                .await
                .ok()
        }
        .await;
        if stripe_total.is_none() {
            note = Some("stripe's summaries could not be read (no mapping, no meter, or stripe unreachable)".to_owned());
        }
        let status = match stripe_total {
            Some(s) if reconciled(s, &line) => "match",
            Some(_) => "mismatch",
            None => "unknown",
        };
        lines.push(ReconcileLine {
            customer_id: line.entity_id,
            meter_id: line.meter_id,
            expected: line.exact,
            ledger_accounted: line.accounted,
            ledger_synced: line.synced,
            stripe: stripe_total,
            status,
            note,
        });
    }
    let now = OffsetDateTime::now_utc();
    Ok(Json(serde_json::json!({
        "time_from": from.to_string(),
        "time_to": to.to_string(),
        "generated_at": Timestamp::new(now).map(|t| t.to_string()).unwrap_or_default(),
        "data": lines,
    })))
}
