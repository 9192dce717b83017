//! Stripe-Signature verification, a pure function of the header, the raw body bytes, the
//! candidate secrets and the clock (a fuzz target: no IO, no panics, no allocation that grows
//! with anything but the header).
//!
//! Rules kept here (`shared/stripe-facts.md`, Webhooks):
//! - The header is `t=<unix>,v1=<hex>[,v1=<hex>...]`; `v0` and unknown keys are ignored, anything
//!   else that does not fit is [`SignatureError::Malformed`].
//! - The expected signature is HMAC-SHA256(secret, `"<t>.<raw body>"`) over the bytes exactly as
//!   received, before any JSON parsing: re-serialised JSON would not verify.
//! - A delivery is authentic when ANY v1 matches ANY secret: after a secret roll Stripe signs
//!   with every live secret, and a tenant may list several while it rolls.
//! - Comparison is constant time ([`Mac::verify_slice`]), so the time taken does not reveal how
//!   much of a forged signature was right.
//! - An authentic delivery whose `t` is more than the tolerance away from our clock, in either
//!   direction, is refused: a captured delivery cannot be replayed later. The signature is
//!   checked first, so "outside tolerance" only ever describes authentic deliveries (a clock
//!   problem or a replay), never forgeries.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Length of an HMAC-SHA256 output.
pub const SIGNATURE_BYTES: usize = 32;

/// Longest `t` value accepted, in digits: enough for any non-negative i64 (`i64::MAX` has 19),
/// so every header [`sign`] can write parses (the fuzz target `stripe_signature` checks it; 18
/// refused `t` >= 10^18). Longer values, and 19 digits above `i64::MAX`, are malformed.
const MAX_TIMESTAMP_DIGITS: usize = 19;

/// Why a delivery is not accepted as Stripe's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Stripe-Signature header is malformed")]
    Malformed,
    #[error("no v1 signature matches any secret of this endpoint")]
    NoMatch,
    #[error("the signed timestamp is outside the tolerance")]
    OutsideTolerance,
}

/// A parsed `Stripe-Signature` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeader {
    /// `t`, kept as the digits the sender wrote: they are what it signed.
    timestamp_text: String,
    timestamp: i64,
    v1: Vec<[u8; SIGNATURE_BYTES]>,
}

impl SignatureHeader {
    /// Parses the header's raw bytes. Every `v1` must be 64 hex digits; exactly one `t` (ASCII
    /// digits) and at least one `v1` must be present.
    pub fn parse(value: &[u8]) -> Result<Self, SignatureError> {
        let text = std::str::from_utf8(value).map_err(|_| SignatureError::Malformed)?;
        let mut timestamp: Option<(String, i64)> = None;
        let mut v1 = Vec::new();
        for item in text.split(',') {
            let (key, value) = item
                .trim()
                .split_once('=')
                .ok_or(SignatureError::Malformed)?;
            match key {
                "t" => {
                    if timestamp.is_some()
                        || value.is_empty()
                        || value.len() > MAX_TIMESTAMP_DIGITS
                        || !value.bytes().all(|b| b.is_ascii_digit())
                    {
                        return Err(SignatureError::Malformed);
                    }
                    let seconds = value.parse().map_err(|_| SignatureError::Malformed)?;
                    timestamp = Some((value.to_owned(), seconds));
                }
                "v1" => {
                    let mut signature = [0u8; SIGNATURE_BYTES];
                    hex::decode_to_slice(value, &mut signature)
                        .map_err(|_| SignatureError::Malformed)?;
                    v1.push(signature);
                }
                // `v0` is Stripe's test-mode scheme and other keys may come in later versions:
                // neither may make a delivery fail, neither may make it pass.
                _ => {}
            }
        }
        let (timestamp_text, timestamp) = timestamp.ok_or(SignatureError::Malformed)?;
        if v1.is_empty() {
            return Err(SignatureError::Malformed);
        }
        Ok(Self {
            timestamp_text,
            timestamp,
            v1,
        })
    }

    /// The signed Unix timestamp.
    pub fn timestamp(&self) -> i64 {
        self.timestamp
    }
}

/// Checks a delivery: some v1 of `header` must be the HMAC of `"<t>.<body>"` under some secret,
/// and `t` must lie within `tolerance_seconds` of `now` (Unix seconds).
pub fn verify<'a>(
    header: &SignatureHeader,
    body: &[u8],
    secrets: impl IntoIterator<Item = &'a [u8]>,
    now: i64,
    tolerance_seconds: u64,
) -> Result<(), SignatureError> {
    let matched = secrets.into_iter().any(|secret| {
        // HMAC accepts keys of any length; the error branch exists only for the trait's sake.
        let Ok(mut mac) = HmacSha256::new_from_slice(secret) else {
            return false;
        };
        mac.update(header.timestamp_text.as_bytes());
        mac.update(b".");
        mac.update(body);
        header
            .v1
            .iter()
            .any(|candidate| mac.clone().verify_slice(candidate).is_ok())
    });
    if !matched {
        return Err(SignatureError::NoMatch);
    }
    if now.abs_diff(header.timestamp) > tolerance_seconds {
        return Err(SignatureError::OutsideTolerance);
    }
    Ok(())
}

/// hex(HMAC-SHA256(secret, `"<t>.<body>"`)): what Stripe sends as a v1 value. For tests and
/// tools that sign deliveries.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    let mut mac = match HmacSha256::new_from_slice(secret) {
        Ok(mac) => mac,
        // Unreachable for HMAC (any key length is valid); an empty signature never verifies.
        Err(_) => return String::new(),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_764_190_000;
    const TOLERANCE: u64 = 300;
    const BODY: &[u8] = br#"{"id":"evt_1","type":"customer.created"}"#;
    const SECRET: &[u8] = b"whsec_secret1234";
    const OTHER: &[u8] = b"whsec_other12345";

    fn check(header: &str, body: &[u8], secrets: &[&[u8]]) -> Result<(), SignatureError> {
        let parsed = SignatureHeader::parse(header.as_bytes())?;
        verify(&parsed, body, secrets.iter().copied(), NOW, TOLERANCE)
    }

    fn header(t: i64, secrets: &[&[u8]], body: &[u8]) -> String {
        let mut h = format!("t={t}");
        for s in secrets {
            h.push_str(&format!(",v1={}", sign(s, t, body)));
        }
        h
    }

    #[test]
    fn sign_is_hmac_sha256_of_t_dot_body() {
        // RFC 4231 test case 2 pins the primitive, then the "<t>.<body>" framing.
        let mut mac = HmacSha256::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let mut mac = HmacSha256::new_from_slice(SECRET).unwrap();
        mac.update(format!("{NOW}.").as_bytes());
        mac.update(BODY);
        assert_eq!(
            sign(SECRET, NOW, BODY),
            hex::encode(mac.finalize().into_bytes())
        );
    }

    #[test]
    fn a_valid_signature_is_accepted() {
        assert_eq!(
            check(&header(NOW, &[SECRET], BODY), BODY, &[SECRET]),
            Ok(())
        );
    }

    #[test]
    fn any_v1_matching_any_secret_is_accepted() {
        // Stripe after a roll: one v1 per live secret, in any order.
        let two = header(NOW, &[OTHER, SECRET], BODY);
        assert_eq!(check(&two, BODY, &[SECRET]), Ok(()));
        // A tenant listing several secrets while it rolls.
        let one = header(NOW, &[SECRET], BODY);
        assert_eq!(check(&one, BODY, &[OTHER, SECRET]), Ok(()));
    }

    #[test]
    fn wrong_secret_tampered_body_and_no_secrets_are_refused() {
        let h = header(NOW, &[SECRET], BODY);
        assert_eq!(check(&h, BODY, &[OTHER]), Err(SignatureError::NoMatch));
        assert_eq!(
            check(
                &h,
                br#"{"id":"evt_1","type":"customer.deleted"}"#,
                &[SECRET]
            ),
            Err(SignatureError::NoMatch)
        );
        assert_eq!(check(&h, BODY, &[]), Err(SignatureError::NoMatch));
        // A signature of the right secret over another timestamp.
        let moved = format!("t={},v1={}", NOW + 1, sign(SECRET, NOW, BODY));
        assert_eq!(check(&moved, BODY, &[SECRET]), Err(SignatureError::NoMatch));
    }

    #[test]
    fn tolerance_applies_in_both_directions_inclusive() {
        for t in [NOW - 300, NOW + 300] {
            assert_eq!(check(&header(t, &[SECRET], BODY), BODY, &[SECRET]), Ok(()));
        }
        for t in [NOW - 301, NOW + 301, 0, i64::MAX / 10] {
            assert_eq!(
                check(&header(t, &[SECRET], BODY), BODY, &[SECRET]),
                Err(SignatureError::OutsideTolerance),
                "{t}"
            );
        }
    }

    #[test]
    fn forgeries_are_no_match_even_when_stale() {
        let h = header(NOW - 10_000, &[OTHER], BODY);
        assert_eq!(check(&h, BODY, &[SECRET]), Err(SignatureError::NoMatch));
    }

    #[test]
    fn v0_and_unknown_keys_are_ignored() {
        let sig = sign(SECRET, NOW, BODY);
        let zeros = "0".repeat(64);
        for h in [
            format!("t={NOW},v0={zeros},v1={sig}"),
            format!("v1={sig},t={NOW},foo=bar"),
            format!("t={NOW}, v1={sig} ,v2=whatever"),
        ] {
            assert_eq!(check(&h, BODY, &[SECRET]), Ok(()), "{h}");
        }
        // A v0 alone (even a "correct" one) is not a signature we accept.
        assert_eq!(
            check(&format!("t={NOW},v0={sig}"), BODY, &[SECRET]),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn the_signed_timestamp_text_is_used_as_written() {
        // Leading zeros: the sender signed the digits it wrote.
        let text = format!("0{NOW}");
        let mut mac = HmacSha256::new_from_slice(SECRET).unwrap();
        mac.update(format!("{text}.").as_bytes());
        mac.update(BODY);
        let sig = hex::encode(mac.finalize().into_bytes());
        assert_eq!(
            check(&format!("t={text},v1={sig}"), BODY, &[SECRET]),
            Ok(())
        );
    }

    #[test]
    fn malformed_headers() {
        let sig = sign(SECRET, NOW, BODY);
        let cases = [
            String::new(),
            "garbage".into(),
            "t=,v1=".into(),
            format!("v1={sig}"),
            format!("t={NOW}"),
            format!("t=abc,v1={sig}"),
            format!("t=-5,v1={sig}"),
            format!("t=+5,v1={sig}"),
            format!("t={NOW},t={NOW},v1={sig}"),
            format!("t=1{},v1={sig}", "0".repeat(20)),
            format!("t={}0,v1={sig}", i64::MAX),
            format!("t=9223372036854775808,v1={sig}"),
            format!("t={NOW},v1=zz{}", &sig[2..]),
            format!("t={NOW},v1={}", &sig[..62]),
            format!("t={NOW},v1={sig}00"),
            format!("t={NOW},,v1={sig}"),
            format!("t={NOW},v1={sig},"),
            format!("t={NOW};v1={sig}"),
        ];
        for h in &cases {
            assert_eq!(
                SignatureHeader::parse(h.as_bytes()),
                Err(SignatureError::Malformed),
                "{h:?}"
            );
        }
        assert_eq!(
            SignatureHeader::parse(b"t=1,v1=\xff"),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn every_non_negative_i64_timestamp_parses() {
        // The largest `t` that `sign` can write must parse: an authentic delivery from any
        // clock is judged by the tolerance, not refused as malformed.
        for t in [
            0,
            999_999_999_999_999_999,
            1_000_000_000_000_000_000,
            i64::MAX,
        ] {
            let h = header(t, &[SECRET], BODY);
            let parsed = SignatureHeader::parse(h.as_bytes()).expect(&h);
            assert_eq!(parsed.timestamp(), t);
            assert_eq!(verify(&parsed, BODY, [SECRET], t, 0), Ok(()));
        }
    }

    #[test]
    fn uppercase_hex_is_accepted() {
        let sig = sign(SECRET, NOW, BODY).to_uppercase();
        assert_eq!(check(&format!("t={NOW},v1={sig}"), BODY, &[SECRET]), Ok(()));
    }

    #[test]
    fn arbitrary_input_never_panics() {
        // A cheap stand-in for the fuzz target: every prefix of a tricky header.
        let h = format!("t={NOW},v1={},v0=x,=,t", sign(SECRET, NOW, BODY));
        for end in 0..=h.len() {
            if let Ok(parsed) = SignatureHeader::parse(&h.as_bytes()[..end]) {
                let _ = verify(&parsed, BODY, [SECRET], i64::MIN, u64::MAX);
                let _ = verify(&parsed, BODY, [SECRET], i64::MAX, 0);
            }
        }
    }
}
