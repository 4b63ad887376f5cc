//! Tunnel framing v1 as the original client speaks it: one frame per binary data-channel message,
//! `[type: u8][stream_id: u32 BE][payload]`. Used by the serve and proxy halves (`crate::tunnel`).

use bytes::{BufMut, Bytes, BytesMut};

pub const HELLO: u8 = 1;
pub const AGREE: u8 = 2;
pub const PING: u8 = 3;
pub const PONG: u8 = 4;
pub const REQ_HEADERS: u8 = 10;
pub const REQ_BODY: u8 = 11;
pub const REQ_END: u8 = 12;
pub const RES_HEADERS: u8 = 20;
pub const RES_BODY: u8 = 21;
pub const RES_END: u8 = 22;
pub const ERROR: u8 = 99;

/// Largest body payload in one frame (frame ≤ 65 413 bytes).
pub const MAX_BODY: usize = 65_408;

/// One decoded frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub stream: u32,
    pub payload: Bytes,
}

/// Encodes a frame.
pub fn encode(kind: u8, stream: u32, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.put_u8(kind);
    b.put_u32(stream);
    b.put_slice(payload);
    b.freeze()
}

/// Decodes a frame; `None` when shorter than the 5-byte header.
pub fn decode(data: &Bytes) -> Option<Frame> {
    if data.len() < 5 {
        return None;
    }
    Some(Frame {
        kind: data[0],
        stream: u32::from_be_bytes([data[1], data[2], data[3], data[4]]),
        payload: data.slice(5..),
    })
}
