//! Fuzz target `membership_doc`: see `cache_node_fuzz::membership_doc` for what it checks.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cache_node_fuzz::membership_doc(data));
