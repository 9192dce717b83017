//! The crate's one error type and its translation into Stripe's error object
//! (`{"error": {"type", "code", "message", "param"}}`, with `doc_url` when there is a code).
//! Internal failures are shown to clients as Stripe shows its own: a generic `api_error`.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::form::FormError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request Stripe refuses as `invalid_request_error` (400, 401, 404 ...).
    #[error("{message}")]
    InvalidRequest {
        status: StatusCode,
        code: Option<&'static str>,
        message: String,
        param: Option<String>,
    },
    /// Reuse of an `Idempotency-Key` with other parameters (400) or while the first request
    /// under that key is still running (409).
    #[error("{message}")]
    Idempotency {
        status: StatusCode,
        code: Option<&'static str>,
        message: String,
    },
    /// 429: the account's rate limit, a concurrent request on the same (customer, meter), or an
    /// injected fault.
    #[error("{message}")]
    TooManyRequests { code: &'static str, message: String },
    /// A 500 on purpose (fault injection); answered like Stripe's own `api_error`.
    #[error("injected server error")]
    InjectedServerError,
    #[error("invalid form data: {0}")]
    Form(#[from] FormError),
    #[error("io error: {context}: {source}")]
    Io {
        context: &'static str,
        source: std::io::Error,
    },
}

impl Error {
    pub fn invalid(code: &'static str, message: impl Into<String>, param: Option<&str>) -> Self {
        Error::InvalidRequest {
            status: StatusCode::BAD_REQUEST,
            code: Some(code),
            message: message.into(),
            param: param.map(str::to_string),
        }
    }

    /// A refused value for which Stripe documents no specific code.
    pub fn bad_value(message: impl Into<String>, param: &str) -> Self {
        Error::InvalidRequest {
            status: StatusCode::BAD_REQUEST,
            code: None,
            message: message.into(),
            param: Some(param.to_string()),
        }
    }

    pub fn missing(param: &str) -> Self {
        Self::invalid(
            "parameter_missing",
            format!("Missing required param: {param}."),
            Some(param),
        )
    }

    pub fn unknown_param(param: &str) -> Self {
        Self::invalid(
            "parameter_unknown",
            format!("Received unknown parameter: {param}"),
            Some(param),
        )
    }

    pub fn no_such(kind: &str, id: &str, param: &str) -> Self {
        Error::InvalidRequest {
            status: StatusCode::NOT_FOUND,
            code: Some("resource_missing"),
            message: format!("No such {kind}: '{id}'"),
            param: Some(param.to_string()),
        }
    }

    pub fn unauthorized(code: Option<&'static str>, message: impl Into<String>) -> Self {
        Error::InvalidRequest {
            status: StatusCode::UNAUTHORIZED,
            code,
            message: message.into(),
            param: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::InvalidRequest { status, .. } | Error::Idempotency { status, .. } => *status,
            Error::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::Form(_) => StatusCode::BAD_REQUEST,
            Error::InjectedServerError | Error::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body Stripe would send for this error.
    pub fn body(&self) -> Value {
        let (kind, code, message, param): (&str, Option<&str>, String, Option<&str>) = match self {
            Error::InvalidRequest {
                code,
                message,
                param,
                ..
            } => (
                "invalid_request_error",
                *code,
                message.clone(),
                param.as_deref(),
            ),
            Error::Idempotency { code, message, .. } => {
                ("idempotency_error", *code, message.clone(), None)
            }
            Error::TooManyRequests { code, message } => {
                ("invalid_request_error", Some(*code), message.clone(), None)
            }
            Error::Form(e) => (
                "invalid_request_error",
                Some("parameter_invalid"),
                format!("Invalid request body: {e}"),
                None,
            ),
            Error::InjectedServerError | Error::Io { .. } => (
                "api_error",
                None,
                "An unknown error occurred while processing your request.".to_string(),
                None,
            ),
        };
        let mut error = json!({ "type": kind, "message": message });
        if let Some(code) = code {
            error["code"] = json!(code);
            error["doc_url"] = json!(format!("https://stripe.com/docs/error-codes/{code}"));
        }
        if let Some(param) = param {
            error["param"] = json!(param);
        }
        json!({ "error": error })
    }

    /// Whether Stripe would tell the client a retry may succeed (`Stripe-Should-Retry`).
    fn should_retry(&self) -> Option<bool> {
        match self {
            Error::TooManyRequests { .. } => Some(true),
            Error::Idempotency { status, .. } if *status == StatusCode::CONFLICT => Some(true),
            Error::InjectedServerError => Some(true),
            _ => None,
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        if let Some(retry) = self.should_retry() {
            let value = HeaderValue::from_static(if retry { "true" } else { "false" });
            response.headers_mut().insert("stripe-should-retry", value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_has_stripe_shape() {
        let body = Error::missing("event_name").body();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "parameter_missing");
        assert_eq!(body["error"]["param"], "event_name");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("event_name"));
        let internal = Error::InjectedServerError.body();
        assert_eq!(internal["error"]["type"], "api_error");
        assert!(internal["error"].get("code").is_none());
    }
}
