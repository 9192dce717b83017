//! The audit trail (`audit_log`): who changed a tenant environment's Stripe configuration, its
//! customer and meter mappings or the encryption of its stored secrets, and who had its Stripe
//! API key decrypted; what, and when.
//!
//! Rules kept here:
//! - A row is built only from a [`Change`], whose variants hold ids, masked keys, settings,
//!   counts and encryption key ids: none can carry an API key, a webhook secret or key
//!   material, so no secret reaches the table or the API that reads it.
//! - A change is recorded in the transaction that makes it (callers pass their transaction),
//!   so the trail holds a row for a change exactly when the change was committed. A
//!   decryption is recorded before the ciphertext is decrypted: no decryption without a row.
//! - Rows are appended, never updated or deleted; every read is scoped by tenant and
//!   environment.

use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgPool;
use time::OffsetDateTime;

use crate::stripe_config::MaskedConfig;
use meterline_common::auth::TenantScope;
use meterline_common::postgres::BindScope;

/// Longest page of the audit list.
pub const MAX_PAGE: u32 = 100;

/// Every action the trail records (what [`Change::action`] answers).
pub const ACTIONS: [&str; 8] = [
    "stripe_config.put",
    "api_key.decrypted",
    "encryption_keys.rotated",
    "customer_mapping.created",
    "customer_mapping.retired",
    "meter_mapping.created",
    "meter_mapping.deleted",
    "meter_event.resolved",
];

/// Who made a change or had a key decrypted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A control API request, with its token's subject when it had one.
    Api { subject: Option<String> },
    /// A Stripe webhook event.
    Webhook { event_id: String },
    /// A customer import job, with the subject of the token that started it.
    Import {
        job_id: String,
        subject: Option<String>,
    },
    /// The sink sending usage to Stripe.
    Sync,
    /// An operator command run against the database, such as `meterline rotate-keys`.
    Operator { command: String },
}

impl Actor {
    /// The caller of a control API request.
    pub fn api(scope: &TenantScope) -> Self {
        Self::Api {
            subject: scope.subject.clone(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Api { .. } => "api",
            Self::Webhook { .. } => "webhook",
            Self::Import { .. } => "import",
            Self::Sync => "sync",
            Self::Operator { .. } => "operator",
        }
    }

    fn subject(&self) -> Option<&str> {
        match self {
            Self::Api { subject } | Self::Import { subject, .. } => subject.as_deref(),
            Self::Webhook { .. } | Self::Sync | Self::Operator { .. } => None,
        }
    }

    fn reference(&self) -> Option<&str> {
        match self {
            Self::Webhook { event_id } => Some(event_id),
            Self::Import { job_id, .. } => Some(job_id),
            Self::Operator { command } => Some(command),
            Self::Api { .. } | Self::Sync => None,
        }
    }
}

/// Why an API key was decrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Sending a window's usage.
    Sync,
    /// `POST /v1/stripe/config/test`.
    ConfigTest,
    /// `GET /v1/stripe/reconcile`.
    Reconcile,
    /// Listing the account's customers for an import.
    CustomerImport,
    /// Reading the Stripe meter of a new meter mapping (its formula).
    MeterMapping,
    /// Fetching the details of a thin meter error report (`GET /v2/core/events/{id}`).
    ErrorReport,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sync => "sync",
            Self::ConfigTest => "config_test",
            Self::Reconcile => "reconcile",
            Self::CustomerImport => "customer_import",
            Self::MeterMapping => "meter_mapping",
            Self::ErrorReport => "error_report",
        }
    }
}

/// One audited change. Every field is something that may be shown to the tenant.
#[derive(Debug, Clone, PartialEq)]
pub enum Change<'a> {
    /// The Stripe configuration was created or replaced (masked, before and after).
    StripeConfigPut {
        before: Option<&'a MaskedConfig>,
        after: &'a MaskedConfig,
    },
    /// The API key was decrypted (`masked`: `sk_test_****abcd`).
    ApiKeyDecrypted { purpose: Purpose, masked: &'a str },
    /// The stored secrets were re-encrypted under another encryption key (ids only).
    EncryptionKeysRotated {
        from_key_ids: &'a [String],
        to_key_id: &'a str,
    },
    /// A customer mapping became active.
    CustomerMappingCreated {
        customer_id: &'a str,
        provider_customer_id: &'a str,
        /// `manual`, `webhook` or `import`.
        source: &'a str,
    },
    /// A customer mapping was retired.
    CustomerMappingRetired {
        customer_id: &'a str,
        provider_customer_id: &'a str,
        reason: &'a str,
    },
    MeterMappingCreated {
        meter_id: &'a str,
        provider_meter_id: &'a str,
        sync_enabled: bool,
    },
    MeterMappingDeleted {
        meter_id: &'a str,
        provider_meter_id: &'a str,
    },
    /// A meter event in doubt (Stripe may or may not hold it) was settled: `recorded` (it
    /// counts as synced) or not (its units go out again under a new identifier), by an
    /// operator or from Stripe's meter event summaries, with why.
    MeterEventResolved {
        customer_id: &'a str,
        meter_id: &'a str,
        identifier: &'a str,
        value: meterline_schemas::Decimal,
        recorded: bool,
        reason: &'a str,
    },
}

impl Change<'_> {
    pub fn action(&self) -> &'static str {
        match self {
            Self::StripeConfigPut { .. } => "stripe_config.put",
            Self::ApiKeyDecrypted { .. } => "api_key.decrypted",
            Self::EncryptionKeysRotated { .. } => "encryption_keys.rotated",
            Self::CustomerMappingCreated { .. } => "customer_mapping.created",
            Self::CustomerMappingRetired { .. } => "customer_mapping.retired",
            Self::MeterMappingCreated { .. } => "meter_mapping.created",
            Self::MeterMappingDeleted { .. } => "meter_mapping.deleted",
            Self::MeterEventResolved { .. } => "meter_event.resolved",
        }
    }

    fn target(&self) -> Option<&str> {
        match self {
            Self::CustomerMappingCreated { customer_id, .. }
            | Self::CustomerMappingRetired { customer_id, .. } => Some(customer_id),
            Self::MeterEventResolved { identifier, .. } => Some(identifier),
            Self::MeterMappingCreated { meter_id, .. }
            | Self::MeterMappingDeleted { meter_id, .. } => Some(meter_id),
            Self::StripeConfigPut { .. }
            | Self::ApiKeyDecrypted { .. }
            | Self::EncryptionKeysRotated { .. } => None,
        }
    }

    fn details(&self) -> Value {
        // MaskedConfig has no field able to hold a secret; the timestamps are left out
        // because the row has its own.
        let config = |c: &MaskedConfig| {
            json!({
                "api_key": c.api_key,
                "livemode": c.livemode,
                "webhook_secrets_count": c.webhook_secrets_count,
                "sync_enabled": c.sync_enabled,
                "aggregation_window_minutes": c.aggregation_window_minutes,
                "rate_limit_per_second": c.rate_limit_per_second,
            })
        };
        match self {
            Self::StripeConfigPut { before, after } => json!({
                "before": before.map(config),
                "after": config(after),
            }),
            Self::ApiKeyDecrypted { purpose, masked } => {
                json!({"purpose": purpose.as_str(), "api_key": masked})
            }
            Self::EncryptionKeysRotated {
                from_key_ids,
                to_key_id,
            } => json!({"from_key_ids": from_key_ids, "to_key_id": to_key_id}),
            Self::CustomerMappingCreated {
                customer_id,
                provider_customer_id,
                source,
            } => json!({
                "customer_id": customer_id,
                "provider_customer_id": provider_customer_id,
                "source": source,
            }),
            Self::CustomerMappingRetired {
                customer_id,
                provider_customer_id,
                reason,
            } => json!({
                "customer_id": customer_id,
                "provider_customer_id": provider_customer_id,
                "reason": reason,
            }),
            Self::MeterMappingCreated {
                meter_id,
                provider_meter_id,
                sync_enabled,
            } => json!({
                "meter_id": meter_id,
                "provider_meter_id": provider_meter_id,
                "sync_enabled": sync_enabled,
            }),
            Self::MeterMappingDeleted {
                meter_id,
                provider_meter_id,
            } => json!({"meter_id": meter_id, "provider_meter_id": provider_meter_id}),
            Self::MeterEventResolved {
                customer_id,
                meter_id,
                identifier,
                value,
                recorded,
                reason,
            } => json!({
                "customer_id": customer_id,
                "meter_id": meter_id,
                "identifier": identifier,
                "value": value.to_string(),
                "recorded": recorded,
                "reason": reason,
            }),
        }
    }
}

/// Appends one row for the tenant environment `(tenant, environment)`. Pass the transaction
/// that makes the change, so both commit together. The ids are plain strings because callers
/// hold them as read from their own rows as often as from a request's scope.
pub async fn record<'c, E>(
    executor: E,
    tenant: &str,
    environment: &str,
    actor: &Actor,
    change: &Change<'_>,
) -> Result<(), sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Postgres>,
{
    sqlx::query(
        "INSERT INTO audit_log
             (tenant_id, environment_id, actor_kind, actor_subject, actor_ref, action, target,
              details)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(tenant)
    .bind(environment)
    .bind(actor.kind())
    .bind(actor.subject())
    .bind(actor.reference())
    .bind(change.action())
    .bind(change.target())
    .bind(change.details())
    .execute(executor)
    .await?;
    Ok(())
}

/// Who, as a row shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActorView {
    pub kind: String,
    pub subject: Option<String>,
    #[serde(rename = "ref")]
    pub reference: Option<String>,
}

/// One row of the trail as the API answers it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditRecord {
    /// `before` of the next page takes it.
    pub id: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
    pub actor: ActorView,
    pub action: String,
    pub target: Option<String>,
    pub details: Value,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    occurred_at: OffsetDateTime,
    actor_kind: String,
    actor_subject: Option<String>,
    actor_ref: Option<String>,
    action: String,
    target: Option<String>,
    details: Value,
}

/// A page of the trail, newest first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditPage {
    pub data: Vec<AuditRecord>,
    pub has_more: bool,
}

/// Paging of the trail: at most `limit` (1..=[`MAX_PAGE`]) rows older than `before` (a row
/// id), optionally of one `action` only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditQuery {
    pub limit: u32,
    pub before: Option<i64>,
    pub action: Option<String>,
}

/// The trail of `scope`, newest first.
pub async fn list(
    pool: &PgPool,
    scope: &TenantScope,
    query: &AuditQuery,
) -> Result<AuditPage, meterline_common::Error> {
    let limit = query.limit.clamp(1, MAX_PAGE);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, occurred_at, actor_kind, actor_subject, actor_ref, action, target, details
         FROM audit_log
         WHERE tenant_id = $1 AND environment_id = $2
           AND ($3::bigint IS NULL OR id < $3)
           AND ($4::text IS NULL OR action = $4)
         ORDER BY id DESC
         LIMIT $5",
    )
    .bind_scope(scope)
    .bind(query.before)
    .bind(query.action.as_deref())
    .bind(i64::from(limit) + 1)
    .fetch_all(pool)
    .await
    .map_err(|source| meterline_common::Error::Postgres {
        context: "reading the audit log",
        source,
    })?;
    let has_more = rows.len() > limit as usize;
    let data = rows
        .into_iter()
        .take(limit as usize)
        .map(|r| AuditRecord {
            id: r.id,
            occurred_at: r.occurred_at,
            actor: ActorView {
                kind: r.actor_kind,
                subject: r.actor_subject,
                reference: r.actor_ref,
            },
            action: r.action,
            target: r.target,
            details: r.details,
        })
        .collect();
    Ok(AuditPage { data, has_more })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked() -> MaskedConfig {
        MaskedConfig {
            api_key: "sk_test_****abcd".into(),
            livemode: false,
            webhook_secrets_count: 2,
            sync_enabled: true,
            aggregation_window_minutes: 60,
            rate_limit_per_second: Some(10),
            created_at: OffsetDateTime::UNIX_EPOCH,
            updated_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn config_changes_carry_only_masked_values() {
        let after = masked();
        let change = Change::StripeConfigPut {
            before: None,
            after: &after,
        };
        assert_eq!(change.action(), "stripe_config.put");
        let details = change.details();
        assert_eq!(details["after"]["api_key"], "sk_test_****abcd");
        assert_eq!(details["after"]["webhook_secrets_count"], 2);
        assert_eq!(details["before"], Value::Null);
        assert_eq!(change.target(), None);
    }

    #[test]
    fn actors_name_who_and_through_what() {
        let import = Actor::Import {
            job_id: "job".into(),
            subject: Some("ops@example.com".into()),
        };
        assert_eq!(import.kind(), "import");
        assert_eq!(import.subject(), Some("ops@example.com"));
        assert_eq!(import.reference(), Some("job"));
        let op = Actor::Operator {
            command: "meterline rotate-keys".into(),
        };
        assert_eq!((op.kind(), op.subject()), ("operator", None));
        assert_eq!(Actor::Sync.reference(), None);
    }

    #[test]
    fn mapping_changes_name_their_target() {
        let change = Change::CustomerMappingRetired {
            customer_id: "c1",
            provider_customer_id: "cus_1",
            reason: "manual",
        };
        assert_eq!(change.target(), Some("c1"));
        assert_eq!(change.details()["provider_customer_id"], "cus_1");
        let meter = Change::MeterMappingCreated {
            meter_id: "calls",
            provider_meter_id: "api_calls",
            sync_enabled: true,
        };
        assert_eq!(meter.action(), "meter_mapping.created");
        assert!(ACTIONS.contains(&meter.action()) && ACTIONS.contains(&change.action()));
        assert_eq!(meter.target(), Some("calls"));
    }
}
