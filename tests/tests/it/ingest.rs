//! The ingest API through the real binary and the real Kafka broker: accepted events land on
//! `usage.raw` keyed by customer and stamped with the token's tenant; bad input is refused
//! with a stable JSON error code and writes nothing; a stopped broker gives a bounded 503 and
//! ingest recovers on its own when the broker returns.

use std::time::{Duration, Instant};

use meterline_schemas::{RawUsageEvent, Topic};
use meterline_tests::api::{keys, post_json, scope, send, token};
use meterline_tests::kafka::read_topic;
use meterline_tests::private::PrivateKafka;
use meterline_tests::{Namespace, ServiceProcess, Stack};
use serde_json::{json, Value};

/// ingest with small limits, so that the limits are cheap to cross.
async fn ingest(ns: &Namespace, extra: &[(&str, &str)]) -> ServiceProcess {
    let mut env = ns.env();
    env.push(("INGEST_MAX_BULK_EVENTS".into(), "5".into()));
    env.push(("INGEST_MAX_BODY_BYTES".into(), "4096".into()));
    env.push(("INGEST_MAX_BULK_BODY_BYTES".into(), "16384".into()));
    for (k, v) in extra {
        env.push(((*k).into(), (*v).into()));
    }
    ServiceProcess::spawn("ingest", &env).await
}

fn parse(value: &[u8]) -> RawUsageEvent {
    RawUsageEvent::from_json_bytes(value).expect("usage.raw carries valid messages")
}

#[tokio::test]
async fn accepted_events_land_on_usage_raw_keyed_and_stamped_by_the_token() {
    let ns = Namespace::create().await;
    let ingest = ingest(&ns, &[]).await;
    let t = token("tenant_123", "env_prod");

    let one = post_json(
        &ingest.url("/v1/events"),
        &t,
        &json!({"id": "evt-1", "customer_id": "cust_a", "event_name": "api.request",
                "timestamp": "2026-11-26T10:00:00Z", "properties": {"path": "/v1/x"}}),
    )
    .await;
    assert_eq!(one.status, 202, "{:?}", one.body);
    assert_eq!(one.body, json!({"id": "evt-1", "id_generated": false}));

    let bulk = post_json(
        &ingest.url("/v1/events/bulk"),
        &t,
        &json!({"events": [
            {"id": "evt-2", "customer_id": "cust_a", "event_name": "api.request"},
            {"customer_id": "cust_b", "event_name": "llm.completion", "properties": {"tokens": 42}},
        ]}),
    )
    .await;
    assert_eq!(bulk.status, 202, "{:?}", bulk.body);
    assert_eq!(bulk.body["accepted"], 2);
    assert_eq!(
        bulk.body["events"][0],
        json!({"id": "evt-2", "id_generated": false})
    );
    assert_eq!(bulk.body["events"][1]["id_generated"], true);
    let generated = bulk.body["events"][1]["id"].as_str().unwrap().to_owned();

    let records = read_topic(
        &ns,
        &ns.topic(Topic::UsageRaw),
        3,
        Duration::from_secs(30),
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(records.len(), 3);
    for record in &records {
        let event = parse(&record.value);
        assert_eq!(event.tenant_id.as_str(), "tenant_123");
        assert_eq!(event.environment_id.as_str(), "env_prod");
        assert_eq!(
            record.key.as_deref(),
            Some(format!("tenant_123:env_prod:{}", event.customer_id).as_str()),
            "keyed by customer"
        );
        assert!(event.ingested_at.is_some());
    }
    let mut ids: Vec<String> = records
        .iter()
        .map(|r| parse(&r.value).id.as_str().to_owned())
        .collect();
    ids.sort();
    let mut expected = vec!["evt-1".to_owned(), "evt-2".to_owned(), generated];
    expected.sort();
    assert_eq!(ids, expected);
    // One customer's events share a partition, so they keep their order.
    let a: Vec<i32> = records
        .iter()
        .filter(|r| parse(&r.value).customer_id.as_str() == "cust_a")
        .map(|r| r.partition)
        .collect();
    assert_eq!(a.len(), 2);
    assert_eq!(a[0], a[1]);
    ns.drop_databases().await;
}

#[tokio::test]
async fn a_client_retry_carries_the_same_id_key_and_content() {
    let ns = Namespace::create().await;
    let ingest = ingest(&ns, &[]).await;
    let t = token("tenant_123", "env_prod");
    let event = json!({"id": "retry-1", "customer_id": "cust_a", "event_name": "api.request",
                       "timestamp": "2026-11-26T10:00:00Z", "properties": {"n": 1}});
    for _ in 0..2 {
        assert_eq!(
            post_json(&ingest.url("/v1/events"), &t, &event)
                .await
                .status,
            202
        );
    }
    let records = read_topic(
        &ns,
        &ns.topic(Topic::UsageRaw),
        2,
        Duration::from_secs(30),
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(records.len(), 2);
    let (first, second) = (parse(&records[0].value), parse(&records[1].value));
    // Everything that decides what is billed is identical, so the copies collapse into one
    // row downstream: events_processed deduplicates on (tenant, environment, customer,
    // meter, event id).
    assert_eq!(first.id, second.id);
    assert_eq!(records[0].key, records[1].key);
    assert_eq!(records[0].partition, records[1].partition);
    assert_eq!(first.timestamp, second.timestamp);
    assert_eq!(first.properties, second.properties);
    ns.drop_databases().await;
}

#[tokio::test]
async fn bad_input_is_refused_with_a_stable_code_and_nothing_is_written() {
    let ns = Namespace::create().await;
    let ingest = ingest(&ns, &[]).await;
    let good = token("tenant_123", "env_prod");
    let expired = keys().mint_with_expiry(&scope("tenant_123", "env_prod"), 1_700_000_000);
    let forged = meterline_common::auth::JwtKeys::new(b"not-the-secret-not-the-secret-xx")
        .mint(&scope("tenant_123", "env_prod"), Duration::from_secs(600));
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let not_yet = keys().mint_valid_from(&scope("tenant_123", "env_prod"), now + 600, now + 1200);
    // One day over the 30 days ingest accepts by default (JWT_MAX_LIFETIME_HOURS).
    let too_long = keys().mint(
        &scope("tenant_123", "env_prod"),
        meterline_common::auth::DEFAULT_MAX_LIFETIME + Duration::from_secs(86_400),
    );
    let event = json!({"customer_id": "c", "event_name": "api.request"});
    let future = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    let future = future
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let big = "x".repeat(5000);
    let six: Vec<Value> = (0..6).map(|_| event.clone()).collect();

    let client = reqwest::Client::new();
    let single = ingest.url("/v1/events");
    let bulk = ingest.url("/v1/events/bulk");
    // (what, request, expected status, expected code)
    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> =
        vec![
            (
                "malformed json",
                client
                    .post(&single)
                    .bearer_auth(&good)
                    .header("content-type", "application/json")
                    .body("{\"customer_id\":"),
                400,
                "malformed_json",
            ),
            (
                "not json at all",
                client
                    .post(&single)
                    .bearer_auth(&good)
                    .header("content-type", "text/plain")
                    .body("hello"),
                415,
                "unsupported_media_type",
            ),
            (
                "wrong type",
                client
                    .post(&single)
                    .bearer_auth(&good)
                    .json(&json!({"customer_id": 12, "event_name": "x"})),
                400,
                "invalid_type",
            ),
            (
                "properties not an object",
                client
                    .post(&single)
                    .bearer_auth(&good)
                    .json(&json!({"customer_id": "c", "event_name": "x", "properties": "a"})),
                400,
                "invalid_type",
            ),
            (
                "missing customer_id",
                client
                    .post(&single)
                    .bearer_auth(&good)
                    .json(&json!({"event_name": "x"})),
                400,
                "missing_field",
            ),
            (
                "unknown field (tenant_id may not come from the body)",
                client
                    .post(&single)
                    .bearer_auth(&good)
                    .json(&json!({"customer_id": "c", "event_name": "x", "tenant_id": "other"})),
                400,
                "unknown_field",
            ),
            (
                "empty customer_id",
                client
                    .post(&single)
                    .bearer_auth(&good)
                    .json(&json!({"customer_id": "", "event_name": "x"})),
                400,
                "invalid_value",
            ),
            (
                "event_name over 100 characters",
                client
                    .post(&single)
                    .bearer_auth(&good)
                    .json(&json!({"customer_id": "c", "event_name": "e".repeat(101)})),
                400,
                "invalid_value",
            ),
            (
                "timestamp not RFC 3339",
                client.post(&single).bearer_auth(&good).json(
                    &json!({"customer_id": "c", "event_name": "x", "timestamp": "26/11/2026"}),
                ),
                400,
                "invalid_value",
            ),
            (
                "timestamp an hour in the future",
                client
                    .post(&single)
                    .bearer_auth(&good)
                    .json(&json!({"customer_id": "c", "event_name": "x", "timestamp": future})),
                400,
                "timestamp_in_future",
            ),
            (
                "body over the limit",
                client.post(&single).bearer_auth(&good).json(
                    &json!({"customer_id": "c", "event_name": "x", "properties": {"blob": big}}),
                ),
                413,
                "body_too_large",
            ),
            (
                "bulk over the count limit",
                client
                    .post(&bulk)
                    .bearer_auth(&good)
                    .json(&json!({"events": six})),
                400,
                "too_many_events",
            ),
            (
                "bulk empty",
                client
                    .post(&bulk)
                    .bearer_auth(&good)
                    .json(&json!({"events": []})),
                400,
                "empty_batch",
            ),
            (
                "bulk with one invalid event",
                client
                    .post(&bulk)
                    .bearer_auth(&good)
                    .json(&json!({"events": [event, {"customer_id": "c"}]})),
                400,
                "invalid_events",
            ),
            (
                "missing token",
                client.post(&single).json(&event),
                401,
                "missing_token",
            ),
            (
                "garbled token",
                client.post(&single).bearer_auth("abc.def.ghi").json(&event),
                401,
                "malformed_token",
            ),
            (
                "not a bearer token",
                client
                    .post(&single)
                    .header("authorization", "Basic dXNlcjpwYXNz")
                    .json(&event),
                401,
                "malformed_token",
            ),
            (
                "expired token",
                client.post(&single).bearer_auth(&expired).json(&event),
                401,
                "token_expired",
            ),
            (
                "token before its nbf",
                client.post(&single).bearer_auth(&not_yet).json(&event),
                401,
                "token_not_yet_valid",
            ),
            (
                "token living longer than the maximum",
                client.post(&single).bearer_auth(&too_long).json(&event),
                401,
                "token_lifetime_too_long",
            ),
            (
                "token signed with another secret",
                client.post(&single).bearer_auth(&forged).json(&event),
                401,
                "invalid_token",
            ),
            (
                "unknown route",
                client
                    .post(ingest.url("/v1/nothing"))
                    .bearer_auth(&good)
                    .json(&event),
                404,
                "not_found",
            ),
        ];
    for (what, request, status, code) in cases {
        let answer = send(request).await;
        assert_eq!(answer.status, status, "{what}: {:?}", answer.body);
        assert_eq!(answer.error_code(), code, "{what}: {:?}", answer.body);
        assert!(
            answer.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: a message for people"
        );
    }
    // The bulk refusal says which event was wrong.
    let answer = post_json(
        &bulk,
        &good,
        &json!({"events": [{"customer_id": "c", "event_name": "x"}, {"customer_id": 1, "event_name": "x"}]}),
    )
    .await;
    assert_eq!(
        answer.body["error"]["details"],
        json!([{"index": 1, "code": "invalid_type",
        "message": answer.body["error"]["details"][0]["message"]}])
    );

    // Nothing reached Kafka: the first message on the topic is this sentinel.
    let sentinel = post_json(
        &single,
        &good,
        &json!({"id": "sentinel", "customer_id": "c", "event_name": "x"}),
    )
    .await;
    assert_eq!(sentinel.status, 202);
    let records = read_topic(
        &ns,
        &ns.topic(Topic::UsageRaw),
        1,
        Duration::from_secs(30),
        Duration::from_secs(2),
    )
    .await;
    let ids: Vec<String> = records
        .iter()
        .map(|r| parse(&r.value).id.as_str().to_owned())
        .collect();
    assert_eq!(ids, vec!["sentinel"], "refused requests wrote nothing");

    // Every refusal was counted by reason.
    let metrics = reqwest::get(ingest.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for reason in [
        "malformed_json",
        "unknown_field",
        "timestamp_in_future",
        "too_many_events",
    ] {
        assert!(
            metrics.contains(&format!(
                "ingest_events_rejected_total{{reason=\"{reason}\"}}"
            )),
            "{reason} counted:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("ingest_events_accepted_total 1"),
        "{metrics}"
    );
    ns.drop_databases().await;
}

/// `meterline token` refuses to mint a token the services would refuse for its lifetime, and
/// one within it is accepted by ingest.
#[tokio::test]
async fn meterline_token_mints_only_lifetimes_the_services_accept() {
    let ns = Namespace::create().await;
    let ingest = ingest(&ns, &[("JWT_MAX_LIFETIME_HOURS", "2")]).await;
    let secret = meterline_tests::Stack::get().jwt_secret.clone();
    let env = [
        ("JWT_SECRET", secret.as_str()),
        ("JWT_MAX_LIFETIME_HOURS", "2"),
    ];
    let mint = |ttl: &'static str| async move {
        let args = [
            "token",
            "--tenant",
            "tenant_123",
            "--environment",
            "env_prod",
            "--ttl",
            ttl,
        ];
        meterline_tests::process::run_command("meterline", &env, &args).await
    };
    let refused = mint("10800").await;
    assert!(!refused.status.success());
    assert!(refused.stdout.is_empty(), "no token printed");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("JWT_MAX_LIFETIME_HOURS"), "{said}");

    let minted = mint("7200").await;
    assert!(
        minted.status.success(),
        "{}",
        String::from_utf8_lossy(&minted.stderr)
    );
    let token = String::from_utf8(minted.stdout).unwrap();
    let event = json!({"customer_id": "c", "event_name": "api.request"});
    let answer = post_json(&ingest.url("/v1/events"), token.trim(), &event).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    // Ingest, configured alike, refuses what the harness mints for three hours.
    let long = keys().mint(
        &scope("tenant_123", "env_prod"),
        Duration::from_secs(10_800),
    );
    let answer = post_json(&ingest.url("/v1/events"), &long, &event).await;
    assert_eq!(answer.status, 401, "{}", answer.body);
    assert_eq!(answer.error_code(), "token_lifetime_too_long");
    ns.drop_databases().await;
}

#[tokio::test]
async fn a_stopped_broker_gives_a_bounded_503_and_ingest_recovers_without_restart() {
    let kafka = PrivateKafka::start().await;
    let ns = Namespace::plan(&kafka.brokers(), &Stack::get().database_url);
    ns.create_topics().await;
    ns.create_databases().await;
    let ingest = ingest(&ns, &[("KAFKA_PRODUCE_TIMEOUT_MS", "2000")]).await;
    let t = token("tenant_123", "env_prod");
    let url = ingest.url("/v1/events");
    let event = |id: &str| json!({"id": id, "customer_id": "c", "event_name": "x"});
    assert_eq!(post_json(&url, &t, &event("before")).await.status, 202);

    kafka.stop().await;
    let started = Instant::now();
    let answer = post_json(&url, &t, &event("during")).await;
    let took = started.elapsed();
    assert_eq!(answer.status, 503, "{:?}", answer.body);
    assert_eq!(answer.error_code(), "kafka_unavailable");
    assert_eq!(answer.headers["retry-after"], "5");
    // The bound is the 2 s produce timeout (never the 30 s of an unbounded wait); generous
    // slack for a busy machine.
    assert!(took < Duration::from_secs(10), "503 after {took:?}");

    kafka.resume().await;
    // The same ingest process, not restarted: it reconnects by itself.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = post_json(&url, &t, &event("after")).await;
        if answer.status == 202 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ingest did not recover: {:?}\n{}",
            answer.body,
            ingest.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let records = read_topic(
        &ns,
        &ns.topic(Topic::UsageRaw),
        2,
        Duration::from_secs(30),
        Duration::from_secs(2),
    )
    .await;
    let ids: Vec<String> = records
        .iter()
        .map(|r| parse(&r.value).id.as_str().to_owned())
        .collect();
    assert!(
        ids.contains(&"before".to_owned()) && ids.contains(&"after".to_owned()),
        "{ids:?}"
    );
    // "during" was answered 503: it is either absent or, if the broker took it just before
    // stopping, present once; a retry with the same id would count once either way.
    assert!(ids.iter().filter(|i| *i == "during").count() <= 1);
    ns.drop_databases().await;
}

/// The README's `kcat` example, run as written but against this test's topic, produces a
/// message that the pipeline parses, with the key the contract asks for.
#[tokio::test]
async fn the_readme_kcat_example_produces_a_valid_usage_raw_message() {
    let ns = Namespace::create().await;
    let readme = std::fs::read_to_string(meterline_tests::stack::repo_root().join("README.md"))
        .expect("reading README.md");
    let block = readme
        .split("<!-- kcat-example:begin -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- kcat-example:end -->").next())
        .expect("the README marks its kcat example");
    let command: String = block
        .lines()
        .filter(|l| !l.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("127.0.0.1:19092", &ns.kafka.brokers)
        .replace("-t usage.raw", &format!("-t {}", ns.topic(Topic::UsageRaw)));
    let output = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(&command)
        .output()
        .await
        .expect("running bash");
    assert!(
        output.status.success(),
        "kcat failed (dev/test installs it): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let records = read_topic(
        &ns,
        &ns.topic(Topic::UsageRaw),
        1,
        Duration::from_secs(30),
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(records.len(), 1);
    let event = parse(&records[0].value);
    assert_eq!(
        records[0].key.as_deref(),
        Some(event_key(&event).as_str()),
        "the documented key"
    );
    assert_eq!(
        event.ingested_at, None,
        "direct producers leave ingested_at out"
    );
    ns.drop_databases().await;
}

fn event_key(event: &RawUsageEvent) -> String {
    format!(
        "{}:{}:{}",
        event.tenant_id, event.environment_id, event.customer_id
    )
}
