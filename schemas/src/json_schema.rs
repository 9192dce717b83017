//! The JSON Schema documents (draft 2020-12) committed under `schemas/json/`, generated from the
//! Rust types with schemars, and `fixed_schema!`, the one way a hand-written schema (an id, a
//! timestamp, the DLQ headers) is attached to its type.
//!
//! Rule kept here: the committed files are exactly [`render`] of these documents; the drift test
//! regenerates them and compares byte for byte (`UPDATE_SCHEMAS=1 cargo test -p
//! meterline-schemas` rewrites them). Output is deterministic: schemars emits keys in insertion
//! order (serde_json's `preserve_order`, which this crate enables).

use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde_json::{Map, Value};

use crate::dlq::DlqHeaders;
use crate::stripe_webhooks::StripeWebhook;
use crate::topic::Topic;
use crate::usage_raw::RawUsageEvent;
use crate::usage_resync::ResyncRequest;
use crate::usage_windows::WindowTotal;

/// Implements `JsonSchema` for a type whose schema is one fixed, hand-written document, named
/// after the type (a `$defs` entry the message schemas refer to), or with `inline` written out
/// wherever the type is used.
macro_rules! fixed_schema {
    (inline $ty:ident, $schema:expr) => {
        $crate::json_schema::fixed_schema!(@impl $ty, true, $schema);
    };
    ($ty:ident, $schema:expr) => {
        $crate::json_schema::fixed_schema!(@impl $ty, false, $schema);
    };
    (@impl $ty:ident, $inline:expr, $schema:expr) => {
        impl ::schemars::JsonSchema for $ty {
            fn inline_schema() -> bool {
                $inline
            }

            fn schema_name() -> ::std::borrow::Cow<'static, str> {
                stringify!($ty).into()
            }

            fn json_schema(_: &mut ::schemars::SchemaGenerator) -> ::schemars::Schema {
                $schema
            }
        }
    };
}
pub(crate) use fixed_schema;

/// File name of the DLQ header schema, shared by the four DLQ twins.
pub const DLQ_HEADERS_SCHEMA_FILE: &str = "dlq-headers.v1.schema.json";

/// `$id` of a schema document: a URN, so it names the schema without promising a download URL.
pub fn schema_id(file_name: &str) -> String {
    let stem = file_name.strip_suffix(".schema.json").unwrap_or(file_name);
    format!("urn:meterline:schema:{stem}")
}

/// The JSON Schema of `topic`'s message value.
pub fn for_topic(topic: Topic) -> Value {
    let schema = match topic {
        Topic::UsageRaw => generate::<RawUsageEvent>(),
        Topic::UsageWindows => generate::<WindowTotal>(),
        Topic::UsageResync => generate::<ResyncRequest>(),
        Topic::StripeWebhooks => generate::<StripeWebhook>(),
    };
    with_id(schema, topic.schema_file())
}

/// The JSON Schema of the DLQ header map.
pub fn for_dlq_headers() -> Value {
    with_id(generate::<DlqHeaders>(), DLQ_HEADERS_SCHEMA_FILE)
}

/// Every committed schema file: (file name, document).
pub fn all() -> Vec<(&'static str, Value)> {
    let mut files: Vec<(&'static str, Value)> = Topic::all()
        .iter()
        .map(|topic| (topic.schema_file(), for_topic(*topic)))
        .collect();
    files.push((DLQ_HEADERS_SCHEMA_FILE, for_dlq_headers()));
    files
}

/// The text of a committed schema file: two-space indented JSON and a final newline.
pub fn render(schema: &Value) -> String {
    // `Value`'s Display with the alternate flag is serde_json's pretty printer, and cannot fail.
    format!("{schema:#}\n")
}

fn generate<T: JsonSchema>() -> Value {
    SchemaSettings::draft2020_12()
        .into_generator()
        .into_root_schema_for::<T>()
        .to_value()
}

/// Puts `$schema`, `$id`, `title` and `description` first (what a reader looks for), the rest
/// in generated order.
fn with_id(schema: Value, file_name: &str) -> Value {
    let Value::Object(mut rest) = schema else {
        return schema;
    };
    let mut ordered = Map::new();
    if let Some(meta) = rest.shift_remove("$schema") {
        ordered.insert("$schema".to_owned(), meta);
    }
    ordered.insert("$id".to_owned(), Value::String(schema_id(file_name)));
    for key in ["title", "description"] {
        if let Some(value) = rest.shift_remove(key) {
            ordered.insert(key.to_owned(), value);
        }
    }
    ordered.extend(rest);
    Value::Object(ordered)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_headers() {
        assert_eq!(
            schema_id("usage.raw.v1.schema.json"),
            "urn:meterline:schema:usage.raw.v1"
        );
        for (file, schema) in all() {
            let keys: Vec<&str> = schema
                .as_object()
                .expect("object")
                .keys()
                .take(4)
                .map(String::as_str)
                .collect();
            assert_eq!(keys, ["$schema", "$id", "title", "description"], "{file}");
            assert_eq!(
                schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
                "{file}"
            );
        }
    }

    #[test]
    fn messages_refuse_unknown_fields() {
        for topic in Topic::all() {
            assert_eq!(
                for_topic(*topic)["additionalProperties"],
                false,
                "{topic:?}"
            );
        }
    }
}
