//! The relay's HTTP API: `POST /webhooks/stripe/{tenant_id}/{environment_id}`.
//!
//! Answers: 200 `{"received": true}` once the event is on `stripe.webhooks`; 200
//! `{"received": true, "duplicate": true}` for an event already relayed; otherwise a JSON
//! error ([`WebhookError`]), counted by reason, with nothing published. With an allow-list
//! configured, a delivery from elsewhere is refused (403 `source_not_allowed`) before any of
//! that ([`crate::sources`]).

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::routing::post;
use axum::{Json, Router};
use meterline_common::api::not_found_fallback;
use serde_json::{json, Value};

use crate::error::WebhookError;
use crate::extract::VerifiedDelivery;
use crate::metrics;
use crate::relay::{Outcome, Relay};
use crate::secrets::EndpointSecrets;
use crate::sources::{self, SourcePolicy};

/// What the handler and the extractor share.
#[derive(Clone)]
pub struct AppState {
    pub secrets: EndpointSecrets,
    pub tolerance_seconds: u64,
    pub relay: Arc<Relay>,
}

pub const WEBHOOK_ROUTE: &str = "/webhooks/stripe/{tenant_id}/{environment_id}";

/// The relay's routes; `sources`, when set, guards the webhook route (not the operations
/// routes: probes and scrapes come from inside the cluster).
pub fn router(state: AppState, max_body_bytes: usize, sources: Option<SourcePolicy>) -> Router {
    let mut webhook = post(receive).layer(DefaultBodyLimit::max(max_body_bytes));
    if let Some(policy) = sources {
        webhook = webhook.layer(axum::middleware::from_fn_with_state(
            policy,
            sources::enforce,
        ));
    }
    Router::new()
        .route(WEBHOOK_ROUTE, webhook)
        .fallback(not_found_fallback)
        .with_state(state)
}

async fn receive(
    State(state): State<AppState>,
    delivery: Result<VerifiedDelivery, WebhookError>,
) -> Result<Json<Value>, WebhookError> {
    let outcome = match delivery {
        Ok(delivery) => state.relay.relay(delivery).await,
        Err(refusal) => Err(refusal),
    };
    match outcome {
        Ok(Outcome::Published) => Ok(Json(json!({ "received": true }))),
        Ok(Outcome::Duplicate) => Ok(Json(json!({ "received": true, "duplicate": true }))),
        Err(error) => {
            metrics::refused(&error);
            tracing::info!(code = error.code(), "webhook delivery refused");
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    //! The refusals that come before any dependency is asked, and the 503 when PostgreSQL is
    //! away, through the router itself (no broker or database running).

    use std::time::Duration;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use meterline_accounts::crypto::Keyring;
    use meterline_accounts::stripe_config::StripeConfigStore;
    use meterline_common::config::KafkaSettings;
    use sqlx::postgres::PgPoolOptions;
    use tower::ServiceExt;

    use super::*;
    use crate::deliveries::DeliveryLog;
    use crate::kafka::WebhookPublisher;

    /// A router whose database and broker addresses lead nowhere (port 1).
    fn app() -> Router {
        app_with(None)
    }

    fn app_with(sources: Option<SourcePolicy>) -> Router {
        let pool = PgPoolOptions::new()
            .acquire_timeout(Duration::from_millis(500))
            .connect_lazy("postgres://u:p@127.0.0.1:1/nowhere")
            .unwrap();
        let kafka = KafkaSettings {
            brokers: "127.0.0.1:1".into(),
            topic_prefix: String::new(),
            security: Default::default(),
        };
        let publisher =
            Arc::new(WebhookPublisher::new(&kafka, Duration::from_millis(200)).unwrap());
        let keys = Keyring::parse("k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").unwrap();
        let state = AppState {
            secrets: EndpointSecrets::new(StripeConfigStore::new(pool.clone(), keys), None),
            tolerance_seconds: 300,
            relay: Arc::new(Relay::new(DeliveryLog::new(pool), publisher)),
        };
        router(state, 1024, sources)
    }

    async fn post(path: &str, signature: Option<&str>) -> (StatusCode, Option<String>, Value) {
        let mut request = Request::post(path).header("content-type", "application/json");
        if let Some(signature) = signature {
            request = request.header("stripe-signature", signature);
        }
        let response = app()
            .oneshot(request.body(Body::from(r#"{"id":"evt_1"}"#)).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, retry_after, serde_json::from_slice(&bytes).unwrap())
    }

    const VALID_LOOKING: &str =
        "t=1,v1=0000000000000000000000000000000000000000000000000000000000000000";

    #[tokio::test]
    async fn refusals_before_any_lookup() {
        let cases = [
            (
                "/webhooks/stripe/-bad/env",
                Some(VALID_LOOKING),
                404,
                "not_found",
            ),
            (
                "/webhooks/stripe/t1/env%20x",
                Some(VALID_LOOKING),
                404,
                "not_found",
            ),
            ("/webhooks/stripe/t1/env", None, 400, "missing_signature"),
            (
                "/webhooks/stripe/t1/env",
                Some("nonsense"),
                400,
                "malformed_signature",
            ),
            (
                "/webhooks/stripe/t1/env",
                Some("t=1"),
                400,
                "malformed_signature",
            ),
            ("/webhooks/stripe/t1", Some(VALID_LOOKING), 404, "not_found"),
        ];
        for (path, signature, status, code) in cases {
            let (got, _, body) = post(path, signature).await;
            assert_eq!(got.as_u16(), status, "{path} {signature:?}: {body}");
            assert_eq!(body["error"]["code"], code, "{path} {signature:?}: {body}");
        }
        // Invalid ids answer exactly like unknown ones: the body names no part.
        let (_, _, bad_id) = post("/webhooks/stripe/-bad/env", Some(VALID_LOOKING)).await;
        assert_eq!(
            bad_id,
            json!({"error": {"code": "not_found", "message": "no webhook endpoint at this address"}})
        );
    }

    #[tokio::test]
    async fn a_source_outside_the_allow_list_is_refused_before_anything_else() {
        use axum::extract::ConnectInfo;
        use std::net::SocketAddr;

        use crate::sources::Networks;

        let policy = SourcePolicy {
            allowed: Networks::parse("10.0.0.0/8").unwrap(),
            trusted_proxies: None,
        };
        let call = |peer: Option<&str>| {
            let mut request = Request::post("/webhooks/stripe/t1/env")
                .header("stripe-signature", VALID_LOOKING)
                .body(Body::from(r#"{"id":"evt_1"}"#))
                .unwrap();
            if let Some(peer) = peer {
                let addr: SocketAddr = peer.parse().unwrap();
                request.extensions_mut().insert(ConnectInfo(addr));
            }
            app_with(Some(policy.clone())).oneshot(request)
        };
        for peer in [Some("192.0.2.1:5000"), None] {
            let response = call(peer).await.unwrap();
            assert_eq!(response.status(), StatusCode::FORBIDDEN, "{peer:?}");
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(body["error"]["code"], "source_not_allowed");
        }
        // An allowed peer goes on to the usual checks (here: the database is away).
        let response = call(Some("10.2.3.4:5000")).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn an_unreachable_database_is_a_503_with_retry_after() {
        let (status, retry_after, body) =
            post("/webhooks/stripe/t1/env", Some(VALID_LOOKING)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(body["error"]["code"], "postgres_unavailable");
        assert_eq!(retry_after.as_deref(), Some("5"));
    }
}
