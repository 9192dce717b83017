//! Each tenant environment's Stripe configuration in PostgreSQL (`stripe_configs`): the API
//! key and webhook secrets, encrypted with [`crate::crypto::Keyring`], and the sync settings.
//!
//! Rules kept here: a secret is parsed into its type at the edge and stored only encrypted,
//! bound to its tenant, environment and purpose; what leaves this module for a response is
//! [`MaskedConfig`], which cannot hold a secret; decrypting is explicit and named.
//!
//! Audited ([`crate::audit`]): every write of a configuration and every re-encryption is
//! recorded in its own transaction, and every decryption of an API key is recorded, with who
//! asked and why, before the key is decrypted. A key decrypted to send windows is reused for
//! [`SYNC_KEY_REUSE`] (see there), so that those rows do not grow with the windows.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meterline_schemas::{EnvironmentId, TenantId};
use serde::Serialize;
use sqlx::PgPool;
use time::OffsetDateTime;

use crate::audit::{self, Actor, Change, Purpose};
use crate::crypto::{CryptoError, Keyring};
use meterline_common::auth::TenantScope;

/// A Stripe secret or restricted key: `sk_test_`, `sk_live_`, `rk_test_` or `rk_live_`.
#[derive(Clone, PartialEq, Eq)]
pub struct StripeApiKey(String);

impl std::fmt::Debug for StripeApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StripeApiKey({})", self.masked())
    }
}

const KEY_PREFIXES: [&str; 4] = ["sk_test_", "sk_live_", "rk_test_", "rk_live_"];

impl StripeApiKey {
    pub fn parse(value: &str) -> Result<Self, &'static str> {
        let value = value.trim();
        let prefix = KEY_PREFIXES
            .iter()
            .find(|p| value.starts_with(**p))
            .ok_or("api_key must be a Stripe secret or restricted key (sk_test_, sk_live_, rk_test_, rk_live_)")?;
        let rest = &value[prefix.len()..];
        if rest.len() < 4 || rest.len() > 255 || !rest.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err("api_key is not a well-formed Stripe key");
        }
        Ok(Self(value.to_owned()))
    }

    pub fn livemode(&self) -> bool {
        self.0.contains("_live_")
    }

    /// `sk_test_`, `rk_live_`, ...
    pub fn prefix(&self) -> &str {
        &self.0[..8]
    }

    pub fn last4(&self) -> &str {
        &self.0[self.0.len() - 4..]
    }

    /// What may be shown: `sk_test_****abcd`.
    pub fn masked(&self) -> String {
        format!("{}****{}", self.prefix(), self.last4())
    }

    /// The key itself, for the `Authorization` header of a Stripe request only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// A webhook endpoint's signing secret, `whsec_...`.
#[derive(Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct WebhookSecret(String);

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WebhookSecret(<redacted>)")
    }
}

impl TryFrom<String> for WebhookSecret {
    type Error = &'static str;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<WebhookSecret> for String {
    fn from(s: WebhookSecret) -> String {
        s.0
    }
}

impl WebhookSecret {
    pub fn parse(value: &str) -> Result<Self, &'static str> {
        let value = value.trim();
        match value.strip_prefix("whsec_") {
            Some(rest)
                if (8..=255).contains(&rest.len())
                    && rest.chars().all(|c| c.is_ascii_alphanumeric()) =>
            {
                Ok(Self(value.to_owned()))
            }
            _ => Err("webhook secrets look like whsec_ followed by letters and digits"),
        }
    }

    /// The HMAC key bytes.
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// A valid configuration to store.
#[derive(Debug, Clone)]
pub struct NewConfig {
    pub api_key: StripeApiKey,
    pub webhook_secrets: Vec<WebhookSecret>,
    pub sync_enabled: bool,
    pub aggregation_window_minutes: u32,
    pub rate_limit_per_second: Option<u32>,
}

/// What the sink needs of a configuration to send usage.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub api_key: StripeApiKey,
    pub sync_enabled: bool,
    pub rate_limit_per_second: Option<u32>,
}

/// A stored configuration as a response may show it: no secret in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MaskedConfig {
    pub api_key: String,
    pub livemode: bool,
    pub webhook_secrets_count: usize,
    pub sync_enabled: bool,
    pub aggregation_window_minutes: u32,
    pub rate_limit_per_second: Option<u32>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigStoreError {
    #[error("stripe config: {0}")]
    Database(#[from] sqlx::Error),
    #[error("stripe config: {0}")]
    Crypto(#[from] CryptoError),
    #[error("stripe config: stored value is invalid: {0}")]
    Corrupt(String),
}

fn context(tenant: &TenantId, environment: &EnvironmentId, purpose: &str) -> String {
    format!("{tenant}/{environment}/{purpose}")
}

#[derive(sqlx::FromRow)]
struct Row {
    api_key_prefix: String,
    api_key_last4: String,
    livemode: bool,
    webhook_secrets_encrypted: String,
    sync_enabled: bool,
    aggregation_window_minutes: i32,
    rate_limit_per_second: Option<i32>,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
}

/// How long a store reuses an API key it decrypted for [`Purpose::Sync`]. The sync sends
/// window after window: one decryption, and one audit row, per window would make the audit
/// trail grow with the windows. Reused, they are one per sink process, tenant environment
/// and this period, and one more whenever the stored ciphertext changes (a new key, or a
/// re-encryption), which every use compares first. Every other purpose decrypts each time.
pub const SYNC_KEY_REUSE: Duration = Duration::from_secs(600);

/// A key decrypted for the sync: the ciphertext it came from, and when.
struct SyncKey {
    encrypted: String,
    key: StripeApiKey,
    decrypted_at: Instant,
}

#[derive(Clone)]
pub struct StripeConfigStore {
    pool: PgPool,
    keys: Keyring,
    /// Keys decrypted for [`Purpose::Sync`], by (tenant, environment). Behind one lock held
    /// while a missing key is decrypted, so that concurrent dispatchers decrypt (and audit)
    /// it once; that happens once per [`SYNC_KEY_REUSE`].
    sync_keys: Arc<tokio::sync::Mutex<HashMap<(String, String), SyncKey>>>,
}

impl StripeConfigStore {
    pub fn new(pool: PgPool, keys: Keyring) -> Self {
        Self {
            pool,
            keys,
            sync_keys: Arc::default(),
        }
    }

    /// Creates or replaces the configuration of `scope`; the audit trail records the masked
    /// configuration before and after, in the same transaction.
    pub async fn put(
        &self,
        scope: &TenantScope,
        config: &NewConfig,
    ) -> Result<MaskedConfig, ConfigStoreError> {
        let (t, e) = (&scope.tenant_id, &scope.environment_id);
        let api_key = self.keys.encrypt(
            config.api_key.expose().as_bytes(),
            &context(t, e, "api_key"),
        )?;
        let secrets_json = serde_json::to_vec(&config.webhook_secrets)
            .map_err(|e| ConfigStoreError::Corrupt(e.to_string()))?;
        let secrets = self
            .keys
            .encrypt(&secrets_json, &context(t, e, "webhook_secrets"))?;
        let mut tx = self.pool.begin().await?;
        // Locks the row (when there is one) so that two writers audit in the order they wrote.
        let before = self
            .row(&mut *tx, t, e, true)
            .await?
            .map(|row| self.masked(t, e, &row))
            .transpose()?;
        sqlx::query(
            "INSERT INTO stripe_configs (tenant_id, environment_id, api_key_encrypted,
                 api_key_prefix, api_key_last4, livemode, webhook_secrets_encrypted,
                 sync_enabled, aggregation_window_minutes, rate_limit_per_second)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             ON CONFLICT (tenant_id, environment_id) DO UPDATE SET
                 api_key_encrypted = EXCLUDED.api_key_encrypted,
                 api_key_prefix = EXCLUDED.api_key_prefix,
                 api_key_last4 = EXCLUDED.api_key_last4,
                 livemode = EXCLUDED.livemode,
                 webhook_secrets_encrypted = EXCLUDED.webhook_secrets_encrypted,
                 sync_enabled = EXCLUDED.sync_enabled,
                 aggregation_window_minutes = EXCLUDED.aggregation_window_minutes,
                 rate_limit_per_second = EXCLUDED.rate_limit_per_second,
                 updated_at = now()",
        )
        .bind(t.as_str())
        .bind(e.as_str())
        .bind(api_key)
        .bind(config.api_key.prefix())
        .bind(config.api_key.last4())
        .bind(config.api_key.livemode())
        .bind(secrets)
        .bind(config.sync_enabled)
        .bind(config.aggregation_window_minutes as i32)
        .bind(config.rate_limit_per_second.map(|r| r as i32))
        .execute(&mut *tx)
        .await?;
        let after = self
            .row(&mut *tx, t, e, false)
            .await?
            .ok_or_else(|| ConfigStoreError::Corrupt("the row just written is missing".into()))
            .and_then(|row| self.masked(t, e, &row))?;
        audit::record(
            &mut *tx,
            t.as_str(),
            e.as_str(),
            &Actor::api(scope),
            &Change::StripeConfigPut {
                before: before.as_ref(),
                after: &after,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(after)
    }

    /// The configuration of `scope`, masked.
    pub async fn get(&self, scope: &TenantScope) -> Result<Option<MaskedConfig>, ConfigStoreError> {
        let (t, e) = (&scope.tenant_id, &scope.environment_id);
        self.row(&self.pool, t, e, false)
            .await?
            .map(|row| self.masked(t, e, &row))
            .transpose()
    }

    fn masked(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
        row: &Row,
    ) -> Result<MaskedConfig, ConfigStoreError> {
        let secrets = self.secrets_of(tenant, environment, row)?;
        Ok(MaskedConfig {
            api_key: format!("{}****{}", row.api_key_prefix, row.api_key_last4),
            livemode: row.livemode,
            webhook_secrets_count: secrets.len(),
            sync_enabled: row.sync_enabled,
            aggregation_window_minutes: row.aggregation_window_minutes.max(0) as u32,
            rate_limit_per_second: row.rate_limit_per_second.map(|r| r.max(0) as u32),
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }

    async fn row<'c, E>(
        &self,
        executor: E,
        tenant: &TenantId,
        environment: &EnvironmentId,
        for_update: bool,
    ) -> Result<Option<Row>, ConfigStoreError>
    where
        E: sqlx::Executor<'c, Database = sqlx::Postgres>,
    {
        let lock = if for_update { " FOR UPDATE" } else { "" };
        Ok(sqlx::query_as(&format!(
            "SELECT api_key_prefix, api_key_last4, livemode, webhook_secrets_encrypted,
                    sync_enabled, aggregation_window_minutes, rate_limit_per_second,
                    created_at, updated_at
             FROM stripe_configs WHERE tenant_id = $1 AND environment_id = $2{lock}"
        ))
        .bind(tenant.as_str())
        .bind(environment.as_str())
        .fetch_optional(executor)
        .await?)
    }

    fn secrets_of(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
        row: &Row,
    ) -> Result<Vec<WebhookSecret>, ConfigStoreError> {
        let plain = self.keys.decrypt(
            &row.webhook_secrets_encrypted,
            &context(tenant, environment, "webhook_secrets"),
        )?;
        serde_json::from_slice(&plain).map_err(|e| ConfigStoreError::Corrupt(e.to_string()))
    }

    /// The webhook signing secrets of a tenant environment; `None` when it has no Stripe
    /// configuration at all.
    pub async fn webhook_secrets(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
    ) -> Result<Option<Vec<WebhookSecret>>, ConfigStoreError> {
        match self.row(&self.pool, tenant, environment, false).await? {
            None => Ok(None),
            Some(row) => self.secrets_of(tenant, environment, &row).map(Some),
        }
    }

    /// The decrypted API key of a tenant environment, for calling Stripe; `None` without a
    /// configuration. The audit trail records `actor` and `purpose` first: a key is never
    /// decrypted unrecorded. For [`Purpose::Sync`] a key this store decrypted from the same
    /// ciphertext less than [`SYNC_KEY_REUSE`] ago is reused, without decrypting again.
    pub async fn api_key(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
        actor: &Actor,
        purpose: Purpose,
    ) -> Result<Option<StripeApiKey>, ConfigStoreError> {
        let stored: Option<(String, String, String)> = sqlx::query_as(
            "SELECT api_key_encrypted, api_key_prefix, api_key_last4 FROM stripe_configs
             WHERE tenant_id = $1 AND environment_id = $2",
        )
        .bind(tenant.as_str())
        .bind(environment.as_str())
        .fetch_optional(&self.pool)
        .await?;
        let Some((encrypted, prefix, last4)) = stored else {
            return Ok(None);
        };
        let masked = format!("{prefix}****{last4}");
        if purpose != Purpose::Sync {
            return self
                .decrypt_api_key(tenant, environment, actor, purpose, &encrypted, &masked)
                .await
                .map(Some);
        }
        let mut sync_keys = self.sync_keys.lock().await;
        let scope = (tenant.as_str().to_owned(), environment.as_str().to_owned());
        if let Some(reused) = sync_keys
            .get(&scope)
            .filter(|k| k.encrypted == encrypted && k.decrypted_at.elapsed() < SYNC_KEY_REUSE)
        {
            return Ok(Some(reused.key.clone()));
        }
        let key = self
            .decrypt_api_key(tenant, environment, actor, purpose, &encrypted, &masked)
            .await?;
        sync_keys.insert(
            scope,
            SyncKey {
                encrypted,
                key: key.clone(),
                decrypted_at: Instant::now(),
            },
        );
        Ok(Some(key))
    }

    /// Records the decryption of `encrypted` (shown as `masked`), then decrypts it.
    async fn decrypt_api_key(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
        actor: &Actor,
        purpose: Purpose,
        encrypted: &str,
        masked: &str,
    ) -> Result<StripeApiKey, ConfigStoreError> {
        audit::record(
            &self.pool,
            tenant.as_str(),
            environment.as_str(),
            actor,
            &Change::ApiKeyDecrypted { purpose, masked },
        )
        .await?;
        let plain = self
            .keys
            .decrypt(encrypted, &context(tenant, environment, "api_key"))?;
        let text = String::from_utf8(plain)
            .map_err(|_| ConfigStoreError::Corrupt("api key is not text".into()))?;
        StripeApiKey::parse(&text).map_err(|e| ConfigStoreError::Corrupt(e.into()))
    }

    /// What the sink needs to call Stripe for a tenant environment: its decrypted key (the
    /// decryption audited as `actor` and `purpose`), whether sync is on, and its rate
    /// (configured, or Stripe's default for the key's mode). `None` without a configuration.
    pub async fn for_sync(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
        actor: &Actor,
        purpose: Purpose,
    ) -> Result<Option<SyncConfig>, ConfigStoreError> {
        let row: Option<(bool, Option<i32>)> = sqlx::query_as(
            "SELECT sync_enabled, rate_limit_per_second FROM stripe_configs
             WHERE tenant_id = $1 AND environment_id = $2",
        )
        .bind(tenant.as_str())
        .bind(environment.as_str())
        .fetch_optional(&self.pool)
        .await?;
        let Some((sync_enabled, rate)) = row else {
            return Ok(None);
        };
        let Some(api_key) = self.api_key(tenant, environment, actor, purpose).await? else {
            return Ok(None);
        };
        Ok(Some(SyncConfig {
            rate_limit_per_second: rate.map(|r| r.max(1) as u32),
            api_key,
            sync_enabled,
        }))
    }

    /// Re-encrypts every stored secret under the primary key (after adding a new key at the
    /// front of `ENCRYPTION_KEYS`); returns how many rows changed. One transaction: each
    /// re-encrypted configuration gets an audit row (the key ids, never key material) naming
    /// the operator command `meterline rotate-keys`.
    pub async fn rotate_keys(&self) -> Result<u64, ConfigStoreError> {
        self.rotate_keys_as(&Actor::Operator {
            command: "meterline rotate-keys".into(),
        })
        .await
    }

    /// [`Self::rotate_keys`], audited as `actor`.
    pub async fn rotate_keys_as(&self, actor: &Actor) -> Result<u64, ConfigStoreError> {
        let mut tx = self.pool.begin().await?;
        let rows: Vec<(String, String, String, String)> = sqlx::query_as(
            "SELECT tenant_id, environment_id, api_key_encrypted, webhook_secrets_encrypted
             FROM stripe_configs FOR UPDATE",
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut changed = 0;
        for (tenant, environment, api_key, secrets) in rows {
            let api_ctx = format!("{tenant}/{environment}/api_key");
            let secrets_ctx = format!("{tenant}/{environment}/webhook_secrets");
            let new_key = self.keys.reencrypt(&api_key, &api_ctx)?;
            let new_secrets = self.keys.reencrypt(&secrets, &secrets_ctx)?;
            if new_key.is_none() && new_secrets.is_none() {
                continue;
            }
            let mut from_key_ids: Vec<String> = Vec::new();
            for stored in [&api_key, &secrets] {
                let id = Keyring::key_id_of(stored)?.to_owned();
                if !from_key_ids.contains(&id) {
                    from_key_ids.push(id);
                }
            }
            sqlx::query(
                "UPDATE stripe_configs SET api_key_encrypted = $3, webhook_secrets_encrypted = $4
                 WHERE tenant_id = $1 AND environment_id = $2",
            )
            .bind(&tenant)
            .bind(&environment)
            .bind(new_key.unwrap_or(api_key))
            .bind(new_secrets.unwrap_or(secrets))
            .execute(&mut *tx)
            .await?;
            audit::record(
                &mut *tx,
                &tenant,
                &environment,
                actor,
                &Change::EncryptionKeysRotated {
                    from_key_ids: &from_key_ids,
                    to_key_id: self.keys.primary_id(),
                },
            )
            .await?;
            changed += 1;
        }
        tx.commit().await?;
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys() {
        let key = StripeApiKey::parse("sk_test_51Habcdefghij1234").unwrap();
        assert_eq!(key.masked(), "sk_test_****1234");
        assert!(!key.livemode());
        assert!(!format!("{key:?}").contains("abcdefgh"));
        assert!(StripeApiKey::parse("rk_live_abcdefgh12")
            .unwrap()
            .livemode());
        for bad in [
            "",
            "pk_test_abcdefgh",
            "sk_test_abc",
            "sk_test_has space12",
            "sk_test_",
        ] {
            assert!(StripeApiKey::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn webhook_secrets() {
        assert!(WebhookSecret::parse("whsec_abcdefgh1234").is_ok());
        assert!(WebhookSecret::parse("abcdefgh1234").is_err());
        assert!(WebhookSecret::parse("whsec_").is_err());
        let s = WebhookSecret::parse("whsec_abcdefgh1234").unwrap();
        assert_eq!(format!("{s:?}"), "WebhookSecret(<redacted>)");
    }
}
