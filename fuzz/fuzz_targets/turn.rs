//! Fuzz target for the TURN/STUN decoders and the TURN server core: `tunnel::turn::fuzz_one`
//! on arbitrary bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| tunnel::turn::fuzz_one(data));
