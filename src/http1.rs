//! Sans-IO HTTP/1.1 message framing, in the manner of Python's `h11` but smaller: request and
//! response heads (parsed with `httparse`), body framing rules (RFC 9112 §6), a streaming body
//! decoder for `Content-Length`, chunked and read-until-close bodies, and head/chunk serialisation.
//! No sockets and no clock: callers own the buffers.
//!
//! Used by the signal server (request heads, small POST bodies, keep-alive) and by the tunnel
//! (the proxy side parses client requests and writes responses; the serve side writes upstream
//! requests and parses upstream responses), and by the `http1` fuzz target through [`fuzz_one`].

use std::borrow::Cow;
use std::fmt;

/// A head (request or status line plus header fields) larger than this is an error.
pub const MAX_HEAD: usize = 16 * 1024;
/// Most header fields accepted in one head; more is [`HeadError::TooLarge`].
pub const MAX_HEADERS: usize = 64;
/// Longest chunk-size line (or trailer line), CRLF included.
const MAX_CHUNK_LINE: usize = 1024;
/// Largest chunk size accepted.
const MAX_CHUNK_SIZE: u64 = 1 << 40;
/// Most trailer bytes read (and ignored) after the last chunk.
const MAX_TRAILERS: usize = MAX_HEAD;

/// The final chunk of a chunked body, with no trailers.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// A parsed request head. Header names keep their original case.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub method: String,
    pub target: String,
    pub minor_version: u8,
    pub headers: Vec<(String, String)>,
}

/// A parsed response head. Header names keep their original case.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub reason: String,
    pub minor_version: u8,
    pub headers: Vec<(String, String)>,
}

/// Why a head could not be parsed or framed.
#[derive(Debug, Clone, PartialEq)]
pub enum HeadError {
    /// Longer than [`MAX_HEAD`] bytes or more than [`MAX_HEADERS`] fields.
    TooLarge,
    /// Not valid HTTP/1.x, or contradictory body framing headers.
    Invalid(String),
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::TooLarge => write!(f, "HTTP head too large"),
            HeadError::Invalid(why) => write!(f, "invalid HTTP head: {why}"),
        }
    }
}

impl std::error::Error for HeadError {}

fn collect_headers(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            let value = String::from_utf8_lossy(h.value);
            (
                h.name.to_string(),
                value.trim_matches([' ', '\t']).to_string(),
            )
        })
        .collect()
}

/// Maps an `httparse` outcome on the first [`MAX_HEAD`] bytes of a `buf_len`-byte buffer.
fn head_status(
    status: httparse::Result<usize>,
    buf_len: usize,
) -> Result<Option<usize>, HeadError> {
    match status {
        Ok(httparse::Status::Complete(n)) => Ok(Some(n)),
        Ok(httparse::Status::Partial) if buf_len > MAX_HEAD => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(e) => Err(HeadError::Invalid(e.to_string())),
    }
}

/// Parses a request head from the start of `buf`.
/// `Ok(None)`: need more bytes. `Ok(Some((head, n)))`: head parsed from the first `n` bytes.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let status = req.parse(&buf[..buf.len().min(MAX_HEAD)]);
    Ok(head_status(status, buf.len())?.map(|n| {
        let head = Request {
            method: req.method.unwrap_or_default().to_string(),
            target: req.path.unwrap_or_default().to_string(),
            minor_version: req.version.unwrap_or_default(),
            headers: collect_headers(req.headers),
        };
        (head, n)
    }))
}

/// Parses a response head from the start of `buf`.
/// `Ok(None)`: need more bytes. `Ok(Some((head, n)))`: head parsed from the first `n` bytes.
pub fn parse_response(buf: &[u8]) -> Result<Option<(Response, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let status = resp.parse(&buf[..buf.len().min(MAX_HEAD)]);
    Ok(head_status(status, buf.len())?.map(|n| {
        let head = Response {
            status: resp.code.unwrap_or_default(),
            reason: resp.reason.unwrap_or_default().to_string(),
            minor_version: resp.version.unwrap_or_default(),
            headers: collect_headers(resp.headers),
        };
        (head, n)
    }))
}

/// Case-insensitive lookup of the first value of header `name`.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// All comma-separated, trimmed, non-empty list elements of every `name` header, in order.
fn header_tokens<'a>(
    headers: &'a [(String, String)],
    name: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .iter()
        .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.split(','))
        .map(|t| t.trim_matches([' ', '\t']))
        .filter(|t| !t.is_empty())
}

/// True when some value of `name` (a comma-separated list) has an element equal to `token`,
/// compared case-insensitively.
pub fn header_has_token(headers: &[(String, String)], name: &str, token: &str) -> bool {
    header_tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

/// How the body of a message is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BodyFraming {
    /// No body at all.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Everything until the connection closes (responses only).
    UntilClose,
}

/// What `Transfer-Encoding` says: `None` when absent, `Some(true)` when chunked is the final coding.
fn transfer_chunked(headers: &[(String, String)]) -> Result<Option<bool>, HeadError> {
    let codings: Vec<&str> = header_tokens(headers, "transfer-encoding").collect();
    let present = headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"));
    if !present {
        return Ok(None);
    }
    let chunked_count = codings
        .iter()
        .filter(|c| c.eq_ignore_ascii_case("chunked"))
        .count();
    let last_chunked = codings
        .last()
        .is_some_and(|c| c.eq_ignore_ascii_case("chunked"));
    if chunked_count > 1 || (chunked_count == 1 && !last_chunked) {
        return Err(HeadError::Invalid(
            "chunked must be the final transfer coding, applied once".into(),
        ));
    }
    Ok(Some(last_chunked))
}

/// The `Content-Length`, if any; every value (and list element) must be the same decimal number.
pub fn content_length(headers: &[(String, String)]) -> Result<Option<u64>, HeadError> {
    let mut found: Option<u64> = None;
    for (name, value) in headers {
        if !name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        for element in value.split(',') {
            let element = element.trim_matches([' ', '\t']);
            if element.is_empty() || !element.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HeadError::Invalid(format!("bad content-length {value:?}")));
            }
            let n: u64 = element
                .parse()
                .map_err(|_| HeadError::Invalid(format!("content-length {element} too big")))?;
            match found {
                Some(prev) if prev != n => {
                    return Err(HeadError::Invalid(format!(
                        "conflicting content-lengths {prev} and {n}"
                    )))
                }
                _ => found = Some(n),
            }
        }
    }
    Ok(found)
}

fn keep_alive(minor_version: u8, headers: &[(String, String)]) -> bool {
    if header_has_token(headers, "connection", "close") {
        return false;
    }
    minor_version >= 1 || header_has_token(headers, "connection", "keep-alive")
}

/// Everything after the first `?` (or `#`) in a target.
fn split_target(target: &str) -> (&str, &str) {
    let without_fragment = target.split('#').next().unwrap_or_default();
    match without_fragment.split_once('?') {
        Some((path, query)) => (path, query),
        None => (without_fragment, ""),
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Form-style decoding: `+` is a space, `%XX` a byte; a malformed escape stays as it is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = bytes.get(i + 1).copied().and_then(hex_value);
                let lo = bytes.get(i + 2).copied().and_then(hex_value);
                if let (Some(hi), Some(lo)) = (hi, lo) {
                    out.push(hi << 4 | lo);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            _ => out.push(b),
        }
        i += 1;
    }
    match String::from_utf8(out) {
        Ok(s) => s,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

impl Request {
    /// Body framing of this request: chunked wins over `Content-Length` (RFC 9112 §6.3); a bad
    /// or conflicting `Content-Length`, or a transfer coding other than final chunked, is an
    /// error; no body headers → [`BodyFraming::None`].
    pub fn body_framing(&self) -> Result<BodyFraming, HeadError> {
        match transfer_chunked(&self.headers)? {
            Some(true) => Ok(BodyFraming::Chunked),
            Some(false) => Err(HeadError::Invalid(
                "request transfer-encoding without chunked".into(),
            )),
            None => Ok(match content_length(&self.headers)? {
                Some(n) => BodyFraming::Length(n),
                None => BodyFraming::None,
            }),
        }
    }

    /// Whether the connection may carry another request after this one: HTTP/1.1 unless
    /// `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`.
    pub fn keep_alive(&self) -> bool {
        keep_alive(self.minor_version, &self.headers)
    }

    /// `Expect: 100-continue` on an HTTP/1.1 request.
    pub fn expects_continue(&self) -> bool {
        self.minor_version >= 1 && header_has_token(&self.headers, "expect", "100-continue")
    }

    /// The percent-decoded (`+` as space) value of the first `name=` query parameter.
    /// A parameter without `=` has the empty value.
    pub fn query_param(&self, name: &str) -> Option<String> {
        let (_, query) = split_target(&self.target);
        query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
            .find(|(key, _)| percent_decode(key) == name)
            .map(|(_, value)| percent_decode(value))
    }

    /// The target without its query (and fragment).
    pub fn path(&self) -> &str {
        split_target(&self.target).0
    }
}

impl Response {
    /// Body framing of this response to a `request_method` request: HEAD, 1xx, 204 and 304
    /// have none; then chunked; then `Content-Length` (bad or conflicting → error); otherwise
    /// the body runs until the connection closes.
    pub fn body_framing(&self, request_method: &str) -> Result<BodyFraming, HeadError> {
        if request_method.eq_ignore_ascii_case("HEAD")
            || (100..200).contains(&self.status)
            || self.status == 204
            || self.status == 304
        {
            return Ok(BodyFraming::None);
        }
        match transfer_chunked(&self.headers)? {
            Some(true) => Ok(BodyFraming::Chunked),
            Some(false) => Ok(BodyFraming::UntilClose),
            None => Ok(match content_length(&self.headers)? {
                Some(n) => BodyFraming::Length(n),
                None => BodyFraming::UntilClose,
            }),
        }
    }

    /// Whether the server keeps the connection open after this response (same rules as for
    /// requests). A body framed [`BodyFraming::UntilClose`] ends the connection regardless.
    pub fn keep_alive(&self) -> bool {
        keep_alive(self.minor_version, &self.headers)
    }
}

/// Why a body could not be decoded.
#[derive(Debug, PartialEq)]
pub enum BodyError {
    /// Malformed chunked framing, or a body that ended (EOF) before its framing said it would.
    BadChunk(String),
    /// Body above the decoder's limit, or trailers above [`MAX_HEAD`] bytes.
    TooLarge,
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BodyError::BadChunk(why) => write!(f, "bad HTTP body framing: {why}"),
            BodyError::TooLarge => write!(f, "HTTP body too large"),
        }
    }
}

impl std::error::Error for BodyError {}

/// One step of [`BodyDecoder::decode`].
#[derive(Debug, PartialEq)]
pub struct Decoded<'a> {
    /// Bytes of the input used up (framing and data); the caller drops them.
    pub consumed: usize,
    /// Body bytes to deliver, a sub-slice of the consumed input.
    pub data: &'a [u8],
    /// The body is complete; bytes after `consumed` belong to the next message.
    pub done: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Length(u64),
    UntilClose,
    ChunkSize,
    ChunkData(u64),
    ChunkDataEnd,
    Trailers,
    Done,
}

/// Streaming body decoder. Feed it the bytes after the head; keep what it did not consume and
/// present it again with more input.
#[derive(Debug)]
pub struct BodyDecoder {
    state: State,
    limit: u64,
    delivered: u64,
    trailer_bytes: usize,
}

/// Outcome of looking for a CRLF-terminated line at the start of `input`.
enum Line<'a> {
    /// The line without its CRLF, and its length with it.
    Complete(&'a [u8], usize),
    NeedMore,
}

fn take_line(input: &[u8]) -> Result<Line<'_>, BodyError> {
    let window = &input[..input.len().min(MAX_CHUNK_LINE)];
    match window.iter().position(|&b| b == b'\n') {
        Some(lf) => match lf.checked_sub(1).and_then(|cr| window.get(cr)) {
            Some(b'\r') => Ok(Line::Complete(&window[..lf - 1], lf + 1)),
            _ => Err(BodyError::BadChunk("line not ended by CRLF".into())),
        },
        None if input.len() >= MAX_CHUNK_LINE => {
            Err(BodyError::BadChunk("chunk line too long".into()))
        }
        None => Ok(Line::NeedMore),
    }
}

/// Parses `hex [BWS ";" ext]` into the chunk size.
fn parse_chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(BodyError::BadChunk("chunk size without hex digits".into()));
    }
    let (hex, rest) = line.split_at(digits);
    let rest_ok = match rest.iter().position(|&b| b != b' ' && b != b'\t') {
        None => true,
        Some(i) => rest.get(i) == Some(&b';') && !rest.contains(&b'\r'),
    };
    if !rest_ok {
        return Err(BodyError::BadChunk("garbage after chunk size".into()));
    }
    let mut size: u64 = 0;
    for &b in hex {
        size = size * 16 + u64::from(hex_value(b).unwrap_or_default());
        if size > MAX_CHUNK_SIZE {
            return Err(BodyError::BadChunk("chunk size over 2^40".into()));
        }
    }
    Ok(size)
}

impl BodyDecoder {
    /// A decoder for a body framed as `framing`, without a size limit.
    pub fn new(framing: BodyFraming) -> Self {
        Self::with_limit(framing, u64::MAX)
    }

    /// A decoder that fails with [`BodyError::TooLarge`] once the body exceeds `limit` bytes.
    pub fn with_limit(framing: BodyFraming, limit: u64) -> Self {
        let state = match framing {
            BodyFraming::None | BodyFraming::Length(0) => State::Done,
            BodyFraming::Length(n) => State::Length(n),
            BodyFraming::Chunked => State::ChunkSize,
            BodyFraming::UntilClose => State::UntilClose,
        };
        BodyDecoder {
            state,
            limit,
            delivered: 0,
            trailer_bytes: 0,
        }
    }

    /// Whether the whole body has been read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    fn account(&mut self, len: u64) -> Result<(), BodyError> {
        self.delivered = self.delivered.saturating_add(len);
        if self.delivered > self.limit {
            return Err(BodyError::TooLarge);
        }
        Ok(())
    }

    /// Consumes a prefix of `input` and returns the body bytes in it (at most one contiguous
    /// run per call). `consumed == 0` with no data means more input is needed (or the body is
    /// done). `done` once the body is complete: Length reached, chunked last-chunk and trailers
    /// read, or at once for no body. UntilClose never reports done; see [`Self::finish_eof`].
    pub fn decode<'a>(&mut self, input: &'a [u8]) -> Result<Decoded<'a>, BodyError> {
        let mut pos = 0;
        let mut data: &'a [u8] = &[];
        loop {
            let rest = input.get(pos..).unwrap_or_default();
            match self.state {
                State::Done => break,
                State::Length(remaining) => {
                    let n = rest
                        .len()
                        .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    self.account(n as u64)?;
                    data = &rest[..n];
                    pos += n;
                    let left = remaining - n as u64;
                    self.state = if left == 0 {
                        State::Done
                    } else {
                        State::Length(left)
                    };
                    break;
                }
                State::UntilClose => {
                    self.account(rest.len() as u64)?;
                    data = rest;
                    pos += rest.len();
                    break;
                }
                State::ChunkSize => match take_line(rest)? {
                    Line::NeedMore => break,
                    Line::Complete(line, len) => {
                        let size = parse_chunk_size(line)?;
                        pos += len;
                        if size == 0 {
                            self.state = State::Trailers;
                        } else {
                            if self.delivered.saturating_add(size) > self.limit {
                                return Err(BodyError::TooLarge);
                            }
                            self.state = State::ChunkData(size);
                        }
                    }
                },
                State::ChunkData(remaining) => {
                    if !data.is_empty() || rest.is_empty() {
                        break;
                    }
                    let n = rest
                        .len()
                        .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    self.account(n as u64)?;
                    data = &rest[..n];
                    pos += n;
                    let left = remaining - n as u64;
                    self.state = if left == 0 {
                        State::ChunkDataEnd
                    } else {
                        State::ChunkData(left)
                    };
                }
                State::ChunkDataEnd => match rest {
                    [b'\r', b'\n', ..] => {
                        pos += 2;
                        self.state = State::ChunkSize;
                    }
                    [] | [b'\r'] => break,
                    _ => {
                        return Err(BodyError::BadChunk(
                            "chunk data not followed by CRLF".into(),
                        ))
                    }
                },
                State::Trailers => match take_line(rest)? {
                    Line::NeedMore => break,
                    Line::Complete(line, len) => {
                        pos += len;
                        self.trailer_bytes += len;
                        if line.is_empty() {
                            self.state = State::Done;
                        } else if self.trailer_bytes > MAX_TRAILERS {
                            return Err(BodyError::TooLarge);
                        }
                    }
                },
            }
        }
        Ok(Decoded {
            consumed: pos,
            data,
            done: self.state == State::Done,
        })
    }

    /// The connection reached EOF: ends an UntilClose body; an error if a Length or chunked
    /// body was cut short.
    pub fn finish_eof(&mut self) -> Result<(), BodyError> {
        match self.state {
            State::Done => Ok(()),
            State::UntilClose => {
                self.state = State::Done;
                Ok(())
            }
            State::Length(left) => Err(BodyError::BadChunk(format!(
                "connection closed with {left} body bytes missing"
            ))),
            _ => Err(BodyError::BadChunk(
                "connection closed inside a chunked body".into(),
            )),
        }
    }
}

/// Header names and values never carry CR, LF or NUL onto the wire.
fn sanitize(s: &str) -> Cow<'_, str> {
    if s.contains(['\r', '\n', '\0']) {
        Cow::Owned(s.replace(['\r', '\n', '\0'], " "))
    } else {
        Cow::Borrowed(s)
    }
}

fn write_headers<'a>(out: &mut Vec<u8>, headers: impl IntoIterator<Item = (&'a str, &'a str)>) {
    for (name, value) in headers {
        out.extend_from_slice(sanitize(name).as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(sanitize(value).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends an HTTP/1.1 request head (request line, headers, blank line) to `out`.
pub fn write_request_head(
    out: &mut Vec<u8>,
    method: &str,
    target: &str,
    headers: &[(String, String)],
) {
    let line = format!("{} {} HTTP/1.1\r\n", sanitize(method), sanitize(target));
    out.extend_from_slice(line.as_bytes());
    write_headers(out, headers.iter().map(|(n, v)| (n.as_str(), v.as_str())));
}

/// Appends an HTTP/1.1 response head with [`reason_phrase`]`(status)` to `out`.
pub fn write_response_head(out: &mut Vec<u8>, status: u16, headers: &[(String, String)]) {
    let line = format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status));
    out.extend_from_slice(line.as_bytes());
    write_headers(out, headers.iter().map(|(n, v)| (n.as_str(), v.as_str())));
}

/// The standard reason phrase of `status`; `"Unknown"` for codes without one.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        205 => "Reset Content",
        206 => "Partial Content",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Appends one chunk (hex size, CRLF, data, CRLF); empty data writes nothing, since a zero-size
/// chunk would end the body (that is [`LAST_CHUNK`]).
pub fn encode_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Hop-by-hop header fields, which a proxy must not forward.
pub fn is_hop_by_hop(name: &str) -> bool {
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    ]
    .iter()
    .any(|h| h.eq_ignore_ascii_case(name))
}

/// `headers` without the hop-by-hop ones: the standard set and every header the `Connection`
/// header names (RFC 9110 §7.6.1). What a proxy forwards.
pub fn end_to_end(headers: &[(String, String)]) -> Vec<(String, String)> {
    let listed: Vec<String> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    headers
        .iter()
        .filter(|(n, _)| !is_hop_by_hop(n) && !listed.contains(&n.to_ascii_lowercase()))
        .cloned()
        .collect()
}

/// A complete small response (error pages, JSON answers): head with `Content-Type` (omitted
/// when empty), `Content-Length` and `extra_headers`, then `body`. 1xx and 204 responses get
/// neither `Content-Length` nor body.
pub fn simple_response(
    status: u16,
    content_type: &str,
    body: &[u8],
    extra_headers: &[(&str, &str)],
) -> Vec<u8> {
    let bodiless = (100..200).contains(&status) || status == 204;
    let length = body.len().to_string();
    let mut headers: Vec<(&str, &str)> = Vec::with_capacity(extra_headers.len() + 2);
    if !content_type.is_empty() && !bodiless {
        headers.push(("Content-Type", content_type));
    }
    if !bodiless {
        headers.push(("Content-Length", &length));
    }
    headers.extend_from_slice(extra_headers);
    let mut out = Vec::with_capacity(128 + body.len());
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status)).as_bytes());
    write_headers(&mut out, headers);
    if !bodiless {
        out.extend_from_slice(body);
    }
    out
}

/// Result of [`drive_decoder`]: the body bytes, whether it completed, and the bytes left over.
struct Driven {
    body: Vec<u8>,
    done: bool,
    leftover: Vec<u8>,
}

/// Feeds `pieces` one after another into `decoder` the way a connection would (unconsumed bytes
/// are kept and presented again), checking the decoder's contract on every step.
fn drive_decoder<'p>(
    decoder: &mut BodyDecoder,
    pieces: impl IntoIterator<Item = &'p [u8]>,
) -> Result<Driven, BodyError> {
    let mut pending: Vec<u8> = Vec::new();
    let mut body = Vec::new();
    for piece in pieces {
        pending.extend_from_slice(piece);
        loop {
            let step = decoder.decode(&pending)?;
            let (consumed, done) = (step.consumed, step.done);
            assert!(consumed <= pending.len());
            assert!(step.data.len() <= consumed);
            body.extend_from_slice(step.data);
            assert_eq!(done, decoder.is_done());
            pending.drain(..consumed);
            if consumed == 0 || done {
                break;
            }
        }
    }
    Ok(Driven {
        body,
        done: decoder.is_done(),
        leftover: pending,
    })
}

/// Splits `data` into pieces whose sizes (1..=32) come from the bytes of `sizes`, cycled.
fn pieces<'a>(data: &'a [u8], sizes: &'a [u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    let mut i = 0;
    while !rest.is_empty() {
        let size = sizes
            .get(i % sizes.len().max(1))
            .map_or(1, |&b| b as usize % 32 + 1);
        let (piece, tail) = rest.split_at(size.min(rest.len()));
        out.push(piece);
        rest = tail;
        i += 1;
    }
    out
}

/// Fuzz entry point: parses `data` as a request and a response head, decodes the rest as a
/// chunked and as a `Length` body (length from the first byte) in pieces sized by the data, and
/// checks that chunk-encoding the rest decodes back to it. Panics only on a codec bug.
pub fn fuzz_one(data: &[u8]) {
    let _ = parse_request(data).map(|r| r.map(|(req, _)| (req.body_framing(), req.keep_alive())));
    let _ = parse_response(data).map(|r| r.map(|(resp, _)| resp.body_framing("GET")));
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    for framing in [
        BodyFraming::Chunked,
        BodyFraming::Length(u64::from(first) * 3),
    ] {
        let mut decoder = BodyDecoder::new(framing);
        if let Ok(driven) = drive_decoder(&mut decoder, pieces(rest, data)) {
            if let BodyFraming::Length(n) = framing {
                assert_eq!(driven.done, driven.body.len() as u64 == n);
                assert!(driven.body.len() as u64 <= n);
            }
            assert!(driven.body.len() + driven.leftover.len() <= rest.len());
        }
        let _ = decoder.finish_eof();
    }
    let mut encoded = Vec::new();
    for piece in pieces(rest, &[first]) {
        encode_chunk(&mut encoded, piece);
    }
    encoded.extend_from_slice(LAST_CHUNK);
    let mut decoder = BodyDecoder::new(BodyFraming::Chunked);
    match drive_decoder(&mut decoder, pieces(&encoded, data)) {
        Ok(driven) => {
            assert!(driven.done, "chunked round trip did not finish");
            assert_eq!(driven.body, rest, "chunked round trip changed the body");
            assert!(driven.leftover.is_empty());
        }
        Err(e) => panic!("chunked round trip failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(raw: &[u8]) -> Request {
        match parse_request(raw) {
            Ok(Some((r, n))) => {
                assert_eq!(n, raw.len());
                r
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    fn resp(raw: &str) -> Response {
        match parse_response(raw.as_bytes()) {
            Ok(Some((r, n))) => {
                assert_eq!(n, raw.len());
                r
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect()
    }

    /// xorshift64: deterministic "random" piece sizes without an RNG crate.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pieces<'a>(&mut self, data: &'a [u8], max: u64) -> Vec<&'a [u8]> {
            let mut out = Vec::new();
            let mut rest = data;
            while !rest.is_empty() {
                let n = (self.next() % max + 1) as usize;
                let (a, b) = rest.split_at(n.min(rest.len()));
                out.push(a);
                rest = b;
            }
            out
        }
    }

    #[test]
    fn end_to_end_drops_connection_listed_headers() {
        let h = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        };
        let headers = h(&[
            ("Host", "x"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("X-Kept", "2"),
        ]);
        assert_eq!(end_to_end(&headers), h(&[("Host", "x"), ("X-Kept", "2")]));
    }

    #[test]
    fn request_head_parses_with_original_case() {
        let raw = b"POST /api/rooms?x=1 HTTP/1.1\r\nHost: example.com\r\nX-Thing:  v a l \r\nContent-Length: 5\r\n\r\nhello";
        let (r, n) = parse_request(raw).unwrap().unwrap();
        assert_eq!(n, raw.len() - 5);
        assert_eq!(r.method, "POST");
        assert_eq!(r.target, "/api/rooms?x=1");
        assert_eq!(r.minor_version, 1);
        assert_eq!(
            r.headers,
            h(&[
                ("Host", "example.com"),
                ("X-Thing", "v a l"),
                ("Content-Length", "5")
            ])
        );
        assert_eq!(r.path(), "/api/rooms");
        assert_eq!(r.body_framing(), Ok(BodyFraming::Length(5)));
    }

    #[test]
    fn partial_heads_need_more() {
        let raw = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for cut in 0..raw.len() {
            assert_eq!(parse_request(&raw[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(parse_request(raw).unwrap().is_some());
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        for cut in 0..raw.len() {
            assert_eq!(parse_response(&raw[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn non_utf8_values_are_lossy() {
        let r = req(b"GET / HTTP/1.0\r\nX: a\xffb\r\n\r\n");
        assert_eq!(header(&r.headers, "x"), Some("a\u{fffd}b"));
        assert_eq!(r.minor_version, 0);
    }

    #[test]
    fn invalid_heads_are_errors() {
        assert!(matches!(
            parse_request(b"GET / HTTP/2.0\r\n\r\n"),
            Err(HeadError::Invalid(_))
        ));
        assert!(matches!(
            parse_request(b"GE T\0 / HTTP/1.1\r\n\r\n"),
            Err(HeadError::Invalid(_))
        ));
        assert!(matches!(
            parse_response(b"HTTP/1.1 abc OK\r\n\r\n"),
            Err(HeadError::Invalid(_))
        ));
        assert!(matches!(
            parse_request(b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"),
            Err(HeadError::Invalid(_))
        ));
    }

    #[test]
    fn too_large_heads() {
        let mut raw = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        raw.resize(MAX_HEAD, b'a');
        assert_eq!(parse_request(&raw), Ok(None));
        raw.push(b'a');
        assert_eq!(parse_request(&raw), Err(HeadError::TooLarge));
        raw.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_request(&raw), Err(HeadError::TooLarge));

        let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("H{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse_response(&many), Err(HeadError::TooLarge));
        assert_eq!(
            HeadError::TooLarge.to_string(),
            "HTTP head too large".to_string()
        );
    }

    #[test]
    fn response_head_parses() {
        let r = resp("HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n\r\n");
        assert_eq!(r.status, 404);
        assert_eq!(r.reason, "Not Found");
        assert_eq!(r.minor_version, 0);
        assert_eq!(header(&r.headers, "CONTENT-TYPE"), Some("text/plain"));
        assert!(!r.keep_alive());
    }

    #[test]
    fn header_and_token_lookup() {
        let hs = h(&[
            ("Connection", "keep-alive, Upgrade"),
            ("X", "1"),
            ("x", "2"),
            ("Accept", "text/closer"),
        ]);
        assert_eq!(header(&hs, "x"), Some("1"));
        assert_eq!(header(&hs, "missing"), None);
        assert!(header_has_token(&hs, "connection", "upgrade"));
        assert!(header_has_token(&hs, "CONNECTION", "Keep-Alive"));
        assert!(!header_has_token(&hs, "connection", "close"));
        assert!(!header_has_token(&hs, "accept", "text"));
        assert!(!header_has_token(&hs, "accept", "close"));
    }

    #[test]
    fn keep_alive_and_expect() {
        assert!(req(b"GET / HTTP/1.1\r\n\r\n").keep_alive());
        assert!(!req(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n").keep_alive());
        assert!(!req(b"GET / HTTP/1.0\r\n\r\n").keep_alive());
        assert!(req(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive());
        assert!(!resp("HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n").keep_alive());
        assert!(resp("HTTP/1.1 200 OK\r\n\r\n").keep_alive());
        assert!(req(b"PUT / HTTP/1.1\r\nExpect: 100-Continue\r\n\r\n").expects_continue());
        assert!(!req(b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n").expects_continue());
        assert!(!req(b"PUT / HTTP/1.1\r\n\r\n").expects_continue());
    }

    #[test]
    fn request_body_framing() {
        let f = |raw: &str| req(raw.as_bytes()).body_framing();
        assert_eq!(f("GET / HTTP/1.1\r\n\r\n"), Ok(BodyFraming::None));
        assert_eq!(
            f("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"),
            Ok(BodyFraming::Length(0))
        );
        assert_eq!(
            f("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 9\r\n\r\n"),
            Ok(BodyFraming::Chunked)
        );
        assert_eq!(
            f("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: Chunked\r\n\r\n"),
            Ok(BodyFraming::Chunked)
        );
        assert_eq!(
            f("POST / HTTP/1.1\r\nContent-Length: 7\r\ncontent-length: 7, 7\r\n\r\n"),
            Ok(BodyFraming::Length(7))
        );
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 7\r\nContent-Length: 8\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 7, 8\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        ] {
            assert!(matches!(f(bad), Err(HeadError::Invalid(_))), "{bad:?}");
        }
    }

    #[test]
    fn response_body_framing() {
        let cl = "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n";
        assert_eq!(resp(cl).body_framing("GET"), Ok(BodyFraming::Length(12)));
        assert_eq!(resp(cl).body_framing("HEAD"), Ok(BodyFraming::None));
        for status in [
            "100 Continue",
            "101 Switching Protocols",
            "204 No Content",
            "304 Not Modified",
        ] {
            let raw = format!("HTTP/1.1 {status}\r\nContent-Length: 5\r\n\r\n");
            assert_eq!(
                resp(&raw).body_framing("GET"),
                Ok(BodyFraming::None),
                "{status}"
            );
        }
        let chunked = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(resp(chunked).body_framing("POST"), Ok(BodyFraming::Chunked));
        let plain = "HTTP/1.1 200 OK\r\n\r\n";
        assert_eq!(resp(plain).body_framing("GET"), Ok(BodyFraming::UntilClose));
        let gzip = "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(resp(gzip).body_framing("GET"), Ok(BodyFraming::UntilClose));
        let bad = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n";
        assert!(resp(bad).body_framing("GET").is_err());
    }

    #[test]
    fn query_param_decoding() {
        let r = req(b"GET /sse/abc?name=J%C3%B6rg+M%20x&empty=&flag&bad=%zz%4&k%65y=v#frag HTTP/1.1\r\n\r\n");
        assert_eq!(r.path(), "/sse/abc");
        assert_eq!(r.query_param("name").as_deref(), Some("Jörg M x"));
        assert_eq!(r.query_param("empty").as_deref(), Some(""));
        assert_eq!(r.query_param("flag").as_deref(), Some(""));
        assert_eq!(r.query_param("bad").as_deref(), Some("%zz%4"));
        assert_eq!(r.query_param("key").as_deref(), Some("v"));
        assert_eq!(r.query_param("missing"), None);
        let plain = req(b"GET /x HTTP/1.1\r\n\r\n");
        assert_eq!(plain.path(), "/x");
        assert_eq!(plain.query_param("x"), None);
        let lossy = req(b"GET /?v=%ff HTTP/1.1\r\n\r\n");
        assert_eq!(lossy.query_param("v").as_deref(), Some("\u{fffd}"));
    }

    fn chunked_body(parts: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in parts {
            encode_chunk(&mut out, p);
        }
        out.extend_from_slice(LAST_CHUNK);
        out
    }

    #[test]
    fn encode_chunk_bytes() {
        let mut out = Vec::new();
        encode_chunk(&mut out, b"");
        assert!(out.is_empty());
        encode_chunk(&mut out, &[b'x'; 26]);
        assert_eq!(&out[..4], b"1a\r\n");
        assert_eq!(&out[out.len() - 2..], b"\r\n");
        assert_eq!(out.len(), 4 + 26 + 2);
    }

    #[test]
    fn chunked_round_trip_one_byte_at_a_time() {
        let parts: [&[u8]; 4] = [b"hello ", b"", &[7u8; 300], b"world"];
        let expected: Vec<u8> = parts.concat();
        let mut wire = chunked_body(&parts);
        wire.extend_from_slice(b"GET /next");
        let mut dec = BodyDecoder::new(BodyFraming::Chunked);
        let driven = drive_decoder(&mut dec, wire.chunks(1)).unwrap();
        assert_eq!(driven.body, expected);
        assert!(driven.done);
        assert_eq!(driven.leftover, b"GET /next");
        assert_eq!(dec.finish_eof(), Ok(()));
    }

    #[test]
    fn chunked_round_trip_random_pieces() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for round in 0..200 {
            let parts: Vec<Vec<u8>> = (0..(rng.next() % 6))
                .map(|_| {
                    (0..rng.next() % 200)
                        .map(|i| (i as u8) ^ (round as u8))
                        .collect()
                })
                .collect();
            let refs: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
            let wire = chunked_body(&refs);
            let mut dec = BodyDecoder::new(BodyFraming::Chunked);
            let max = 1 + rng.next() % 40;
            let driven = drive_decoder(&mut dec, rng.pieces(&wire, max)).unwrap();
            assert_eq!(driven.body, parts.concat(), "round {round}");
            assert!(driven.done && driven.leftover.is_empty());
        }
    }

    #[test]
    fn chunked_extensions_and_trailers() {
        let wire =
            b"5;name=val\r\nhello\r\nA \t; x\r\n0123456789\r\n0\r\nX-Sum: 1\r\nY: 2\r\n\r\nrest";
        for step in [1, 3, wire.len()] {
            let mut dec = BodyDecoder::new(BodyFraming::Chunked);
            let driven = drive_decoder(&mut dec, wire.chunks(step)).unwrap();
            assert_eq!(driven.body, b"hello0123456789");
            assert!(driven.done);
            assert_eq!(driven.leftover, b"rest");
        }
    }

    #[test]
    fn decode_reports_need_more_and_done() {
        let mut dec = BodyDecoder::new(BodyFraming::Chunked);
        let d = dec.decode(b"1f").unwrap();
        assert_eq!((d.consumed, d.data, d.done), (0, &b""[..], false));
        let d = dec.decode(b"3\r\nab").unwrap();
        assert_eq!((d.consumed, d.data, d.done), (5, &b"ab"[..], false));
        let d = dec.decode(b"c\r").unwrap();
        assert_eq!((d.consumed, d.data), (1, &b"c"[..]));
        let d = dec.decode(b"\r\n0\r\n\r\nnext").unwrap();
        assert_eq!((d.consumed, d.data, d.done), (7, &b""[..], true));
        let d = dec.decode(b"next").unwrap();
        assert_eq!((d.consumed, d.done), (0, true));

        let mut none = BodyDecoder::new(BodyFraming::None);
        assert!(none.is_done());
        let d = none.decode(b"GET").unwrap();
        assert_eq!((d.consumed, d.done), (0, true));
    }

    #[test]
    fn bad_chunks() {
        for bad in [
            &b"x\r\n"[..],
            b"5 x\r\nhello\r\n",
            b"5\nhello\r\n",
            b"5\r\nhelloXX",
            b"10000000001\r\n",
            b"0\r\nTrailer\n",
        ] {
            let mut dec = BodyDecoder::new(BodyFraming::Chunked);
            let r = drive_decoder(&mut dec, [bad]);
            assert!(
                matches!(r, Err(BodyError::BadChunk(_))),
                "{bad:?}: {:?}",
                r.is_ok()
            );
        }
        let mut dec = BodyDecoder::new(BodyFraming::Chunked);
        let ok = dec.decode(b"10000000000\r\n").unwrap();
        assert_eq!(ok.consumed, 13);

        let long = vec![b'0'; MAX_CHUNK_LINE];
        let mut dec = BodyDecoder::new(BodyFraming::Chunked);
        assert!(matches!(dec.decode(&long), Err(BodyError::BadChunk(_))));
        let mut dec = BodyDecoder::new(BodyFraming::Chunked);
        assert_eq!(dec.decode(&long[..MAX_CHUNK_LINE - 1]).unwrap().consumed, 0);

        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..2000 {
            trailers.extend_from_slice(b"X-Pad: 0123456789\r\n");
        }
        let mut dec = BodyDecoder::new(BodyFraming::Chunked);
        assert_eq!(
            drive_decoder(&mut dec, [trailers.as_slice()]).err(),
            Some(BodyError::TooLarge)
        );
    }

    #[test]
    fn length_body_one_byte_at_a_time() {
        let mut wire = (0..=255u8).cycle().take(1000).collect::<Vec<u8>>();
        let expected = wire.clone();
        wire.extend_from_slice(b"HTTP/1.1 200");
        let mut dec = BodyDecoder::new(BodyFraming::Length(1000));
        let driven = drive_decoder(&mut dec, wire.chunks(1)).unwrap();
        assert_eq!(driven.body, expected);
        assert!(driven.done);
        assert_eq!(driven.leftover, b"HTTP/1.1 200");
        let mut dec = BodyDecoder::new(BodyFraming::Length(1000));
        let d = dec.decode(&wire).unwrap();
        assert_eq!((d.consumed, d.data.len(), d.done), (1000, 1000, true));
    }

    #[test]
    fn finish_eof_semantics() {
        let mut until = BodyDecoder::new(BodyFraming::UntilClose);
        let d = until.decode(b"abc").unwrap();
        assert_eq!((d.consumed, d.data, d.done), (3, &b"abc"[..], false));
        assert!(!until.is_done());
        assert_eq!(until.finish_eof(), Ok(()));
        assert!(until.is_done());

        let mut len = BodyDecoder::new(BodyFraming::Length(4));
        len.decode(b"abc").unwrap();
        assert!(matches!(len.finish_eof(), Err(BodyError::BadChunk(_))));
        len.decode(b"d").unwrap();
        assert_eq!(len.finish_eof(), Ok(()));

        let mut chunked = BodyDecoder::new(BodyFraming::Chunked);
        chunked.decode(b"3\r\nabc\r\n").unwrap();
        assert!(matches!(chunked.finish_eof(), Err(BodyError::BadChunk(_))));

        assert_eq!(BodyDecoder::new(BodyFraming::None).finish_eof(), Ok(()));
    }

    #[test]
    fn body_limit() {
        let mut dec = BodyDecoder::with_limit(BodyFraming::Length(10), 4);
        assert_eq!(dec.decode(b"abcdefghij").err(), Some(BodyError::TooLarge));
        let mut dec = BodyDecoder::with_limit(BodyFraming::Length(4), 4);
        assert!(dec.decode(b"abcd").unwrap().done);
        let mut dec = BodyDecoder::with_limit(BodyFraming::Chunked, 4);
        assert!(dec.decode(b"3\r\nabc\r\n").is_ok());
        assert_eq!(dec.decode(b"2\r\n").err(), Some(BodyError::TooLarge));
        let mut dec = BodyDecoder::with_limit(BodyFraming::UntilClose, 2);
        assert_eq!(dec.decode(b"abc").err(), Some(BodyError::TooLarge));
    }

    #[test]
    fn heads_serialise() {
        let mut out = Vec::new();
        write_request_head(
            &mut out,
            "GET",
            "/v1/models",
            &h(&[("Host", "localhost"), ("X-Evil", "a\r\nInjected: 1")]),
        );
        assert_eq!(
            out,
            b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Evil: a  Injected: 1\r\n\r\n"
        );
        let (r, n) = parse_request(&out).unwrap().unwrap();
        assert_eq!((n, r.headers.len()), (out.len(), 2));

        let mut out = Vec::new();
        write_response_head(&mut out, 599, &h(&[("A", "b")]));
        assert_eq!(out, b"HTTP/1.1 599 Unknown\r\nA: b\r\n\r\n");
        assert_eq!(reason_phrase(502), "Bad Gateway");
        assert_eq!(reason_phrase(200), "OK");
    }

    #[test]
    fn simple_response_bytes() {
        let out = simple_response(
            404,
            "text/plain",
            b"nope",
            &[("Access-Control-Allow-Origin", "*")],
        );
        assert_eq!(
            out,
            b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 4\r\nAccess-Control-Allow-Origin: *\r\n\r\nnope"
                .to_vec()
        );
        assert_eq!(
            simple_response(204, "text/plain", b"", &[]),
            b"HTTP/1.1 204 No Content\r\n\r\n".to_vec()
        );
        let parsed = resp(std::str::from_utf8(&out[..out.len() - 4]).unwrap());
        assert_eq!(parsed.body_framing("GET"), Ok(BodyFraming::Length(4)));
    }

    #[test]
    fn hop_by_hop() {
        for name in [
            "Connection",
            "TE",
            "transfer-encoding",
            "Proxy-Authorization",
            "Upgrade",
        ] {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in ["Content-Length", "Host", "Authorization", "Trailers"] {
            assert!(!is_hop_by_hop(name), "{name}");
        }
    }

    #[test]
    fn fuzz_one_survives_samples() {
        let mut rng = Rng(42);
        let samples: Vec<Vec<u8>> = vec![
            Vec::new(),
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            b"\x05a\r\nhello\r\n0\r\n\r\n".to_vec(),
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            (0..500).map(|_| rng.next() as u8).collect(),
            b"\xff\xff\xff\xff\xff\xff".to_vec(),
        ];
        for s in samples {
            fuzz_one(&s);
        }
    }
}
