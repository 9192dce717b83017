//! The control API's one error vocabulary: every handler answers `Result<_, RouteError>`,
//! and every failure reaches the client through the one `IntoResponse` below, in the shared
//! JSON shape of [`ApiError`].
//!
//! Rules kept here:
//! - A refusal the handler words itself (a bad parameter, a missing row) is an [`ApiError`]
//!   and passes through unchanged. A value that broke its rule (a body field, a path segment,
//!   a sync route's query) is refused as 400 `invalid_value` ([`invalid_value`]); a list
//!   route's query has its own codes ([`super::query`]).
//! - A store error that is the client's doing (a mapping conflict, an unknown meter) becomes
//!   its 4xx here, in one place, so every route answers it the same way.
//! - Any other failure (a database, a decryption, a dependency) is ours: its cause goes to
//!   the log and the client gets the generic 500 of [`ApiError::internal`], never a detail
//!   that could carry a secret.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use meterline_accounts::stripe_config::ConfigStoreError;
use meterline_catalog::window_sizes::WindowSizeError;
use meterline_common::api::ApiError;

use crate::mappings::MappingError;

/// Why a control API request was not served.
#[derive(Debug)]
pub struct RouteError(ApiError);

impl RouteError {
    /// The answer this error gives.
    pub fn answer(&self) -> &ApiError {
        &self.0
    }
}

/// 400 `invalid_value`: a value of the request (a body field, a path segment, a sync route's
/// query) broke its rule, which `message` states.
pub fn invalid_value(message: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request("invalid_value", message.to_string())
}

impl IntoResponse for RouteError {
    fn into_response(self) -> Response {
        self.0.into_response()
    }
}

impl From<ApiError> for RouteError {
    fn from(error: ApiError) -> Self {
        Self(error)
    }
}

impl From<MappingError> for RouteError {
    fn from(e: MappingError) -> Self {
        let conflict = |code| ApiError::new(StatusCode::CONFLICT, code, e.to_string());
        Self(match &e {
            MappingError::MeterAlreadyMapped(_) => conflict("meter_already_mapped"),
            MappingError::ProviderMeterAlreadyMapped { .. } => {
                conflict("provider_meter_already_mapped")
            }
            MappingError::CustomerAlreadyMapped { .. } => conflict("customer_already_mapped"),
            MappingError::ProviderCustomerAlreadyMapped { .. } => {
                conflict("provider_customer_already_mapped")
            }
            MappingError::ProviderCustomerDeleted(_) => conflict("provider_customer_deleted"),
            MappingError::Database(_) | MappingError::Corrupt(_) => ApiError::internal(&e),
        })
    }
}

/// Failures that are ours whatever the request: answered as the generic 500.
macro_rules! internal_errors {
    ($($error:ty),* $(,)?) => {$(
        impl From<$error> for RouteError {
            fn from(e: $error) -> Self {
                Self(ApiError::internal(&e))
            }
        }
    )*};
}

internal_errors!(
    crate::Error,
    ConfigStoreError,
    WindowSizeError,
    meterline_catalog::meters::MeterStoreError,
    meterline_common::Error,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_refusals_are_4xx_and_our_failures_a_generic_500() {
        let taken = RouteError::from(MappingError::MeterAlreadyMapped("calls".into()));
        assert_eq!(taken.answer().status, StatusCode::CONFLICT);
        assert_eq!(taken.answer().code, "meter_already_mapped");
        let ours = RouteError::from(crate::Error::Corrupt("sk_live_secret in a row".into()));
        assert_eq!(ours.answer().status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(ours.answer().code, "internal");
        assert!(!ours.answer().message.contains("sk_live"));
    }
}
