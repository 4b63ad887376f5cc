//! A small RESP2 client for `tunnel signal --cluster`: a sans-IO codec (`encode`, `parse`) and
//! one non-blocking connection (`Conn`) that the signal server's mio loop drives through
//! `signal::cluster`, which holds two of them (commands, and the pub/sub subscription).
//! Commands are pipelined; both buffers are bounded (`MAX_OUTPUT`, `MAX_INPUT`), and the parser
//! refuses what no sane server sends (`MAX_BULK`, `MAX_ELEMENTS`, `MAX_DEPTH`, `MAX_LINE`).

use std::io::{self, Read};
use std::net::SocketAddr;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::nbio::would_block;

/// Largest bulk string accepted from the server.
pub const MAX_BULK: usize = 16 << 20;
/// Most elements accepted in one array reply.
pub const MAX_ELEMENTS: usize = 1 << 20;
/// Deepest nesting of arrays accepted.
pub const MAX_DEPTH: usize = 8;
/// Longest simple line (status, error, integer, length) accepted.
pub const MAX_LINE: usize = 64 * 1024;
/// Commands waiting for the socket past this many bytes are refused (`Conn::queue` says so).
pub const MAX_OUTPUT: usize = 8 << 20;
/// Unparsed input past this many bytes is a protocol error (no reply we ask for is this big).
pub const MAX_INPUT: usize = 32 << 20;

/// One RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    /// `None`: the null bulk string.
    Bulk(Option<Vec<u8>>),
    /// `None`: the null array.
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The bytes of a bulk or simple string.
    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Reply::Bulk(Some(b)) => Some(b),
            Reply::Simple(s) => Some(s.as_bytes()),
            _ => None,
        }
    }

    /// The elements of an array (a null array has none).
    pub fn items(&self) -> &[Reply] {
        match self {
            Reply::Array(Some(items)) => items,
            _ => &[],
        }
    }
}

/// A reply the codec cannot accept: the connection must be dropped.
#[derive(Debug, PartialEq, Eq)]
pub struct ProtocolError(pub String);

/// Appends `args` as one command (an array of bulk strings).
pub fn encode(args: &[&[u8]], out: &mut Vec<u8>) {
    out.push(b'*');
    out.extend_from_slice(args.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for a in args {
        out.push(b'$');
        out.extend_from_slice(a.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Parses one reply from the start of `buf`: `Ok(None)` while it is incomplete, else the reply
/// and the bytes it took.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, ProtocolError> {
    parse_at(buf, 0, 0)
}

fn err(text: impl Into<String>) -> ProtocolError {
    ProtocolError(text.into())
}

/// The line starting at `pos` (without its CRLF) and the position after it.
fn line(buf: &[u8], pos: usize) -> Result<Option<(&[u8], usize)>, ProtocolError> {
    let rest = buf.get(pos..).unwrap_or_default();
    match rest.windows(2).position(|w| w == b"\r\n") {
        Some(n) if n > MAX_LINE => Err(err("line too long")),
        Some(n) => Ok(Some((&rest[..n], pos + n + 2))),
        None if rest.len() > MAX_LINE => Err(err("line too long")),
        None => Ok(None),
    }
}

fn number(text: &[u8]) -> Result<i64, ProtocolError> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .ok_or_else(|| err("bad number"))
}

/// A length: -1 is null (`None`), other negatives and values over `max` are errors.
fn length(text: &[u8], max: usize) -> Result<Option<usize>, ProtocolError> {
    match number(text)? {
        -1 => Ok(None),
        n if n < 0 => Err(err("negative length")),
        n => match usize::try_from(n) {
            Ok(n) if n <= max => Ok(Some(n)),
            _ => Err(err(format!("length {n} over the cap of {max}"))),
        },
    }
}

fn parse_at(buf: &[u8], pos: usize, depth: usize) -> Result<Option<(Reply, usize)>, ProtocolError> {
    let Some(&kind) = buf.get(pos) else {
        return Ok(None);
    };
    let Some((text, next)) = line(buf, pos + 1)? else {
        return Ok(None);
    };
    let string = || String::from_utf8_lossy(text).into_owned();
    match kind {
        b'+' => Ok(Some((Reply::Simple(string()), next))),
        b'-' => Ok(Some((Reply::Error(string()), next))),
        b':' => Ok(Some((Reply::Int(number(text)?), next))),
        b'$' => {
            let Some(n) = length(text, MAX_BULK)? else {
                return Ok(Some((Reply::Bulk(None), next)));
            };
            let end = next + n;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(err("bulk string without its CRLF"));
            }
            Ok(Some((Reply::Bulk(Some(buf[next..end].to_vec())), end + 2)))
        }
        b'*' => {
            if depth >= MAX_DEPTH {
                return Err(err("arrays nested too deep"));
            }
            let Some(n) = length(text, MAX_ELEMENTS)? else {
                return Ok(Some((Reply::Array(None), next)));
            };
            // Each element takes at least 3 bytes: never reserve more than the input can hold.
            let mut items = Vec::with_capacity(n.min(buf.len() / 3));
            let mut at = next;
            for _ in 0..n {
                match parse_at(buf, at, depth + 1)? {
                    Some((item, after)) => {
                        items.push(item);
                        at = after;
                    }
                    None => return Ok(None),
                }
            }
            Ok(Some((Reply::Array(Some(items)), at)))
        }
        other => Err(err(format!("unknown reply type byte 0x{other:02x}"))),
    }
}

/// Runs the parser over arbitrary bytes, as the fuzz target does: it must never panic, and
/// what it parses must fit in the input.
pub fn fuzz_one(data: &[u8]) {
    let mut pos = 0;
    while let Ok(Some((_, n))) = parse(&data[pos..]) {
        assert!(n > 0 && pos + n <= data.len());
        pos += n;
    }
    let mut out = Vec::new();
    encode(&[data, b"x"], &mut out);
    match parse(&out) {
        Ok(Some((Reply::Array(Some(items)), n))) => {
            assert_eq!(n, out.len());
            assert_eq!(items[0], Reply::Bulk(Some(data.to_vec())));
        }
        other if data.len() > MAX_BULK => assert!(other.is_err()),
        other => panic!("an encoded command did not parse back: {other:?}"),
    }
}

/// One connection to the Redis server, non-blocking, registered with the loop's poll.
pub struct Conn {
    stream: TcpStream,
    /// The TCP handshake completed.
    pub connected: bool,
    out: Vec<u8>,
    inbuf: Vec<u8>,
}

impl Conn {
    /// Starts connecting to `addr`; the loop reports `token` when it completes or fails.
    pub fn connect(addr: SocketAddr, registry: &Registry, token: Token) -> io::Result<Conn> {
        let mut stream = TcpStream::connect(addr)?;
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            connected: false,
            out: Vec::new(),
            inbuf: Vec::new(),
        })
    }

    /// Unregisters the socket; the connection is dropped after this.
    pub fn close(mut self, registry: &Registry) {
        let _ = registry.deregister(&mut self.stream);
    }

    /// Queues a command; false (and nothing queued) when `MAX_OUTPUT` bytes already wait.
    pub fn queue(&mut self, args: &[&[u8]]) -> bool {
        if self.out.len() >= MAX_OUTPUT {
            return false;
        }
        encode(args, &mut self.out);
        true
    }

    /// Bytes waiting for the socket.
    pub fn queued(&self) -> usize {
        self.out.len()
    }

    /// Writes what the socket takes.
    pub fn flush(&mut self) -> Result<(), String> {
        if !self.connected {
            return Ok(());
        }
        crate::nbio::write_out(&mut self.stream, &mut self.out, 0).map_err(|e| e.to_string())
    }

    /// After a readiness event: completes the connect, writes, reads, and appends every whole
    /// reply to `replies`. An error means the connection is unusable.
    pub fn ready(&mut self, scratch: &mut [u8], replies: &mut Vec<Reply>) -> Result<(), String> {
        if !self.connected {
            if let Ok(Some(e)) | Err(e) = self.stream.take_error() {
                return Err(e.to_string());
            }
            match self.stream.peer_addr() {
                Ok(_) => self.connected = true,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
                Err(e) => return Err(e.to_string()),
            }
        }
        self.flush()?;
        loop {
            match self.stream.read(scratch) {
                Ok(0) => return Err("connection closed by the server".into()),
                Ok(n) => {
                    self.inbuf.extend_from_slice(&scratch[..n]);
                    if self.inbuf.len() > MAX_INPUT {
                        return Err(format!("more than {MAX_INPUT} bytes of unparsed input"));
                    }
                }
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        let mut pos = 0;
        while let Some((reply, n)) = parse(&self.inbuf[pos..]).map_err(|e| e.0)? {
            replies.push(reply);
            pos += n;
        }
        self.inbuf.drain(..pos);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Reply {
        Reply::Bulk(Some(s.as_bytes().to_vec()))
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        encode(&[b"SET", b"k", b"v a"], &mut out);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv a\r\n");
    }

    #[test]
    fn every_reply_type() {
        let input = b"+OK\r\n-ERR no\r\n:42\r\n$5\r\nhe\r\nl\r\n$-1\r\n*-1\r\n*2\r\n$1\r\na\r\n*1\r\n:-7\r\n";
        let mut pos = 0;
        let mut got = Vec::new();
        while let Some((r, n)) = parse(&input[pos..]).unwrap() {
            got.push(r);
            pos += n;
        }
        assert_eq!(pos, input.len());
        assert_eq!(
            got,
            vec![
                Reply::Simple("OK".into()),
                Reply::Error("ERR no".into()),
                Reply::Int(42),
                bulk("he\r\nl"),
                Reply::Bulk(None),
                Reply::Array(None),
                Reply::Array(Some(vec![
                    bulk("a"),
                    Reply::Array(Some(vec![Reply::Int(-7)]))
                ])),
            ]
        );
    }

    #[test]
    fn split_reads_wait_for_the_whole_reply() {
        let whole = b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$12\r\nhello\r\nworld\r\n";
        for cut in 0..whole.len() {
            assert_eq!(parse(&whole[..cut]), Ok(None), "cut at {cut}");
        }
        let (reply, n) = parse(whole).unwrap().unwrap();
        assert_eq!(n, whole.len());
        assert_eq!(reply.items()[2], bulk("hello\r\nworld"));
    }

    #[test]
    fn what_no_server_sends_is_refused() {
        for bad in [
            &b"?x\r\n"[..],
            b":12a\r\n",
            b"$-2\r\n",
            b"$3\r\nabcXY",
            b"*-5\r\n",
            b"$99999999999\r\n",
            b"*99999999\r\n",
        ] {
            assert!(parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1);
        assert!(parse(deep.as_bytes()).is_err());
        let long = vec![b'+'; MAX_LINE + 2];
        assert!(parse(&long).is_err());
    }

    #[test]
    fn fuzz_entry_point_holds_on_odd_inputs() {
        for data in [
            &b""[..],
            b"*",
            b"*1\r\n*1\r\n",
            b"$0\r\n\r\n+\r\n",
            b"\xff\x00",
        ] {
            fuzz_one(data);
        }
    }
}
