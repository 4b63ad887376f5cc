//! TURN (RFC 8656): the message codec shared by the relay server inside `tunnel signal` and the
//! client inside `tunnel serve` / `tunnel proxy`; the sans-IO server core (`server`) and the
//! rule of which peers it may relay to (`policy`).

pub mod client;
pub mod codec;
pub mod policy;
pub mod server;

/// The fuzz entry point (`fuzz/fuzz_targets/turn.rs`; its seed corpus is replayed by
/// `tests/fuzz_corpus.rs`): arbitrary bytes through the STUN/TURN decoders and through a TURN
/// server core. Panics only on a broken invariant.
pub fn fuzz_one(data: &[u8]) {
    codec::fuzz_decode(data);
    server::fuzz_drive(data);
}
