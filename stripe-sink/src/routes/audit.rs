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
use super::query::{
    invalid_parameter, list_query, parse_limit, parse_row_id, ListQuery, QueryPairs,
};
use super::AppState;

const DEFAULT_LIMIT: u32 = 20;

/// `?limit=&before=&action=`.
impl ListQuery for AuditQuery {
    const PARAMETERS: &'static [&'static str] = &["limit", "before", "action"];

    fn defaults() -> Self {
        AuditQuery {
            limit: DEFAULT_LIMIT,
            before: None,
            action: None,
        }
    }

    fn read(&mut self, name: &str, value: &str) -> Result<(), ApiError> {
        match name {
            "limit" => self.limit = parse_limit(value)?,
            "before" => {
                self.before = Some(parse_row_id(
                    value,
                    "before must be the id of a row of the audit trail",
                )?)
            }
            "action" => {
                if !ACTIONS.contains(&value) {
                    return Err(invalid_parameter(format!(
                        "action must be one of: {}",
                        ACTIONS.join(", ")
                    )));
                }
                self.action = Some(value.to_owned());
            }
            _ => {}
        }
        Ok(())
    }
}

/// 200 `{"data": [{"id", "occurred_at", "actor": {"kind", "subject", "ref"}, "action",
/// "target", "details"}], "has_more"}`.
pub async fn list(
    State(state): State<AppState>,
    scope: TenantScope,
    query: QueryPairs,
) -> Result<Json<AuditPage>, RouteError> {
    let query: AuditQuery = list_query(query)?;
    Ok(Json(audit::list(&state.pool, &scope, &query).await?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::query::from_strs;

    #[test]
    fn parameters() {
        let q = from_strs::<AuditQuery>(&[]).unwrap();
        assert_eq!((q.limit, q.before, q.action), (DEFAULT_LIMIT, None, None));
        let q = from_strs::<AuditQuery>(&[
            ("limit", "5"),
            ("before", "42"),
            ("action", "api_key.decrypted"),
        ])
        .unwrap();
        assert_eq!(q.limit, 5);
        assert_eq!(q.before, Some(42));
        assert_eq!(q.action.as_deref(), Some("api_key.decrypted"));
        for bad in [("limit", "0"), ("before", "x"), ("action", "everything")] {
            assert_eq!(
                from_strs::<AuditQuery>(&[bad]).unwrap_err().code,
                "invalid_parameter"
            );
        }
    }
}
