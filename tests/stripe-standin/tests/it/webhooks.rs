//! Webhook endpoints, signed asynchronous delivery, retries, duplicates and secret rolls.

use serde_json::json;

use crate::helpers::{v1_count, verify, Receiver, TestStandin};

#[tokio::test]
async fn customer_events_are_delivered_signed_as_stripe_signs() {
    let s = TestStandin::start().await;
    let (rx, url) = Receiver::start().await;
    let (endpoint, secret) = s
        .webhook_endpoint(
            &url,
            &["customer.created", "customer.updated", "customer.deleted"],
        )
        .await;
    assert!(endpoint.starts_with("we_"));
    assert!(secret.starts_with("whsec_"));
    let fetched = s.get(&format!("/v1/webhook_endpoints/{endpoint}")).await;
    assert_eq!(fetched.body["object"], "webhook_endpoint");
    assert!(
        fetched.body.get("secret").is_none(),
        "only creation shows the secret"
    );

    let c = s.customer().await;
    let updated = s
        .post(&format!("/v1/customers/{c}"), "metadata[plan]=pro")
        .await;
    assert_eq!(updated.status, 200);
    let deleted = s
        .send(
            reqwest::Method::DELETE,
            Some(crate::helpers::KEY),
            &format!("/v1/customers/{c}"),
            "",
            None,
        )
        .await;
    assert_eq!(deleted.body["deleted"], true);

    let got = rx.wait_for(|r| r.len() >= 3).await;
    let mut types = Vec::new();
    for r in &got {
        assert!(
            verify(&r.signature, &secret, &r.body),
            "signature verifies: {}",
            r.signature
        );
        assert!(!verify(&r.signature, "whsec_wrong", &r.body));
        let t: i64 = r.signature.split(',').next().unwrap()[2..].parse().unwrap();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((wall - t).abs() <= 300, "t is within Stripe's tolerance");
        let event = r.json();
        assert_eq!(event["object"], "event");
        assert_eq!(event["data"]["object"]["id"], c.as_str());
        types.push(event["type"].as_str().unwrap().to_string());
    }
    types.sort();
    assert_eq!(
        types,
        ["customer.created", "customer.deleted", "customer.updated"]
    );
    let created = got
        .iter()
        .map(|r| r.json())
        .find(|e| e["type"] == "customer.created")
        .unwrap();
    assert_eq!(created["data"]["object"]["metadata"]["external_id"], "t1");
    let update = got
        .iter()
        .map(|r| r.json())
        .find(|e| e["type"] == "customer.updated")
        .unwrap();
    assert_eq!(
        update["data"]["previous_attributes"]["metadata"],
        json!({ "external_id": "t1" })
    );
}

#[tokio::test]
async fn failed_deliveries_are_retried_until_a_2xx() {
    let s = TestStandin::start().await;
    let (rx, url) = Receiver::start().await;
    rx.fail_next(&[500, 503]);
    let (_, secret) = s.webhook_endpoint(&url, &["*"]).await;
    s.customer().await;
    let got = rx.wait_for(|r| r.len() >= 3).await;
    let ids: Vec<_> = got.iter().map(|r| r.json()["id"].clone()).collect();
    assert!(
        ids.iter().all(|id| *id == ids[0]),
        "the same event, retried"
    );
    assert!(got.iter().all(|r| verify(&r.signature, &secret, &r.body)));
    // No fourth attempt once one succeeded.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(rx.all().len(), 3);
    let attempts = s.inspect(crate::helpers::KEY).await["webhook_attempts"].clone();
    let statuses: Vec<_> = attempts
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [500, 503, 200]);
}

#[tokio::test]
async fn duplicate_switch_delivers_every_event_twice() {
    let s = TestStandin::start().await;
    let (rx, url) = Receiver::start().await;
    s.webhook_endpoint(&url, &["customer.created"]).await;
    s.control(
        "/webhooks/chaos",
        json!({ "duplicate": true, "shuffle_ms": 50 }),
    )
    .await;
    s.customer().await;
    s.customer().await;
    let got = rx.wait_for(|r| r.len() >= 4).await;
    let mut ids: Vec<String> = got
        .iter()
        .map(|r| r.json()["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 2, "two events, each delivered twice");
}

#[tokio::test]
async fn rolled_secret_sends_two_signatures_until_the_old_one_expires() {
    let s = TestStandin::start().await;
    let (rx, url) = Receiver::start().await;
    let (endpoint, old) = s.webhook_endpoint(&url, &["customer.created"]).await;
    let rolled = s
        .control(
            &format!("/webhook_endpoints/{endpoint}/roll_secret"),
            json!({ "expires_in_seconds": 3600 }),
        )
        .await;
    let new = rolled["secret"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(rolled["previous_secret"], old.as_str());

    s.customer().await;
    let got = rx.wait_for(|r| !r.is_empty()).await;
    assert_eq!(v1_count(&got[0].signature), 2);
    assert!(verify(&got[0].signature, &new, &got[0].body));
    assert!(verify(&got[0].signature, &old, &got[0].body));

    s.advance(3600).await;
    s.customer().await;
    let got = rx.wait_for(|r| r.len() >= 2).await;
    assert_eq!(v1_count(&got[1].signature), 1);
    assert!(verify(&got[1].signature, &new, &got[1].body));
    assert!(!verify(&got[1].signature, &old, &got[1].body));
}
