//! Fuzz target for the HTTP/1.1 message framing: `tunnel::http1::fuzz_one` on arbitrary bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tunnel::http1::fuzz_one(data));
