//! Meter mappings (`/v1/stripe/meters/mapping`), customer mappings
//! (`/v1/stripe/customers/mapping`) and unmapped Stripe customers
//! (`/v1/stripe/customers/unmapped`) of the caller's tenant and environment.
//!
//! Rule kept here: the tenant and environment come only from the token ([`TenantScope`]); a
//! body, path or query is fully validated before the store is touched, so a refused request
//! changes nothing; another tenant's mapping answers exactly like a missing one (404).
//!
//! Error codes: 400 `invalid_value` (a field broke its rule), `unsupported_provider`,
//! `unknown_parameter`, `invalid_parameter` (query), plus the body codes of [`JsonBody`];
//! 404 `not_found`; 409 `meter_already_mapped`, `provider_meter_already_mapped`,
//! `customer_already_mapped`, `provider_customer_already_mapped`, `provider_customer_deleted`;
//! 422 `stripe_meter_formula_mismatch` (the Stripe meter's formula cannot bill the meter's
//! aggregation).

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use meterline_accounts::audit::{Actor, Purpose};
use meterline_catalog::meters::MeterStore;
use meterline_common::api::{ApiError, JsonBody};
use meterline_common::auth::TenantScope;
use meterline_schemas::{CustomerId, EventName, MeterId, SchemaError, StripeFormula};
use serde::{Deserialize, Serialize};

use super::error::{invalid_value, RouteError};
use super::query::{
    invalid_parameter, list_query, parse_limit, parse_row_id, ListQuery, QueryPairs,
};
use super::AppState;
use crate::mappings::{
    needed_formula, CustomerMapping, CustomerMappingQuery, MappingStatus, MeterMapping,
    MeterMappingInput, Page, StripeCustomerId, UnmappedCustomer, UnmappedQuery, DEFAULT_PAGE,
    PROVIDER_STRIPE,
};
use crate::metrics;
use crate::stripe::StripeMeter;

/// `{"data": [...]}`.
#[derive(Debug, Serialize)]
pub struct List<T> {
    pub data: Vec<T>,
}

/// Body of `POST /v1/stripe/meters/mapping`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeterMappingBody {
    pub meter_id: String,
    /// Only `stripe`; may be left out.
    #[serde(default)]
    pub provider_type: Option<String>,
    /// The Stripe meter's event_name.
    pub provider_meter_id: String,
    /// Default true.
    #[serde(default)]
    pub sync_enabled: Option<bool>,
}

impl TryFrom<MeterMappingBody> for MeterMappingInput {
    type Error = ApiError;

    fn try_from(body: MeterMappingBody) -> Result<Self, ApiError> {
        if let Some(provider) = &body.provider_type {
            if provider != PROVIDER_STRIPE {
                return Err(ApiError::bad_request(
                    "unsupported_provider",
                    format!("provider_type {provider:?} is not supported; use \"stripe\""),
                ));
            }
        }
        let provider_meter_id = EventName::parse(&body.provider_meter_id).map_err(|e| {
            // Name the API field, not the schema's.
            invalid_field("provider_meter_id", e)
        })?;
        Ok(Self {
            meter_id: MeterId::parse(&body.meter_id).map_err(invalid_value)?,
            provider_meter_id,
            sync_enabled: body.sync_enabled.unwrap_or(true),
            formula: None,
            stripe_meter_id: None,
        })
    }
}

/// Body of `POST /v1/stripe/customers/mapping`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerMappingBody {
    pub customer_id: String,
    pub provider_customer_id: String,
}

fn invalid_field(field: &str, e: SchemaError) -> ApiError {
    let reason = match e {
        SchemaError::InvalidValue { reason, .. } => reason,
        other => other.to_string(),
    };
    invalid_value(format!("invalid {field}: {reason}"))
}

fn path_value(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(value)| value)
        .map_err(|e| invalid_value(e.body_text()))
}

fn meter_path(path: Result<Path<String>, PathRejection>) -> Result<MeterId, ApiError> {
    MeterId::parse(&path_value(path)?).map_err(invalid_value)
}

fn customer_path(path: Result<Path<String>, PathRejection>) -> Result<CustomerId, ApiError> {
    CustomerId::parse(&path_value(path)?).map_err(invalid_value)
}

/// `?status=&limit=&starting_after=` of the customer mapping list.
impl ListQuery for CustomerMappingQuery {
    const PARAMETERS: &'static [&'static str] = &["status", "limit", "starting_after"];

    fn defaults() -> Self {
        CustomerMappingQuery {
            status: None,
            limit: DEFAULT_PAGE,
            starting_after: None,
        }
    }

    fn read(&mut self, name: &str, value: &str) -> Result<(), ApiError> {
        match name {
            "status" => {
                self.status = Some(
                    MappingStatus::parse(value)
                        .ok_or_else(|| invalid_parameter("status must be active or retired"))?,
                )
            }
            "limit" => self.limit = parse_limit(value)?,
            "starting_after" => {
                self.starting_after = Some(parse_row_id(
                    value,
                    "starting_after must be the id of a mapping in the list",
                )?)
            }
            _ => {}
        }
        Ok(())
    }
}

/// `?status=&limit=&starting_after=` of the unmapped customer list: its `starting_after` is a
/// Stripe customer id, not a row id.
impl ListQuery for UnmappedQuery {
    const PARAMETERS: &'static [&'static str] = &["status", "limit", "starting_after"];

    fn defaults() -> Self {
        UnmappedQuery {
            status: "unmapped",
            limit: DEFAULT_PAGE,
            starting_after: None,
        }
    }

    fn read(&mut self, name: &str, value: &str) -> Result<(), ApiError> {
        match name {
            "status" => {
                self.status = match value {
                    "unmapped" => "unmapped",
                    "mapped" => "mapped",
                    "deleted" => "deleted",
                    _ => {
                        return Err(invalid_parameter(
                            "status must be unmapped, mapped or deleted",
                        ))
                    }
                }
            }
            "limit" => self.limit = parse_limit(value)?,
            "starting_after" => {
                let id = StripeCustomerId::parse(value)
                    .map_err(|e| invalid_parameter(format!("starting_after: {e}")))?;
                self.starting_after = Some(id.into());
            }
            _ => {}
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Meter mappings

/// 201 with the mapping; 409 `meter_already_mapped` / `provider_meter_already_mapped`.
pub async fn create_meter_mapping(
    State(state): State<AppState>,
    scope: TenantScope,
    JsonBody(body): JsonBody<MeterMappingBody>,
) -> Result<(StatusCode, Json<MeterMapping>), RouteError> {
    let mut input = MeterMappingInput::try_from(body)?;
    if let Some((formula, id)) = stripe_meter_formula(&state, &scope, &input).await? {
        input.formula = Some(formula);
        input.stripe_meter_id = Some(id);
    }
    let stored = state.mappings.meters().create(&scope, &input).await?;
    tracing::info!(
        tenant_id = %scope.tenant_id,
        environment_id = %scope.environment_id,
        meter_id = %stored.meter_id,
        "meter mapping created"
    );
    Ok((StatusCode::CREATED, Json(stored)))
}

/// The formula and id of the Stripe meter `input` names, read with the tenant's key; 422 when it
/// cannot bill the meter's aggregation ([`needed_formula`]). `None` when it cannot be read now
/// (no Stripe config yet, no such Stripe meter yet, Stripe unreachable): the sync reads it
/// before the first send of a meter that needs `last`, and sends nothing until it matches.
async fn stripe_meter_formula(
    state: &AppState,
    scope: &TenantScope,
    input: &MeterMappingInput,
) -> Result<Option<(StripeFormula, String)>, RouteError> {
    let Some(key) = state
        .configs
        .api_key(
            &scope.tenant_id,
            &scope.environment_id,
            &Actor::api(scope),
            Purpose::MeterMapping,
        )
        .await?
    else {
        return Ok(None);
    };
    let stripe_meter = match state
        .stripe
        .find_meter(&key, input.provider_meter_id.as_str())
        .await
    {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!(error = %e, "the stripe meter of a new mapping could not be read");
            return Ok(None);
        }
    };
    let Some(StripeMeter {
        id,
        formula: Some(formula),
    }) = stripe_meter
    else {
        return Ok(None);
    };
    let meter = MeterStore::new(state.pool.clone())
        .get(scope, &input.meter_id)
        .await?;
    if let Some(meter) = meter {
        let aggregation = &meter.definition.aggregation;
        if let Err(needed) = needed_formula(aggregation, formula) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "stripe_meter_formula_mismatch",
                format!(
                    "meter {} aggregates {}: it needs a Stripe meter whose \
                     default_aggregation.formula is {needed}, but Stripe meter {id} \
                     (event_name {}) has {formula}",
                    input.meter_id,
                    aggregation.kind(),
                    input.provider_meter_id
                ),
            )
            .into());
        }
    }
    Ok(Some((formula, id)))
}

/// 200 `{"data": [...]}`, by meter id.
pub async fn list_meter_mappings(
    State(state): State<AppState>,
    scope: TenantScope,
) -> Result<Json<List<MeterMapping>>, RouteError> {
    let data = state.mappings.meters().list(&scope).await?;
    Ok(Json(List { data }))
}

/// 200 with the mapping, or 404 `not_found`.
pub async fn get_meter_mapping(
    State(state): State<AppState>,
    scope: TenantScope,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<MeterMapping>, RouteError> {
    let meter_id = meter_path(path)?;
    let mapping = state.mappings.meters().get(&scope, &meter_id).await?;
    mapping.map(Json).ok_or_else(|| no_meter_mapping(&meter_id))
}

fn no_meter_mapping(meter_id: &MeterId) -> RouteError {
    ApiError::not_found(format!("no stripe mapping for meter {meter_id}")).into()
}

fn no_customer_mapping(customer_id: &CustomerId) -> RouteError {
    ApiError::not_found(format!(
        "no active stripe mapping for customer {customer_id}"
    ))
    .into()
}

/// 204, or 404 `not_found`.
pub async fn delete_meter_mapping(
    State(state): State<AppState>,
    scope: TenantScope,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, RouteError> {
    let meter_id = meter_path(path)?;
    if !state.mappings.meters().delete(&scope, &meter_id).await? {
        return Err(no_meter_mapping(&meter_id));
    }
    tracing::info!(
        tenant_id = %scope.tenant_id,
        environment_id = %scope.environment_id,
        meter_id = %meter_id,
        "meter mapping deleted"
    );
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------------------------
// Customer mappings

/// 201 with the mapping (source `manual`); 409 when the customer or the Stripe customer is
/// already mapped, or the Stripe customer was deleted.
pub async fn create_customer_mapping(
    State(state): State<AppState>,
    scope: TenantScope,
    JsonBody(body): JsonBody<CustomerMappingBody>,
) -> Result<(StatusCode, Json<CustomerMapping>), RouteError> {
    let customer_id = CustomerId::parse(&body.customer_id).map_err(invalid_value)?;
    let provider_customer_id =
        StripeCustomerId::parse(&body.provider_customer_id).map_err(invalid_value)?;
    let stored = state
        .mappings
        .customers()
        .create_manual(&scope, &customer_id, &provider_customer_id)
        .await?;
    metrics::customer_mappings_created("manual", 1);
    tracing::info!(
        tenant_id = %scope.tenant_id,
        environment_id = %scope.environment_id,
        "customer mapping created by hand"
    );
    Ok((StatusCode::CREATED, Json(stored)))
}

/// 200 `{"data": [...], "has_more"}`, oldest first; `?status=active|retired`,
/// `limit` (1..=100, default 10), `starting_after` (a mapping's `id`).
pub async fn list_customer_mappings(
    State(state): State<AppState>,
    scope: TenantScope,
    query: QueryPairs,
) -> Result<Json<Page<CustomerMapping>>, RouteError> {
    let query: CustomerMappingQuery = list_query(query)?;
    let page = state.mappings.customers().list(&scope, &query).await?;
    Ok(Json(page))
}

/// 200 with the customer's active mapping, or 404 `not_found`.
pub async fn get_customer_mapping(
    State(state): State<AppState>,
    scope: TenantScope,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<CustomerMapping>, RouteError> {
    let customer_id = customer_path(path)?;
    let mapping = state.mappings.customers().get(&scope, &customer_id).await?;
    mapping
        .map(Json)
        .ok_or_else(|| no_customer_mapping(&customer_id))
}

/// Retires the customer's active mapping: 204, or 404 `not_found`.
pub async fn delete_customer_mapping(
    State(state): State<AppState>,
    scope: TenantScope,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, RouteError> {
    let customer_id = customer_path(path)?;
    if !state
        .mappings
        .customers()
        .retire(&scope, &customer_id)
        .await?
    {
        return Err(no_customer_mapping(&customer_id));
    }
    metrics::customer_mappings_retired("manual", 1);
    tracing::info!(
        tenant_id = %scope.tenant_id,
        environment_id = %scope.environment_id,
        "customer mapping retired by hand"
    );
    Ok(StatusCode::NO_CONTENT)
}

/// 200 `{"data": [...], "has_more"}`: Stripe customers without a usable
/// `metadata.external_id`, by Stripe customer id; `?status=unmapped|mapped|deleted` (default
/// unmapped), `limit`, `starting_after` (a `cus_` id).
pub async fn list_unmapped_customers(
    State(state): State<AppState>,
    scope: TenantScope,
    query: QueryPairs,
) -> Result<Json<Page<UnmappedCustomer>>, RouteError> {
    let query: UnmappedQuery = list_query(query)?;
    let page = state.mappings.unmapped().list(&scope, &query).await?;
    Ok(Json(page))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::query::from_strs;

    #[test]
    fn customer_list_parameters() {
        let q = from_strs::<CustomerMappingQuery>(&[]).unwrap();
        assert_eq!(q.status, None);
        assert_eq!(q.limit, DEFAULT_PAGE);
        let q = from_strs::<CustomerMappingQuery>(&[
            ("status", "retired"),
            ("limit", "100"),
            ("starting_after", "42"),
        ])
        .unwrap();
        assert_eq!(q.status, Some(MappingStatus::Retired));
        assert_eq!(q.limit, 100);
        assert_eq!(q.starting_after, Some(42));
        for bad in [
            ("status", "gone"),
            ("limit", "0"),
            ("limit", "101"),
            ("limit", "-1"),
            ("starting_after", "cus_1"),
        ] {
            let err = from_strs::<CustomerMappingQuery>(&[bad]).unwrap_err();
            assert_eq!(err.code, "invalid_parameter", "{bad:?}");
        }
    }

    #[test]
    fn unmapped_list_parameters() {
        let q = from_strs::<UnmappedQuery>(&[]).unwrap();
        assert_eq!(q.status, "unmapped");
        let q = from_strs::<UnmappedQuery>(&[("status", "deleted"), ("starting_after", "cus_9")])
            .unwrap();
        assert_eq!(q.status, "deleted");
        assert_eq!(q.starting_after.as_deref(), Some("cus_9"));
        assert!(from_strs::<UnmappedQuery>(&[("starting_after", "nope")]).is_err());
    }

    #[test]
    fn meter_mapping_bodies_are_validated() {
        let body = |provider: Option<&str>, event_name: &str| MeterMappingBody {
            meter_id: "api_calls".into(),
            provider_type: provider.map(str::to_owned),
            provider_meter_id: event_name.into(),
            sync_enabled: None,
        };
        let input = MeterMappingInput::try_from(body(None, "api_requests")).unwrap();
        assert!(input.sync_enabled);
        assert_eq!(input.provider_meter_id.as_str(), "api_requests");
        let err = MeterMappingInput::try_from(body(Some("chargebee"), "x")).unwrap_err();
        assert_eq!(err.code, "unsupported_provider");
        let err = MeterMappingInput::try_from(body(Some("stripe"), &"e".repeat(101))).unwrap_err();
        assert_eq!(err.code, "invalid_value");
        assert!(
            err.message.starts_with("invalid provider_meter_id: "),
            "{}",
            err.message
        );
        let mut bad_meter = body(None, "x");
        bad_meter.meter_id = "no spaces".into();
        assert_eq!(
            MeterMappingInput::try_from(bad_meter).unwrap_err().code,
            "invalid_value"
        );
    }
}
