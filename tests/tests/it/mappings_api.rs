//! Customer and meter mappings through the real stripe-sink binary, Kafka and PostgreSQL:
//! Stripe customer events written to `stripe.webhooks` (the relay's contract) become mappings
//! within seconds; duplicated and out-of-order deliveries end in the same mappings whatever the
//! order; customers without `metadata.external_id` are listed as unmapped; meter error reports
//! are recorded; unusable messages go to `stripe.webhooks.dlq`; the mapping API answers with
//! stable codes, changes nothing on a refusal, and never shows or changes another tenant's
//! mappings.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meterline_accounts::crypto::Keyring;
use meterline_accounts::stripe_config::{
    NewConfig, StripeApiKey, StripeConfigStore, WebhookSecret,
};
use meterline_common::kafka::producer_config;
use meterline_schemas::{
    EnvironmentId, StripeEventId, StripeEventType, StripeWebhook, TenantId, Timestamp, Topic,
};
use meterline_tests::api::{get, post_json, scope, send, token, Answer};
use meterline_tests::kafka::read_topic;
use meterline_tests::{Namespace, ServiceProcess, Stack};
use rdkafka::producer::{FutureProducer, FutureRecord};
use reqwest::header::CONTENT_TYPE;
use serde_json::{json, Value};
use sqlx::PgPool;

const TENANT: &str = "tenant_123";
const ENV: &str = "env_prod";

async fn delete(url: &str, token: &str) -> Answer {
    send(reqwest::Client::new().delete(url).bearer_auth(token)).await
}

/// A Stripe `customer.*` event as the relay publishes it.
fn customer_event(
    env: &str,
    event_id: &str,
    event_type: &str,
    created: i64,
    customer: &str,
    external_id: Option<&str>,
) -> StripeWebhook {
    let metadata = match external_id {
        Some(id) => json!({"external_id": id}),
        None => json!({}),
    };
    let payload = json!({
        "id": event_id,
        "object": "event",
        "api_version": "2025-04-30.basil",
        "created": created,
        "data": {"object": {
            "id": customer,
            "object": "customer",
            "email": format!("{customer}@example.com"),
            "name": null,
            "metadata": metadata,
        }},
        "livemode": false,
        "type": event_type,
    });
    webhook(env, event_id, event_type, created, payload)
}

fn webhook(
    env: &str,
    event_id: &str,
    event_type: &str,
    created: i64,
    payload: Value,
) -> StripeWebhook {
    StripeWebhook {
        tenant_id: TenantId::parse(TENANT).unwrap(),
        environment_id: EnvironmentId::parse(env).unwrap(),
        event_id: StripeEventId::parse(event_id).unwrap(),
        event_type: StripeEventType::parse(event_type).unwrap(),
        livemode: false,
        created,
        received_at: Timestamp::now(),
        payload: payload.as_object().cloned().expect("an event object"),
    }
}

/// Writes messages to the namespace's `stripe.webhooks`, in order, with their keys.
async fn produce_raw(ns: &Namespace, messages: &[(String, Vec<u8>)]) {
    let producer: FutureProducer =
        producer_config(&ns.kafka, "it-webhooks", Duration::from_secs(30))
            .create()
            .expect("creating a producer");
    let topic = ns.topic(Topic::StripeWebhooks);
    // One at a time: the order of one key is the order the test means.
    for (key, payload) in messages {
        producer
            .send(
                FutureRecord::to(&topic).key(key).payload(payload),
                Duration::from_secs(30),
            )
            .await
            .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
    }
}

async fn produce(ns: &Namespace, hooks: &[StripeWebhook]) {
    let messages: Vec<(String, Vec<u8>)> = hooks
        .iter()
        .map(|h| (h.kafka_key(), h.to_json_bytes()))
        .collect();
    produce_raw(ns, &messages).await;
}

/// Polls `GET url` until it answers `status`, failing with the last answer after `within`.
async fn wait_status(sink: &ServiceProcess, path: &str, token: &str, status: u16) -> Answer {
    // "Within seconds" on an idle machine; the bound is generous because CI machines are
    // shared and a consumer group's first join can take a while under load.
    let within = Duration::from_secs(60);
    let deadline = Instant::now() + within;
    loop {
        let answer = get(&sink.url(path), token).await;
        if answer.status == status {
            return answer;
        }
        if Instant::now() > deadline {
            panic!(
                "GET {path} stayed {} (wanted {status}) for {within:?}: {:?}\n{}",
                answer.status,
                answer.body,
                sink.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Active mappings as external id -> Stripe customer, through the API (every page).
async fn active_mappings(sink: &ServiceProcess, token: &str) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let mut after: Option<i64> = None;
    loop {
        let mut path = "/v1/stripe/customers/mapping?status=active&limit=2".to_owned();
        if let Some(id) = after {
            path.push_str(&format!("&starting_after={id}"));
        }
        let page = get(&sink.url(&path), token).await;
        assert_eq!(page.status, 200, "{:?}", page.body);
        let data = page.body["data"].as_array().expect("data");
        for m in data {
            assert_eq!(m["status"], "active");
            let previous = found.insert(
                m["customer_id"].as_str().unwrap().to_owned(),
                m["provider_customer_id"].as_str().unwrap().to_owned(),
            );
            assert!(previous.is_none(), "two active mappings: {m}");
        }
        if page.body["has_more"] != json!(true) {
            return found;
        }
        after = data.last().and_then(|m| m["id"].as_i64());
    }
}

async fn unmapped(sink: &ServiceProcess, token: &str) -> Vec<String> {
    let list = get(&sink.url("/v1/stripe/customers/unmapped?limit=100"), token).await;
    assert_eq!(list.status, 200, "{:?}", list.body);
    list.body["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|c| c["provider_customer_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_created_customer_becomes_a_mapping_within_seconds() {
    let ns = Namespace::create().await;
    let sink = ServiceProcess::spawn("stripe-sink", &ns.env()).await;
    let t = token(TENANT, ENV);

    produce(
        &ns,
        &[customer_event(
            ENV,
            "evt_1",
            "customer.created",
            1_714_564_800,
            "cus_Q1",
            Some("flexprice_customer_123"),
        )],
    )
    .await;
    let mapping = wait_status(
        &sink,
        "/v1/stripe/customers/mapping/flexprice_customer_123",
        &t,
        200,
    )
    .await;
    assert_eq!(mapping.body["provider_customer_id"], "cus_Q1");
    assert_eq!(mapping.body["provider_type"], "stripe");
    assert_eq!(mapping.body["entity_type"], "customer");
    assert_eq!(mapping.body["source"], "webhook");
    assert_eq!(mapping.body["status"], "active");
    assert_eq!(mapping.body["last_event_id"], "evt_1");
    assert_eq!(mapping.body["last_event_created"], 1_714_564_800);
    assert_eq!(mapping.body["metadata"]["email"], "cus_Q1@example.com");

    // The original demo's SQL, verbatim column names and values.
    let pool = ns.pg_pool().await;
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT provider_type, entity_type, entity_id, provider_entity_id
         FROM entity_integration_mappings
         WHERE provider_type = 'stripe' AND entity_type = 'customer'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [(
            "stripe".to_owned(),
            "customer".to_owned(),
            "flexprice_customer_123".to_owned(),
            "cus_Q1".to_owned()
        )]
    );

    let metrics = reqwest::get(sink.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("stripe_sink_customer_mappings_created_total{source=\"webhook\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("stripe_sink_webhook_events_consumed_total 1"),
        "{metrics}"
    );
    ns.drop_databases().await;
}

/// The event history of the ordering test: (event id, type, created, customer, external id).
/// Final state whatever the order: a1 -> A (updated), b1 retired (B deleted), c_new -> C
/// (external id changed), d1 retired (D deleted; a stale update arrives after), e1 -> E (the
/// external id came later), F unmapped (same second: the update without external id wins
/// over the creation), g1 -> H (two customers claim g1: the newer claim wins).
const HISTORY: &[(&str, &str, i64, &str, Option<&str>)] = &[
    ("evt_a1", "customer.created", 100, "cus_A", Some("a1")),
    ("evt_a2", "customer.updated", 200, "cus_A", Some("a1")),
    ("evt_b1", "customer.created", 100, "cus_B", Some("b1")),
    ("evt_b2", "customer.deleted", 300, "cus_B", Some("b1")),
    ("evt_c1", "customer.created", 100, "cus_C", Some("c_old")),
    ("evt_c2", "customer.updated", 200, "cus_C", Some("c_new")),
    ("evt_d1", "customer.created", 100, "cus_D", Some("d1")),
    ("evt_d2", "customer.updated", 200, "cus_D", Some("d1")),
    ("evt_d3", "customer.deleted", 300, "cus_D", Some("d1")),
    ("evt_d4", "customer.updated", 250, "cus_D", Some("d1")),
    ("evt_e1", "customer.created", 100, "cus_E", None),
    ("evt_e2", "customer.updated", 200, "cus_E", Some("e1")),
    ("evt_f1", "customer.created", 100, "cus_F", Some("f1")),
    ("evt_f2", "customer.updated", 100, "cus_F", None),
    ("evt_g1", "customer.created", 100, "cus_G", Some("g1")),
    ("evt_h1", "customer.created", 150, "cus_H", Some("g1")),
];

/// A deterministic shuffle (xorshift), so a failure replays.
fn shuffled<T: Clone>(items: &[T], mut seed: u64) -> Vec<T> {
    let mut out = items.to_vec();
    for i in (1..out.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.swap(i, (seed % (i as u64 + 1)) as usize);
    }
    out
}

#[tokio::test]
async fn duplicated_and_out_of_order_deliveries_end_in_the_same_mappings() {
    let ns = Namespace::create().await;
    let sink = ServiceProcess::spawn("stripe-sink", &ns.env()).await;

    // Each environment gets every event twice, in its own order: newest first, oldest first,
    // and two shuffles.
    let orders: Vec<(&str, Vec<usize>)> = {
        let twice: Vec<usize> = (0..HISTORY.len()).chain(0..HISTORY.len()).collect();
        let mut newest_first = twice.clone();
        newest_first.sort_by_key(|i| std::cmp::Reverse((HISTORY[*i].2, *i)));
        let mut oldest_first = twice.clone();
        oldest_first.sort_by_key(|i| (HISTORY[*i].2, *i));
        vec![
            ("env_newest_first", newest_first),
            ("env_oldest_first", oldest_first),
            ("env_shuffled_1", shuffled(&twice, 0x9e37_79b9_7f4a_7c15)),
            ("env_shuffled_2", shuffled(&twice, 42)),
        ]
    };
    for (env, order) in &orders {
        let mut hooks: Vec<StripeWebhook> = order
            .iter()
            .map(|i| {
                let (id, kind, created, customer, external) = HISTORY[*i];
                customer_event(env, id, kind, created, customer, external)
            })
            .collect();
        // Last on the same key (so the same partition): once it is mapped, every event before
        // it was applied.
        hooks.push(customer_event(
            env,
            "evt_z1",
            "customer.created",
            400,
            "cus_Z",
            Some("z1"),
        ));
        produce(&ns, &hooks).await;
    }

    let expected: BTreeMap<String, String> = [
        ("a1", "cus_A"),
        ("c_new", "cus_C"),
        ("e1", "cus_E"),
        ("g1", "cus_H"),
        ("z1", "cus_Z"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for (env, _) in &orders {
        let t = token(TENANT, env);
        wait_status(&sink, "/v1/stripe/customers/mapping/z1", &t, 200).await;
        assert_eq!(active_mappings(&sink, &t).await, expected, "{env}");
        for gone in ["b1", "c_old", "d1", "f1"] {
            let answer = get(
                &sink.url(&format!("/v1/stripe/customers/mapping/{gone}")),
                &t,
            )
            .await;
            assert_eq!(
                (answer.status, answer.error_code()),
                (404, "not_found"),
                "{env} {gone}: {:?}",
                answer.body
            );
        }
        assert_eq!(unmapped(&sink, &t).await, ["cus_F"], "{env}");
        let a1 = get(&sink.url("/v1/stripe/customers/mapping/a1"), &t).await;
        assert_eq!(a1.body["last_event_id"], "evt_a2", "{env}: {:?}", a1.body);
        let deleted = get(
            &sink.url("/v1/stripe/customers/unmapped?status=deleted"),
            &t,
        )
        .await;
        assert_eq!(deleted.status, 200);
    }

    // The retired history is there too: B's mapping (if B's creation was applied before its
    // deletion) is retired, never active.
    let pool = ns.pg_pool().await;
    let active_per_entity: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT environment_id, entity_id, count(*) FROM entity_integration_mappings
         WHERE status = 'active' GROUP BY environment_id, entity_id HAVING count(*) > 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(active_per_entity.is_empty(), "{active_per_entity:?}");
    let oldest_first_retired: Vec<(String, String)> = sqlx::query_as(
        "SELECT entity_id, provider_entity_id FROM entity_integration_mappings
         WHERE environment_id = 'env_oldest_first' AND status = 'retired'
         ORDER BY entity_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let retired: Vec<(&str, &str)> = oldest_first_retired
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    assert_eq!(
        retired,
        [
            ("b1", "cus_B"),
            ("c_old", "cus_C"),
            ("d1", "cus_D"),
            ("f1", "cus_F"),
            ("g1", "cus_G")
        ]
    );
    ns.drop_databases().await;
}

#[tokio::test]
async fn unmapped_customers_are_listed_until_mapped() {
    let ns = Namespace::create().await;
    let sink = ServiceProcess::spawn("stripe-sink", &ns.env()).await;
    let t = token(TENANT, ENV);
    produce(
        &ns,
        &[
            customer_event(ENV, "evt_1", "customer.created", 100, "cus_N1", None),
            customer_event(ENV, "evt_2", "customer.created", 100, "cus_N2", None),
            customer_event(ENV, "evt_3", "customer.created", 100, "cus_N3", None),
            customer_event(ENV, "evt_4", "customer.created", 100, "cus_S", Some("s1")),
        ],
    )
    .await;
    wait_status(&sink, "/v1/stripe/customers/mapping/s1", &t, 200).await;
    assert_eq!(unmapped(&sink, &t).await, ["cus_N1", "cus_N2", "cus_N3"]);
    let first = get(&sink.url("/v1/stripe/customers/unmapped?limit=2"), &t).await;
    assert_eq!(first.body["has_more"], true);
    assert_eq!(first.body["data"][0]["reason"], "missing_external_id");
    assert_eq!(first.body["data"][0]["email"], "cus_N1@example.com");
    let rest = get(
        &sink.url("/v1/stripe/customers/unmapped?limit=2&starting_after=cus_N2"),
        &t,
    )
    .await;
    assert_eq!(rest.body["data"][0]["provider_customer_id"], "cus_N3");
    assert_eq!(rest.body["has_more"], false);

    // A later event adds the external id; an operator maps another by hand.
    produce(
        &ns,
        &[customer_event(
            ENV,
            "evt_5",
            "customer.updated",
            200,
            "cus_N1",
            Some("n1"),
        )],
    )
    .await;
    wait_status(&sink, "/v1/stripe/customers/mapping/n1", &t, 200).await;
    let manual = post_json(
        &sink.url("/v1/stripe/customers/mapping"),
        &t,
        &json!({"customer_id": "n2", "provider_customer_id": "cus_N2"}),
    )
    .await;
    assert_eq!(manual.status, 201, "{:?}", manual.body);
    assert_eq!(unmapped(&sink, &t).await, ["cus_N3"]);
    let mapped = get(&sink.url("/v1/stripe/customers/unmapped?status=mapped"), &t).await;
    let ids: Vec<&str> = mapped.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["provider_customer_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["cus_N1", "cus_N2"]);

    // A later update without external id leaves the manual mapping alone.
    produce(
        &ns,
        &[
            customer_event(ENV, "evt_6", "customer.updated", 300, "cus_N2", None),
            customer_event(ENV, "evt_7", "customer.created", 300, "cus_T", Some("t1")),
        ],
    )
    .await;
    wait_status(&sink, "/v1/stripe/customers/mapping/t1", &t, 200).await;
    let n2 = get(&sink.url("/v1/stripe/customers/mapping/n2"), &t).await;
    assert_eq!(n2.body["source"], "manual");
    assert_eq!(unmapped(&sink, &t).await, ["cus_N3"]);
    ns.drop_databases().await;
}

async fn meter_mappings_snapshot(pool: &PgPool) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT row_to_json(m)::text FROM stripe_meter_mappings m
         ORDER BY tenant_id, environment_id, meter_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn meter_mappings_crud_and_conflicts() {
    let ns = Namespace::create().await;
    let sink = ServiceProcess::spawn("stripe-sink", &ns.env()).await;
    let t = token(TENANT, ENV);
    let url = sink.url("/v1/stripe/meters/mapping");

    let created = post_json(
        &url,
        &t,
        &json!({"meter_id": "api_calls", "provider_type": "stripe",
                "provider_meter_id": "api_requests", "sync_enabled": true}),
    )
    .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(created.body["meter_id"], "api_calls");
    assert_eq!(created.body["provider_type"], "stripe");
    assert_eq!(created.body["provider_meter_id"], "api_requests");
    assert_eq!(created.body["sync_enabled"], true);
    // provider_type and sync_enabled may be left out.
    let second = post_json(
        &url,
        &t,
        &json!({"meter_id": "tokens", "provider_meter_id": "llm_tokens"}),
    )
    .await;
    assert_eq!(second.status, 201, "{:?}", second.body);
    assert_eq!(second.body["sync_enabled"], true);

    let pool = ns.pg_pool().await;
    let before = meter_mappings_snapshot(&pool).await;
    let duplicate = post_json(
        &url,
        &t,
        &json!({"meter_id": "api_calls", "provider_meter_id": "other"}),
    )
    .await;
    assert_eq!(
        (duplicate.status, duplicate.error_code()),
        (409, "meter_already_mapped"),
        "{:?}",
        duplicate.body
    );
    let same_stripe_meter = post_json(
        &url,
        &t,
        &json!({"meter_id": "other", "provider_meter_id": "api_requests"}),
    )
    .await;
    assert_eq!(
        (same_stripe_meter.status, same_stripe_meter.error_code()),
        (409, "provider_meter_already_mapped")
    );

    let long_name = "e".repeat(101);
    let bad: Vec<(Value, &str)> = vec![
        (
            json!({"meter_id": "m", "provider_meter_id": long_name}),
            "invalid_value",
        ),
        (
            json!({"meter_id": "m", "provider_meter_id": ""}),
            "invalid_value",
        ),
        (
            json!({"meter_id": "bad id", "provider_meter_id": "x"}),
            "invalid_value",
        ),
        (
            json!({"meter_id": "m", "provider_type": "chargebee", "provider_meter_id": "x"}),
            "unsupported_provider",
        ),
        (json!({"meter_id": "m"}), "missing_field"),
        (
            json!({"meter_id": "m", "provider_meter_id": "x", "extra": 1}),
            "unknown_field",
        ),
        (
            json!({"meter_id": "m", "provider_meter_id": "x", "sync_enabled": "yes"}),
            "invalid_type",
        ),
    ];
    for (body, code) in bad {
        let answer = post_json(&url, &t, &body).await;
        assert_eq!(
            (answer.status, answer.error_code()),
            (400, code),
            "{body}: {:?}",
            answer.body
        );
    }
    let malformed = send(
        reqwest::Client::new()
            .post(&url)
            .bearer_auth(&t)
            .header(CONTENT_TYPE, "application/json")
            .body("{"),
    )
    .await;
    assert_eq!(
        (malformed.status, malformed.error_code()),
        (400, "malformed_json")
    );
    let unauthenticated = send(reqwest::Client::new().post(&url).json(&json!({}))).await;
    assert_eq!(
        (unauthenticated.status, unauthenticated.error_code()),
        (401, "missing_token")
    );
    assert_eq!(
        meter_mappings_snapshot(&pool).await,
        before,
        "refusals change nothing"
    );

    let list = get(&url, &t).await;
    assert_eq!(list.status, 200);
    let ids: Vec<&str> = list.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["meter_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["api_calls", "tokens"]);
    let one = get(&sink.url("/v1/stripe/meters/mapping/api_calls"), &t).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.body, created.body);

    // Another tenant, and another environment of the same tenant, see and change nothing.
    for other in [token("tenant_other", ENV), token(TENANT, "env_staging")] {
        let list = get(&url, &other).await;
        assert_eq!(list.body["data"], json!([]));
        let one = get(&sink.url("/v1/stripe/meters/mapping/api_calls"), &other).await;
        assert_eq!((one.status, one.error_code()), (404, "not_found"));
        let gone = delete(&sink.url("/v1/stripe/meters/mapping/api_calls"), &other).await;
        assert_eq!((gone.status, gone.error_code()), (404, "not_found"));
        // The same names are free in another scope.
        let own = post_json(
            &url,
            &other,
            &json!({"meter_id": "api_calls", "provider_meter_id": "api_requests"}),
        )
        .await;
        assert_eq!(own.status, 201, "{:?}", own.body);
    }
    assert_eq!(
        get(&sink.url("/v1/stripe/meters/mapping/api_calls"), &t)
            .await
            .status,
        200
    );

    let deleted = delete(&sink.url("/v1/stripe/meters/mapping/api_calls"), &t).await;
    assert_eq!(deleted.status, 204, "{:?}", deleted.body);
    let again = delete(&sink.url("/v1/stripe/meters/mapping/api_calls"), &t).await;
    assert_eq!((again.status, again.error_code()), (404, "not_found"));
    let gone = get(&sink.url("/v1/stripe/meters/mapping/api_calls"), &t).await;
    assert_eq!((gone.status, gone.error_code()), (404, "not_found"));
    // Deleted, it can be made again.
    let remade = post_json(
        &url,
        &t,
        &json!({"meter_id": "api_calls", "provider_meter_id": "api_requests", "sync_enabled": false}),
    )
    .await;
    assert_eq!(remade.status, 201);
    assert_eq!(remade.body["sync_enabled"], false);
    ns.drop_databases().await;
}

#[tokio::test]
async fn manual_customer_mappings_conflicts_paging_and_tenant_isolation() {
    let ns = Namespace::create().await;
    let sink = ServiceProcess::spawn("stripe-sink", &ns.env()).await;
    let t = token(TENANT, ENV);
    let url = sink.url("/v1/stripe/customers/mapping");

    let created = post_json(
        &url,
        &t,
        &json!({"customer_id": "flexprice_customer_123", "provider_customer_id": "cus_M1"}),
    )
    .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(created.body["source"], "manual");
    assert_eq!(created.body["status"], "active");
    assert_eq!(created.body["provider_customer_id"], "cus_M1");

    let pool = ns.pg_pool().await;
    let snapshot = || async {
        let rows: Vec<String> = sqlx::query_scalar(
            "SELECT row_to_json(m)::text FROM entity_integration_mappings m ORDER BY id",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        rows
    };
    let before = snapshot().await;
    let refusals: Vec<(Value, u16, &str)> = vec![
        (
            json!({"customer_id": "flexprice_customer_123", "provider_customer_id": "cus_M2"}),
            409,
            "customer_already_mapped",
        ),
        (
            json!({"customer_id": "other", "provider_customer_id": "cus_M1"}),
            409,
            "provider_customer_already_mapped",
        ),
        (
            json!({"customer_id": "c", "provider_customer_id": "acct_1"}),
            400,
            "invalid_value",
        ),
        (
            json!({"customer_id": "c", "provider_customer_id": "cus_"}),
            400,
            "invalid_value",
        ),
        (
            json!({"customer_id": "", "provider_customer_id": "cus_M3"}),
            400,
            "invalid_value",
        ),
        (json!({"customer_id": "c"}), 400, "missing_field"),
        (
            json!({"customer_id": "c", "provider_customer_id": "cus_M3", "status": "active"}),
            400,
            "unknown_field",
        ),
    ];
    for (body, status, code) in refusals {
        let answer = post_json(&url, &t, &body).await;
        assert_eq!(
            (answer.status, answer.error_code()),
            (status, code),
            "{body}: {:?}",
            answer.body
        );
    }
    for (query, code) in [
        ("status=gone", "invalid_parameter"),
        ("limit=0", "invalid_parameter"),
        ("limit=101", "invalid_parameter"),
        ("starting_after=abc", "invalid_parameter"),
        ("colour=blue", "unknown_parameter"),
    ] {
        let answer = get(&format!("{url}?{query}"), &t).await;
        assert_eq!(
            (answer.status, answer.error_code()),
            (400, code),
            "{query}: {:?}",
            answer.body
        );
    }
    assert_eq!(snapshot().await, before, "refusals change nothing");

    // Other tenants and environments see nothing and cannot retire it.
    for other in [token("tenant_other", ENV), token(TENANT, "env_staging")] {
        let list = get(&url, &other).await;
        assert_eq!(list.status, 200);
        assert_eq!(list.body["data"], json!([]));
        let one = get(&format!("{url}/flexprice_customer_123"), &other).await;
        assert_eq!((one.status, one.error_code()), (404, "not_found"));
        let gone = delete(&format!("{url}/flexprice_customer_123"), &other).await;
        assert_eq!((gone.status, gone.error_code()), (404, "not_found"));
        let unmapped = get(&sink.url("/v1/stripe/customers/unmapped"), &other).await;
        assert_eq!(unmapped.body["data"], json!([]));
    }
    assert_eq!(snapshot().await, before);

    for i in 2..=4 {
        let answer = post_json(
            &url,
            &t,
            &json!({"customer_id": format!("c{i}"), "provider_customer_id": format!("cus_M{i}")}),
        )
        .await;
        assert_eq!(answer.status, 201);
    }
    let first = get(&format!("{url}?limit=3"), &t).await;
    assert_eq!(first.body["has_more"], true);
    let ids: Vec<&str> = first.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["customer_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["flexprice_customer_123", "c2", "c3"]);
    let last_id = first.body["data"][2]["id"].as_i64().unwrap();
    let rest = get(&format!("{url}?limit=3&starting_after={last_id}"), &t).await;
    assert_eq!(rest.body["data"][0]["customer_id"], "c4");
    assert_eq!(rest.body["has_more"], false);

    // Retire: 204, then gone from GET, listed as retired, and the customer can be remapped.
    let retired = delete(&format!("{url}/flexprice_customer_123"), &t).await;
    assert_eq!(retired.status, 204, "{:?}", retired.body);
    let again = delete(&format!("{url}/flexprice_customer_123"), &t).await;
    assert_eq!((again.status, again.error_code()), (404, "not_found"));
    let gone = get(&format!("{url}/flexprice_customer_123"), &t).await;
    assert_eq!((gone.status, gone.error_code()), (404, "not_found"));
    let retired_list = get(&format!("{url}?status=retired"), &t).await;
    assert_eq!(
        retired_list.body["data"][0]["customer_id"],
        "flexprice_customer_123"
    );
    assert!(retired_list.body["data"][0]["retired_at"].is_string());
    let active_list = get(&format!("{url}?status=active&limit=100"), &t).await;
    assert_eq!(active_list.body["data"].as_array().unwrap().len(), 3);
    let remapped = post_json(
        &url,
        &t,
        &json!({"customer_id": "flexprice_customer_123", "provider_customer_id": "cus_M1"}),
    )
    .await;
    assert_eq!(remapped.status, 201, "{:?}", remapped.body);

    // A Stripe customer deleted in Stripe retires its manual mapping and cannot be mapped again.
    produce(
        &ns,
        &[customer_event(
            ENV,
            "evt_del",
            "customer.deleted",
            500,
            "cus_M4",
            None,
        )],
    )
    .await;
    wait_status(&sink, "/v1/stripe/customers/mapping/c4", &t, 404).await;
    let refused = post_json(
        &url,
        &t,
        &json!({"customer_id": "c5", "provider_customer_id": "cus_M4"}),
    )
    .await;
    assert_eq!(
        (refused.status, refused.error_code()),
        (409, "provider_customer_deleted")
    );
    ns.drop_databases().await;
}

/// stripe_event_id, event_type, error_code, error_message, stripe_meter_id, identifier.
type ReportRow = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
);

#[tokio::test]
async fn error_reports_are_recorded_and_bad_messages_dead_lettered() {
    let ns = Namespace::create().await;
    let sink = ServiceProcess::spawn("stripe-sink", &ns.env()).await;
    let t = token(TENANT, ENV);
    let key = format!("{TENANT}:{ENV}");

    // A thin event as Stripe delivers it, and one carrying the details.
    let thin = webhook(
        ENV,
        "evt_test_thin",
        "v1.billing.meter.error_report_triggered",
        1_727_372_782,
        json!({"id": "evt_test_thin", "object": "v2.core.event",
               "type": "v1.billing.meter.error_report_triggered",
               "created": "2024-09-26T17:46:22.134Z", "livemode": false, "context": null,
               "reason": null,
               "related_object": {"id": "mtr_1", "type": "billing.meter",
                                  "url": "/v1/billing/meters/mtr_1"}}),
    );
    let detailed = webhook(
        ENV,
        "evt_test_full",
        "v1.billing.meter.no_meter_found",
        1_727_372_790,
        json!({"id": "evt_test_full", "object": "v2.core.event",
               "type": "v1.billing.meter.no_meter_found",
               "data": {"reason": {"error_count": 2, "error_types": [{
                   "code": "no_meter", "error_count": 2, "sample_errors": [
                       {"error_message": "no meter for event_name x", "request": {"identifier": "ident-1"}},
                       {"error_message": "no meter for event_name x", "request": {"identifier": "ident-2"}}]}]}}}),
    );
    let other = webhook(
        ENV,
        "evt_other",
        "invoice.paid",
        1,
        json!({"id": "evt_other"}),
    );
    let no_customer = webhook(
        ENV,
        "evt_broken",
        "customer.created",
        1,
        json!({"id": "evt_broken", "data": {}}),
    );
    let mut messages: Vec<(String, Vec<u8>)> = vec![(key.clone(), b"not json at all".to_vec())];
    for hook in [&thin, &detailed, &detailed, &other, &no_customer] {
        messages.push((key.clone(), hook.to_json_bytes()));
    }
    let sentinel = customer_event(ENV, "evt_s", "customer.created", 1, "cus_S", Some("s1"));
    messages.push((key.clone(), sentinel.to_json_bytes()));
    produce_raw(&ns, &messages).await;
    wait_status(&sink, "/v1/stripe/customers/mapping/s1", &t, 200).await;

    let pool = ns.pg_pool().await;
    let rows: Vec<ReportRow> = sqlx::query_as(
        "SELECT stripe_event_id, event_type, error_code, error_message, stripe_meter_id,
                    identifier
             FROM stripe_meter_error_reports
             WHERE tenant_id = $1 AND environment_id = $2
             ORDER BY stripe_event_id, identifier",
    )
    .bind(TENANT)
    .bind(ENV)
    .fetch_all(&pool)
    .await
    .unwrap();
    let full = |ident: &str| {
        (
            "evt_test_full".to_owned(),
            "v1.billing.meter.no_meter_found".to_owned(),
            Some("no_meter".to_owned()),
            Some("no meter for event_name x".to_owned()),
            None,
            ident.to_owned(),
        )
    };
    assert_eq!(
        rows,
        [
            full("ident-1"),
            full("ident-2"),
            (
                "evt_test_thin".to_owned(),
                "v1.billing.meter.error_report_triggered".to_owned(),
                None,
                None,
                Some("mtr_1".to_owned()),
                String::new(),
            ),
        ]
    );

    let dead = read_topic(
        &ns,
        &ns.topics().dlq(Topic::StripeWebhooks),
        2,
        Duration::from_secs(20),
        Duration::from_millis(500),
    )
    .await;
    let values: Vec<Vec<u8>> = dead.iter().map(|r| r.value.clone()).collect();
    assert_eq!(
        values,
        [b"not json at all".to_vec(), no_customer.to_json_bytes()],
        "the original bytes, nothing else"
    );
    assert!(dead.iter().all(|r| r.key.as_deref() == Some(key.as_str())));

    let metrics = reqwest::get(sink.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "stripe_sink_meter_error_reports_recorded_total{type=\"error_report_triggered\"} 1",
        "stripe_sink_meter_error_reports_recorded_total{type=\"no_meter_found\"} 1",
        "stripe_sink_webhook_events_ignored_total{reason=\"unhandled_type\"} 1",
        "stripe_sink_webhook_events_rejected_total{reason=\"parse\"} 1",
        "stripe_sink_webhook_events_rejected_total{reason=\"validation\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    ns.drop_databases().await;
}

/// A request to the stand-in's Stripe API as its test account.
async fn stripe(method: reqwest::Method, url: String, form: &[(&str, &str)]) -> Value {
    let response = reqwest::Client::new()
        .request(method, &url)
        .bearer_auth("sk_test_standin")
        .form(form)
        .send()
        .await
        .expect("the stand-in answers");
    let status = response.status();
    let body: Value = response.json().await.expect("the stand-in answers JSON");
    assert!(status.is_success(), "{url}: {status} {body}");
    body
}

#[tokio::test]
async fn a_customer_created_in_stripe_becomes_a_mapping_through_the_relay() {
    let ns = Namespace::create().await;
    let (_, standin) = stripe_standin::spawn(stripe_standin::Config::for_tests())
        .await
        .expect("starting the stripe stand-in");
    let base = standin.base_url();
    let relay = ServiceProcess::spawn("webhook-relay", &ns.env()).await;
    let sink = ServiceProcess::spawn("stripe-sink", &ns.env()).await;
    let t = token(TENANT, ENV);

    let endpoint = stripe(
        reqwest::Method::POST,
        format!("{base}/v1/webhook_endpoints"),
        &[
            (
                "url",
                relay
                    .url(&format!("/webhooks/stripe/{TENANT}/{ENV}"))
                    .as_str(),
            ),
            ("enabled_events[]", "*"),
        ],
    )
    .await;
    let secret = endpoint["secret"].as_str().expect("the endpoint's secret");
    let keys = Keyring::parse(&Stack::get().encryption_keys).expect("the stack's keys parse");
    StripeConfigStore::new(ns.pg_pool().await, keys)
        .put(
            &scope(TENANT, ENV),
            &NewConfig {
                api_key: StripeApiKey::parse("sk_test_standin").unwrap(),
                webhook_secrets: vec![WebhookSecret::parse(secret).unwrap()],
                sync_enabled: true,
                aggregation_window_minutes: 60,
                rate_limit_per_second: None,
            },
        )
        .await
        .expect("storing the stripe config");

    let customer = stripe(
        reqwest::Method::POST,
        format!("{base}/v1/customers"),
        &[
            ("email", "ada@example.com"),
            ("metadata[external_id]", "flexprice_customer_123"),
        ],
    )
    .await;
    let cus = customer["id"].as_str().expect("a customer id");
    assert!(cus.starts_with("cus_"), "{customer}");
    let mapping = wait_status(
        &sink,
        "/v1/stripe/customers/mapping/flexprice_customer_123",
        &t,
        200,
    )
    .await;
    assert_eq!(mapping.body["provider_customer_id"], cus);
    assert_eq!(mapping.body["source"], "webhook");
    assert_eq!(mapping.body["metadata"]["email"], "ada@example.com");

    // From now on Stripe delivers every event twice, in a shuffled order, and the customer's
    // external id changes, then the customer is deleted (often within one second).
    reqwest::Client::new()
        .post(format!("{base}/_standin/webhooks/chaos"))
        .json(&json!({"duplicate": true, "shuffle_ms": 300}))
        .send()
        .await
        .expect("setting chaos");
    stripe(
        reqwest::Method::POST,
        format!("{base}/v1/customers/{cus}"),
        &[("metadata[external_id]", "flexprice_customer_456")],
    )
    .await;
    wait_status(
        &sink,
        "/v1/stripe/customers/mapping/flexprice_customer_456",
        &t,
        200,
    )
    .await;
    wait_status(
        &sink,
        "/v1/stripe/customers/mapping/flexprice_customer_123",
        &t,
        404,
    )
    .await;
    stripe(
        reqwest::Method::DELETE,
        format!("{base}/v1/customers/{cus}"),
        &[],
    )
    .await;
    wait_status(
        &sink,
        "/v1/stripe/customers/mapping/flexprice_customer_456",
        &t,
        404,
    )
    .await;
    let retired = get(&sink.url("/v1/stripe/customers/mapping?status=retired"), &t).await;
    let ids: Vec<&str> = retired.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["customer_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["flexprice_customer_123", "flexprice_customer_456"]);
    let active = get(&sink.url("/v1/stripe/customers/mapping?status=active"), &t).await;
    assert_eq!(active.body["data"], json!([]));
    ns.drop_databases().await;
}
