//! Replays the committed inputs of the fuzz target `ingest_event` (its seeds and every input the
//! fuzzer found) through the same property the target checks, on stable and without libFuzzer.
//! See docs/fuzzing.md.

use std::path::Path;

#[path = "../../fuzz/src/ingest_event.rs"]
mod ingest_event;
#[path = "../../fuzz/src/replay.rs"]
mod replay;

#[test]
fn ingest_event_fuzz_inputs_keep_the_property() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    replay::each_input(
        &replay::target_dirs(&fuzz, "ingest_event"),
        ingest_event::check,
    );
}
