//! The crate's one error type, [`SchemaError`]: every way a value, a message or a DLQ header set
//! can fail to parse.
//!
//! Rule kept here: every message is short, lowercase, free of control characters and bounded in
//! length, because services copy it verbatim into the `dlq.error` header and into logs.

use crate::dlq::DlqErrorKind;

/// Longest reason (in characters) an error carries; serde's messages can echo producer input
/// (an unknown field name, a rejected string), and a DLQ header must stay small.
pub(crate) const MAX_REASON_CHARS: usize = 300;

/// Why a value or a message was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// One value broke its rule (an identifier's format, a timestamp, a window, a header value).
    #[error("invalid {field}: {reason}")]
    InvalidValue {
        /// The field or concept the value was meant for, e.g. `meter_id`.
        field: &'static str,
        /// What the rule is, phrased for the producer.
        reason: String,
    },
    /// The bytes are not JSON at all (syntax error, truncated input, number out of range).
    #[error("malformed json: {0}")]
    MalformedJson(String),
    /// Well-formed JSON that is not a valid message: a missing, unknown or duplicated field, a
    /// wrong type, or a value that broke its rule. Carries serde's reason with its position.
    #[error("{0}")]
    InvalidMessage(String),
    /// The message declares a `schema_version` this build does not read.
    #[error("unsupported schema_version {found}, expected {expected}")]
    UnsupportedVersion {
        /// The declared version as it appeared in the message (JSON text, shortened).
        found: String,
        /// The only version this build reads.
        expected: u32,
    },
    /// A required DLQ header is absent.
    #[error("missing header {0}")]
    MissingHeader(&'static str),
}

impl SchemaError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidValue {
            field,
            reason: reason.into(),
        }
    }

    /// The `dlq.error_kind` a service should send a message to its DLQ twin with when this error
    /// rejected it: `parse` for bytes that are not JSON, `unsupported_version` for a
    /// `schema_version` this build does not read, `validation` for everything else.
    pub fn dlq_error_kind(&self) -> DlqErrorKind {
        match self {
            Self::MalformedJson(_) => DlqErrorKind::PARSE,
            Self::UnsupportedVersion { .. } => DlqErrorKind::UNSUPPORTED_VERSION,
            Self::InvalidValue { .. } | Self::InvalidMessage(_) | Self::MissingHeader(_) => {
                DlqErrorKind::VALIDATION
            }
        }
    }
}

/// Makes arbitrary text (usually serde's message, which may echo producer input) safe for a header
/// and a log line: control characters escaped, length capped at [`MAX_REASON_CHARS`].
pub(crate) fn short_reason(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_REASON_CHARS + 4));
    // Counts what is written, escapes included, so the cap holds for the output.
    let mut written = 0;
    for c in text.chars() {
        let piece: String = if c.is_control() {
            c.escape_default().collect()
        } else {
            c.to_string()
        };
        let width = piece.chars().count();
        if written + width > MAX_REASON_CHARS {
            out.push('…');
            break;
        }
        out.push_str(&piece);
        written += width;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_reason_escapes_control_characters() {
        assert_eq!(short_reason("bad\u{7}value\n"), "bad\\u{7}value\\n");
    }

    #[test]
    fn short_reason_caps_length() {
        let long = "x".repeat(1000);
        let short = short_reason(&long);
        assert_eq!(short.chars().count(), MAX_REASON_CHARS + 1);
        assert!(short.ends_with('…'));
    }

    #[test]
    fn display_is_lowercase_and_names_the_field() {
        let err = SchemaError::invalid("meter_id", "must not be empty");
        assert_eq!(err.to_string(), "invalid meter_id: must not be empty");
        assert_eq!(err.dlq_error_kind().as_str(), "validation");
    }
}
