//! Meter events (v1 and v2), adjustments and summaries.

use std::time::Duration;

use serde_json::{json, Value};

use crate::helpers::{Receiver, TestStandin, KEY};

fn total(inspect: &Value, customer: &str, event_name: &str) -> i64 {
    inspect["totals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["customer"] == customer && t["event_name"] == event_name)
        .map_or(0, |t| t["total"].as_i64().unwrap())
}

#[tokio::test]
async fn identifier_is_unique_for_24_hours_then_counted_again() {
    let s = TestStandin::start().await;
    let c = s.customer().await;
    s.meter("api_call", "sum").await;
    let now = s.now().await;
    let first = s.meter_event("api_call", &c, "5", "win-1", now).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.body["object"], "billing.meter_event");
    assert_eq!(first.body["identifier"], "win-1");
    assert_eq!(first.body["payload"]["value"], "5");

    s.advance(23 * 3600).await;
    let now = s.now().await;
    let dup = s.meter_event("api_call", &c, "5", "win-1", now).await;
    assert_eq!(dup.status, 400);
    assert_eq!(dup.body["error"]["type"], "invalid_request_error");
    assert!(
        dup.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("win-1"),
        "the error names the duplicate identifier: {}",
        dup.body
    );
    assert_eq!(total(&s.inspect(KEY).await, &c, "api_call"), 5);

    // Past 24 h from the first receipt the same identifier is counted again: Stripe alone
    // cannot stop double billing of an old window.
    s.advance(3600 + 1).await;
    let now = s.now().await;
    let again = s.meter_event("api_call", &c, "5", "win-1", now).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(total(&s.inspect(KEY).await, &c, "api_call"), 10);

    // Per account: another account may use the same identifier.
    s.control("/accounts", json!({ "secret_key": "sk_test_two" }))
        .await;
    let other = s
        .send(
            reqwest::Method::POST,
            Some("sk_test_two"),
            "/v1/billing/meter_events",
            &format!("event_name=api_call&payload[stripe_customer_id]=cus_x&payload[value]=1&identifier=win-1&timestamp={now}"),
            None,
        )
        .await;
    assert_eq!(other.status, 200);
}

#[tokio::test]
async fn timestamp_must_be_within_35_days_past_and_5_minutes_future() {
    let s = TestStandin::start().await;
    let c = s.customer().await;
    s.meter("api_call", "sum").await;
    // The clock keeps ticking between reading it and the request landing, so each side of each
    // bound is probed 10 s away from it; the exact second is pinned by rules::tests.
    let now = s.now().await;
    let past_ok = s
        .meter_event("api_call", &c, "1", "p-ok", now - 35 * 86400 + 10)
        .await;
    assert_eq!(past_ok.status, 200, "{}", past_ok.body);
    let past_bad = s
        .meter_event("api_call", &c, "1", "p-bad", now - 35 * 86400 - 10)
        .await;
    assert_eq!(past_bad.status, 400);
    assert_eq!(past_bad.body["error"]["param"], "timestamp");
    assert_eq!(past_bad.body["error"]["code"], "timestamp_too_far_in_past");
    let future_ok = s.meter_event("api_call", &c, "1", "f-ok", now + 290).await;
    assert_eq!(future_ok.status, 200, "{}", future_ok.body);
    let future_bad = s.meter_event("api_call", &c, "1", "f-bad", now + 310).await;
    assert_eq!(future_bad.status, 400);
    assert_eq!(future_bad.body["error"]["code"], "timestamp_in_future");
    let not_a_number = s
        .post(
            "/v1/billing/meter_events",
            &format!("event_name=api_call&payload[stripe_customer_id]={c}&payload[value]=1&timestamp=yesterday"),
        )
        .await;
    assert_eq!(not_a_number.status, 400);
    assert_eq!(
        not_a_number.body["error"]["code"],
        "parameter_invalid_integer"
    );
}

#[tokio::test]
async fn values_must_be_whole_integer_strings_of_at_most_15_digits() {
    let s = TestStandin::start().await;
    let c = s.customer().await;
    s.meter("api_call", "sum").await;
    let now = s.now().await;
    for (i, bad) in ["1.5", "1e3", "abc", "%2B1"].iter().enumerate() {
        let a = s
            .meter_event("api_call", &c, bad, &format!("bad-{i}"), now)
            .await;
        assert_eq!(a.status, 400, "{bad}: {}", a.body);
        assert_eq!(a.body["error"]["param"], "payload[value]");
    }
    let long = s
        .meter_event("api_call", &c, "1000000000000000", "long", now)
        .await;
    assert_eq!(long.status, 400);
    assert_eq!(
        long.body["error"]["code"],
        "meter_event_value_too_many_digits"
    );
    let max = s
        .meter_event("api_call", &c, "999999999999999", "max", now)
        .await;
    assert_eq!(max.status, 200);
    let negative = s
        .meter_event("api_call", &c, "-999999999999999", "neg", now)
        .await;
    assert_eq!(negative.status, 200, "negative corrections are allowed");
    assert_eq!(total(&s.inspect(KEY).await, &c, "api_call"), 0);
}

#[tokio::test]
async fn concurrent_requests_on_one_customer_and_meter_get_429() {
    let s = TestStandin::start().await;
    let c1 = s.customer().await;
    let c2 = s.customer().await;
    s.meter("api_call", "sum").await;
    s.control(
        "/faults",
        json!({ "rate_slow": 1.0, "slow_ms": 1500, "path_prefix": "/v1/billing/meter_events" }),
    )
    .await;
    let now = s.now().await;
    let (a, b) = tokio::join!(s.meter_event("api_call", &c1, "1", "c-a", now), async {
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.meter_event("api_call", &c1, "1", "c-b", now).await
    });
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(b.status, 429, "{}", b.body);
    assert_eq!(b.body["error"]["code"], "lock_timeout");

    // Different customers do not block each other.
    let (x, y) = tokio::join!(
        s.meter_event("api_call", &c1, "1", "d-a", now),
        s.meter_event("api_call", &c2, "1", "d-b", now)
    );
    assert_eq!((x.status, y.status), (200, 200));

    let inspect = s.inspect(KEY).await;
    let max_for = |c: &str| {
        inspect["concurrency"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["customer"] == c)
            .unwrap()["max_concurrent"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(max_for(&c1), 2, "the overlap is visible to pacing checks");
    assert_eq!(max_for(&c2), 1);
}

#[tokio::test]
async fn unknown_customer_or_meter_answers_200_and_reports_asynchronously() {
    let s = TestStandin::start().await;
    let (rx, url) = Receiver::start().await;
    s.webhook_endpoint(
        &url,
        &[
            "v1.billing.meter.error_report_triggered",
            "v1.billing.meter.no_meter_found",
        ],
    )
    .await;
    let meter = s.meter("api_call", "sum").await;
    let now = s.now().await;
    let unknown_customer = s
        .meter_event("api_call", "cus_ghost", "3", "u-1", now)
        .await;
    assert_eq!(unknown_customer.status, 200);
    let unknown_meter = s
        .meter_event("nothing_here", "cus_ghost", "3", "u-2", now)
        .await;
    assert_eq!(unknown_meter.status, 200);

    let got = rx.wait_for(|r| r.len() >= 2).await;
    let types: Vec<String> = got
        .iter()
        .map(|r| r.json()["type"].as_str().unwrap().to_string())
        .collect();
    assert!(types.contains(&"v1.billing.meter.error_report_triggered".to_string()));
    assert!(types.contains(&"v1.billing.meter.no_meter_found".to_string()));
    let report = got
        .iter()
        .map(|r| r.json())
        .find(|e| e["type"] == "v1.billing.meter.error_report_triggered")
        .unwrap();
    assert_eq!(report["object"], "v2.core.event");
    assert_eq!(report["related_object"]["id"], meter.as_str());
    // Thin event: details are fetched from the events API.
    let full = s
        .get(&format!(
            "/v2/core/events/{}",
            report["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(
        full.body["data"]["reason"]["error_types"][0]["code"],
        "meter_event_customer_not_found"
    );
    assert_eq!(
        full.body["data"]["reason"]["error_types"][0]["sample_errors"][0]["request"]["identifier"],
        "u-1"
    );
    let inspect = s.inspect(KEY).await;
    assert!(
        inspect["totals"].as_array().unwrap().is_empty(),
        "nothing counted"
    );
    assert_eq!(inspect["meter_events"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn cancel_works_within_24_hours_of_receipt_only() {
    let s = TestStandin::start().await;
    let c = s.customer().await;
    s.meter("api_call", "sum").await;
    let now = s.now().await;
    s.meter_event("api_call", &c, "7", "keep", now).await;
    s.meter_event("api_call", &c, "5", "drop", now).await;
    let s = &s;
    let cancel = |id: &'static str| async move {
        let form = format!("type=cancel&event_name=api_call&cancel[identifier]={id}");
        s.post("/v1/billing/meter_event_adjustments", &form).await
    };
    let ok = cancel("drop").await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.body["object"], "billing.meter_event_adjustment");
    assert_eq!(ok.body["cancel"]["identifier"], "drop");
    assert_eq!(total(&s.inspect(KEY).await, &c, "api_call"), 7);

    s.advance(24 * 3600).await;
    let late = cancel("keep").await;
    assert_eq!(late.status, 400, "{}", late.body);
    assert_eq!(late.body["error"]["param"], "cancel[identifier]");
    assert_eq!(total(&s.inspect(KEY).await, &c, "api_call"), 7);
}

#[tokio::test]
async fn summaries_aggregate_with_each_formula() {
    let s = TestStandin::start().await;
    let c = s.customer().await;
    let sum = s.meter("m_sum", "sum").await;
    let count = s.meter("m_count", "count").await;
    let last = s.meter("m_last", "last").await;
    let now = s.now().await;
    let hour = now - now.rem_euclid(3600) - 2 * 3600; // start of the hour two hours ago
    let events = [(hour + 10, "4"), (hour + 20, "6"), (hour + 3600 + 5, "-3")];
    for (name, _) in [("m_sum", ()), ("m_count", ()), ("m_last", ())] {
        for (i, (t, v)) in events.iter().enumerate() {
            let a = s.meter_event(name, &c, v, &format!("{name}-{i}"), *t).await;
            assert_eq!(a.status, 200, "{}", a.body);
        }
    }
    let s = &s;
    let c = &c;
    let summary = move |meter: String, grouping: &'static str| {
        let path = format!(
            "/v1/billing/meters/{meter}/event_summaries?customer={c}&start_time={hour}&end_time={}{grouping}",
            hour + 2 * 3600
        );
        async move { s.get(&path).await }
    };
    let values = |a: &crate::helpers::Answer| -> Vec<i64> {
        a.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["aggregated_value"].as_i64().unwrap())
            .collect()
    };
    let total_sum = summary(sum.clone(), "").await;
    assert_eq!(total_sum.status, 200, "{}", total_sum.body);
    assert_eq!(
        total_sum.body["data"][0]["object"],
        "billing.meter_event_summary"
    );
    assert_eq!(total_sum.body["data"][0]["start_time"], hour);
    assert_eq!(values(&total_sum), [7]);
    assert_eq!(values(&summary(count.clone(), "").await), [3]);
    assert_eq!(values(&summary(last.clone(), "").await), [-3]);
    let hourly = summary(sum, "&value_grouping_window=hour").await;
    assert_eq!(values(&hourly), [10, -3]);
    assert_eq!(hourly.body["data"][1]["start_time"], hour + 3600);
    assert_eq!(
        values(&summary(count, "&value_grouping_window=hour").await),
        [2, 1]
    );
    assert_eq!(
        values(&summary(last, "&value_grouping_window=hour").await),
        [6, -3]
    );

    let unaligned = s
        .get(&format!(
            "/v1/billing/meters/{}/event_summaries?customer={c}&start_time={}&end_time={}",
            total_sum.body["data"][0]["meter"].as_str().unwrap(),
            hour + 1,
            hour + 3600
        ))
        .await;
    assert_eq!(unaligned.status, 400);
}

#[tokio::test]
async fn v2_session_expires_after_15_minutes_and_stream_validates_asynchronously() {
    let s = TestStandin::start().await;
    let (rx, url) = Receiver::start().await;
    s.webhook_endpoint(&url, &["v1.billing.meter.error_report_triggered"])
        .await;
    let c = s.customer().await;
    s.meter("api_call", "sum").await;
    let session = s.post("/v2/billing/meter_event_session", "").await;
    assert_eq!(session.status, 200, "{}", session.body);
    assert_eq!(session.body["object"], "v2.billing.meter_event_session");
    let created = stripe_standin::rules::parse_rfc3339(session.body["created"].as_str().unwrap());
    let expires =
        stripe_standin::rules::parse_rfc3339(session.body["expires_at"].as_str().unwrap());
    assert_eq!(expires.unwrap() - created.unwrap(), 15 * 60);
    let token = session.body["authentication_token"]
        .as_str()
        .unwrap()
        .to_string();

    let s = &s;
    let stream = move |body: Value| {
        let token = token.clone();
        async move {
            let resp = s
                .client
                .post(format!("{}/v2/billing/meter_event_stream", s.base))
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let event = |id: &str, value: &str| {
        json!({
            "event_name": "api_call",
            "identifier": id,
            "payload": { "stripe_customer_id": c, "value": value }
        })
    };
    let (status, body) =
        stream(json!({ "events": [event("v2-a", "2"), event("v2-b", "3")] })).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(total(&s.inspect(KEY).await, &c, "api_call"), 5);

    // A bad value is not a synchronous error on the stream: it is reported afterwards.
    let (status, _) = stream(json!({ "events": [event("v2-c", "1.5")] })).await;
    assert_eq!(status, 200);
    let got = rx.wait_for(|r| !r.is_empty()).await;
    let id = got[0].json()["id"].as_str().unwrap().to_string();
    let full = s.get(&format!("/v2/core/events/{id}")).await;
    assert_eq!(
        full.body["data"]["reason"]["error_types"][0]["code"],
        "meter_event_invalid_value"
    );

    let too_many: Vec<Value> = (0..101).map(|i| event(&format!("m{i}"), "1")).collect();
    let (status, _) = stream(json!({ "events": too_many })).await;
    assert_eq!(status, 400, "at most 100 events per request");

    s.advance(15 * 60).await;
    let (status, body) = stream(json!({ "events": [event("v2-d", "1")] })).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "billing_meter_event_session_expired");
}

#[tokio::test]
async fn inspection_counts_requests_per_second_and_lists_events() {
    let s = TestStandin::start().await;
    let c = s.customer().await;
    s.meter("api_call", "count").await;
    let now = s.now().await;
    for i in 0..3 {
        let a = s
            .post(
                "/v1/billing/meter_events",
                &format!("event_name=api_call&payload[stripe_customer_id]={c}&identifier=i{i}&timestamp={now}"),
            )
            .await;
        assert_eq!(a.status, 200, "count meters need no value: {}", a.body);
    }
    let inspect = s.inspect(KEY).await;
    assert_eq!(inspect["meter_events"].as_array().unwrap().len(), 3);
    assert_eq!(inspect["meter_events"][0]["counted"], true);
    assert_eq!(inspect["totals"][0]["count"], 3);
    let requests: u64 = inspect["requests_per_second"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["count"].as_u64().unwrap())
        .sum();
    assert_eq!(requests, 5, "customer + meter + three events");
    assert!(inspect["max_requests_per_second"].as_u64().unwrap() >= 1);
}
