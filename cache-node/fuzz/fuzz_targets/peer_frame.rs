//! Fuzz target `peer_frame`: see `cache_node_fuzz::peer_frame` for what it checks.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cache_node_fuzz::peer_frame(data));
