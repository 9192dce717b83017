//! Contract check against Stripe's official stripe-mock (built by `dev/stripe-mock.sh install`):
//! for the routes both serve, the same valid requests are accepted by both and the same
//! malformed requests are refused by both. stripe-mock validates against Stripe's OpenAPI spec,
//! so a disagreement means our stand-in accepts what Stripe would refuse, or the reverse.
//! Never skipped: a missing binary fails loudly.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::helpers::{TestStandin, KEY};

struct StripeMock {
    child: Child,
    base: String,
}

impl Drop for StripeMock {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stripe_mock_binary() -> PathBuf {
    // Same layout as dev/lib.sh: CACHE=${METERLINE_CACHE:-$ROOT/.cache}.
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cache = std::env::var_os("METERLINE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".cache"));
    cache.join("stripe-mock/bin/stripe-mock")
}

async fn start_stripe_mock() -> StripeMock {
    let bin = stripe_mock_binary();
    assert!(
        bin.exists(),
        "stripe-mock binary not found at {}: run dev/up (dev/stripe-mock.sh install)",
        bin.display()
    );
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(&bin)
        .arg("-http-addr")
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let mock = StripeMock {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return mock;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("stripe-mock did not start listening on port {port}");
}

async fn call(
    client: &reqwest::Client,
    base: &str,
    method: &str,
    path: &str,
    form: &str,
) -> (u16, Value) {
    let url = if method == "GET" && !form.is_empty() {
        format!("{base}{path}?{form}")
    } else {
        format!("{base}{path}")
    };
    let mut req = match method {
        "GET" => client.get(url),
        _ => client
            .post(url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form.to_string()),
    };
    req = req.bearer_auth(KEY);
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn stripe_mock_and_stand_in_accept_and_refuse_the_same_requests() {
    let mock = start_stripe_mock().await;
    let s = TestStandin::start().await;
    let client = reqwest::Client::new();
    // Objects our stand-in needs to exist for the requests to be valid there too.
    let customer = s.customer().await;
    let meter = s.meter("contract_meter", "sum").await;
    let now = s.now().await;
    let minute = now - now.rem_euclid(60);

    let valid: Vec<(&str, String, String)> = vec![
        ("GET", "/v1/balance".into(), String::new()),
        ("POST", "/v1/customers".into(), "email=a%40b.co&name=Acme&metadata[external_id]=t42".into()),
        ("GET", "/v1/customers".into(), "limit=2".into()),
        ("GET", format!("/v1/customers/{customer}"), String::new()),
        (
            "POST",
            "/v1/webhook_endpoints".into(),
            "url=http://127.0.0.1:9/hook&enabled_events[]=customer.created&enabled_events[]=customer.updated".into(),
        ),
        (
            "POST",
            "/v1/billing/meters".into(),
            "display_name=Calls&event_name=calls&default_aggregation[formula]=sum&customer_mapping[type]=by_id&customer_mapping[event_payload_key]=stripe_customer_id&value_settings[event_payload_key]=value".into(),
        ),
        ("GET", "/v1/billing/meters".into(), String::new()),
        (
            "POST",
            "/v1/billing/meter_events".into(),
            format!("event_name=contract_meter&payload[stripe_customer_id]={customer}&payload[value]=3&identifier=contract-1&timestamp={now}"),
        ),
        (
            "POST",
            "/v1/billing/meter_event_adjustments".into(),
            "type=cancel&event_name=contract_meter&cancel[identifier]=contract-1".into(),
        ),
        (
            "GET",
            format!("/v1/billing/meters/{meter}/event_summaries"),
            format!("customer={customer}&start_time={}&end_time={minute}", minute - 3600),
        ),
        (
            "GET",
            format!("/v1/billing/meters/{meter}/event_summaries"),
            format!("customer={customer}&start_time={}&end_time={minute}&value_grouping_window=hour", minute - 3600),
        ),
    ];
    for (method, path, form) in &valid {
        let (ours, our_body) = call(&client, &s.base, method, path, form).await;
        let (theirs, their_body) = call(&client, &mock.base, method, path, form).await;
        assert!(
            (200..300).contains(&ours) && (200..300).contains(&theirs),
            "{method} {path} {form}: stand-in {ours} {our_body}, stripe-mock {theirs} {their_body}"
        );
        // Same object type, and every field stripe-mock's spec-built object has, we have too.
        assert_eq!(our_body["object"], their_body["object"], "{method} {path}");
        if let (Some(our), Some(their)) = (our_body.as_object(), their_body.as_object()) {
            for key in their.keys() {
                assert!(
                    our.contains_key(key),
                    "{method} {path}: stand-in answer lacks `{key}` (stripe-mock: {their_body})"
                );
            }
        }
    }

    let malformed: Vec<(&str, &str, String)> = vec![
        (
            "POST",
            "/v1/billing/meter_events",
            format!("payload[stripe_customer_id]={customer}&payload[value]=1"),
        ),
        (
            "POST",
            "/v1/billing/meter_events",
            "event_name=contract_meter&payload[value]=1&timestamp=notatime".into(),
        ),
        (
            "POST",
            "/v1/billing/meter_events",
            "event_name=contract_meter&payload[value]=1&unknown_param=1".into(),
        ),
        ("POST", "/v1/customers", "not_a_customer_field=1".into()),
        (
            "POST",
            "/v1/billing/meters",
            "display_name=X&event_name=y".into(),
        ),
        (
            "POST",
            "/v1/billing/meters",
            "display_name=X&event_name=y&default_aggregation[formula]=median".into(),
        ),
        (
            "POST",
            "/v1/webhook_endpoints",
            "enabled_events[]=customer.created".into(),
        ),
        (
            "POST",
            "/v1/billing/meter_event_adjustments",
            "event_name=contract_meter&cancel[identifier]=x".into(),
        ),
        (
            "POST",
            "/v1/billing/meter_event_adjustments",
            "type=undo&event_name=contract_meter&cancel[identifier]=x".into(),
        ),
        ("GET", "/v1/customers", "limit=abc".into()),
    ];
    for (method, path, form) in &malformed {
        let (ours, our_body) = call(&client, &s.base, method, path, form).await;
        let (theirs, their_body) = call(&client, &mock.base, method, path, form).await;
        assert!(
            (400..500).contains(&ours) && (400..500).contains(&theirs),
            "{method} {path} {form}: stand-in {ours} {our_body}, stripe-mock {theirs} {their_body}"
        );
        assert_eq!(
            our_body["error"]["type"], their_body["error"]["type"],
            "{path} {form}"
        );
    }
}
