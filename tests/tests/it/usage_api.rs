//! `GET /v1/usage` on the real stack: events sent through ingest (with client retries that
//! repeat ids, and a copy straight into Kafka) are aggregated, and the totals the usage API
//! answers equal, window by window, the totals the aggregator published on `usage.windows`
//! for the sync, for every aggregation. Bad queries get their 4xx codes; another tenant sees
//! nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use meterline_schemas::{BillingPeriod, Decimal};
use meterline_tests::api::{post_json, send, token, Answer};
use meterline_tests::usage::{
    create_meter, event, hour_start, produce_events, spawn_aggregator, Expected, WindowWatcher,
};
use meterline_tests::{Namespace, ServiceProcess};
use serde_json::{json, Value};
use time::OffsetDateTime;

const TENANT: &str = "tenant_usage";

fn dec(s: &str) -> Decimal {
    s.parse().unwrap()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

async fn usage(ingest: &ServiceProcess, tenant: &str, query: &str) -> Answer {
    send(
        reqwest::Client::new()
            .get(ingest.url(&format!("/v1/usage?{query}")))
            .bearer_auth(token(tenant, "env_prod")),
    )
    .await
}

#[tokio::test]
async fn usage_totals_equal_what_the_sync_is_sent() {
    let ns = Namespace::create().await;
    // Copies of an id stay in separate parts: only FINAL can make them count once.
    ns.stop_merges().await;
    let _aggregator = spawn_aggregator(&ns, &[]).await;
    let ingest = ServiceProcess::spawn("ingest", &ns.env()).await;
    for meter in [
        json!({"id": "calls", "event_name": "api.request", "aggregation": "COUNT"}),
        json!({"id": "bytes", "event_name": "api.request", "aggregation": "SUM", "property": "bytes"}),
        json!({"id": "peak", "event_name": "api.request", "aggregation": "MAX", "property": "latency_ms"}),
        json!({"id": "users", "event_name": "api.request", "aggregation": "COUNT_UNIQUE", "property": "user"}),
        json!({"id": "seats", "event_name": "seats.updated", "aggregation": "LATEST", "property": "seats"}),
    ] {
        create_meter(&ns, TENANT, "env_prod", meter).await;
    }

    let w0 = hour_start(6);
    let w1 = w0 + time::Duration::HOUR;
    let minutes = time::Duration::minutes;
    let call = |id: &str, customer: &str, at: OffsetDateTime, bytes: &str, ms: u32, user: &str| {
        json!({"id": id, "customer_id": customer, "event_name": "api.request",
               "timestamp": rfc3339(at),
               "properties": {"bytes": bytes, "latency_ms": ms, "user": user}})
    };
    let seats = |id: &str, at: OffsetDateTime, n: u32| {
        json!({"id": id, "customer_id": "cust_b", "event_name": "seats.updated",
               "timestamp": rfc3339(at), "properties": {"seats": n}})
    };
    let first = call("u1", "cust_a", w0 + minutes(1), "10", 5, "alice");
    let batch = vec![
        first.clone(),
        call("u2", "cust_a", w0 + minutes(20), "20.5", 50, "bob"),
        call(
            "u3",
            "cust_a",
            w1 - time::Duration::SECOND,
            "30",
            7,
            "alice",
        ),
        // Exactly at the end of W0: it belongs to W1.
        call("u4", "cust_a", w1, "1", 3, "alice"),
        call("u5", "cust_b", w0 + minutes(5), "4", 9, "carol"),
        seats("s1", w0 + minutes(10), 5),
        seats("s2", w0 + minutes(50), 3),
        // A client retry inside the same request.
        first.clone(),
    ];
    let url = ingest.url("/v1/events/bulk");
    let answer = post_json(&url, &token(TENANT, "env_prod"), &json!({"events": batch})).await;
    assert_eq!(answer.status, 202, "{:?}", answer.body);
    // The same request retried whole, as a client does after a timeout.
    let answer = post_json(&url, &token(TENANT, "env_prod"), &json!({"events": batch})).await;
    assert_eq!(answer.status, 202, "{:?}", answer.body);
    // And a copy of u2 written straight to Kafka by another producer.
    produce_events(
        &ns,
        &[event(
            TENANT,
            "u2",
            "cust_a",
            "api.request",
            w0 + minutes(20),
            json!({"bytes": "20.5", "latency_ms": 50, "user": "bob"}),
        )],
    )
    .await;

    let key =
        |c: &str, m: &str, w: OffsetDateTime| (c.to_owned(), m.to_owned(), w.unix_timestamp());
    let mut expected: Expected = BTreeMap::from([
        (key("cust_a", "calls", w0), (dec("3"), 3)),
        (key("cust_a", "bytes", w0), (dec("60.5"), 3)),
        (key("cust_a", "peak", w0), (dec("50"), 3)),
        (key("cust_a", "users", w0), (dec("2"), 3)),
        (key("cust_a", "calls", w1), (dec("1"), 1)),
        (key("cust_a", "bytes", w1), (dec("1"), 1)),
        (key("cust_a", "peak", w1), (dec("3"), 1)),
        (key("cust_a", "users", w1), (dec("1"), 1)),
        (key("cust_b", "calls", w0), (dec("1"), 1)),
        (key("cust_b", "bytes", w0), (dec("4"), 1)),
        (key("cust_b", "peak", w0), (dec("9"), 1)),
        (key("cust_b", "users", w0), (dec("1"), 1)),
        (key("cust_b", "seats", w0), (dec("3"), 2)),
    ]);
    // The sync sends a maximum or a distinct count as the billing period to date (for
    // Stripe's `last` formula): W1's include W0's events when both are in one calendar month.
    // The usage API shows each window's own, as above.
    let own = expected.clone();
    let one_period = BillingPeriod::containing(w0) == BillingPeriod::containing(w1);
    if one_period {
        expected.insert(key("cust_a", "peak", w1), (dec("50"), 4));
        expected.insert(key("cust_a", "users", w1), (dec("2"), 4));
    }
    let mut windows = WindowWatcher::new(&ns);
    windows.wait_for(&expected, Duration::from_secs(90)).await;
    // Anything still on its way would show up here and make the comparison below unfair.
    windows.read_for(Duration::from_secs(2)).await;
    let published = windows.totals();
    assert_eq!(published, expected);

    // Every (customer, meter) over a range reaching into W1 and beyond, as the API answers.
    let from = rfc3339(w0 - time::Duration::HOUR);
    let to = rfc3339(w1 + minutes(30));
    let mut answered: Expected = BTreeMap::new();
    for customer in ["cust_a", "cust_b"] {
        for meter in ["calls", "bytes", "peak", "users", "seats"] {
            let a = usage(
                &ingest,
                TENANT,
                &format!("customer_id={customer}&meter_id={meter}&from={from}&to={to}"),
            )
            .await;
            assert_eq!(a.status, 200, "{customer}/{meter}: {}", a.body);
            assert_eq!(a.body["window_minutes"], Value::Null);
            for w in a.body["data"].as_array().unwrap() {
                let start = OffsetDateTime::parse(
                    w["window_start"].as_str().unwrap(),
                    &time::format_description::well_known::Rfc3339,
                )
                .unwrap();
                assert_eq!(w["window_minutes"], 60, "{w}");
                let quantity: Decimal = w["quantity"].as_str().unwrap().parse().unwrap();
                answered.insert(
                    key(customer, meter, start),
                    (quantity.normalize(), w["event_count"].as_u64().unwrap()),
                );
            }
        }
    }
    assert_eq!(
        answered, own,
        "the usage API answers every window's own aggregate"
    );

    // One two-hour window over both: the aggregates of all the events, not a sum of totals.
    let a = usage(
        &ingest,
        TENANT,
        &format!("customer_id=cust_a&meter_id=users&from={from}&to={to}&window=120"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let data = a.body["data"].as_array().unwrap();
    let total_users: u64 = data
        .iter()
        .map(|w| w["quantity"].as_str().unwrap().parse::<u64>().unwrap())
        .sum();
    let total_events: u64 = data
        .iter()
        .map(|w| w["event_count"].as_u64().unwrap())
        .sum();
    assert_eq!(total_events, 4, "{}", a.body);
    // alice and bob in W0, alice again in W1: 2 users when both hours share a two-hour
    // window (aligned to multiples of 120 minutes since the epoch), else 2 + 1.
    let shared = w0.unix_timestamp().rem_euclid(7200) == 0;
    assert_eq!(total_users, if shared { 2 } else { 3 }, "{}", a.body);
    assert_eq!(data.len(), if shared { 1 } else { 2 }, "{}", a.body);

    // Another tenant sees no meter of ours, hence nothing.
    let a = usage(
        &ingest,
        "tenant_other",
        &format!("customer_id=cust_a&meter_id=calls&from={from}&to={to}"),
    )
    .await;
    assert_eq!(
        (a.status, a.error_code()),
        (404, "unknown_meter"),
        "{}",
        a.body
    );

    // Refusals: clear codes, JSON.
    let base = format!("customer_id=cust_a&meter_id=calls&from={from}&to={to}");
    let wide_from = rfc3339(w0 - time::Duration::days(400));
    for (query, status, code) in [
        (
            format!("meter_id=calls&from={from}&to={to}"),
            400,
            "missing_parameter",
        ),
        (format!("{base}&tenant_id=x"), 400, "unknown_parameter"),
        (
            format!("customer_id=cust_a&meter_id=calls&from={to}&to={from}"),
            400,
            "invalid_range",
        ),
        (
            format!("customer_id=cust_a&meter_id=calls&from=yesterday&to={to}"),
            400,
            "invalid_value",
        ),
        (format!("{base}&window=0"), 400, "invalid_window"),
        (format!("{base}&window=abc"), 400, "invalid_window"),
        (
            format!("customer_id=cust_a&meter_id=calls&from={wide_from}&to={to}"),
            400,
            "range_too_wide",
        ),
        (
            format!("customer_id=cust_a&meter_id=nope&from={from}&to={to}"),
            404,
            "unknown_meter",
        ),
    ] {
        let a = usage(&ingest, TENANT, &query).await;
        assert_eq!(
            (a.status, a.error_code()),
            (status, code),
            "{query}: {}",
            a.body
        );
    }
    let a = send(reqwest::Client::new().get(ingest.url(&format!("/v1/usage?{base}")))).await;
    assert_eq!(
        (a.status, a.error_code()),
        (401, "missing_token"),
        "{}",
        a.body
    );
    ns.drop_databases().await;
}
