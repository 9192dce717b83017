//! The webhook relay's allow-list of source networks through the real binary: connections
//! from different loopback addresses (127.0.0.2, .3, ...) stand for different sources. An
//! allowed source is taken, any other is refused with 403 `source_not_allowed` and changes
//! nothing (no message, no deduplication row), and `X-Forwarded-For` counts only when the
//! peer is a configured trusted proxy, and then only its right-most untrusted hop.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meterline_schemas::{StripeWebhook, Topic};
use meterline_tests::api::{send, Answer};
use meterline_tests::kafka::read_topic;
use meterline_tests::stripe_config::put_config;
use meterline_tests::{Namespace, ServiceProcess};
use serde_json::json;

const TENANT: &str = "tenant_allow";
const SECRET: &str = "whsec_allowlist000001";

async fn relay(ns: &Namespace, extra: &[(&str, &str)]) -> ServiceProcess {
    let mut env = ns.env();
    for (k, v) in extra {
        env.push(((*k).into(), (*v).into()));
    }
    ServiceProcess::spawn("webhook-relay", &env).await
}

/// Delivers a correctly signed `customer.created` event `id` from the local address `from`,
/// with `forwarded_for` as `X-Forwarded-For` headers.
async fn deliver(relay: &ServiceProcess, from: &str, id: &str, forwarded_for: &[&str]) -> Answer {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let body = serde_json::to_vec(&json!({
        "id": id, "object": "event", "created": now, "type": "customer.created",
        "data": {"object": {"id": format!("cus_{id}"), "object": "customer", "metadata": {}}},
        "livemode": false
    }))
    .unwrap();
    let signature = stripe_standin::signature::header(now, &[SECRET], &body).unwrap();
    let client = reqwest::Client::builder()
        .local_address(from.parse::<IpAddr>().unwrap())
        .build()
        .unwrap();
    let mut request = client
        .post(relay.url(&format!("/webhooks/stripe/{TENANT}/env_prod")))
        .header("content-type", "application/json")
        .header("stripe-signature", signature)
        .body(body);
    for value in forwarded_for {
        request = request.header("x-forwarded-for", *value);
    }
    send(request).await
}

async fn delivered_ids(ns: &Namespace) -> Vec<String> {
    let mut ids: Vec<String> = sqlx::query_scalar("SELECT event_id FROM webhook_deliveries")
        .fetch_all(&ns.pg_pool().await)
        .await
        .unwrap();
    ids.sort();
    ids
}

#[tokio::test]
async fn only_allowed_sources_are_relayed_and_the_proxy_header_only_from_trusted_proxies() {
    let ns = Namespace::create().await;
    put_config(&ns, TENANT, "env_prod", &[SECRET]).await;

    // Without a trusted proxy: the TCP peer is the source, whatever the header says.
    let direct = relay(&ns, &[("WEBHOOK_ALLOWED_SOURCES", "127.0.0.2/32")]).await;
    let a = deliver(&direct, "127.0.0.2", "evt_allowed_direct", &[]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    for (from, id, header) in [
        ("127.0.0.3", "evt_refused_direct", vec![]),
        // Claiming the allowed address in the header changes nothing.
        ("127.0.0.3", "evt_refused_forged", vec!["127.0.0.2"]),
    ] {
        let a = deliver(&direct, from, id, &header).await;
        assert_eq!(
            (a.status, a.error_code()),
            (403, "source_not_allowed"),
            "{id}: {}",
            a.body
        );
    }
    // The operations routes are not behind the allow-list (probes come from the cluster).
    let health = reqwest::Client::builder()
        .local_address("127.0.0.3".parse::<IpAddr>().unwrap())
        .build()
        .unwrap()
        .get(direct.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let metrics = reqwest::get(direct.url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("webhook_relay_webhooks_rejected_total{reason=\"source_not_allowed\"} 2"),
        "{metrics}"
    );

    // Behind a trusted proxy (127.0.0.4): the right-most untrusted hop is the source.
    let proxied = relay(
        &ns,
        &[
            ("WEBHOOK_ALLOWED_SOURCES", "10.0.0.0/8"),
            ("WEBHOOK_TRUSTED_PROXIES", "127.0.0.4"),
        ],
    )
    .await;
    let a = deliver(&proxied, "127.0.0.4", "evt_allowed_proxied", &["10.1.2.3"]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    for (from, id, header) in [
        // A forged allowed address left of the real client's.
        (
            "127.0.0.4",
            "evt_refused_spoofed",
            vec!["10.1.2.3, 198.51.100.7"],
        ),
        // The proxy's own request: the proxy is not an allowed source.
        ("127.0.0.4", "evt_refused_proxy_itself", vec![]),
        // Not our proxy: its header is ignored, and 127.0.0.5 is not allowed.
        ("127.0.0.5", "evt_refused_untrusted_peer", vec!["10.1.2.3"]),
        (
            "127.0.0.4",
            "evt_refused_garbage",
            vec!["10.1.2.3, unknown"],
        ),
    ] {
        let a = deliver(&proxied, from, id, &header).await;
        assert_eq!(
            (a.status, a.error_code()),
            (403, "source_not_allowed"),
            "{id}: {}",
            a.body
        );
    }

    // Exactly the two allowed deliveries were published and recorded.
    let records = read_topic(
        &ns,
        &ns.topic(Topic::StripeWebhooks),
        2,
        Duration::from_secs(30),
        Duration::from_secs(2),
    )
    .await;
    let mut published: Vec<String> = records
        .iter()
        .map(|r| {
            StripeWebhook::from_json_bytes(&r.value)
                .unwrap()
                .event_id
                .as_str()
                .to_owned()
        })
        .collect();
    published.sort();
    assert_eq!(published, vec!["evt_allowed_direct", "evt_allowed_proxied"]);
    assert_eq!(delivered_ids(&ns).await, published);
    ns.drop_databases().await;
}
