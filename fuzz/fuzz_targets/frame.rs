//! Fuzz target for the tunnel frame codec: `tunnel::frame::fuzz_one` on arbitrary bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tunnel::frame::fuzz_one(data));
