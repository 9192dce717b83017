//! Bringing an existing Stripe account's customers in: the customer import
//! (`POST /v1/stripe/migrate/customers`, `GET /v1/stripe/migrate/status/{id}`) and the bulk
//! mapping upload (`POST /v1/stripe/mappings/bulk`, a CSV file).
//!
//! Error codes: 404 `not_found` (no such job, or no Stripe config to import with); 409
//! `import_already_running`; for the upload 415 `unsupported_media_type`, 413
//! `body_too_large`, 400 `invalid_encoding`, `empty_file`, `too_many_rows`. A refused upload
//! writes nothing; an accepted one answers every row.

use axum::extract::rejection::PathRejection;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::Json;
use meterline_common::api::{read_body, ApiError};
use meterline_common::auth::TenantScope;
use meterline_schemas::JobId;
use serde::Serialize;

use super::error::RouteError;
use super::AppState;
use crate::bulk::{self, FileError, Row};
use crate::import::{ImportView, Started};
use crate::mappings::BulkOutcome;

/// 202 with the new job; 409 `import_already_running` (naming the running job's id) or 404
/// when the environment has no Stripe config.
pub async fn start_import(
    State(state): State<AppState>,
    scope: TenantScope,
) -> Result<(StatusCode, Json<ImportView>), RouteError> {
    let configured = state.configs.get(&scope).await?.is_some();
    if !configured {
        return Err(ApiError::not_found(
            "no stripe config for this environment: PUT /v1/stripe/config first",
        )
        .into());
    }
    match state.imports.start(&scope).await? {
        Started::Created(view) => {
            state.import_wake.notify_one();
            tracing::info!(
                tenant_id = %scope.tenant_id,
                environment_id = %scope.environment_id,
                job_id = %view.id,
                "customer import started"
            );
            Ok((StatusCode::ACCEPTED, Json(*view)))
        }
        Started::AlreadyRunning(id) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "import_already_running",
            format!("import {id} is still running; follow it at /v1/stripe/migrate/status/{id}"),
        )
        .into()),
    }
}

/// 200 with the job's progress, or 404 `not_found` (also for another tenant's job).
pub async fn import_status(
    State(state): State<AppState>,
    scope: TenantScope,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<ImportView>, RouteError> {
    let not_found = || ApiError::not_found("no such import");
    let Path(id) = path.map_err(|_| not_found())?;
    let id = JobId::parse(&id).map_err(|_| not_found())?;
    state
        .imports
        .view(&scope, &id)
        .await?
        .map(Json)
        .ok_or_else(|| not_found().into())
}

/// A `text/csv` body within [`bulk::MAX_BYTES`].
pub struct CsvBody(pub bytes::Bytes);

impl<S: Send + Sync> FromRequest<S> for CsvBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let is_csv = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("text/csv"));
        if !is_csv {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the file as text/csv: lines of customer_id,provider_customer_id",
            ));
        }
        read_body(req, state).await.map(CsvBody)
    }
}

/// The verdict on one row.
#[derive(Debug, Serialize)]
pub struct RowResult {
    /// The line of the file (1 is the first, a header included).
    pub line: usize,
    pub customer_id: Option<String>,
    pub provider_customer_id: Option<String>,
    /// `created`, `unchanged`, `conflict` or `invalid`.
    pub result: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The answer to an upload: counts by result, then every row.
#[derive(Debug, Default, Serialize)]
pub struct BulkAnswer {
    pub rows: usize,
    pub created: usize,
    pub unchanged: usize,
    pub conflict: usize,
    pub invalid: usize,
    pub results: Vec<RowResult>,
}

/// 200 with a result per row: valid rows are mapped by hand (source `manual`, audited), each
/// judged by the manual mapping rules; invalid ones say why.
pub async fn bulk_mappings(
    State(state): State<AppState>,
    scope: TenantScope,
    CsvBody(body): CsvBody,
) -> Result<Json<BulkAnswer>, RouteError> {
    let rows = bulk::parse(&body).map_err(|e| {
        let code = match e {
            FileError::NotUtf8 => "invalid_encoding",
            FileError::Empty => "empty_file",
            FileError::TooManyRows => "too_many_rows",
        };
        ApiError::bad_request(code, e.to_string())
    })?;
    let valid: Vec<_> = rows
        .iter()
        .filter_map(|r| match r {
            Row::Valid {
                customer_id,
                provider_customer_id,
                ..
            } => Some((customer_id.clone(), provider_customer_id.clone())),
            Row::Invalid { .. } => None,
        })
        .collect();
    let outcomes = state
        .mappings
        .customers()
        .create_manual_bulk(&scope, &valid)
        .await?;
    let mut outcomes = outcomes.into_iter();
    let mut answer = BulkAnswer {
        rows: rows.len(),
        ..BulkAnswer::default()
    };
    for row in rows {
        let result = match row {
            Row::Invalid {
                line,
                customer_id,
                provider_customer_id,
                reason,
            } => {
                answer.invalid += 1;
                RowResult {
                    line,
                    customer_id,
                    provider_customer_id,
                    result: "invalid",
                    reason: Some(reason),
                }
            }
            Row::Valid {
                line,
                customer_id,
                provider_customer_id,
            } => {
                let (result, reason) = match outcomes.next() {
                    Some(BulkOutcome::Created) => {
                        answer.created += 1;
                        ("created", None)
                    }
                    Some(BulkOutcome::Unchanged) => {
                        answer.unchanged += 1;
                        ("unchanged", None)
                    }
                    Some(BulkOutcome::Conflict(reason)) => {
                        answer.conflict += 1;
                        ("conflict", Some(reason))
                    }
                    None => {
                        return Err(
                            ApiError::internal(&"bulk upload: fewer outcomes than rows").into()
                        )
                    }
                };
                RowResult {
                    line,
                    customer_id: Some(customer_id.to_string()),
                    provider_customer_id: Some(provider_customer_id.to_string()),
                    result,
                    reason,
                }
            }
        };
        answer.results.push(result);
    }
    if answer.created > 0 {
        crate::metrics::customer_mappings_created("manual", answer.created as u64);
    }
    tracing::info!(
        tenant_id = %scope.tenant_id,
        environment_id = %scope.environment_id,
        rows = answer.rows,
        created = answer.created,
        unchanged = answer.unchanged,
        conflict = answer.conflict,
        invalid = answer.invalid,
        "bulk customer mappings uploaded"
    );
    Ok(Json(answer))
}
