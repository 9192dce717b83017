//! Stripe's `customer.*` webhook events and the customers an import lists: parsing them
//! ([`CustomerEvent`]) and applying them to the customer mappings.
//!
//! Rules kept here:
//! - Webhook ordering (deliveries are at-least-once and unordered): each Stripe customer keeps
//!   the newest `customer.*` event applied to it (`stripe_customer_states`), ordered by
//!   [`EventOrder`] (`created`, then created < updated < deleted within one second, then the
//!   higher event id). An event that is not newer than the customer's newest changes nothing,
//!   and a deleted customer stays deleted. The webhook mappings are then a function of those
//!   newest events: an external id maps to the live customer whose newest event carries it
//!   (if several do, the one with the newest event), so the final mappings are the same
//!   whatever order the deliveries came in.
//! - Imported customers ([`crate::import`]) go through the very rule of webhooks: each listed
//!   customer is applied as a snapshot event ([`CustomerEvent::snapshot`]) dated just before
//!   the list was read, so a webhook event newer than the list wins and an older one is stale.
//!   Mappings made by webhooks and imports alike follow Stripe's metadata; manual ones stand.

use meterline_accounts::audit::Actor;
use meterline_schemas::{CustomerId, EnvironmentId, SchemaError, StripeEventId, TenantId};
use serde_json::Value;

use super::customers::{
    active_for_entity, audit_created, begin_locked, retire_provider, retire_row, ScopeTx, Writer,
};
use super::{
    keyed, unmapped, CustomerMappings, MappingError, MappingSource, Scope, StripeCustomerId, Tx,
};

/// The three `customer.*` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CustomerEventKind {
    Created,
    Updated,
    Deleted,
}

impl CustomerEventKind {
    pub fn from_event_type(event_type: &str) -> Option<Self> {
        match event_type {
            "customer.created" => Some(Self::Created),
            "customer.updated" => Some(Self::Updated),
            "customer.deleted" => Some(Self::Deleted),
            _ => None,
        }
    }

    /// Order inside one second of `created`: an update comes after the creation, a deletion
    /// after both.
    fn rank(self) -> i16 {
        match self {
            Self::Created => 0,
            Self::Updated => 1,
            Self::Deleted => 2,
        }
    }
}

/// Where one customer event stands among the events of its Stripe customer. Stripe's
/// `created` has one-second resolution, so same-second events are common: the kind breaks the
/// tie (created < updated < deleted), then the event id (an arbitrary but deterministic
/// choice, so every delivery order ends in the same state).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct EventOrder {
    pub created: i64,
    pub rank: i16,
    pub event_id: String,
}

/// What a customer event says about our customer id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExternalId {
    /// `metadata.external_id`, a valid [`CustomerId`].
    Present(CustomerId),
    /// No `metadata.external_id` (or an empty one).
    Missing,
    /// Present but not a valid customer id (too long, control characters, not a string).
    Invalid,
}

impl ExternalId {
    /// Reads `metadata.external_id` of a Stripe customer (absent when `None`).
    pub fn from_metadata(value: Option<&Value>) -> Self {
        match value {
            None | Some(Value::Null) => Self::Missing,
            Some(Value::String(s)) if s.is_empty() => Self::Missing,
            Some(Value::String(s)) => match CustomerId::parse(s) {
                Ok(id) => Self::Present(id),
                Err(_) => Self::Invalid,
            },
            Some(_) => Self::Invalid,
        }
    }

    /// The customer id it carries, if it is [`Self::Present`].
    pub(super) fn customer_id(&self) -> Option<&str> {
        match self {
            Self::Present(id) => Some(id.as_str()),
            Self::Missing | Self::Invalid => None,
        }
    }

    /// Why a customer carrying it is unmapped (when it is not [`Self::Present`]).
    pub(super) fn unmapped_reason(&self) -> &'static str {
        match self {
            Self::Invalid => "invalid_external_id",
            _ => "missing_external_id",
        }
    }
}

/// One `customer.created` / `customer.updated` / `customer.deleted` event, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerEvent {
    pub event_id: StripeEventId,
    pub kind: CustomerEventKind,
    /// Stripe's `created` of the event, Unix seconds.
    pub created: i64,
    pub customer: StripeCustomerId,
    pub external_id: ExternalId,
    pub email: Option<String>,
    pub name: Option<String>,
    pub livemode: bool,
}

impl CustomerEvent {
    /// A customer as an import listed it, applied like a `customer.updated` event created at
    /// `observed` (Unix seconds, taken a margin before the list was requested): webhook events
    /// created after it win, older ones are stale, exactly as between two webhook events.
    /// Its id, `import_<job id>`, names where the state came from.
    pub fn snapshot(
        job_id: &str,
        observed: i64,
        customer: StripeCustomerId,
        external_id: ExternalId,
        email: Option<String>,
        name: Option<String>,
        livemode: bool,
    ) -> Result<Self, SchemaError> {
        Ok(Self {
            event_id: StripeEventId::parse(&format!("import_{job_id}"))?,
            kind: CustomerEventKind::Updated,
            created: observed,
            customer,
            external_id,
            email: email.filter(|e| !e.is_empty()),
            name: name.filter(|n| !n.is_empty()),
            livemode,
        })
    }

    pub fn order(&self) -> EventOrder {
        EventOrder {
            created: self.created,
            rank: self.kind.rank(),
            event_id: self.event_id.as_str().to_owned(),
        }
    }

    fn metadata(&self) -> Value {
        serde_json::json!({
            "email": self.email,
            "name": self.name,
            "livemode": self.livemode,
        })
    }
}

/// What applying one customer event did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WebhookOutcome {
    /// False when the event was not newer than what the customer already had (a duplicate or a
    /// late delivery): nothing changed.
    pub applied: bool,
    /// Mappings made active.
    pub created: u32,
    /// Active mappings refreshed by a newer event of their customer.
    pub updated: u32,
    /// Active mappings retired.
    pub retired: u32,
    /// The customer was recorded as unmapped.
    pub unmapped: bool,
}

impl CustomerMappings<'_> {
    /// Applies one `customer.*` event under the ordering rule of this module.
    pub async fn upsert_from_webhook(
        &self,
        tenant: &TenantId,
        env: &EnvironmentId,
        event: &CustomerEvent,
    ) -> Result<WebhookOutcome, MappingError> {
        let scope = (tenant.as_str(), env.as_str());
        let mut tx = begin_locked(self.pool, scope).await?;
        let actor = Actor::Webhook {
            event_id: event.event_id.as_str().to_owned(),
        };
        let writer = Writer {
            actor: &actor,
            source: MappingSource::Webhook,
        };
        let outcome = apply_event(&mut tx, scope, event, &writer).await?;
        tx.commit().await?;
        Ok(outcome)
    }
}

/// What `stripe_customer_states` holds of one Stripe customer: the newest event applied to
/// it, and what that event said.
pub(super) struct CustomerState {
    pub external_id: Option<String>,
    pub deleted: bool,
    pub newest: EventOrder,
}

/// The state of Stripe customer `customer`, if any event of it was applied.
pub(super) async fn customer_state(
    tx: &mut Tx,
    scope: Scope<'_>,
    customer: &str,
) -> Result<Option<CustomerState>, sqlx::Error> {
    let row: Option<(Option<String>, bool, String, i64, i16)> = keyed(
        "SELECT external_id, deleted, last_event_id, last_event_created, last_event_rank
         FROM stripe_customer_states
         WHERE tenant_id = $1 AND environment_id = $2 AND provider_customer_id = $3",
        scope,
        customer,
    )
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row.map(
        |(external_id, deleted, event_id, created, rank)| CustomerState {
            external_id,
            deleted,
            newest: EventOrder {
                created,
                rank,
                event_id,
            },
        },
    ))
}

/// Applies one customer event (a webhook's, or an import's snapshot) inside `tx`, which holds
/// the scope's lock ([`begin_locked`]).
pub(crate) async fn apply_event(
    tx: &mut Tx,
    scope: Scope<'_>,
    event: &CustomerEvent,
    writer: &Writer<'_>,
) -> Result<WebhookOutcome, MappingError> {
    let customer = event.customer.as_str();
    let order = event.order();

    let previous = customer_state(tx, scope, customer).await?;
    let mut outcome = WebhookOutcome::default();
    if let Some(previous) = &previous {
        // A deleted customer is never revived, whatever `created` a later event claims.
        if previous.deleted || order <= previous.newest {
            return Ok(outcome);
        }
    }
    outcome.applied = true;

    let deleted = event.kind == CustomerEventKind::Deleted;
    let external_id = event.external_id.customer_id();
    let (t, e) = scope;
    sqlx::query(
        "INSERT INTO stripe_customer_states
             (tenant_id, environment_id, provider_customer_id, external_id, deleted,
              last_event_id, last_event_created, last_event_rank)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (tenant_id, environment_id, provider_customer_id) DO UPDATE
         SET external_id = EXCLUDED.external_id, deleted = EXCLUDED.deleted,
             last_event_id = EXCLUDED.last_event_id,
             last_event_created = EXCLUDED.last_event_created,
             last_event_rank = EXCLUDED.last_event_rank, updated_at = now()",
    )
    .bind(t)
    .bind(e)
    .bind(customer)
    .bind(external_id)
    .bind(deleted)
    .bind(&order.event_id)
    .bind(order.created)
    .bind(order.rank)
    .execute(&mut **tx)
    .await?;

    if deleted {
        outcome.retired += retire_provider(
            tx,
            scope,
            customer,
            None,
            writer.actor,
            "stripe customer deleted",
        )
        .await?;
    }
    // The external ids whose owner may have changed: the one the customer had, and the
    // one it has now.
    let mut affected: Vec<&str> = Vec::new();
    if let Some(old) = previous.as_ref().and_then(|p| p.external_id.as_deref()) {
        affected.push(old);
    }
    if let Some(new) = external_id {
        if !affected.contains(&new) {
            affected.push(new);
        }
    }
    for entity in affected {
        reconcile(tx, scope, entity, event, writer, &mut outcome).await?;
    }

    outcome.unmapped = unmapped::follow_event(tx, scope, event, &order).await?;
    Ok(outcome)
}

/// Makes the active mapping of `entity` match its owner: the live Stripe customer whose
/// newest event carries it (the newest such event wins).
async fn reconcile(
    tx: &mut Tx,
    scope: Scope<'_>,
    entity: &str,
    event: &CustomerEvent,
    writer: &Writer<'_>,
    outcome: &mut WebhookOutcome,
) -> Result<(), sqlx::Error> {
    let owner: Option<(String, String, i64)> = keyed(
        "SELECT provider_customer_id, last_event_id, last_event_created
         FROM stripe_customer_states
         WHERE tenant_id = $1 AND environment_id = $2 AND external_id = $3 AND NOT deleted
         ORDER BY last_event_created DESC, last_event_rank DESC, last_event_id DESC
         LIMIT 1",
        scope,
        entity,
    )
    .fetch_optional(&mut **tx)
    .await?;
    let active = active_for_entity(tx, scope, entity).await?;
    match (owner, active) {
        (None, None) => {}
        (None, Some((id, _, source))) => {
            // Nobody claims the external id any more; a manual mapping stays, one made
            // from Stripe's metadata (webhook or import) goes with it.
            if source != MappingSource::Manual.as_str() {
                retire_row(
                    tx,
                    scope,
                    id,
                    writer.actor,
                    "external id no longer on the stripe customer",
                )
                .await?;
                outcome.retired += 1;
            }
        }
        (Some((owner, event_id, created)), Some((id, provider, _))) if provider == owner => {
            if owner == event.customer.as_str() {
                sqlx::query(
                    "UPDATE entity_integration_mappings
                     SET last_event_id = $2, last_event_created = $3, metadata = $4,
                         updated_at = now()
                     WHERE id = $1",
                )
                .bind(id)
                .bind(event_id)
                .bind(created)
                .bind(event.metadata())
                .execute(&mut **tx)
                .await?;
                outcome.updated += 1;
            }
        }
        (Some((owner, event_id, created)), active) => {
            if let Some((id, ..)) = active {
                retire_row(
                    tx,
                    scope,
                    id,
                    writer.actor,
                    "external id now on another stripe customer",
                )
                .await?;
                outcome.retired += 1;
            }
            outcome.retired += retire_provider(
                tx,
                scope,
                &owner,
                Some(entity),
                writer.actor,
                "stripe customer now carries another external id",
            )
            .await?;
            let metadata = if owner == event.customer.as_str() {
                event.metadata()
            } else {
                serde_json::json!({})
            };
            let (t, e) = scope;
            sqlx::query(
                "INSERT INTO entity_integration_mappings
                     (tenant_id, environment_id, entity_type, entity_id, provider_type,
                      provider_entity_id, status, source, last_event_id, last_event_created,
                      metadata)
                 VALUES ($1, $2, 'customer', $3, 'stripe', $4, 'active', $8, $5, $6, $7)",
            )
            .bind(t)
            .bind(e)
            .bind(entity)
            .bind(&owner)
            .bind(event_id)
            .bind(created)
            .bind(metadata)
            .bind(writer.source.as_str())
            .execute(&mut **tx)
            .await?;
            audit_created(tx, scope, writer.actor, (entity, &owner), writer.source).await?;
            outcome.created += 1;
        }
    }
    Ok(())
}

/// What importing one listed customer did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Imported {
    /// Its external id is now mapped to it; `retired` earlier mappings gave way.
    Created { retired: u32 },
    /// Its external id was already mapped to it.
    Unchanged,
    /// It carries an external id the rules leave mapped elsewhere, or not at all.
    Conflict { customer_id: String, reason: String },
    /// It has no usable external id (`missing_external_id`, `invalid_external_id`);
    /// `retired` mappings it used to have.
    Unmapped { reason: &'static str, retired: u32 },
}

/// Applies an import's snapshot of one customer ([`CustomerEvent::snapshot`]) inside `tx`.
///
/// A snapshot that says what the customer's state already says (same external id, not
/// deleted) is not news and writes nothing: a second import changes nothing, and two Stripe
/// customers carrying one external id keep the mapping the first import gave them instead
/// of trading it back and forth.
pub(crate) async fn import_snapshot(
    tx: &mut ScopeTx,
    scope: Scope<'_>,
    event: &CustomerEvent,
    writer: &Writer<'_>,
) -> Result<Imported, MappingError> {
    let customer = event.customer.as_str();
    let state = customer_state(tx, scope, customer).await?;
    let external = event.external_id.customer_id();
    let known = matches!(&state, Some(s) if !s.deleted && s.external_id.as_deref() == external);
    let outcome = if known {
        WebhookOutcome::default()
    } else {
        apply_event(tx, scope, event, writer).await?
    };
    let Some(external) = external else {
        return Ok(Imported::Unmapped {
            reason: event.external_id.unmapped_reason(),
            retired: outcome.retired,
        });
    };
    let deleted = state.is_some_and(|s| s.deleted);
    Ok(match active_for_entity(tx, scope, external).await? {
        Some((_, provider, _)) if provider == customer && outcome.created > 0 => {
            Imported::Created {
                retired: outcome.retired,
            }
        }
        Some((_, provider, _)) if provider == customer => Imported::Unchanged,
        Some((_, provider, source)) => Imported::Conflict {
            customer_id: external.to_owned(),
            reason: format!("customer {external} is mapped to {provider} (source {source})"),
        },
        None => Imported::Conflict {
            customer_id: external.to_owned(),
            reason: if deleted {
                "the stripe customer was deleted".to_owned()
            } else {
                format!(
                    "customer {external} has no active mapping: it was retired, or a newer \
                     stripe event took the external id away"
                )
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(created: i64, kind: CustomerEventKind, id: &str) -> EventOrder {
        EventOrder {
            created,
            rank: kind.rank(),
            event_id: id.to_owned(),
        }
    }

    #[test]
    fn event_order_is_created_then_kind_then_id() {
        use CustomerEventKind::*;
        assert!(order(10, Created, "evt_b") < order(11, Created, "evt_a"));
        assert!(order(10, Deleted, "evt_z") < order(11, Created, "evt_a"));
        assert!(order(10, Created, "evt_z") < order(10, Updated, "evt_a"));
        assert!(order(10, Updated, "evt_z") < order(10, Deleted, "evt_a"));
        assert!(order(10, Updated, "evt_a") < order(10, Updated, "evt_b"));
        assert_eq!(order(10, Updated, "evt_a"), order(10, Updated, "evt_a"));
    }
}
