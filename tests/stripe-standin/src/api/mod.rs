//! The Stripe API surface (`/v1/...`, `/v2/...`) and the one pipeline every API request goes
//! through, in Stripe's order: route → authenticate → count → rate limit / injected 429 →
//! decode parameters → `Idempotency-Key` (replay or refuse) → injected 500 or the handler →
//! store the answer under the key (2xx and 500 only: validation failures are not stored) →
//! optionally drop the connection instead of answering.

mod customers;
mod meter_events;
mod meters;
pub mod params;
mod subscriptions;
mod v2;
mod webhook_endpoints;

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::error::Error;
use crate::form::decode_form;
use crate::rules::{IDENTIFIER_WINDOW_SECS, LIVE_METER_EVENTS_PER_SEC};
use crate::server::DropConnection;
use crate::state::{App, Fault, IdempotencyEntry};
use params::Params;

/// Every API route the stand-in serves.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Balance,
    Account,
    CustomerCreate,
    CustomerList,
    CustomerGet(String),
    CustomerUpdate(String),
    CustomerDelete(String),
    WebhookEndpointCreate,
    WebhookEndpointList,
    WebhookEndpointGet(String),
    MeterCreate,
    MeterList,
    MeterGet(String),
    MeterEventSummaries(String),
    MeterEventCreate,
    MeterEventAdjustmentCreate,
    SubscriptionList,
    V2SessionCreate,
    V2Stream,
    V2EventGet(String),
}

fn route(method: &Method, path: &str) -> Option<Route> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let get = *method == Method::GET;
    let post = *method == Method::POST;
    let delete = *method == Method::DELETE;
    let id = |s: &str| s.to_string();
    Some(match segments.as_slice() {
        ["v1", "balance"] if get => Route::Balance,
        ["v1", "account"] if get => Route::Account,
        ["v1", "customers"] if post => Route::CustomerCreate,
        ["v1", "customers"] if get => Route::CustomerList,
        ["v1", "customers", c] if get => Route::CustomerGet(id(c)),
        ["v1", "customers", c] if post => Route::CustomerUpdate(id(c)),
        ["v1", "customers", c] if delete => Route::CustomerDelete(id(c)),
        ["v1", "webhook_endpoints"] if post => Route::WebhookEndpointCreate,
        ["v1", "webhook_endpoints"] if get => Route::WebhookEndpointList,
        ["v1", "webhook_endpoints", w] if get => Route::WebhookEndpointGet(id(w)),
        ["v1", "billing", "meters"] if post => Route::MeterCreate,
        ["v1", "billing", "meters"] if get => Route::MeterList,
        ["v1", "billing", "meters", m] if get => Route::MeterGet(id(m)),
        ["v1", "billing", "meters", m, "event_summaries"] if get => {
            Route::MeterEventSummaries(id(m))
        }
        ["v1", "billing", "meter_events"] if post => Route::MeterEventCreate,
        ["v1", "billing", "meter_event_adjustments"] if post => Route::MeterEventAdjustmentCreate,
        ["v1", "subscriptions"] if get => Route::SubscriptionList,
        ["v2", "billing", "meter_event_session"] if post => Route::V2SessionCreate,
        ["v2", "billing", "meter_event_stream"] if post => Route::V2Stream,
        ["v2", "core", "events", e] if get => Route::V2EventGet(id(e)),
        _ => return None,
    })
}

/// What a handler knows about the request besides its parameters.
pub struct Ctx {
    pub app: App,
    /// The authenticated account's handle: the key into `Inner::accounts`, which is the
    /// secret key it was created with.
    pub key: String,
    pub livemode: bool,
    /// Injected slowness: meter events sleep while holding their (customer, meter) slot.
    pub delay: Option<Duration>,
}

/// Decoded request input: form parameters for v1, JSON for v2.
pub enum Input {
    Form(Params),
    Json(Value),
}

impl Input {
    fn fingerprint(&self) -> String {
        match self {
            Input::Form(p) => p.fingerprint(),
            Input::Json(v) => v.to_string(),
        }
    }

    fn form(self) -> Params {
        match self {
            Input::Form(p) => p,
            Input::Json(_) => Params::default(),
        }
    }
}

/// The fallback handler: every request outside `/_standin` lands here.
pub async fn handle(
    State(app): State<App>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let arrived_ms = crate::state::system_ms();
    let path = uri.path().to_string();
    // The work runs in its own task, as at Stripe: a client that gives up (a timeout) or a
    // dropped connection does not cancel it, so its result is still stored under its
    // Idempotency-Key and its (customer, meter) slot is released.
    let work = {
        let method = method.clone();
        tokio::spawn(async move { run(app, &method, &uri, &headers, body, arrived_ms).await })
    };
    let (mut response, drop_connection) = match work.await {
        Ok(done) => done,
        Err(e) => {
            tracing::error!(error = %e, "request task failed");
            (StatusCode::INTERNAL_SERVER_ERROR.into_response(), false)
        }
    };
    let request_id = format!("req_{}", &uuid::Uuid::new_v4().simple().to_string()[..14]);
    tracing::info!(
        method = %method,
        path = %path,
        status = response.status().as_u16(),
        request_id = %request_id,
        dropped = drop_connection,
        "api request"
    );
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("request-id", v);
    }
    if drop_connection {
        response.extensions_mut().insert(DropConnection);
    }
    response
}

async fn run(
    app: App,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
    arrived_ms: i64,
) -> (Response, bool) {
    let path = uri.path();
    let Some(route) = route(method, path) else {
        let err = Error::InvalidRequest {
            status: StatusCode::NOT_FOUND,
            code: None,
            message: format!("Unrecognized request URL ({method}: {path})."),
            param: None,
        };
        return (err.into_response(), false);
    };

    let (key, livemode) = match authenticate(&app, &route, headers) {
        Ok(found) => found,
        Err(e) => return (e.into_response(), false),
    };

    // Count the request, draw a fault, apply the account's limiter.
    let fault = {
        let mut inner = app.lock();
        let now_ms = inner.now_ms();
        let arrived_on_clock_ms = inner.on_clock_ms(arrived_ms);
        let now = inner.now();
        let faults = inner.faults.clone();
        let fault = faults.draw(path, &mut inner.rng);
        let Some(account) = inner.accounts.get_mut(&key) else {
            return (
                Error::unauthorized(None, "account removed").into_response(),
                false,
            );
        };
        *account.stats.requests_per_second.entry(now).or_default() += 1;
        if route == Route::MeterEventCreate {
            account.stats.meter_requests_ms.push(arrived_on_clock_ms);
        }
        // The v2 stream lives on its own host with its own (much higher) limit. In live mode,
        // v1 meter events have their own limit outside the basic one; in test mode they count
        // toward the basic limit like any write.
        if route != Route::V2Stream {
            let (window, limit) = if account.livemode && route == Route::MeterEventCreate {
                (&mut account.live_meter_events, LIVE_METER_EVENTS_PER_SEC)
            } else if *method == Method::GET {
                (&mut account.reads, account.rate_limit)
            } else {
                (&mut account.writes, account.rate_limit)
            };
            if !window.admit(now_ms, limit) {
                return (rate_limited().into_response(), false);
            }
        }
        fault
    };
    if fault == Some(Fault::TooManyRequests) {
        app.lock().faults_injected.too_many_requests += 1;
        return (rate_limited().into_response(), false);
    }
    let drop_connection = fault == Some(Fault::Drop);
    if drop_connection {
        app.lock().faults_injected.dropped += 1;
    }

    let input = match decode_input(&route, uri, &body) {
        Ok(input) => input,
        Err(e) => return (e.into_response(), drop_connection),
    };

    // Idempotency: POSTs only, keyed per account.
    let idempotency_key = match idempotency_key(method, headers) {
        Ok(k) => k,
        Err(e) => return (e.into_response(), drop_connection),
    };
    let fingerprint = format!("{method} {path} {}", input.fingerprint());
    if let Some(idem) = &idempotency_key {
        match begin_idempotent(&app, &key, idem, &fingerprint) {
            Ok(None) => {}
            Ok(Some((status, body))) => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                let mut response = (status, Json(body)).into_response();
                response
                    .headers_mut()
                    .insert("idempotent-replayed", HeaderValue::from_static("true"));
                if let Ok(v) = HeaderValue::from_str(idem) {
                    response.headers_mut().insert("idempotency-key", v);
                }
                return (response, drop_connection);
            }
            Err(e) => return (e.into_response(), drop_connection),
        }
    }

    let delay = match fault {
        Some(Fault::Slow(ms)) => Some(Duration::from_millis(ms)),
        _ => None,
    };
    match fault {
        Some(Fault::Slow(_)) => app.lock().faults_injected.slow += 1,
        Some(Fault::ServerError) => app.lock().faults_injected.server_error += 1,
        _ => {}
    }
    let ctx = Ctx {
        app: app.clone(),
        key: key.clone(),
        livemode,
        delay,
    };
    let result = if fault == Some(Fault::ServerError) {
        Err(Error::InjectedServerError)
    } else {
        if route != Route::MeterEventCreate {
            if let Some(delay) = delay {
                tokio::time::sleep(delay).await;
            }
        }
        dispatch(&ctx, route, input).await
    };

    if let Some(idem) = &idempotency_key {
        finish_idempotent(&app, &key, idem, &result);
    }
    let response = match result {
        Ok(body) => (StatusCode::OK, Json(body)).into_response(),
        Err(e) => e.into_response(),
    };
    (response, drop_connection)
}

async fn dispatch(ctx: &Ctx, route: Route, input: Input) -> Result<Value, Error> {
    match route {
        Route::Balance => {
            input.form().allow(&[])?;
            Ok(balance(ctx.livemode))
        }
        Route::Account => {
            input.form().allow(&[])?;
            account(ctx)
        }
        Route::CustomerCreate => customers::create(ctx, &input.form()),
        Route::CustomerList => customers::list(ctx, &input.form()),
        Route::SubscriptionList => subscriptions::list(ctx, &input.form()),
        Route::CustomerGet(id) => customers::retrieve(ctx, &input.form(), &id),
        Route::CustomerUpdate(id) => customers::update(ctx, &input.form(), &id),
        Route::CustomerDelete(id) => customers::delete(ctx, &input.form(), &id),
        Route::WebhookEndpointCreate => webhook_endpoints::create(ctx, &input.form()),
        Route::WebhookEndpointList => webhook_endpoints::list(ctx, &input.form()),
        Route::WebhookEndpointGet(id) => webhook_endpoints::retrieve(ctx, &input.form(), &id),
        Route::MeterCreate => meters::create(ctx, &input.form()),
        Route::MeterList => meters::list(ctx, &input.form()),
        Route::MeterGet(id) => meters::retrieve(ctx, &input.form(), &id),
        Route::MeterEventSummaries(id) => meters::event_summaries(ctx, &input.form(), &id),
        Route::MeterEventCreate => meter_events::create(ctx, &input.form()).await,
        Route::MeterEventAdjustmentCreate => meter_events::adjust(ctx, &input.form()),
        Route::V2SessionCreate => v2::create_session(ctx),
        Route::V2Stream => match input {
            Input::Json(body) => v2::stream(ctx, &body),
            Input::Form(_) => Err(v2::bad_body("expected a JSON body")),
        },
        Route::V2EventGet(id) => v2::retrieve_event(ctx, &id),
    }
}

fn balance(livemode: bool) -> Value {
    let zero = json!([{ "amount": 0, "currency": "usd", "source_types": { "card": 0 } }]);
    json!({
        "object": "balance",
        "available": zero,
        "connect_reserved": [{ "amount": 0, "currency": "usd" }],
        "livemode": livemode,
        "pending": zero
    })
}

/// `GET /v1/account`: the authenticated account, with the fields an integration reads.
fn account(ctx: &Ctx) -> Result<Value, Error> {
    let inner = ctx.app.lock();
    let account = inner
        .accounts
        .get(&ctx.key)
        .ok_or_else(|| Error::unauthorized(None, "account removed"))?;
    Ok(json!({
        "id": account.id,
        "object": "account",
        "type": "standard",
        "country": "US",
        "default_currency": "usd",
        "charges_enabled": true,
        "payouts_enabled": true,
        "details_submitted": true,
        "metadata": {}
    }))
}

fn rate_limited() -> Error {
    Error::TooManyRequests {
        code: "rate_limit",
        message: "Request rate limit exceeded. Learn more about rate limits here https://stripe.com/docs/rate-limits.".to_string(),
    }
}

/// Secret key (v1, v2 session) or session token (v2 stream) → (account key, livemode).
fn authenticate(app: &App, route: &Route, headers: &HeaderMap) -> Result<(String, bool), Error> {
    let credential = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(credential_from_header);
    let inner = app.lock();
    if *route == Route::V2Stream {
        let Some(token) = credential else {
            return Err(Error::unauthorized(
                None,
                "Missing meter event session token in the Authorization header",
            ));
        };
        let Some(session) = inner.sessions.get(&token) else {
            return Err(Error::unauthorized(
                None,
                "Invalid meter event session token",
            ));
        };
        if inner.now() >= session.expires_at {
            return Err(Error::unauthorized(
                Some("billing_meter_event_session_expired"),
                "The meter event session has expired; create a new one",
            ));
        }
        let key = session.account_key.clone();
        let livemode = inner.accounts.get(&key).is_some_and(|a| a.livemode);
        return Ok((key, livemode));
    }
    let Some(key) = credential else {
        return Err(Error::unauthorized(
            None,
            "You did not provide an API key. You need to provide your API key in the Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').",
        ));
    };
    match inner.api_keys.get(&key) {
        Some(handle) => {
            let livemode = inner.accounts.get(handle).is_some_and(|a| a.livemode);
            Ok((handle.clone(), livemode))
        }
        None if inner.expired_keys.contains(&key) => Err(Error::unauthorized(
            Some("api_key_expired"),
            format!("Expired API Key provided: {}", redact(&key)),
        )),
        None => Err(Error::unauthorized(
            None,
            format!("Invalid API Key provided: {}", redact(&key)),
        )),
    }
}

/// `Bearer <key>` or `Basic base64(<key>:)` (what `curl -u sk_test_...:` sends).
fn credential_from_header(value: &str) -> Option<String> {
    if let Some(token) = value.strip_prefix("Bearer ") {
        return Some(token.trim().to_string()).filter(|t| !t.is_empty());
    }
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(base64_decode(encoded.trim())?).ok()?;
    let user = decoded.split(':').next()?;
    Some(user.to_string()).filter(|u| !u.is_empty())
}

/// Standard base64 with optional padding; None on any other byte.
fn base64_decode(input: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in input.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Stripe shows only the key's prefix and last four characters.
fn redact(key: &str) -> String {
    let prefix: String = key.chars().take(8).collect();
    let tail: String = key
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("{prefix}********{tail}")
}

fn decode_input(route: &Route, uri: &Uri, body: &Bytes) -> Result<Input, Error> {
    match route {
        Route::V2SessionCreate | Route::V2Stream => {
            if body.is_empty() {
                return Ok(Input::Json(json!({})));
            }
            serde_json::from_slice(body)
                .map(Input::Json)
                .map_err(|e| v2::bad_body(&format!("invalid JSON body: {e}")))
        }
        Route::V2EventGet(_) => Ok(Input::Json(json!({}))),
        _ => {
            // GETs carry parameters in the query string, the rest in the form body.
            let raw = if body.is_empty() {
                uri.query().unwrap_or("").as_bytes()
            } else {
                &body[..]
            };
            Ok(Input::Form(Params::from_form(decode_form(raw)?)))
        }
    }
}

fn idempotency_key(method: &Method, headers: &HeaderMap) -> Result<Option<String>, Error> {
    if *method != Method::POST {
        return Ok(None);
    }
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value.to_str().unwrap_or("").to_string();
    if key.is_empty() || key.len() > 255 {
        return Err(Error::bad_value(
            "Idempotency-Key must be 1 to 255 characters",
            "Idempotency-Key",
        ));
    }
    Ok(Some(key))
}

/// Ok(None): a fresh key, now marked in flight. Ok(Some): the stored answer to replay.
fn begin_idempotent(
    app: &App,
    key: &str,
    idem: &str,
    fingerprint: &str,
) -> Result<Option<(u16, Value)>, Error> {
    let mut inner = app.lock();
    let now = inner.now();
    let Some(account) = inner.accounts.get_mut(key) else {
        return Ok(None);
    };
    // Keys older than 24 h are forgotten, as Stripe may prune them.
    account
        .idempotency
        .retain(|_, e| now - e.created < IDENTIFIER_WINDOW_SECS);
    match account.idempotency.get(idem) {
        None => {
            account.idempotency.insert(
                idem.to_string(),
                IdempotencyEntry {
                    fingerprint: fingerprint.to_string(),
                    created: now,
                    response: None,
                },
            );
            Ok(None)
        }
        Some(entry) if entry.fingerprint != fingerprint => Err(Error::Idempotency {
            status: StatusCode::BAD_REQUEST,
            code: None,
            message: format!(
                "Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{idem}' if you meant to execute a different request."
            ),
        }),
        Some(IdempotencyEntry {
            response: Some(stored),
            ..
        }) => Ok(Some(stored.clone())),
        Some(_) => Err(Error::Idempotency {
            status: StatusCode::CONFLICT,
            code: Some("idempotency_key_in_use"),
            message: "There is currently another in-progress request using this Idempotent Key (that probably means you submitted twice, and the other request is still going through). Please try again later.".to_string(),
        }),
    }
}

/// Stores a 2xx or an (injected) 500 under the key; anything else frees the key again.
fn finish_idempotent(app: &App, key: &str, idem: &str, result: &Result<Value, Error>) {
    let mut inner = app.lock();
    let Some(account) = inner.accounts.get_mut(key) else {
        return;
    };
    let stored = match result {
        Ok(body) => Some((200, body.clone())),
        Err(e @ Error::InjectedServerError) => Some((e.status().as_u16(), e.body())),
        Err(_) => None,
    };
    match stored {
        Some(stored) => {
            if let Some(entry) = account.idempotency.get_mut(idem) {
                entry.response = Some(stored);
            }
        }
        None => {
            account.idempotency.remove(idem);
        }
    }
}

/// Stripe's list envelope over `items` (already in list order), honouring `limit`
/// (1..=100, default 10), `starting_after` and `ending_before`.
pub fn paginate(params: &Params, url: &str, items: Vec<(String, Value)>) -> Result<Value, Error> {
    let limit = params.int("limit")?.unwrap_or(10);
    if !(1..=100).contains(&limit) {
        return Err(Error::bad_value(
            "Invalid limit: must be between 1 and 100",
            "limit",
        ));
    }
    let limit = limit as usize;
    let position = |param: &str, id: &str| {
        items
            .iter()
            .position(|(item_id, _)| item_id == id)
            .ok_or_else(|| Error::no_such("object", id, param))
    };
    let (data, has_more): (Vec<Value>, bool) = if let Some(after) = params.str("starting_after")? {
        let from = position("starting_after", after)? + 1;
        let rest = &items[from..];
        (
            rest.iter().take(limit).map(|(_, v)| v.clone()).collect(),
            rest.len() > limit,
        )
    } else if let Some(before) = params.str("ending_before")? {
        let to = position("ending_before", before)?;
        let from = to.saturating_sub(limit);
        (
            items[from..to].iter().map(|(_, v)| v.clone()).collect(),
            from > 0,
        )
    } else {
        (
            items.iter().take(limit).map(|(_, v)| v.clone()).collect(),
            items.len() > limit,
        )
    };
    Ok(json!({ "object": "list", "url": url, "has_more": has_more, "data": data }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_match_stripe_paths() {
        assert_eq!(
            route(&Method::GET, "/v1/billing/meters/mtr_1/event_summaries"),
            Some(Route::MeterEventSummaries("mtr_1".into()))
        );
        assert_eq!(
            route(&Method::POST, "/v1/billing/meter_events"),
            Some(Route::MeterEventCreate)
        );
        // Stripe's v1 API has no batch endpoint.
        assert_eq!(route(&Method::POST, "/v1/billing/meter_events/batch"), None);
        assert_eq!(route(&Method::PUT, "/v1/customers"), None);
        assert_eq!(
            route(&Method::GET, "/v1/subscriptions"),
            Some(Route::SubscriptionList)
        );
        // Subscriptions are made through test control (the stand-in has no prices).
        assert_eq!(route(&Method::POST, "/v1/subscriptions"), None);
    }

    #[test]
    fn credentials_from_bearer_and_basic() {
        assert_eq!(
            credential_from_header("Bearer sk_test_a").as_deref(),
            Some("sk_test_a")
        );
        // base64("sk_test_a:") = c2tfdGVzdF9hOg==
        assert_eq!(
            credential_from_header("Basic c2tfdGVzdF9hOg==").as_deref(),
            Some("sk_test_a")
        );
        assert_eq!(credential_from_header("Basic !!"), None);
        assert_eq!(credential_from_header("Bearer "), None);
    }

    #[test]
    fn pagination_pages_forward() {
        let items: Vec<_> = (0..5)
            .map(|i| (format!("id{i}"), json!({ "id": format!("id{i}") })))
            .collect();
        let p = |raw: &str| Params::from_form(decode_form(raw.as_bytes()).unwrap());
        let first = paginate(&p("limit=2"), "/x", items.clone()).unwrap();
        assert_eq!(first["has_more"], true);
        assert_eq!(first["data"][1]["id"], "id1");
        let last = paginate(&p("limit=2&starting_after=id3"), "/x", items.clone()).unwrap();
        assert_eq!(last["has_more"], false);
        assert_eq!(last["data"][0]["id"], "id4");
        assert!(paginate(&p("limit=0"), "/x", items.clone()).is_err());
        assert!(paginate(&p("starting_after=nope"), "/x", items).is_err());
    }
}
