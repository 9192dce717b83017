//! `POST /v1/meters`, `GET /v1/meters`, `GET /v1/meters/{id}` and `PUT /v1/meters/{id}`:
//! meter definitions of the caller's tenant and environment.
//!
//! Rule kept here: the tenant and environment come only from the token ([`TenantScope`]), and a
//! body is fully validated into a [`MeterDefinition`] before the store is touched, so a refused
//! request changes nothing. Another tenant's meter answers exactly like a missing one (404).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use meterline_catalog::backfills::{self, Backfill};
use meterline_catalog::meter_versions::{self, EarlierDefinition};
use meterline_catalog::meters::{MeterStoreError, StoredMeter};
use meterline_common::api::{ApiError, JsonBody};
use meterline_common::auth::TenantScope;
use meterline_schemas::{MeterDefinition, MeterId, MeterInput, SchemaError};
use serde::Serialize;
use time::OffsetDateTime;

use super::AppState;

/// The list answer: `{"data": [...]}`, room for paging fields later without breaking clients.
#[derive(Debug, Serialize)]
pub struct MeterList {
    pub data: Vec<StoredMeter>,
}

/// A meter as answered: the stored meter, where it has one its latest backfill (the usage of
/// the past 35 days it was given when created or when what it matches changed), and the
/// definitions it counted under before its aggregation changed, each until when.
#[derive(Debug, Serialize)]
pub struct MeterAnswer {
    #[serde(flatten)]
    pub meter: StoredMeter,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backfill: Option<Backfill>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub earlier_definitions: Vec<EarlierDefinition>,
}

/// The earlier definitions of a meter, for its answer.
async fn earlier_definitions(
    state: &AppState,
    scope: &TenantScope,
    id: &MeterId,
) -> Result<Vec<EarlierDefinition>, ApiError> {
    let history = meter_versions::load(&state.pool, scope, id)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    Ok(history.earlier().to_vec())
}

/// 201 with the stored meter and its backfill; 409 `conflict` when the id is taken in this
/// scope.
pub async fn create(
    State(state): State<AppState>,
    scope: TenantScope,
    JsonBody(input): JsonBody<MeterInput>,
) -> Result<(StatusCode, Json<MeterAnswer>), ApiError> {
    if input.id.is_none() {
        // The wire type leaves `id` optional for PUT, which takes it from the path.
        return Err(ApiError::bad_request(
            "missing_field",
            "request body: missing field `id`",
        ));
    }
    let definition = MeterDefinition::try_from(input).map_err(invalid)?;
    match state.meters.create(&scope, &definition).await {
        Ok((meter, backfill)) => {
            tracing::info!(
                tenant_id = %scope.tenant_id,
                environment_id = %scope.environment_id,
                meter_id = %definition.id,
                "meter created"
            );
            let answer = MeterAnswer {
                meter,
                backfill: Some(backfill),
                earlier_definitions: Vec::new(),
            };
            Ok((StatusCode::CREATED, Json(answer)))
        }
        Err(MeterStoreError::Duplicate) => Err(ApiError::conflict(format!(
            "meter {} already exists; change it with PUT /v1/meters/{}",
            definition.id, definition.id
        ))),
        Err(e) => Err(ApiError::internal(&e)),
    }
}

/// 200 `{"data": [...]}`, every meter of the caller's scope ordered by id.
pub async fn list(
    State(state): State<AppState>,
    scope: TenantScope,
) -> Result<Json<MeterList>, ApiError> {
    let data = state
        .meters
        .list(&scope)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    Ok(Json(MeterList { data }))
}

/// 200 with the meter and its latest backfill, or 404 `not_found`.
pub async fn get_one(
    State(state): State<AppState>,
    scope: TenantScope,
    Path(id): Path<String>,
) -> Result<Json<MeterAnswer>, ApiError> {
    let id = path_id(&id)?;
    let meter = match state.meters.get(&scope, &id).await {
        Ok(Some(stored)) => stored,
        Ok(None) => return Err(not_found(&id)),
        Err(e) => return Err(ApiError::internal(&e)),
    };
    let backfill = backfills::latest(&state.pool, &scope, &id)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    let earlier_definitions = earlier_definitions(&state, &scope, &id).await?;
    Ok(Json(MeterAnswer {
        meter,
        backfill,
        earlier_definitions,
    }))
}

/// 200 with the replaced meter (and its backfill when its event name or filters changed), or
/// 404 `not_found`; a body `id`, if given, must equal the path's (400 `id_mismatch`): renaming
/// a meter would orphan its Stripe mapping and usage. A new aggregation or property of a
/// meter with usage applies from a window boundary past `INGEST_MAX_FUTURE_SECONDS` plus a
/// minute: the answer's `earlier_definitions` says until when the old one counts. 409
/// `meter_formula_change` for one that needs another Stripe meter formula.
pub async fn replace(
    State(state): State<AppState>,
    scope: TenantScope,
    Path(id): Path<String>,
    JsonBody(mut input): JsonBody<MeterInput>,
) -> Result<Json<MeterAnswer>, ApiError> {
    let id = path_id(&id)?;
    match &input.id {
        Some(body_id) if body_id != id.as_str() => {
            return Err(ApiError::bad_request(
                "id_mismatch",
                format!("body id {body_id:?} differs from the path id \"{id}\""),
            ));
        }
        _ => input.id = Some(id.as_str().to_owned()),
    }
    let definition = MeterDefinition::try_from(input).map_err(invalid)?;
    let now = OffsetDateTime::now_utc();
    let replaced = state
        .meters
        .replace(&scope, &definition, now, state.limits.change_lead())
        .await;
    match replaced {
        Ok(Some(replaced)) => {
            tracing::info!(
                tenant_id = %scope.tenant_id,
                environment_id = %scope.environment_id,
                meter_id = %definition.id,
                aggregation_effective_from = ?replaced.aggregation_effective_from,
                "meter replaced"
            );
            let earlier_definitions = earlier_definitions(&state, &scope, &id).await?;
            Ok(Json(MeterAnswer {
                meter: replaced.meter,
                backfill: replaced.backfill,
                earlier_definitions,
            }))
        }
        Ok(None) => Err(not_found(&id)),
        Err(MeterStoreError::FormulaChange { meter, reason }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "meter_formula_change",
            format!(
                "meter {meter} has usage billed to a Stripe meter of one formula, and {reason}: \
                 a Stripe meter's formula cannot change, so create a new meter for the new \
                 definition (and map it to a Stripe meter of that formula) instead"
            ),
        )),
        Err(e) => Err(ApiError::internal(&e)),
    }
}

fn path_id(id: &str) -> Result<MeterId, ApiError> {
    MeterId::parse(id).map_err(invalid)
}

fn invalid(e: SchemaError) -> ApiError {
    // SchemaError's text names the field (`invalid event_name: must be at most 100 characters`).
    ApiError::bad_request("invalid_value", e.to_string())
}

fn not_found(id: &MeterId) -> ApiError {
    ApiError::not_found(format!("no meter {id}"))
}
