//! Minimal HTTP/1.1 on tokio for the stand-in client: reading a request or response head, reading
//! a whole body (Content-Length, chunked, or to EOF) and reading a body chunk by chunk. Used by the
//! proxy's listener and the serve side's upstream client (`crate::tunnel`).

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt};

const MAX_HEAD: usize = 64 * 1024;

/// A parsed message head. `start` holds the three parts of the first line.
#[derive(Debug)]
pub struct Head {
    pub start: [String; 3],
    /// Header names lowercased, in order, repeated names kept.
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn chunked(&self) -> bool {
        self.get("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    }

    fn content_length(&self) -> Result<Option<usize>> {
        self.get("content-length")
            .map(|v| v.trim().parse().context("bad content-length"))
            .transpose()
    }
}

/// A reader holding the bytes read past the head.
pub struct Reader<R> {
    io: R,
    buf: Vec<u8>,
}

/// How the rest of a body is delimited.
enum Framing {
    Length(usize),
    Chunked { left_in_chunk: usize, done: bool },
    Eof,
}

/// Reads a body piece by piece, as it arrives.
pub struct Body<'a, R> {
    reader: &'a mut Reader<R>,
    framing: Framing,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(io: R) -> Self {
        Reader {
            io,
            buf: Vec::new(),
        }
    }

    async fn fill(&mut self) -> Result<bool> {
        let mut tmp = [0u8; 16 * 1024];
        let n = self.io.read(&mut tmp).await?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n > 0)
    }

    async fn line(&mut self) -> Result<String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            if self.buf.len() > MAX_HEAD {
                bail!("line too long");
            }
            if !self.fill().await? {
                bail!("connection closed");
            }
        }
    }

    /// Reads a head; `Ok(None)` on a clean EOF before any byte.
    pub async fn head(&mut self) -> Result<Option<Head>> {
        if self.buf.is_empty() && !self.fill().await? {
            return Ok(None);
        }
        let first = self.line().await?;
        let mut parts = first.splitn(3, ' ').map(str::to_owned);
        let start = [
            parts.next().unwrap_or_default(),
            parts.next().ok_or_else(|| anyhow!("bad start line"))?,
            parts.next().unwrap_or_default(),
        ];
        let mut headers = Vec::new();
        loop {
            let line = self.line().await?;
            if line.is_empty() {
                break;
            }
            let (n, v) = line
                .split_once(':')
                .ok_or_else(|| anyhow!("bad header line"))?;
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        Ok(Some(Head { start, headers }))
    }

    /// The body of a request: Content-Length or chunked, else empty.
    pub fn request_body<'a>(&'a mut self, head: &Head) -> Result<Body<'a, R>> {
        let framing = if head.chunked() {
            Framing::Chunked {
                left_in_chunk: 0,
                done: false,
            }
        } else {
            Framing::Length(head.content_length()?.unwrap_or(0))
        };
        Ok(Body {
            reader: self,
            framing,
        })
    }

    /// The body of a response: chunked, Content-Length, or to EOF.
    pub fn response_body<'a>(&'a mut self, head: &Head) -> Result<Body<'a, R>> {
        let framing = if head.chunked() {
            Framing::Chunked {
                left_in_chunk: 0,
                done: false,
            }
        } else {
            match head.content_length()? {
                Some(n) => Framing::Length(n),
                None => Framing::Eof,
            }
        };
        Ok(Body {
            reader: self,
            framing,
        })
    }
}

impl<R: AsyncRead + Unpin> Body<'_, R> {
    /// The next piece of the body; `None` at its end.
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>> {
        match &mut self.framing {
            Framing::Length(0) => Ok(None),
            Framing::Length(left) => {
                if self.reader.buf.is_empty() && !self.reader.fill().await? {
                    bail!("connection closed inside the body");
                }
                let n = (*left).min(self.reader.buf.len());
                *left -= n;
                Ok(Some(self.reader.buf.drain(..n).collect()))
            }
            Framing::Eof => {
                if self.reader.buf.is_empty() && !self.reader.fill().await? {
                    return Ok(None);
                }
                Ok(Some(std::mem::take(&mut self.reader.buf)))
            }
            Framing::Chunked {
                left_in_chunk,
                done,
            } => {
                if *done {
                    return Ok(None);
                }
                if *left_in_chunk == 0 {
                    let size_line = self.reader.line().await?;
                    let hex = size_line.split(';').next().unwrap_or("").trim();
                    let size = usize::from_str_radix(hex, 16).context("bad chunk size")?;
                    if size == 0 {
                        loop {
                            if self.reader.line().await?.is_empty() {
                                break;
                            }
                        }
                        *done = true;
                        return Ok(None);
                    }
                    *left_in_chunk = size;
                }
                // What has arrived of the chunk (usually the whole chunk).
                if self.reader.buf.is_empty() && !self.reader.fill().await? {
                    bail!("connection closed inside a chunk");
                }
                let n = (*left_in_chunk).min(self.reader.buf.len());
                let piece: Vec<u8> = self.reader.buf.drain(..n).collect();
                *left_in_chunk -= n;
                if *left_in_chunk == 0 {
                    let crlf = self.reader.line().await?;
                    if !crlf.is_empty() {
                        bail!("missing CRLF after chunk");
                    }
                }
                Ok(Some(piece))
            }
        }
    }

    /// The whole remaining body.
    pub async fn read_all(&mut self, limit: usize) -> Result<Vec<u8>> {
        let mut all = Vec::new();
        while let Some(p) = self.next().await? {
            all.extend_from_slice(&p);
            if all.len() > limit {
                bail!("body too large");
            }
        }
        Ok(all)
    }
}
