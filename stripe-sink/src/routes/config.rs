//! `PUT/GET /v1/stripe/config` and `POST /v1/stripe/config/test`.
//!
//! The API key and webhook secrets are parsed into their types here, stored encrypted, and
//! never sent back: responses carry the masked key (`sk_test_****abcd`) and the number of
//! webhook secrets.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use meterline_accounts::audit::{Actor, Purpose};
use meterline_accounts::stripe_config::{MaskedConfig, NewConfig, StripeApiKey, WebhookSecret};
use meterline_catalog::window_sizes;
use meterline_common::api::{ApiError, JsonBody};
use meterline_common::auth::TenantScope;
use serde::Deserialize;
use time::OffsetDateTime;

use super::error::{invalid_value, RouteError};
use super::AppState;
use crate::stripe::ErrorClass;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigInput {
    api_key: String,
    #[serde(default = "yes")]
    sync_enabled: bool,
    #[serde(default = "sixty")]
    aggregation_window_minutes: u32,
    #[serde(default)]
    webhook_secrets: Vec<String>,
    rate_limit_per_second: Option<u32>,
}

fn yes() -> bool {
    true
}

fn sixty() -> u32 {
    60
}

fn parse(input: ConfigInput) -> Result<NewConfig, ApiError> {
    let api_key = StripeApiKey::parse(&input.api_key).map_err(invalid_value)?;
    if !(5..=60).contains(&input.aggregation_window_minutes) {
        return Err(invalid_value(
            "aggregation_window_minutes must be between 5 and 60",
        ));
    }
    if let Some(rate) = input.rate_limit_per_second {
        if !(1..=10_000).contains(&rate) {
            return Err(invalid_value(
                "rate_limit_per_second must be between 1 and 10000",
            ));
        }
    }
    if input.webhook_secrets.len() > 10 {
        return Err(invalid_value("at most 10 webhook_secrets"));
    }
    let webhook_secrets = input
        .webhook_secrets
        .iter()
        .map(|s| WebhookSecret::parse(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid_value)?;
    Ok(NewConfig {
        api_key,
        webhook_secrets,
        sync_enabled: input.sync_enabled,
        aggregation_window_minutes: input.aggregation_window_minutes,
        rate_limit_per_second: input.rate_limit_per_second,
    })
}

/// The configuration as answered, with when a window size change takes effect.
#[derive(Debug, serde::Serialize)]
pub struct ConfigAnswer {
    #[serde(flatten)]
    config: MaskedConfig,
    /// When a changed `aggregation_window_minutes` takes effect: the first instant at least the
    /// ingest's future allowance ahead that is a boundary of both the old and the new size, so
    /// windows never overlap and no window changes size once it holds an event.
    #[serde(
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    window_size_effective_from: Option<OffsetDateTime>,
}

pub async fn put(
    State(state): State<AppState>,
    scope: TenantScope,
    JsonBody(input): JsonBody<ConfigInput>,
) -> Result<Json<ConfigAnswer>, RouteError> {
    let config = parse(input)?;
    let masked = state.configs.put(&scope, &config).await?;
    let effective = window_sizes::schedule_change(
        &state.pool,
        &scope,
        config.aggregation_window_minutes,
        OffsetDateTime::now_utc(),
        state.window_change_lead,
    )
    .await?;
    tracing::info!(
        tenant = %scope.tenant_id,
        environment = %scope.environment_id,
        api_key = %masked.api_key,
        "stripe config saved"
    );
    Ok(Json(ConfigAnswer {
        config: masked,
        window_size_effective_from: effective,
    }))
}

pub async fn get(
    State(state): State<AppState>,
    scope: TenantScope,
) -> Result<Json<MaskedConfig>, RouteError> {
    state
        .configs
        .get(&scope)
        .await?
        .map(Json)
        .ok_or_else(no_config)
}

/// 404: the tenant environment has no Stripe config.
fn no_config() -> RouteError {
    ApiError::not_found("no stripe config for this environment").into()
}

/// The tenant environment's decrypted API key for `purpose` (audited as the API caller); 404
/// when it has no Stripe config.
pub(super) async fn stored_api_key(
    state: &AppState,
    scope: &TenantScope,
    purpose: Purpose,
) -> Result<StripeApiKey, RouteError> {
    state
        .configs
        .api_key(
            &scope.tenant_id,
            &scope.environment_id,
            &Actor::api(scope),
            purpose,
        )
        .await?
        .ok_or_else(no_config)
}

/// Calls `GET /v1/account` with the stored key: it works, and names the Stripe account whose
/// rate limit the sync shares.
pub async fn test(
    State(state): State<AppState>,
    scope: TenantScope,
) -> Result<Json<serde_json::Value>, RouteError> {
    let key = stored_api_key(&state, &scope, Purpose::ConfigTest).await?;
    match state.stripe.account_id(&key).await {
        Ok(account) => Ok(Json(
            serde_json::json!({"status": "connected", "stripe_account": account}),
        )),
        Err(e) if e.class == ErrorClass::Authentication => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "stripe_authentication_failed",
            format!("stripe refused the api key {}: {}", key.masked(), e.message),
        )
        .into()),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "stripe_unreachable",
            format!("stripe did not answer as expected: {e}"),
        )
        .into()),
    }
}
