//! Replays every checked-in fuzz corpus file (`cache-node/fuzz/corpus/<target>/`)
//! through the very functions the fuzz targets call, on the stable toolchain,
//! so CI keeps checking them without nightly or libFuzzer. The harness file
//! is the fuzz crate's own `src/lib.rs`, included here as a module.
//!
//! A crash a fuzzing run finds goes into the target's corpus under a name
//! saying what it is, with a test named after it here (see
//! `cache-node/fuzz/README.md`): `peer_frame/answer_record_count_beyond_its_bytes`
//! (a record count of billions in a 114-byte frame, which made the decoder
//! reserve memory for them: an abort) is the first. Inputs for problems found by
//! review rather than by the fuzzer are seeded the same way, e.g.
//! `set_request/tags_flood_small` (thousands of tags past a small limit, the
//! shape of a body whose tags were once deduplicated in quadratic time; the
//! behaviour itself is tested in `api::request` and `hostile.rs`).

#[allow(dead_code)]
#[path = "../fuzz/src/lib.rs"]
mod harness;

use std::path::PathBuf;

/// Runs `target` on every file of `corpus/<name>`, naming the file that fails.
fn replay(name: &str, target: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(name);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} holds no corpus", dir.display());
    for file in &files {
        let data = std::fs::read(file).unwrap();
        if let Err(panic) = std::panic::catch_unwind(|| target(&data)) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            panic!("{} failed: {message}", file.display());
        }
    }
    eprintln!("{name}: {} corpus files replayed", files.len());
}

#[test]
fn set_request_corpus() {
    replay("set_request", harness::set_request);
}

#[test]
fn key_path_corpus() {
    replay("key_path", harness::key_path);
}

#[test]
fn membership_doc_corpus() {
    replay("membership_doc", harness::membership_doc);
}

#[test]
fn peer_frame_corpus() {
    replay("peer_frame", harness::peer_frame);
}

/// The first crash the fuzzer found (`peer_frame`, 2026-12-03): replayed on
/// its own, so its name says what broke if it ever comes back.
#[test]
fn peer_frame_record_count_beyond_its_bytes() {
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus/peer_frame/answer_record_count_beyond_its_bytes");
    let data = std::fs::read(&file).expect("the crash input is checked in");
    harness::peer_frame(&data);
}

#[test]
fn snapshot_file_corpus() {
    replay("snapshot_file", harness::snapshot_file);
}

/// The corpus holds real snapshots (written by a node), not only refusals:
/// the `valid_*` seeds read whole, the others are refused.
#[test]
fn snapshot_seeds_are_what_their_names_say() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/snapshot_file");
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let data = std::fs::read(&path).unwrap();
        let read = cache_node::snapshot::format::read(&data[..], |_| ());
        assert_eq!(
            read.is_ok(),
            name.starts_with("valid_"),
            "{name}: {:?}",
            read.err()
        );
    }
}
