//! Settling one claimed window: resend an outstanding meter event unchanged, or send the
//! change of the window's total not yet accounted for, rounded against the customer and
//! meter's carry ([`billing::round_with_carry`]), paced by the account's token bucket,
//! behind its circuit breaker, retried with backoff.
//!
//! Rules kept here: the ledger records a send (its identifier and value) before it goes out,
//! so a crash resends the same event and Stripe's identifier check absorbs it; a send never
//! answered for 23 h is not resent but flagged for reconciliation, since Stripe forgets an
//! identifier after 24 h.

use std::time::{Duration, Instant};

use meterline_accounts::audit::{Actor, Purpose};
use meterline_accounts::stripe_config::StripeApiKey;
use meterline_common::auth::TenantScope;
use meterline_schemas::{Decimal, StripeFormula};
use rust_decimal::prelude::ToPrimitive;
use time::OffsetDateTime;

use super::{account_of, SyncContext, UNKNOWABLE_AFTER};
use crate::billing::{self, Unsendable};
use crate::ledger::{Batch, Counts, Finish, Send};
use crate::mappings::{needed_formula, ProviderMeter};
use crate::metrics;
use crate::pacing::default_rate;
use crate::stripe::{ErrorClass, MeterEvent, StripeMeter};
use crate::Error;

/// Settles one claimed window as far as it can now.
pub(super) async fn settle(ctx: &SyncContext, batch: &Batch, rng: &mut impl rand::Rng) -> Finish {
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
    let Some(target) = ctx
        .mappings
        .provider_meter(&batch.tenant_id, &batch.environment_id, &batch.meter_id)
        .await
        .map_err(|e| Error::Config(e.to_string()))?
    else {
        return Ok(Finish::Skipped("the meter has no stripe mapping".into()));
    };
    if !target.sync_enabled {
        return Ok(Finish::Skipped("sync is disabled for this meter".into()));
    }
    let counts = match counts_for(ctx, batch, &config.api_key, &target).await? {
        Ok(counts) => counts,
        Err(finish) => return Ok(finish),
    };
    let event_name = target.event_name;
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
                let current = ctx.ledger.current(batch.id).await?;
                let (value, accounted) = match counts {
                    Counts::Change => {
                        let change = current.total - current.accounted;
                        if change.is_zero() {
                            return Ok(Finish::Settled);
                        }
                        let value = match billing::round_with_carry(current.carry, change) {
                            Ok(rounded) => rounded.value,
                            Err(e) => return Ok(Finish::Failed(e.to_string())),
                        };
                        if value == 0 {
                            // Less than half a unit with the carry: nothing to send yet.
                            ctx.ledger.carried(batch.id, change).await?;
                            continue;
                        }
                        (value, change)
                    }
                    Counts::Value => {
                        if current.sent && current.accounted == current.total {
                            return Ok(Finish::Settled);
                        }
                        // The value itself, rounded on its own: Stripe bills one value of the
                        // period, so there is nothing to carry. A 0 is sent too: it may be
                        // the period's last value.
                        let value = match billing::round_with_carry(Decimal::ZERO, current.total) {
                            Ok(rounded) => rounded.value,
                            Err(e) => return Ok(Finish::Failed(e.to_string())),
                        };
                        if current.sent && Decimal::from(value) == current.synced {
                            ctx.ledger.unchanged_value(batch.id, current.total).await?;
                            continue;
                        }
                        (value, current.total)
                    }
                };
                let seq = ctx.ledger.sends_so_far(batch.id).await? + 1;
                let send = Send {
                    seq,
                    identifier: crate::identifier::identifier(
                        &batch.tenant_id,
                        &batch.environment_id,
                        &batch.customer_id,
                        &batch.meter_id,
                        &batch.window,
                        seq as u32,
                    ),
                    key_generation: 0,
                    value: value.into(),
                    accounted,
                    counts,
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
                metrics::sync_lag(lag);
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

/// How this window's meter events count ([`Counts`]), from the formula its meter's
/// aggregation needs and the formula of the Stripe meter it is mapped to; read from Stripe
/// and recorded on the mapping when a meter that needs `last` has none yet. `Err` with how the
/// window is left when they do not fit: nothing is sent to a Stripe meter that would bill a
/// maximum, a latest value or a distinct count as a sum (or a sum as a last value).
async fn counts_for(
    ctx: &SyncContext,
    batch: &Batch,
    key: &StripeApiKey,
    target: &ProviderMeter,
) -> Result<Result<Counts, Finish>, Error> {
    let scope = TenantScope {
        tenant_id: batch.tenant_id.clone(),
        environment_id: batch.environment_id.clone(),
        subject: None,
    };
    let meter = ctx
        .meters
        .get(&scope, &batch.meter_id)
        .await
        .map_err(|e| Error::Config(e.to_string()))?;
    let Some(meter) = meter else {
        // A deleted meter's windows go out as its mapping says.
        return Ok(Ok(match target.formula {
            Some(StripeFormula::Last) => Counts::Value,
            _ => Counts::Change,
        }));
    };
    let aggregation = &meter.definition.aggregation;
    let needed = aggregation.stripe_formula();
    let formula = match target.formula {
        Some(formula) => formula,
        // A sum meter whose Stripe meter was not read goes out as it always did.
        None if needed == StripeFormula::Sum => return Ok(Ok(Counts::Change)),
        None => match ctx.stripe.find_meter(key, &target.event_name).await {
            Ok(Some(StripeMeter {
                formula: Some(formula),
                ..
            })) => {
                ctx.mappings
                    .record_formula(
                        &batch.tenant_id,
                        &batch.environment_id,
                        &batch.meter_id,
                        formula,
                    )
                    .await
                    .map_err(|e| Error::Config(e.to_string()))?;
                formula
            }
            found => {
                let why = match found {
                    Err(e) => format!("could not be read ({e})"),
                    _ => "does not exist".to_owned(),
                };
                return Ok(Err(Finish::RetryIn {
                    seconds: 60.0,
                    error: format!(
                        "the stripe meter with event_name {} {why}; meter {} aggregates {} \
                         and needs one with formula last",
                        target.event_name,
                        batch.meter_id,
                        aggregation.kind()
                    ),
                }));
            }
        },
    };
    Ok(match needed_formula(aggregation, formula) {
        Ok(()) if formula == StripeFormula::Last => Ok(Counts::Value),
        Ok(()) => Ok(Counts::Change),
        Err(needed) => Err(Finish::Failed(format!(
            "meter {} aggregates {}: it needs a Stripe meter with formula {needed}, but \
             event_name {} has {formula}; map it to one with formula {needed}, then retry",
            batch.meter_id,
            aggregation.kind(),
            target.event_name
        ))),
    })
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
    key: &meterline_accounts::stripe_config::StripeApiKey,
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
            metrics::stripe_request(None, "circuit_open");
            return Delivery::Later {
                error: "circuit open for this stripe account".into(),
                retry_after: Some(wait),
                unanswered: false,
            };
        }
        let waited = Instant::now();
        account.until_ready().await;
        metrics::rate_limit_waited(waited.elapsed());
        let started = Instant::now();
        let result = ctx.stripe.create_meter_event(key, &event).await;
        let took = started.elapsed();
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
        metrics::stripe_request(Some(took), outcome);
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
