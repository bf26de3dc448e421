//! Fuzz target `key_path`: see `cache_node_fuzz::key_path` for what it checks.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cache_node_fuzz::key_path(data));
