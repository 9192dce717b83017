//! The Stripe control API. Every route is authenticated by a bearer JWT ([`TenantScope`]) and
//! scoped by its tenant and environment: no route reads or changes another tenant's data.
//! Errors are JSON ([`ApiError`]), through one error type ([`error::RouteError`]); the list
//! routes read their query strings by one set of rules ([`query`]).
//!
//! [`TenantScope`]: meterline_common::auth::TenantScope
//! [`ApiError`]: meterline_common::api::ApiError

pub mod audit;
pub mod config;
pub mod error;
pub mod mappings;
pub mod migrate;
pub mod query;
pub mod sync;

use axum::extract::{DefaultBodyLimit, FromRef};
use std::sync::Arc;

use axum::routing::{delete, get, post, put};
use axum::Router;
use meterline_accounts::stripe_config::StripeConfigStore;
use meterline_common::api::not_found_fallback;
use meterline_common::auth::JwtKeys;
use sqlx::PgPool;
use tokio::sync::Notify;

use crate::import::ImportStore;
use crate::kafka::ResyncPublisher;
use crate::ledger::Ledger;
use crate::mappings::MappingStore;
use crate::pacing::Pacer;
use crate::stripe::StripeClient;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub jwt: JwtKeys,
    pub pool: PgPool,
    pub configs: StripeConfigStore,
    pub mappings: MappingStore,
    pub ledger: Ledger,
    pub stripe: StripeClient,
    pub pacer: Arc<Pacer>,
    pub resync: Arc<ResyncPublisher>,
    pub imports: ImportStore,
    /// Wakes the import loop when a job is created.
    pub import_wake: Arc<Notify>,
    /// See [`crate::config::Config::window_change_lead`].
    pub window_change_lead: std::time::Duration,
}

impl FromRef<AppState> for JwtKeys {
    fn from_ref(state: &AppState) -> JwtKeys {
        state.jwt.clone()
    }
}

/// Control API bodies are small documents.
const MAX_BODY_BYTES: usize = 64 << 10;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/stripe/config", put(config::put).get(config::get))
        .route("/v1/stripe/config/test", post(config::test))
        .route("/v1/stripe/sync/manual", post(sync::manual))
        .route("/v1/stripe/sync/jobs/{id}", get(sync::job))
        .route("/v1/stripe/sync/status", get(sync::status))
        .route("/v1/stripe/sync/batches", get(sync::batches))
        .route("/v1/stripe/batches/retry", post(sync::retry))
        .route("/v1/stripe/sync/batches/{id}/resolve", post(sync::resolve))
        .route("/v1/stripe/reconcile", get(sync::reconcile))
        .route("/v1/stripe/audit", get(audit::list))
        .route("/v1/stripe/migrate/customers", post(migrate::start_import))
        .route(
            "/v1/stripe/migrate/status/{id}",
            get(migrate::import_status),
        )
        .route(
            "/v1/stripe/mappings/bulk",
            // A CSV file is larger than the JSON documents of the other routes.
            post(migrate::bulk_mappings).layer(DefaultBodyLimit::max(crate::bulk::MAX_BYTES)),
        )
        .route(
            "/v1/stripe/meters/mapping",
            post(mappings::create_meter_mapping).get(mappings::list_meter_mappings),
        )
        .route(
            "/v1/stripe/meters/mapping/{meter_id}",
            delete(mappings::delete_meter_mapping).get(mappings::get_meter_mapping),
        )
        .route(
            "/v1/stripe/customers/mapping",
            post(mappings::create_customer_mapping).get(mappings::list_customer_mappings),
        )
        .route(
            "/v1/stripe/customers/mapping/{customer_id}",
            delete(mappings::delete_customer_mapping).get(mappings::get_customer_mapping),
        )
        .route(
            "/v1/stripe/customers/unmapped",
            get(mappings::list_unmapped_customers),
        )
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .fallback(not_found_fallback)
        .with_state(state)
}
