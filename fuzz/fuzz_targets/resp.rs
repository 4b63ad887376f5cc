//! Fuzz target for the RESP2 parser of the cluster's Redis client: `tunnel::signal::redis::fuzz_one`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tunnel::signal::redis::fuzz_one(data));
