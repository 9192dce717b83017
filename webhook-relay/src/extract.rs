//! [`VerifiedDelivery`]: the extractor that turns a request into a Stripe event whose
//! signature verified, or refuses it.
//!
//! Rule kept here: the signature is checked over the raw body bytes before anything parses
//! them as JSON (see [`crate::signature`]). Cheap checks come first (the address, then the
//! header), then the endpoint's secrets, then the body (bounded by the route's
//! `DefaultBodyLimit`), then the signature, and only then the JSON.

use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::StatusCode;
use bytes::Bytes;
use meterline_accounts::stripe_config::WebhookSecret;
use meterline_schemas::{EnvironmentId, TenantId, Timestamp};

use crate::error::WebhookError;
use crate::event::StripeEvent;
use crate::metrics;
use crate::routes::AppState;
use crate::signature::{self, SignatureHeader};

pub const SIGNATURE_HEADER: &str = "stripe-signature";

/// A delivery whose signature verified against its tenant environment's secrets.
#[derive(Debug)]
pub struct VerifiedDelivery {
    pub tenant_id: TenantId,
    pub environment_id: EnvironmentId,
    pub event: StripeEvent,
    pub received_at: Timestamp,
}

impl FromRequest<AppState> for VerifiedDelivery {
    type Rejection = WebhookError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, WebhookError> {
        let received_at = Timestamp::now();
        metrics::received();
        let (mut parts, body) = req.into_parts();
        let Path((tenant, environment)) =
            Path::<(String, String)>::from_request_parts(&mut parts, state)
                .await
                .map_err(|_| WebhookError::NotFound)?;
        let (Ok(tenant_id), Ok(environment_id)) =
            (TenantId::parse(&tenant), EnvironmentId::parse(&environment))
        else {
            return Err(WebhookError::NotFound);
        };
        let header = parts
            .headers
            .get(SIGNATURE_HEADER)
            .ok_or(WebhookError::MissingSignature)?;
        let header = SignatureHeader::parse(header.as_bytes())?;
        let secrets = state
            .secrets
            .for_endpoint(&tenant_id, &environment_id)
            .await?
            .ok_or(WebhookError::NotFound)?;
        let body = Bytes::from_request(Request::from_parts(parts, body), state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    WebhookError::BodyTooLarge
                } else {
                    WebhookError::UnreadableBody
                }
            })?;
        signature::verify(
            &header,
            &body,
            secrets.iter().map(WebhookSecret::expose),
            received_at.unix_timestamp(),
            state.tolerance_seconds,
        )?;
        metrics::verified();
        let event = StripeEvent::parse(&body, received_at).map_err(WebhookError::MalformedEvent)?;
        Ok(Self {
            tenant_id,
            environment_id,
            event,
            received_at,
        })
    }
}
