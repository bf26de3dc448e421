//! Fuzz target `set_request`: see `cache_node_fuzz::set_request` for what it checks.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cache_node_fuzz::set_request(data));
