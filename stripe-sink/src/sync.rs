//! The sync: window totals from `usage.windows` into the ledger, and from the ledger to
//! Stripe.
//!
//! 1. [`consume_windows`] records each published total in the ledger and only then commits
//!    its offset (a redelivery re-records the same total: harmless).
//! 2. [`dispatch`] runs workers that claim ready windows (one per customer and meter at a
//!    time) and settle each: resend an outstanding meter event unchanged, or send the
//!    difference between the window's billable total and what Stripe accepted, paced by the
//!    account's token bucket, behind its circuit breaker, retried with backoff.
//! 3. [`release_mapped`] moves windows waiting for a customer mapping back to pending once the
//!    mapping exists (from a webhook, the API or an import).

use std::sync::Arc;
use std::time::{Duration, Instant};

use meterline_common::audit::{Actor, Purpose};
use meterline_common::kafka::DeadLetters;
use meterline_common::stripe_config::StripeConfigStore;
use meterline_schemas::{DlqHeaders, Timestamp, Topic, WindowTotal};
use rand::SeedableRng;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rust_decimal::prelude::ToPrimitive;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::billing::{self, Unsendable};
use crate::config::StripeSettings;
use crate::ledger::{Batch, Finish, Ledger, Send};
use crate::mappings::MappingStore;
use crate::metrics;
use crate::pacing::{default_rate, Backoff, Pacer};
use crate::stripe::{ErrorClass, MeterEvent, StripeClient};
use crate::Error;

const SERVICE: &str = "stripe-sink";

/// A meter event never answered for this long may have been recorded by Stripe and then
/// forgotten with its identifier (24 h): resending it could bill twice.
const UNKNOWABLE_AFTER: time::Duration = time::Duration::hours(23);

/// Everything the sync needs.
pub struct SyncContext {
    pub ledger: Ledger,
    pub configs: StripeConfigStore,
    pub mappings: MappingStore,
    pub stripe: StripeClient,
    pub pacer: Arc<Pacer>,
    pub settings: StripeSettings,
    /// Between the attempts of one request (short: the window is held meanwhile).
    pub request_backoff: Backoff,
    /// Before a window that could not be settled is tried again.
    pub window_backoff: Backoff,
    pub dead_letters: DeadLetters,
}

impl SyncContext {
    /// How long a claim holds a window: every attempt of one request at its time limit
    /// plus the longest pause between attempts, with a margin.
    fn lease(&self) -> Duration {
        let attempts = self.settings.max_retries + 1;
        (self.settings.timeout + self.request_backoff.max) * attempts * 4 + Duration::from_secs(10)
    }
}

/// Loop 1: `usage.windows` into the ledger.
pub async fn consume_windows(
    ctx: Arc<SyncContext>,
    consumer: StreamConsumer,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    loop {
        let message = tokio::select! {
            received = consumer.recv() => match received {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return Ok(()),
        };
        let payload = message.payload().unwrap_or_default();
        let mut delay = Duration::from_millis(100);
        loop {
            let outcome = match WindowTotal::from_json_bytes(payload) {
                Ok(total) => ctx.ledger.record_window(&total).await.map(|()| {
                    ::metrics::counter!(metrics::WINDOWS_RECORDED).increment(1);
                }),
                Err(e) => {
                    let headers = DlqHeaders {
                        error: e.to_string(),
                        error_kind: e.dlq_error_kind(),
                        source_topic: message.topic().to_owned(),
                        source_partition: message.partition(),
                        source_offset: message.offset(),
                        service: SERVICE.to_owned(),
                        failed_at: Timestamp::now(),
                    };
                    ctx.dead_letters
                        .send(Topic::UsageWindows, message.key(), payload, &headers)
                        .await
                        .map_err(Error::from)
                }
            };
            match outcome {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "recording a window total failed, retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        // Not committed: the total is delivered again after a restart.
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
        // The ledger holds it now; a lost commit only re-records the same total.
        if let Err(e) = consumer.commit_message(&message, CommitMode::Async) {
            tracing::warn!(error = %e, "committing a window offset failed");
        }
    }
}

/// Loop 2: `workers` dispatchers settling ready windows.
pub async fn dispatch(
    ctx: Arc<SyncContext>,
    workers: usize,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let handles: Vec<_> = (0..workers)
        .map(|worker| tokio::spawn(dispatcher(ctx.clone(), worker, shutdown.clone())))
        .collect();
    for handle in handles {
        handle.await.map_err(|e| Error::Task(e.to_string()))??;
    }
    Ok(())
}

async fn dispatcher(
    ctx: Arc<SyncContext>,
    worker: usize,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let mut rng = rand::rngs::StdRng::from_entropy();
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let claimed = match ctx.ledger.claim(1, ctx.lease()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(worker, error = %e, "claiming windows failed");
                Vec::new()
            }
        };
        let Some(batch) = claimed.into_iter().next() else {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
            continue;
        };
        // A claimed window is always finished, even during shutdown: its lease would
        // otherwise hold it for minutes.
        let finish = settle(&ctx, &batch, &mut rng).await;
        let label = finish_label(&finish);
        ::metrics::counter!(metrics::WINDOWS_SETTLED, "outcome" => label).increment(1);
        if let Finish::Failed(reason) | Finish::NeedsReconciliation(reason) = &finish {
            tracing::warn!(batch = batch.id, %reason, outcome = label, "window not sent");
        }
        let mut delay = Duration::from_millis(100);
        while let Err(e) = ctx.ledger.finish(batch.id, &finish).await {
            tracing::warn!(batch = batch.id, error = %e, "finishing a window failed, retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

fn finish_label(finish: &Finish) -> &'static str {
    match finish {
        Finish::Settled => "settled",
        Finish::RetryIn { .. } => "retry",
        Finish::Unanswered { .. } => "unanswered",
        Finish::PendingMapping => "pending_mapping",
        Finish::Skipped(_) => "skipped",
        Finish::Expired => "expired",
        Finish::Failed(_) => "failed",
        Finish::NeedsReconciliation(_) => "needs_reconciliation",
    }
}

/// The account key of the pacer: a hash of the API key, so that the key itself is kept
/// nowhere but in its encrypted row.
pub(crate) fn account_of(api_key: &str) -> String {
    hex::encode(&Sha256::digest(api_key.as_bytes())[..8])
}

/// Settles one claimed window as far as it can now.
async fn settle(ctx: &SyncContext, batch: &Batch, rng: &mut impl rand::Rng) -> Finish {
    match try_settle(ctx, batch, rng).await {
        Ok(finish) => finish,
        // Our own database or a decryption failed: try again soon; nothing was lost.
        Err(e) => Finish::RetryIn {
            seconds: 5.0,
            error: e.to_string(),
        },
    }
}

async fn try_settle(
    ctx: &SyncContext,
    batch: &Batch,
    rng: &mut impl rand::Rng,
) -> Result<Finish, Error> {
    if !ctx.settings.enabled {
        return Ok(Finish::Skipped(
            "STRIPE_INTEGRATION_ENABLED is false".into(),
        ));
    }
    let Some(config) = ctx
        .configs
        .for_sync(
            &batch.tenant_id,
            &batch.environment_id,
            &Actor::Sync,
            Purpose::Sync,
        )
        .await
        .map_err(|e| Error::Config(e.to_string()))?
    else {
        return Ok(Finish::RetryIn {
            seconds: 60.0,
            error: "stripe is not configured for this tenant environment".into(),
        });
    };
    if !config.sync_enabled {
        return Ok(Finish::Skipped(
            "sync is disabled in the stripe config".into(),
        ));
    }
    let Some((event_name, meter_enabled)) = ctx
        .mappings
        .provider_meter(&batch.tenant_id, &batch.environment_id, &batch.meter_id)
        .await
        .map_err(|e| Error::Config(e.to_string()))?
    else {
        return Ok(Finish::Skipped("the meter has no stripe mapping".into()));
    };
    if !meter_enabled {
        return Ok(Finish::Skipped("sync is disabled for this meter".into()));
    }
    let Some(customer) = ctx
        .mappings
        .provider_customer(&batch.tenant_id, &batch.environment_id, &batch.customer_id)
        .await
        .map_err(|e| Error::Config(e.to_string()))?
    else {
        return Ok(Finish::PendingMapping);
    };
    let now = OffsetDateTime::now_utc();
    match billing::check_sendable(&batch.window, now) {
        Ok(()) => {}
        Err(Unsendable::Expired) => return Ok(Finish::Expired),
        Err(Unsendable::InFuture) => {
            return Ok(Finish::RetryIn {
                seconds: (batch.window.end() - now).as_seconds_f64().max(1.0),
                error: "the window has not ended".into(),
            })
        }
        Err(e @ Unsendable::TooLarge(_)) => return Ok(Finish::Failed(e.to_string())),
    }
    let account = ctx.pacer.account(
        &account_of(config.api_key.expose()),
        config
            .rate_limit_per_second
            .unwrap_or_else(|| default_rate(config.api_key.livemode())),
    );

    // A window may need a few sends when new totals arrive while one is in flight; each
    // pass either settles or leaves for a retry.
    for _ in 0..4 {
        let mut send = match ctx.ledger.outstanding(batch.id).await? {
            Some(send) if now - send.created_at > UNKNOWABLE_AFTER => {
                return Ok(Finish::NeedsReconciliation(format!(
                    "meter event {} was never answered and is older than 23 h; check Stripe \
                     before retrying",
                    send.identifier
                )))
            }
            Some(send) => send,
            None => {
                let (total, synced) = ctx.ledger.current(batch.id).await?;
                let billable = match billing::billable(total) {
                    Ok(v) => v,
                    Err(e) => return Ok(Finish::Failed(e.to_string())),
                };
                let synced = synced.to_i64().unwrap_or(0);
                let Some(value) = billing::still_to_send(billable, synced) else {
                    return Ok(Finish::Settled);
                };
                let seq = ctx.ledger.sends_so_far(batch.id).await? + 1;
                let send = Send {
                    seq,
                    identifier: billing::identifier(
                        &batch.tenant_id,
                        &batch.environment_id,
                        &batch.customer_id,
                        &batch.meter_id,
                        &batch.window,
                        seq as u32,
                    ),
                    key_generation: 0,
                    value: value.into(),
                    event_name: event_name.clone(),
                    provider_customer_id: customer.clone(),
                    stripe_timestamp: billing::event_timestamp(&batch.window),
                    created_at: now,
                };
                ctx.ledger.begin_send(batch.id, &send).await?;
                send
            }
        };
        match deliver(ctx, &account, &config.api_key, batch.id, &mut send, rng).await {
            Delivery::Recorded => {
                ctx.ledger.accepted(batch.id, &send).await?;
                let lag = OffsetDateTime::now_utc() - batch.window.end();
                ::metrics::histogram!(metrics::SYNC_LAG).record(lag.as_seconds_f64().max(0.0));
            }
            Delivery::Later {
                error,
                retry_after,
                unanswered,
            } => {
                let seconds = ctx
                    .window_backoff
                    .delay(batch.attempts.max(0) as u32, retry_after, rng)
                    .as_secs_f64()
                    .max(0.5);
                if unanswered {
                    // Held at least as long as Stripe may still be working on it.
                    let hold = (ctx.settings.timeout * 2).as_secs_f64().max(seconds);
                    return Ok(Finish::Unanswered {
                        seconds: hold,
                        error,
                    });
                }
                return Ok(Finish::RetryIn { seconds, error });
            }
            Delivery::Refused(error) => {
                ctx.ledger.refused(batch.id, &send, &error).await?;
                return Ok(Finish::Failed(error));
            }
        }
    }
    Ok(Finish::Settled)
}

enum Delivery {
    Recorded,
    /// Not answered, or answered with something worth retrying: the send stays outstanding
    /// and goes out again unchanged.
    Later {
        error: String,
        retry_after: Option<Duration>,
        /// The last attempt got no answer at all: it may still be running at Stripe.
        unanswered: bool,
    },
    /// Refused for good: the event did not count.
    Refused(String),
}

/// One meter event: paced, behind the breaker, retried up to `max_retries` times.
async fn deliver(
    ctx: &SyncContext,
    account: &crate::pacing::Account,
    key: &meterline_common::stripe_config::StripeApiKey,
    batch_id: i64,
    send: &mut Send,
    rng: &mut impl rand::Rng,
) -> Delivery {
    let mut last_error = String::new();
    let mut last_retry_after = None;
    let mut unanswered = false;
    for attempt in 0..=ctx.settings.max_retries {
        let event = MeterEvent {
            event_name: send.event_name.clone(),
            customer: send.provider_customer_id.clone(),
            value: send.value.to_i64().unwrap_or(0),
            identifier: send.identifier.clone(),
            idempotency_key: send.idempotency_key(),
            timestamp: send.stripe_timestamp,
        };
        if let Err(wait) = account.admit() {
            ::metrics::counter!(metrics::STRIPE_REQUESTS, "outcome" => "circuit_open").increment(1);
            return Delivery::Later {
                error: "circuit open for this stripe account".into(),
                retry_after: Some(wait),
                unanswered: false,
            };
        }
        let waited = Instant::now();
        account.until_ready().await;
        ::metrics::histogram!(metrics::RATE_LIMIT_WAIT).record(waited.elapsed().as_secs_f64());
        let started = Instant::now();
        let result = ctx.stripe.create_meter_event(key, &event).await;
        ::metrics::histogram!(metrics::STRIPE_REQUEST_DURATION)
            .record(started.elapsed().as_secs_f64());
        let outcome = match &result {
            Ok(crate::stripe::Recorded::Accepted) => "accepted",
            Ok(crate::stripe::Recorded::AlreadyRecorded) => "already_recorded",
            Err(e) => match e.class {
                ErrorClass::Retriable => "retriable",
                ErrorClass::RateLimited => "rate_limited",
                ErrorClass::InProgress => "in_progress",
                ErrorClass::Authentication => "authentication",
                ErrorClass::Permanent => "permanent",
            },
        };
        ::metrics::counter!(metrics::STRIPE_REQUESTS, "outcome" => outcome).increment(1);
        account.record(result.as_ref().err().map(|e| e.class));
        match result {
            Ok(_) => return Delivery::Recorded,
            Err(e) => match e.class {
                ErrorClass::Permanent => return Delivery::Refused(e.to_string()),
                ErrorClass::Authentication => {
                    return Delivery::Refused(format!(
                        "stripe refused the api key ({e}); fix the stripe config, then retry"
                    ))
                }
                ErrorClass::Retriable | ErrorClass::RateLimited | ErrorClass::InProgress => {
                    tracing::debug!(error = %e, attempt, "meter event not recorded yet, retrying");
                    if e.status.is_some_and(|s| s >= 500) {
                        // Stripe would replay this 5xx for the same key: take the next one.
                        if let Err(db) = ctx.ledger.next_key_generation(batch_id, send).await {
                            return Delivery::Later {
                                error: db.to_string(),
                                retry_after: None,
                                unanswered: false,
                            };
                        }
                    }
                    // A request that got no answer, or that Stripe says is still running
                    // (409), may still be in flight there: remembered for the whole delivery.
                    unanswered |= e.status.is_none() || e.class == ErrorClass::InProgress;
                    last_error = e.to_string();
                    // Stripe holds the key until its first request ends: give it a second.
                    last_retry_after = match e.class {
                        ErrorClass::InProgress => {
                            Some(e.retry_after.unwrap_or(Duration::from_secs(1)))
                        }
                        _ => e.retry_after,
                    };
                }
            },
        }
        if attempt < ctx.settings.max_retries {
            tokio::time::sleep(ctx.request_backoff.delay(attempt, last_retry_after, rng)).await;
        }
    }
    Delivery::Later {
        error: last_error,
        retry_after: last_retry_after,
        unanswered,
    }
}

/// Loop 3: windows waiting for a mapping go out once it exists.
pub async fn release_mapped(
    ctx: Arc<SyncContext>,
    every: Duration,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
        match ctx.ledger.release_mapped().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(windows = n, "windows released by new customer mappings"),
            Err(e) => tracing::warn!(error = %e, "releasing mapped windows failed"),
        }
        let open = ctx
            .pacer
            .breaker_states()
            .iter()
            .filter(|(_, s)| *s != crate::pacing::BreakerState::Closed)
            .count();
        ::metrics::gauge!(metrics::CIRCUITS_OPEN).set(open as f64);
    }
}
