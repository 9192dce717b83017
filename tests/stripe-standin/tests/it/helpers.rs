//! Test harness: an in-process stand-in on port 0 with typed request helpers, and a local
//! webhook receiver that records what it gets and can fail on purpose.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};
use stripe_standin::{spawn, Config, StandinHandle};

pub const KEY: &str = "sk_test_standin";

pub struct TestStandin {
    pub base: String,
    pub client: reqwest::Client,
    _handle: StandinHandle,
}

pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl TestStandin {
    pub async fn start() -> Self {
        Self::start_with(Config::for_tests()).await
    }

    pub async fn start_with(config: Config) -> Self {
        let (addr, handle) = spawn(config).await.expect("stand-in starts");
        TestStandin {
            base: format!("http://{addr}"),
            client: reqwest::Client::new(),
            _handle: handle,
        }
    }

    pub async fn send(
        &self,
        method: reqwest::Method,
        key: Option<&str>,
        path: &str,
        form: &str,
        idempotency_key: Option<&str>,
    ) -> Answer {
        let mut req = self
            .client
            .request(method.clone(), format!("{}{path}", self.base));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        if let Some(idem) = idempotency_key {
            req = req.header("idempotency-key", idem);
        }
        if method != reqwest::Method::GET && !form.is_empty() {
            req = req
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form.to_string());
        }
        let resp = req.send().await.expect("request reaches the stand-in");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.expect("response body");
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer {
            status,
            body,
            headers,
        }
    }

    pub async fn post(&self, path: &str, form: &str) -> Answer {
        self.send(reqwest::Method::POST, Some(KEY), path, form, None)
            .await
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(reqwest::Method::GET, Some(KEY), path, "", None)
            .await
    }

    pub async fn control(&self, path: &str, body: Value) -> Value {
        let resp = self
            .client
            .post(format!("{}/_standin{path}", self.base))
            .json(&body)
            .send()
            .await
            .expect("control request");
        assert!(
            resp.status().is_success(),
            "control {path}: {}",
            resp.status()
        );
        resp.json().await.expect("control answer is json")
    }

    pub async fn advance(&self, seconds: i64) {
        self.control("/clock/advance", json!({ "seconds": seconds }))
            .await;
    }

    pub async fn now(&self) -> i64 {
        let v: Value = self
            .client
            .get(format!("{}/_standin/clock", self.base))
            .send()
            .await
            .expect("clock")
            .json()
            .await
            .expect("clock json");
        v["now"].as_i64().expect("now")
    }

    pub async fn inspect(&self, key: &str) -> Value {
        self.client
            .get(format!("{}/_standin/accounts/{key}/inspect", self.base))
            .send()
            .await
            .expect("inspect")
            .json()
            .await
            .expect("inspect json")
    }

    pub async fn customer(&self) -> String {
        let a = self.post("/v1/customers", "metadata[external_id]=t1").await;
        assert_eq!(a.status, 200, "{}", a.body);
        a.body["id"].as_str().expect("id").to_string()
    }

    pub async fn meter(&self, event_name: &str, formula: &str) -> String {
        let a = self
            .post(
                "/v1/billing/meters",
                &format!(
                    "display_name=M&event_name={event_name}&default_aggregation[formula]={formula}"
                ),
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.body);
        a.body["id"].as_str().expect("id").to_string()
    }

    pub async fn meter_event(
        &self,
        event_name: &str,
        customer: &str,
        value: &str,
        identifier: &str,
        timestamp: i64,
    ) -> Answer {
        self.post(
            "/v1/billing/meter_events",
            &format!(
                "event_name={event_name}&payload[stripe_customer_id]={customer}&payload[value]={value}&identifier={identifier}&timestamp={timestamp}"
            ),
        )
        .await
    }

    pub async fn webhook_endpoint(&self, url: &str, events: &[&str]) -> (String, String) {
        let mut form = format!("url={url}");
        for e in events {
            form.push_str(&format!("&enabled_events[]={e}"));
        }
        let a = self.post("/v1/webhook_endpoints", &form).await;
        assert_eq!(a.status, 200, "{}", a.body);
        (
            a.body["id"].as_str().expect("id").to_string(),
            a.body["secret"].as_str().expect("secret").to_string(),
        )
    }
}

/// One webhook request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub signature: String,
    pub body: Bytes,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("webhook body is json")
    }
}

/// A local webhook receiver: records every request; answers the queued statuses first, then 200.
#[derive(Clone, Default)]
pub struct Receiver {
    pub received: Arc<Mutex<Vec<Received>>>,
    pub script: Arc<Mutex<VecDeque<u16>>>,
}

impl Receiver {
    pub async fn start() -> (Self, String) {
        let receiver = Receiver::default();
        let state = receiver.clone();
        let app = Router::new().route(
            "/hook",
            post(move |headers: HeaderMap, body: Bytes| {
                let state = state.clone();
                async move {
                    let signature = headers
                        .get("stripe-signature")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    state
                        .received
                        .lock()
                        .unwrap()
                        .push(Received { signature, body });
                    let status = state.script.lock().unwrap().pop_front().unwrap_or(200);
                    StatusCode::from_u16(status).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (receiver, format!("http://{addr}/hook"))
    }

    pub fn fail_next(&self, statuses: &[u16]) {
        self.script.lock().unwrap().extend(statuses);
    }

    pub fn all(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until `pred` holds over what was received (up to 10 s).
    pub async fn wait_for(&self, pred: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        for _ in 0..200 {
            let all = self.all();
            if pred(&all) {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("webhook condition not met; received: {:#?}", self.all());
    }
}

/// Independent check of a Stripe signature header (not the stand-in's own code): true when
/// any v1 entry equals hex(HMAC-SHA256(secret, "<t>.<body>")).
pub fn verify(header: &str, secret: &str, body: &[u8]) -> bool {
    use hmac::{Hmac, Mac};
    let mut t = None;
    let mut v1s = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = Some(v.to_string()),
            Some(("v1", v)) => v1s.push(v.to_string()),
            _ => {}
        }
    }
    let Some(t) = t else { return false };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let expected = hex::encode(mac.finalize().into_bytes());
    v1s.contains(&expected)
}

pub fn v1_count(header: &str) -> usize {
    header.split(',').filter(|p| p.starts_with("v1=")).count()
}
