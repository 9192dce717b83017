//! Agreement corpus: for every file under `testdata/<subject>/`, the Rust parser and the
//! committed JSON Schema (validated with the `jsonschema` crate, formats asserted) must agree.
//!
//! - `valid/`: both accept.
//! - `invalid/`: both reject.
//! - `invalid-rust-only/`: the Rust parser rejects and the schema accepts, because the rule is
//!   one JSON Schema cannot state (comparing two fields, alignment to a size derived from two
//!   fields, duplicate object keys). Each such file is explained in `testdata/README.md`; the
//!   test checks the explanation exists.

mod common;

use std::path::{Path, PathBuf};

const MIN_VALID: usize = 2;
const MIN_INVALID: usize = 6;

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    files
}

fn name(path: &Path) -> String {
    let parent = path
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{parent}/{file}")
}

struct Verdicts {
    rust: Result<(), String>,
    schema: Result<(), String>,
}

fn judge(subject: &str, validator: &jsonschema::Validator, path: &Path) -> Verdicts {
    let bytes = common::read(path);
    let rust = common::rust_parse(subject, &bytes).map_err(|err| err.to_string());
    let schema = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(instance) => {
            let errors: Vec<String> = validator
                .iter_errors(&instance)
                .map(|e| e.to_string())
                .collect();
            if errors.is_empty() {
                Ok(())
            } else {
                Err(errors.join("; "))
            }
        }
        Err(err) => Err(format!("not JSON: {err}")),
    };
    Verdicts { rust, schema }
}

fn check_subject(subject: &str) -> Vec<String> {
    let dir = common::crate_dir().join("testdata").join(subject);
    let validator = common::validator(subject);
    let mut problems = Vec::new();

    let valid = files(&dir.join("valid"));
    let invalid = files(&dir.join("invalid"));
    if valid.len() < MIN_VALID || invalid.len() < MIN_INVALID {
        problems.push(format!(
            "{subject}: corpus too small ({} valid, {} invalid)",
            valid.len(),
            invalid.len()
        ));
    }

    for path in &valid {
        let v = judge(subject, &validator, path);
        if let Err(err) = &v.rust {
            problems.push(format!(
                "{subject}/{}: Rust rejects a valid file: {err}",
                name(path)
            ));
        }
        if let Err(err) = &v.schema {
            problems.push(format!(
                "{subject}/{}: schema rejects a valid file: {err}",
                name(path)
            ));
        }
    }
    for path in &invalid {
        let v = judge(subject, &validator, path);
        if v.rust.is_ok() {
            problems.push(format!(
                "{subject}/{}: Rust accepts an invalid file",
                name(path)
            ));
        }
        if v.schema.is_ok() {
            problems.push(format!(
                "{subject}/{}: schema accepts an invalid file",
                name(path)
            ));
        }
    }

    let explained = std::fs::read_to_string(common::crate_dir().join("testdata/README.md"))
        .expect("testdata/README.md");
    for path in files(&dir.join("invalid-rust-only")) {
        let v = judge(subject, &validator, &path);
        if v.rust.is_ok() {
            problems.push(format!(
                "{subject}/{}: Rust accepts an invalid file",
                name(&path)
            ));
        }
        if let Err(err) = &v.schema {
            problems.push(format!(
                "{subject}/{}: the schema rejects it too ({err}); move it to invalid/",
                name(&path)
            ));
        }
        let listed = format!("{subject}/{}", name(&path));
        if !explained.contains(&listed) {
            problems.push(format!("{listed}: not explained in testdata/README.md"));
        }
    }
    problems
}

#[test]
fn rust_parser_and_json_schema_agree() {
    let problems: Vec<String> = common::subjects()
        .into_iter()
        .flat_map(check_subject)
        .collect();
    assert!(
        problems.is_empty(),
        "corpus disagreements:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn rust_only_set_stays_small() {
    // Every rule moved out of the schema is one a non-Rust producer can only learn from a DLQ.
    let total: usize = common::subjects()
        .into_iter()
        .map(|s| {
            files(
                &common::crate_dir()
                    .join("testdata")
                    .join(s)
                    .join("invalid-rust-only"),
            )
            .len()
        })
        .sum();
    assert!(
        total <= 8,
        "{total} rust-only cases; express rules in the schema where possible"
    );
}

#[test]
fn invalid_files_fail_with_a_short_reason() {
    // The reason goes into the dlq.error header: it must be bounded and single-line.
    for subject in common::subjects() {
        let dir = common::crate_dir().join("testdata").join(subject);
        for path in files(&dir.join("invalid"))
            .into_iter()
            .chain(files(&dir.join("invalid-rust-only")))
        {
            let Err(err) = common::rust_parse(subject, &common::read(&path)) else {
                continue;
            };
            let reason = err.to_string();
            assert!(
                !reason.is_empty() && reason.chars().count() <= 400,
                "{}: {reason}",
                name(&path)
            );
            assert!(
                !reason.chars().any(char::is_control),
                "{}: {reason:?}",
                name(&path)
            );
        }
    }
}
