//! Stripe's API, as the sink uses it: one typed client, and a classification of every answer
//! into what the sink does next.
//!
//! Rule kept here: an answer is classified by what Stripe documents, never guessed from the
//! message: 2xx accepted; a 400 naming our identifier means the event is already recorded
//! (a success, not a failure); 401/403 is an authentication problem of the account; 429, 409
//! (an earlier request with the same key still running), 5xx, timeouts and dropped
//! connections are worth retrying, unless
//! Stripe says `Stripe-Should-Retry: false`; any other 4xx is permanent, unless Stripe says
//! `Stripe-Should-Retry: true`. No request or error text here carries the API key.

use std::time::Duration;

use meterline_accounts::stripe_config::StripeApiKey;
use meterline_schemas::StripeFormula;
use reqwest::header::HeaderMap;
use serde::Deserialize;

/// What to do after a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// 5xx, timeouts, dropped connections: try again later.
    Retriable,
    /// 409: an earlier request with the same Idempotency-Key is still running at Stripe
    /// (ours timed out first); try again a little later with the same key.
    InProgress,
    /// 429: over the rate limit; try again later, more slowly.
    RateLimited,
    /// 401/403: the key does not work; no retry helps until the configuration changes.
    Authentication,
    /// Any other refusal: this request will never succeed as it is.
    Permanent,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stripe {}: {message}", status.map(|s| s.to_string()).unwrap_or_else(|| "unreachable".into()))]
pub struct StripeError {
    pub class: ErrorClass,
    pub status: Option<u16>,
    pub code: Option<String>,
    pub message: String,
    /// From `Retry-After`, when Stripe sent one.
    pub retry_after: Option<Duration>,
}

impl StripeError {
    pub fn is_retriable(&self) -> bool {
        matches!(
            self.class,
            ErrorClass::Retriable | ErrorClass::RateLimited | ErrorClass::InProgress
        )
    }
}

/// One meter event to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterEvent {
    /// The Stripe meter's `event_name`.
    pub event_name: String,
    /// `cus_...`
    pub customer: String,
    /// A whole number, possibly negative (a correction).
    pub value: i64,
    /// Deterministic: Stripe counts an identifier once (for at least 24 h).
    pub identifier: String,
    /// The Idempotency-Key of this attempt.
    pub idempotency_key: String,
    /// Unix seconds, inside the window.
    pub timestamp: i64,
}

/// How Stripe answered a meter event that did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Accepted now (or replayed by the Idempotency-Key).
    Accepted,
    /// Refused as a duplicate identifier: Stripe already holds this very event.
    AlreadyRecorded,
}

#[derive(Clone)]
pub struct StripeClient {
    http: reqwest::Client,
    base: String,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    code: Option<String>,
    message: Option<String>,
    param: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct MeterList {
    data: Vec<Meter>,
    has_more: bool,
}

#[derive(Deserialize)]
struct Meter {
    id: String,
    event_name: String,
    default_aggregation: Option<DefaultAggregation>,
}

#[derive(Deserialize)]
struct DefaultAggregation {
    formula: String,
}

/// A Stripe meter as the sink needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeMeter {
    /// `mtr_...`.
    pub id: String,
    /// Its `default_aggregation.formula`; `None` for a formula this sink does not know.
    pub formula: Option<StripeFormula>,
}

/// One page of `GET /v1/customers`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CustomerPage {
    pub data: Vec<ListedCustomer>,
    pub has_more: bool,
}

/// One page of `GET /v1/subscriptions`: each subscription as Stripe sends it, read by
/// [`crate::mappings::periods_of`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SubscriptionPage {
    pub data: Vec<serde_json::Map<String, serde_json::Value>>,
    pub has_more: bool,
}

/// A customer as Stripe lists it: what an import reads of it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ListedCustomer {
    pub id: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub livemode: bool,
    /// Stripe's metadata is string to string; anything else is kept to be judged invalid.
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct SummaryList {
    data: Vec<Summary>,
    has_more: bool,
}

#[derive(Deserialize)]
struct Summary {
    id: String,
    aggregated_value: f64,
}

impl StripeClient {
    pub fn new(base: &str, timeout: Duration) -> Result<Self, reqwest::Error> {
        Ok(Self {
            http: reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(timeout.min(Duration::from_secs(10)))
                .build()?,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    /// `POST /v1/billing/meter_events` with the event's Idempotency-Key.
    pub async fn create_meter_event(
        &self,
        key: &StripeApiKey,
        event: &MeterEvent,
    ) -> Result<Recorded, StripeError> {
        let form = [
            ("event_name", event.event_name.clone()),
            ("payload[stripe_customer_id]", event.customer.clone()),
            ("payload[value]", event.value.to_string()),
            ("identifier", event.identifier.clone()),
            ("timestamp", event.timestamp.to_string()),
        ];
        let sent = self
            .http
            .post(format!("{}/v1/billing/meter_events", self.base))
            .bearer_auth(key.expose())
            .header("Idempotency-Key", &event.idempotency_key)
            .form(&form)
            .send()
            .await;
        let response = sent.map_err(transport_error)?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(Recorded::Accepted);
        }
        let headers = response.headers().clone();
        let body = response.bytes().await.unwrap_or_default();
        let error = classify(status, &headers, &body);
        if status == 400 && names_identifier(&body, &event.identifier) {
            return Ok(Recorded::AlreadyRecorded);
        }
        Err(error)
    }

    /// One page of the account's customers, newest first: `GET /v1/customers` with `limit`
    /// and, after the first page, `starting_after` (the last customer of the page before).
    pub async fn list_customers(
        &self,
        key: &StripeApiKey,
        starting_after: Option<&str>,
        limit: u32,
    ) -> Result<CustomerPage, StripeError> {
        let mut query = vec![("limit", limit.to_string())];
        if let Some(after) = starting_after {
            query.push(("starting_after", after.to_owned()));
        }
        let body = self.get(key, "/v1/customers", &query).await?;
        parse(&body)
    }

    /// One page of the account's subscriptions of every status, newest first:
    /// `GET /v1/subscriptions?status=all` with `limit` and, after the first page,
    /// `starting_after` (the last subscription of the page before).
    pub async fn list_subscriptions(
        &self,
        key: &StripeApiKey,
        starting_after: Option<&str>,
        limit: u32,
    ) -> Result<SubscriptionPage, StripeError> {
        let mut query = vec![("limit", limit.to_string()), ("status", "all".to_owned())];
        if let Some(after) = starting_after {
            query.push(("starting_after", after.to_owned()));
        }
        let body = self.get(key, "/v1/subscriptions", &query).await?;
        parse(&body)
    }

    /// `GET /v1/balance`: does the key work?
    pub async fn check_key(&self, key: &StripeApiKey) -> Result<(), StripeError> {
        self.get(key, "/v1/balance", &[]).await.map(|_| ())
    }

    /// `GET /v1/account`: the id (`acct_...`) of the account the key belongs to. Stripe's
    /// rate limits are the account's, shared by all its keys.
    pub async fn account_id(&self, key: &StripeApiKey) -> Result<String, StripeError> {
        #[derive(Deserialize)]
        struct Account {
            id: String,
        }
        let body = self.get(key, "/v1/account", &[]).await?;
        parse::<Account>(&body).map(|account| account.id)
    }

    /// `GET /v2/core/events/{id}`: a thin event with its details (`data`).
    pub async fn fetch_event(
        &self,
        key: &StripeApiKey,
        event_id: &str,
    ) -> Result<serde_json::Value, StripeError> {
        let body = self
            .get(key, &format!("/v2/core/events/{event_id}"), &[])
            .await?;
        parse(&body)
    }

    /// The meter whose event_name is `event_name`, if any: its id and formula.
    pub async fn find_meter(
        &self,
        key: &StripeApiKey,
        event_name: &str,
    ) -> Result<Option<StripeMeter>, StripeError> {
        let mut starting_after: Option<String> = None;
        loop {
            let mut query = vec![("limit", "100".to_owned())];
            if let Some(after) = &starting_after {
                query.push(("starting_after", after.clone()));
            }
            let body = self.get(key, "/v1/billing/meters", &query).await?;
            let list: MeterList = parse(&body)?;
            if let Some(m) = list.data.iter().find(|m| m.event_name == event_name) {
                return Ok(Some(StripeMeter {
                    id: m.id.clone(),
                    formula: m
                        .default_aggregation
                        .as_ref()
                        .and_then(|a| StripeFormula::parse(&a.formula)),
                }));
            }
            match (list.has_more, list.data.last()) {
                (true, Some(last)) => starting_after = Some(last.id.clone()),
                _ => return Ok(None),
            }
        }
    }

    /// The sum of a meter's event summaries for one customer over `[start, end)` (Unix
    /// seconds): what Stripe will bill.
    pub async fn summarised_total(
        &self,
        key: &StripeApiKey,
        meter_id: &str,
        customer: &str,
        start: i64,
        end: i64,
    ) -> Result<f64, StripeError> {
        let mut total = 0.0;
        let mut starting_after: Option<String> = None;
        loop {
            let mut query = vec![
                ("customer", customer.to_owned()),
                ("start_time", start.to_string()),
                ("end_time", end.to_string()),
                ("limit", "100".to_owned()),
            ];
            if let Some(after) = &starting_after {
                query.push(("starting_after", after.clone()));
            }
            let body = self
                .get(
                    key,
                    &format!("/v1/billing/meters/{meter_id}/event_summaries"),
                    &query,
                )
                .await?;
            let list: SummaryList = parse(&body)?;
            total += list.data.iter().map(|s| s.aggregated_value).sum::<f64>();
            match (list.has_more, list.data.last()) {
                (true, Some(last)) => starting_after = Some(last.id.clone()),
                _ => return Ok(total),
            }
        }
    }

    async fn get(
        &self,
        key: &StripeApiKey,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<bytes::Bytes, StripeError> {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(key.expose())
            .query(query)
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(transport_error)?;
        if (200..300).contains(&status) {
            Ok(body)
        } else {
            Err(classify(status, &headers, &body))
        }
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, StripeError> {
    serde_json::from_slice(body).map_err(|e| StripeError {
        class: ErrorClass::Retriable,
        status: Some(200),
        code: None,
        message: format!("unexpected answer: {e}"),
        retry_after: None,
    })
}

fn transport_error(e: reqwest::Error) -> StripeError {
    // reqwest's text names the URL (our Stripe base), never the key, which travels in a header.
    StripeError {
        class: ErrorClass::Retriable,
        status: None,
        code: None,
        message: if e.is_timeout() {
            "request timed out".to_owned()
        } else {
            format!("request failed: {e}")
        },
        retry_after: None,
    }
}

/// Does Stripe's 400 say this identifier was already used?
fn names_identifier(body: &[u8], identifier: &str) -> bool {
    serde_json::from_slice::<ErrorBody>(body)
        .map(|b| {
            b.error.param.as_deref() == Some("identifier")
                || b.error
                    .message
                    .as_deref()
                    .is_some_and(|m| m.contains(identifier))
        })
        .unwrap_or(false)
}

/// Classifies a non-2xx answer.
pub fn classify(status: u16, headers: &HeaderMap, body: &[u8]) -> StripeError {
    let detail = serde_json::from_slice::<ErrorBody>(body)
        .ok()
        .map(|b| b.error);
    let should_retry = headers
        .get("stripe-should-retry")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.eq_ignore_ascii_case("true"));
    let retry_after = headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let class = match status {
        401 | 403 => ErrorClass::Authentication,
        429 => ErrorClass::RateLimited,
        409 => ErrorClass::InProgress,
        _ if should_retry == Some(false) => ErrorClass::Permanent,
        _ if should_retry == Some(true) => ErrorClass::Retriable,
        500..=599 => ErrorClass::Retriable,
        _ => ErrorClass::Permanent,
    };
    let message = detail
        .as_ref()
        .and_then(|d| d.message.clone())
        .unwrap_or_else(|| format!("http {status}"));
    let code = detail
        .as_ref()
        .and_then(|d| d.code.clone().or_else(|| d.kind.clone()));
    StripeError {
        class,
        status: Some(status),
        code,
        message,
        retry_after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn classification_follows_stripes_rules() {
        let body = br#"{"error":{"type":"invalid_request_error","code":"x","message":"m"}}"#;
        type Case = (u16, &'static [(&'static str, &'static str)], ErrorClass);
        let cases: &[Case] = &[
            (400, &[], ErrorClass::Permanent),
            (
                400,
                &[("stripe-should-retry", "true")],
                ErrorClass::Retriable,
            ),
            (401, &[], ErrorClass::Authentication),
            (403, &[], ErrorClass::Authentication),
            (404, &[], ErrorClass::Permanent),
            (409, &[], ErrorClass::InProgress),
            (
                409,
                &[("stripe-should-retry", "true")],
                ErrorClass::InProgress,
            ),
            (429, &[], ErrorClass::RateLimited),
            (500, &[], ErrorClass::Retriable),
            (
                503,
                &[("stripe-should-retry", "false")],
                ErrorClass::Permanent,
            ),
        ];
        for (status, h, class) in cases {
            let e = classify(*status, &headers(h), body);
            assert_eq!(e.class, *class, "{status} {h:?}");
            assert_eq!(e.message, "m");
        }
        let e = classify(429, &headers(&[("retry-after", "3")]), b"not json");
        assert_eq!(e.retry_after, Some(Duration::from_secs(3)));
        assert_eq!(e.message, "http 429");
    }

    #[test]
    fn customer_pages_parse_as_stripe_sends_them() {
        let body = br#"{"object":"list","url":"/v1/customers","has_more":true,"data":[
            {"id":"cus_1","object":"customer","email":"a@example.com","name":null,
             "livemode":false,"metadata":{"external_id":"c-1"}},
            {"id":"cus_2","object":"customer","metadata":{}}]}"#;
        let page: CustomerPage = parse(body).unwrap();
        assert!(page.has_more);
        assert_eq!(page.data[0].metadata["external_id"], "c-1");
        assert_eq!(page.data[1].email, None);
        assert!(parse::<CustomerPage>(b"{}").is_err());
    }

    #[test]
    fn a_duplicate_identifier_is_recognised() {
        let by_param = br#"{"error":{"param":"identifier","message":"An event with identifier ml_1 already exists."}}"#;
        assert!(names_identifier(by_param, "ml_1"));
        let by_message = br#"{"error":{"message":"identifier ml_1 was already used"}}"#;
        assert!(names_identifier(by_message, "ml_1"));
        let other = br#"{"error":{"param":"timestamp","message":"too old"}}"#;
        assert!(!names_identifier(other, "ml_1"));
    }

    /// Stripe's API is HTTPS only: the client must speak TLS to an `https://` base. A local
    /// listener sees what the client sends first: a TLS handshake record (0x16, version 3.x),
    /// not an HTTP request line, and not a refusal to try.
    #[tokio::test]
    async fn https_bases_are_spoken_to_over_tls() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = StripeClient::new(&format!("https://{addr}"), Duration::from_secs(5)).unwrap();
        let request = tokio::spawn(async move {
            // No TLS server answers, so the request fails; what it sent first is the point.
            let _ = client
                .http
                .get(format!("{}/v1/customers", client.base))
                .send()
                .await;
        });
        // A client built without TLS never connects (it refuses the scheme).
        let (mut socket, _) = tokio::time::timeout(Duration::from_secs(30), listener.accept())
            .await
            .expect("the client connected")
            .unwrap();
        let mut first = [0u8; 2];
        socket.read_exact(&mut first).await.unwrap();
        assert_eq!(first, [0x16, 0x03], "a TLS handshake record");
        drop(socket);
        request.await.unwrap();
    }
}
