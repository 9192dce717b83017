//! The JSON encoding shared by every message type: the `schema_version` marker, the one decode
//! path (with error classification), the one encode path, the [`WireForm`] glue that gives each
//! topic's message type its codec ([`message_codec!`]), and the decimal-string codec.
//!
//! Rule kept here: decoding never panics and always ends in a short [`SchemaError`]; a message
//! whose `schema_version` is not 1 is reported as such, whatever else is wrong with it. A message
//! type says only how it maps to its wire struct; reading, writing, keying and the schema come
//! from here, the same for every topic.

use std::fmt;

use rust_decimal::Decimal;
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::de::{self, DeserializeOwned, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::error::Category;

use crate::error::{short_reason, SchemaError};
use crate::json_schema::fixed_schema;

/// The only `schema_version` this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// The `schema_version` field of a v1 message: writes `1`, accepts only `1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct SchemaVersion1;

impl Serialize for SchemaVersion1 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u32(SCHEMA_VERSION)
    }
}

impl<'de> Deserialize<'de> for SchemaVersion1 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct VersionVisitor;

        impl Visitor<'_> for VersionVisitor {
            type Value = SchemaVersion1;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "schema_version {SCHEMA_VERSION}")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<SchemaVersion1, E> {
                version_one(v == u64::from(SCHEMA_VERSION), v)
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<SchemaVersion1, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => version_one(false, v),
                }
            }

            // JSON Schema's `const: 1` also matches `1.0`; accepting it keeps both sides agreed.
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<SchemaVersion1, E> {
                version_one(v == f64::from(SCHEMA_VERSION), v)
            }
        }

        /// The one refusal text for a number that is not version 1, whatever its JSON type.
        fn version_one<E: de::Error>(
            is_one: bool,
            v: impl fmt::Display,
        ) -> Result<SchemaVersion1, E> {
            if is_one {
                Ok(SchemaVersion1)
            } else {
                Err(E::custom(format!(
                    "unsupported schema_version {v}, expected {SCHEMA_VERSION}"
                )))
            }
        }

        deserializer.deserialize_any(VersionVisitor)
    }
}

fixed_schema!(
    inline SchemaVersion1,
    json_schema!({
        "description": "Message format version. This schema describes version 1 only; a breaking change gets a new version and a new schema file.",
        "type": "integer",
        "const": SCHEMA_VERSION,
    })
);

/// Deserializer adaptor that only lets a JSON object through. Derived struct deserializers also
/// accept a JSON array of field values in declaration order; the JSON Schemas say "object", so
/// the Rust side must refuse arrays too.
pub(crate) struct MapOnly<D>(pub(crate) D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for MapOnly<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier
        ignored_any
    }
}

/// Parses one message; the single decode path behind every `from_json_bytes`.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, SchemaError> {
    // The happy path parses once; only a failure pays for a second look at the version.
    serde_json::from_slice(bytes).map_err(|err| classify(bytes, &err))
}

fn classify(bytes: &[u8], err: &serde_json::Error) -> SchemaError {
    match err.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            SchemaError::MalformedJson(short_reason(&err.to_string()))
        }
        Category::Data => match declared_unsupported_version(bytes) {
            Some(found) => SchemaError::UnsupportedVersion {
                found,
                expected: SCHEMA_VERSION,
            },
            None => SchemaError::InvalidMessage(short_reason(&err.to_string())),
        },
    }
}

/// The declared `schema_version` (as JSON text) when the message has one and it is not 1. A
/// newer producer's message usually fails on a new field first; naming the version instead tells
/// the operator what actually happened.
fn declared_unsupported_version(bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Peek {
        schema_version: Option<serde_json::Value>,
    }
    let declared = serde_json::from_slice::<Peek>(bytes).ok()?.schema_version?;
    let is_one = declared.as_f64() == Some(f64::from(SCHEMA_VERSION));
    (!is_one).then(|| short_reason(&declared.to_string()))
}

/// A message type that travels as a derived wire struct. The wire struct carries the serde and
/// schemars derives (field names and order, `deny_unknown_fields`, the docs the JSON Schema
/// shows) and borrows from the message when writing, so writing copies no identifier or object;
/// the message type only maps its fields to and from it.
pub(crate) trait WireForm: Sized {
    /// The derived wire struct.
    type Wire<'a>: Serialize + Deserialize<'a> + JsonSchema
    where
        Self: 'a;

    /// The wire form of `self`, borrowing its identifiers and objects.
    fn to_wire(&self) -> Self::Wire<'_>;

    /// The message from its wire form; the rules a derive cannot state are checked here.
    fn from_wire(wire: Self::Wire<'_>) -> Result<Self, SchemaError>;
}

/// Reads a [`WireForm`] message: a JSON object only (see [`MapOnly`]), then the message's own
/// rules, whose refusal becomes the serde error and so the decode error.
pub(crate) fn deserialize_wire<'de, T, D>(deserializer: D) -> Result<T, D::Error>
where
    T: WireForm + 'de,
    D: Deserializer<'de>,
{
    let wire = T::Wire::<'de>::deserialize(MapOnly(deserializer))?;
    T::from_wire(wire).map_err(de::Error::custom)
}

/// Gives a [`WireForm`] message type its whole codec: the inherent `from_json_bytes`,
/// `to_json_bytes` and `kafka_key` (the named fields joined by `:`), the
/// [`TopicMessage`](crate::topic::TopicMessage) impl on `$topic`, and serde and JSON Schema impls
/// that go through the wire struct (the schema's name is the type's).
macro_rules! message_codec {
    ($ty:ident, $topic:expr, key: [$($key:ident),+ $(,)?]) => {
        impl $ty {
            /// Parses and validates one message value of this type's topic.
            pub fn from_json_bytes(bytes: &[u8]) -> Result<Self, $crate::error::SchemaError> {
                $crate::codec::decode(bytes)
            }

            /// The message value as compact JSON.
            pub fn to_json_bytes(&self) -> Vec<u8> {
                $crate::codec::encode(self)
            }

            #[doc = concat!(
                "The Kafka key: ",
                $("`", stringify!($key), "`, ",)+
                "joined by `:`. It decides the partition, and so what stays in order; only for ",
                "partitioning, never parsed back (ids may contain `:`).",
            )]
            pub fn kafka_key(&self) -> String {
                [$(self.$key.as_str()),+].join(":")
            }
        }

        impl $crate::topic::TopicMessage for $ty {
            const TOPIC: $crate::topic::Topic = $topic;

            fn from_json_bytes(bytes: &[u8]) -> Result<Self, $crate::error::SchemaError> {
                <$ty>::from_json_bytes(bytes)
            }

            fn to_json_bytes(&self) -> Vec<u8> {
                <$ty>::to_json_bytes(self)
            }

            fn kafka_key(&self) -> String {
                <$ty>::kafka_key(self)
            }
        }

        impl ::serde::Serialize for $ty {
            fn serialize<S: ::serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                ::serde::Serialize::serialize(
                    &<$ty as $crate::codec::WireForm>::to_wire(self),
                    serializer,
                )
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $ty {
            fn deserialize<D: ::serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                $crate::codec::deserialize_wire(deserializer)
            }
        }

        impl ::schemars::JsonSchema for $ty {
            fn schema_name() -> ::std::borrow::Cow<'static, str> {
                stringify!($ty).into()
            }

            fn json_schema(generator: &mut ::schemars::SchemaGenerator) -> ::schemars::Schema {
                <<$ty as $crate::codec::WireForm>::Wire<'static> as ::schemars::JsonSchema>::json_schema(
                    generator,
                )
            }
        }
    };
}
pub(crate) use message_codec;

/// Writes one message; the single encode path behind every `to_json_bytes`.
pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    match serde_json::to_vec(value) {
        Ok(bytes) => bytes,
        // Unreachable by construction: a `Vec` writer cannot fail, every map key is a string,
        // and every field type here serialises infallibly (ids are strings, timestamps and
        // decimals are written through `Display`). An error would be a bug in this crate.
        Err(err) => unreachable!("message serialisation cannot fail: {err}"),
    }
}

/// ECMA-262 pattern of a decimal quantity: optional minus, no leading zeros, optional fraction,
/// no exponent.
pub const DECIMAL_PATTERN: &str = "^-?(0|[1-9][0-9]*)(\\.[0-9]+)?$";

fn is_decimal_text(value: &str) -> bool {
    let digits = value.strip_prefix('-').unwrap_or(value);
    let (int, frac) = match digits.split_once('.') {
        Some((int, frac)) => (int, Some(frac)),
        None => (digits, None),
    };
    let int_ok = int == "0"
        || (!int.is_empty() && !int.starts_with('0') && int.bytes().all(|b| b.is_ascii_digit()));
    let frac_ok = frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()));
    int_ok && frac_ok
}

/// Serde codec for a `Decimal` carried as a JSON string (a JSON number would lose precision in
/// producers that read numbers as doubles).
pub(crate) mod decimal_string {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(
        value: &Decimal,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Decimal, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse(&text).map_err(de::Error::custom)
    }

    pub(crate) fn parse(text: &str) -> Result<Decimal, SchemaError> {
        if !is_decimal_text(text) {
            return Err(SchemaError::invalid(
                "quantity",
                "must be a decimal string like \"1234\" or \"12.5\"",
            ));
        }
        // `from_str_exact` refuses instead of rounding when the text has more precision than
        // a Decimal holds: a total is never silently changed.
        Decimal::from_str_exact(text).map_err(|_| {
            SchemaError::invalid(
                "quantity",
                "exceeds the decimal range (28 significant digits, |value| < 7.9e28)",
            )
        })
    }

    pub(crate) fn schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "Decimal number as a string: optional '-', digits without leading zeros, optional fraction, no exponent; at most 28 significant digits. Examples: \"1234\", \"12.5\".",
            "type": "string",
            "pattern": DECIMAL_PATTERN,
            "examples": ["1234", "12.5"],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Probe {
        schema_version: SchemaVersion1,
        name: String,
    }

    #[test]
    fn classifies_errors() {
        let cases: [(&str, &str); 7] = [
            ("{", "parse"),
            ("not json", "parse"),
            (r#"{"schema_version":1,"name":"a"} x"#, "parse"),
            (r#"{"schema_version":1}"#, "validation"),
            (r#"{"schema_version":1,"name":1}"#, "validation"),
            (r#"{"schema_version":2,"name":"a"}"#, "unsupported_version"),
            // The unknown field comes first, yet the version is what gets reported.
            (
                r#"{"extra":true,"schema_version":2,"name":"a"}"#,
                "unsupported_version",
            ),
        ];
        for (input, kind) in cases {
            let err = decode::<Probe>(input.as_bytes()).expect_err(input);
            assert_eq!(err.dlq_error_kind().as_str(), kind, "{input}: {err}");
        }
    }

    #[test]
    fn version_errors_are_clear() {
        let err = decode::<Probe>(br#"{"name":"a","schema_version":"1"}"#).expect_err("string");
        assert_eq!(
            err.to_string(),
            "unsupported schema_version \"1\", expected 1"
        );
        let err = decode::<Probe>(br#"{"name":"a"}"#).expect_err("missing");
        assert!(
            err.to_string()
                .starts_with("missing field `schema_version`"),
            "{err}"
        );
        assert!(decode::<Probe>(br#"{"schema_version":1.0,"name":"a"}"#).is_ok());
    }

    #[test]
    fn decimal_text_table() {
        for ok in ["0", "1234", "12.5", "-3", "-0.25", "0.000", "1.10"] {
            assert!(decimal_string::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "-", "01", "1.", ".5", "1e3", "+1", "1,5", " 1", "1 ", "NaN", "0x10", "--1",
        ] {
            assert!(decimal_string::parse(bad).is_err(), "{bad:?}");
        }
        assert!(decimal_string::parse("79228162514264337593543950336").is_err());
        assert!(decimal_string::parse("0.12345678901234567890123456789").is_err());
    }

    #[test]
    fn decimal_keeps_its_written_scale() {
        let value = decimal_string::parse("12.50").expect("valid");
        assert_eq!(value.to_string(), "12.50");
    }
}
