//! Which secrets sign a tenant environment's webhooks: those of its Stripe configuration, or
//! `STRIPE_WEBHOOK_SECRET` when that configuration lists none.
//!
//! Rule kept here: a tenant environment without any Stripe configuration has no endpoint at
//! all (`None`), even when a global secret is set: the global secret must not open an address
//! for every tenant id anyone can type.

use meterline_accounts::stripe_config::{ConfigStoreError, StripeConfigStore, WebhookSecret};
use meterline_schemas::{EnvironmentId, TenantId};

use crate::error::WebhookError;

#[derive(Clone)]
pub struct EndpointSecrets {
    store: StripeConfigStore,
    fallback: Option<WebhookSecret>,
}

impl EndpointSecrets {
    pub fn new(store: StripeConfigStore, fallback: Option<WebhookSecret>) -> Self {
        Self { store, fallback }
    }

    /// The secrets to verify a delivery for this tenant environment with; `None` when it has
    /// no Stripe configuration. May be empty (nothing then verifies).
    pub async fn for_endpoint(
        &self,
        tenant: &TenantId,
        environment: &EnvironmentId,
    ) -> Result<Option<Vec<WebhookSecret>>, WebhookError> {
        let secrets = self
            .store
            .webhook_secrets(tenant, environment)
            .await
            .map_err(|e| match e {
                ConfigStoreError::Database(error) => {
                    tracing::warn!(%error, "reading webhook secrets failed");
                    WebhookError::PostgresUnavailable
                }
                // Undecryptable or corrupt: retrying will not help, and it is ours to fix.
                other => WebhookError::internal(&other),
            })?;
        Ok(secrets.map(|secrets| with_fallback(secrets, self.fallback.as_ref())))
    }
}

fn with_fallback(
    secrets: Vec<WebhookSecret>,
    fallback: Option<&WebhookSecret>,
) -> Vec<WebhookSecret> {
    match fallback {
        Some(global) if secrets.is_empty() => vec![global.clone()],
        _ => secrets,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> WebhookSecret {
        WebhookSecret::parse(s).unwrap()
    }

    #[test]
    fn the_global_secret_only_stands_in_for_an_empty_list() {
        let global = secret("whsec_global123");
        let own = secret("whsec_tenant123");
        assert_eq!(
            with_fallback(vec![own.clone()], Some(&global)),
            vec![own.clone()]
        );
        assert_eq!(with_fallback(vec![], Some(&global)), vec![global]);
        assert_eq!(with_fallback(vec![], None), vec![]);
    }
}
