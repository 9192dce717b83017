//! Replays the committed inputs of the fuzz target `standin_form` (its seeds and every input the
//! fuzzer found) through the same property the target checks, on stable and without libFuzzer.
//! See docs/fuzzing.md.

use std::path::Path;

#[path = "../../../fuzz/src/replay.rs"]
mod replay;
#[path = "../../../fuzz/src/standin_form.rs"]
mod standin_form;

#[test]
fn standin_form_fuzz_inputs_keep_the_property() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    replay::each_input(
        &replay::target_dirs(&fuzz, "standin_form"),
        standin_form::check,
    );
}
