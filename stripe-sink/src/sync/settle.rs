//! Settling one claimed window: resend an outstanding meter event unchanged, or send the
//! change of the window's total not yet accounted for, rounded against the customer and
//! meter's carry ([`billing::round_with_carry`]), paced by the account's rate limit,
//! behind its circuit breaker, retried with backoff.
//!
//! Rules kept here:
//! - The ledger records a send (its identifier and value) before it goes out, so a crash
//!   resends the same event and Stripe's identifier check absorbs it.
//! - A send is *in doubt* from its first attempt that got no certain "not recorded" (no
//!   answer, a 409, a 5xx). A send in doubt keeps its units whatever comes next: a later 400
//!   leaves the window for reconciliation, a later 401/403 keeps the send to go out unchanged
//!   once the key is fixed; neither frees the units for a send under a new identifier. Only a
//!   send in doubt for 23 h is flagged for reconciliation (Stripe forgets an identifier after
//!   24 h); one that never reached Stripe (only 429s, 401s, an open breaker) is simply resent.
//! - Nothing waits past the claim's lease: a `Retry-After` or a rate-limit wait that would
//!   outlast it ends the attempt and the window is retried later, so no late worker acts on a
//!   window another has claimed (and every ledger write checks the claim besides).

use std::time::Duration;

use meterline_accounts::audit::{Actor, Purpose};
use meterline_accounts::stripe_config::StripeApiKey;
use meterline_common::auth::TenantScope;
use meterline_schemas::StripeFormula;
use rust_decimal::prelude::ToPrimitive;
use time::OffsetDateTime;
use tokio::time::Instant;

use super::{SyncContext, UNKNOWABLE_AFTER};
use crate::billing::{self, Held, Next, Unsendable};
use crate::ledger::{Batch, Claim, Counts, Finish, Send};
use crate::mappings::{needed_formula, ProviderMeter};
use crate::metrics;
use crate::pacing::paced_account;
use crate::stripe::{ErrorClass, MeterEvent, StripeMeter};
use crate::Error;

/// Settles one claimed window as far as it can now, before `held_until` (when its lease
/// runs out). `None` when the window was claimed by another dispatcher meanwhile: it is
/// theirs to finish.
pub(super) async fn settle(
    ctx: &SyncContext,
    batch: &Batch,
    held_until: Instant,
    rng: &mut impl rand::Rng,
) -> Option<Finish> {
    match try_settle(ctx, batch, held_until, rng).await {
        Ok(finish) => Some(finish),
        Err(Error::ClaimLost { .. }) => None,
        // Our own database or a decryption failed: try again soon; nothing was lost.
        Err(e) => Some(Finish::RetryIn {
            seconds: 5.0,
            error: e.to_string(),
        }),
    }
}

async fn try_settle(
    ctx: &SyncContext,
    batch: &Batch,
    held_until: Instant,
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
    let paced = paced_account(
        &ctx.pacer,
        &ctx.stripe,
        &config,
        &batch.tenant_id,
        &batch.environment_id,
    );
    let account = match paced.await {
        Ok(account) => account,
        // Nothing went out: any outstanding send stays as it is.
        Err(e) if e.class == ErrorClass::Authentication => {
            return Ok(Finish::Failed(format!(
                "stripe refused the api key when asked for its account ({e}); meterline paces \
                 requests per stripe account and needs the key to read it: fix the stripe \
                 config, then retry"
            )))
        }
        Err(e) => {
            let seconds = ctx
                .window_backoff
                .delay(batch.attempts.max(0) as u32, e.retry_after, rng)
                .as_secs_f64()
                .max(0.5);
            return Ok(Finish::RetryIn {
                seconds,
                error: format!("stripe did not say which account the api key belongs to: {e}"),
            });
        }
    };

    // A window may need a few sends when new totals arrive while one is in flight; each
    // pass either settles or leaves for a retry.
    for _ in 0..4 {
        let mut send = match ctx.ledger.outstanding(batch.id).await? {
            Some(send)
                if send
                    .in_doubt_since
                    .is_some_and(|since| now - since > UNKNOWABLE_AFTER) =>
            {
                // Resending could bill twice once Stripe forgot the identifier: Stripe's
                // summaries decide, or a person.
                match settle_doubt(ctx, batch, &config.api_key, &account, &send).await? {
                    Ok(_) => continue,
                    Err(why) => {
                        return Ok(Finish::NeedsReconciliation(format!(
                            "meter event {} has been in doubt for over 23 h (an attempt got no \
                             certain answer) and {why}; Stripe may hold it and soon forgets its \
                             identifier: check Stripe, then resolve the window",
                            send.identifier
                        )))
                    }
                }
            }
            Some(send) => send,
            None => {
                let current = ctx.ledger.current(batch.id, &batch.window).await?;
                let stamp = billing::stamp(
                    &batch.window,
                    current.last_event_at,
                    current.period_end,
                    now,
                );
                let (value, accounted, stamp) = match billing::next_send(counts, &current) {
                    Ok(Next::Settled) => return Ok(Finish::Settled),
                    Ok(Next::Carry(change)) => {
                        ctx.ledger.carried(batch.claim, change).await?;
                        continue;
                    }
                    Ok(Next::Unchanged(total)) => {
                        ctx.ledger.unchanged_value(batch.claim, total).await?;
                        continue;
                    }
                    Ok(Next::Send { value, accounted }) => (value, accounted, stamp),
                    // Taken back in the period Stripe filed them in (never older than
                    // Stripe takes, like every stamp).
                    Ok(Next::Move {
                        value,
                        accounted,
                        at,
                    }) => (
                        value,
                        accounted,
                        billing::no_older_than_stripe_takes(at, now),
                    ),
                    Err(e) => return Ok(Finish::Failed(e.to_string())),
                };
                // Stripe puts usage reported after a period's invoice is final on no
                // invoice: such a change is reported, not sent into a closed period.
                let invoiced = ctx
                    .mappings
                    .invoice_finalized(
                        &batch.tenant_id,
                        &batch.environment_id,
                        customer.as_str(),
                        current.period_end,
                    )
                    .await
                    .map_err(|e| Error::Config(e.to_string()))?;
                if let Some(finalized_at) = invoiced {
                    metrics::change_after_final_invoice();
                    return Ok(Finish::Failed(format!(
                        "{AFTER_FINAL_INVOICE}: the invoice of the billing period ending {} was \
                         finalized at {}, so Stripe would bill this change ({value} units, of \
                         {} now counted) on no invoice; it was not sent, and the window stays \
                         failed as its record: bill or credit it by hand in Stripe",
                        timestamp(current.period_end),
                        timestamp(finalized_at),
                        current.total,
                    )));
                }
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
                    stripe_timestamp: stamp,
                    created_at: now,
                    in_doubt_since: None,
                };
                ctx.ledger.begin_send(batch.claim, &send).await?;
                send
            }
        };
        let delivery = deliver(
            ctx,
            &account,
            &config.api_key,
            (batch.claim, held_until),
            &mut send,
            rng,
        )
        .await?;
        match delivery {
            Delivery::Recorded => {
                ctx.ledger.accepted(batch.claim, &send).await?;
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
            // A refused key says nothing about the event: it is kept, to go out unchanged
            // (identifier and all) once the key is fixed and the window retried.
            Delivery::Refused { error, key: true } => {
                return Ok(Finish::Failed(format!(
                    "{error}; meter event {} is kept and goes out unchanged after the retry",
                    send.identifier
                )));
            }
            Delivery::Refused { error, .. } if send.in_doubt_since.is_some() => {
                match settle_doubt(ctx, batch, &config.api_key, &account, &send).await? {
                    // Stripe holds it after all: nothing is owed for it.
                    Ok(Held::Recorded) => continue,
                    // Stripe holds nothing of it: the refusal stands, the units are owed.
                    Ok(_) => return Ok(Finish::Failed(error)),
                    Err(why) => {
                        return Ok(Finish::NeedsReconciliation(format!(
                            "stripe refused meter event {} ({error}) after an earlier attempt \
                             got no certain answer, and {why}: Stripe may hold it; check \
                             Stripe, then resolve the window",
                            send.identifier
                        )));
                    }
                }
            }
            Delivery::Refused { error, .. } => {
                ctx.ledger.refused(batch.claim, &send, &error).await?;
                return Ok(Finish::Failed(error));
            }
        }
    }
    Ok(Finish::Settled)
}

/// How long Stripe may take to fold an accepted meter event into its summaries: a send in
/// doubt more recent than this is not judged by them.
/// How the reason of a window whose change came after its period's invoice was final
/// begins (`last_error` on the batches API).
pub const AFTER_FINAL_INVOICE: &str = "after_final_invoice";

fn timestamp(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

const SUMMARIES_SETTLED_AFTER: time::Duration = time::Duration::hours(1);

/// Settles a send in doubt from Stripe's meter event summaries of its window
/// ([`billing::held_by_stripe`]), in the ledger and the audit trail. `Err(why)` when they
/// cannot tell: a `last` meter (a value, not a sum), a doubt too recent, another writer, or
/// the summaries could not be read.
async fn settle_doubt(
    ctx: &SyncContext,
    batch: &Batch,
    key: &StripeApiKey,
    account: &crate::pacing::Account,
    send: &Send,
) -> Result<Result<Held, String>, Error> {
    if send.counts != Counts::Change {
        return Ok(Err(
            "a `last` meter's summaries cannot tell one value from another".into(),
        ));
    }
    let recent = send
        .in_doubt_since
        .is_some_and(|since| OffsetDateTime::now_utc() - since < SUMMARIES_SETTLED_AFTER);
    if recent {
        return Ok(Err(
            "it is too recent for Stripe's summaries to be sure of".into()
        ));
    }
    let (start, end) = (
        batch.window.start().unix_timestamp(),
        batch.window.end().unix_timestamp(),
    );
    let summary = async {
        account.ready().await.map_err(|n| n.why.to_string())?;
        let meter = ctx
            .stripe
            .find_meter(key, &send.event_name)
            .await
            .map_err(|e| e.to_string())?
            .map(|m| m.id);
        let Some(meter) = meter else {
            return Ok(None);
        };
        account.ready().await.map_err(|n| n.why.to_string())?;
        ctx.stripe
            .summarised_total(key, &meter, &send.provider_customer_id, start, end)
            .await
            .map(Some)
            .map_err(|e| e.to_string())
    }
    .await;
    let summary = match summary {
        Ok(Some(summary)) => summary,
        Ok(None) => return Ok(Err(format!("stripe has no meter {}", send.event_name))),
        Err(e) => return Ok(Err(format!("stripe's summaries could not be read ({e})"))),
    };
    let accepted = ctx
        .ledger
        .accepted_units(&send.provider_customer_id, &send.event_name, start, end)
        .await?;
    let held = billing::held_by_stripe(summary, accepted, send.value);
    let reason = format!(
        "stripe's meter event summaries of {} for {start}..{end} hold {summary}; the ledger's \
         accepted meter events there sum to {accepted}, this one is {}",
        send.provider_customer_id, send.value
    );
    match held {
        Held::Unknown => Ok(Err(reason)),
        Held::Recorded | Held::NotRecorded => {
            ctx.ledger
                .resolved_from_stripe(batch, send, held == Held::Recorded, &reason)
                .await?;
            tracing::info!(
                batch_id = batch.id,
                identifier = %send.identifier,
                recorded = held == Held::Recorded,
                "meter event in doubt settled from stripe's summaries"
            );
            Ok(Ok(held))
        }
    }
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
                id,
                formula: Some(formula),
            })) => {
                ctx.mappings
                    .record_formula(
                        &batch.tenant_id,
                        &batch.environment_id,
                        &batch.meter_id,
                        (formula, &id),
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
    /// Refused: this attempt did not count. `key`: for the API key (401, 403), not for the
    /// event.
    Refused {
        error: String,
        key: bool,
    },
}

/// One meter event: paced, behind the breaker, retried up to `max_retries` times, each
/// attempt started only if it can end before `held_until`. `Err` only when a ledger write
/// failed (or the claim was lost).
async fn deliver(
    ctx: &SyncContext,
    account: &crate::pacing::Account,
    key: &StripeApiKey,
    (claim, held_until): (Claim, Instant),
    send: &mut Send,
    rng: &mut impl rand::Rng,
) -> Result<Delivery, Error> {
    // The last moment an attempt may start: it can take the whole request timeout.
    let last_start = held_until
        .checked_sub(ctx.settings.timeout)
        .unwrap_or(held_until);
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
        let waited = Instant::now();
        let ready = tokio::time::timeout_at(last_start, account.ready()).await;
        metrics::rate_limit_waited(waited.elapsed());
        if let Ok(Err(not_ready)) = ready {
            metrics::stripe_request(None, not_ready.outcome);
            return Ok(Delivery::Later {
                error: not_ready.why.into(),
                retry_after: Some(not_ready.wait),
                unanswered,
            });
        }
        if ready.is_err() {
            return Ok(Delivery::Later {
                error: "the account's rate limit left no time for a request before this \
                        window's lease ends"
                    .into(),
                retry_after: None,
                unanswered,
            });
        }
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
        account.record(result.as_ref().err().map(|e| e.class)).await;
        match result {
            Ok(_) => return Ok(Delivery::Recorded),
            Err(e) => match e.class {
                ErrorClass::Permanent => {
                    return Ok(Delivery::Refused {
                        error: e.to_string(),
                        key: false,
                    })
                }
                ErrorClass::Authentication => {
                    return Ok(Delivery::Refused {
                        error: format!(
                            "stripe refused the api key ({e}); fix the stripe config, then retry"
                        ),
                        key: true,
                    })
                }
                ErrorClass::Retriable | ErrorClass::RateLimited | ErrorClass::InProgress => {
                    tracing::debug!(error = %e, attempt, "meter event not recorded yet, retrying");
                    let server_error = e.status.is_some_and(|s| s >= 500);
                    // No answer, "still running" or a 5xx (whose outcome Stripe calls
                    // indeterminate): Stripe may hold the event from now on.
                    if e.status.is_none() || e.class == ErrorClass::InProgress || server_error {
                        ctx.ledger.in_doubt(claim, send).await?;
                    }
                    if server_error {
                        // Stripe would replay this 5xx for the same key: take the next one.
                        ctx.ledger.next_key_generation(claim, send).await?;
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
            let pause = ctx.request_backoff.delay(attempt, last_retry_after, rng);
            if Instant::now() + pause > last_start {
                // A long Retry-After: the window waits for it unclaimed.
                break;
            }
            tokio::time::sleep(pause).await;
        }
    }
    Ok(Delivery::Later {
        error: last_error,
        retry_after: last_retry_after,
        unanswered,
    })
}
