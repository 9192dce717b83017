//! The identifier of a meter event, which is also its `Idempotency-Key`.
//!
//! Rules kept here:
//! - Deterministic: the same window and send number always give the same identifier, so a
//!   send repeated after a crash or a lost answer is recognised by Stripe as already recorded
//!   (within Stripe's 24 h uniqueness period; beyond it the ledger, not the identifier, stops
//!   a resend).
//! - Distinct: two different windows, tenants, environments, customers, meters or sends never
//!   share one. Each part is length-prefixed before hashing, so no two different tuples hash
//!   the same input ("ab" + "c" is not "a" + "bc").
//! - Short: 3 + 48 characters, within Stripe's
//!   [`meterline_schemas::stripe_limits::MAX_IDENTIFIER_CHARS`].

use meterline_schemas::{CustomerId, EnvironmentId, MeterId, TenantId, Window};
use sha2::{Digest, Sha256};

/// The identifier (and Idempotency-Key) of the `seq`-th meter event of a window: the same
/// inputs always give the same identifier, so a retry after a crash is recognised by Stripe,
/// and different windows or sends never share one (see the module rules).
pub fn identifier(
    tenant: &TenantId,
    environment: &EnvironmentId,
    customer: &CustomerId,
    meter: &MeterId,
    window: &Window,
    seq: u32,
) -> String {
    let mut hash = Sha256::new();
    // Each part is length-prefixed: no two different tuples hash the same input.
    for part in [
        tenant.as_str(),
        environment.as_str(),
        customer.as_str(),
        meter.as_str(),
    ] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    hash.update(window.start().unix_timestamp().to_be_bytes());
    hash.update(window.end().unix_timestamp().to_be_bytes());
    hash.update(seq.to_be_bytes());
    format!("ml_{}", &hex::encode(hash.finalize())[..48])
}

#[cfg(test)]
mod tests {
    use super::*;
    use meterline_schemas::stripe_limits::MAX_IDENTIFIER_CHARS;
    use time::macros::datetime;

    #[test]
    fn identifiers_are_deterministic_and_distinct() {
        let t = TenantId::parse("t").unwrap();
        let e = EnvironmentId::parse("e").unwrap();
        let c = CustomerId::parse("c").unwrap();
        let m = MeterId::parse("m").unwrap();
        let w = Window::containing(datetime!(2026-11-26 10:30 UTC), 60).unwrap();
        let w2 = Window::containing(datetime!(2026-11-26 11:30 UTC), 60).unwrap();
        let a = identifier(&t, &e, &c, &m, &w, 1);
        assert_eq!(a, identifier(&t, &e, &c, &m, &w, 1));
        assert!(a.len() <= MAX_IDENTIFIER_CHARS && a.starts_with("ml_"));
        assert_ne!(a, identifier(&t, &e, &c, &m, &w, 2));
        assert_ne!(a, identifier(&t, &e, &c, &m, &w2, 1));
        // "ab" + "c" and "a" + "bc" must not collide.
        let ab = TenantId::parse("ab").unwrap();
        let env_c = EnvironmentId::parse("c").unwrap();
        let a2 = TenantId::parse("a").unwrap();
        let env_bc = EnvironmentId::parse("bc").unwrap();
        assert_ne!(
            identifier(&ab, &env_c, &c, &m, &w, 1),
            identifier(&a2, &env_bc, &c, &m, &w, 1)
        );
    }
}
