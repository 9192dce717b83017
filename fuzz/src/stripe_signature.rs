//! Target `stripe_signature`: `Stripe-Signature` parsing and verification (webhook-relay).
//!
//! The input is used twice:
//! - as a header, verbatim: parsing never panics, nor does verification at any clock;
//! - as `(t, secret, body)`: 8 bytes of `t` (made non-negative, as Stripe's are), one byte
//!   choosing the secret's length, the secret, then the body. A header made by `sign` parses
//!   and verifies (also listed after a foreign v1, and with the secret among others), within
//!   the tolerance exactly; a changed body, secret, signature digit or `t` does not verify.

use webhook_relay::signature::{sign, verify, SignatureError, SignatureHeader};

const TOLERANCE: u64 = 300;

pub fn check(data: &[u8]) {
    if let Ok(header) = SignatureHeader::parse(data) {
        let t = header.timestamp();
        for (now, tolerance) in [(i64::MIN, 0), (i64::MAX, 0), (t, u64::MAX), (0, TOLERANCE)] {
            let _ = verify(&header, b"{}", [&b"whsec_fuzz"[..]], now, tolerance);
        }
    }

    let Some((t_bytes, rest)) = data.split_first_chunk::<8>() else {
        return;
    };
    let t = i64::from_le_bytes(*t_bytes) & i64::MAX;
    let Some((&secret_len, rest)) = rest.split_first() else {
        return;
    };
    let (secret, body) = rest.split_at(usize::from(secret_len).min(rest.len()));
    let signature = sign(secret, t, body);
    let text = format!("t={t},v1={signature}");
    let header = SignatureHeader::parse(text.as_bytes())
        .unwrap_or_else(|err| panic!("a header sign() made does not parse ({err}): {text}"));
    assert_eq!(header.timestamp(), t);
    let verify_with =
        |header: &SignatureHeader, body: &[u8], secrets: &[&[u8]], now: i64, tol: u64| {
            verify(header, body, secrets.iter().copied(), now, tol)
        };
    assert_eq!(verify_with(&header, body, &[secret], t, 0), Ok(()));

    // The tolerance, both ways, inclusive.
    for (now, expected) in [
        (t.checked_add(300), Ok(())),
        (t.checked_sub(300), Ok(())),
        (t.checked_add(301), Err(SignatureError::OutsideTolerance)),
        (t.checked_sub(301), Err(SignatureError::OutsideTolerance)),
    ] {
        if let Some(now) = now {
            assert_eq!(
                verify_with(&header, body, &[secret], now, TOLERANCE),
                expected
            );
        }
    }

    let other_secret = changed(secret);
    assert_eq!(
        verify_with(&header, body, &[&other_secret], t, 0),
        Err(SignatureError::NoMatch)
    );
    assert_eq!(
        verify_with(&header, body, &[&other_secret, secret], t, 0),
        Ok(())
    );
    assert_eq!(
        verify_with(&header, body, &[], t, 0),
        Err(SignatureError::NoMatch)
    );

    // Stripe after a secret roll: one v1 per live secret.
    let rolled = format!("t={t},v1={},v1={signature}", sign(&other_secret, t, body));
    let rolled = SignatureHeader::parse(rolled.as_bytes()).expect("two v1 parse");
    assert_eq!(verify_with(&rolled, body, &[secret], t, 0), Ok(()));

    let tampered_body = changed(body);
    assert_eq!(
        verify_with(&header, &tampered_body, &[secret], t, 0),
        Err(SignatureError::NoMatch)
    );

    // One hex digit changed (still hex, so still well formed).
    let mut digits = signature.into_bytes();
    digits[0] = if digits[0] == b'0' { b'1' } else { b'0' };
    let forged = format!("t={t},v1={}", String::from_utf8(digits).expect("hex"));
    let forged = SignatureHeader::parse(forged.as_bytes()).expect("forged header parses");
    assert_eq!(
        verify_with(&forged, body, &[secret], t, 0),
        Err(SignatureError::NoMatch)
    );

    // The same signature claimed for another second.
    if let Some(moved_t) = t.checked_add(1) {
        let moved = format!("t={moved_t},v1={}", sign(secret, t, body));
        let moved = SignatureHeader::parse(moved.as_bytes())
            .unwrap_or_else(|err| panic!("t={moved_t} does not parse ({err})"));
        assert_eq!(
            verify_with(&moved, body, &[secret], moved_t, 0),
            Err(SignatureError::NoMatch)
        );
    }
}

/// `bytes` with its first byte changed, or `x` for no bytes. HMAC pads short keys with zero
/// bytes, so "changed" means a different byte, not an appended zero.
fn changed(bytes: &[u8]) -> Vec<u8> {
    match bytes.split_first() {
        Some((first, tail)) => std::iter::once(first ^ 1)
            .chain(tail.iter().copied())
            .collect(),
        None => b"x".to_vec(),
    }
}
