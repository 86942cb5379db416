//! The committed fuzz corpus (`crate/fuzz/corpus/<target>/`: the seeds and what `cargo fuzz` kept)
//! replayed through the fuzz targets' own bodies (`crate/fuzz/targets.rs`) on stable: every input
//! must come back with a value or a typed error, never a panic. The fuzzing itself needs nightly
//! (`cargo +nightly fuzz run <target>` from `crate/`); this keeps what it found in CI.

use std::path::Path;

#[path = "../../crate/fuzz/targets.rs"]
mod targets;

#[test]
fn fuzz_corpus_replays_without_panics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crate/fuzz/corpus");
    for (name, target) in targets::TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no corpus for the {name} target");
        for file in &files {
            let data = std::fs::read(file).unwrap();
            if std::panic::catch_unwind(|| target(&data)).is_err() {
                panic!("the {name} target panicked on {}", file.display());
            }
        }
        eprintln!("{name}: {} inputs", files.len());
    }
}
