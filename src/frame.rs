//! Tunnel data-channel frame codec, wire version 1 (`spec/protocols.md` §2). Sans-IO: one binary
//! data-channel message is one frame, `[type: u8][stream_id: u32 BE][payload]`. The tunnel mux
//! (serve and proxy sides) decodes every received message with [`Message::decode`] and sends
//! frames built with [`Message::encode`]; the fuzz target calls [`fuzz_one`].
//!
//! JSON payloads are written with their keys in the order the original v1 peer uses and are read
//! in any key order, ignoring unknown keys. Header maps carry one value per name: names that occur
//! more than once (compared case-insensitively) are merged into the first occurrence's spelling,
//! their values joined with `", "`. Decoded header maps keep the order they had on the wire.
//! With the negotiated feature `headers` ([`HeaderForm::List`]) REQ_HEADERS / RES_HEADERS carry
//! an ordered list of `[name, value]` pairs instead, so repeated fields (two `Set-Cookie`) stay
//! apart; [`Message::decode_as`] and [`Message::encode_as`] take the channel's form, and the
//! plain [`Message::decode`] / [`Message::encode`] are the version-1 (map) form.

use serde_json::{Map, Value};
use std::fmt;

/// Bytes before the payload: type (1) + stream id (4).
pub const HEADER_LEN: usize = 5;
/// Most payload bytes a v1 peer puts in one REQ_BODY / RES_BODY frame.
pub const MAX_BODY_CHUNK: usize = 65_408;
/// The `proto` every HELLO must name.
pub const PROTO: &str = "httptunnel";

/// Frame type codes of wire version 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    Hello = 1,
    Agree = 2,
    Ping = 3,
    Pong = 4,
    ReqHeaders = 10,
    ReqBody = 11,
    ReqEnd = 12,
    /// Extension `cancel`: the consumer abandons the stream (its client went away).
    Cancel = 13,
    ResHeaders = 20,
    ResBody = 21,
    ResEnd = 22,
    /// Extension `window`: flow-control credit for a stream's body bytes.
    Window = 30,
    /// Extension `auth`: the consumer's key confirmation (`tunnel::auth`).
    Auth = 40,
    Error = 99,
}

impl TryFrom<u8> for FrameType {
    /// The code that is not a v1 frame type.
    type Error = u8;

    fn try_from(code: u8) -> Result<FrameType, u8> {
        Ok(match code {
            1 => FrameType::Hello,
            2 => FrameType::Agree,
            3 => FrameType::Ping,
            4 => FrameType::Pong,
            10 => FrameType::ReqHeaders,
            11 => FrameType::ReqBody,
            12 => FrameType::ReqEnd,
            13 => FrameType::Cancel,
            20 => FrameType::ResHeaders,
            21 => FrameType::ResBody,
            22 => FrameType::ResEnd,
            30 => FrameType::Window,
            40 => FrameType::Auth,
            99 => FrameType::Error,
            other => return Err(other),
        })
    }
}

/// How REQ_HEADERS / RES_HEADERS carry header fields on a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HeaderForm {
    /// Version 1: a JSON object with one value per name (repeated names joined with `", "`).
    /// Decoding accepts only this form.
    #[default]
    Map,
    /// Feature `headers`: an ordered JSON array of `[name, value]` pairs, repeated names kept
    /// apart and in order. Decoding accepts this form and the map.
    List,
}

/// HELLO, sent by the consumer (proxy) once the data channel is open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub proto: String,
    pub min_version: u32,
    pub max_version: u32,
    pub features: Vec<String>,
    /// Extension `auth`: who the consumer says it is and its SPAKE2 message.
    pub auth: Option<AuthOffer>,
}

/// HELLO's `auth` object: `{"name": …, "pake": "<hex>"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthOffer {
    pub name: String,
    pub pake: Vec<u8>,
}

/// AGREE's `auth` object: `{"pake": "<hex>", "confirm": "<hex>"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthReply {
    pub pake: Vec<u8>,
    pub confirm: Vec<u8>,
}

impl Hello {
    /// Our HELLO: protocol [`PROTO`], versions 1..=1, the given features.
    pub fn ours(features: &[&str]) -> Hello {
        Hello {
            proto: PROTO.to_string(),
            min_version: 1,
            max_version: 1,
            features: features.iter().map(|f| f.to_string()).collect(),
            auth: None,
        }
    }
}

/// AGREE, the provider's (serve) answer to HELLO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agree {
    pub version: u32,
    pub features: Vec<String>,
    /// Extension `auth`: the provider's SPAKE2 message and key confirmation.
    pub auth: Option<AuthReply>,
}

/// REQ_HEADERS: opens stream `stream_id` with an HTTP request head (`path` includes the query).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReqHeaders {
    pub stream_id: u32,
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

/// RES_HEADERS: the response head for stream `stream_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResHeaders {
    pub stream_id: u32,
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

/// One decoded frame. Body payloads borrow from the received buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    Hello(Hello),
    Agree(Agree),
    Ping,
    Pong,
    ReqHeaders(ReqHeaders),
    ReqBody(u32, &'a [u8]),
    ReqEnd(u32),
    ResHeaders(ResHeaders),
    ResBody(u32, &'a [u8]),
    ResEnd(u32),
    /// Extension `cancel` (type 13): stop working on this stream; nothing more is wanted.
    Cancel(u32),
    /// Extension `window` (type 30): the receiver has consumed this many more body bytes of
    /// the stream, so the sender may send that many more. Payload: u32 big-endian.
    Window(u32, u32),
    /// Extension `auth` (type 40, stream 0): the consumer's key confirmation (raw MAC).
    Auth(&'a [u8]),
    /// Stream id and the peer's (informational) error text.
    Error(u32, String),
    /// A frame type this version does not know; callers ignore it (forward compatibility).
    /// `kind` must not be a v1 type code when encoding.
    Unknown {
        kind: u8,
        stream: u32,
        payload: &'a [u8],
    },
}

/// Why a received frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Fewer than [`HEADER_LEN`] bytes.
    Short,
    /// The payload is not a JSON object.
    Json(String),
    /// A JSON field is missing, has the wrong type or is out of range.
    Field(&'static str),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Short => write!(f, "frame shorter than its {HEADER_LEN}-byte header"),
            FrameError::Json(e) => write!(f, "bad JSON payload: {e}"),
            FrameError::Field(name) => write!(f, "missing or invalid field `{name}`"),
        }
    }
}

impl std::error::Error for FrameError {}

impl<'a> Message<'a> {
    /// Decodes one data-channel message in the version-1 form (header maps only); see
    /// [`Message::decode_as`].
    pub fn decode(buf: &'a [u8]) -> Result<Message<'a>, FrameError> {
        Message::decode_as(buf, HeaderForm::Map)
    }

    /// Decodes one data-channel message of a channel whose headers travel in `form`. Control
    /// frames (HELLO, AGREE, PING, PONG) ignore the header's stream id, and frames with empty
    /// payloads ignore any payload bytes.
    pub fn decode_as(buf: &'a [u8], form: HeaderForm) -> Result<Message<'a>, FrameError> {
        let (head, payload) = buf.split_at_checked(HEADER_LEN).ok_or(FrameError::Short)?;
        let [kind, s0, s1, s2, s3] = *head else {
            return Err(FrameError::Short);
        };
        let stream = u32::from_be_bytes([s0, s1, s2, s3]);
        let Ok(frame_type) = FrameType::try_from(kind) else {
            return Ok(Message::Unknown {
                kind,
                stream,
                payload,
            });
        };
        Ok(match frame_type {
            FrameType::Hello => {
                let obj = json_object(payload)?;
                Message::Hello(Hello {
                    proto: string_field(&obj, "proto")?,
                    min_version: u32_field(&obj, "min_version")?,
                    max_version: u32_field(&obj, "max_version")?,
                    features: features_field(&obj)?,
                    auth: match obj.get("auth") {
                        None | Some(Value::Null) => None,
                        Some(v) => Some(AuthOffer {
                            name: v
                                .get("name")
                                .and_then(Value::as_str)
                                .map(str::to_string)
                                .ok_or(FrameError::Field("auth"))?,
                            pake: hex_field(v, "pake")?,
                        }),
                    },
                })
            }
            FrameType::Agree => {
                let obj = json_object(payload)?;
                Message::Agree(Agree {
                    version: u32_field(&obj, "version")?,
                    features: features_field(&obj)?,
                    auth: match obj.get("auth") {
                        None | Some(Value::Null) => None,
                        Some(v) => Some(AuthReply {
                            pake: hex_field(v, "pake")?,
                            confirm: hex_field(v, "confirm")?,
                        }),
                    },
                })
            }
            FrameType::Ping => Message::Ping,
            FrameType::Pong => Message::Pong,
            FrameType::ReqHeaders => {
                let obj = json_object(payload)?;
                Message::ReqHeaders(ReqHeaders {
                    stream_id: stream_id_field(&obj, stream)?,
                    method: string_field(&obj, "method")?,
                    path: string_field(&obj, "path")?,
                    headers: headers_field(&obj, form)?,
                })
            }
            FrameType::ReqBody => Message::ReqBody(stream, payload),
            FrameType::ReqEnd => Message::ReqEnd(stream),
            FrameType::ResHeaders => {
                let obj = json_object(payload)?;
                let status = u32_field(&obj, "status")?;
                Message::ResHeaders(ResHeaders {
                    stream_id: stream_id_field(&obj, stream)?,
                    status: u16::try_from(status).map_err(|_| FrameError::Field("status"))?,
                    headers: headers_field(&obj, form)?,
                })
            }
            FrameType::ResBody => Message::ResBody(stream, payload),
            FrameType::ResEnd => Message::ResEnd(stream),
            FrameType::Cancel => Message::Cancel(stream),
            FrameType::Window => {
                let bytes: [u8; 4] = payload
                    .try_into()
                    .map_err(|_| FrameError::Field("window"))?;
                Message::Window(stream, u32::from_be_bytes(bytes))
            }
            FrameType::Auth => Message::Auth(payload),
            FrameType::Error => {
                Message::Error(stream, String::from_utf8_lossy(payload).into_owned())
            }
        })
    }

    /// The frame's type code.
    pub fn kind(&self) -> u8 {
        let t = match self {
            Message::Hello(_) => FrameType::Hello,
            Message::Agree(_) => FrameType::Agree,
            Message::Ping => FrameType::Ping,
            Message::Pong => FrameType::Pong,
            Message::ReqHeaders(_) => FrameType::ReqHeaders,
            Message::ReqBody(..) => FrameType::ReqBody,
            Message::ReqEnd(_) => FrameType::ReqEnd,
            Message::ResHeaders(_) => FrameType::ResHeaders,
            Message::ResBody(..) => FrameType::ResBody,
            Message::ResEnd(_) => FrameType::ResEnd,
            Message::Cancel(_) => FrameType::Cancel,
            Message::Window(..) => FrameType::Window,
            Message::Auth(_) => FrameType::Auth,
            Message::Error(..) => FrameType::Error,
            Message::Unknown { kind, .. } => return *kind,
        };
        t as u8
    }

    /// The stream id written in the frame header (0 for control frames).
    pub fn stream(&self) -> u32 {
        match self {
            Message::Hello(_)
            | Message::Agree(_)
            | Message::Ping
            | Message::Pong
            | Message::Auth(_) => 0,
            Message::ReqHeaders(h) => h.stream_id,
            Message::ResHeaders(h) => h.stream_id,
            Message::ReqBody(s, _)
            | Message::ReqEnd(s)
            | Message::ResBody(s, _)
            | Message::ResEnd(s)
            | Message::Cancel(s)
            | Message::Window(s, _)
            | Message::Error(s, _) => *s,
            Message::Unknown { stream, .. } => *stream,
        }
    }

    /// Appends this message as one frame in the version-1 form (header maps); see
    /// [`Message::encode_as`].
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.encode_as(out, HeaderForm::Map)
    }

    /// Appends this message as one frame, headers in `form`. Body payloads are written whole:
    /// callers split bodies with [`body_chunks`] first.
    pub fn encode_as(&self, out: &mut Vec<u8>, form: HeaderForm) {
        out.push(self.kind());
        out.extend_from_slice(&self.stream().to_be_bytes());
        match self {
            Message::Hello(h) => {
                out.extend_from_slice(b"{\"proto\":");
                push_json_str(out, &h.proto);
                out.extend_from_slice(b",\"min_version\":");
                out.extend_from_slice(h.min_version.to_string().as_bytes());
                out.extend_from_slice(b",\"max_version\":");
                out.extend_from_slice(h.max_version.to_string().as_bytes());
                out.extend_from_slice(b",\"features\":");
                push_json_str_array(out, &h.features);
                if let Some(auth) = &h.auth {
                    out.extend_from_slice(b",\"auth\":{\"name\":");
                    push_json_str(out, &auth.name);
                    out.extend_from_slice(b",\"pake\":");
                    push_json_str(out, &crate::util::hex(&auth.pake));
                    out.push(b'}');
                }
                out.push(b'}');
            }
            Message::Agree(a) => {
                out.extend_from_slice(b"{\"version\":");
                out.extend_from_slice(a.version.to_string().as_bytes());
                out.extend_from_slice(b",\"features\":");
                push_json_str_array(out, &a.features);
                if let Some(auth) = &a.auth {
                    out.extend_from_slice(b",\"auth\":{\"pake\":");
                    push_json_str(out, &crate::util::hex(&auth.pake));
                    out.extend_from_slice(b",\"confirm\":");
                    push_json_str(out, &crate::util::hex(&auth.confirm));
                    out.push(b'}');
                }
                out.push(b'}');
            }
            Message::ReqHeaders(h) => {
                out.extend_from_slice(b"{\"stream_id\":");
                out.extend_from_slice(h.stream_id.to_string().as_bytes());
                out.extend_from_slice(b",\"method\":");
                push_json_str(out, &h.method);
                out.extend_from_slice(b",\"path\":");
                push_json_str(out, &h.path);
                out.extend_from_slice(b",\"headers\":");
                push_json_headers(out, &h.headers, form);
                out.push(b'}');
            }
            Message::ResHeaders(h) => {
                out.extend_from_slice(b"{\"stream_id\":");
                out.extend_from_slice(h.stream_id.to_string().as_bytes());
                out.extend_from_slice(b",\"status\":");
                out.extend_from_slice(h.status.to_string().as_bytes());
                out.extend_from_slice(b",\"headers\":");
                push_json_headers(out, &h.headers, form);
                out.push(b'}');
            }
            Message::ReqBody(_, data) | Message::ResBody(_, data) | Message::Auth(data) => {
                out.extend_from_slice(data)
            }
            Message::Unknown { payload, .. } => out.extend_from_slice(payload),
            Message::Error(_, text) => out.extend_from_slice(text.as_bytes()),
            Message::Window(_, credit) => out.extend_from_slice(&credit.to_be_bytes()),
            Message::Ping
            | Message::Pong
            | Message::ReqEnd(_)
            | Message::ResEnd(_)
            | Message::Cancel(_) => {}
        }
    }

    /// This message as one frame (version-1 form) in a new buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        self.to_vec_as(HeaderForm::Map)
    }

    /// This message as one frame, headers in `form`, in a new buffer.
    pub fn to_vec_as(&self, form: HeaderForm) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_as(&mut out, form);
        out
    }
}

/// Splits a body into REQ_BODY / RES_BODY payloads of at most [`MAX_BODY_CHUNK`] bytes. An empty
/// body yields no chunk.
pub fn body_chunks(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    data.chunks(MAX_BODY_CHUNK)
}

/// The provider's answer to `hello`: the highest version both ranges hold and the features both
/// sides know, in `hello`'s order without repeats. `None` (drop the connection) when the
/// protocol is not [`PROTO`] or the version ranges do not overlap.
pub fn negotiate(
    hello: &Hello,
    our_min: u32,
    our_max: u32,
    our_features: &[&str],
) -> Option<Agree> {
    if hello.proto != PROTO {
        return None;
    }
    let low = hello.min_version.max(our_min);
    let high = hello.max_version.min(our_max);
    if low > high {
        return None;
    }
    let mut features: Vec<String> = Vec::new();
    for f in &hello.features {
        if our_features.contains(&f.as_str()) && !features.contains(f) {
            features.push(f.clone());
        }
    }
    Some(Agree {
        version: high,
        features,
        auth: None,
    })
}

/// The fuzz entry point: decodes arbitrary bytes in both header forms and never panics on them;
/// whatever decodes must encode (in the same form) to a frame that decodes to the same message,
/// and what the version-1 form accepts the list form accepts too, as the same message.
pub fn fuzz_one(data: &[u8]) {
    let v1 = Message::decode_as(data, HeaderForm::Map);
    let list = Message::decode_as(data, HeaderForm::List);
    if let Ok(m) = &v1 {
        assert_eq!(
            Ok(m),
            list.as_ref(),
            "the list form decodes a v1 frame differently"
        );
    }
    for (form, decoded) in [(HeaderForm::Map, v1), (HeaderForm::List, list)] {
        let Ok(message) = decoded else {
            continue;
        };
        let encoded = message.to_vec_as(form);
        match Message::decode_as(&encoded, form) {
            Ok(again) => assert_eq!(message, again, "re-encoded frame decodes differently"),
            Err(e) => panic!("re-encoded frame does not decode: {e}: {message:?}"),
        }
    }
}

/// Merges header names that occur more than once (case-insensitively) into the first
/// occurrence, joining the values with `", "`; v1 header maps hold one value per name.
fn merge_headers<'h>(
    headers: impl IntoIterator<Item = (&'h str, &'h str)>,
) -> Vec<(String, String)> {
    let mut merged: Vec<(String, String)> = Vec::new();
    for (name, value) in headers {
        match merged
            .iter_mut()
            .find(|(seen, _)| seen.eq_ignore_ascii_case(name))
        {
            Some((_, joined)) => {
                joined.push_str(", ");
                joined.push_str(value);
            }
            None => merged.push((name.to_string(), value.to_string())),
        }
    }
    merged
}

fn json_object(payload: &[u8]) -> Result<Map<String, Value>, FrameError> {
    match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(_) => Err(FrameError::Json("payload is not a JSON object".to_string())),
        Err(e) => Err(FrameError::Json(e.to_string())),
    }
}

fn string_field(obj: &Map<String, Value>, name: &'static str) -> Result<String, FrameError> {
    obj.get(name)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or(FrameError::Field(name))
}

/// A hex string field of `auth` as bytes.
fn hex_field(obj: &Value, name: &'static str) -> Result<Vec<u8>, FrameError> {
    obj.get(name)
        .and_then(Value::as_str)
        .and_then(crate::util::unhex)
        .ok_or(FrameError::Field("auth"))
}

fn u32_field(obj: &Map<String, Value>, name: &'static str) -> Result<u32, FrameError> {
    obj.get(name)
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or(FrameError::Field(name))
}

/// `features`: an array of strings; missing or `null` means none.
fn features_field(obj: &Map<String, Value>) -> Result<Vec<String>, FrameError> {
    match obj.get("features") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or(FrameError::Field("features"))
            })
            .collect(),
        Some(_) => Err(FrameError::Field("features")),
    }
}

/// `stream_id` in a headers payload must match the frame header's; missing means the header's.
fn stream_id_field(obj: &Map<String, Value>, header_stream: u32) -> Result<u32, FrameError> {
    if obj.get("stream_id").is_none() {
        return Ok(header_stream);
    }
    match u32_field(obj, "stream_id")? {
        id if id == header_stream => Ok(id),
        _ => Err(FrameError::Field("stream_id")),
    }
}

/// `headers`: an object of string values; missing or `null` means none. With
/// [`HeaderForm::List`] also an array of `[name, value]` string pairs, kept as they are.
fn headers_field(
    obj: &Map<String, Value>,
    form: HeaderForm,
) -> Result<Vec<(String, String)>, FrameError> {
    let map = match obj.get("headers") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(map)) => map,
        Some(Value::Array(items)) if form == HeaderForm::List => {
            return items
                .iter()
                .map(|item| match item.as_array().map(Vec::as_slice) {
                    Some([Value::String(name), Value::String(value)]) => {
                        Ok((name.clone(), value.clone()))
                    }
                    _ => Err(FrameError::Field("headers")),
                })
                .collect();
        }
        Some(_) => return Err(FrameError::Field("headers")),
    };
    let mut pairs = Vec::with_capacity(map.len());
    for (name, value) in map {
        let value = value.as_str().ok_or(FrameError::Field("headers"))?;
        pairs.push((name.as_str(), value));
    }
    Ok(merge_headers(pairs))
}

fn push_json_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(Value::from(s).to_string().as_bytes());
}

fn push_json_str_array(out: &mut Vec<u8>, items: &[String]) {
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_json_str(out, item);
    }
    out.push(b']');
}

fn push_json_headers(out: &mut Vec<u8>, headers: &[(String, String)], form: HeaderForm) {
    if form == HeaderForm::List {
        out.push(b'[');
        for (i, (name, value)) in headers.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.push(b'[');
            push_json_str(out, name);
            out.push(b',');
            push_json_str(out, value);
            out.push(b']');
        }
        out.push(b']');
        return;
    }
    out.push(b'{');
    let merged = merge_headers(headers.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    for (i, (name, value)) in merged.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        push_json_str(out, name);
        out.push(b':');
        push_json_str(out, value);
    }
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    /// Encodes `msg`, checks the exact bytes, and checks they decode back to `msg`.
    fn golden(msg: Message<'_>, kind: u8, stream: u32, payload: &[u8]) {
        let bytes = msg.to_vec();
        assert_eq!(bytes, frame(kind, stream, payload), "encoding of {msg:?}");
        assert_eq!(Message::decode(&bytes), Ok(msg));
    }

    #[test]
    fn golden_hello() {
        golden(
            Message::Hello(Hello::ours(&["sse"])),
            1,
            0,
            br#"{"proto":"httptunnel","min_version":1,"max_version":1,"features":["sse"]}"#,
        );
        golden(
            Message::Hello(Hello::ours(&[])),
            1,
            0,
            br#"{"proto":"httptunnel","min_version":1,"max_version":1,"features":[]}"#,
        );
    }

    #[test]
    fn golden_agree() {
        golden(
            Message::Agree(Agree {
                version: 1,
                features: vec!["sse".into()],
                auth: None,
            }),
            2,
            0,
            br#"{"version":1,"features":["sse"]}"#,
        );
    }

    #[test]
    fn golden_ping_pong() {
        golden(Message::Ping, 3, 0, b"");
        golden(Message::Pong, 4, 0, b"");
    }

    #[test]
    fn golden_req_headers() {
        golden(
            Message::ReqHeaders(ReqHeaders {
                stream_id: 1,
                method: "POST".into(),
                path: "/v1/x?q=1".into(),
                headers: h(&[("accept", "*/*"), ("content-type", "application/json")]),
            }),
            10,
            1,
            br#"{"stream_id":1,"method":"POST","path":"/v1/x?q=1","headers":{"accept":"*/*","content-type":"application/json"}}"#,
        );
        // Encoding keeps the caller's header order (decoding then sorts by name).
        let msg = Message::ReqHeaders(ReqHeaders {
            stream_id: 0x0102_0304,
            method: "GET".into(),
            path: "/a\"b".into(),
            headers: h(&[("x-b", "1"), ("x-a", "tab\there")]),
        });
        assert_eq!(
            msg.to_vec(),
            frame(
                10,
                0x0102_0304,
                br#"{"stream_id":16909060,"method":"GET","path":"/a\"b","headers":{"x-b":"1","x-a":"tab\there"}}"#
            )
        );
    }

    #[test]
    fn golden_res_headers() {
        golden(
            Message::ResHeaders(ResHeaders {
                stream_id: 7,
                status: 200,
                headers: h(&[("content-type", "text/event-stream")]),
            }),
            20,
            7,
            br#"{"stream_id":7,"status":200,"headers":{"content-type":"text/event-stream"}}"#,
        );
    }

    #[test]
    fn golden_extensions() {
        golden(Message::Cancel(7), 13, 7, b"");
        golden(Message::Window(7, 0x0004_0000), 30, 7, &[0, 4, 0, 0]);
        assert_eq!(
            Message::decode(&[30, 0, 0, 0, 7, 1, 2]),
            Err(FrameError::Field("window"))
        );
    }

    #[test]
    fn golden_bodies_ends_error_unknown() {
        golden(Message::ReqBody(1, b"{\"a\":1}"), 11, 1, b"{\"a\":1}");
        golden(Message::ReqEnd(1), 12, 1, b"");
        golden(Message::ResBody(2, b"data: x\n\n"), 21, 2, b"data: x\n\n");
        golden(Message::ResBody(2, b""), 21, 2, b"");
        golden(Message::ResEnd(0xffff_ffff), 22, 0xffff_ffff, b"");
        golden(
            Message::Error(3, "upstream error: reset".into()),
            99,
            3,
            b"upstream error: reset",
        );
        golden(
            Message::Unknown {
                kind: 42,
                stream: 5,
                payload: b"\x00\x01",
            },
            42,
            5,
            b"\x00\x01",
        );
    }

    #[test]
    fn duplicate_header_names_are_joined() {
        let msg = Message::ResHeaders(ResHeaders {
            stream_id: 1,
            status: 200,
            headers: h(&[("Vary", "accept"), ("x", "1"), ("vary", "origin")]),
        });
        assert_eq!(
            msg.to_vec(),
            frame(
                20,
                1,
                br#"{"stream_id":1,"status":200,"headers":{"Vary":"accept, origin","x":"1"}}"#
            )
        );
        // The same merge applies to names that differ only in case on the wire.
        let wire = frame(20, 1, br#"{"status":204,"headers":{"a":"2","A":"1"}}"#);
        let Ok(Message::ResHeaders(res)) = Message::decode(&wire) else {
            panic!("did not decode");
        };
        assert_eq!(res.headers, h(&[("a", "2, 1")]), "wire order is kept");
        assert_eq!(res.status, 204);
    }

    #[test]
    fn header_list_form_keeps_repeats_and_order() {
        let msg = Message::ResHeaders(ResHeaders {
            stream_id: 3,
            status: 200,
            headers: h(&[
                ("set-cookie", "a=1; Path=/"),
                ("content-type", "text/plain"),
                ("set-cookie", "b=2, c=3"),
            ]),
        });
        let wire = frame(
            20,
            3,
            br#"{"stream_id":3,"status":200,"headers":[["set-cookie","a=1; Path=/"],["content-type","text/plain"],["set-cookie","b=2, c=3"]]}"#,
        );
        assert_eq!(msg.to_vec_as(HeaderForm::List), wire);
        assert_eq!(Message::decode_as(&wire, HeaderForm::List), Ok(msg.clone()));
        // A channel without `headers` refuses the list, and encodes the same head as v1 did.
        assert_eq!(
            Message::decode(&wire),
            Err(FrameError::Field("headers")),
            "the list form only where negotiated"
        );
        assert_eq!(
            msg.to_vec(),
            frame(
                20,
                3,
                br#"{"stream_id":3,"status":200,"headers":{"set-cookie":"a=1; Path=/, b=2, c=3","content-type":"text/plain"}}"#
            )
        );
        // The list form also reads a map (a peer may still send one), merged as in v1.
        let map = frame(
            10,
            2,
            br#"{"method":"GET","path":"/","headers":{"a":"1","A":"2"}}"#,
        );
        let Ok(Message::ReqHeaders(req)) = Message::decode_as(&map, HeaderForm::List) else {
            panic!("map under the list form");
        };
        assert_eq!(req.headers, h(&[("a", "1, 2")]));
        // Empty lists, and REQ_HEADERS in the list form.
        let req = Message::ReqHeaders(ReqHeaders {
            stream_id: 9,
            method: "GET".into(),
            path: "/x".into(),
            headers: h(&[("x-a", "1"), ("X-A", "2")]),
        });
        assert_eq!(
            req.to_vec_as(HeaderForm::List),
            frame(
                10,
                9,
                br#"{"stream_id":9,"method":"GET","path":"/x","headers":[["x-a","1"],["X-A","2"]]}"#
            )
        );
        let empty = frame(20, 1, br#"{"status":204,"headers":[]}"#);
        assert!(matches!(
            Message::decode_as(&empty, HeaderForm::List),
            Ok(Message::ResHeaders(ResHeaders { headers, .. })) if headers.is_empty()
        ));
    }

    #[test]
    fn malformed_header_lists_are_refused() {
        for bad in [
            &br#"[["a"]]"#[..],
            br#"[["a","1","2"]]"#,
            br#"[["a",1]]"#,
            br#"[[null,"1"]]"#,
            br#"["a","1"]"#,
            br#"[{"a":"1"}]"#,
            br#""a: 1""#,
        ] {
            let mut payload = br#"{"stream_id":1,"status":200,"headers":"#.to_vec();
            payload.extend_from_slice(bad);
            payload.push(b'}');
            assert_eq!(
                Message::decode_as(&frame(20, 1, &payload), HeaderForm::List),
                Err(FrameError::Field("headers")),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn decode_accepts_any_key_order_extra_keys_and_missing_features() {
        let wire = frame(
            1,
            9,
            br#"{"x":[1],"features":null,"max_version":3,"proto":"httptunnel","min_version":1}"#,
        );
        assert_eq!(
            Message::decode(&wire),
            Ok(Message::Hello(Hello {
                proto: PROTO.into(),
                min_version: 1,
                max_version: 3,
                features: vec![],
                auth: None,
            }))
        );
        let wire = frame(2, 0, br#" {"version":2} "#);
        assert_eq!(
            Message::decode(&wire),
            Ok(Message::Agree(Agree {
                version: 2,
                features: vec![],
                auth: None,
            }))
        );
        let wire = frame(
            10,
            4,
            br#"{"headers":{"b":"2","a":"1"},"path":"/","extra":true,"method":"GET","stream_id":4}"#,
        );
        assert_eq!(
            Message::decode(&wire),
            Ok(Message::ReqHeaders(ReqHeaders {
                stream_id: 4,
                method: "GET".into(),
                path: "/".into(),
                headers: h(&[("b", "2"), ("a", "1")]),
            }))
        );
        // Control frames ignore the stream id and stray payload bytes.
        assert_eq!(Message::decode(&frame(3, 77, b"xyz")), Ok(Message::Ping));
        assert_eq!(Message::decode(&frame(12, 6, b"x")), Ok(Message::ReqEnd(6)));
    }

    #[test]
    fn decode_errors() {
        assert_eq!(Message::decode(b""), Err(FrameError::Short));
        assert_eq!(Message::decode(&[3, 0, 0, 0]), Err(FrameError::Short));
        assert!(matches!(
            Message::decode(&frame(1, 0, b"{\"proto\":")),
            Err(FrameError::Json(_))
        ));
        assert!(matches!(
            Message::decode(&frame(2, 0, b"[1]")),
            Err(FrameError::Json(_))
        ));
        assert!(matches!(
            Message::decode(&frame(20, 1, b"")),
            Err(FrameError::Json(_))
        ));
        let cases: &[(u8, u32, &[u8], &str)] = &[
            (
                1,
                0,
                br#"{"proto":1,"min_version":1,"max_version":1}"#,
                "proto",
            ),
            (
                1,
                0,
                br#"{"proto":"httptunnel","max_version":1}"#,
                "min_version",
            ),
            (
                1,
                0,
                br#"{"proto":"httptunnel","min_version":1,"max_version":-1}"#,
                "max_version",
            ),
            (
                1,
                0,
                br#"{"proto":"httptunnel","min_version":1,"max_version":4294967296}"#,
                "max_version",
            ),
            (
                1,
                0,
                br#"{"proto":"httptunnel","min_version":1.5,"max_version":2}"#,
                "min_version",
            ),
            (
                1,
                0,
                br#"{"proto":"httptunnel","min_version":1,"max_version":1,"features":"sse"}"#,
                "features",
            ),
            (2, 0, br#"{"version":1,"features":["sse",2]}"#, "features"),
            (2, 0, br#"{"version":"1"}"#, "version"),
            (
                10,
                1,
                br#"{"stream_id":1,"method":"GET","path":"/","headers":{"a":1}}"#,
                "headers",
            ),
            (
                10,
                1,
                br#"{"stream_id":1,"method":"GET","path":"/","headers":["a"]}"#,
                "headers",
            ),
            (
                10,
                1,
                br#"{"stream_id":2,"method":"GET","path":"/","headers":{}}"#,
                "stream_id",
            ),
            (
                10,
                1,
                br#"{"stream_id":1,"path":"/","headers":{}}"#,
                "method",
            ),
            (
                10,
                1,
                br#"{"stream_id":1,"method":"GET","path":null}"#,
                "path",
            ),
            (
                20,
                1,
                br#"{"stream_id":1,"status":65536,"headers":{}}"#,
                "status",
            ),
            (
                20,
                1,
                br#"{"stream_id":1,"status":"200","headers":{}}"#,
                "status",
            ),
            (
                20,
                1,
                br#"{"stream_id":1,"status":200,"headers":{"a":null}}"#,
                "headers",
            ),
        ];
        for (kind, stream, payload, field) in cases {
            assert_eq!(
                Message::decode(&frame(*kind, *stream, payload)),
                Err(FrameError::Field(field)),
                "{}",
                String::from_utf8_lossy(payload)
            );
        }
    }

    #[test]
    fn error_text_is_decoded_lossily() {
        assert_eq!(
            Message::decode(&frame(99, 2, b"bad \xff byte")),
            Ok(Message::Error(2, "bad \u{fffd} byte".into()))
        );
    }

    #[test]
    fn frame_type_codes() {
        for code in 0..=u8::MAX {
            match FrameType::try_from(code) {
                Ok(t) => assert_eq!(t as u8, code),
                Err(c) => assert_eq!(c, code),
            }
        }
        assert_eq!(FrameType::try_from(99), Ok(FrameType::Error));
        assert_eq!(FrameType::try_from(5), Err(5));
        assert_eq!(
            Message::decode(&frame(5, 1, b"new")),
            Ok(Message::Unknown {
                kind: 5,
                stream: 1,
                payload: b"new"
            })
        );
    }

    #[test]
    fn negotiate_versions_and_features() {
        let hello = Hello::ours(&["sse", "cancel", "sse", "credit"]);
        assert_eq!(
            negotiate(&hello, 1, 1, &["credit", "sse"]),
            Some(Agree {
                version: 1,
                features: vec!["sse".into(), "credit".into()],
                auth: None,
            })
        );
        let wide = Hello {
            proto: PROTO.into(),
            min_version: 1,
            max_version: 3,
            features: vec![],
            auth: None,
        };
        assert_eq!(negotiate(&wide, 1, 2, &["sse"]).map(|a| a.version), Some(2));
        assert_eq!(negotiate(&wide, 2, 5, &[]).map(|a| a.version), Some(3));
        assert_eq!(negotiate(&wide, 4, 5, &[]), None);
        let inverted = Hello {
            min_version: 3,
            max_version: 1,
            ..wide.clone()
        };
        assert_eq!(negotiate(&inverted, 1, 3, &[]), None);
        let other = Hello {
            proto: "httptunnel2".into(),
            ..wide
        };
        assert_eq!(negotiate(&other, 1, 3, &[]), None);
    }

    #[test]
    fn body_chunks_split_at_max() {
        let data = vec![7u8; MAX_BODY_CHUNK * 2 + 3];
        let sizes: Vec<usize> = body_chunks(&data).map(<[u8]>::len).collect();
        assert_eq!(sizes, vec![MAX_BODY_CHUNK, MAX_BODY_CHUNK, 3]);
        assert_eq!(body_chunks(&[]).count(), 0);
        let frame_len = Message::ResBody(1, &data[..MAX_BODY_CHUNK]).to_vec().len();
        assert_eq!(frame_len, 65_413);
    }

    #[test]
    fn fuzz_one_round_trips_samples() {
        for sample in [
            frame(
                1,
                0,
                br#"{"proto":"x","min_version":0,"max_version":9,"features":["\u00e9"]}"#,
            ),
            frame(
                10,
                1,
                br#"{"method":"GET","path":"/","headers":{"A":"1","a":"2"}}"#,
            ),
            frame(99, 1, b"\xc3"),
            frame(
                20,
                1,
                br#"{"status":200,"headers":[["set-cookie","a"],["Set-Cookie","b"]]}"#,
            ),
            frame(200, 1, b""),
            vec![1, 2],
        ] {
            fuzz_one(&sample);
        }
    }
}
