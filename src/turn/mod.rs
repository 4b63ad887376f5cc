//! TURN (RFC 8656): the message codec shared by the relay server inside `tunnel signal` and the
//! client inside `tunnel serve` / `tunnel proxy`.

pub mod codec;
