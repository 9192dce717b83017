//! Replays the committed inputs of the fuzz target `usage_raw` (its seeds and every input the
//! fuzzer found) through the same property the target checks, on stable and without libFuzzer;
//! also the agreement corpus of `testdata/usage.raw/`. See docs/fuzzing.md.

use std::path::Path;

#[path = "../../fuzz/src/replay.rs"]
mod replay;
#[path = "../../fuzz/src/usage_raw.rs"]
mod usage_raw;

#[test]
fn usage_raw_fuzz_inputs_keep_the_property() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    replay::each_input(&replay::target_dirs(&fuzz, "usage_raw"), usage_raw::check);
}

#[test]
fn usage_raw_agreement_corpus_keeps_the_property() {
    let testdata = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/usage.raw");
    let dirs = ["valid", "invalid", "invalid-rust-only"].map(|kind| testdata.join(kind));
    replay::each_input(&dirs, usage_raw::check);
}

/// The float round trip of `usage.raw` (fuzz input `regressions/usage_raw/float-17-digits.json`)
/// depends on serde_json's `float_roundtrip` feature being a normal feature of this crate. The
/// test build always has it (the `jsonschema` dev-dependency enables it), so replaying the input
/// cannot catch its removal; the manifest can.
#[test]
fn serde_json_parses_floats_exactly_in_production_builds() {
    let manifest = include_str!("../Cargo.toml");
    let dependencies = manifest
        .split("[dependencies]")
        .nth(1)
        .and_then(|rest| rest.split("\n[").next())
        .expect("schemas/Cargo.toml has a [dependencies] table");
    let serde_json = dependencies
        .lines()
        .find(|line| line.starts_with("serde_json"))
        .expect("serde_json is a dependency");
    assert!(
        serde_json.contains("\"float_roundtrip\""),
        "serde_json must keep the float_roundtrip feature: {serde_json}"
    );
}
