//! `GET /v1/usage?customer_id=&meter_id=&from=&to=&window=`: the per-window totals of one
//! customer and meter, as the sync computes and sends them.
//!
//! Rules kept here:
//! - The tenant and environment come only from the token; the query names neither.
//! - Every parameter is parsed into its type before anything is read, and every refusal is a
//!   4xx JSON error with a stable code: `unknown_parameter`, `invalid_query`,
//!   `missing_parameter`, `invalid_value`, `invalid_range`, `invalid_window`,
//!   `range_too_wide`, `unknown_meter`.
//! - Totals come from [`window_totals`], the one definition the aggregator's windows share:
//!   deduplicated rows (`FINAL`), the meter's aggregation, and, unless `window` is given,
//!   the tenant's own window sizes, so a total here equals the one published for Stripe.
//!
//! The answer lists every window that overlaps `[from, to)` and has usage, whole (a window is
//! never cut at `from` or `to`: what is billed is the whole window), in time order.

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::Json;
use meterline_catalog::meter_versions;
use meterline_catalog::window_sizes;
use meterline_catalog::window_totals::{self, PlanError, WindowPlan};
use meterline_common::api::ApiError;
use meterline_common::auth::TenantScope;
use meterline_schemas::{CustomerId, Decimal, MeterId, TimeRange, Timestamp};
use serde::{Deserialize, Serialize};

use super::AppState;

/// The most windows one answer may cover: a year of daily windows, or 83 days of hourly ones.
pub const MAX_WINDOWS: usize = 2000;

/// Window sizes a query may ask for, in minutes: one minute to one day.
pub const WINDOW_MINUTES: std::ops::RangeInclusive<u32> = 1..=1440;

/// Seconds a client should wait after ClickHouse did not answer.
const RETRY_AFTER_SECONDS: u64 = 5;

/// The query string as sent: every value text, so that each can be refused with its own code.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParams {
    customer_id: Option<String>,
    meter_id: Option<String>,
    from: Option<String>,
    to: Option<String>,
    window: Option<String>,
}

/// A valid usage query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    pub customer_id: CustomerId,
    pub meter_id: MeterId,
    pub range: TimeRange,
    /// Minutes; `None`: the tenant's own window sizes.
    pub window_minutes: Option<u32>,
}

impl UsageQuery {
    /// Parses the query string of `uri`.
    pub fn parse(uri: &Uri) -> Result<Self, ApiError> {
        let raw: RawParams = serde_urlencoded_query(uri.query().unwrap_or(""))?;
        let required = |value: Option<String>, name: &str| {
            value.filter(|v| !v.is_empty()).ok_or_else(|| {
                ApiError::bad_request("missing_parameter", format!("{name} is required"))
            })
        };
        let invalid = |e: meterline_schemas::SchemaError| {
            ApiError::bad_request("invalid_value", e.to_string())
        };
        let customer_id =
            CustomerId::parse(&required(raw.customer_id, "customer_id")?).map_err(invalid)?;
        let meter_id = MeterId::parse(&required(raw.meter_id, "meter_id")?).map_err(invalid)?;
        let from = Timestamp::parse(&required(raw.from, "from")?).map_err(invalid)?;
        let to = Timestamp::parse(&required(raw.to, "to")?).map_err(invalid)?;
        let range = TimeRange::new(from, to)
            .map_err(|_| ApiError::bad_request("invalid_range", "from must be before to"))?;
        let window_minutes = raw
            .window
            .map(|text| {
                text.parse::<u32>()
                    .ok()
                    .filter(|m| WINDOW_MINUTES.contains(m))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_window",
                            format!(
                                "window must be a whole number of minutes from {} to {}",
                                WINDOW_MINUTES.start(),
                                WINDOW_MINUTES.end()
                            ),
                        )
                    })
            })
            .transpose()?;
        Ok(Self {
            customer_id,
            meter_id,
            range,
            window_minutes,
        })
    }
}

fn serde_urlencoded_query(query: &str) -> Result<RawParams, ApiError> {
    let uri: Uri = format!("/?{query}")
        .parse()
        .map_err(|_| ApiError::bad_request("invalid_query", "the query string is malformed"))?;
    axum::extract::Query::<RawParams>::try_from_uri(&uri)
        .map(|q| q.0)
        .map_err(|rejection| {
            let text = rejection.body_text();
            // serde's message names the parameter and the ones accepted.
            let code = if text.contains("unknown field") {
                "unknown_parameter"
            } else {
                "invalid_query"
            };
            ApiError::bad_request(code, text)
        })
}

/// One window's total.
#[derive(Debug, Serialize)]
pub struct WindowUsage {
    pub window_start: Timestamp,
    pub window_end: Timestamp,
    pub window_minutes: u32,
    /// The meter's aggregate over the window, exact (as published on `usage.windows`); a
    /// string, like every decimal of our wire formats.
    pub quantity: Decimal,
    /// Distinct events in the window.
    pub event_count: u64,
    /// The aggregation the window counts under, for a meter whose aggregation changed (the
    /// definition in force at the window's start); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aggregation: Option<&'static str>,
}

/// The answer.
#[derive(Debug, Serialize)]
pub struct UsageAnswer {
    pub customer_id: CustomerId,
    pub meter_id: MeterId,
    /// The meter's aggregation (`COUNT`, `SUM`, ...).
    pub aggregation: &'static str,
    pub from: Timestamp,
    pub to: Timestamp,
    /// The size asked for, or `null` when the tenant's own sizes were used.
    pub window_minutes: Option<u32>,
    pub data: Vec<WindowUsage>,
}

/// 200 with the totals; 4xx for a bad query or an unknown meter; 503 `clickhouse_unavailable`
/// when ClickHouse does not answer.
pub async fn get_usage(
    State(state): State<AppState>,
    scope: TenantScope,
    uri: Uri,
) -> Result<Json<UsageAnswer>, ApiError> {
    let query = UsageQuery::parse(&uri)?;
    let meter = match state.meters.get(&scope, &query.meter_id).await {
        Ok(Some(stored)) => stored.definition,
        Ok(None) => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_meter",
                format!("no meter {}", query.meter_id),
            ))
        }
        Err(e) => return Err(ApiError::internal(&e)),
    };
    let plan = match query.window_minutes {
        Some(minutes) => WindowPlan::fixed(&query.range, minutes, MAX_WINDOWS),
        None => {
            let history = window_sizes::load_scope(&state.pool, &scope)
                .await
                .map_err(|e| ApiError::internal(&e))?;
            WindowPlan::of_history(&query.range, &history, MAX_WINDOWS)
        }
    }
    .map_err(|e| match e {
        PlanError::TooManyWindows { max } => ApiError::bad_request(
            "range_too_wide",
            format!("the range covers more than {max} windows; narrow it or use a larger window"),
        ),
        PlanError::OutOfBounds => ApiError::bad_request("invalid_range", e.to_string()),
    })?;
    let totals = window_totals::window_aggregates(
        &state.clickhouse,
        &scope,
        &query.customer_id,
        &query.meter_id,
        &plan,
    )
    .await
    .map_err(|e| {
        tracing::warn!(error = %e, "usage query failed");
        ApiError::unavailable(
            "clickhouse_unavailable",
            "usage totals cannot be read right now; retry later",
            RETRY_AFTER_SECONDS,
        )
    })?;
    let history = meter_versions::load(&state.pool, &scope, &query.meter_id)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    let data = totals
        .into_iter()
        .map(|(window, aggregates)| {
            let (aggregation, _) = history.at(&meter.aggregation, window.start());
            WindowUsage {
                window_start: window.start_timestamp(),
                window_end: window.end_timestamp(),
                window_minutes: window.size_minutes(),
                quantity: aggregates.quantity(aggregation),
                event_count: aggregates.events,
                aggregation: (!history.earlier().is_empty()).then(|| aggregation.kind()),
            }
        })
        .collect();
    Ok(Json(UsageAnswer {
        customer_id: query.customer_id,
        meter_id: query.meter_id,
        aggregation: meter.aggregation.kind(),
        from: query.range.from(),
        to: query.range.to(),
        window_minutes: query.window_minutes,
        data,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(query: &str) -> Result<UsageQuery, &'static str> {
        let uri: Uri = format!("/v1/usage?{query}").parse().unwrap();
        UsageQuery::parse(&uri).map_err(|e| e.code)
    }

    const OK: &str =
        "customer_id=c1&meter_id=calls&from=2026-11-26T10:00:00Z&to=2026-11-26T12:00:00Z";

    #[test]
    fn a_full_query_parses() {
        let q = parse(&format!("{OK}&window=15")).unwrap();
        assert_eq!(q.customer_id.as_str(), "c1");
        assert_eq!(q.meter_id.as_str(), "calls");
        assert_eq!(q.window_minutes, Some(15));
        assert_eq!(q.range.from().to_string(), "2026-11-26T10:00:00Z");
        assert_eq!(parse(OK).unwrap().window_minutes, None);
    }

    #[test]
    fn refusals_have_stable_codes() {
        let cases = [
            ("meter_id=calls&from=2026-11-26T10:00:00Z&to=2026-11-26T12:00:00Z", "missing_parameter"),
            ("customer_id=&meter_id=calls&from=2026-11-26T10:00:00Z&to=2026-11-26T12:00:00Z", "missing_parameter"),
            (&format!("{OK}&tenant_id=other"), "unknown_parameter"),
            ("customer_id=c1&meter_id=calls&from=yesterday&to=2026-11-26T12:00:00Z", "invalid_value"),
            ("customer_id=c1&meter_id=bad%20id&from=2026-11-26T10:00:00Z&to=2026-11-26T12:00:00Z", "invalid_value"),
            ("customer_id=c1&meter_id=calls&from=2026-11-26T12:00:00Z&to=2026-11-26T12:00:00Z", "invalid_range"),
            ("customer_id=c1&meter_id=calls&from=2026-11-26T13:00:00Z&to=2026-11-26T12:00:00Z", "invalid_range"),
            (&format!("{OK}&window=0"), "invalid_window"),
            (&format!("{OK}&window=1441"), "invalid_window"),
            (&format!("{OK}&window=7.5"), "invalid_window"),
            (&format!("{OK}&window=abc"), "invalid_window"),
        ];
        for (query, code) in cases {
            assert_eq!(parse(query).unwrap_err(), code, "{query}");
        }
    }

    #[test]
    fn quantities_are_written_as_strings() {
        let usage = WindowUsage {
            window_start: Timestamp::parse("2026-11-26T10:00:00Z").unwrap(),
            window_end: Timestamp::parse("2026-11-26T11:00:00Z").unwrap(),
            window_minutes: 60,
            quantity: "12.5".parse().unwrap(),
            event_count: 3,
            aggregation: None,
        };
        assert_eq!(
            serde_json::to_value(&usage).unwrap(),
            serde_json::json!({"window_start": "2026-11-26T10:00:00Z",
                "window_end": "2026-11-26T11:00:00Z", "window_minutes": 60,
                "quantity": "12.5", "event_count": 3})
        );
    }
}
