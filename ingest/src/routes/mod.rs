//! The ingest HTTP API. Every route is authenticated by a bearer JWT ([`TenantScope`]) and
//! answers errors as JSON ([`ApiError`]). Routes: `/v1/events`, `/v1/events/bulk`,
//! `/v1/meters`, `/v1/meters/{id}`, `/v1/usage`.
//!
//! [`TenantScope`]: meterline_common::auth::TenantScope
//! [`ApiError`]: meterline_common::api::ApiError

pub mod events;
pub mod meters;
pub mod usage;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRef};
use axum::routing::{get, post};
use axum::Router;
use meterline_catalog::meters::MeterStore;
use meterline_common::api::not_found_fallback;
use meterline_common::auth::JwtKeys;

use crate::config::Limits;
use crate::kafka::UsageWriter;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub jwt: JwtKeys,
    pub writer: Arc<UsageWriter>,
    pub meters: MeterStore,
    pub limits: Limits,
    /// The tenants' window sizes, for `GET /v1/usage`.
    pub pool: sqlx::PgPool,
    /// Where `GET /v1/usage` reads window totals.
    pub clickhouse: ::clickhouse::Client,
}

impl FromRef<AppState> for JwtKeys {
    fn from_ref(state: &AppState) -> JwtKeys {
        state.jwt.clone()
    }
}

/// Meter definitions are small documents.
const MAX_METER_BODY_BYTES: usize = 64 << 10;

pub fn router(state: AppState) -> Router {
    let limits = state.limits;
    Router::new()
        .route(
            "/v1/events",
            post(events::create_one).layer(DefaultBodyLimit::max(limits.max_event_body_bytes)),
        )
        .route(
            "/v1/events/bulk",
            post(events::create_bulk).layer(DefaultBodyLimit::max(limits.max_bulk_body_bytes)),
        )
        .route(
            "/v1/meters",
            post(meters::create)
                .get(meters::list)
                .layer(DefaultBodyLimit::max(MAX_METER_BODY_BYTES)),
        )
        .route(
            "/v1/meters/{id}",
            get(meters::get_one)
                .put(meters::replace)
                .layer(DefaultBodyLimit::max(MAX_METER_BODY_BYTES)),
        )
        .route("/v1/usage", get(usage::get_usage))
        .fallback(not_found_fallback)
        .with_state(state)
}
