//! The audit trail through the real stripe-sink binary, the `meterline` command, Kafka and
//! PostgreSQL: every change to the Stripe configuration, to customer mappings (by hand, by
//! webhook, created and updated) and meter mappings, every re-encryption by
//! `meterline rotate-keys` and every decryption of the API key leaves one row naming who
//! (actor kind, token subject, webhook event, command), what and when; the rows are readable
//! page by page through `GET /v1/stripe/audit`, only by their own tenant; and no secret (API
//! key, webhook secret, encryption key) appears in any row or any answer.

use std::time::{Duration, Instant};

use meterline_common::auth::TenantScope;
use meterline_common::kafka::producer_config;
use meterline_schemas::{
    CustomerId, Decimal, EnvironmentId, MeterId, StripeEventId, StripeEventType, StripeWebhook,
    TenantId, Timestamp, Topic, Window, WindowReason, WindowTotal,
};
use meterline_tests::api::{keys, post_json, send, token, Answer};
use meterline_tests::process::bin_path;
use meterline_tests::standin::Standin;
use meterline_tests::{Namespace, ServiceProcess, Stack};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use std::num::NonZeroU32;

const TENANT: &str = "tenant_audit";
const ENV: &str = "env_prod";
const SUBJECT: &str = "ops@example.com";
const API_KEY: &str = "sk_test_AuditSecretKey0123456789";
const WEBHOOK_SECRETS: [&str; 2] = [
    "whsec_AuditWebhookSecret0123",
    "whsec_AuditWebhookSecret4567",
];
/// The key `meterline rotate-keys` re-encrypts under: base64 of 32 bytes.
const NEW_KEY_ID: &str = "rot2";
const NEW_KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

/// Every answer of the test, to be searched for secrets at the end.
#[derive(Default)]
struct Seen(Vec<String>);

impl Seen {
    fn keep(&mut self, answer: Answer) -> Answer {
        self.0.push(answer.body.to_string());
        answer
    }
}

async fn call(seen: &mut Seen, request: reqwest::RequestBuilder) -> Answer {
    let answer = send(request).await;
    seen.keep(answer)
}

fn operator_token() -> String {
    let scope = TenantScope {
        tenant_id: TenantId::parse(TENANT).unwrap(),
        environment_id: EnvironmentId::parse(ENV).unwrap(),
        subject: Some(SUBJECT.into()),
    };
    keys().mint(&scope, Duration::from_secs(3600))
}

/// A `customer.*` event as the webhook relay publishes it on `stripe.webhooks`, for
/// `TENANT`/`ENV` unless `scope` names others.
pub(crate) async fn produce_customer_event(
    ns: &Namespace,
    scope: Option<(&str, &str)>,
    event_id: &str,
    event_type: &str,
    created: i64,
    customer: &str,
    external_id: &str,
) {
    let payload = json!({
        "id": event_id, "object": "event", "api_version": "2025-04-30.basil",
        "created": created, "livemode": false, "type": event_type,
        "data": {"object": {"id": customer, "object": "customer", "email": null,
                            "name": null, "metadata": {"external_id": external_id}}},
    });
    let (tenant, environment) = scope.unwrap_or((TENANT, ENV));
    let hook = StripeWebhook {
        tenant_id: TenantId::parse(tenant).unwrap(),
        environment_id: EnvironmentId::parse(environment).unwrap(),
        event_id: StripeEventId::parse(event_id).unwrap(),
        event_type: StripeEventType::parse(event_type).unwrap(),
        livemode: false,
        created,
        received_at: Timestamp::now(),
        payload: payload.as_object().cloned().unwrap(),
    };
    produce(
        ns,
        Topic::StripeWebhooks,
        &hook.kafka_key(),
        &hook.to_json_bytes(),
    )
    .await;
}

/// Writes one message to the namespace's `topic`.
async fn produce(ns: &Namespace, topic: Topic, key: &str, payload: &[u8]) {
    let producer: FutureProducer = producer_config(&ns.kafka, "it-audit", Duration::from_secs(30))
        .create()
        .expect("creating a producer");
    let topic = ns.topic(topic);
    producer
        .send(
            FutureRecord::to(&topic).key(key).payload(payload),
            Duration::from_secs(30),
        )
        .await
        .unwrap_or_else(|(e, _)| panic!("producing to {topic}: {e}"));
}

/// Waits until `GET path` answers 200.
pub(crate) async fn wait_found(sink: &ServiceProcess, path: &str, token: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let answer = send(
            reqwest::Client::new()
                .get(sink.url(path))
                .bearer_auth(token),
        )
        .await;
        if answer.status == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never appeared: {:?}\n{}",
            answer.body,
            sink.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every row of the caller's trail through the API, newest first, two at a time (paging).
async fn trail(seen: &mut Seen, sink: &ServiceProcess, token: &str) -> Vec<Value> {
    let mut rows = Vec::new();
    let mut before: Option<i64> = None;
    loop {
        let mut path = "/v1/stripe/audit?limit=2".to_owned();
        if let Some(id) = before {
            path.push_str(&format!("&before={id}"));
        }
        let page = call(
            seen,
            reqwest::Client::new()
                .get(sink.url(&path))
                .bearer_auth(token),
        )
        .await;
        assert_eq!(page.status, 200, "{:?}", page.body);
        let data = page.body["data"].as_array().unwrap().clone();
        before = data.last().and_then(|r| r["id"].as_i64());
        rows.extend(data);
        if page.body["has_more"] != json!(true) {
            return rows;
        }
    }
}

fn actions(rows: &[Value]) -> Vec<&str> {
    rows.iter().map(|r| r["action"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn every_change_and_key_decryption_is_audited_and_no_secret_is_shown() {
    let ns = Namespace::create().await;
    let standin = Standin::start(25).await;
    standin
        .control("accounts", json!({"secret_key": API_KEY}))
        .await;
    let mut env = ns.env();
    env.push(("STRIPE_API_BASE".into(), standin.base.clone()));
    let sink = ServiceProcess::spawn("stripe-sink", &env).await;
    let t = operator_token();
    let mut seen = Seen::default();
    let http = reqwest::Client::new;

    // The configuration, written twice.
    for rate in [10, 20] {
        let put = call(
            &mut seen,
            http()
                .put(sink.url("/v1/stripe/config"))
                .bearer_auth(&t)
                .json(&json!({
                "api_key": API_KEY, "sync_enabled": true, "aggregation_window_minutes": 60,
                "webhook_secrets": WEBHOOK_SECRETS, "rate_limit_per_second": rate})),
        )
        .await;
        assert_eq!(put.status, 200, "{:?}", put.body);
    }
    call(
        &mut seen,
        http().get(sink.url("/v1/stripe/config")).bearer_auth(&t),
    )
    .await;
    // The key decrypted to test it.
    let test = call(
        &mut seen,
        http()
            .post(sink.url("/v1/stripe/config/test"))
            .bearer_auth(&t),
    )
    .await;
    assert_eq!(test.body["status"], "connected", "{:?}", test.body);
    // A meter mapping created and deleted.
    let meter = post_json(
        &sink.url("/v1/stripe/meters/mapping"),
        &t,
        &json!({"meter_id": "calls", "provider_meter_id": "api_calls"}),
    )
    .await;
    assert_eq!(seen.keep(meter).status, 201);
    let deleted = call(
        &mut seen,
        http()
            .delete(sink.url("/v1/stripe/meters/mapping/calls"))
            .bearer_auth(&t),
    )
    .await;
    assert_eq!(deleted.status, 204);
    // A customer mapping by hand, created and retired.
    let manual = post_json(
        &sink.url("/v1/stripe/customers/mapping"),
        &t,
        &json!({"customer_id": "c_manual", "provider_customer_id": "cus_manual"}),
    )
    .await;
    assert_eq!(seen.keep(manual).status, 201);
    let retired = call(
        &mut seen,
        http()
            .delete(sink.url("/v1/stripe/customers/mapping/c_manual"))
            .bearer_auth(&t),
    )
    .await;
    assert_eq!(retired.status, 204);
    // A customer mapping made by a webhook, then updated by a newer one to another external id.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    produce_customer_event(
        &ns,
        None,
        "evt_audit_1",
        "customer.created",
        now - 60,
        "cus_hook",
        "c_hook",
    )
    .await;
    wait_found(&sink, "/v1/stripe/customers/mapping/c_hook", &t).await;
    produce_customer_event(
        &ns,
        None,
        "evt_audit_2",
        "customer.updated",
        now - 30,
        "cus_hook",
        "c_hook2",
    )
    .await;
    wait_found(&sink, "/v1/stripe/customers/mapping/c_hook2", &t).await;

    // The sync decrypts the key to send a window's total (whether Stripe then takes it does
    // not matter here).
    let hour = now - now.rem_euclid(3600) - 3600;
    let at = |t: i64| time::OffsetDateTime::from_unix_timestamp(t).unwrap();
    let total = WindowTotal {
        tenant_id: TenantId::parse(TENANT).unwrap(),
        environment_id: EnvironmentId::parse(ENV).unwrap(),
        customer_id: CustomerId::parse("c_sync").unwrap(),
        meter_id: MeterId::parse("calls").unwrap(),
        window: Window::new(at(hour), at(hour + 3600)).unwrap(),
        quantity: Decimal::from(5),
        event_count: 5,
        revision: NonZeroU32::MIN,
        reason: WindowReason::Due,
        expired: false,
        computed_at: Timestamp::now(),
        last_event_at: None,
        period_end: None,
    };
    produce(
        &ns,
        Topic::UsageWindows,
        &total.kafka_key(),
        &total.to_json_bytes(),
    )
    .await;
    let pool = ns.pg_pool().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM audit_log WHERE actor_kind = 'sync'")
        .fetch_one(&pool)
        .await
        .unwrap()
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "the sync never decrypted the key:\n{}",
            sink.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The encryption key rotated by the operator command (the sink keeps running on the old
    // key; nothing after this decrypts).
    let stack_keys = &Stack::get().encryption_keys;
    let output = tokio::process::Command::new(bin_path("meterline"))
        .arg("rotate-keys")
        .env_clear()
        .env("DATABASE_URL", &ns.postgres.url)
        .env(
            "ENCRYPTION_KEYS",
            format!("{NEW_KEY_ID}:{NEW_KEY},{stack_keys}"),
        )
        .output()
        .await
        .expect("running meterline rotate-keys");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let old_key_id = stack_keys.split(':').next().unwrap();

    let (by_sync, rows): (Vec<Value>, Vec<Value>) = trail(&mut seen, &sink, &t)
        .await
        .into_iter()
        .partition(|r| r["actor"]["kind"] == "sync");
    // The sync's decryptions (one per attempt to settle the window) name no person.
    assert!(!by_sync.is_empty());
    for row in &by_sync {
        assert_eq!(row["action"], "api_key.decrypted");
        assert_eq!(
            row["actor"],
            json!({"kind": "sync", "subject": null, "ref": null})
        );
        assert_eq!(
            row["details"],
            json!({"purpose": "sync", "api_key": "sk_test_****6789"})
        );
    }
    // Newest first.
    assert_eq!(
        actions(&rows),
        [
            "encryption_keys.rotated",
            "customer_mapping.created",
            "customer_mapping.retired",
            "customer_mapping.created",
            "customer_mapping.retired",
            "customer_mapping.created",
            "meter_mapping.deleted",
            "meter_mapping.created",
            "api_key.decrypted",
            "api_key.decrypted",
            "stripe_config.put",
            "stripe_config.put",
        ],
        "{rows:#?}"
    );
    let ids: Vec<i64> = rows.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "{ids:?}");
    let by_api = |r: &Value| r["actor"] == json!({"kind": "api", "subject": SUBJECT, "ref": null});
    let row = |i: usize| &rows[rows.len() - 1 - i];
    // Oldest first from here: config put (no before), config put (before: rate 10).
    assert!(by_api(row(0)) && by_api(row(1)));
    assert_eq!(row(0)["details"]["before"], Value::Null);
    assert_eq!(row(0)["details"]["after"]["api_key"], "sk_test_****6789");
    assert_eq!(row(0)["details"]["after"]["webhook_secrets_count"], 2);
    assert_eq!(row(1)["details"]["before"]["rate_limit_per_second"], 10);
    assert_eq!(row(1)["details"]["after"]["rate_limit_per_second"], 20);
    assert!(by_api(row(2)));
    assert_eq!(
        row(2)["details"],
        json!({"purpose": "config_test", "api_key": "sk_test_****6789"})
    );
    assert!(row(2)["occurred_at"].as_str().unwrap().ends_with('Z'));
    // The key decrypted to read the Stripe meter's formula for the new meter mapping.
    assert!(by_api(row(3)));
    assert_eq!(
        row(3)["details"],
        json!({"purpose": "meter_mapping", "api_key": "sk_test_****6789"})
    );
    assert_eq!(
        (row(4)["target"].as_str(), row(5)["target"].as_str()),
        (Some("calls"), Some("calls"))
    );
    assert_eq!(row(4)["details"]["provider_meter_id"], "api_calls");
    assert!(by_api(row(4)) && by_api(row(5)));
    assert_eq!(
        row(6)["details"],
        json!({"customer_id": "c_manual", "provider_customer_id": "cus_manual", "source": "manual"})
    );
    assert_eq!(row(7)["details"]["reason"], "retired through the api");
    assert!(by_api(row(6)) && by_api(row(7)));
    let webhook = |r: &Value, event: &str| {
        r["actor"] == json!({"kind": "webhook", "subject": null, "ref": event})
    };
    assert!(webhook(row(8), "evt_audit_1"), "{}", row(8));
    assert_eq!(row(8)["details"]["customer_id"], "c_hook");
    assert_eq!(row(8)["details"]["source"], "webhook");
    // The update moved cus_hook from c_hook to c_hook2: one retirement, one creation.
    assert!(webhook(row(9), "evt_audit_2") && webhook(row(10), "evt_audit_2"));
    assert_eq!(
        (row(9)["target"].as_str(), row(10)["target"].as_str()),
        (Some("c_hook"), Some("c_hook2"))
    );
    assert_eq!(
        row(11)["actor"],
        json!({"kind": "operator", "subject": null, "ref": "meterline rotate-keys"})
    );
    assert_eq!(
        row(11)["details"],
        json!({"from_key_ids": [old_key_id], "to_key_id": NEW_KEY_ID})
    );

    // Filters, refusals, and other tenants.
    let only = call(
        &mut seen,
        http()
            .get(sink.url("/v1/stripe/audit?action=api_key.decrypted"))
            .bearer_auth(&t),
    )
    .await;
    let decrypted = actions(only.body["data"].as_array().unwrap());
    assert_eq!(decrypted.len(), 2 + by_sync.len(), "{decrypted:?}");
    assert!(decrypted.iter().all(|a| *a == "api_key.decrypted"));
    for bad in ["limit=0", "before=x", "action=all", "tenant_id=x"] {
        let refused = call(
            &mut seen,
            http()
                .get(sink.url(&format!("/v1/stripe/audit?{bad}")))
                .bearer_auth(&t),
        )
        .await;
        assert_eq!(refused.status, 400, "{bad}: {:?}", refused.body);
    }
    let other = call(
        &mut seen,
        http()
            .get(sink.url("/v1/stripe/audit"))
            .bearer_auth(token("tenant_other", ENV)),
    )
    .await;
    assert_eq!(other.body, json!({"data": [], "has_more": false}));
    let anonymous = call(&mut seen, http().get(sink.url("/v1/stripe/audit"))).await;
    assert_eq!(anonymous.status, 401);

    // No secret anywhere: not in a row of the table, not in any answer of this test.
    let table: String = sqlx::query_scalar(
        "SELECT coalesce(string_agg(row_to_json(a)::text, E'\\n'), '') FROM audit_log a",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(table.lines().count(), rows.len() + by_sync.len());
    let mut secrets: Vec<String> = vec![API_KEY.into(), "AuditSecretKey".into(), NEW_KEY.into()];
    secrets.extend(WEBHOOK_SECRETS.iter().map(|s| s.to_string()));
    secrets.extend(
        WEBHOOK_SECRETS
            .iter()
            .map(|s| s.trim_start_matches("whsec_").to_owned()),
    );
    for entry in stack_keys.split(',') {
        secrets.push(entry.split_once(':').expect("key_id:material").1.to_owned());
    }
    for text in seen.0.iter().chain(std::iter::once(&table)) {
        for secret in &secrets {
            assert!(
                !text.contains(secret.as_str()),
                "a secret leaked into: {text}"
            );
        }
    }

    sink.terminate(Duration::from_secs(30)).await;
    ns.drop_databases().await;
}
