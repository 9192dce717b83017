//! The pipeline benchmark's baseline: the bare plumbing its path is made of, with none of
//! meterline's work. A message produced to one topic, consumed and produced (acknowledged) to a
//! second topic, consumed, then one meter event POSTed to the stand-in; timed per message from
//! the first produce to the POST's answer, 20 messages a second.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use meterline_common::kafka::{consumer_config, producer_config};
use meterline_schemas::Topic;
use meterline_tests::Namespace;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::Params;
use crate::baseline::PRODUCE_TIMEOUT;
use crate::relay::unix_now;
use crate::report::Latency;
use crate::sink::{MeterEvent, Stripe, METERS};

/// The baseline: produce to topic A; a task consumes A and produces each message to topic B
/// (waiting for the ack); a second task consumes B and POSTs one meter event per message to
/// the stand-in. Per message: first produce -> the POST's answer.
pub(super) async fn bare_path(params: &Params) -> anyhow::Result<Latency> {
    let ns = Namespace::create().await;
    let stripe = Stripe::start(params.stripe_rate, 1).await?;
    let producer: FutureProducer = producer_config(&ns.kafka, "meterline-bench", PRODUCE_TIMEOUT)
        .create()
        .context("creating the baseline producer")?;
    let (topic_a, topic_b) = (ns.topic(Topic::UsageRaw), ns.topic(Topic::UsageWindows));
    let consumer = |topic: &str, role: &str| -> anyhow::Result<StreamConsumer> {
        let group = format!("{}-bare-{role}", ns.id);
        let c: StreamConsumer = consumer_config(&ns.kafka, "meterline-bench", &group)
            .create()
            .context("creating a baseline consumer")?;
        c.subscribe(&[topic]).context("subscribing")?;
        Ok(c)
    };
    let hop_in = consumer(&topic_a, "hop")?;
    let post_in = consumer(&topic_b, "post")?;
    let hop = {
        let (producer, topic_b) = (producer.clone(), topic_b.clone());
        tokio::spawn(async move {
            loop {
                let message = hop_in.recv().await.context("reading topic a")?;
                let (key, value) = (
                    message.key().unwrap_or_default().to_vec(),
                    message.payload().unwrap_or_default().to_vec(),
                );
                producer
                    .send(
                        FutureRecord::to(&topic_b).key(&key).payload(&value),
                        PRODUCE_TIMEOUT,
                    )
                    .await
                    .map_err(|(e, _)| anyhow::anyhow!("producing to topic b: {e}"))?;
            }
            #[allow(unreachable_code)]
            anyhow::Ok(())
        })
    };
    let (arrived_tx, mut arrived) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let poster = {
        let url = stripe.meter_events_url();
        let key = stripe.standin.key.clone();
        let customer = stripe.customers[0].clone();
        let run = unix_now();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            loop {
                let message = post_in.recv().await.context("reading topic b")?;
                let index: u64 = std::str::from_utf8(message.payload().unwrap_or_default())
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .context("a baseline message is its index")?;
                let identifier = format!("bare_{run}_{index}");
                let event = MeterEvent {
                    event_name: METERS[0].1,
                    customer: &customer,
                    value: 1,
                    identifier: &identifier,
                    timestamp: unix_now() - 1,
                };
                let status = event.post(&client, &url, &key).await?;
                if !status.is_success() {
                    bail!("the stand-in answered {status} to a baseline meter event");
                }
                if arrived_tx.send((index, Instant::now())).is_err() {
                    return anyhow::Ok(());
                }
            }
        })
    };

    let send = |index: u64| {
        let value = index.to_string();
        let producer = producer.clone();
        let topic = topic_a.clone();
        async move {
            producer
                .send(
                    FutureRecord::to(&topic).key("cust_00000").payload(&value),
                    PRODUCE_TIMEOUT,
                )
                .await
                .map_err(|(e, _)| anyhow::anyhow!("producing to topic a: {e}"))
        }
    };
    // Warm-up: until a message makes the whole trip, both groups are joined and every
    // connection is open. Warm-up indices lie past the measured ones.
    let measured = params.baseline_messages as u64;
    let mut warm = measured;
    loop {
        send(warm).await?;
        warm += 1;
        match tokio::time::timeout(Duration::from_secs(2), arrived.recv()).await {
            Ok(Some(_)) => break,
            Ok(None) => bail!("the baseline path stopped: {:?}", poster.await),
            Err(_) if warm - measured > 30 => bail!("the baseline path never carried a message"),
            Err(_) => {}
        }
    }
    while tokio::time::timeout(Duration::from_millis(500), arrived.recv())
        .await
        .is_ok()
    {}

    let mut sent_at = vec![None; params.baseline_messages];
    let mut latencies = Vec::with_capacity(params.baseline_messages);
    let pace = Duration::from_millis(50);
    let started = Instant::now();
    let mut next = 0u64;
    let deadline = started + pace * params.baseline_messages as u32 + Duration::from_secs(60);
    while latencies.len() < params.baseline_messages {
        if next < measured {
            let due = started + pace * next as u32;
            tokio::select! {
                _ = tokio::time::sleep_until(due.into()) => {
                    sent_at[next as usize] = Some(Instant::now());
                    // Not awaited: the next message goes out on time whatever the ack takes.
                    tokio::spawn(send(next));
                    next += 1;
                    continue;
                }
                got = arrived.recv() => record(got, &sent_at, &mut latencies)?,
            }
        } else {
            match tokio::time::timeout_at(deadline.into(), arrived.recv()).await {
                Ok(got) => record(got, &sent_at, &mut latencies)?,
                Err(_) => bail!(
                    "only {} of {} baseline messages made the trip",
                    latencies.len(),
                    params.baseline_messages
                ),
            }
        }
    }
    hop.abort();
    poster.abort();
    ns.drop_databases().await;
    Ok(Latency::of(latencies))
}

fn record(
    got: Option<(u64, Instant)>,
    sent_at: &[Option<Instant>],
    latencies: &mut Vec<Duration>,
) -> anyhow::Result<()> {
    let (index, at) = got.context("the baseline path stopped")?;
    if let Some(Some(sent)) = sent_at.get(index as usize) {
        latencies.push(at - *sent);
    }
    Ok(())
}
