//! Target `usage_raw`: any bytes given to `RawUsageEvent::from_json_bytes` (the aggregator reads
//! every `usage.raw` message through it, and producers may write that topic directly).
//!
//! Properties:
//! - no panic, whatever the bytes;
//! - a refusal is a short error free of control characters (the rule of `schemas::error`: it is
//!   copied verbatim into the `dlq.error` header and into logs);
//! - an accepted event re-encodes to bytes that decode to the very same event, and encoding that
//!   again gives the same bytes: ingest's write and the aggregator's read agree.

use meterline_schemas::RawUsageEvent;

/// Bound on an error's text: `short_reason` caps serde's part at 300 characters plus an
/// ellipsis; the prefixes ("malformed json: ", "invalid customer_id: ") are short.
pub const MAX_ERROR_CHARS: usize = 400;

pub fn check(data: &[u8]) {
    match RawUsageEvent::from_json_bytes(data) {
        Ok(event) => {
            let bytes = event.to_json_bytes();
            let again = RawUsageEvent::from_json_bytes(&bytes).unwrap_or_else(|err| {
                panic!(
                    "re-encoded event does not decode ({err}): {}",
                    String::from_utf8_lossy(&bytes)
                )
            });
            assert_eq!(
                again,
                event,
                "decode(encode(event)) differs: {}",
                String::from_utf8_lossy(&bytes)
            );
            assert_eq!(
                again.to_json_bytes(),
                bytes,
                "encoding is not a fixed point"
            );
            // The partition key is built from validated ids; it must not panic either.
            let _ = event.kafka_key();
        }
        Err(err) => {
            let text = err.to_string();
            assert!(
                text.chars().count() <= MAX_ERROR_CHARS,
                "error longer than {MAX_ERROR_CHARS} characters: {text}"
            );
            assert!(
                !text.chars().any(char::is_control),
                "error with a control character: {text:?}"
            );
            let _ = err.dlq_error_kind();
        }
    }
}
