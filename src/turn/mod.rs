//! TURN (RFC 8656): the message codec shared by the relay server inside `tunnel signal` and the
//! client inside `tunnel serve` / `tunnel proxy`; the sans-IO server core (`server`) and the
//! rule of which peers it may relay to (`policy`).

pub mod codec;
pub mod policy;
pub mod server;
