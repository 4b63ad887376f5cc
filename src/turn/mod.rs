//! TURN (RFC 8656): the message codec shared by the relay server inside `tunnel signal` and the
//! client inside `tunnel serve` / `tunnel proxy`, and that client's sans-IO core.

pub mod client;
pub mod codec;
