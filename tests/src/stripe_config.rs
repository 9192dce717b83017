//! Stripe configurations written straight to the store, for tests of the services that read
//! them (the webhook relay's secrets, the sink's keys).

use meterline_accounts::crypto::Keyring;
use meterline_accounts::stripe_config::{
    NewConfig, StripeApiKey, StripeConfigStore, WebhookSecret,
};

use crate::api::scope;
use crate::{Namespace, Stack};

/// Stores a configuration for `tenant`/`environment` with the key `sk_test_standin`, 60-minute
/// windows and `secrets` as its webhook secrets.
pub async fn put_config(ns: &Namespace, tenant: &str, environment: &str, secrets: &[&str]) {
    put_sync_config(ns, tenant, environment, secrets, 60, None).await;
}

/// Stores a configuration with the key `sk_test_standin`, `window_minutes` and
/// `rate_limit_per_second`, straight in the store: unlike `PUT /v1/stripe/config` it schedules
/// no window size change (set sizes with [`crate::usage::window_minutes_since_epoch`]).
pub async fn put_sync_config(
    ns: &Namespace,
    tenant: &str,
    environment: &str,
    secrets: &[&str],
    window_minutes: u32,
    rate_limit_per_second: Option<u32>,
) {
    let keys = Keyring::parse(&Stack::get().encryption_keys).expect("the stack's keys parse");
    StripeConfigStore::new(ns.pg_pool().await, keys)
        .put(
            &scope(tenant, environment),
            &NewConfig {
                api_key: StripeApiKey::parse("sk_test_standin").expect("a valid key"),
                webhook_secrets: secrets
                    .iter()
                    .map(|s| WebhookSecret::parse(s).expect("a valid secret"))
                    .collect(),
                sync_enabled: true,
                aggregation_window_minutes: window_minutes,
                rate_limit_per_second,
            },
        )
        .await
        .expect("storing the stripe config");
}
