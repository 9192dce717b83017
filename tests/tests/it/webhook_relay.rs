//! The webhook relay through the real binary, the real Kafka broker and PostgreSQL: a customer
//! created in the local Stripe arrives on `stripe.webhooks` through a signed webhook; every
//! forged, stale, replayed or misaddressed delivery is refused with its status and code and
//! publishes nothing; a stopped broker gives a bounded 503 and the redelivery goes through.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use meterline_accounts::crypto::Keyring;
use meterline_accounts::stripe_config::{
    NewConfig, StripeApiKey, StripeConfigStore, WebhookSecret,
};
use meterline_schemas::{StripeWebhook, Topic};
use meterline_tests::api::{scope, send, Answer};
use meterline_tests::kafka::read_topic;
use meterline_tests::private::PrivateKafka;
use meterline_tests::{Namespace, ServiceProcess, Stack};
use serde_json::{json, Value};

const SECRET: &str = "whsec_tenant123current";
const NEXT_SECRET: &str = "whsec_tenant123rolled";
const OTHER_TENANT_SECRET: &str = "whsec_othertenant0001";
const GLOBAL_SECRET: &str = "whsec_globalfallback01";

/// Stores `secrets` as the Stripe configuration of `tenant`/`environment`.
async fn put_config(ns: &Namespace, tenant: &str, environment: &str, secrets: &[&str]) {
    let keys = Keyring::parse(&Stack::get().encryption_keys).expect("the stack's keys parse");
    StripeConfigStore::new(ns.pg_pool().await, keys)
        .put(
            &scope(tenant, environment),
            &NewConfig {
                api_key: StripeApiKey::parse("sk_test_standin").expect("a valid key"),
                webhook_secrets: secrets
                    .iter()
                    .map(|s| WebhookSecret::parse(s).expect("a valid secret"))
                    .collect(),
                sync_enabled: true,
                aggregation_window_minutes: 60,
                rate_limit_per_second: None,
            },
        )
        .await
        .expect("storing the stripe config");
}

async fn relay(ns: &Namespace, extra: &[(&str, &str)]) -> ServiceProcess {
    let mut env = ns.env();
    for (k, v) in extra {
        env.push(((*k).into(), (*v).into()));
    }
    ServiceProcess::spawn("webhook-relay", &env).await
}

fn webhook_path(tenant: &str, environment: &str) -> String {
    format!("/webhooks/stripe/{tenant}/{environment}")
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs() as i64
}

/// `t=<t>,v1=...` with one v1 per secret, computed independently of the relay's code.
fn signature(t: i64, secrets: &[&str], body: &[u8]) -> String {
    stripe_standin::signature::header(t, secrets, body).expect("hmac takes any key")
}

fn event_body(id: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id,
        "object": "event",
        "api_version": "2025-04-30.basil",
        "created": unix_now(),
        "data": {"object": {"id": format!("cus_{id}"), "object": "customer",
                            "metadata": {"external_id": format!("ext_{id}")}}},
        "livemode": false,
        "type": "customer.created"
    }))
    .expect("json")
}

async fn deliver(
    relay: &ServiceProcess,
    path: &str,
    signature: Option<&str>,
    body: &[u8],
) -> Answer {
    let mut request = reqwest::Client::new()
        .post(relay.url(path))
        .header("content-type", "application/json; charset=utf-8")
        .body(body.to_vec());
    if let Some(signature) = signature {
        request = request.header("stripe-signature", signature);
    }
    send(request).await
}

fn messages(records: &[meterline_tests::kafka::Record]) -> Vec<StripeWebhook> {
    records
        .iter()
        .map(|r| {
            StripeWebhook::from_json_bytes(&r.value)
                .expect("stripe.webhooks carries valid messages")
        })
        .collect()
}

/// A request to the stand-in's Stripe API as the test account.
async fn stripe_post(base: &str, path: &str, form: &[(&str, &str)]) -> Value {
    let response = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .bearer_auth("sk_test_standin")
        .form(form)
        .send()
        .await
        .expect("the stand-in answers");
    let status = response.status();
    let body: Value = response.json().await.expect("the stand-in answers JSON");
    assert!(status.is_success(), "{path}: {status} {body}");
    body
}

async fn rows(ns: &Namespace) -> Vec<(String, String, String, String)> {
    sqlx::query_as(
        "SELECT tenant_id, environment_id, event_id, event_type FROM webhook_deliveries
         ORDER BY tenant_id, environment_id, event_id",
    )
    .fetch_all(&ns.pg_pool().await)
    .await
    .expect("reading webhook_deliveries")
}

#[tokio::test]
async fn a_customer_created_in_stripe_arrives_on_stripe_webhooks() {
    let ns = Namespace::create().await;
    let (_, standin) = stripe_standin::spawn(stripe_standin::Config::for_tests())
        .await
        .expect("starting the stripe stand-in");
    let base = standin.base_url();
    let relay = relay(&ns, &[]).await;

    let endpoint = stripe_post(
        &base,
        "/v1/webhook_endpoints",
        &[
            (
                "url",
                relay.url(&webhook_path("tenant_123", "env_prod")).as_str(),
            ),
            ("enabled_events[]", "customer.created"),
        ],
    )
    .await;
    let secret = endpoint["secret"].as_str().expect("the endpoint's secret");
    assert!(secret.starts_with("whsec_"), "{endpoint}");
    put_config(&ns, "tenant_123", "env_prod", &[secret]).await;

    let customer = stripe_post(
        &base,
        "/v1/customers",
        &[
            ("email", "ada@example.com"),
            ("metadata[external_id]", "flexprice_customer_123"),
        ],
    )
    .await;
    let topic = ns.topic(Topic::StripeWebhooks);
    let records = read_topic(
        &ns,
        &topic,
        1,
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].key.as_deref(), Some("tenant_123:env_prod"));
    let hook = &messages(&records)[0];
    assert_eq!(hook.tenant_id.as_str(), "tenant_123");
    assert_eq!(hook.environment_id.as_str(), "env_prod");
    assert_eq!(hook.event_type.as_str(), "customer.created");
    assert!(!hook.livemode);
    assert_eq!(hook.payload["id"], json!(hook.event_id.as_str()));
    assert_eq!(hook.payload["type"], "customer.created");
    assert_eq!(hook.payload["data"]["object"]["id"], customer["id"]);
    assert_eq!(
        hook.payload["data"]["object"]["metadata"]["external_id"],
        "flexprice_customer_123"
    );
    assert_eq!(
        hook.created,
        hook.payload["created"].as_i64().expect("created")
    );

    // Stripe delivers at least once: with every delivery sent twice at once, the second
    // customer's event is still published once.
    reqwest::Client::new()
        .post(format!("{base}/_standin/webhooks/chaos"))
        .json(&json!({"duplicate": true}))
        .send()
        .await
        .expect("setting chaos");
    stripe_post(
        &base,
        "/v1/customers",
        &[("metadata[external_id]", "flexprice_customer_456")],
    )
    .await;
    let records = read_topic(
        &ns,
        &topic,
        2,
        Duration::from_secs(20),
        Duration::from_secs(3),
    )
    .await;
    let hooks = messages(&records);
    assert_eq!(hooks.len(), 2, "{hooks:?}");
    assert_eq!(
        hooks[1].payload["data"]["object"]["metadata"]["external_id"],
        "flexprice_customer_456"
    );

    // Every attempt the stand-in made was answered 2xx (so Stripe would not retry).
    let inspect: Value = reqwest::get(format!("{base}/_standin/accounts/sk_test_standin/inspect"))
        .await
        .expect("inspect")
        .json()
        .await
        .expect("inspect json");
    let attempts = inspect["webhook_attempts"].as_array().expect("attempts");
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    assert!(attempts.iter().all(|a| a["status"] == 200), "{attempts:?}");
    assert_eq!(rows(&ns).await.len(), 2);
    ns.drop_databases().await;
}

/// One delivery of the security table.
struct Case {
    name: &'static str,
    path: String,
    signature: Option<String>,
    body: Vec<u8>,
    status: u16,
    code: Option<&'static str>,
    /// The event id a 200 publishes.
    publishes: Option<&'static str>,
}

impl Case {
    fn signed(name: &'static str, event: &'static str, t: i64, secrets: &[&str]) -> Case {
        let body = event_body(event);
        Case {
            name,
            path: webhook_path("tenant_123", "env_prod"),
            signature: Some(signature(t, secrets, &body)),
            body,
            status: 200,
            code: None,
            publishes: Some(event),
        }
    }

    fn refused(mut self, status: u16, code: &'static str) -> Case {
        self.status = status;
        self.code = Some(code);
        self.publishes = None;
        self
    }

    fn to(mut self, tenant: &str, environment: &str) -> Case {
        self.path = webhook_path(tenant, environment);
        self
    }
}

/// Runs `cases` in order, returning each answer and adding what a case publishes to `accepted`.
async fn run(relay: &ServiceProcess, cases: Vec<Case>, accepted: &mut Vec<String>) -> Vec<Answer> {
    let mut answers = Vec::new();
    for case in cases {
        let answer = deliver(relay, &case.path, case.signature.as_deref(), &case.body).await;
        assert_eq!(
            answer.status, case.status,
            "{}: {:?}",
            case.name, answer.body
        );
        match case.code {
            Some(code) => assert_eq!(
                answer.error_code(),
                code,
                "{}: {:?}",
                case.name,
                answer.body
            ),
            None => assert_eq!(
                answer.body["received"], true,
                "{}: {:?}",
                case.name, answer.body
            ),
        }
        if let Some(event) = case.publishes {
            assert_eq!(answer.body, json!({"received": true}), "{}", case.name);
            accepted.push(event.to_owned());
        }
        answers.push(answer);
    }
    answers
}

#[tokio::test]
async fn forged_stale_replayed_and_misaddressed_deliveries_are_refused_and_publish_nothing() {
    let ns = Namespace::create().await;
    put_config(&ns, "tenant_123", "env_prod", &[SECRET]).await;
    put_config(&ns, "tenant_other", "env_prod", &[OTHER_TENANT_SECRET]).await;
    // A tenant whose configuration lists no secret: the global fallback applies to it only.
    put_config(&ns, "tenant_fallback", "env_prod", &[]).await;
    let relay = relay(
        &ns,
        &[
            ("STRIPE_WEBHOOK_SECRET", GLOBAL_SECRET),
            ("WEBHOOK_MAX_BODY_BYTES", "4096"),
        ],
    )
    .await;
    let now = unix_now();
    let mut accepted = Vec::new();

    let valid = Case::signed("valid delivery", "evt_valid_1", now, &[SECRET]);
    let replay = Case {
        name: "replay of the valid delivery",
        path: valid.path.clone(),
        signature: valid.signature.clone(),
        body: valid.body.clone(),
        status: 200,
        code: None,
        publishes: None,
    };
    let tampered = {
        let mut case = Case::signed("tampered body", "evt_tampered", now, &[SECRET])
            .refused(400, "invalid_signature");
        case.body = event_body("evt_tampered_other");
        case
    };
    let not_an_event = {
        let body = br#"{"hello":"world"}"#.to_vec();
        Case {
            name: "verified but not an event",
            path: webhook_path("tenant_123", "env_prod"),
            signature: Some(signature(now, &[SECRET], &body)),
            body,
            status: 400,
            code: Some("malformed_event"),
            publishes: None,
        }
    };
    let too_large = {
        let mut body = event_body("evt_too_large");
        body.extend(std::iter::repeat_n(b' ', 5000));
        Case {
            name: "body over the limit",
            path: webhook_path("tenant_123", "env_prod"),
            signature: Some(signature(now, &[SECRET], &body)),
            body,
            status: 413,
            code: Some("body_too_large"),
            publishes: None,
        }
    };
    let mut no_header = Case::signed("no signature header", "evt_no_header", now, &[SECRET])
        .refused(400, "missing_signature");
    no_header.signature = None;
    let mut garbage = Case::signed("garbage header", "evt_garbage", now, &[SECRET])
        .refused(400, "malformed_signature");
    garbage.signature = Some("garbage, not=a signature".into());

    let answers = run(
        &relay,
        vec![
            valid,
            no_header,
            garbage,
            Case::signed("wrong secret", "evt_wrong", now, &["whsec_notthesecret1"])
                .refused(400, "invalid_signature"),
            tampered,
            Case::signed("timestamp too old", "evt_old", now - 400, &[SECRET])
                .refused(400, "timestamp_outside_tolerance"),
            Case::signed(
                "timestamp in the future",
                "evt_future",
                now + 400,
                &[SECRET],
            )
            .refused(400, "timestamp_outside_tolerance"),
            replay,
            Case::signed(
                "two v1, one matching",
                "evt_two_v1",
                now,
                &["whsec_notthesecret1", SECRET],
            ),
            Case::signed(
                "another tenant's secret",
                "evt_cross",
                now,
                &[OTHER_TENANT_SECRET],
            )
            .refused(400, "invalid_signature"),
            Case::signed("unknown tenant", "evt_unknown_t", now, &[SECRET])
                .to("tenant_nobody", "env_prod")
                .refused(404, "not_found"),
            Case::signed("unknown environment", "evt_unknown_e", now, &[SECRET])
                .to("tenant_123", "env_nowhere")
                .refused(404, "not_found"),
            Case::signed("ids that cannot be ids", "evt_bad_ids", now, &[SECRET])
                .to("-tenant", "env%20prod")
                .refused(404, "not_found"),
            not_an_event,
            too_large,
            Case::signed(
                "global secret for a tenant without secrets",
                "evt_global",
                now,
                &[GLOBAL_SECRET],
            )
            .to("tenant_fallback", "env_prod"),
            Case::signed(
                "global secret for a tenant with its own",
                "evt_global_own",
                now,
                &[GLOBAL_SECRET],
            )
            .refused(400, "invalid_signature"),
            // The global secret opens no address for a tenant without a configuration.
            Case::signed(
                "global secret for an unknown tenant",
                "evt_global_unknown",
                now,
                &[GLOBAL_SECRET],
            )
            .to("tenant_nobody", "env_prod")
            .refused(404, "not_found"),
        ],
        &mut accepted,
    )
    .await;
    // The replay is answered as a duplicate.
    assert_eq!(
        answers[7].body,
        json!({"received": true, "duplicate": true})
    );
    // The 404s do not say which part of the address was unknown.
    assert_eq!(answers[10].body, answers[11].body);
    assert_eq!(answers[10].body, answers[12].body);
    let message = answers[10].body["error"]["message"].as_str().unwrap_or("");
    assert!(
        !message.contains("tenant") && !message.contains("environment"),
        "{message}"
    );

    // A secret roll: both secrets while it rolls, then only the new one.
    put_config(&ns, "tenant_123", "env_prod", &[SECRET, NEXT_SECRET]).await;
    run(
        &relay,
        vec![
            Case::signed(
                "new secret during the roll",
                "evt_roll_new",
                now,
                &[NEXT_SECRET],
            ),
            Case::signed("old secret during the roll", "evt_roll_old", now, &[SECRET]),
        ],
        &mut accepted,
    )
    .await;
    put_config(&ns, "tenant_123", "env_prod", &[NEXT_SECRET]).await;
    run(
        &relay,
        vec![
            Case::signed(
                "old secret after the roll ended",
                "evt_after_old",
                now,
                &[SECRET],
            )
            .refused(400, "invalid_signature"),
            Case::signed(
                "new secret after the roll ended",
                "evt_after_new",
                now,
                &[NEXT_SECRET],
            ),
        ],
        &mut accepted,
    )
    .await;

    // Exactly the accepted events are on the topic, once each, and in the deduplication log.
    let records = read_topic(
        &ns,
        &ns.topic(Topic::StripeWebhooks),
        accepted.len(),
        Duration::from_secs(20),
        Duration::from_secs(3),
    )
    .await;
    let mut published: Vec<String> = messages(&records)
        .iter()
        .map(|m| m.event_id.as_str().to_owned())
        .collect();
    published.sort();
    accepted.sort();
    assert_eq!(published, accepted);
    let logged: BTreeSet<String> = rows(&ns).await.into_iter().map(|r| r.2).collect();
    assert_eq!(logged, accepted.iter().cloned().collect::<BTreeSet<_>>());
    for hook in messages(&records) {
        let expected_tenant = if hook.event_id.as_str() == "evt_global" {
            "tenant_fallback"
        } else {
            "tenant_123"
        };
        assert_eq!(hook.tenant_id.as_str(), expected_tenant);
    }

    // Every refusal is counted by reason.
    let metrics = reqwest::get(relay.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    for (reason, count) in [
        ("missing_signature", 1),
        ("malformed_signature", 1),
        ("invalid_signature", 5),
        ("timestamp_outside_tolerance", 2),
        ("not_found", 4),
        ("malformed_event", 1),
        ("body_too_large", 1),
    ] {
        let line = format!("webhook_relay_webhooks_rejected_total{{reason=\"{reason}\"}} {count}");
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} missing from:\n{metrics}"
        );
    }
    assert!(
        metrics
            .lines()
            .any(|l| l == "webhook_relay_webhooks_duplicate_total 1"),
        "{metrics}"
    );
    ns.drop_databases().await;
}

#[tokio::test]
async fn a_stopped_broker_gives_a_bounded_503_and_the_redelivery_is_relayed() {
    let kafka = PrivateKafka::start().await;
    let ns = Namespace::plan(&kafka.brokers(), &Stack::get().database_url);
    ns.create_topics().await;
    ns.create_postgres().await;
    put_config(&ns, "tenant_123", "env_prod", &[SECRET]).await;
    let relay = relay(&ns, &[("KAFKA_PRODUCE_TIMEOUT_MS", "2000")]).await;
    let path = webhook_path("tenant_123", "env_prod");
    let body = event_body("evt_during_outage");

    kafka.stop().await;
    let started = Instant::now();
    let answer = deliver(
        &relay,
        &path,
        Some(&signature(unix_now(), &[SECRET], &body)),
        &body,
    )
    .await;
    let took = started.elapsed();
    assert_eq!(answer.status, 503, "{:?}", answer.body);
    assert_eq!(answer.error_code(), "kafka_unavailable");
    assert_eq!(answer.headers["retry-after"], "5");
    // The bound is the 2 s produce timeout; allow scheduling slack on a busy machine.
    assert!(took < Duration::from_secs(10), "503 after {took:?}");
    assert!(
        rows(&ns).await.is_empty(),
        "nothing is marked relayed before kafka acknowledged"
    );

    kafka.resume().await;
    // Stripe redelivers the same event with a fresh signature; the same relay process takes it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answer = deliver(
            &relay,
            &path,
            Some(&signature(unix_now(), &[SECRET], &body)),
            &body,
        )
        .await;
        if answer.status == 200 {
            assert_eq!(answer.body, json!({"received": true}), "not a duplicate");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relay did not recover: {:?}\n{}",
            answer.body,
            relay.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let records = read_topic(
        &ns,
        &ns.topic(Topic::StripeWebhooks),
        1,
        Duration::from_secs(30),
        Duration::from_secs(2),
    )
    .await;
    // A publish that timed out may still have reached the broker: at least once, and the
    // event id is what consumers deduplicate on.
    assert!(!records.is_empty());
    assert!(messages(&records)
        .iter()
        .all(|m| m.event_id.as_str() == "evt_during_outage"));
    assert_eq!(rows(&ns).await.len(), 1);
    ns.drop_databases().await;
}
