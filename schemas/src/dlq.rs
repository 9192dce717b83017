//! The dead-letter convention shared by the four `<topic>.dlq` twins: [`DlqHeaders`] and
//! [`DlqErrorKind`].
//!
//! Rule kept here: a DLQ message's value is the ORIGINAL bytes, unchanged (it may not even be
//! JSON), and its key is the original key; why it failed travels only in `dlq.*` headers, so an
//! operator can fix the cause and replay the value as is. Other headers may be present and are
//! ignored when reading.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use schemars::json_schema;
use serde::ser::SerializeMap;
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{short_reason, SchemaError};
use crate::json_schema::fixed_schema;
use crate::timestamp::{Timestamp, TIMESTAMP_PATTERN};

/// Header carrying the human-readable reason.
pub const HEADER_ERROR: &str = "dlq.error";
/// Header carrying the [`DlqErrorKind`].
pub const HEADER_ERROR_KIND: &str = "dlq.error_kind";
/// Header carrying the topic the message was consumed from (with its prefix).
pub const HEADER_SOURCE_TOPIC: &str = "dlq.source_topic";
/// Header carrying the partition the message was consumed from.
pub const HEADER_SOURCE_PARTITION: &str = "dlq.source_partition";
/// Header carrying the offset the message was consumed at.
pub const HEADER_SOURCE_OFFSET: &str = "dlq.source_offset";
/// Header carrying the name of the service (binary) that gave up on the message.
pub const HEADER_SERVICE: &str = "dlq.service";
/// Header carrying when it gave up, RFC 3339.
pub const HEADER_FAILED_AT: &str = "dlq.failed_at";

/// Every `dlq.*` header, in the order [`DlqHeaders::to_headers`] writes them.
pub const HEADER_NAMES: [&str; 7] = [
    HEADER_ERROR,
    HEADER_ERROR_KIND,
    HEADER_SOURCE_TOPIC,
    HEADER_SOURCE_PARTITION,
    HEADER_SOURCE_OFFSET,
    HEADER_SERVICE,
    HEADER_FAILED_AT,
];

const KIND_PATTERN: &str = "^[a-z][a-z0-9_]{0,63}$";
const COUNT_PATTERN: &str = "^(0|[1-9][0-9]*)$";

/// A bounded label saying what class of failure sent a message to a DLQ (and a metric label).
/// Lowercase snake case, 1..=64 characters: `^[a-z][a-z0-9_]{0,63}$`. The common kinds are
/// constants; services add their own (e.g. `unknown_meter`) with [`DlqErrorKind::parse`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DlqErrorKind(Cow<'static, str>);

impl DlqErrorKind {
    /// The value is not JSON at all.
    pub const PARSE: Self = Self(Cow::Borrowed("parse"));
    /// JSON, but not a valid message (missing/unknown field, wrong type, broken rule).
    pub const VALIDATION: Self = Self(Cow::Borrowed("validation"));
    /// A `schema_version` this build does not read.
    pub const UNSUPPORTED_VERSION: Self = Self(Cow::Borrowed("unsupported_version"));

    /// Validates a kind label.
    pub fn parse(value: &str) -> Result<Self, SchemaError> {
        let mut chars = value.chars();
        let valid = chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && value.len() <= 64;
        if !valid {
            return Err(SchemaError::invalid(
                "error_kind",
                "must be lowercase snake case, 1 to 64 characters",
            ));
        }
        Ok(Self(Cow::Owned(value.to_owned())))
    }

    /// The label.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DlqErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a message went to a DLQ twin, as the `dlq.*` Kafka headers carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DlqHeaders {
    /// Human-readable reason, e.g. a [`SchemaError`]'s text. Written with control characters
    /// escaped and cut to a few hundred characters.
    pub error: String,
    /// Class of failure.
    pub error_kind: DlqErrorKind,
    /// Topic the message was consumed from, prefix included.
    pub source_topic: String,
    /// Partition it was consumed from.
    pub source_partition: i32,
    /// Offset it was consumed at.
    pub source_offset: i64,
    /// Service (binary name) that gave up on it.
    pub service: String,
    /// When it gave up.
    pub failed_at: Timestamp,
}

impl DlqHeaders {
    /// The headers to attach to the DLQ message, in [`HEADER_NAMES`] order; values are UTF-8.
    pub fn to_headers(&self) -> Vec<(&'static str, String)> {
        vec![
            // Same sanitiser as `SchemaError` texts: whatever a service put in `error`, the header
            // stays single-line and bounded.
            (HEADER_ERROR, short_reason(&self.error)),
            (HEADER_ERROR_KIND, self.error_kind.as_str().to_owned()),
            (HEADER_SOURCE_TOPIC, self.source_topic.clone()),
            (HEADER_SOURCE_PARTITION, self.source_partition.to_string()),
            (HEADER_SOURCE_OFFSET, self.source_offset.to_string()),
            (HEADER_SERVICE, self.service.clone()),
            (HEADER_FAILED_AT, self.failed_at.to_string()),
        ]
    }

    /// Reads the `dlq.*` headers from a message's header list (name, value bytes). Other
    /// headers are ignored; when a name repeats, the last one wins, as Kafka clients' "last
    /// header" lookups do.
    pub fn from_headers<I, K, V>(headers: I) -> Result<Self, SchemaError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<[u8]>,
    {
        let mut found: [Option<String>; HEADER_NAMES.len()] = Default::default();
        for (name, value) in headers {
            let Some(index) = HEADER_NAMES.iter().position(|h| *h == name.as_ref()) else {
                continue;
            };
            let text = std::str::from_utf8(value.as_ref())
                .map_err(|_| SchemaError::invalid(HEADER_NAMES[index], "must be UTF-8"))?;
            found[index] = Some(text.to_owned());
        }
        let mut take = |index: usize| {
            found[index]
                .take()
                .ok_or(SchemaError::MissingHeader(HEADER_NAMES[index]))
        };
        let error = non_empty(HEADER_ERROR, take(0)?)?;
        let error_kind = DlqErrorKind::parse(&take(1)?)?;
        let source_topic = non_empty(HEADER_SOURCE_TOPIC, take(2)?)?;
        let source_partition = parse_count(HEADER_SOURCE_PARTITION, &take(3)?)?;
        let source_offset = parse_count(HEADER_SOURCE_OFFSET, &take(4)?)?;
        let service = non_empty(HEADER_SERVICE, take(5)?)?;
        let failed_at = Timestamp::parse(&take(6)?)?;
        Ok(Self {
            error,
            error_kind,
            source_topic,
            source_partition,
            source_offset,
            service,
            failed_at,
        })
    }
}

fn non_empty(header: &'static str, text: String) -> Result<String, SchemaError> {
    if text.is_empty() {
        return Err(SchemaError::invalid(header, "must not be empty"));
    }
    Ok(text)
}

/// A non-negative decimal integer without sign or leading zeros (the schema's pattern).
fn parse_count<T: std::str::FromStr>(header: &'static str, text: &str) -> Result<T, SchemaError> {
    let canonical = text == "0"
        || (!text.is_empty() && !text.starts_with('0') && text.bytes().all(|b| b.is_ascii_digit()));
    let reason = "must be a non-negative decimal integer";
    if !canonical {
        return Err(SchemaError::invalid(header, reason));
    }
    text.parse()
        .map_err(|_| SchemaError::invalid(header, reason))
}

/// Serialises as the header map (`{"dlq.error": "...", ...}`), the shape the JSON Schema describes.
impl Serialize for DlqHeaders {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let headers = self.to_headers();
        let mut map = serializer.serialize_map(Some(headers.len()))?;
        for (name, value) in &headers {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for DlqHeaders {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = BTreeMap::<String, String>::deserialize(deserializer)?;
        Self::from_headers(map).map_err(de::Error::custom)
    }
}

fixed_schema!(
    DlqHeaders,
    json_schema!({
            "title": "DLQ headers (version 1)",
            "description": "Kafka headers on every message of a DLQ twin (usage.raw.dlq, usage.windows.dlq, usage.resync.dlq, stripe.webhooks.dlq), shown as a JSON object of header name to value. The DLQ message's value is the original message bytes, unchanged, and its key is the original key; these headers say why it was rejected. Header values are UTF-8 strings. Other headers may be present.",
            "type": "object",
            "properties": {
                HEADER_ERROR: {
                    "description": "Human-readable reason, at most a few hundred characters, no control characters.",
                    "type": "string",
                    "minLength": 1,
                },
                HEADER_ERROR_KIND: {
                    "description": "Class of failure, lowercase snake case: parse (not JSON), validation (JSON but not a valid message), unsupported_version, or a service-specific kind such as unknown_meter.",
                    "type": "string",
                    "pattern": KIND_PATTERN,
                    "examples": ["parse", "validation", "unsupported_version", "unknown_meter"],
                },
                HEADER_SOURCE_TOPIC: {
                    "description": "Topic the message was consumed from, TOPIC_PREFIX included.",
                    "type": "string",
                    "minLength": 1,
                },
                HEADER_SOURCE_PARTITION: {
                    "description": "Partition the message was consumed from, as a decimal string (0 to 2147483647).",
                    "type": "string",
                    "pattern": COUNT_PATTERN,
                },
                HEADER_SOURCE_OFFSET: {
                    "description": "Offset the message was consumed at, as a decimal string (0 to 9223372036854775807).",
                    "type": "string",
                    "pattern": COUNT_PATTERN,
                },
                HEADER_SERVICE: {
                    "description": "Service (binary name) that rejected the message, e.g. aggregator.",
                    "type": "string",
                    "minLength": 1,
                },
                HEADER_FAILED_AT: {
                    "description": "When the message was rejected: RFC 3339 date-time, written in UTC with Z.",
                    "type": "string",
                    "format": "date-time",
                    "pattern": TIMESTAMP_PATTERN,
                },
            },
            "required": HEADER_NAMES,
            "additionalProperties": { "type": "string" },
    })
);

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DlqHeaders {
        DlqHeaders {
            error: "missing field `customer_id` at line 1 column 120".to_owned(),
            error_kind: DlqErrorKind::VALIDATION,
            source_topic: "usage.raw".to_owned(),
            source_partition: 3,
            source_offset: 1_234_567,
            service: "aggregator".to_owned(),
            failed_at: Timestamp::parse("2024-05-01T12:00:02.5Z").expect("valid"),
        }
    }

    #[test]
    fn header_roundtrip() {
        let headers = sample().to_headers();
        assert_eq!(
            headers.iter().map(|(name, _)| *name).collect::<Vec<_>>(),
            HEADER_NAMES.to_vec()
        );
        assert_eq!(headers[3], ("dlq.source_partition", "3".to_owned()));
        assert_eq!(DlqHeaders::from_headers(headers).expect("parse"), sample());
    }

    #[test]
    fn other_headers_are_ignored_and_last_one_wins() {
        let mut headers: Vec<(String, Vec<u8>)> = sample()
            .to_headers()
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value.into_bytes()))
            .collect();
        headers.push(("traceparent".to_owned(), vec![0xff, 0x00]));
        headers.push(("dlq.service".to_owned(), b"ingest".to_vec()));
        let parsed = DlqHeaders::from_headers(headers).expect("parse");
        assert_eq!(parsed.service, "ingest");
    }

    #[test]
    fn bad_headers_are_named() {
        let mut headers = sample().to_headers();
        headers.retain(|(name, _)| *name != HEADER_SOURCE_OFFSET);
        assert_eq!(
            DlqHeaders::from_headers(headers)
                .expect_err("missing")
                .to_string(),
            "missing header dlq.source_offset"
        );
        for (name, value) in [
            (HEADER_SOURCE_PARTITION, "-1"),
            (HEADER_SOURCE_PARTITION, "01"),
            (HEADER_SOURCE_PARTITION, "99999999999"),
            (HEADER_SOURCE_OFFSET, "x"),
            (HEADER_ERROR_KIND, "Parse"),
            (HEADER_FAILED_AT, "now"),
        ] {
            let mut headers = sample().to_headers();
            headers.push((name, value.to_owned()));
            assert!(DlqHeaders::from_headers(headers).is_err(), "{name}={value}");
        }
        let mut headers: Vec<(&str, Vec<u8>)> = sample()
            .to_headers()
            .into_iter()
            .map(|(name, value)| (name, value.into_bytes()))
            .collect();
        headers.push((HEADER_ERROR, vec![0xff]));
        assert_eq!(
            DlqHeaders::from_headers(headers)
                .expect_err("utf-8")
                .to_string(),
            "invalid dlq.error: must be UTF-8"
        );
    }

    #[test]
    fn error_header_is_single_line_and_bounded() {
        let mut headers = sample();
        headers.error = format!("first line\nsecond {}", "x".repeat(1000));
        let (_, error) = headers.to_headers().remove(0);
        assert!(error.starts_with("first line\\nsecond x"), "{error}");
        assert!(!error.chars().any(char::is_control));
        assert!(error.chars().count() <= 301);
    }

    #[test]
    fn error_kinds() {
        assert_eq!(
            DlqErrorKind::parse("unknown_meter")
                .expect("valid")
                .as_str(),
            "unknown_meter"
        );
        for bad in ["", "Parse", "1kind", "bad-kind", &"k".repeat(65)] {
            assert!(DlqErrorKind::parse(bad).is_err(), "{bad:?}");
        }
        for kind in [
            DlqErrorKind::PARSE,
            DlqErrorKind::VALIDATION,
            DlqErrorKind::UNSUPPORTED_VERSION,
        ] {
            assert_eq!(DlqErrorKind::parse(kind.as_str()).expect("valid"), kind);
        }
    }

    #[test]
    fn serde_is_the_header_map() {
        let json = serde_json::to_value(sample()).expect("json");
        assert_eq!(json["dlq.source_offset"], "1234567");
        assert_eq!(
            serde_json::from_value::<DlqHeaders>(json).expect("parse"),
            sample()
        );
    }
}
