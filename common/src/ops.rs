//! The operations routes every service serves: `/healthz`, `/readyz`, `/metrics`, and the
//! request metrics middleware.
//!
//! `/healthz` answers 200 while the process runs. `/readyz` answers 200 only when every
//! dependency answered within the probe timeout, and 503 otherwise, or once shutdown began
//! (so a load balancer stops sending work to a draining instance). Each check's outcome is
//! also the gauge `<service>_dependency_up{dependency}`, and a dependency turning unavailable
//! (or available again) is one log line naming it and the reason.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type CheckFn = Arc<dyn Fn() -> CheckFuture + Send + Sync>;

/// The dependencies a service needs to do its work, each with a probe.
#[derive(Clone)]
pub struct Readiness {
    service: &'static str,
    checks: Vec<(&'static str, CheckFn)>,
    timeout: Duration,
    shutdown: CancellationToken,
    /// Each dependency's last outcome, so only a change is logged (probes run every few
    /// seconds).
    last_up: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

impl Readiness {
    pub fn new(service: &'static str, shutdown: CancellationToken) -> Self {
        Self {
            service,
            checks: Vec::new(),
            timeout: Duration::from_secs(3),
            shutdown,
            last_up: Arc::default(),
        }
    }

    /// Adds a probe named after the dependency (`kafka`, `clickhouse`, `postgres`).
    pub fn check<F, Fut>(mut self, dependency: &'static str, probe: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.checks.push((
            dependency,
            Arc::new(move || Box::pin(probe()) as CheckFuture),
        ));
        self
    }

    /// Adds the Kafka probe (cluster metadata within two seconds).
    pub fn kafka(self, probe: Arc<crate::kafka::KafkaProbe>) -> Self {
        self.check("kafka", move || {
            let probe = probe.clone();
            async move { probe.check(Duration::from_secs(2)).await }
        })
    }

    /// Adds the PostgreSQL probe (`SELECT 1`).
    pub fn postgres(self, pool: sqlx::PgPool) -> Self {
        self.check("postgres", move || {
            let pool = pool.clone();
            async move { crate::postgres::check(&pool).await }
        })
    }

    /// Adds the ClickHouse probe (`SELECT 1`).
    pub fn clickhouse(self, client: ::clickhouse::Client) -> Self {
        self.check("clickhouse", move || {
            let client = client.clone();
            async move { crate::clickhouse::check(&client).await }
        })
    }

    /// Runs every probe concurrently, each bounded by the timeout.
    pub async fn evaluate(&self) -> (bool, BTreeMap<&'static str, String>) {
        let runs = self.checks.iter().map(|(name, probe)| {
            let probe = probe.clone();
            let timeout = self.timeout;
            async move {
                let outcome = match tokio::time::timeout(timeout, probe()).await {
                    Ok(result) => result,
                    Err(_) => Err(format!("no answer within {}s", timeout.as_secs())),
                };
                (*name, outcome)
            }
        });
        let outcomes = futures::future::join_all(runs).await;
        let mut ready = !self.shutdown.is_cancelled();
        let mut report = BTreeMap::new();
        for (name, outcome) in outcomes {
            let up = outcome.is_ok();
            crate::metrics::dependency_up(self.service, name, up);
            self.log_change(name, &outcome);
            ready &= up;
            report.insert(name, outcome.err().unwrap_or_else(|| "ok".into()));
        }
        if self.shutdown.is_cancelled() {
            report.insert("shutdown", "in progress".into());
        }
        (ready, report)
    }

    /// One line when a dependency turns unavailable (its first check included) or available
    /// again. The reason is the client's error, which names no credential.
    fn log_change(&self, dependency: &'static str, outcome: &Result<(), String>) {
        let up = outcome.is_ok();
        let before = self
            .last_up
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(dependency, up);
        match (before, outcome) {
            (Some(true) | None, Err(reason)) => tracing::warn!(
                dependency,
                %reason,
                "{dependency} is unavailable: {reason}"
            ),
            (Some(false), Ok(())) => tracing::info!(dependency, "{dependency} is available again"),
            _ => {}
        }
    }
}

#[derive(Clone)]
struct OpsState {
    readiness: Readiness,
    metrics: PrometheusHandle,
}

/// `/healthz`, `/readyz` and `/metrics`.
pub fn router(readiness: Readiness, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(OpsState { readiness, metrics })
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(state): State<OpsState>) -> Response {
    let (ready, checks) = state.readiness.evaluate().await;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "unready" },
        "checks": checks,
    });
    (status, Json(body)).into_response()
}

async fn render_metrics(State(state): State<OpsState>) -> Response {
    // Upkeep drains histogram buffers; run it here since nothing else scrapes.
    state.metrics.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// Counts requests (`<service>_http_requests_total{method,route,status}`) and times them
/// (`<service>_http_request_duration_seconds{method,route}`). The route label is the matched
/// route template, never the raw path, so its values stay bounded.
pub fn with_request_metrics(router: Router, service: &'static str) -> Router {
    router.layer(middleware::from_fn(move |req: Request, next: Next| {
        record_request(service, req, next)
    }))
}

async fn record_request(service: &'static str, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = method_label(req.method());
    let response = next.run(req).await;
    crate::metrics::http_request(
        service,
        method,
        route,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// The `method` label: one of the standard methods, or `other`. A client may send any token as
/// a method (`FOO1`, `FOO2`, ...), and each would otherwise become a new series.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use metrics_exporter_prometheus::PrometheusBuilder;
    use tower::ServiceExt;

    fn app(readiness: Readiness) -> Router {
        // A local recorder: the global one may be installed only once per process.
        let handle = PrometheusBuilder::new().build_recorder().handle();
        with_request_metrics(router(readiness, handle), "test")
    }

    async fn get_json(app: Router, uri: &str) -> (StatusCode, serde_json::Value) {
        let response = app
            .oneshot(Request::get(uri).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn ready_when_every_check_passes() {
        let readiness = Readiness::new("test", CancellationToken::new())
            .check("kafka", || async { Ok(()) })
            .check("postgres", || async { Ok(()) });
        let (status, body) = get_json(app(readiness), "/readyz").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["status"], "ready");
        assert_eq!(body["checks"]["kafka"], "ok");
    }

    #[tokio::test]
    async fn unready_names_the_failing_dependency() {
        let readiness = Readiness::new("test", CancellationToken::new())
            .check("kafka", || async { Ok(()) })
            .check("postgres", || async {
                Err("connection refused".to_owned())
            });
        let (status, body) = get_json(app(readiness), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["status"], "unready");
        assert_eq!(body["checks"]["postgres"], "connection refused");
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_check_is_unready_after_the_timeout() {
        let readiness = Readiness::new("test", CancellationToken::new())
            .check("kafka", std::future::pending::<Result<(), String>>);
        let (status, body) = get_json(app(readiness), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["checks"]["kafka"], "no answer within 3s");
    }

    #[test]
    fn unknown_methods_share_one_label() {
        use axum::http::Method;
        assert_eq!(method_label(&Method::POST), "POST");
        let made_up = Method::from_bytes(b"FOO1").unwrap();
        assert_eq!(method_label(&made_up), "other");
        assert_eq!(method_label(&Method::CONNECT), "other");
    }

    #[tokio::test]
    async fn draining_instance_is_unready_but_healthy() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let readiness = Readiness::new("test", shutdown).check("kafka", || async { Ok(()) });
        let (status, _) = get_json(app(readiness.clone()), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let (status, _) = get_json(app(readiness), "/healthz").await;
        assert_eq!(status, StatusCode::OK);
    }
}
