//! Fuzz target `snapshot_file`: see `cache_node_fuzz::snapshot_file` for what it checks.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cache_node_fuzz::snapshot_file(data));
