//! Bearer JWT authentication: HS256 tokens carrying `tenant_id`, `environment_id` and `exp`.
//!
//! The token is the only source of a request's tenant and environment: handlers take a
//! [`TenantScope`] and every query and write is scoped by it, never by anything in the body.
//! Only HS256 is accepted (an `alg: none` or RS256 token is refused), and `exp` is required.
//! A token is refused before its `nbf` (not before) and when it lives longer than
//! `JWT_MAX_LIFETIME_HOURS` (default 720, 30 days): from its `iat` to its `exp`, or, without
//! an `iat`, from now to its `exp`. A stolen token is then worth at most that long.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{FromRef, FromRequestParts};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use meterline_schemas::{EnvironmentId, TenantId};
use serde::{Deserialize, Serialize};

use crate::api::ApiError;
use crate::config::{ConfigError, Env};

/// Shortest accepted `JWT_SECRET`: HS256 with a short secret can be brute-forced offline.
pub const MIN_SECRET_BYTES: usize = 32;

/// `JWT_MAX_LIFETIME_HOURS` when unset: 30 days, a producer's token rotated monthly.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(720 * 3600);

/// Clocks of token issuers drift a little; a few seconds, not the library's minute.
const LEEWAY_SECONDS: u64 = 5;

/// The keys that sign and verify tokens, from `JWT_SECRET`.
#[derive(Clone)]
pub struct JwtKeys {
    inner: Arc<Keys>,
}

struct Keys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    max_lifetime: Duration,
}

impl std::fmt::Debug for JwtKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JwtKeys(<redacted>)")
    }
}

impl JwtKeys {
    /// Keys from `secret`, accepting tokens of up to [`DEFAULT_MAX_LIFETIME`].
    pub fn new(secret: &[u8]) -> Self {
        Self::with_max_lifetime(secret, DEFAULT_MAX_LIFETIME)
    }

    /// Keys from `secret`, accepting tokens that live at most `max_lifetime`.
    pub fn with_max_lifetime(secret: &[u8], max_lifetime: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECONDS;
        Self {
            inner: Arc::new(Keys {
                encoding: EncodingKey::from_secret(secret),
                decoding: DecodingKey::from_secret(secret),
                validation,
                max_lifetime,
            }),
        }
    }

    /// `JWT_SECRET`, required, at least [`MIN_SECRET_BYTES`] long, and
    /// `JWT_MAX_LIFETIME_HOURS` (default 720, 1 to 87600).
    pub fn from_env(env: &Env<'_>) -> Result<Self, ConfigError> {
        let secret = env.required("JWT_SECRET")?;
        if secret.len() < MIN_SECRET_BYTES {
            return Err(ConfigError::Malformed {
                var: "JWT_SECRET",
                reason: format!("must be at least {MIN_SECRET_BYTES} bytes"),
            });
        }
        let hours = env.u64_in_range(
            "JWT_MAX_LIFETIME_HOURS",
            DEFAULT_MAX_LIFETIME.as_secs() / 3600,
            1..=87_600,
        )?;
        Ok(Self::with_max_lifetime(
            secret.as_bytes(),
            Duration::from_secs(hours * 3600),
        ))
    }

    /// The longest lifetime a token may have.
    pub fn max_lifetime(&self) -> Duration {
        self.inner.max_lifetime
    }

    /// Verifies a token and returns whose it is.
    pub fn verify(&self, token: &str) -> Result<TenantScope, AuthError> {
        // A header that does not parse is a garbled token; a JSON error after it parsed (and
        // the signature verified) is about the claims.
        jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.inner.decoding, &self.inner.validation)
                .map_err(|e| match e.kind() {
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                    ErrorKind::InvalidSignature => AuthError::BadSignature,
                    ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                        AuthError::BadSignature
                    }
                    ErrorKind::MissingRequiredClaim(_) | ErrorKind::Json(_) => AuthError::BadClaims,
                    _ => AuthError::Malformed,
                })?;
        let claims = data.claims;
        let scope = TenantScope {
            tenant_id: TenantId::parse(&claims.tenant_id).map_err(|_| AuthError::BadClaims)?,
            environment_id: EnvironmentId::parse(&claims.environment_id)
                .map_err(|_| AuthError::BadClaims)?,
            subject: claims.sub,
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        // Issued "later" than now is a token not valid yet, as a future `nbf` is.
        if claims
            .iat
            .is_some_and(|iat| iat > now + LEEWAY_SECONDS as i64)
        {
            return Err(AuthError::NotYetValid);
        }
        // Saturating: the claims are whatever numbers the signer wrote.
        let lifetime = claims.exp.saturating_sub(claims.iat.unwrap_or(now));
        if lifetime > self.inner.max_lifetime.as_secs() as i64 {
            return Err(AuthError::LifetimeTooLong);
        }
        Ok(scope)
    }

    /// Signs a token for `scope` valid for `ttl` (the dev command and tests mint with this).
    pub fn mint(&self, scope: &TenantScope, ttl: Duration) -> String {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        self.mint_with_expiry(scope, now + ttl.as_secs() as i64)
    }

    /// Signs a token expiring at `exp` (Unix seconds): lets tests make expired tokens.
    pub fn mint_with_expiry(&self, scope: &TenantScope, exp: i64) -> String {
        self.mint_claims(scope, None, exp)
    }

    /// Signs a token valid from `nbf` to `exp` (Unix seconds): lets tests make tokens that
    /// are not valid yet.
    pub fn mint_valid_from(&self, scope: &TenantScope, nbf: i64, exp: i64) -> String {
        self.mint_claims(scope, Some(nbf), exp)
    }

    fn mint_claims(&self, scope: &TenantScope, nbf: Option<i64>, exp: i64) -> String {
        let claims = Claims {
            tenant_id: scope.tenant_id.as_str().to_owned(),
            environment_id: scope.environment_id.as_str().to_owned(),
            exp,
            iat: Some(time::OffsetDateTime::now_utc().unix_timestamp()),
            nbf,
            sub: scope.subject.clone(),
        };
        // Encoding a struct of strings and integers with HMAC cannot fail.
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.inner.encoding,
        )
        .unwrap_or_else(|e| unreachable!("HS256 encoding of plain claims failed: {e}"))
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    tenant_id: String,
    environment_id: String,
    exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<i64>,
    /// Checked by the library (`validate_nbf`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<String>,
}

/// Who is calling: the tenant and environment every query is scoped by, and the token's
/// subject (for the audit trail), if it had one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantScope {
    pub tenant_id: TenantId,
    pub environment_id: EnvironmentId,
    pub subject: Option<String>,
}

/// Why a request was not authenticated. Each maps to a 401 with a stable code; none says
/// more than needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("malformed bearer token")]
    Malformed,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet (nbf or iat in the future)")]
    NotYetValid,
    #[error("token lifetime (exp - iat) exceeds JWT_MAX_LIFETIME_HOURS")]
    LifetimeTooLong,
    #[error("token signature invalid")]
    BadSignature,
    #[error("token claims invalid: tenant_id, environment_id and exp are required")]
    BadClaims,
}

impl AuthError {
    /// Every variant, so that each `reason` series can be registered before the first failure.
    pub const ALL: [AuthError; 7] = [
        AuthError::Missing,
        AuthError::Malformed,
        AuthError::Expired,
        AuthError::NotYetValid,
        AuthError::LifetimeTooLong,
        AuthError::BadSignature,
        AuthError::BadClaims,
    ];

    /// The stable error code of the 401 answer, also the `reason` label of [`AUTH_FAILURES`].
    pub fn code(self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Malformed => "malformed_token",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::LifetimeTooLong => "token_lifetime_too_long",
            AuthError::BadSignature => "invalid_token",
            AuthError::BadClaims => "invalid_claims",
        }
    }
}

pub use crate::metrics::AUTH_FAILURES;

/// Describes [`AUTH_FAILURES`] and registers each `reason` at zero, so that dashboards and
/// alerts see the series before the first refusal. Called by the services that authenticate.
pub fn describe_metrics() {
    crate::metrics::describe_auth_failures(AuthError::ALL.iter().map(|e| e.code()));
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let code = e.code();
        crate::metrics::auth_failure(code);
        ApiError::unauthorized(code, e.to_string())
    }
}

impl<S> FromRequestParts<S> for TenantScope
where
    JwtKeys: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .ok_or(AuthError::Missing)?
            .to_str()
            .map_err(|_| AuthError::Malformed)?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::Malformed)?;
        Ok(JwtKeys::from_ref(state).verify(token)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(tenant: &str) -> TenantScope {
        TenantScope {
            tenant_id: TenantId::parse(tenant).unwrap(),
            environment_id: EnvironmentId::parse("env_prod").unwrap(),
            subject: Some("ops@example.com".into()),
        }
    }

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn a_minted_token_verifies_to_its_scope() {
        let keys = JwtKeys::new(SECRET);
        let token = keys.mint(&scope("tenant_123"), Duration::from_secs(60));
        assert_eq!(keys.verify(&token).unwrap(), scope("tenant_123"));
    }

    #[test]
    fn refusals() {
        let keys = JwtKeys::new(SECRET);
        let other = JwtKeys::new(b"another-secret-another-secret-xx");
        let expired = keys.mint_with_expiry(&scope("t"), 1_000_000);
        assert_eq!(keys.verify(&expired), Err(AuthError::Expired));
        let forged = other.mint(&scope("t"), Duration::from_secs(60));
        assert_eq!(keys.verify(&forged), Err(AuthError::BadSignature));
        assert_eq!(keys.verify("garbage"), Err(AuthError::Malformed));

        // alg none: header {"alg":"none"}, claims valid, no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJ0ZW5hbnRfaWQiOiJ0IiwiZW52aXJvbm1lbnRfaWQiOiJlIiwiZXhwIjo5OTk5OTk5OTk5fQ.";
        assert!(keys.verify(none).is_err());

        // Valid signature, but no exp / a tenant id that is not a valid identifier.
        let no_exp = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"tenant_id": "t", "environment_id": "e"}),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(keys.verify(&no_exp), Err(AuthError::BadClaims));
        let bad_tenant = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"tenant_id": "a b", "environment_id": "e", "exp": 9_999_999_999i64}),
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        assert_eq!(keys.verify(&bad_tenant), Err(AuthError::BadClaims));
    }

    #[test]
    fn a_token_before_its_time_or_living_too_long_is_refused() {
        let keys = JwtKeys::with_max_lifetime(SECRET, Duration::from_secs(3600));
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let later = keys.mint_valid_from(&scope("t"), now + 600, now + 1200);
        assert_eq!(keys.verify(&later), Err(AuthError::NotYetValid));
        let started = keys.mint_valid_from(&scope("t"), now - 60, now + 1200);
        assert_eq!(keys.verify(&started).unwrap(), scope("t"));

        let long = keys.mint(&scope("t"), Duration::from_secs(7200));
        assert_eq!(keys.verify(&long), Err(AuthError::LifetimeTooLong));
        let short = keys.mint(&scope("t"), Duration::from_secs(1800));
        assert_eq!(keys.verify(&short).unwrap(), scope("t"));

        let claims = |extra: serde_json::Value| {
            let mut c = serde_json::json!({"tenant_id": "t", "environment_id": "env_prod"});
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &c,
                &EncodingKey::from_secret(SECRET),
            )
            .unwrap()
        };
        // Without an iat, the lifetime left counts.
        let no_iat = claims(serde_json::json!({"exp": now + 7200}));
        assert_eq!(keys.verify(&no_iat), Err(AuthError::LifetimeTooLong));
        // Issued in the future.
        let future_iat = claims(serde_json::json!({"exp": now + 1800, "iat": now + 600}));
        assert_eq!(keys.verify(&future_iat), Err(AuthError::NotYetValid));
        // Extreme numbers are refused, not overflowed.
        let extreme = claims(serde_json::json!({"exp": i64::MAX, "iat": i64::MIN}));
        assert_eq!(keys.verify(&extreme), Err(AuthError::LifetimeTooLong));
    }

    #[test]
    fn the_maximum_lifetime_is_configured_in_hours_within_bounds() {
        let secret = "0123456789abcdef0123456789abcdef";
        let default = [("JWT_SECRET", secret)];
        let keys = JwtKeys::from_env(&Env::new(&default)).unwrap();
        assert_eq!(keys.max_lifetime(), DEFAULT_MAX_LIFETIME);
        let day = [("JWT_SECRET", secret), ("JWT_MAX_LIFETIME_HOURS", "24")];
        let keys = JwtKeys::from_env(&Env::new(&day)).unwrap();
        assert_eq!(keys.max_lifetime(), Duration::from_secs(86_400));
        for bad in ["0", "87601", "a day"] {
            let src = [("JWT_SECRET", secret), ("JWT_MAX_LIFETIME_HOURS", bad)];
            let err = JwtKeys::from_env(&Env::new(&src)).unwrap_err();
            assert!(
                err.to_string().contains("JWT_MAX_LIFETIME_HOURS"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn short_secrets_are_refused_and_never_printed() {
        let src = [("JWT_SECRET", "short")];
        let err = JwtKeys::from_env(&Env::new(&src)).unwrap_err();
        assert!(err.to_string().contains("JWT_SECRET"));
        assert!(!err.to_string().contains("short\""));
        let keys = JwtKeys::new(SECRET);
        assert!(!format!("{keys:?}").contains("0123"));
    }
}
