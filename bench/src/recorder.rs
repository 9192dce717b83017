//! A recording pass-through in front of the Stripe stand-in: every request is forwarded
//! unchanged and its answer returned unchanged, and each `POST /v1/billing/meter_events` is
//! written down with the instant it arrived (microseconds, on this process's monotonic clock)
//! and the status it got.
//!
//! Why: the stand-in keeps receipt times in whole seconds, which can tell neither "the most
//! requests in any one-second span" nor a latency of a few hundred milliseconds. The recorder
//! sits where Stripe's edge would be, so its arrival time is "Stripe received it"; forwarding
//! over loopback adds well under a millisecond, to the sink and to the baseline client alike.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use stripe_standin::FormValue;
use tokio::task::JoinHandle;

const METER_EVENTS: &str = "/v1/billing/meter_events";

/// One meter event request as it reached the recorder.
#[derive(Debug, Clone)]
pub struct Receipt {
    /// Since the recorder started.
    pub at: Duration,
    /// The stand-in's answer (429: refused by its rate limit).
    pub status: u16,
    /// `payload[stripe_customer_id]`.
    pub customer: String,
    pub event_name: String,
    pub identifier: String,
    /// `payload[value]`.
    pub value: i64,
    /// `timestamp` (Unix seconds): for the sink, the last second of the window.
    pub timestamp: i64,
}

impl Receipt {
    pub fn accepted(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

struct Shared {
    upstream: String,
    client: reqwest::Client,
    started: Instant,
    /// The wall clock at `started`, in Unix milliseconds.
    started_unix_ms: i64,
    receipts: Mutex<Vec<Receipt>>,
}

/// The recorder, serving on a free loopback port until dropped.
pub struct Recorder {
    /// What to give a client as Stripe's base URL.
    pub base: String,
    shared: Arc<Shared>,
    server: JoinHandle<()>,
}

impl Recorder {
    /// Starts forwarding to `upstream` (the stand-in's base URL).
    pub async fn start(upstream: &str) -> anyhow::Result<Recorder> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .context("binding the recorder's port")?;
        let addr = listener.local_addr().context("the recorder's address")?;
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_owned(),
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()
                .context("building the recorder's client")?,
            started: Instant::now(),
            started_unix_ms: (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
                as i64,
            receipts: Mutex::new(Vec::new()),
        });
        let router = Router::new().fallback(forward).with_state(shared.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                eprintln!("the stripe recorder stopped: {e}");
            }
        });
        Ok(Recorder {
            base: format!("http://{addr}"),
            shared,
            server,
        })
    }

    /// Now, on the clock of [`Receipt::at`].
    pub fn now(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// The wall-clock time (Unix milliseconds) of a receipt's `at`.
    pub fn unix_ms(&self, at: Duration) -> i64 {
        self.shared.started_unix_ms + at.as_millis() as i64
    }

    /// Every meter event request so far, in order of arrival.
    pub fn receipts(&self) -> Vec<Receipt> {
        let mut receipts = self
            .shared
            .receipts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        receipts.sort_by_key(|r| r.at);
        receipts
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn forward(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let at = shared.started.elapsed();
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, 16 << 20).await {
        Ok(body) => body,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut upstream = shared
        .client
        .request(parts.method.clone(), format!("{}{path}", shared.upstream))
        .body(body.clone());
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) {
            upstream = upstream.header(name, value);
        }
    }
    let answer = match upstream.send().await {
        Ok(answer) => answer,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let status = answer.status();
    let headers = answer.headers().clone();
    let answer_body = answer.bytes().await.unwrap_or_default();
    if parts.method == axum::http::Method::POST && parts.uri.path() == METER_EVENTS {
        let receipt = meter_event(at, status.as_u16(), &body);
        shared
            .receipts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(receipt);
    }
    let mut response = Response::new(Body::from(answer_body));
    *response.status_mut() = status;
    copy_headers(&headers, response.headers_mut());
    response
}

fn copy_headers(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        if !hop_by_hop(name) {
            to.append(name.clone(), value.clone());
        }
    }
}

/// Headers that describe one connection or one encoding of the body, set anew on each side.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "host" | "connection" | "content-length" | "transfer-encoding" | "keep-alive"
    )
}

/// The receipt of a meter event request from its form body; fields that are missing or
/// malformed are left empty (the stand-in's answer says what it made of them).
fn meter_event(at: Duration, status: u16, body: &Bytes) -> Receipt {
    let form = stripe_standin::decode_form(body).unwrap_or(FormValue::Map(Default::default()));
    let field = |path: &[&str]| -> String {
        let mut value = &form;
        for key in path {
            match value {
                FormValue::Map(map) => match map.get(*key) {
                    Some(v) => value = v,
                    None => return String::new(),
                },
                _ => return String::new(),
            }
        }
        match value {
            FormValue::Str(s) => s.clone(),
            _ => String::new(),
        }
    };
    Receipt {
        at,
        status,
        customer: field(&["payload", "stripe_customer_id"]),
        event_name: field(&["event_name"]),
        identifier: field(&["identifier"]),
        value: field(&["payload", "value"]).parse().unwrap_or(0),
        timestamp: field(&["timestamp"]).parse().unwrap_or(0),
    }
}

/// The most requests that arrived within any one span of `span` (half-open: `[t, t + span)`),
/// from arrival times in ascending order.
pub fn busiest_span(arrivals: &[Duration], span: Duration) -> usize {
    let mut best = 0;
    let mut first = 0;
    for (last, at) in arrivals.iter().enumerate() {
        while *at - arrivals[first] >= span {
            first += 1;
        }
        best = best.max(last - first + 1);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(values: &[u64]) -> Vec<Duration> {
        values.iter().map(|v| Duration::from_millis(*v)).collect()
    }

    #[test]
    fn the_busiest_span_is_half_open_and_slides() {
        let second = Duration::from_secs(1);
        assert_eq!(busiest_span(&[], second), 0);
        // 0 and 1000 are a whole second apart: not in one span.
        assert_eq!(busiest_span(&ms(&[0, 1000, 2000]), second), 1);
        // Calendar seconds count 2 and 2; the span from 600 holds all 4.
        assert_eq!(busiest_span(&ms(&[600, 900, 1200, 1500]), second), 4);
        assert_eq!(busiest_span(&ms(&[100, 600, 900, 1200, 1900]), second), 3);
        assert_eq!(busiest_span(&ms(&[0, 0, 0, 999]), second), 4);
    }

    #[test]
    fn a_meter_event_form_is_read() {
        let body = Bytes::from_static(
            b"event_name=api_calls&payload%5Bstripe_customer_id%5D=cus_1&payload%5Bvalue%5D=42\
              &identifier=ml_abc&timestamp=1700000059",
        );
        let r = meter_event(Duration::from_millis(5), 200, &body);
        assert_eq!(
            (
                r.customer.as_str(),
                r.event_name.as_str(),
                r.identifier.as_str()
            ),
            ("cus_1", "api_calls", "ml_abc")
        );
        assert_eq!((r.value, r.timestamp), (42, 1_700_000_059));
        assert!(r.accepted());
    }
}
