//! The TURN message codec (RFC 8656 over RFC 8489 STUN): any STUN method and class with its
//! attributes, MESSAGE-INTEGRITY (HMAC-SHA1 with the long-term key MD5(user:realm:pass)),
//! FINGERPRINT, ChannelData framing, and the framing of both over a TCP stream. Sans-IO and
//! bounds-checked: every byte comes off the network. Used by the TURN server core
//! (`turn::server`) and the TURN client core (`turn::client`); the Binding-only codec of the STUN
//! responder stays in `crate::stun`.

use std::net::SocketAddr;

use md5::{Digest, Md5};

use crate::stun::{
    decode_address, encode_address, fingerprint, padded, StunError, TransactionId, MAGIC_COOKIE,
};

pub const HEADER_LEN: usize = 20;

pub const BINDING: u16 = 0x001;
pub const ALLOCATE: u16 = 0x003;
pub const REFRESH: u16 = 0x004;
pub const SEND: u16 = 0x006;
pub const DATA: u16 = 0x007;
pub const CREATE_PERMISSION: u16 = 0x008;
pub const CHANNEL_BIND: u16 = 0x009;

pub const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
pub const ATTR_USERNAME: u16 = 0x0006;
pub const ATTR_MESSAGE_INTEGRITY: u16 = 0x0008;
pub const ATTR_ERROR_CODE: u16 = 0x0009;
pub const ATTR_UNKNOWN_ATTRIBUTES: u16 = 0x000A;
pub const ATTR_CHANNEL_NUMBER: u16 = 0x000C;
pub const ATTR_LIFETIME: u16 = 0x000D;
pub const ATTR_XOR_PEER_ADDRESS: u16 = 0x0012;
pub const ATTR_DATA: u16 = 0x0013;
pub const ATTR_REALM: u16 = 0x0014;
pub const ATTR_NONCE: u16 = 0x0015;
pub const ATTR_XOR_RELAYED_ADDRESS: u16 = 0x0016;
pub const ATTR_REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
pub const ATTR_EVEN_PORT: u16 = 0x0018;
pub const ATTR_REQUESTED_TRANSPORT: u16 = 0x0019;
pub const ATTR_DONT_FRAGMENT: u16 = 0x001A;
pub const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
pub const ATTR_RESERVATION_TOKEN: u16 = 0x0022;
pub const ATTR_SOFTWARE: u16 = 0x8022;
pub const ATTR_FINGERPRINT: u16 = 0x8028;

/// REQUESTED-TRANSPORT value for UDP.
pub const TRANSPORT_UDP: u8 = 17;
/// Channel numbers a client may bind (RFC 8656 §12); a client should pick from these.
pub const CHANNEL_MIN: u16 = 0x4000;
pub const CHANNEL_MAX: u16 = 0x4FFF;
/// The older range of RFC 5766 (0x4000–0x7FFF), which libwebrtc and coturn's clients still
/// use: servers accept it, and ChannelData is recognised throughout it.
pub const CHANNEL_MAX_RFC5766: u16 = 0x7FFF;

/// The class of a STUN message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Request,
    Indication,
    Success,
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0b00,
            Class::Indication => 0b01,
            Class::Success => 0b10,
            Class::Error => 0b11,
        }
    }

    fn from_bits(bits: u16) -> Class {
        match bits {
            0b00 => Class::Request,
            0b01 => Class::Indication,
            0b10 => Class::Success,
            _ => Class::Error,
        }
    }
}

fn message_type(method: u16, class: Class) -> u16 {
    let c = class.bits();
    (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((c & 0b01) << 4)
        | ((c & 0b10) << 7)
}

/// One parsed STUN message; attribute values borrow from the datagram.
#[derive(Debug)]
pub struct Message<'a> {
    pub method: u16,
    pub class: Class,
    pub tid: TransactionId,
    attrs: Vec<(u16, &'a [u8])>,
    raw: &'a [u8],
    /// Offset of the MESSAGE-INTEGRITY attribute, if any.
    integrity_at: Option<usize>,
}

impl<'a> Message<'a> {
    /// Parses one whole STUN message (exactly `buf`). A FINGERPRINT, if present, must match;
    /// attributes after MESSAGE-INTEGRITY other than FINGERPRINT are ignored (RFC 8489 §14.5).
    pub fn parse(buf: &'a [u8]) -> Result<Message<'a>, StunError> {
        let head = buf.get(..HEADER_LEN).ok_or(StunError::Short)?;
        let kind = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let cookie = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        if kind & 0xC000 != 0
            || cookie != MAGIC_COOKIE
            || len % 4 != 0
            || HEADER_LEN + len != buf.len()
        {
            return Err(StunError::NotStun);
        }
        let method = (kind & 0x000F) | ((kind >> 1) & 0x0070) | ((kind >> 2) & 0x0F80);
        let class = Class::from_bits(((kind >> 4) & 0b01) | ((kind >> 7) & 0b10));
        let mut tid = [0u8; 12];
        tid.copy_from_slice(&head[8..20]);
        let mut attrs = Vec::new();
        let mut integrity_at = None;
        let mut pos = HEADER_LEN;
        while pos < buf.len() {
            let at = buf
                .get(pos..pos + 4)
                .ok_or(StunError::BadAttribute("header"))?;
            let t = u16::from_be_bytes([at[0], at[1]]);
            let l = usize::from(u16::from_be_bytes([at[2], at[3]]));
            let value = buf
                .get(pos + 4..pos + 4 + l)
                .ok_or(StunError::BadAttribute("length"))?;
            if t == ATTR_FINGERPRINT {
                let crc = <[u8; 4]>::try_from(value)
                    .map_err(|_| StunError::BadAttribute("FINGERPRINT"))?;
                // The CRC covers the message up to this attribute, with the header length as
                // it stands (FINGERPRINT is last).
                if pos + 8 != buf.len() || fingerprint(&buf[..pos]) != u32::from_be_bytes(crc) {
                    return Err(StunError::BadAttribute("FINGERPRINT"));
                }
                break;
            }
            if integrity_at.is_none() {
                if t == ATTR_MESSAGE_INTEGRITY {
                    integrity_at = Some(pos);
                }
                attrs.push((t, value));
            }
            pos += 4 + padded(l);
        }
        Ok(Message {
            method,
            class,
            tid,
            attrs,
            raw: buf,
            integrity_at,
        })
    }

    /// Every attribute up to and including MESSAGE-INTEGRITY, as (type, value), in order.
    pub fn attributes(&self) -> &[(u16, &'a [u8])] {
        &self.attrs
    }

    /// The first value of attribute `t`.
    pub fn attr(&self, t: u16) -> Option<&'a [u8]> {
        self.attrs.iter().find(|(k, _)| *k == t).map(|(_, v)| *v)
    }

    /// Comprehension-required attributes (0x0000–0x7FFF) this codec's users do not know.
    pub fn unknown_required(&self, known: &[u16]) -> Vec<u16> {
        self.attrs
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| *k < 0x8000 && !known.contains(k))
            .collect()
    }

    pub fn text(&self, t: u16) -> Option<&'a str> {
        self.attr(t).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// An XOR-…-ADDRESS attribute.
    pub fn xor_address(&self, t: u16) -> Option<SocketAddr> {
        self.attr(t)
            .and_then(|v| decode_address(v, Some(&self.tid)))
    }

    /// How many times attribute `t` occurs (before MESSAGE-INTEGRITY).
    pub fn attr_count(&self, t: u16) -> usize {
        self.attrs.iter().filter(|(k, _)| *k == t).count()
    }

    /// Every XOR-PEER-ADDRESS (CreatePermission may carry several).
    pub fn peer_addresses(&self) -> Vec<SocketAddr> {
        self.attrs
            .iter()
            .filter(|(k, _)| *k == ATTR_XOR_PEER_ADDRESS)
            .filter_map(|(_, v)| decode_address(v, Some(&self.tid)))
            .collect()
    }

    pub fn u32_attr(&self, t: u16) -> Option<u32> {
        let v = <[u8; 4]>::try_from(self.attr(t)?).ok()?;
        Some(u32::from_be_bytes(v))
    }

    /// CHANNEL-NUMBER's number.
    pub fn channel(&self) -> Option<u16> {
        let v = self.attr(ATTR_CHANNEL_NUMBER)?;
        Some(u16::from_be_bytes([*v.first()?, *v.get(1)?]))
    }

    /// ERROR-CODE as (code, reason).
    pub fn error(&self) -> Option<(u16, String)> {
        let v = self.attr(ATTR_ERROR_CODE)?;
        let class = u16::from(*v.get(2)? & 0x07);
        let number = u16::from(*v.get(3)?);
        let reason = String::from_utf8_lossy(v.get(4..).unwrap_or_default()).into_owned();
        Some((class * 100 + number, reason))
    }

    pub fn has_integrity(&self) -> bool {
        self.integrity_at.is_some()
    }

    /// Checks MESSAGE-INTEGRITY with `key` (constant-time comparison).
    pub fn check_integrity(&self, key: &[u8]) -> bool {
        let Some(at) = self.integrity_at else {
            return false;
        };
        let Some(value) = self.raw.get(at + 4..at + 24) else {
            return false;
        };
        let mut covered = self.raw[..at].to_vec();
        // The length field as if MESSAGE-INTEGRITY ended the message.
        let len = u16::try_from(at + 24 - HEADER_LEN).unwrap_or(u16::MAX);
        covered[2..4].copy_from_slice(&len.to_be_bytes());
        let mac = crate::util::hmac_sha1(key, &covered);
        constant_time_eq(&mac, value)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Builds one message.
pub struct Builder {
    buf: Vec<u8>,
    tid: TransactionId,
}

impl Builder {
    pub fn new(method: u16, class: Class, tid: TransactionId) -> Builder {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&message_type(method, class).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(&tid);
        Builder { buf, tid }
    }

    /// Appends an attribute (values longer than 0xFFFF bytes are cut, which no caller sends)
    /// and its padding.
    pub fn attr(mut self, t: u16, value: &[u8]) -> Builder {
        let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&t.to_be_bytes());
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(&value[..usize::from(len)]);
        let pad = padded(usize::from(len)) - usize::from(len);
        self.buf.extend(std::iter::repeat_n(0u8, pad));
        self.set_length(self.buf.len() - HEADER_LEN);
        self
    }

    pub fn xor_address(self, t: u16, addr: SocketAddr) -> Builder {
        let tid = self.tid;
        self.attr(t, &encode_address(addr, Some(&tid)))
    }

    pub fn u32_attr(self, t: u16, v: u32) -> Builder {
        self.attr(t, &v.to_be_bytes())
    }

    pub fn channel(self, number: u16) -> Builder {
        let b = number.to_be_bytes();
        self.attr(ATTR_CHANNEL_NUMBER, &[b[0], b[1], 0, 0])
    }

    pub fn error(self, code: u16, reason: &str) -> Builder {
        let mut v = vec![0, 0, (code / 100) as u8, (code % 100) as u8];
        v.extend_from_slice(reason.as_bytes());
        self.attr(ATTR_ERROR_CODE, &v)
    }

    pub fn software(self) -> Builder {
        self.attr(ATTR_SOFTWARE, b"tunnel")
    }

    /// Appends MESSAGE-INTEGRITY computed with `key`.
    pub fn integrity(mut self, key: &[u8]) -> Builder {
        self.set_length(self.buf.len() + 24 - HEADER_LEN);
        let mac = crate::util::hmac_sha1(key, &self.buf);
        self.attr(ATTR_MESSAGE_INTEGRITY, &mac)
    }

    /// Appends FINGERPRINT and returns the message.
    pub fn finish(mut self) -> Vec<u8> {
        self.set_length(self.buf.len() + 8 - HEADER_LEN);
        let crc = fingerprint(&self.buf);
        self.buf.extend_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
        self.buf.extend_from_slice(&4u16.to_be_bytes());
        self.buf.extend_from_slice(&crc.to_be_bytes());
        self.buf
    }

    /// Returns the message without FINGERPRINT.
    pub fn finish_plain(self) -> Vec<u8> {
        self.buf
    }

    fn set_length(&mut self, len: usize) {
        let len = u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes();
        self.buf[2..4].copy_from_slice(&len);
    }
}

/// The long-term credential key: MD5(username ":" realm ":" password).
pub fn long_term_key(username: &str, realm: &str, password: &str) -> [u8; 16] {
    let mut h = Md5::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
    h.finalize().into()
}

/// Whether `buf` starts like a ChannelData message (first two bits 01).
pub fn is_channel_data(buf: &[u8]) -> bool {
    buf.first().is_some_and(|b| (0x40..=0x7F).contains(b))
}

/// A ChannelData message: (channel, data). Over UDP the datagram may carry padding after the
/// data; a length past the end is an error.
pub fn parse_channel_data(buf: &[u8]) -> Option<(u16, &[u8])> {
    let head = buf.get(..4)?;
    let channel = u16::from_be_bytes([head[0], head[1]]);
    if !(CHANNEL_MIN..=CHANNEL_MAX_RFC5766).contains(&channel) {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    Some((channel, buf.get(4..4 + len)?))
}

/// Appends a ChannelData message, padded to a multiple of 4 (required over TCP, harmless over
/// UDP).
pub fn channel_data(out: &mut Vec<u8>, channel: u16, data: &[u8]) {
    let len = u16::try_from(data.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&data[..usize::from(len)]);
    out.extend(std::iter::repeat_n(
        0u8,
        padded(usize::from(len)) - usize::from(len),
    ));
}

/// Over a TCP stream: the length of the next whole message at the start of `buf` (STUN or
/// ChannelData with its padding), `Ok(None)` if more bytes are needed, `Err` if the stream is
/// not TURN.
pub fn stream_frame_len(buf: &[u8]) -> Result<Option<usize>, StunError> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    let total = match head[0] {
        0x00 | 0x01 if len % 4 == 0 => HEADER_LEN + len,
        0x40..=0x7F => 4 + padded(len),
        _ => return Err(StunError::NotStun),
    };
    if head[0] < 0x40 {
        if let Some(cookie) = buf.get(4..8) {
            if cookie != MAGIC_COOKIE.to_be_bytes() {
                return Err(StunError::NotStun);
            }
        }
    }
    Ok((buf.len() >= total).then_some(total))
}

/// The decoders' half of the TURN fuzz entry point (`turn::fuzz_one`): never panics, and what
/// decodes re-encodes to the same thing.
pub fn fuzz_decode(data: &[u8]) {
    let _ = crate::stun::binding_response(data, SocketAddr::from(([192, 0, 2, 1], 9)));
    if let Ok(Some(len)) = stream_frame_len(data) {
        assert!(len <= data.len(), "a frame longer than its input");
    }
    if let Some((channel, payload)) = parse_channel_data(data) {
        let mut again = Vec::new();
        channel_data(&mut again, channel, payload);
        assert_eq!(parse_channel_data(&again), Some((channel, payload)));
    }
    let Ok(m) = Message::parse(data) else {
        return;
    };
    let _ = (
        m.channel(),
        m.error(),
        m.peer_addresses(),
        m.unknown_required(&[]),
    );
    for t in [
        ATTR_XOR_PEER_ADDRESS,
        ATTR_XOR_RELAYED_ADDRESS,
        ATTR_XOR_MAPPED_ADDRESS,
    ] {
        let _ = m.xor_address(t);
    }
    let _ = (m.u32_attr(ATTR_LIFETIME), m.text(ATTR_USERNAME));
    let _ = m.check_integrity(b"fuzz");
    // Re-encoded (without MESSAGE-INTEGRITY), it parses to the same message.
    if data.len() > 60_000 {
        return;
    }
    let kept: Vec<(u16, &[u8])> = m
        .attributes()
        .iter()
        .copied()
        .filter(|(t, _)| *t != ATTR_MESSAGE_INTEGRITY)
        .collect();
    let mut b = Builder::new(m.method, m.class, m.tid);
    for (t, v) in &kept {
        b = b.attr(*t, v);
    }
    let bytes = b.finish();
    let again = match Message::parse(&bytes) {
        Ok(again) => again,
        Err(e) => panic!("a re-encoded message does not parse: {e}"),
    };
    assert_eq!(
        (again.method, again.class, again.tid),
        (m.method, m.class, m.tid)
    );
    assert_eq!(again.attributes(), &kept[..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tid() -> TransactionId {
        [7; 12]
    }

    #[test]
    fn round_trip_with_integrity_and_fingerprint() {
        let key = long_term_key("user", "realm", "pass");
        let peer: SocketAddr = "192.0.2.7:4567".parse().unwrap();
        let msg = Builder::new(CREATE_PERMISSION, Class::Request, tid())
            .attr(ATTR_USERNAME, b"user")
            .attr(ATTR_REALM, b"realm")
            .attr(ATTR_NONCE, b"n0nce")
            .xor_address(ATTR_XOR_PEER_ADDRESS, peer)
            .xor_address(ATTR_XOR_PEER_ADDRESS, "[2001:db8::1]:9".parse().unwrap())
            .integrity(&key)
            .finish();
        let m = Message::parse(&msg).unwrap();
        assert_eq!((m.method, m.class), (CREATE_PERMISSION, Class::Request));
        assert_eq!(m.text(ATTR_USERNAME), Some("user"));
        assert_eq!(m.peer_addresses().len(), 2);
        assert_eq!(m.xor_address(ATTR_XOR_PEER_ADDRESS), Some(peer));
        assert!(m.check_integrity(&key));
        assert!(!m.check_integrity(&long_term_key("user", "realm", "wrong")));
        let mut bad = msg.clone();
        bad[30] ^= 1;
        assert!(
            Message::parse(&bad).is_err(),
            "fingerprint catches the flip"
        );
    }

    #[test]
    fn rfc_5769_integrity_vector() {
        // RFC 5769 §2.1: the sample request and its short-term key.
        let text = "00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
             80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
             00 24 00 04 6e 00 01 ff 80 29 00 08 93 2f f9 b1 51 26 3b 36
             00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
             00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
             80 28 00 04 e5 7a 3b cf";
        let hex: String = text.split_whitespace().collect();
        let bytes = crate::util::unhex(&hex).unwrap();
        let m = Message::parse(&bytes).unwrap();
        assert_eq!((m.method, m.class), (BINDING, Class::Request));
        assert_eq!(m.text(ATTR_USERNAME), Some("evtj:h6vY"));
        assert!(m.check_integrity(b"VOkJxbRl1RmTxUk/WvJxBt"));
        assert!(!m.check_integrity(b"VOkJxbRl1RmTxUk/WvJxBu"));
    }

    #[test]
    fn errors_and_channels() {
        let m = Builder::new(ALLOCATE, Class::Error, tid())
            .error(401, "Unauthorized")
            .finish();
        let m = Message::parse(&m).unwrap();
        assert_eq!(m.class, Class::Error);
        assert_eq!(m.error(), Some((401, "Unauthorized".into())));
        let mut out = Vec::new();
        channel_data(&mut out, 0x4001, b"abcde");
        assert_eq!(out.len(), 12);
        assert!(is_channel_data(&out));
        assert_eq!(parse_channel_data(&out), Some((0x4001, &b"abcde"[..])));
        assert_eq!(
            parse_channel_data(&[0x63, 0xFB, 0, 0]),
            Some((0x63FB, &[][..]))
        );
        assert_eq!(parse_channel_data(&[0x80, 0, 0, 0]), None);
        assert_eq!(parse_channel_data(&[0x40, 0, 0, 9, 1]), None);
    }

    #[test]
    fn stream_framing() {
        let msg = Builder::new(BINDING, Class::Request, tid()).finish();
        assert_eq!(stream_frame_len(&msg[..3]), Ok(None));
        assert_eq!(stream_frame_len(&msg[..10]), Ok(None));
        assert_eq!(stream_frame_len(&msg), Ok(Some(msg.len())));
        let mut cd = Vec::new();
        channel_data(&mut cd, 0x4000, b"xyz");
        assert_eq!(stream_frame_len(&cd), Ok(Some(8)));
        // A TLS ClientHello is not TURN (HTTP text is not told apart: its first letters fall in
        // RFC 5766's channel range, which is why the server tells TURN by its first byte only).
        assert!(stream_frame_len(b"\x16\x03\x01\x02\x00").is_err());
        assert!(stream_frame_len(b"\x80\x00\x00\x00").is_err());
        assert!(stream_frame_len(b"\x00\x01\x00\x00nope").is_err());
    }

    #[test]
    fn garbage_never_panics() {
        for len in 0..64 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + len) as u8).collect();
            let _ = Message::parse(&data);
            let _ = parse_channel_data(&data);
            let _ = stream_frame_len(&data);
        }
    }
}
