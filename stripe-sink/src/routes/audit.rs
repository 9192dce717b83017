//! `GET /v1/stripe/audit`: the audit trail of the caller's tenant and environment, newest
//! first ([`meterline_accounts::audit`]): configuration, mapping and encryption key changes and
//! API key decryptions, with who (actor kind, token subject) and when. No row holds a secret.
//!
//! Query: `limit` (1..=100, default 20), `before` (a row id: older rows only), `action`
//! (one action only). Refusals: 400 `unknown_parameter`, `invalid_parameter`.

use axum::extract::State;
use axum::Json;
use meterline_accounts::audit::{self, AuditPage, AuditQuery, ACTIONS};
use meterline_common::api::ApiError;
use meterline_common::auth::TenantScope;

use super::error::RouteError;
use super::mappings::{parse_limit, query_pairs, QueryPairs};
use super::AppState;

const DEFAULT_LIMIT: u32 = 20;

/// Reads `?limit=&before=&action=`.
pub fn audit_query(pairs: &[(String, String)]) -> Result<AuditQuery, ApiError> {
    let mut query = AuditQuery {
        limit: DEFAULT_LIMIT,
        before: None,
        action: None,
    };
    for (name, value) in pairs {
        match name.as_str() {
            "limit" => query.limit = parse_limit(value)?,
            "before" => {
                query.before = Some(value.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(
                        "invalid_parameter",
                        "before must be the id of a row of the audit trail",
                    )
                })?)
            }
            "action" => {
                if !ACTIONS.contains(&value.as_str()) {
                    return Err(ApiError::bad_request(
                        "invalid_parameter",
                        format!("action must be one of: {}", ACTIONS.join(", ")),
                    ));
                }
                query.action = Some(value.clone());
            }
            _ => {}
        }
    }
    Ok(query)
}

/// 200 `{"data": [{"id", "occurred_at", "actor": {"kind", "subject", "ref"}, "action",
/// "target", "details"}], "has_more"}`.
pub async fn list(
    State(state): State<AppState>,
    scope: TenantScope,
    query: QueryPairs,
) -> Result<Json<AuditPage>, RouteError> {
    let pairs = query_pairs(query, &["limit", "before", "action"])?;
    let query = audit_query(&pairs)?;
    Ok(Json(audit::list(&state.pool, &scope, &query).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parameters() {
        let q = audit_query(&pairs(&[])).unwrap();
        assert_eq!((q.limit, q.before, q.action), (DEFAULT_LIMIT, None, None));
        let q = audit_query(&pairs(&[
            ("limit", "5"),
            ("before", "42"),
            ("action", "api_key.decrypted"),
        ]))
        .unwrap();
        assert_eq!(q.limit, 5);
        assert_eq!(q.before, Some(42));
        assert_eq!(q.action.as_deref(), Some("api_key.decrypted"));
        for bad in [("limit", "0"), ("before", "x"), ("action", "everything")] {
            assert_eq!(
                audit_query(&pairs(&[bad])).unwrap_err().code,
                "invalid_parameter"
            );
        }
    }
}
