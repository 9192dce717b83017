//! Meter definitions through the real ingest binary and PostgreSQL: created, read, listed and
//! replaced; every bad input is a 4xx JSON error with a stable code that leaves the `meters`
//! table exactly as it was; a tenant (or another environment of the same tenant) never sees or
//! changes another's meters; the aggregator's cross-tenant read sees every scope's changes.

use std::time::Duration;

use meterline_catalog::meters::MeterStore;
use meterline_common::auth::JwtKeys;
use meterline_tests::api::{get, keys, post_json, scope, send, token, Answer};
use meterline_tests::{Namespace, ServiceProcess};
use reqwest::header::CONTENT_TYPE;
use serde_json::{json, Value};
use sqlx::PgPool;

async fn put_json(url: &str, token: &str, body: &Value) -> Answer {
    send(
        reqwest::Client::new()
            .put(url)
            .bearer_auth(token)
            .json(body),
    )
    .await
}

/// Every row of `meters` as JSON text, in a fixed order: "unchanged" means equal snapshots.
async fn snapshot(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT row_to_json(m)::text FROM meters m ORDER BY tenant_id, environment_id, id",
    )
    .fetch_all(pool)
    .await
    .expect("reading meters")
}

fn ids(list: &Answer) -> Vec<&str> {
    list.body["data"]
        .as_array()
        .unwrap_or_else(|| panic!("a list answer: {:?}", list.body))
        .iter()
        .map(|m| m["id"].as_str().expect("an id"))
        .collect()
}

fn parse_time(value: &Value) -> time::OffsetDateTime {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("a timestamp: {value}"));
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{text} is not RFC 3339: {e}"))
}

#[tokio::test]
async fn meters_round_trip_create_get_list_replace() {
    let ns = Namespace::create().await;
    let ingest = ServiceProcess::spawn("ingest", &ns.env()).await;
    let t = token("tenant_123", "env_prod");

    let tokens = json!({
        "id": "tokens",
        "event_name": "llm.completion",
        "aggregation": "SUM",
        "property": "tokens",
        "filters": [{"property": "model", "in": ["gpt-4", "gpt-4o"]}]
    });
    let created = post_json(&ingest.url("/v1/meters"), &t, &tokens).await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    for field in ["id", "event_name", "aggregation", "property", "filters"] {
        assert_eq!(
            created.body[field], tokens[field],
            "{field}: {:?}",
            created.body
        );
    }
    let created_at = parse_time(&created.body["created_at"]);
    assert_eq!(created_at, parse_time(&created.body["updated_at"]));

    let api_calls = json!({"id": "api_calls", "event_name": "api.request", "aggregation": "COUNT"});
    let created = post_json(&ingest.url("/v1/meters"), &t, &api_calls).await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(created.body["aggregation"], "COUNT");
    assert!(created.body.get("property").is_none(), "{:?}", created.body);
    assert_eq!(created.body["filters"], json!([]));

    let one = get(&ingest.url("/v1/meters/tokens"), &t).await;
    assert_eq!(one.status, 200, "{:?}", one.body);
    assert_eq!(one.body["filters"], tokens["filters"]);
    assert_eq!(parse_time(&one.body["created_at"]), created_at);

    let list = get(&ingest.url("/v1/meters"), &t).await;
    assert_eq!(list.status, 200, "{:?}", list.body);
    assert_eq!(ids(&list), ["api_calls", "tokens"], "ordered by id");

    // PUT without a body id takes the path's; every field but the id is replaced.
    let replaced = put_json(
        &ingest.url("/v1/meters/tokens"),
        &t,
        &json!({"event_name": "llm.completion.v2", "aggregation": "MAX", "property": "tokens",
                "filters": [{"property": "tier", "in": [1, true]}]}),
    )
    .await;
    assert_eq!(replaced.status, 200, "{:?}", replaced.body);
    assert_eq!(replaced.body["id"], "tokens");
    assert_eq!(replaced.body["event_name"], "llm.completion.v2");
    assert_eq!(replaced.body["aggregation"], "MAX");
    assert_eq!(
        replaced.body["filters"],
        json!([{"property": "tier", "in": [1, true]}])
    );
    assert_eq!(parse_time(&replaced.body["created_at"]), created_at);
    assert!(parse_time(&replaced.body["updated_at"]) > created_at);

    // A body id equal to the path's is fine; COUNT drops the property.
    let replaced = put_json(
        &ingest.url("/v1/meters/tokens"),
        &t,
        &json!({"id": "tokens", "event_name": "llm.completion", "aggregation": "COUNT"}),
    )
    .await;
    assert_eq!(replaced.status, 200, "{:?}", replaced.body);
    let again = get(&ingest.url("/v1/meters/tokens"), &t).await;
    assert_eq!(again.body, replaced.body, "GET shows what PUT stored");
    assert!(again.body.get("property").is_none(), "{:?}", again.body);

    let missing = get(&ingest.url("/v1/meters/nope"), &t).await;
    assert_eq!((missing.status, missing.error_code()), (404, "not_found"));
    let missing = put_json(&ingest.url("/v1/meters/nope"), &t, &api_calls).await;
    assert_eq!(
        (missing.status, missing.error_code()),
        (400, "id_mismatch"),
        "{:?}",
        missing.body
    );
    let missing = put_json(
        &ingest.url("/v1/meters/nope"),
        &t,
        &json!({"event_name": "x", "aggregation": "COUNT"}),
    )
    .await;
    assert_eq!((missing.status, missing.error_code()), (404, "not_found"));
    ns.drop_databases().await;
}

#[tokio::test]
async fn a_duplicate_id_is_409_and_keeps_the_first() {
    let ns = Namespace::create().await;
    let ingest = ServiceProcess::spawn("ingest", &ns.env()).await;
    let t = token("tenant_123", "env_prod");
    let first = json!({"id": "api_calls", "event_name": "api.request", "aggregation": "COUNT"});
    assert_eq!(
        post_json(&ingest.url("/v1/meters"), &t, &first)
            .await
            .status,
        201
    );
    let pool = ns.pg_pool().await;
    let before = snapshot(&pool).await;

    let second =
        json!({"id": "api_calls", "event_name": "other", "aggregation": "SUM", "property": "n"});
    let answer = post_json(&ingest.url("/v1/meters"), &t, &second).await;
    assert_eq!(
        (answer.status, answer.error_code()),
        (409, "conflict"),
        "{:?}",
        answer.body
    );
    assert_eq!(snapshot(&pool).await, before);
    let kept = get(&ingest.url("/v1/meters/api_calls"), &t).await;
    assert_eq!(kept.body["event_name"], "api.request");
    ns.drop_databases().await;
}

enum Body {
    None,
    Json(Value),
    Raw(&'static str),
}

/// One refused request: what it tries, how it is sent, and the answer it must get.
struct Case<'a> {
    what: &'static str,
    method: &'static str,
    path: &'static str,
    bearer: Option<&'a str>,
    body: Body,
    status: u16,
    code: &'static str,
}

fn case<'a>(
    what: &'static str,
    method: &'static str,
    path: &'static str,
    bearer: Option<&'a str>,
    body: Body,
    status: u16,
    code: &'static str,
) -> Case<'a> {
    Case {
        what,
        method,
        path,
        bearer,
        body,
        status,
        code,
    }
}

#[tokio::test]
async fn bad_inputs_are_4xx_json_errors_that_change_nothing() {
    let ns = Namespace::create().await;
    let ingest = ServiceProcess::spawn("ingest", &ns.env()).await;
    let good = token("tenant_123", "env_prod");
    let existing = json!({"id": "existing", "event_name": "api.request", "aggregation": "COUNT"});
    assert_eq!(
        post_json(&ingest.url("/v1/meters"), &good, &existing)
            .await
            .status,
        201
    );
    let pool = ns.pg_pool().await;
    let before = snapshot(&pool).await;

    let expired = keys().mint_with_expiry(
        &scope("tenant_123", "env_prod"),
        time::OffsetDateTime::now_utc().unix_timestamp() - 3600,
    );
    let forged = JwtKeys::new(b"not-the-stack-secret-not-the-stack-secret")
        .mint(&scope("tenant_123", "env_prod"), Duration::from_secs(3600));
    let meter = |patch: Value| {
        let mut m = json!({"id": "new_meter", "event_name": "api.request", "aggregation": "COUNT"});
        for (k, v) in patch.as_object().expect("an object") {
            m[k] = v.clone();
        }
        m
    };
    let values: Vec<Value> = (0..101).map(|i| json!(format!("v{i}"))).collect();

    let (good, expired, forged) = (good.as_str(), expired.as_str(), forged.as_str());
    let cases = vec![
        case(
            "malformed json",
            "POST",
            "/v1/meters",
            Some(good),
            Body::Raw("{\"id\": "),
            400,
            "malformed_json",
        ),
        case(
            "unknown field",
            "POST",
            "/v1/meters",
            Some(good),
            Body::Json(meter(json!({"color": "red"}))),
            400,
            "unknown_field",
        ),
        case(
            "unknown filter field",
            "POST",
            "/v1/meters",
            Some(good),
            Body::Json(meter(
                json!({"filters": [{"property": "p", "in": ["a"], "not_in": ["b"]}]}),
            )),
            400,
            "unknown_field",
        ),
        case(
            "missing event_name",
            "POST",
            "/v1/meters",
            Some(good),
            Body::Json(json!({"id": "new_meter", "aggregation": "COUNT"})),
            400,
            "missing_field",
        ),
        case(
            "missing id on POST",
            "POST",
            "/v1/meters",
            Some(good),
            Body::Json(json!({"event_name": "e", "aggregation": "COUNT"})),
            400,
            "missing_field",
        ),
        case(
            "id of the wrong type",
            "POST",
            "/v1/meters",
            Some(good),
            Body::Json(meter(json!({"id": 7}))),
            400,
            "invalid_type",
        ),
        case(
            "COUNT with a property",
            "POST",
            "/v1/meters",
            Some(good),
            Body::Json(meter(json!({"property": "n"}))),
            400,
            "invalid_value",
        ),
        case(
            "SUM without a property",
            "POST",
            "/v1/meters",
            Some(good),
            Body::Json(meter(json!({"aggregation": "SUM"}))),
            400,
            "invalid_value",
        ),
        case(
            "unknown aggregation",
            "POST",
            "/v1/meters",
            Some(good),
            Body::Json(meter(json!({"aggregation": "AVERAGE", "property": "n"}))),
            400,
            "invalid_value",
        ),
        case(
            "bad id characters",
            "POST",
            "/v1/meters",
            Some(good),
            Body::Json(meter(json!({"id": "api calls/1"}))),
            400,
            "invalid_value",
        ),
        case(
            "event_name over 100 chars",
            "POST",
            "/v1/meters",
            Some(good),
            Body::Json(meter(json!({"event_name": "e".repeat(101)}))),
            400,
            "invalid_value",
        ),
        case(
            "too many filter values",
            "POST",
            "/v1/meters",
            Some(good),
            Body::Json(meter(
                json!({"filters": [{"property": "model", "in": values}]}),
            )),
            400,
            "invalid_value",
        ),
        case(
            "bad property name",
            "POST",
            "/v1/meters",
            Some(good),
            Body::Json(meter(json!({"aggregation": "SUM", "property": "a b"}))),
            400,
            "invalid_value",
        ),
        case(
            "not json content type",
            "POST",
            "/v1/meters",
            Some(good),
            Body::None,
            415,
            "unsupported_media_type",
        ),
        case(
            "missing token",
            "POST",
            "/v1/meters",
            None,
            Body::Json(meter(json!({}))),
            401,
            "missing_token",
        ),
        case(
            "expired token",
            "POST",
            "/v1/meters",
            Some(expired),
            Body::Json(meter(json!({}))),
            401,
            "token_expired",
        ),
        case(
            "token of another secret",
            "POST",
            "/v1/meters",
            Some(forged),
            Body::Json(meter(json!({}))),
            401,
            "invalid_token",
        ),
        case(
            "missing token on list",
            "GET",
            "/v1/meters",
            None,
            Body::None,
            401,
            "missing_token",
        ),
        case(
            "expired token on get",
            "GET",
            "/v1/meters/existing",
            Some(expired),
            Body::None,
            401,
            "token_expired",
        ),
        case(
            "forged token on put",
            "PUT",
            "/v1/meters/existing",
            Some(forged),
            Body::Json(json!({"event_name": "hijacked", "aggregation": "COUNT"})),
            401,
            "invalid_token",
        ),
        case(
            "bad path id on get",
            "GET",
            "/v1/meters/bad%20id",
            Some(good),
            Body::None,
            400,
            "invalid_value",
        ),
        case(
            "bad path id on put",
            "PUT",
            "/v1/meters/-dash",
            Some(good),
            Body::Json(json!({"event_name": "e", "aggregation": "COUNT"})),
            400,
            "invalid_value",
        ),
        case(
            "body id differs from path",
            "PUT",
            "/v1/meters/existing",
            Some(good),
            Body::Json(json!({"id": "other", "event_name": "e", "aggregation": "COUNT"})),
            400,
            "id_mismatch",
        ),
        case(
            "invalid replacement",
            "PUT",
            "/v1/meters/existing",
            Some(good),
            Body::Json(json!({"event_name": "e", "aggregation": "MAX"})),
            400,
            "invalid_value",
        ),
        case(
            "malformed replacement",
            "PUT",
            "/v1/meters/existing",
            Some(good),
            Body::Raw("{\"event_name\": \"e\","),
            400,
            "malformed_json",
        ),
        case(
            "fields as an array",
            "POST",
            "/v1/meters",
            Some(good),
            Body::Raw("[\"new_meter\", \"api.request\", \"COUNT\"]"),
            400,
            "invalid_type",
        ),
    ];

    let client = reqwest::Client::new();
    for Case {
        what,
        method,
        path,
        bearer,
        body,
        status,
        code,
    } in cases
    {
        let url = ingest.url(path);
        let mut request = match method {
            "POST" => client.post(&url),
            "PUT" => client.put(&url),
            _ => client.get(&url),
        };
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        request = match body {
            Body::None if method == "GET" => request,
            Body::None => request.body("id=new_meter"),
            Body::Json(value) => request.json(&value),
            Body::Raw(text) => request.header(CONTENT_TYPE, "application/json").body(text),
        };
        let answer = send(request).await;
        assert_eq!(
            (answer.status, answer.error_code()),
            (status, code),
            "{what}: {:?}",
            answer.body
        );
        let message = answer.body["error"]["message"].as_str().unwrap_or("");
        assert!(!message.is_empty(), "{what}: a message for people");
        assert_eq!(
            snapshot(&pool).await,
            before,
            "{what} changed the meters table"
        );
    }

    // The invalid_value answers name the field they refused.
    let answer = post_json(
        &ingest.url("/v1/meters"),
        good,
        &meter(json!({"event_name": "e".repeat(101)})),
    )
    .await;
    assert!(
        answer.body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("event_name"),
        "{:?}",
        answer.body
    );
    ns.drop_databases().await;
}

#[tokio::test]
async fn tenants_and_environments_never_see_each_others_meters() {
    let ns = Namespace::create().await;
    let ingest = ServiceProcess::spawn("ingest", &ns.env()).await;
    let a = token("tenant_a", "prod");
    let b = token("tenant_b", "prod");
    let a_test = token("tenant_a", "test");
    let meters = ingest.url("/v1/meters");
    let one = ingest.url("/v1/meters/api_calls");

    let of_a = json!({"id": "api_calls", "event_name": "api.request", "aggregation": "COUNT"});
    assert_eq!(post_json(&meters, &a, &of_a).await.status, 201);

    for (who, t) in [("tenant b", &b), ("tenant a, other environment", &a_test)] {
        let answer = get(&one, t).await;
        assert_eq!(
            (answer.status, answer.error_code()),
            (404, "not_found"),
            "{who}"
        );
        let list = get(&meters, t).await;
        assert_eq!(list.status, 200, "{who}");
        assert!(ids(&list).is_empty(), "{who}: {:?}", list.body);
        let answer = put_json(
            &one,
            t,
            &json!({"event_name": "hijacked", "aggregation": "SUM", "property": "n"}),
        )
        .await;
        assert_eq!(
            (answer.status, answer.error_code()),
            (404, "not_found"),
            "{who}"
        );
    }
    let still = get(&one, &a).await;
    assert_eq!(
        still.body["event_name"], "api.request",
        "A's meter untouched"
    );

    // The same id is free in every other scope, and each scope keeps its own.
    let of_b = json!({"id": "api_calls", "event_name": "b.request",
                      "aggregation": "SUM", "property": "n"});
    assert_eq!(post_json(&meters, &b, &of_b).await.status, 201);
    let of_a_test =
        json!({"id": "api_calls", "event_name": "test.request", "aggregation": "COUNT"});
    assert_eq!(post_json(&meters, &a_test, &of_a_test).await.status, 201);
    for (t, event_name) in [
        (&a, "api.request"),
        (&b, "b.request"),
        (&a_test, "test.request"),
    ] {
        let answer = get(&one, t).await;
        assert_eq!(answer.body["event_name"], event_name);
        assert_eq!(ids(&get(&meters, t).await), ["api_calls"]);
    }
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT tenant_id, environment_id FROM meters ORDER BY 1, 2")
            .fetch_all(&ns.pg_pool().await)
            .await
            .expect("reading meters");
    assert_eq!(
        rows,
        [
            ("tenant_a", "prod"),
            ("tenant_a", "test"),
            ("tenant_b", "prod")
        ]
        .map(|(t, e)| (t.to_owned(), e.to_owned()))
    );
    ns.drop_databases().await;
}

#[tokio::test]
async fn the_aggregator_read_sees_every_tenants_changes_since_a_time() {
    let ns = Namespace::create().await;
    let ingest = ServiceProcess::spawn("ingest", &ns.env()).await;
    let store = MeterStore::new(ns.pg_pool().await);
    let meters = ingest.url("/v1/meters");
    let count = |id: &str| json!({"id": id, "event_name": "api.request", "aggregation": "COUNT"});
    let a = token("tenant_a", "prod");
    let b = token("tenant_b", "test");
    assert_eq!(post_json(&meters, &a, &count("m1")).await.status, 201);
    assert_eq!(post_json(&meters, &b, &count("m2")).await.status, 201);

    let all = store
        .list_changed_since(time::OffsetDateTime::UNIX_EPOCH)
        .await
        .expect("reading every meter");
    let seen: Vec<(&str, &str, &str)> = all
        .iter()
        .map(|(scope, m)| {
            (
                scope.tenant_id.as_str(),
                scope.environment_id.as_str(),
                m.definition.id.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [("tenant_a", "prod", "m1"), ("tenant_b", "test", "m2")]
    );

    // Only what changed after the newest change seen comes back.
    let newest = all
        .iter()
        .map(|(_, m)| m.updated_at)
        .max()
        .expect("two meters");
    assert!(store
        .list_changed_since(newest)
        .await
        .expect("polling")
        .is_empty());
    let replaced = put_json(
        &ingest.url("/v1/meters/m1"),
        &a,
        &json!({"event_name": "api.request", "aggregation": "SUM", "property": "n"}),
    )
    .await;
    assert_eq!(replaced.status, 200, "{:?}", replaced.body);
    let changed = store.list_changed_since(newest).await.expect("polling");
    assert_eq!(changed.len(), 1, "{changed:?}");
    assert_eq!(changed[0].1.definition.aggregation.kind(), "SUM");
    ns.drop_databases().await;
}
