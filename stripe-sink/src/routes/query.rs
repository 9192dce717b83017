//! The query strings of the list routes (`GET /v1/stripe/audit`,
//! `/v1/stripe/customers/mapping`, `/v1/stripe/customers/unmapped`): how a query is read and
//! what a bad one answers, written once for every list.
//!
//! Rules kept here:
//! - A list names the parameters it takes ([`ListQuery::PARAMETERS`]); any other is 400
//!   `unknown_parameter`, and one given twice is 400 `invalid_parameter`: all names are checked
//!   before any value is read.
//! - Values are read in the order given, each by its list's rule; a bad one is 400
//!   `invalid_parameter`.
//! - `limit` is a page size from 1 to [`MAX_PAGE`] in every list ([`parse_limit`]); a list is
//!   paged from a row id (`before`, `starting_after`) read by [`parse_row_id`].
//!
//! The sync routes read their queries as typed structs and answer `invalid_value`
//! ([`super::sync`]): their parameters are not these.

use axum::extract::rejection::QueryRejection;
use axum::extract::Query;
use meterline_common::api::ApiError;

use crate::mappings::MAX_PAGE;

/// A list route's query as axum extracts it: pairs in the order given, or why they are not.
pub type QueryPairs = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// The query of one list route: the parameters it takes, its defaults and how each parameter
/// is read.
pub trait ListQuery: Sized {
    /// The names of the parameters the list takes.
    const PARAMETERS: &'static [&'static str];

    /// The query of a request that gives no parameter.
    fn defaults() -> Self;

    /// Reads one parameter, whose name is one of [`Self::PARAMETERS`].
    fn read(&mut self, name: &str, value: &str) -> Result<(), ApiError>;
}

/// The list query of a request: its names checked ([`query_pairs`]), then its values read.
pub fn list_query<Q: ListQuery>(query: QueryPairs) -> Result<Q, ApiError> {
    from_pairs(&query_pairs(query, Q::PARAMETERS)?)
}

/// A list query from pairs whose names are checked: the defaults, then each pair read in order.
fn from_pairs<Q: ListQuery>(pairs: &[(String, String)]) -> Result<Q, ApiError> {
    let mut query = Q::defaults();
    for (name, value) in pairs {
        query.read(name, value)?;
    }
    Ok(query)
}

/// Query parameters as pairs, each name at most once and among `allowed`.
pub fn query_pairs(query: QueryPairs, allowed: &[&str]) -> Result<Vec<(String, String)>, ApiError> {
    let Query(pairs) = query.map_err(|e| invalid_parameter(e.body_text()))?;
    for (i, (name, _)) in pairs.iter().enumerate() {
        if !allowed.contains(&name.as_str()) {
            return Err(ApiError::bad_request(
                "unknown_parameter",
                format!(
                    "unknown query parameter {name:?}; allowed: {}",
                    allowed.join(", ")
                ),
            ));
        }
        if pairs[..i].iter().any(|(other, _)| other == name) {
            return Err(invalid_parameter(format!(
                "query parameter {name:?} given more than once"
            )));
        }
    }
    Ok(pairs)
}

/// 400 `invalid_parameter`: a parameter's value broke its rule, which `message` states.
pub fn invalid_parameter(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_parameter", message)
}

/// `limit`: a page size from 1 to [`MAX_PAGE`].
pub fn parse_limit(value: &str) -> Result<u32, ApiError> {
    value
        .parse::<u32>()
        .ok()
        .filter(|l| (1..=MAX_PAGE).contains(l))
        .ok_or_else(|| {
            invalid_parameter(format!("limit must be a whole number from 1 to {MAX_PAGE}"))
        })
}

/// The id of a row a list is paged from (`before`, `starting_after`); `refusal` says what the
/// list's ids are.
pub fn parse_row_id(value: &str, refusal: &'static str) -> Result<i64, ApiError> {
    value.parse::<i64>().map_err(|_| invalid_parameter(refusal))
}

/// The list query of `pairs`, as a request naming them reads it: for tests of a list's rules.
#[cfg(test)]
pub(crate) fn from_strs<Q: ListQuery>(pairs: &[(&str, &str)]) -> Result<Q, ApiError> {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
    from_pairs(&pairs)
}
