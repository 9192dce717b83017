//! Golden files pin the wire format: a fixed Rust value of each message serialises to exactly
//! `golden/<topic>.v1.json` (the compact JSON value followed by one newline), and parsing that
//! file gives the same value back. A change here is a wire-format change: if it is breaking, it
//! needs a new schema_version instead. `UPDATE_GOLDEN=1 cargo test -p meterline-schemas --test
//! golden` rewrites the files for a deliberate, compatible change.

mod common;

use std::num::NonZeroU32;

use meterline_schemas::{
    CustomerId, Decimal, DlqErrorKind, DlqHeaders, EnvironmentId, EventId, EventName, EventSource,
    JobId, MeterId, RawUsageEvent, ResyncRequest, StripeEventId, StripeEventType, StripeWebhook,
    TenantId, TimeRange, Timestamp, Topic, TopicMessage, Window, WindowReason, WindowTotal,
};
use serde_json::{json, Map, Value};

fn ts(text: &str) -> Timestamp {
    Timestamp::parse(text).expect("valid timestamp")
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn tenant() -> TenantId {
    TenantId::parse("acme").expect("valid")
}

fn env() -> EnvironmentId {
    EnvironmentId::parse("prod").expect("valid")
}

fn customer() -> CustomerId {
    CustomerId::parse("cus_42").expect("valid")
}

fn job() -> JobId {
    JobId::parse("0190c5a2-7b1e-7c3d-9e4f-a1b2c3d4e5f6").expect("valid")
}

fn raw_event() -> RawUsageEvent {
    RawUsageEvent {
        id: EventId::parse("evt_01HX3K8Q").expect("valid"),
        tenant_id: tenant(),
        environment_id: env(),
        customer_id: customer(),
        event_name: EventName::parse("api_call").expect("valid"),
        timestamp: ts("2024-05-01T14:34:56.5+02:00"),
        // Keys in sorted order, so the file reads the same whatever the map's ordering.
        properties: object(json!({"endpoint": "/v1/search", "region": "eu", "tokens": 1520})),
        source: Some(EventSource::parse("billing-sdk/2.3.1").expect("valid")),
        ingested_at: Some(ts("2024-05-01T12:34:56.789Z")),
    }
}

fn window_total() -> WindowTotal {
    WindowTotal {
        tenant_id: tenant(),
        environment_id: env(),
        customer_id: customer(),
        meter_id: MeterId::parse("api_calls").expect("valid"),
        window: Window::new(
            ts("2024-05-01T12:00:00Z").as_offset_date_time(),
            ts("2024-05-01T13:00:00Z").as_offset_date_time(),
        )
        .expect("valid window"),
        quantity: Decimal::new(123_450, 2),
        event_count: 1234,
        revision: NonZeroU32::new(2).expect("non-zero"),
        reason: WindowReason::Resync { job_id: job() },
        expired: false,
        computed_at: ts("2024-05-01T13:05:00.5Z"),
        last_event_at: None,
        period_end: None,
    }
}

fn resync_request() -> ResyncRequest {
    ResyncRequest {
        job_id: job(),
        tenant_id: tenant(),
        environment_id: env(),
        customer_id: Some(customer()),
        meter_id: None,
        range: TimeRange::new(ts("2024-05-01T00:00:00Z"), ts("2024-05-02T00:00:00Z"))
            .expect("valid range"),
        force_rerun: true,
        requested_at: ts("2024-05-03T09:00:00Z"),
    }
}

fn stripe_webhook() -> StripeWebhook {
    StripeWebhook {
        tenant_id: tenant(),
        environment_id: env(),
        event_id: StripeEventId::parse("evt_1PQxYz2eZvKYlo2C").expect("valid"),
        event_type: StripeEventType::parse("customer.created").expect("valid"),
        livemode: false,
        created: 1_714_564_800,
        received_at: ts("2024-05-01T12:00:01.25Z"),
        payload: object(json!({
            "api_version": "2024-04-10",
            "created": 1_714_564_800,
            "data": {"object": {"id": "cus_Q1a2b3", "metadata": {"external_id": "cus_42"}, "object": "customer"}},
            "id": "evt_1PQxYz2eZvKYlo2C",
            "livemode": false,
            "object": "event",
            "type": "customer.created"
        })),
    }
}

fn dlq_headers() -> DlqHeaders {
    DlqHeaders {
        error: "invalid customer_id: must not be empty at line 1 column 98".to_owned(),
        error_kind: DlqErrorKind::VALIDATION,
        source_topic: "usage.raw".to_owned(),
        source_partition: 3,
        source_offset: 1_234_567,
        service: "aggregator".to_owned(),
        failed_at: ts("2024-05-01T12:35:00.001Z"),
    }
}

/// Compares `bytes` + newline to the golden file, or writes it under UPDATE_GOLDEN=1.
fn check_golden(file: &str, bytes: &[u8]) -> Vec<u8> {
    let path = common::crate_dir().join("golden").join(file);
    let mut expected = bytes.to_vec();
    expected.push(b'\n');
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().expect("golden dir")).expect("create golden dir");
        std::fs::write(&path, &expected).expect("write golden file");
    }
    let committed = common::read(&path);
    assert_eq!(
        String::from_utf8_lossy(&committed),
        String::from_utf8_lossy(&expected),
        "golden/{file} differs from what the Rust value serialises to"
    );
    committed
}

fn check_message<M: TopicMessage + PartialEq + std::fmt::Debug>(value: M) {
    let file = format!("{}.v1.json", M::TOPIC.base_name());
    let committed = check_golden(&file, &value.to_json_bytes());
    let parsed = M::from_json_bytes(&committed).expect("golden file parses");
    assert_eq!(parsed, value, "golden/{file} parses to a different value");
}

#[test]
fn usage_raw() {
    check_message(raw_event());
}

#[test]
fn usage_windows() {
    check_message(window_total());
}

#[test]
fn usage_resync() {
    check_message(resync_request());
}

#[test]
fn stripe_webhooks() {
    check_message(stripe_webhook());
}

#[test]
fn dlq_headers_map() {
    let headers = dlq_headers();
    let bytes = serde_json::to_vec(&headers).expect("serialise headers");
    let committed = check_golden("dlq-headers.v1.json", &bytes);
    let map: Vec<(String, String)> = serde_json::from_slice::<Map<String, Value>>(&committed)
        .expect("golden file is an object")
        .into_iter()
        .map(|(k, v)| (k, v.as_str().expect("string value").to_owned()))
        .collect();
    // The file lists the headers in the order to_headers writes them.
    let names: Vec<&str> = map.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, meterline_schemas::dlq::HEADER_NAMES.to_vec());
    assert_eq!(
        DlqHeaders::from_headers(map).expect("golden headers parse"),
        headers
    );
}

#[test]
fn golden_files_satisfy_their_schemas() {
    for subject in common::subjects() {
        let file = if subject == common::DLQ_HEADERS {
            "dlq-headers.v1.json".to_owned()
        } else {
            format!("{subject}.v1.json")
        };
        let instance: Value = serde_json::from_slice(&common::read(
            &common::crate_dir().join("golden").join(&file),
        ))
        .expect("golden file is JSON");
        let validator = common::validator(subject);
        let errors: Vec<String> = validator
            .iter_errors(&instance)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "golden/{file}: {errors:?}");
    }
}

#[test]
fn every_topic_has_a_golden_file() {
    for topic in Topic::all() {
        let path = common::crate_dir()
            .join("golden")
            .join(format!("{}.v1.json", topic.base_name()));
        assert!(path.is_file(), "missing {}", path.display());
    }
}
