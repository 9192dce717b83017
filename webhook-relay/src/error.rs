//! The crate's error types: [`Error`] for starting and stopping the service, [`WebhookError`]
//! for every answer to a delivery that is not a 2xx (one `IntoResponse`, through the shared
//! JSON error shape of [`ApiError`]).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use meterline_common::api::ApiError;

use crate::signature::SignatureError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Common(#[from] meterline_common::Error),
    #[error("shutdown: {0}")]
    Shutdown(String),
}

/// Seconds Stripe (or anyone) should wait before redelivering after a 503.
pub const RETRY_AFTER_SECONDS: u64 = 5;

/// Why a delivery was not taken. Each variant has a stable `code`, the metrics `reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// No Stripe configuration for the tenant environment of the URL, or ids that cannot be
    /// one. One answer for all of these, so the address does not reveal which tenants or
    /// environments exist.
    #[error("no webhook endpoint at this address")]
    NotFound,
    /// The delivery comes from outside `WEBHOOK_ALLOWED_SOURCES` (see [`crate::sources`]).
    #[error("deliveries from this source are not accepted")]
    SourceNotAllowed,
    #[error("the Stripe-Signature header is missing")]
    MissingSignature,
    #[error("the Stripe-Signature header is malformed")]
    MalformedSignature,
    #[error("no signature matches a secret of this endpoint")]
    InvalidSignature,
    #[error("the signature's timestamp is outside the tolerance")]
    OutsideTolerance,
    #[error("the body is over the size limit")]
    BodyTooLarge,
    #[error("the body could not be read")]
    UnreadableBody,
    /// Verified, but not a Stripe event (no JSON object with `id` and `type`).
    #[error("{0}")]
    MalformedEvent(String),
    /// Kafka did not acknowledge in time; a redelivery may succeed.
    #[error("kafka did not acknowledge the event in time; deliver again later")]
    KafkaUnavailable,
    /// PostgreSQL (secrets, deduplication log) did not answer; a redelivery may succeed.
    #[error("the configuration database is unavailable; deliver again later")]
    PostgresUnavailable,
    /// A failure of ours; the cause is logged, not sent.
    #[error("internal error")]
    Internal,
}

impl From<SignatureError> for WebhookError {
    fn from(error: SignatureError) -> Self {
        match error {
            SignatureError::Malformed => Self::MalformedSignature,
            SignatureError::NoMatch => Self::InvalidSignature,
            SignatureError::OutsideTolerance => Self::OutsideTolerance,
        }
    }
}

impl WebhookError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::SourceNotAllowed => "source_not_allowed",
            Self::MissingSignature => "missing_signature",
            Self::MalformedSignature => "malformed_signature",
            Self::InvalidSignature => "invalid_signature",
            Self::OutsideTolerance => "timestamp_outside_tolerance",
            Self::BodyTooLarge => "body_too_large",
            Self::UnreadableBody => "unreadable_body",
            Self::MalformedEvent(_) => "malformed_event",
            Self::KafkaUnavailable => "kafka_unavailable",
            Self::PostgresUnavailable => "postgres_unavailable",
            Self::Internal => "internal",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::SourceNotAllowed => StatusCode::FORBIDDEN,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::KafkaUnavailable | Self::PostgresUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    /// A failure of ours: logs `cause` (which may hold internal detail) and answers 500.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error relaying a webhook");
        Self::Internal
    }

    /// One value of each variant, to register every metrics series at zero.
    pub(crate) fn examples() -> [WebhookError; 12] {
        [
            Self::NotFound,
            Self::SourceNotAllowed,
            Self::MissingSignature,
            Self::MalformedSignature,
            Self::InvalidSignature,
            Self::OutsideTolerance,
            Self::BodyTooLarge,
            Self::UnreadableBody,
            Self::MalformedEvent(String::new()),
            Self::KafkaUnavailable,
            Self::PostgresUnavailable,
            Self::Internal,
        ]
    }
}

impl IntoResponse for WebhookError {
    fn into_response(self) -> Response {
        let message = match &self {
            Self::Internal => "internal error; the delivery may be retried".to_owned(),
            other => other.to_string(),
        };
        let mut error = ApiError::new(self.status(), self.code(), message);
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            error.retry_after = Some(RETRY_AFTER_SECONDS);
        }
        error.into_response()
    }
}
