//! Keys, accounts, customers, meters, idempotency, rate limits and faults.

use reqwest::Method;
use serde_json::json;

use crate::helpers::{TestStandin, KEY};

#[tokio::test]
async fn unknown_key_is_401_and_balance_answers_for_a_known_one() {
    let s = TestStandin::start().await;
    let ok = s.get("/v1/balance").await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.body["object"], "balance");
    assert_eq!(ok.body["livemode"], false);

    let unknown = s
        .send(Method::GET, Some("sk_test_nobody"), "/v1/balance", "", None)
        .await;
    assert_eq!(unknown.status, 401);
    assert_eq!(unknown.body["error"]["type"], "invalid_request_error");
    let missing = s.send(Method::GET, None, "/v1/balance", "", None).await;
    assert_eq!(missing.status, 401);

    // curl -u sk_test_...: sends Basic auth.
    let basic = s
        .client
        .get(format!("{}/v1/balance", s.base))
        .basic_auth(KEY, Some(""))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 200);
}

#[tokio::test]
async fn accounts_are_separate_and_created_at_runtime() {
    let s = TestStandin::start().await;
    let created = s
        .control(
            "/accounts",
            json!({ "secret_key": "sk_live_other", "rate_limit": 100 }),
        )
        .await;
    assert_eq!(created["livemode"], true);
    assert_eq!(created["rate_limit"], 100);
    let c = s.customer().await;
    let other = s
        .send(
            Method::GET,
            Some("sk_live_other"),
            &format!("/v1/customers/{c}"),
            "",
            None,
        )
        .await;
    assert_eq!(other.status, 404, "customers are per account");
    assert_eq!(other.body["error"]["code"], "resource_missing");
    let balance = s
        .send(Method::GET, Some("sk_live_other"), "/v1/balance", "", None)
        .await;
    assert_eq!(balance.body["livemode"], true);
}

#[tokio::test]
async fn customers_create_retrieve_list_with_metadata_and_paging() {
    let s = TestStandin::start().await;
    let created = s
        .post(
            "/v1/customers",
            "email=a%40example.com&metadata[external_id]=tenant%2042&metadata[plan]=pro",
        )
        .await;
    assert_eq!(created.status, 200);
    assert_eq!(created.body["object"], "customer");
    assert_eq!(created.body["email"], "a@example.com");
    assert_eq!(created.body["metadata"]["external_id"], "tenant 42");
    assert_eq!(created.body["metadata"]["plan"], "pro");
    let id = created.body["id"].as_str().unwrap();
    assert!(id.starts_with("cus_"));

    let fetched = s.get(&format!("/v1/customers/{id}")).await;
    assert_eq!(fetched.body, created.body);

    for _ in 0..4 {
        s.customer().await;
    }
    // Newest first; five customers, pages of two.
    let mut seen = Vec::new();
    let mut query = "limit=2".to_string();
    loop {
        let page = s.get(&format!("/v1/customers?{query}")).await;
        assert_eq!(page.status, 200, "{}", page.body);
        assert_eq!(page.body["object"], "list");
        let data = page.body["data"].as_array().unwrap().clone();
        assert!(data.len() <= 2);
        seen.extend(data.iter().map(|c| c["id"].as_str().unwrap().to_string()));
        if page.body["has_more"] == false {
            break;
        }
        query = format!("limit=2&starting_after={}", seen.last().unwrap());
    }
    assert_eq!(seen.len(), 5);
    assert_eq!(
        seen.last().unwrap(),
        id,
        "the first customer is listed last"
    );

    let missing = s.get("/v1/customers/cus_nope").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.body["error"]["code"], "resource_missing");
}

#[tokio::test]
async fn unknown_and_malformed_parameters_are_refused_with_stripe_errors() {
    let s = TestStandin::start().await;
    let unknown = s.post("/v1/customers", "bogus=1").await;
    assert_eq!(unknown.status, 400);
    assert_eq!(unknown.body["error"]["type"], "invalid_request_error");
    assert_eq!(unknown.body["error"]["code"], "parameter_unknown");
    assert_eq!(unknown.body["error"]["param"], "bogus");
    assert!(unknown.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("bogus"));

    let malformed = s.post("/v1/customers", "metadata[a=1").await;
    assert_eq!(malformed.status, 400);
    assert_eq!(malformed.body["error"]["type"], "invalid_request_error");

    let no_route = s.post("/v1/billing/meter_events/batch", "").await;
    assert_eq!(
        no_route.status, 404,
        "Stripe's v1 API has no batch endpoint"
    );
}

#[tokio::test]
async fn meters_take_stripe_defaults_and_list() {
    let s = TestStandin::start().await;
    let created = s
        .post(
            "/v1/billing/meters",
            "display_name=API%20calls&event_name=api_call&default_aggregation[formula]=sum",
        )
        .await;
    assert_eq!(created.status, 200, "{}", created.body);
    let m = &created.body;
    assert_eq!(m["object"], "billing.meter");
    assert_eq!(m["default_aggregation"]["formula"], "sum");
    assert_eq!(
        m["customer_mapping"]["event_payload_key"],
        "stripe_customer_id"
    );
    assert_eq!(m["customer_mapping"]["type"], "by_id");
    assert_eq!(m["value_settings"]["event_payload_key"], "value");
    assert_eq!(m["status"], "active");

    let custom = s
        .post(
            "/v1/billing/meters",
            "display_name=T&event_name=tokens&default_aggregation[formula]=last&customer_mapping[event_payload_key]=cust&customer_mapping[type]=by_id&value_settings[event_payload_key]=n",
        )
        .await;
    assert_eq!(custom.body["customer_mapping"]["event_payload_key"], "cust");
    assert_eq!(custom.body["value_settings"]["event_payload_key"], "n");

    let bad = s
        .post(
            "/v1/billing/meters",
            "display_name=X&event_name=x&default_aggregation[formula]=max",
        )
        .await;
    assert_eq!(bad.status, 400);
    assert_eq!(bad.body["error"]["param"], "default_aggregation[formula]");
    let missing = s
        .post("/v1/billing/meters", "display_name=X&event_name=x")
        .await;
    assert_eq!(missing.status, 400);
    assert_eq!(missing.body["error"]["code"], "parameter_missing");

    let list = s.get("/v1/billing/meters").await;
    assert_eq!(list.body["data"].as_array().unwrap().len(), 2);
    let one = s
        .get(&format!("/v1/billing/meters/{}", m["id"].as_str().unwrap()))
        .await;
    assert_eq!(one.body["event_name"], "api_call");
}

#[tokio::test]
async fn idempotency_key_replays_refuses_other_params_and_skips_failed_validation() {
    let s = TestStandin::start().await;
    let post = |form: &'static str, key: &'static str| {
        s.send(Method::POST, Some(KEY), "/v1/customers", form, Some(key))
    };
    let first = post("email=a%40x.io", "k1").await;
    let again = post("email=a%40x.io", "k1").await;
    assert_eq!(first.status, 200);
    assert_eq!(again.status, 200);
    assert_eq!(
        again.body, first.body,
        "same key, same params: the first answer"
    );
    assert_eq!(again.headers["idempotent-replayed"], "true");
    let listed = s.get("/v1/customers").await;
    assert_eq!(
        listed.body["data"].as_array().unwrap().len(),
        1,
        "created once"
    );

    let other = post("email=b%40x.io", "k1").await;
    assert_eq!(other.status, 400);
    assert_eq!(other.body["error"]["type"], "idempotency_error");

    // A request refused by validation is not stored: the key stays free.
    let invalid = post("bogus=1", "k2").await;
    assert_eq!(invalid.status, 400);
    let valid = post("email=c%40x.io", "k2").await;
    assert_eq!(valid.status, 200);

    // A 500 is stored and replayed, even after the fault is gone.
    s.control("/faults", json!({ "rate_500": 1.0 })).await;
    let failed = post("email=d%40x.io", "k3").await;
    assert_eq!(failed.status, 500);
    assert_eq!(failed.body["error"]["type"], "api_error");
    s.control("/faults", json!({})).await;
    let replayed = post("email=d%40x.io", "k3").await;
    assert_eq!(replayed.status, 500);
    assert_eq!(replayed.body, failed.body);
    // One 500 was injected; its replay is counted as no new fault.
    assert_eq!(faults_injected(&s).await["server_error"], 1);

    // Keys are forgotten after 24 h.
    s.advance(24 * 3600 + 1).await;
    let reused = post("email=e%40x.io", "k1").await;
    assert_eq!(reused.status, 200);
    assert_ne!(reused.body["id"], first.body["id"]);

    // Idempotency is per account.
    s.control("/accounts", json!({ "secret_key": "sk_test_b" }))
        .await;
    let b = s
        .send(
            Method::POST,
            Some("sk_test_b"),
            "/v1/customers",
            "email=z%40x.io",
            Some("k2"),
        )
        .await;
    assert_eq!(b.status, 200);
}

#[tokio::test]
async fn concurrent_use_of_a_key_is_409_and_a_dropped_answer_is_replayed() {
    let s = TestStandin::start().await;
    s.control(
        "/faults",
        json!({ "rate_slow": 1.0, "slow_ms": 1500, "path_prefix": "/v1/customers" }),
    )
    .await;
    let post = |key: &'static str| {
        s.send(
            Method::POST,
            Some(KEY),
            "/v1/customers",
            "email=a%40x.io",
            Some(key),
        )
    };
    let (first, second) = tokio::join!(post("same"), async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        post("same").await
    });
    assert_eq!(first.status, 200);
    assert_eq!(second.status, 409, "{}", second.body);
    assert_eq!(second.body["error"]["type"], "idempotency_error");

    // The work is done and stored, the answer lost; the retry under the same key gets it.
    s.control(
        "/faults",
        json!({ "rate_drop": 1.0, "path_prefix": "/v1/customers" }),
    )
    .await;
    let lost = s
        .client
        .post(format!("{}/v1/customers", s.base))
        .bearer_auth(KEY)
        .header("idempotency-key", "lost")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("email=b%40x.io")
        .send()
        .await;
    assert!(lost.is_err());
    s.control("/faults", json!({})).await;
    let retried = post_form(&s, "lost", "email=b%40x.io").await;
    assert_eq!(retried.status, 200);
    assert_eq!(retried.headers["idempotent-replayed"], "true");
    let listed = s.get("/v1/customers?email=b%40x.io").await;
    assert_eq!(
        listed.body["data"].as_array().unwrap().len(),
        1,
        "created once"
    );
    assert_eq!(listed.body["data"][0]["id"], retried.body["id"]);
    // The refused concurrent request was never delayed: one slow answer, one dropped.
    assert_eq!(
        faults_injected(&s).await,
        json!({"too_many_requests": 0, "server_error": 0, "slow": 1, "dropped": 1})
    );
}

/// The faults the stand-in applied so far, by kind.
async fn faults_injected(s: &TestStandin) -> serde_json::Value {
    s.client
        .get(format!("{}/_standin/faults/injected", s.base))
        .send()
        .await
        .expect("the stand-in answers")
        .json()
        .await
        .expect("the counts are JSON")
}

async fn post_form(s: &TestStandin, key: &str, form: &str) -> crate::helpers::Answer {
    s.send(Method::POST, Some(KEY), "/v1/customers", form, Some(key))
        .await
}

#[tokio::test]
async fn live_mode_meter_events_are_outside_the_basic_limit() {
    let s = TestStandin::start().await;
    s.control(
        "/accounts",
        json!({ "secret_key": "sk_live_big", "rate_limit": 2 }),
    )
    .await;
    let now = s.now().await;
    for i in 0..6 {
        let a = s
            .send(
                Method::POST,
                Some("sk_live_big"),
                "/v1/billing/meter_events",
                &format!("event_name=e&payload[stripe_customer_id]=cus_{i}&payload[value]=1&timestamp={now}"),
                None,
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.body);
    }
}

#[tokio::test]
async fn account_rate_limit_answers_429_in_stripe_shape() {
    let s = TestStandin::start().await;
    s.control(
        "/accounts",
        json!({ "secret_key": "sk_test_slow", "rate_limit": 3 }),
    )
    .await;
    // Fired together so they land within a second or two even on a loaded machine.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..12 {
        let client = s.client.clone();
        let url = format!("{}/v1/balance", s.base);
        set.spawn(async move {
            let resp = client
                .get(url)
                .bearer_auth("sk_test_slow")
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let retry = resp
                .headers()
                .get("stripe-should-retry")
                .map(|v| v.to_str().unwrap().to_string());
            (
                status,
                retry,
                resp.json::<serde_json::Value>().await.unwrap(),
            )
        });
    }
    let answers = set.join_all().await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    let (_, retry, body) = answers
        .iter()
        .find(|a| a.0 == 429)
        .expect("some request was limited");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], "rate_limit");
    assert_eq!(retry.as_deref(), Some("true"));
    // Every second counted at most 3 admitted requests.
    let inspect = s.inspect("sk_test_slow").await;
    let seconds = inspect["requests_per_second"].as_array().unwrap().len();
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert!(
        admitted <= 3 * seconds,
        "{admitted} admitted over {seconds} s"
    );

    // The default is 25 per second (test mode).
    let inspect = s.inspect(KEY).await;
    assert_eq!(inspect["account"]["rate_limit"], 25);
    let counted: u64 = s.inspect("sk_test_slow").await["requests_per_second"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert_eq!(counted, 12, "every request is counted, limited or not");
}

#[tokio::test]
async fn injected_faults_429_and_dropped_connections() {
    let s = TestStandin::start().await;
    s.control("/faults", json!({ "rate_429": 1.0, "seed": 3 }))
        .await;
    let limited = s.get("/v1/balance").await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.body["error"]["code"], "rate_limit");

    s.control(
        "/faults",
        json!({ "rate_drop": 1.0, "path_prefix": "/v1/customers" }),
    )
    .await;
    let dropped = s
        .client
        .post(format!("{}/v1/customers", s.base))
        .bearer_auth(KEY)
        .body("email=x%40y.z")
        .header("content-type", "application/x-www-form-urlencoded")
        .send()
        .await;
    assert!(dropped.is_err(), "the connection closes without an answer");
    s.control("/faults", json!({})).await;
    // The work was done even though the answer was lost.
    let listed = s.get("/v1/customers").await;
    assert_eq!(listed.body["data"].as_array().unwrap().len(), 1);
}
