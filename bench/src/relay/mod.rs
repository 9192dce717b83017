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
use meterline_common::crypto::Keyring;
use meterline_common::kafka::{consumer_config, producer_config};
use meterline_common::stripe_config::{NewConfig, StripeApiKey, StripeConfigStore, WebhookSecret};
use meterline_schemas::{StripeWebhook, Timestamp, Topic};
use meterline_tests::{api, stack, Namespace, ServiceProcess, Stack};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use reqwest::RequestBuilder;
use serde_json::{json, Value};

use crate::baseline::PRODUCE_TIMEOUT;
use crate::clients::{excerpt, http_client, run_clients, send_timed};
use crate::procstat::{self, Machine, Watchlist};
use crate::report::Latency;
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
    let stack = Stack::get();
    let root = stack::repo_root();
    let broker_pid = procstat::kafka_broker_pid(&root, &stack.kafka_brokers);
    let postgres_pid = procstat::listening_pid_of_url(&stack.database_url);
    procstat::warn_unaccounted(&[
        ("kafka broker", broker_pid),
        ("postgresql server", postgres_pid),
    ]);

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
    let producer = Producer::new(&baseline_ns)?;
    // Metadata and connections first, outside the clock.
    for index in params.deliveries..total {
        producer
            .produce_one(&messages[index].0, &messages[index].1)
            .await?;
    }
    eprintln!("baseline: raw producer, {} tasks", params.concurrency);
    let load_before_baseline = procstat::load_average();
    let watched = Watchlist::new()
        .process("webhook-relay", None)
        .process("kafka broker", broker_pid)
        .tree("postgresql (all backends)", postgres_pid)
        .this_process("meterline-bench (load generator)");
    let cpu_before = watched.snapshot()?;
    let (baseline_elapsed, baseline_latencies) =
        baseline_run(&producer, &messages, params.deliveries, params.concurrency).await?;
    let baseline_cpu = watched.snapshot()?.since(&cpu_before);
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
    let cpu_before = watched.snapshot()?;
    let (relay_elapsed, latencies) = driver.run(params.deliveries).await?;
    let relay_cpu = watched.snapshot()?.since(&cpu_before);
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
        baseline_elapsed,
        baseline_latency: Latency::of(baseline_latencies),
        relay_elapsed,
        relay_latency: Latency::of(latencies),
        published: published as usize,
        baseline_cpu: baseline_cpu.components(),
        relay_cpu: relay_cpu.components(),
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

/// A raw producer configured as ingest's writer and the relay's (`producer_config`).
struct Producer {
    producer: FutureProducer,
    topic: String,
}

impl Producer {
    fn new(ns: &Namespace) -> anyhow::Result<Producer> {
        let producer = producer_config(&ns.kafka, "meterline-bench", PRODUCE_TIMEOUT)
            .create()
            .context("creating the baseline producer")?;
        Ok(Producer {
            producer,
            topic: ns.topic(Topic::StripeWebhooks),
        })
    }

    /// Produces one message and waits for Kafka's acknowledgement.
    async fn produce_one(&self, key: &str, value: &[u8]) -> anyhow::Result<()> {
        self.producer
            .send(
                FutureRecord::to(&self.topic).key(key).payload(value),
                Timeout::After(PRODUCE_TIMEOUT),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("kafka refused a baseline write: {e}"))?;
        Ok(())
    }
}

/// `deliveries` produces with `concurrency` tasks, each waiting for the ack of its message
/// before taking the next; returns the elapsed time and every produce's latency.
async fn baseline_run(
    producer: &Producer,
    messages: &[(String, Vec<u8>)],
    deliveries: usize,
    concurrency: usize,
) -> anyhow::Result<(Duration, Vec<Duration>)> {
    run_clients(concurrency, deliveries, |index| async move {
        let (key, value) = &messages[index];
        let sent = Instant::now();
        producer.produce_one(key, value).await?;
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

/// `t=<t>,v1=<hex(HMAC-SHA256(secret, "<t>.<body>"))>`, as Stripe signs.
pub(crate) fn signature_header(t: i64, secret: &str, body: &[u8]) -> String {
    let mut message = Vec::with_capacity(body.len() + 12);
    message.extend_from_slice(t.to_string().as_bytes());
    message.push(b'.');
    message.extend_from_slice(body);
    let mac = hmac_sha256(secret.as_bytes(), &message);
    let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
    format!("t={t},v1={hex}")
}

/// HMAC-SHA256 (RFC 2104) over [`sha256`]: this crate has no hashing dependency, and a few
/// dozen lines checked against RFC 4231 beat adding one for the benchmark's client.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&sha256(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner: Vec<u8> = block.iter().map(|b| b ^ 0x36).collect();
    inner.extend_from_slice(message);
    let mut outer: Vec<u8> = block.iter().map(|b| b ^ 0x5c).collect();
    outer.extend_from_slice(&sha256(&inner));
    sha256(&outer)
}

/// SHA-256 (FIPS 180-4).
fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];
    let mut padded = data.to_vec();
    padded.push(0x80);
    while padded.len() % 64 != 56 {
        padded.push(0);
    }
    padded.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for chunk in padded.chunks_exact(64) {
        let mut w = [0u32; 64];
        for (i, word) in chunk.chunks_exact(4).enumerate() {
            w[i] = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16]
                .wrapping_add(s0)
                .wrapping_add(w[i - 7])
                .wrapping_add(s1);
        }
        let [mut a, mut b, mut c, mut d, mut e, mut f, mut g, mut hh] = h;
        for i in 0..64 {
            let s1 = e.rotate_right(6) ^ e.rotate_right(11) ^ e.rotate_right(25);
            let ch = (e & f) ^ (!e & g);
            let t1 = hh
                .wrapping_add(s1)
                .wrapping_add(ch)
                .wrapping_add(K[i])
                .wrapping_add(w[i]);
            let s0 = a.rotate_right(2) ^ a.rotate_right(13) ^ a.rotate_right(22);
            let maj = (a & b) ^ (a & c) ^ (b & c);
            let t2 = s0.wrapping_add(maj);
            hh = g;
            g = f;
            f = e;
            e = d.wrapping_add(t1);
            d = c;
            c = b;
            b = a;
            a = t1.wrapping_add(t2);
        }
        for (state, value) in h.iter_mut().zip([a, b, c, d, e, f, g, hh]) {
            *state = state.wrapping_add(value);
        }
    }
    let mut out = [0u8; 32];
    for (i, word) in h.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&word.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn sha256_matches_known_vectors() {
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(&sha256(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
    }

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // Test case 2.
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block.
        assert_eq!(
            hex(&hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn bodies_are_about_a_kilobyte_and_messages_are_valid() {
        let body = event_body("evt_bench1x0000001", 1);
        assert!((900..1300).contains(&body.len()), "{} bytes", body.len());
        let (key, value) = baseline_message(&body).unwrap();
        assert_eq!(key, format!("{TENANT}:{ENVIRONMENT}"));
        assert!(StripeWebhook::from_json_bytes(&value).is_ok());
    }
}
