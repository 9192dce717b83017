//! `POST /v1/events` and `POST /v1/events/bulk`.
//!
//! Both answer 202 only after Kafka acknowledged every event they accepted. A bulk request is
//! validated all-or-nothing: one invalid event refuses the whole request with a 400 listing
//! every problem by index, and nothing is written. Writing is per event: when Kafka fails for
//! some events the answer is 503 naming the indexes that were NOT stored; retrying those (or
//! the whole request, when it carries client ids) is safe because an event id counts once.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use meterline_common::api::{ApiError, ErrorDetail, JsonBody};
use meterline_common::auth::TenantScope;
use meterline_schemas::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::AppState;
use crate::events::{accept, accept_raw, Accepted, EventInput};
use crate::kafka::WriteError;
use crate::metrics;

#[derive(Debug, Serialize)]
pub struct StoredEvent {
    pub id: String,
    /// True when the request carried no id and this one was generated.
    pub id_generated: bool,
}

impl From<&Accepted> for StoredEvent {
    fn from(a: &Accepted) -> Self {
        Self {
            id: a.event.id.as_str().to_owned(),
            id_generated: a.id_generated,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct BulkStored {
    pub accepted: usize,
    pub events: Vec<StoredEvent>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkInput {
    /// Kept raw so that each event is parsed on its own and its problem reported by index.
    events: Vec<Box<RawValue>>,
}

/// Seconds a client should wait before retrying after Kafka failed us.
const RETRY_AFTER_SECONDS: u64 = 5;

pub async fn create_one(
    State(state): State<AppState>,
    scope: TenantScope,
    body: Result<JsonBody<EventInput>, ApiError>,
) -> Result<(StatusCode, Json<StoredEvent>), ApiError> {
    let JsonBody(input) = body.inspect_err(|e| metrics::rejected(e.code, 1))?;
    let accepted =
        accept(input, &scope, Timestamp::now(), state.limits.max_future).map_err(|e| {
            metrics::rejected(e.code, 1);
            ApiError::bad_request(e.code, e.message)
        })?;
    let outcome = state
        .writer
        .write_all(std::slice::from_ref(&accepted.event))
        .await;
    match outcome.first() {
        Some(Ok(())) => Ok((StatusCode::ACCEPTED, Json(StoredEvent::from(&accepted)))),
        Some(Err(e)) => Err(write_failed(*e, 1, 1, Vec::new())),
        None => Err(ApiError::internal(&"the writer returned no outcome")),
    }
}

pub async fn create_bulk(
    State(state): State<AppState>,
    scope: TenantScope,
    body: Result<JsonBody<BulkInput>, ApiError>,
) -> Result<(StatusCode, Json<BulkStored>), ApiError> {
    let JsonBody(input) = body.inspect_err(|e| metrics::rejected(e.code, 1))?;
    let limits = state.limits;
    if input.events.is_empty() {
        metrics::rejected("empty_batch", 1);
        return Err(ApiError::bad_request("empty_batch", "events is empty"));
    }
    if input.events.len() > limits.max_bulk_events {
        metrics::rejected("too_many_events", input.events.len() as u64);
        return Err(ApiError::bad_request(
            "too_many_events",
            format!(
                "{} events in one request; at most {}",
                input.events.len(),
                limits.max_bulk_events
            ),
        ));
    }
    let now = Timestamp::now();
    let mut accepted = Vec::with_capacity(input.events.len());
    let mut problems = Vec::new();
    for (index, raw) in input.events.iter().enumerate() {
        match accept_raw(
            raw.get(),
            &scope,
            now,
            limits.max_future,
            limits.max_event_body_bytes,
        ) {
            Ok(a) => accepted.push(a),
            Err(e) => problems.push(e.at(index)),
        }
    }
    if !problems.is_empty() {
        for p in &problems {
            metrics::rejected(p.code, 1);
        }
        // The valid ones are refused too: all-or-nothing validation.
        metrics::rejected("batch_invalid", accepted.len() as u64);
        return Err(ApiError::bad_request(
            "invalid_events",
            format!(
                "{} of {} events are invalid; nothing was written",
                problems.len(),
                input.events.len()
            ),
        )
        .with_details(problems));
    }

    let events: Vec<_> = accepted.iter().map(|a| a.event.clone()).collect();
    let outcomes = state.writer.write_all(&events).await;
    let failed: Vec<(usize, WriteError)> = outcomes
        .iter()
        .enumerate()
        .filter_map(|(i, o)| o.err().map(|e| (i, e)))
        .collect();
    if let Some((_, first)) = failed.first() {
        let details = failed
            .iter()
            .map(|(index, e)| ErrorDetail {
                index: *index,
                code: "not_stored",
                message: e.to_string(),
            })
            .collect();
        return Err(write_failed(*first, failed.len(), events.len(), details));
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(BulkStored {
            accepted: accepted.len(),
            events: accepted.iter().map(StoredEvent::from).collect(),
        }),
    ))
}

fn write_failed(
    kind: WriteError,
    failed: usize,
    total: usize,
    details: Vec<ErrorDetail>,
) -> ApiError {
    let error = match kind {
        WriteError::Unavailable => ApiError::unavailable(
            "kafka_unavailable",
            format!(
                "{failed} of {total} events were not stored: kafka did not acknowledge them in \
                 time; retry them with the same ids (an id counts once)"
            ),
            RETRY_AFTER_SECONDS,
        ),
        WriteError::Refused => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "kafka_refused",
            format!("{failed} of {total} events were refused by kafka (too large?)"),
        ),
    };
    error.with_details(details)
}
