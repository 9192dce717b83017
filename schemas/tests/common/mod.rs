//! Helpers shared by the integration tests: paths into the crate, the committed JSON Schemas as
//! validators, and the Rust parser of each corpus folder.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use meterline_schemas::json_schema::DLQ_HEADERS_SCHEMA_FILE;
use meterline_schemas::{
    DlqHeaders, RawUsageEvent, ResyncRequest, SchemaError, StripeWebhook, Topic, WindowTotal,
};

/// The folder name used under `testdata/` and `golden/` for the DLQ headers.
pub const DLQ_HEADERS: &str = "dlq-headers";

pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|err| panic!("read {}: {err}", path.display()))
}

/// Every corpus folder name: the four topics and the DLQ headers.
pub fn subjects() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = Topic::all().iter().map(|t| t.base_name()).collect();
    names.push(DLQ_HEADERS);
    names
}

pub fn schema_file(subject: &str) -> &'static str {
    match Topic::from_base_name(subject) {
        Some(topic) => topic.schema_file(),
        None if subject == DLQ_HEADERS => DLQ_HEADERS_SCHEMA_FILE,
        None => panic!("unknown subject {subject}"),
    }
}

/// A validator for the committed schema file, with `format` asserted (as the README tells
/// producers to do) so `date-time` and `uuid` are checked, not just annotated.
pub fn validator(subject: &str) -> jsonschema::Validator {
    let path = crate_dir().join("json").join(schema_file(subject));
    let schema: serde_json::Value =
        serde_json::from_slice(&read(&path)).expect("schema file is JSON");
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|err| panic!("{} is not a valid schema: {err}", path.display()))
}

/// Parses `bytes` the way a meterline service does.
pub fn rust_parse(subject: &str, bytes: &[u8]) -> Result<(), SchemaError> {
    match Topic::from_base_name(subject) {
        Some(Topic::UsageRaw) => RawUsageEvent::from_json_bytes(bytes).map(drop),
        Some(Topic::UsageWindows) => WindowTotal::from_json_bytes(bytes).map(drop),
        Some(Topic::UsageResync) => ResyncRequest::from_json_bytes(bytes).map(drop),
        Some(Topic::StripeWebhooks) => StripeWebhook::from_json_bytes(bytes).map(drop),
        None if subject == DLQ_HEADERS => {
            // Kafka gives a list of (name, bytes); the corpus writes it as a JSON object, and a
            // non-string value has no header form at all.
            let map: BTreeMap<String, String> = serde_json::from_slice(bytes)
                .map_err(|err| SchemaError::MalformedJson(err.to_string()))?;
            DlqHeaders::from_headers(map).map(drop)
        }
        None => panic!("unknown subject {subject}"),
    }
}
