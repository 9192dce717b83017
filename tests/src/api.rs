//! Typed helpers for calling a service's HTTP API from a test: bearer tokens for any tenant,
//! JSON requests, and the answer with its status, headers and JSON body.

use std::time::Duration;

use meterline_common::auth::{JwtKeys, TenantScope};
use meterline_schemas::{EnvironmentId, TenantId};
use reqwest::header::HeaderMap;
use serde_json::Value;

use crate::stack::Stack;

/// The stack's token keys (what the services verify with).
pub fn keys() -> JwtKeys {
    JwtKeys::new(Stack::get().jwt_secret.as_bytes())
}

pub fn scope(tenant: &str, environment: &str) -> TenantScope {
    TenantScope {
        tenant_id: TenantId::parse(tenant).expect("a valid tenant id"),
        environment_id: EnvironmentId::parse(environment).expect("a valid environment id"),
        subject: Some("test".into()),
    }
}

/// A valid token for `tenant`/`environment`, good for an hour.
pub fn token(tenant: &str, environment: &str) -> String {
    keys().mint(&scope(tenant, environment), Duration::from_secs(3600))
}

/// An answer: status, headers and the body parsed as JSON (`Value::Null` when empty).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    /// The `error.code` of a JSON error answer.
    pub fn error_code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

/// Sends `request`, returning the answer; fails the test if the body is not JSON.
pub async fn send(request: reqwest::RequestBuilder) -> Answer {
    let response = request.send().await.expect("the service answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.expect("reading the answer");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "answer {status} is not JSON ({e}): {}",
                String::from_utf8_lossy(&bytes)
            )
        })
    };
    Answer {
        status,
        headers,
        body,
    }
}

/// GETs `url` with a bearer token.
pub async fn get(url: &str, token: &str) -> Answer {
    send(reqwest::Client::new().get(url).bearer_auth(token)).await
}

/// POSTs `body` as JSON with a bearer token.
pub async fn post_json(url: &str, token: &str, body: &Value) -> Answer {
    send(
        reqwest::Client::new()
            .post(url)
            .bearer_auth(token)
            .json(body),
    )
    .await
}
