//! Sans-IO STUN Binding codec (RFC 5389 / RFC 8489).
//!
//! Two users: the signal server's UDP STUN responder, which calls [`is_stun`] to pick STUN out of
//! the datagrams it receives and [`binding_response`] to answer Binding requests with the
//! sender's reflexive address; and the peer's STUN client, which sends [`binding_request`] and
//! reads the answer with [`parse_binding_response`]. Only the Binding method is spoken; no
//! authentication (MESSAGE-INTEGRITY is neither checked nor produced). Every parser is
//! bounds-checked: the bytes come straight off the network.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The fixed value in bytes 4..8 of every RFC 5389 message.
pub const MAGIC_COOKIE: u32 = 0x2112A442;

/// The 96-bit transaction id that pairs a response with its request.
pub type TransactionId = [u8; 12];

/// Why a datagram could not be read as the STUN message it was expected to be.
#[derive(Debug, PartialEq)]
pub enum StunError {
    /// Shorter than a STUN header.
    Short,
    /// Not a STUN message: wrong leading bits, magic cookie or length.
    NotStun,
    /// A STUN message whose named attribute is malformed, misplaced or missing.
    BadAttribute(&'static str),
}

impl fmt::Display for StunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StunError::Short => f.write_str("STUN message too short"),
            StunError::NotStun => f.write_str("not a STUN message"),
            StunError::BadAttribute(name) => write!(f, "bad STUN attribute {name}"),
        }
    }
}

impl std::error::Error for StunError {}

const HEADER_LEN: usize = 20;
const BINDING: u16 = 0x001;

const CLASS_REQUEST: u8 = 0b00;
const CLASS_SUCCESS: u8 = 0b10;
const CLASS_ERROR: u8 = 0b11;

const ATTR_MAPPED_ADDRESS: u16 = 0x0001;
const ATTR_CHANGE_REQUEST: u16 = 0x0003;
const ATTR_USERNAME: u16 = 0x0006;
const ATTR_MESSAGE_INTEGRITY: u16 = 0x0008;
const ATTR_ERROR_CODE: u16 = 0x0009;
const ATTR_UNKNOWN_ATTRIBUTES: u16 = 0x000A;
const ATTR_REALM: u16 = 0x0014;
const ATTR_NONCE: u16 = 0x0015;
const ATTR_MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
const ATTR_PASSWORD_ALGORITHM: u16 = 0x001D;
const ATTR_USERHASH: u16 = 0x001E;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_PRIORITY: u16 = 0x0024;
const ATTR_USE_CANDIDATE: u16 = 0x0025;
const ATTR_SOFTWARE: u16 = 0x8022;
const ATTR_FINGERPRINT: u16 = 0x8028;

/// Comprehension-required attributes (type < 0x8000) a Binding request may carry that this
/// responder understands well enough to ignore. Any other one earns a 420 error response.
const KNOWN_REQUIRED: &[u16] = &[
    ATTR_MAPPED_ADDRESS,
    ATTR_CHANGE_REQUEST,
    ATTR_USERNAME,
    ATTR_MESSAGE_INTEGRITY,
    ATTR_ERROR_CODE,
    ATTR_UNKNOWN_ATTRIBUTES,
    ATTR_REALM,
    ATTR_NONCE,
    ATTR_MESSAGE_INTEGRITY_SHA256,
    ATTR_PASSWORD_ALGORITHM,
    ATTR_USERHASH,
    ATTR_XOR_MAPPED_ADDRESS,
    ATTR_PRIORITY,
    ATTR_USE_CANDIDATE,
];

const FINGERPRINT_XOR: u32 = 0x5354_554e;
const SOFTWARE: &[u8] = b"tunnel";

/// True when `buf` looks like a STUN message (first two bits 0, magic cookie, length fits): lets
/// a UDP socket that also carries other traffic tell STUN packets apart.
pub fn is_stun(buf: &[u8]) -> bool {
    header(buf).is_ok()
}

/// If `request` is a valid Binding request (class request, method 0x001), the bytes of the
/// Binding success response telling `source` its address: XOR-MAPPED-ADDRESS + MAPPED-ADDRESS +
/// SOFTWARE "tunnel" + FINGERPRINT.
///
/// Unknown comprehension-optional attributes are ignored; FINGERPRINT / MESSAGE-INTEGRITY on
/// input are ignored. A request carrying an unknown comprehension-required attribute gets a 420
/// (Unknown Attribute) error response listing them, as RFC 8489 §6.3.1 asks.
/// `Ok(None)` for STUN messages that are not Binding requests (indications, responses) —
/// nothing to send.
pub fn binding_response(request: &[u8], source: SocketAddr) -> Result<Option<Vec<u8>>, StunError> {
    let msg = Message::parse(request)?;
    if msg.method != BINDING || msg.class != CLASS_REQUEST {
        return Ok(None);
    }
    let mut unknown = Vec::new();
    for attr in msg.attributes() {
        let (kind, _) = attr?;
        if kind < 0x8000 && !KNOWN_REQUIRED.contains(&kind) && !unknown.contains(&kind) {
            unknown.push(kind);
        }
    }
    if !unknown.is_empty() {
        let mut out = Writer::new(CLASS_ERROR, &msg.tid);
        let reason = b"Unknown Attribute";
        let mut code = vec![0, 0, 4, 20];
        code.extend_from_slice(reason);
        out.attribute(ATTR_ERROR_CODE, &code);
        let list: Vec<u8> = unknown.iter().flat_map(|t| t.to_be_bytes()).collect();
        out.attribute(ATTR_UNKNOWN_ATTRIBUTES, &list);
        out.attribute(ATTR_SOFTWARE, SOFTWARE);
        return Ok(Some(out.finish()));
    }
    // A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; they spoke IPv4, so say IPv4.
    let source = match source {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => source,
        },
        SocketAddr::V4(_) => source,
    };
    let mut out = Writer::new(CLASS_SUCCESS, &msg.tid);
    out.attribute(
        ATTR_XOR_MAPPED_ADDRESS,
        &encode_address(source, Some(&msg.tid)),
    );
    out.attribute(ATTR_MAPPED_ADDRESS, &encode_address(source, None));
    out.attribute(ATTR_SOFTWARE, SOFTWARE);
    Ok(Some(out.finish()))
}

/// A Binding request with the given transaction id (FINGERPRINT only).
pub fn binding_request(tid: &TransactionId) -> Vec<u8> {
    Writer::new(CLASS_REQUEST, tid).finish()
}

/// Parses a Binding success response for `tid`: the XOR-MAPPED-ADDRESS (falling back to
/// MAPPED-ADDRESS). `Ok(None)` if it's a STUN message for another transaction or class.
///
/// A FINGERPRINT, when present, must be last and must match. MESSAGE-INTEGRITY is not checked;
/// address attributes after it are ignored, as RFC 8489 §14.5 requires.
pub fn parse_binding_response(
    buf: &[u8],
    tid: &TransactionId,
) -> Result<Option<SocketAddr>, StunError> {
    let msg = Message::parse(buf)?;
    if msg.method != BINDING || msg.class != CLASS_SUCCESS || msg.tid != *tid {
        return Ok(None);
    }
    let mut xor_mapped = None;
    let mut mapped = None;
    let mut after_integrity = false;
    let mut offset = HEADER_LEN;
    for attr in msg.attributes() {
        let (kind, value) = attr?;
        match kind {
            ATTR_FINGERPRINT => {
                let expected = value
                    .try_into()
                    .map(u32::from_be_bytes)
                    .map_err(|_| StunError::BadAttribute("FINGERPRINT"))?;
                let covered = buf
                    .get(..offset)
                    .ok_or(StunError::BadAttribute("FINGERPRINT"))?;
                if fingerprint(covered) != expected {
                    return Err(StunError::BadAttribute("FINGERPRINT"));
                }
            }
            ATTR_MESSAGE_INTEGRITY | ATTR_MESSAGE_INTEGRITY_SHA256 => after_integrity = true,
            ATTR_XOR_MAPPED_ADDRESS if !after_integrity && xor_mapped.is_none() => {
                xor_mapped = Some(
                    decode_address(value, Some(tid))
                        .ok_or(StunError::BadAttribute("XOR-MAPPED-ADDRESS"))?,
                );
            }
            ATTR_MAPPED_ADDRESS if !after_integrity && mapped.is_none() => {
                mapped = Some(
                    decode_address(value, None).ok_or(StunError::BadAttribute("MAPPED-ADDRESS"))?,
                );
            }
            _ => {}
        }
        offset += 4 + padded(value.len());
    }
    xor_mapped
        .or(mapped)
        .map(Some)
        .ok_or(StunError::BadAttribute("XOR-MAPPED-ADDRESS"))
}

/// A fresh random transaction id.
pub fn new_transaction_id() -> TransactionId {
    let mut tid = [0; 12];
    crate::util::random_bytes(&mut tid);
    tid
}

/// A header-checked STUN message: method, class, transaction id and the attribute bytes.
struct Message<'a> {
    method: u16,
    class: u8,
    tid: TransactionId,
    body: &'a [u8],
}

impl<'a> Message<'a> {
    fn parse(buf: &'a [u8]) -> Result<Self, StunError> {
        let kind = header(buf)?;
        let tid = buf
            .get(8..HEADER_LEN)
            .and_then(|t| t.try_into().ok())
            .ok_or(StunError::Short)?;
        let body = buf.get(HEADER_LEN..).ok_or(StunError::Short)?;
        let method = (kind & 0x000F) | ((kind >> 1) & 0x0070) | ((kind >> 2) & 0x0F80);
        let class = (((kind >> 7) & 0b10) | ((kind >> 4) & 0b01)) as u8;
        Ok(Message {
            method,
            class,
            tid,
            body,
        })
    }

    /// The attributes as (type, value without padding), in order; an error for one that runs
    /// past the end of the message or follows a FINGERPRINT.
    fn attributes(&self) -> Attributes<'a> {
        Attributes {
            rest: self.body,
            after_fingerprint: false,
        }
    }
}

struct Attributes<'a> {
    rest: &'a [u8],
    after_fingerprint: bool,
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Result<(u16, &'a [u8]), StunError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let parsed = self.split();
        if parsed.is_err() {
            self.rest = &[];
        }
        Some(parsed)
    }
}

impl<'a> Attributes<'a> {
    fn split(&mut self) -> Result<(u16, &'a [u8]), StunError> {
        if self.after_fingerprint {
            return Err(StunError::BadAttribute("FINGERPRINT"));
        }
        let (head, rest) = self
            .rest
            .split_at_checked(4)
            .ok_or(StunError::BadAttribute("header"))?;
        let kind = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let value = rest.get(..len).ok_or(StunError::BadAttribute("length"))?;
        self.rest = rest.get(padded(len)..).unwrap_or(&[]);
        self.after_fingerprint = kind == ATTR_FINGERPRINT;
        Ok((kind, value))
    }
}

/// Checks the fixed header and returns the message type.
fn header(buf: &[u8]) -> Result<u16, StunError> {
    let head = buf.get(..HEADER_LEN).ok_or(StunError::Short)?;
    let kind = u16::from_be_bytes([head[0], head[1]]);
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    let cookie = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    if kind & 0xC000 != 0 || cookie != MAGIC_COOKIE || len % 4 != 0 || HEADER_LEN + len != buf.len()
    {
        return Err(StunError::NotStun);
    }
    Ok(kind)
}

/// Builds one message: header, attributes, then FINGERPRINT on `finish`.
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn new(class: u8, tid: &TransactionId) -> Self {
        let class = u16::from(class);
        let kind = (BINDING & 0x000F)
            | ((BINDING & 0x0070) << 1)
            | ((BINDING & 0x0F80) << 2)
            | ((class & 0b01) << 4)
            | ((class & 0b10) << 7);
        let mut buf = Vec::with_capacity(80);
        buf.extend_from_slice(&kind.to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(tid);
        Writer { buf }
    }

    /// Appends an attribute (at most 0xFFFF bytes, which every caller here is far below) and
    /// its zero padding, and updates the header length.
    fn attribute(&mut self, kind: u16, value: &[u8]) {
        let len = u16::try_from(value.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&kind.to_be_bytes());
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(&value[..usize::from(len)]);
        self.buf
            .resize(self.buf.len() + padded(value.len()) - value.len(), 0);
        self.set_length(self.buf.len() - HEADER_LEN);
    }

    fn set_length(&mut self, len: usize) {
        let len = u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes();
        self.buf[2..4].copy_from_slice(&len);
    }

    fn finish(mut self) -> Vec<u8> {
        // The length covers the FINGERPRINT attribute before the CRC is taken.
        self.set_length(self.buf.len() + 8 - HEADER_LEN);
        let crc = fingerprint(&self.buf);
        self.buf.extend_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
        self.buf.extend_from_slice(&4u16.to_be_bytes());
        self.buf.extend_from_slice(&crc.to_be_bytes());
        self.buf
    }
}

pub(crate) fn padded(len: usize) -> usize {
    (len + 3) & !3
}

/// The value of (XOR-)MAPPED-ADDRESS: 0, family, port, address; XORed with the cookie (and the
/// transaction id for IPv6) when `xor` holds the transaction id.
pub(crate) fn encode_address(addr: SocketAddr, xor: Option<&TransactionId>) -> Vec<u8> {
    let mut mask = [0u8; 16];
    if let Some(tid) = xor {
        mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        mask[4..].copy_from_slice(tid);
    }
    let port = addr.port() ^ u16::from_be_bytes([mask[0], mask[1]]);
    let (family, ip): (u8, Vec<u8>) = match addr.ip() {
        IpAddr::V4(v4) => (1, v4.octets().to_vec()),
        IpAddr::V6(v6) => (2, v6.octets().to_vec()),
    };
    let mut out = vec![0, family];
    out.extend_from_slice(&port.to_be_bytes());
    out.extend(ip.iter().zip(mask).map(|(b, m)| b ^ m));
    out
}

pub(crate) fn decode_address(value: &[u8], xor: Option<&TransactionId>) -> Option<SocketAddr> {
    let mut mask = [0u8; 16];
    if let Some(tid) = xor {
        mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        mask[4..].copy_from_slice(tid);
    }
    let (head, ip) = value.split_at_checked(4)?;
    let port = u16::from_be_bytes([head[2], head[3]]) ^ u16::from_be_bytes([mask[0], mask[1]]);
    let ip = match (head[1], ip.len()) {
        (1, 4) => {
            let mut o = [0u8; 4];
            o.iter_mut()
                .zip(ip.iter().zip(mask))
                .for_each(|(o, (b, m))| *o = b ^ m);
            IpAddr::V4(Ipv4Addr::from(o))
        }
        (2, 16) => {
            let mut o = [0u8; 16];
            o.iter_mut()
                .zip(ip.iter().zip(mask))
                .for_each(|(o, (b, m))| *o = b ^ m);
            IpAddr::V6(Ipv6Addr::from(o))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// CRC-32 (ISO HDLC, as in zlib) of `data`, XORed with 0x5354554e.
pub(crate) fn fingerprint(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc = CRC_TABLE[usize::from((crc as u8) ^ byte)] ^ (crc >> 8);
    }
    !crc ^ FINGERPRINT_XOR
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        text.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    const RFC_TID: TransactionId = [
        0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
    ];

    /// RFC 5769 §2.1.
    fn sample_request() -> Vec<u8> {
        hex("00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
             80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
             00 24 00 04 6e 00 01 ff
             80 29 00 08 93 2f f9 b1 51 26 3b 36
             00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
             00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
             80 28 00 04 e5 7a 3b cf")
    }

    /// RFC 5769 §2.2.
    fn sample_v4_response() -> Vec<u8> {
        hex("01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
             80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
             00 20 00 08 00 01 a1 47 e1 12 a6 43
             00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
             80 28 00 04 c0 7d 4c 96")
    }

    /// RFC 5769 §2.3.
    fn sample_v6_response() -> Vec<u8> {
        hex("01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
             80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
             00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
             00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
             80 28 00 04 c8 fb 0b 4c")
    }

    /// The stored FINGERPRINT value equals our CRC over everything before it.
    fn check_fingerprint(msg: &[u8]) {
        let (covered, attr) = msg.split_at(msg.len() - 8);
        assert_eq!(&attr[..4], &[0x80, 0x28, 0, 4]);
        assert_eq!(
            fingerprint(covered),
            u32::from_be_bytes(attr[4..].try_into().unwrap())
        );
    }

    fn v4() -> SocketAddr {
        "192.0.2.1:32853".parse().unwrap()
    }

    fn v6() -> SocketAddr {
        "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
            .parse()
            .unwrap()
    }

    #[test]
    fn crc_matches_zlib_check_value() {
        assert_eq!(fingerprint(b"123456789") ^ FINGERPRINT_XOR, 0xCBF4_3926);
    }

    #[test]
    fn fingerprint_matches_rfc_5769_vectors() {
        check_fingerprint(&sample_request());
        check_fingerprint(&sample_v4_response());
        check_fingerprint(&sample_v6_response());
    }

    #[test]
    fn answers_the_rfc_sample_request() {
        let request = sample_request();
        assert!(is_stun(&request));
        let response = binding_response(&request, v4()).unwrap().unwrap();
        assert!(is_stun(&response));
        assert_eq!(&response[..2], &[0x01, 0x01]);
        assert_eq!(&response[8..20], &RFC_TID);
        check_fingerprint(&response);
        // Byte for byte what RFC 5769 §2.2 sends for this address.
        assert_eq!(
            &response[20..32],
            &hex("00 20 00 08 00 01 a1 47 e1 12 a6 43")[..]
        );
        assert_eq!(
            &response[32..44],
            &hex("00 01 00 08 00 01 80 55 c0 00 02 01")[..]
        );
        assert_eq!(
            &response[44..56],
            &hex("80 22 00 06 74 75 6e 6e 65 6c 00 00")[..]
        );
        assert_eq!(response.len(), 64);
        assert_eq!(parse_binding_response(&response, &RFC_TID), Ok(Some(v4())));
    }

    #[test]
    fn parses_the_rfc_v4_response() {
        assert_eq!(
            parse_binding_response(&sample_v4_response(), &RFC_TID),
            Ok(Some(v4()))
        );
    }

    #[test]
    fn parses_the_rfc_v6_response() {
        assert_eq!(
            parse_binding_response(&sample_v6_response(), &RFC_TID),
            Ok(Some(v6()))
        );
    }

    #[test]
    fn other_transactions_and_classes_are_not_ours() {
        let mut other = RFC_TID;
        other[0] ^= 1;
        assert_eq!(
            parse_binding_response(&sample_v4_response(), &other),
            Ok(None)
        );
        assert_eq!(
            parse_binding_response(&sample_request(), &RFC_TID),
            Ok(None)
        );
        assert_eq!(binding_response(&sample_v4_response(), v4()), Ok(None));
        // A Binding indication (type 0x0011) gets no answer.
        let mut indication = binding_request(&RFC_TID);
        indication[1] = 0x11;
        assert_eq!(binding_response(&indication, v4()), Ok(None));
    }

    #[test]
    fn corrupted_fingerprint_is_rejected() {
        let mut response = sample_v4_response();
        let last = response.len() - 1;
        response[last] ^= 1;
        assert_eq!(
            parse_binding_response(&response, &RFC_TID),
            Err(StunError::BadAttribute("FINGERPRINT"))
        );
    }

    #[test]
    fn round_trips_v4_and_v6() {
        for addr in [
            v4(),
            v6(),
            "127.0.0.1:1".parse().unwrap(),
            "[::1]:65535".parse().unwrap(),
        ] {
            let tid = new_transaction_id();
            let request = binding_request(&tid);
            assert_eq!(request.len(), 28);
            assert!(is_stun(&request));
            check_fingerprint(&request);
            let response = binding_response(&request, addr).unwrap().unwrap();
            assert_eq!(parse_binding_response(&response, &tid), Ok(Some(addr)));
        }
    }

    #[test]
    fn ipv4_mapped_source_is_reported_as_ipv4() {
        let tid = new_transaction_id();
        let mapped: SocketAddr = "[::ffff:192.0.2.1]:32853".parse().unwrap();
        let response = binding_response(&binding_request(&tid), mapped)
            .unwrap()
            .unwrap();
        assert_eq!(parse_binding_response(&response, &tid), Ok(Some(v4())));
    }

    #[test]
    fn falls_back_to_mapped_address() {
        let tid = new_transaction_id();
        let mut out = Writer::new(CLASS_SUCCESS, &tid);
        out.attribute(ATTR_MAPPED_ADDRESS, &encode_address(v6(), None));
        assert_eq!(parse_binding_response(&out.finish(), &tid), Ok(Some(v6())));
        let empty = Writer::new(CLASS_SUCCESS, &tid).finish();
        assert_eq!(
            parse_binding_response(&empty, &tid),
            Err(StunError::BadAttribute("XOR-MAPPED-ADDRESS"))
        );
    }

    #[test]
    fn unknown_required_attribute_gets_420() {
        let tid = new_transaction_id();
        let mut out = Writer::new(CLASS_REQUEST, &tid);
        out.attribute(0x7777, b"x");
        out.attribute(0xC001, b"optional, ignored");
        let response = binding_response(&out.finish(), v4()).unwrap().unwrap();
        assert!(is_stun(&response));
        assert_eq!(&response[..2], &[0x01, 0x11]);
        check_fingerprint(&response);
        let msg = Message::parse(&response).unwrap();
        let attrs: Vec<_> = msg.attributes().map(Result::unwrap).collect();
        assert_eq!(attrs[0].0, ATTR_ERROR_CODE);
        assert_eq!(&attrs[0].1[..4], &[0, 0, 4, 20]);
        assert_eq!(attrs[1], (ATTR_UNKNOWN_ATTRIBUTES, &[0x77, 0x77][..]));
        assert_eq!(parse_binding_response(&response, &tid), Ok(None));

        let mut optional = Writer::new(CLASS_REQUEST, &tid);
        optional.attribute(0xC001, b"ignored");
        let response = binding_response(&optional.finish(), v4()).unwrap().unwrap();
        assert_eq!(parse_binding_response(&response, &tid), Ok(Some(v4())));
    }

    #[test]
    fn attribute_overrunning_the_message_is_an_error() {
        let tid = new_transaction_id();
        let mut msg = Writer::new(CLASS_REQUEST, &tid);
        msg.attribute(ATTR_SOFTWARE, b"abcd");
        let mut msg = msg.finish();
        msg[22..24].copy_from_slice(&200u16.to_be_bytes());
        assert!(is_stun(&msg));
        assert_eq!(
            binding_response(&msg, v4()),
            Err(StunError::BadAttribute("length"))
        );
    }

    #[test]
    fn prefixes_and_garbage_never_panic() {
        let tid = new_transaction_id();
        let valid = [
            sample_request(),
            sample_v4_response(),
            sample_v6_response(),
            binding_response(&binding_request(&tid), v6())
                .unwrap()
                .unwrap(),
        ];
        for msg in &valid {
            for end in 0..msg.len() {
                let prefix = &msg[..end];
                assert!(!is_stun(prefix));
                assert!(binding_response(prefix, v4()).is_err());
                assert!(parse_binding_response(prefix, &RFC_TID).is_err());
            }
        }
        // Random bodies behind a valid header, and wholly random buffers.
        for round in 0..500usize {
            let mut buf = vec![0u8; 20 + (round % 40) * 4];
            crate::util::random_bytes(&mut buf);
            if round % 2 == 0 {
                let len = u16::try_from(buf.len() - 20).unwrap();
                buf[0] &= 0x3f;
                buf[2..4].copy_from_slice(&len.to_be_bytes());
                buf[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
                assert!(is_stun(&buf));
            }
            let _ = binding_response(&buf, v4());
            let _ = parse_binding_response(&buf, &RFC_TID);
            let tid: TransactionId = buf[8..20].try_into().unwrap();
            let _ = parse_binding_response(&buf, &tid);
        }
    }

    #[test]
    fn is_stun_rejects_other_protocols() {
        // A DTLS handshake record: content type 22, version 0xfefd.
        let mut dtls = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
        dtls.resize(29, 0);
        assert!(!is_stun(&dtls));
        // RTP: version 2 in the top bits, payload type, sequence, timestamp, SSRC, payload.
        let mut rtp = vec![
            0x80, 0x6f, 0x12, 0x34, 0, 0, 0x10, 0, 0xde, 0xad, 0xbe, 0xef,
        ];
        rtp.resize(32, 0xaa);
        assert!(!is_stun(&rtp));
        assert!(!is_stun(&[]));
        assert!(is_stun(&binding_request(&RFC_TID)));
    }
}
