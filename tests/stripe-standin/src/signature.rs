//! Webhook signing exactly as Stripe signs: `Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>]`
//! where each v1 is `hex(HMAC-SHA256(endpoint secret, "<t>.<raw body>"))`. After a secret roll
//! one v1 is sent per live secret, so receivers that check only one value break visibly.

use hmac::digest::InvalidLength;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// `hex(HMAC-SHA256(secret, "<t>.<body>"))`. HMAC takes keys of any length, so the error
/// (the `hmac` crate's generic key-length check) does not happen for HMAC-SHA256.
pub fn sign(secret: &str, t: i64, body: &[u8]) -> Result<String, InvalidLength> {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes())?;
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(hex::encode(mac.finalize().into_bytes()))
}

/// The full header value, one v1 entry per secret in the order given.
pub fn header(t: i64, secrets: &[&str], body: &[u8]) -> Result<String, InvalidLength> {
    let mut value = format!("t={t}");
    for secret in secrets {
        value.push_str(",v1=");
        value.push_str(&sign(secret, t, body)?);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_known_hmac_sha256_vector() {
        // RFC 4231 test case 2 pins the primitive; then `sign` must equal the HMAC of "<t>.<body>".
        let mut mac = HmacSha256::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let mut mac = HmacSha256::new_from_slice(b"whsec_x").unwrap();
        mac.update(b"42.{\"a\":1}");
        assert_eq!(
            sign("whsec_x", 42, b"{\"a\":1}").unwrap(),
            hex::encode(mac.finalize().into_bytes())
        );
    }

    #[test]
    fn header_carries_one_v1_per_secret() {
        let h = header(7, &["a", "b"], b"{}").unwrap();
        let parts: Vec<_> = h.split(',').collect();
        assert_eq!(parts[0], "t=7");
        assert_eq!(parts[1], format!("v1={}", sign("a", 7, b"{}").unwrap()));
        assert_eq!(parts[2], format!("v1={}", sign("b", 7, b"{}").unwrap()));
    }
}
