//! Replays the committed inputs of the fuzz target `stripe_signature` (its seeds and every input
//! the fuzzer found) through the same property the target checks, on stable and without
//! libFuzzer. See docs/fuzzing.md.

use std::path::Path;

#[path = "../../fuzz/src/replay.rs"]
mod replay;
#[path = "../../fuzz/src/stripe_signature.rs"]
mod stripe_signature;

#[test]
fn stripe_signature_fuzz_inputs_keep_the_property() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    replay::each_input(
        &replay::target_dirs(&fuzz, "stripe_signature"),
        stripe_signature::check,
    );
}
