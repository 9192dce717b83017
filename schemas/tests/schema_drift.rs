//! Drift: the committed files under `schemas/json/` must be exactly what the Rust types
//! generate today. `UPDATE_SCHEMAS=1 cargo test -p meterline-schemas` rewrites them; review the
//! diff, and remember a breaking change needs a new schema_version and a new file.

mod common;

use meterline_schemas::json_schema;

#[test]
fn committed_schemas_match_the_rust_types() {
    let dir = common::crate_dir().join("json");
    let update = std::env::var_os("UPDATE_SCHEMAS").is_some_and(|v| v == "1");
    let mut stale = Vec::new();
    for (file, schema) in json_schema::all() {
        let path = dir.join(file);
        let generated = json_schema::render(&schema);
        if update {
            std::fs::create_dir_all(&dir).expect("create schemas/json");
            std::fs::write(&path, &generated).expect("write schema file");
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(committed) if committed == generated => {}
            Ok(_) => stale.push(format!("{file} differs from the generated schema")),
            Err(err) => stale.push(format!("{file} cannot be read ({err})")),
        }
    }
    assert!(
        stale.is_empty(),
        "JSON Schema files are out of date:\n  {}\nrerun with `UPDATE_SCHEMAS=1 cargo test -p meterline-schemas` to rewrite them, then review the diff",
        stale.join("\n  ")
    );
}

#[test]
fn no_stray_schema_files() {
    // A file nobody generates any more would still look authoritative to a producer.
    let expected: Vec<&str> = json_schema::all()
        .into_iter()
        .map(|(file, _)| file)
        .collect();
    let dir = common::crate_dir().join("json");
    for entry in std::fs::read_dir(&dir).expect("schemas/json exists") {
        let name = entry.expect("dir entry").file_name();
        let name = name.to_string_lossy();
        assert!(
            expected.contains(&name.as_ref()),
            "unexpected file json/{name}"
        );
    }
}

#[test]
fn committed_schemas_are_valid_draft_2020_12() {
    for subject in common::subjects() {
        // Building a validator checks the schema against its meta-schema.
        let _ = common::validator(subject);
    }
}
