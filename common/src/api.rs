//! The HTTP API's error answer and JSON body extractor, shared by every service.
//!
//! Every refusal is a 4xx or 5xx with a JSON body `{"error": {"code", "message"}}` (plus
//! `details` where there are several problems): `code` is stable and meant for programs,
//! `message` for people. Internal failures answer a generic message; their cause goes to the
//! log only, so no secret or internal detail ever reaches a client.

use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// One problem in a request with several parts (such as one event of a bulk request).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorDetail {
    pub index: usize,
    pub code: &'static str,
    pub message: String,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Vec<ErrorDetail>,
    /// Seconds, for 429 and 503 answers.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            details: Vec::new(),
            retry_after: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 503 with `Retry-After`: a dependency could not take the work in time.
    pub fn unavailable(code: &'static str, message: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }

    /// A failure of ours. `cause` is logged, never sent: it may hold internal detail.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error answering a request");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the request may be retried",
        )
    }

    pub fn with_details(mut self, details: Vec<ErrorDetail>) -> Self {
        self.details = details;
        self
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    details: &'a [ErrorDetail],
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body {
            error: Inner {
                code: self.code,
                message: &self.message,
                details: &self.details,
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// Classifies a serde_json error into a stable code: the JSON is broken (`malformed_json`),
/// or it is JSON of the wrong shape (`unknown_field`, `missing_field`, `invalid_type`,
/// `invalid_value`).
pub fn json_error_code(error: &serde_json::Error) -> &'static str {
    use serde_json::error::Category;
    match error.classify() {
        Category::Syntax | Category::Eof | Category::Io => "malformed_json",
        Category::Data => {
            let text = error.to_string();
            if text.starts_with("unknown field") {
                "unknown_field"
            } else if text.starts_with("missing field") {
                "missing_field"
            } else if text.starts_with("invalid type") {
                "invalid_type"
            } else {
                "invalid_value"
            }
        }
    }
}

/// Parses `bytes` as `T`, turning a failure into a 400 with a classified code.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(json_error_code(&e), format!("request body: {e}")))
}

/// A JSON request body, checked for content type and size before it is parsed.
/// The size limit is the route's `DefaultBodyLimit`; over it answers 413 `body_too_large`.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().eq_ignore_ascii_case("application/json"))
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(body_rejection)?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Reads the raw body, mapping the size limit to 413.
pub async fn read_body<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state)
        .await
        .map_err(body_rejection)
}

fn body_rejection(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "request body over the size limit",
        )
    } else {
        ApiError::bad_request("unreadable_body", rejection.body_text())
    }
}

/// The answer for a route that does not exist, in the same JSON shape.
pub async fn not_found_fallback() -> ApiError {
    ApiError::not_found("no such route")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Probe {
        a: u32,
    }

    fn code(body: &str) -> &'static str {
        parse_json::<Probe>(body.as_bytes()).unwrap_err().code
    }

    #[test]
    fn json_errors_are_classified() {
        assert_eq!(code("{"), "malformed_json");
        assert_eq!(code("nonsense"), "malformed_json");
        assert_eq!(code(r#"{"a": 1, "b": 2}"#), "unknown_field");
        assert_eq!(code("{}"), "missing_field");
        assert_eq!(code(r#"{"a": "x"}"#), "invalid_type");
        assert_eq!(code(r#"{"a": -1}"#), "invalid_value");
    }
}
