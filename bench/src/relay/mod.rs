//! `meterline-bench relay`: the latency of the webhook relay for a valid delivery under load
//! (signed request in -> verified, deduplicated, published and acknowledged by Kafka -> 200),
//! next to raw Kafka produces of the same messages, so the share that is Kafka's ack shows.
//!
//! Order of one run: generate the event bodies (untimed); baseline on a fresh namespace (one
//! produce at a time per task, each waiting for its ack); then a fresh namespace with a tenant
//! environment whose Stripe configuration holds a `whsec_` secret, the release `webhook-relay`
//! spawned, one warm-up delivery per client, and the measured pass: every delivery distinct and
//! signed, `concurrency` clients sharing a keep-alive pool. Any answer but 200, or a duplicate,
//! fails the run; so does a `stripe.webhooks` topic not holding exactly one message per delivery.
//!
//! Signing happens in the client task just before the clock of each request starts (the
//! signature's timestamp must stay within the relay's 300 s tolerance however long a run is).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use meterline_accounts::crypto::Keyring;
use meterline_accounts::stripe_config::{
    NewConfig, StripeApiKey, StripeConfigStore, WebhookSecret,
};
use meterline_common::kafka::consumer_config;
use meterline_schemas::{StripeWebhook, Timestamp, Topic};
use meterline_tests::{api, Namespace, ServiceProcess, Stack};
use rdkafka::consumer::{BaseConsumer, Consumer};
use reqwest::RequestBuilder;
use serde_json::{json, Value};

use crate::baseline::{RawProducer, PRODUCE_TIMEOUT};
use crate::clients::{excerpt, http_client, run_clients, send_timed};
use crate::procstat::{self, Machine, Server, Watchlist};
use crate::report::{Latency, Phase};
use crate::workload::{ENVIRONMENT, TENANT};

mod report;
pub use report::RelayReport;

/// The endpoint secret stored in the tenant environment's Stripe configuration.
pub(crate) const SECRET: &str = "whsec_benchrelay0000000001";

#[derive(Debug, Clone, clap::Args)]
pub struct Params {
    /// Distinct valid deliveries to send (measured).
    #[arg(long, default_value_t = 20_000)]
    pub deliveries: usize,
    /// Concurrent HTTP clients (and baseline tasks).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Replace the relay section of docs/benchmarks.md with this run's numbers.
    #[arg(long)]
    pub write_docs: bool,
}

pub async fn run(params: &Params) -> anyhow::Result<RelayReport> {
    if params.deliveries == 0 || params.concurrency == 0 {
        bail!("--deliveries and --concurrency must be at least 1");
    }
    let machine = Machine::read();
    let date = time::OffsetDateTime::now_utc();
    let [broker_pid, postgres_pid] = procstat::stack_pids([Server::KafkaBroker, Server::Postgres]);

    // The bodies: the measured deliveries, then one warm-up delivery per client.
    let run_id = date.unix_timestamp();
    let total = params.deliveries + params.concurrency;
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..total)
            .map(|i| event_body(&format!("evt_bench{run_id}x{i:07}"), i))
            .collect(),
    );
    let measured_bytes: usize = bodies[..params.deliveries].iter().map(Vec::len).sum();
    eprintln!(
        "generated {} event bodies, {:.0} bytes on average",
        params.deliveries,
        measured_bytes as f64 / params.deliveries as f64
    );

    // Baseline: the messages the relay would publish, produced raw, one at a time per task.
    let baseline_ns = Namespace::create().await;
    let messages = Arc::new(
        bodies
            .iter()
            .map(|body| baseline_message(body))
            .collect::<anyhow::Result<Vec<_>>>()?,
    );
    let producer = RawProducer::new(&baseline_ns.kafka, baseline_ns.topic(Topic::StripeWebhooks))?;
    // Metadata and connections first, outside the clock.
    for index in params.deliveries..total {
        producer
            .write(&messages[index].0, &messages[index].1)
            .await?;
    }
    eprintln!("baseline: raw producer, {} tasks", params.concurrency);
    let load_before_baseline = procstat::load_average();
    let watched = Watchlist::new()
        .process("webhook-relay", None)
        .process("kafka broker", broker_pid)
        .tree("postgresql (all backends)", postgres_pid)
        .this_process("meterline-bench (load generator)");
    let ((baseline_elapsed, baseline_latencies), baseline_cpu) = watched
        .during(baseline_run(
            &producer,
            &messages,
            params.deliveries,
            params.concurrency,
        ))
        .await?;
    drop(producer);

    // Subject: the release webhook-relay binary.
    let ns = Namespace::create().await;
    put_config(&ns).await?;
    let relay = ServiceProcess::spawn("webhook-relay", &ns.env()).await;
    let relay_pid = relay.pid().context("the webhook-relay process has a pid")?;
    let watched = watched.with_pid("webhook-relay", relay_pid);
    let driver = Driver::new(&relay, bodies.clone(), params.concurrency)?;
    // One delivery per client, so every connection (and the relay's producer) is up before
    // the clock starts.
    let warm_ups = (params.deliveries..total).map(|index| driver.deliver(index));
    for outcome in futures::future::join_all(warm_ups).await {
        outcome?;
    }
    let topic = ns.topic(Topic::StripeWebhooks);
    let before = topic_messages(&ns, &topic)?;
    eprintln!(
        "webhook-relay: pid {relay_pid}, {} http clients, {} deliveries",
        params.concurrency, params.deliveries
    );
    let load_before_relay = procstat::load_average();
    let ((relay_elapsed, latencies), relay_cpu) =
        watched.during(driver.run(params.deliveries)).await?;
    let after = topic_messages(&ns, &topic)?;
    let published = after - before;
    if published != params.deliveries as i64 || after != total as i64 {
        bail!(
            "{topic} holds {after} messages ({published} from the measured pass); expected {} \
             ({} measured + {} warm-up)",
            total,
            params.deliveries,
            params.concurrency
        );
    }

    relay.terminate(Duration::from_secs(10)).await;
    baseline_ns.drop_databases().await;
    ns.drop_databases().await;

    Ok(RelayReport {
        machine,
        date,
        load_before_baseline,
        load_before_relay,
        deliveries: params.deliveries,
        concurrency: params.concurrency,
        partitions: meterline_tests::namespace::TEST_PARTITIONS,
        average_body_bytes: measured_bytes / params.deliveries,
        baseline: Phase::new(baseline_elapsed, &baseline_cpu),
        baseline_latency: Latency::of(baseline_latencies),
        relay: Phase::new(relay_elapsed, &relay_cpu),
        relay_latency: Latency::of(latencies),
        published: published as usize,
    })
}

/// Stores the tenant environment's Stripe configuration with [`SECRET`].
async fn put_config(ns: &Namespace) -> anyhow::Result<()> {
    let keys = Keyring::parse(&Stack::get().encryption_keys)
        .map_err(|e| anyhow::anyhow!("the stack's encryption keys: {e}"))?;
    let secret = WebhookSecret::parse(SECRET).map_err(|e| anyhow::anyhow!("{SECRET}: {e}"))?;
    let api_key = StripeApiKey::parse("sk_test_bench").map_err(|e| anyhow::anyhow!("{e}"))?;
    StripeConfigStore::new(ns.pg_pool().await, keys)
        .put(
            &api::scope(TENANT, ENVIRONMENT),
            &NewConfig {
                api_key,
                webhook_secrets: vec![secret],
                sync_enabled: true,
                aggregation_window_minutes: 60,
                rate_limit_per_second: None,
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("storing the stripe config: {e}"))?;
    Ok(())
}

/// A `customer.created` event as Stripe sends it (about 1 KB), unique by `id`.
pub(crate) fn event_body(id: &str, index: usize) -> Vec<u8> {
    let created = unix_now();
    serde_json::to_vec(&json!({
        "id": id,
        "object": "event",
        "api_version": "2025-04-30.basil",
        "created": created,
        "data": {"object": {
            "id": format!("cus_bench{index:010}"),
            "object": "customer",
            "address": {"city": "Berlin", "country": "DE", "line1": "Friedrichstrasse 123",
                        "line2": null, "postal_code": "10117", "state": null},
            "balance": 0,
            "created": created,
            "currency": "eur",
            "default_source": null,
            "delinquent": false,
            "description": "Bench customer created by meterline-bench relay",
            "discount": null,
            "email": format!("billing+{index}@example-customer.com"),
            "invoice_prefix": format!("B{:07X}", index),
            "invoice_settings": {"custom_fields": null, "default_payment_method": null,
                                 "footer": null, "rendering_options": null},
            "livemode": false,
            "metadata": {"external_id": format!("ext_bench_{index}"),
                         "plan": "usage-based", "source": "meterline-bench"},
            "name": format!("Example Customer {index} GmbH"),
            "phone": "+49 30 1234567",
            "preferred_locales": ["de", "en"],
            "shipping": null,
            "tax_exempt": "none",
            "test_clock": null
        }},
        "livemode": false,
        "pending_webhooks": 1,
        "request": {"id": format!("req_bench{index:010}"), "idempotency_key": null},
        "type": "customer.created"
    }))
    .expect("a json value serializes")
}

/// The `stripe.webhooks` message the relay publishes for `body`: (key, value).
fn baseline_message(body: &[u8]) -> anyhow::Result<(String, Vec<u8>)> {
    let event: serde_json::Map<String, Value> =
        serde_json::from_slice(body).context("parsing a generated event")?;
    let received_at = Timestamp::new(time::OffsetDateTime::now_utc())
        .map_err(|e| anyhow::anyhow!("a timestamp: {e}"))?;
    let wire = json!({
        "schema_version": 1,
        "tenant_id": TENANT,
        "environment_id": ENVIRONMENT,
        "event_id": event["id"],
        "event_type": event["type"],
        "livemode": event["livemode"],
        "created": event["created"],
        "received_at": received_at.to_string(),
        "payload": event,
    });
    let bytes = serde_json::to_vec(&wire).context("encoding a baseline message")?;
    let message = StripeWebhook::from_json_bytes(&bytes)
        .map_err(|e| anyhow::anyhow!("a baseline message is not a stripe.webhooks one: {e}"))?;
    Ok((message.kafka_key(), message.to_json_bytes()))
}

/// `deliveries` produces with `concurrency` tasks, each waiting for the ack of its message
/// before taking the next; returns the elapsed time and every produce's latency.
async fn baseline_run(
    producer: &RawProducer,
    messages: &[(String, Vec<u8>)],
    deliveries: usize,
    concurrency: usize,
) -> anyhow::Result<(Duration, Vec<Duration>)> {
    run_clients(concurrency, deliveries, |index| async move {
        let (key, value) = &messages[index];
        let sent = Instant::now();
        producer.write(key, value).await?;
        Ok(sent.elapsed())
    })
    .await
}

/// Messages on `topic` (high - low watermark, summed over its partitions).
fn topic_messages(ns: &Namespace, topic: &str) -> anyhow::Result<i64> {
    let group = format!("meterline-bench-relay-{}", std::process::id());
    let consumer: BaseConsumer = consumer_config(&ns.kafka, "meterline-bench", &group)
        .create()
        .context("creating the watermark consumer")?;
    let mut total = 0;
    for partition in 0..meterline_tests::namespace::TEST_PARTITIONS {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, PRODUCE_TIMEOUT)
            .with_context(|| format!("watermarks of {topic}/{partition}"))?;
        total += high - low;
    }
    Ok(total)
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// `concurrency` HTTP clients sharing one keep-alive pool, delivering signed events.
struct Driver {
    client: reqwest::Client,
    url: String,
    bodies: Arc<Vec<Vec<u8>>>,
    concurrency: usize,
}

impl Driver {
    fn new(
        relay: &ServiceProcess,
        bodies: Arc<Vec<Vec<u8>>>,
        concurrency: usize,
    ) -> anyhow::Result<Driver> {
        Ok(Driver {
            client: http_client(concurrency, Duration::from_secs(30))?,
            url: relay.url(&format!("/webhooks/stripe/{TENANT}/{ENVIRONMENT}")),
            bodies,
            concurrency,
        })
    }

    /// Delivers bodies `0..deliveries`; returns the elapsed time and every request's latency.
    async fn run(&self, deliveries: usize) -> anyhow::Result<(Duration, Vec<Duration>)> {
        run_clients(self.concurrency, deliveries, |index| self.deliver(index)).await
    }

    /// Signs and delivers body `index`; anything but a first-time 200 fails the run. The
    /// latency runs from just before the request is sent to the answer's body read.
    async fn deliver(&self, index: usize) -> anyhow::Result<Duration> {
        let request = signed_delivery(&self.client, &self.url, self.bodies[index].clone());
        let (elapsed, status, answer) = send_timed(request, "delivering a webhook").await?;
        if status != reqwest::StatusCode::OK {
            bail!(
                "webhook-relay answered {status} to delivery {index}: {}",
                excerpt(&answer)
            );
        }
        let answer: Value = serde_json::from_slice(&answer).context("the answer is not JSON")?;
        if answer.get("duplicate").is_some() || answer.get("received") != Some(&Value::Bool(true)) {
            bail!("webhook-relay answered {answer} to delivery {index}, a new event");
        }
        Ok(elapsed)
    }
}

/// `t=<t>,v1=<hex(HMAC-SHA256(secret, "<t>.<body>"))>`, as Stripe signs: the stand-in's
/// signer, the one the integration tests sign with.
fn signature_header(t: i64, secret: &str, body: &[u8]) -> String {
    stripe_standin::signature::header(t, &[secret], body)
        .expect("hmac-sha256 takes a key of any length")
}

/// A delivery of `body` to the relay at `url`, signed now with [`SECRET`] as Stripe signs.
pub(crate) fn signed_delivery(
    client: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
) -> RequestBuilder {
    let signature = signature_header(unix_now(), SECRET, &body);
    client
        .post(url)
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/json; charset=utf-8",
        )
        .header("stripe-signature", signature)
        .body(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_about_a_kilobyte_and_messages_are_valid() {
        let body = event_body("evt_bench1x0000001", 1);
        assert!((900..1300).contains(&body.len()), "{} bytes", body.len());
        let (key, value) = baseline_message(&body).unwrap();
        assert_eq!(key, format!("{TENANT}:{ENVIRONMENT}"));
        assert!(StripeWebhook::from_json_bytes(&value).is_ok());
    }
}
