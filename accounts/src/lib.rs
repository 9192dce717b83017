//! Each tenant environment's Stripe account in meterline.
//!
//! Layout:
//! - [`stripe_config`]: the Stripe API key, webhook secrets and sync settings, stored
//!   encrypted; the only place a tenant's API key is decrypted.
//! - [`crypto`]: AES-256-GCM for secrets at rest, with key ids for rotation; never a fall back
//!   to plain text.
//! - [`audit`]: the audit trail of Stripe configuration, mapping and key changes and of API
//!   key decryptions; rows built from typed changes that cannot hold a secret.
//!
//! Rule kept everywhere: a secret is held in types that neither print nor serialize it, so it
//! cannot reach a log line, an error, a metric or an API answer.

pub mod audit;
pub mod crypto;
pub mod stripe_config;
