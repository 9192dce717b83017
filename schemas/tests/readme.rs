//! The README's examples are real: every `<!-- example: <topic> -->` block is a message both the
//! Rust parser and the JSON Schema accept, and the `kcat -P` line produces a valid `usage.raw`
//! message under the key meterline itself would use.

mod common;

use meterline_schemas::json_schema::DLQ_HEADERS_SCHEMA_FILE;
use meterline_schemas::{RawUsageEvent, Topic};

fn readme() -> String {
    std::fs::read_to_string(common::crate_dir().join("README.md")).expect("README.md")
}

/// (subject, json text) of every marked example block.
fn examples(text: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(subject) = line
            .trim()
            .strip_prefix("<!-- example: ")
            .and_then(|rest| rest.strip_suffix(" -->"))
        else {
            continue;
        };
        assert_eq!(
            lines.next().map(str::trim),
            Some("```json"),
            "example {subject}: no json block"
        );
        let body: Vec<&str> = lines.by_ref().take_while(|l| l.trim() != "```").collect();
        found.push((subject.to_owned(), body.join("\n")));
    }
    found
}

/// `json` satisfies `subject`'s committed schema; `what` names it in the failure.
fn assert_schema_accepts(what: &str, subject: &str, json: &[u8]) {
    let instance: serde_json::Value = serde_json::from_slice(json).expect("example is JSON");
    let errors: Vec<String> = common::validator(subject)
        .iter_errors(&instance)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "{what} rejected by the schema: {errors:?}"
    );
}

#[test]
fn every_example_is_valid() {
    let text = readme();
    let found = examples(&text);
    let mut subjects: Vec<&str> = found.iter().map(|(s, _)| s.as_str()).collect();
    subjects.sort_unstable();
    let mut expected = common::subjects();
    expected.sort_unstable();
    assert_eq!(
        subjects, expected,
        "one example per topic and one for the DLQ headers"
    );
    for (subject, json) in &found {
        if let Err(err) = common::rust_parse(subject, json.as_bytes()) {
            panic!("README example {subject} rejected by Rust: {err}");
        }
        assert_schema_accepts(
            &format!("README example {subject}"),
            subject,
            json.as_bytes(),
        );
    }
}

#[test]
fn kcat_example_produces_a_valid_keyed_message() {
    let text = readme();
    let lines: Vec<&str> = text.lines().collect();
    let kcat = lines
        .iter()
        .position(|l| l.contains("kcat -P -b 127.0.0.1:19092 -t usage.raw -K '|'"))
        .expect("README has the kcat -P example");
    let echo = lines[..kcat]
        .iter()
        .rev()
        .find_map(|l| l.trim().strip_prefix("echo '"))
        .expect("an echo line before kcat");
    let record = echo
        .strip_suffix("' \\")
        .or_else(|| echo.strip_suffix('\''))
        .expect("echo argument in single quotes");
    let (key, value) = record.split_once('|').expect("key|value");
    let event = RawUsageEvent::from_json_bytes(value.as_bytes()).expect("kcat value parses");
    assert_eq!(key, event.kafka_key(), "kcat key is the key meterline uses");
    assert_schema_accepts("kcat value", Topic::UsageRaw.base_name(), value.as_bytes());
}

#[test]
fn names_every_topic_twin_and_schema_file() {
    let text = readme();
    for topic in Topic::all() {
        for name in [
            topic.base_name(),
            topic.dlq_base_name(),
            topic.schema_file(),
        ] {
            assert!(
                text.contains(&format!("`{name}`")),
                "README does not mention `{name}`"
            );
        }
    }
    assert!(text.contains(DLQ_HEADERS_SCHEMA_FILE));
    for header in meterline_schemas::dlq::HEADER_NAMES {
        assert!(
            text.contains(&format!("`{header}`")),
            "README does not mention `{header}`"
        );
    }
}
