//! Domain identifiers and the short labels that travel with them: tenant, environment, meter,
//! customer, event, job, event name, event source, Stripe event id and type.
//!
//! Rule kept here: each type can only be built valid (`parse` / `TryFrom<String>`), serialises as a
//! plain JSON string that is re-validated on the way in, and publishes the very same rule as its
//! JSON Schema (pattern / minLength / maxLength), so a non-Rust producer sees the exact constraint.
//!
//! Two rules cover the string identifiers:
//! - *slug* (`TenantId`, `EnvironmentId`, `MeterId`): `^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$`, because
//!   these end up in URL paths, Kafka keys and SQL.
//! - *text* (`CustomerId`, `EventId`, `EventName`, `EventSource`, `StripeEventId`,
//!   `StripeEventType`): 1..=N characters (Unicode code points, as JSON Schema counts them), no
//!   control character (Unicode category Cc), not only whitespace (Unicode `White_Space`). These
//!   come from producers' own systems, so anything printable is allowed.

use std::fmt;

use compact_str::CompactString;
use schemars::{json_schema, Schema};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::SchemaError;
use crate::json_schema::fixed_schema;

/// Longest slug identifier, in characters.
pub const SLUG_MAX_CHARS: usize = 64;

/// ECMA-262 pattern of a slug identifier (what the JSON Schemas carry).
pub const SLUG_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$";

/// ECMA-262 pattern of the text rule: no Cc control character anywhere, and at least one character
/// that is neither a control character nor Unicode `White_Space` (the set `char::is_whitespace`
/// uses, spelled out because `\s` means slightly different things in different regex engines).
pub const TEXT_PATTERN: &str = concat!(
    "^[^\\u0000-\\u001F\\u007F-\\u009F]*",
    "[^\\u0000-\\u0020\\u007F-\\u00A0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000]",
    "[^\\u0000-\\u001F\\u007F-\\u009F]*$"
);

/// ECMA-262 pattern of a job id: a hyphenated UUID.
pub const UUID_PATTERN: &str =
    "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";

fn check_slug(value: &str) -> Result<(), String> {
    let mut chars = value.chars();
    let Some(first) = chars.next() else {
        return Err("must not be empty".to_owned());
    };
    if !first.is_ascii_alphanumeric() {
        return Err("must start with an ASCII letter or digit".to_owned());
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')) {
        return Err("may contain only ASCII letters, digits, '_', '.', ':' and '-'".to_owned());
    }
    // Every char is ASCII by now, so the byte length is the character count.
    if value.len() > SLUG_MAX_CHARS {
        return Err(format!("must be at most {SLUG_MAX_CHARS} characters"));
    }
    Ok(())
}

fn check_text(value: &str, max_chars: usize) -> Result<(), String> {
    if value.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if value.chars().count() > max_chars {
        return Err(format!("must be at most {max_chars} characters"));
    }
    if value.chars().any(char::is_control) {
        return Err("must not contain control characters".to_owned());
    }
    if value.chars().all(char::is_whitespace) {
        return Err("must not be only whitespace".to_owned());
    }
    Ok(())
}

fn slug_schema(description: &str) -> Schema {
    json_schema!({
        "description": description,
        "type": "string",
        "minLength": 1,
        "maxLength": SLUG_MAX_CHARS,
        "pattern": SLUG_PATTERN,
    })
}

fn text_schema(description: &str, max_chars: usize) -> Schema {
    json_schema!({
        "description": description,
        "type": "string",
        "minLength": 1,
        "maxLength": max_chars,
        "pattern": TEXT_PATTERN,
    })
}

/// The conversions every validated text type has, from its `parse`, `as_str` and `into_string`:
/// `FromStr` (validating), `From<T> for String`, `AsRef<str>` and `Display` (the text as is).
macro_rules! text_conversions {
    ($name:ident) => {
        impl ::std::str::FromStr for $name {
            type Err = $crate::error::SchemaError;

            fn from_str(value: &str) -> Result<Self, $crate::error::SchemaError> {
                Self::parse(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.into_string()
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use text_conversions;

/// Defines a string identifier: private field, fallible construction, serde as a JSON string
/// validated on the way in, and a hand-written JSON Schema carrying the same rule. The text is
/// a `CompactString`: up to 24 bytes inline, longer ones on the heap.
macro_rules! string_id {
    (
        $(#[$attr:meta])*
        $name:ident {
            field: $field:literal,
            check: $check:expr,
            schema: $schema:expr $(,)?
        }
    ) => {
        $(#[$attr])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(CompactString);

        impl $name {
            #[doc = concat!("Validates `value` as a `", $field, "`.")]
            pub fn parse(value: &str) -> Result<Self, SchemaError> {
                Self::check(value)?;
                Ok(Self(CompactString::new(value)))
            }

            /// The identifier as text, exactly as it was parsed.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Gives back the owned text.
            pub fn into_string(self) -> String {
                self.0.into_string()
            }

            fn check(value: &str) -> Result<(), SchemaError> {
                let check: fn(&str) -> Result<(), String> = $check;
                check(value).map_err(|reason| SchemaError::invalid($field, reason))
            }
        }

        impl TryFrom<String> for $name {
            type Error = SchemaError;

            fn try_from(value: String) -> Result<Self, SchemaError> {
                Self::check(&value)?;
                Ok(Self(CompactString::from(value)))
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        // From the deserializer's own (often borrowed) text: a short identifier is never
        // copied to the heap on the way in.
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                struct Text;

                impl serde::de::Visitor<'_> for Text {
                    type Value = $name;

                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a string")
                    }

                    fn visit_str<E: serde::de::Error>(self, value: &str) -> Result<$name, E> {
                        $name::parse(value).map_err(E::custom)
                    }

                    fn visit_string<E: serde::de::Error>(self, value: String) -> Result<$name, E> {
                        $name::try_from(value).map_err(E::custom)
                    }
                }

                deserializer.deserialize_str(Text)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = SchemaError;

            fn try_from(value: &str) -> Result<Self, SchemaError> {
                Self::parse(value)
            }
        }

        text_conversions!($name);

        // Hash and Eq are those of the text, so a map keyed by the id can be searched with
        // a `&str` without building an id.
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        fixed_schema!($name, $schema);
    };
}

string_id! {
    /// The tenant that owns the data: the `tenant_id` claim of the caller's JWT (slug rule).
    TenantId {
        field: "tenant_id",
        check: check_slug,
        schema: slug_schema(
            "Tenant identifier. ASCII letter or digit, then up to 63 of [A-Za-z0-9_.:-].",
        ),
    }
}

string_id! {
    /// The tenant's environment (e.g. `prod`, `test`): the `environment_id` JWT claim (slug rule).
    EnvironmentId {
        field: "environment_id",
        check: check_slug,
        schema: slug_schema(
            "Environment identifier within the tenant. ASCII letter or digit, then up to 63 of [A-Za-z0-9_.:-].",
        ),
    }
}

string_id! {
    /// A meter defined through the ingest API (slug rule).
    MeterId {
        field: "meter_id",
        check: check_slug,
        schema: slug_schema(
            "Meter identifier. ASCII letter or digit, then up to 63 of [A-Za-z0-9_.:-].",
        ),
    }
}

string_id! {
    /// The producer's own customer identifier (text rule, at most 255 characters).
    CustomerId {
        field: "customer_id",
        check: |value| check_text(value, 255),
        schema: text_schema(
            "The producer's customer identifier: 1 to 255 characters, no control characters, not only whitespace.",
            255,
        ),
    }
}

string_id! {
    /// A usage event's id: the producer's deduplication key (text rule, at most 255 characters).
    EventId {
        field: "id",
        check: |value| check_text(value, 255),
        schema: text_schema(
            "Event identifier and deduplication key: an event id counts once in any total. 1 to 255 characters, no control characters, not only whitespace.",
            255,
        ),
    }
}

impl EventId {
    /// A fresh, time-ordered id (UUID v7, hyphenated) for events whose producer sent none.
    pub fn generate() -> Self {
        // A hyphenated UUID is 36 ASCII hex digits and hyphens, which the text rule accepts.
        let mut text = Uuid::encode_buffer();
        Self(CompactString::new(
            Uuid::now_v7().hyphenated().encode_lower(&mut text),
        ))
    }
}

string_id! {
    /// What happened, as the producer names it; meters select events by it. At most 100
    /// characters because Stripe's meter `event_name` is limited to 100.
    EventName {
        field: "event_name",
        check: |value| check_text(value, 100),
        schema: text_schema(
            "Event name meters select on (Stripe's event_name limit): 1 to 100 characters, no control characters, not only whitespace.",
            100,
        ),
    }
}

string_id! {
    /// Free-form label of the system that produced an event (text rule, at most 255 characters).
    EventSource {
        field: "source",
        check: |value| check_text(value, 255),
        schema: text_schema(
            "Label of the producing system: 1 to 255 characters, no control characters, not only whitespace.",
            255,
        ),
    }
}

string_id! {
    /// Stripe's event id (`evt_...`), the webhook relay's deduplication key (text rule, at most
    /// 255 characters). The `evt_` prefix is not enforced: the local Stripe stand-in and future
    /// Stripe event kinds may differ, and nothing here depends on it.
    StripeEventId {
        field: "event_id",
        check: |value| check_text(value, 255),
        schema: text_schema(
            "Stripe event id (evt_...): 1 to 255 characters, no control characters, not only whitespace.",
            255,
        ),
    }
}

string_id! {
    /// Stripe's event type, e.g. `customer.created` (text rule, at most 255 characters). Kept
    /// open rather than an enum so a new Stripe event type is relayed, not rejected.
    StripeEventType {
        field: "event_type",
        check: |value| check_text(value, 255),
        schema: text_schema(
            "Stripe event type, e.g. customer.created: 1 to 255 characters, no control characters, not only whitespace.",
            255,
        ),
    }
}

/// A manual sync job (`POST /v1/stripe/sync/manual` answers with it). Always a UUID, written in
/// the hyphenated form; parsing accepts either case and `as_str` gives the lowercase form.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JobId {
    uuid: Uuid,
    // Kept beside the UUID so `as_str` can hand out a borrowed, canonical form.
    text: String,
}

impl JobId {
    /// A fresh, time-ordered job id (UUID v7).
    pub fn generate() -> Self {
        Self::from(Uuid::now_v7())
    }

    /// Validates `value` as a hyphenated UUID (36 characters).
    pub fn parse(value: &str) -> Result<Self, SchemaError> {
        // `Uuid::parse_str` also takes the braced, URN and un-hyphenated forms; the wire format
        // (and the JSON Schema pattern) is the hyphenated one only.
        let hyphenated = value.len() == 36
            && value.char_indices().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-',
                _ => c.is_ascii_hexdigit(),
            });
        if !hyphenated {
            return Err(SchemaError::invalid(
                "job_id",
                "must be a hyphenated UUID like 0190c5a2-7b1e-7c3d-9e4f-a1b2c3d4e5f6",
            ));
        }
        Uuid::parse_str(value)
            .map(Self::from)
            .map_err(|_| SchemaError::invalid("job_id", "must be a hyphenated UUID"))
    }

    /// The lowercase hyphenated form.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Gives back the owned lowercase hyphenated text.
    pub fn into_string(self) -> String {
        self.text
    }

    /// The UUID itself.
    pub fn as_uuid(&self) -> Uuid {
        self.uuid
    }
}

text_conversions!(JobId);

impl From<Uuid> for JobId {
    fn from(uuid: Uuid) -> Self {
        Self {
            uuid,
            text: uuid.hyphenated().to_string(),
        }
    }
}

impl From<JobId> for Uuid {
    fn from(value: JobId) -> Uuid {
        value.uuid
    }
}

impl TryFrom<String> for JobId {
    type Error = SchemaError;

    fn try_from(value: String) -> Result<Self, SchemaError> {
        Self::parse(&value)
    }
}

fixed_schema!(
    JobId,
    json_schema!({
        "description": "Manual sync job id: a hyphenated UUID.",
        "type": "string",
        "format": "uuid",
        "minLength": 36,
        "maxLength": 36,
        "pattern": UUID_PATTERN,
    })
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slug_ids_accept_the_documented_alphabet() {
        for ok in [
            "a",
            "Z9",
            "acme",
            "acme-corp_1.eu:west",
            "0",
            &"a".repeat(64),
        ] {
            assert!(TenantId::parse(ok).is_ok(), "{ok:?} should be accepted");
            assert!(
                EnvironmentId::parse(ok).is_ok(),
                "{ok:?} should be accepted"
            );
            assert!(MeterId::parse(ok).is_ok(), "{ok:?} should be accepted");
        }
    }

    /// Each `(input, reason)` is refused by `parse` with exactly `invalid {field}: {reason}`.
    fn assert_refusals<T: fmt::Debug>(
        parse: fn(&str) -> Result<T, SchemaError>,
        field: &str,
        cases: &[(&str, &str)],
    ) {
        for (bad, reason) in cases {
            let err = parse(bad).expect_err(bad).to_string();
            assert_eq!(err, format!("invalid {field}: {reason}"), "{bad:?}");
        }
    }

    #[test]
    fn slug_ids_reject_what_breaks_paths_keys_or_sql() {
        let start = "must start with an ASCII letter or digit";
        let alphabet = "may contain only ASCII letters, digits, '_', '.', ':' and '-'";
        let cases = [
            ("", "must not be empty"),
            ("-acme", start),
            ("_acme", start),
            ("acme corp", alphabet),
            ("acme/prod", alphabet),
            ("acme'; drop", alphabet),
            ("café", alphabet),
            ("ünïcode", start),
        ];
        assert_refusals(MeterId::parse, "meter_id", &cases);
        let too_long = "a".repeat(65);
        assert_eq!(
            TenantId::parse(&too_long)
                .expect_err("65 chars")
                .to_string(),
            "invalid tenant_id: must be at most 64 characters"
        );
    }

    #[test]
    fn text_ids_accept_printable_unicode_up_to_the_limit() {
        for ok in [
            "c",
            "cus_42",
            "customer 42",
            " padded ",
            "客户-7",
            "a\u{00A0}b",
            "🙂",
        ] {
            assert!(CustomerId::parse(ok).is_ok(), "{ok:?}");
            assert!(EventId::parse(ok).is_ok(), "{ok:?}");
        }
        // The limit counts characters, not bytes: 255 three-byte characters fit.
        assert!(CustomerId::parse(&"客".repeat(255)).is_ok());
        assert!(EventName::parse(&"e".repeat(100)).is_ok());
    }

    #[test]
    fn text_ids_reject_empty_long_control_and_blank() {
        let cases: [(&str, &str); 7] = [
            ("", "must not be empty"),
            (" ", "must not be only whitespace"),
            ("\u{3000}\u{00A0}", "must not be only whitespace"),
            ("a\u{0}b", "must not contain control characters"),
            ("tab\there", "must not contain control characters"),
            ("del\u{7f}", "must not contain control characters"),
            ("c1\u{85}", "must not contain control characters"),
        ];
        assert_refusals(CustomerId::parse, "customer_id", &cases);
        assert!(EventId::parse(&"x".repeat(256)).is_err());
        assert!(EventName::parse(&"x".repeat(101)).is_err());
        assert!(EventSource::parse(&"x".repeat(256)).is_err());
    }

    #[test]
    fn serde_is_a_plain_string_validated_on_the_way_in() {
        let id = CustomerId::parse("cus_42").expect("valid");
        assert_eq!(serde_json::to_string(&id).expect("serialise"), "\"cus_42\"");
        let back: CustomerId = serde_json::from_str("\"cus_42\"").expect("deserialise");
        assert_eq!(back, id);
        let err = serde_json::from_str::<TenantId>("\"no spaces\"").expect_err("invalid");
        assert!(err.to_string().starts_with("invalid tenant_id"), "{err}");
        assert!(serde_json::from_str::<TenantId>("42").is_err());
    }

    #[test]
    fn generated_event_ids_are_valid() {
        let id = EventId::generate();
        assert_eq!(EventId::parse(id.as_str()).expect("valid"), id);
    }

    #[test]
    fn job_id_takes_only_the_hyphenated_form_and_prints_lowercase() {
        let id = JobId::parse("0190C5A2-7B1E-7C3D-9E4F-A1B2C3D4E5F6").expect("valid");
        assert_eq!(id.as_str(), "0190c5a2-7b1e-7c3d-9e4f-a1b2c3d4e5f6");
        assert_eq!(id.to_string(), id.as_str());
        for bad in [
            "",
            "0190c5a27b1e7c3d9e4fa1b2c3d4e5f6",
            "{0190c5a2-7b1e-7c3d-9e4f-a1b2c3d4e5f6}",
            "urn:uuid:0190c5a2-7b1e-7c3d-9e4f-a1b2c3d4e5f6",
            "0190c5a2-7b1e-7c3d-9e4f-a1b2c3d4e5fg",
            "0190c5a2+7b1e-7c3d-9e4f-a1b2c3d4e5f6",
        ] {
            assert!(JobId::parse(bad).is_err(), "{bad:?}");
        }
        let generated = JobId::generate();
        assert_eq!(JobId::parse(generated.as_str()).expect("valid"), generated);
    }

    #[test]
    fn text_pattern_is_written_with_regex_escapes_only() {
        // The pattern goes into JSON files; raw control characters there would be unreadable.
        assert!(!TEXT_PATTERN.chars().any(char::is_control));
    }
}
