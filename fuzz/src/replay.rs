//! Replays committed fuzz inputs through a property: the bridge between `cargo fuzz` and the
//! normal `cargo test --workspace`, which has no libFuzzer. Included by path in each crate's
//! `tests/fuzz_regressions.rs`.

use std::path::{Path, PathBuf};

/// `<fuzz_dir>/seeds/<target>/` and `<fuzz_dir>/regressions/<target>/`: the committed inputs of
/// a target (`fuzz_dir` is the repository's `fuzz/`).
pub fn target_dirs(fuzz_dir: &Path, target: &str) -> Vec<PathBuf> {
    ["seeds", "regressions"]
        .iter()
        .map(|kind| fuzz_dir.join(kind).join(target))
        .collect()
}

/// Runs `check` on every file directly inside `dirs` (missing folders count as empty) and
/// returns how many there were. A failing input is named in the panic, so a regression points
/// at its file. Panics when there is no input at all: a moved folder must not pass silently.
pub fn each_input(dirs: &[PathBuf], check: fn(&[u8])) -> usize {
    let mut files: Vec<PathBuf> = dirs
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flat_map(|entries| entries.map(|entry| entry.expect("read fuzz input dir").path()))
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fuzz inputs in {dirs:?}");
    for path in &files {
        let data = std::fs::read(path).expect("read fuzz input");
        if let Err(cause) = std::panic::catch_unwind(|| check(&data)) {
            let message = cause
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| cause.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            panic!("{} fails: {message}", path.display());
        }
    }
    files.len()
}
