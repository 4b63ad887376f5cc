//! The HTTP-over-data-channel halves of the stand-in client, v1 behaviour: the provider (`serve`)
//! answers HELLO with AGREE and forwards each request upstream after REQ_END, streaming RES_BODY
//! per upstream chunk; the consumer (`proxy`) sends HELLO once the channel opens, buffers each
//! HTTP request whole and maps RES_* back to the HTTP response. Driven by `crate::peer`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use webrtc::data_channel::data_channel_message::DataChannelMessage;
use webrtc::data_channel::RTCDataChannel;

use crate::frame::{self, Frame};
use crate::http::Reader;

/// Which side of the tunnel this process is.
pub enum Role {
    Serve { upstream: String },
    Proxy,
}

/// A request the provider is still receiving.
struct Pending {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// Tunnel state shared by the data-channel callbacks, the HTTP side and the signaling loop.
pub struct Tunnel {
    role: Role,
    dc: Mutex<Option<Arc<RTCDataChannel>>>,
    ready: AtomicBool,
    next_id: AtomicU32,
    /// Proxy: response frames for each open stream.
    waiting: Mutex<HashMap<u32, mpsc::UnboundedSender<Frame>>>,
    /// Serve: requests not yet ended.
    requests: Mutex<HashMap<u32, Pending>>,
    /// Asks the signaling loop to drop the peer connection.
    drop_tx: mpsc::UnboundedSender<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Tunnel {
    pub fn new(role: Role, drop_tx: mpsc::UnboundedSender<String>) -> Arc<Self> {
        Arc::new(Tunnel {
            role,
            dc: Mutex::new(None),
            ready: AtomicBool::new(false),
            next_id: AtomicU32::new(1),
            waiting: Mutex::new(HashMap::new()),
            requests: Mutex::new(HashMap::new()),
            drop_tx,
        })
    }

    fn is_proxy(&self) -> bool {
        matches!(self.role, Role::Proxy)
    }

    /// Takes over a data channel: HELLO on open (consumer), frames on message.
    pub fn attach(self: &Arc<Self>, dc: Arc<RTCDataChannel>) {
        *lock(&self.dc) = Some(dc.clone());
        let t = self.clone();
        dc.on_open(Box::new(move || {
            Box::pin(async move {
                log::info!("data channel open");
                if t.is_proxy() {
                    let hello = json!({"proto":"httptunnel","min_version":1,"max_version":1,"features":["sse"]});
                    if let Err(e) = t.send(frame::HELLO, 0, hello.to_string().as_bytes()).await {
                        log::warn!("sending HELLO: {e}");
                    }
                }
            })
        }));
        let t = self.clone();
        dc.on_message(Box::new(move |msg: DataChannelMessage| {
            let t = t.clone();
            Box::pin(async move {
                match frame::decode(&msg.data) {
                    Some(f) => t.on_frame(f).await,
                    None => log::warn!("short frame ({} bytes)", msg.data.len()),
                }
            })
        }));
        let t = self.clone();
        dc.on_close(Box::new(move || {
            let t = t.clone();
            Box::pin(async move {
                log::info!("data channel closed");
                t.reset();
            })
        }));
    }

    /// Asks the signaling loop to drop the peer connection.
    pub fn drop_link(&self, reason: String) {
        let _ = self.drop_tx.send(reason);
    }

    /// Forgets the data channel and fails the open streams.
    pub fn reset(&self) {
        *lock(&self.dc) = None;
        self.ready.store(false, Ordering::SeqCst);
        lock(&self.waiting).clear();
        lock(&self.requests).clear();
    }

    pub async fn send(&self, kind: u8, stream: u32, payload: &[u8]) -> Result<()> {
        let dc = lock(&self.dc)
            .clone()
            .ok_or_else(|| anyhow!("no data channel"))?;
        dc.send(&frame::encode(kind, stream, payload)).await?;
        Ok(())
    }

    async fn send_body(&self, kind: u8, stream: u32, body: &[u8]) -> Result<()> {
        for piece in body.chunks(frame::MAX_BODY) {
            self.send(kind, stream, piece).await?;
        }
        Ok(())
    }

    /// PING every 10 s while a channel is up.
    pub async fn pinger(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tick.tick().await;
            if self.ready.load(Ordering::SeqCst) {
                let _ = self.send(frame::PING, 0, &[]).await;
            }
        }
    }

    async fn on_frame(self: Arc<Self>, f: Frame) {
        log::debug!(
            "frame type {} stream {} ({} bytes)",
            f.kind,
            f.stream,
            f.payload.len()
        );
        match f.kind {
            frame::PING => {
                let _ = self.send(frame::PONG, 0, &[]).await;
            }
            frame::PONG => {}
            frame::HELLO if !self.is_proxy() => self.on_hello(&f.payload).await,
            frame::AGREE if self.is_proxy() => {
                log::info!("AGREE {}", String::from_utf8_lossy(&f.payload));
                self.ready.store(true, Ordering::SeqCst);
                eprintln!("tunnel ready");
            }
            frame::REQ_HEADERS | frame::REQ_BODY | frame::REQ_END if !self.is_proxy() => {
                if let Err(e) = self.on_request_frame(f) {
                    log::warn!("bad request frame: {e}");
                }
            }
            frame::RES_HEADERS | frame::RES_BODY | frame::RES_END | frame::ERROR
                if self.is_proxy() =>
            {
                let end = f.kind == frame::RES_END;
                let id = f.stream;
                let mut waiting = lock(&self.waiting);
                if let Some(tx) = waiting.get(&id) {
                    let _ = tx.send(f);
                }
                if end {
                    waiting.remove(&id);
                }
            }
            other => log::warn!("unexpected frame type {other}"),
        }
    }

    async fn on_hello(&self, payload: &[u8]) {
        let hello: Value = serde_json::from_slice(payload).unwrap_or(Value::Null);
        let min = hello["min_version"].as_u64().unwrap_or(u64::MAX);
        let max = hello["max_version"].as_u64().unwrap_or(0);
        if hello["proto"] != "httptunnel" || min > 1 || max < 1 {
            log::warn!("incompatible HELLO {hello}; dropping the connection");
            self.drop_link("incompatible HELLO".into());
            return;
        }
        let features: Vec<&str> = hello["features"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .filter(|f| *f == "sse")
                    .collect()
            })
            .unwrap_or_default();
        let agree = json!({"version":1,"features":features});
        match self
            .send(frame::AGREE, 0, agree.to_string().as_bytes())
            .await
        {
            Ok(()) => {
                self.ready.store(true, Ordering::SeqCst);
                eprintln!("tunnel ready");
            }
            Err(e) => log::warn!("sending AGREE: {e}"),
        }
    }

    fn on_request_frame(self: &Arc<Self>, f: Frame) -> Result<()> {
        let mut requests = lock(&self.requests);
        match f.kind {
            frame::REQ_HEADERS => {
                let v: Value = serde_json::from_slice(&f.payload)?;
                let headers = v["headers"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                            .collect()
                    })
                    .unwrap_or_default();
                requests.insert(
                    f.stream,
                    Pending {
                        method: v["method"].as_str().unwrap_or("GET").to_owned(),
                        path: v["path"].as_str().unwrap_or("/").to_owned(),
                        headers,
                        body: Vec::new(),
                    },
                );
            }
            frame::REQ_BODY => requests
                .get_mut(&f.stream)
                .ok_or_else(|| anyhow!("REQ_BODY for unknown stream {}", f.stream))?
                .body
                .extend_from_slice(&f.payload),
            _ => {
                let p = requests
                    .remove(&f.stream)
                    .ok_or_else(|| anyhow!("REQ_END for unknown stream {}", f.stream))?;
                let Role::Serve { upstream } = &self.role else {
                    bail!("not a provider");
                };
                tokio::spawn(forward(self.clone(), upstream.clone(), f.stream, p));
            }
        }
        Ok(())
    }
}

/// `http://host:port/base` → (`host:port`, `/base` without a trailing slash).
fn split_url(url: &str) -> Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("upstream must be http://"))?;
    let (host, base) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
        None => (rest, ""),
    };
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:80")
    };
    Ok((host, base.to_owned()))
}

/// Serve side: one request to the upstream, the response streamed back as RES_* frames.
async fn forward(t: Arc<Tunnel>, upstream: String, id: u32, p: Pending) {
    let mut headers_sent = false;
    if let Err(e) = forward_inner(&t, &upstream, id, p, &mut headers_sent).await {
        log::warn!("stream {id}: upstream error: {e:#}");
        if headers_sent {
            let _ = t
                .send(
                    frame::ERROR,
                    id,
                    format!("upstream error: {e:#}").as_bytes(),
                )
                .await;
        } else {
            let head = json!({"stream_id":id,"status":502,"headers":{"content-type":"text/plain"}});
            let _ = t
                .send(frame::RES_HEADERS, id, head.to_string().as_bytes())
                .await;
            let _ = t
                .send(
                    frame::RES_BODY,
                    id,
                    format!("Bad Gateway: {e:#}").as_bytes(),
                )
                .await;
        }
    }
    let _ = t.send(frame::RES_END, id, &[]).await;
}

async fn forward_inner(
    t: &Tunnel,
    upstream: &str,
    id: u32,
    p: Pending,
    headers_sent: &mut bool,
) -> Result<()> {
    let (host, base) = split_url(upstream)?;
    let sock = TcpStream::connect(&host)
        .await
        .with_context(|| format!("connecting to {host}"))?;
    let (rd, mut wr) = sock.into_split();
    let mut req = format!(
        "{} {}{} HTTP/1.1\r\nhost: {host}\r\n",
        p.method, base, p.path
    );
    for (n, v) in &p.headers {
        if !matches!(
            n.as_str(),
            "host" | "connection" | "transfer-encoding" | "content-length"
        ) {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
    }
    if !p.body.is_empty() || !matches!(p.method.as_str(), "GET" | "HEAD") {
        req.push_str(&format!("content-length: {}\r\n", p.body.len()));
    }
    req.push_str("connection: close\r\n\r\n");
    wr.write_all(req.as_bytes()).await?;
    wr.write_all(&p.body).await?;
    let mut r = Reader::new(rd);
    let head = r
        .head()
        .await?
        .ok_or_else(|| anyhow!("upstream closed before answering"))?;
    let status: u16 = head.start[1].parse().context("bad upstream status")?;
    let mut map = Map::new();
    for (n, v) in &head.headers {
        map.insert(n.clone(), Value::String(v.clone()));
    }
    let res = json!({"stream_id":id,"status":status,"headers":map});
    t.send(frame::RES_HEADERS, id, res.to_string().as_bytes())
        .await?;
    *headers_sent = true;
    let mut body = r.response_body(&head)?;
    while let Some(piece) = body.next().await? {
        t.send_body(frame::RES_BODY, id, &piece).await?;
    }
    Ok(())
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Unknown",
    }
}

async fn simple_response(
    w: &mut (impl AsyncWriteExt + Unpin),
    status: u16,
    body: &str,
) -> Result<()> {
    let msg = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        reason(status),
        body.len()
    );
    w.write_all(msg.as_bytes()).await?;
    Ok(())
}

/// Proxy side: the local HTTP listener; prints `proxy listening on http://ADDR`.
pub async fn proxy_listener(t: Arc<Tunnel>, listen: String) -> Result<()> {
    let listener = TcpListener::bind(&listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    eprintln!("proxy listening on http://{}", listener.local_addr()?);
    loop {
        let (sock, _) = listener.accept().await?;
        let t = t.clone();
        tokio::spawn(async move {
            if let Err(e) = proxy_conn(t, sock).await {
                log::warn!("proxy connection: {e:#}");
            }
        });
    }
}

/// One HTTP request per connection, then close.
async fn proxy_conn(t: Arc<Tunnel>, sock: TcpStream) -> Result<()> {
    let (rd, mut wr) = sock.into_split();
    let mut r = Reader::new(rd);
    let Some(head) = r.head().await? else {
        return Ok(());
    };
    let body = r.request_body(&head)?.read_all(1 << 30).await?;
    if !t.ready.load(Ordering::SeqCst) {
        return simple_response(&mut wr, 503, "Tunnel not connected").await;
    }
    let id = t.next_id.fetch_add(1, Ordering::SeqCst);
    let (tx, mut rx) = mpsc::unbounded_channel();
    lock(&t.waiting).insert(id, tx);
    let mut headers = Map::new();
    for (n, v) in &head.headers {
        headers.insert(n.clone(), Value::String(v.clone()));
    }
    let req = json!({"stream_id":id,"method":head.start[0],"path":head.start[1],"headers":headers});
    let sent = async {
        t.send(frame::REQ_HEADERS, id, req.to_string().as_bytes())
            .await?;
        t.send_body(frame::REQ_BODY, id, &body).await?;
        t.send(frame::REQ_END, id, &[]).await
    }
    .await;
    if let Err(e) = sent {
        lock(&t.waiting).remove(&id);
        return simple_response(&mut wr, 502, &format!("Tunnel error: {e}")).await;
    }
    let first = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await;
    let first = match first {
        Err(_) => {
            lock(&t.waiting).remove(&id);
            return simple_response(&mut wr, 504, "Gateway Timeout").await;
        }
        Ok(None) => return simple_response(&mut wr, 502, "Tunnel error: connection lost").await,
        Ok(Some(f)) => f,
    };
    if first.kind == frame::ERROR {
        let msg = String::from_utf8_lossy(&first.payload).into_owned();
        return simple_response(&mut wr, 502, &format!("Tunnel error: {msg}")).await;
    }
    if first.kind != frame::RES_HEADERS {
        bail!("stream {id}: expected RES_HEADERS, got type {}", first.kind);
    }
    let res: Value = serde_json::from_slice(&first.payload)?;
    let status = res["status"].as_u64().unwrap_or(502) as u16;
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    let mut has_length = false;
    if let Some(h) = res["headers"].as_object() {
        for (n, v) in h {
            if n == "transfer-encoding" || n == "connection" {
                continue;
            }
            has_length |= n == "content-length";
            out.push_str(&format!("{n}: {}\r\n", v.as_str().unwrap_or("")));
        }
    }
    if !has_length {
        out.push_str("transfer-encoding: chunked\r\n");
    }
    out.push_str("connection: close\r\n\r\n");
    wr.write_all(out.as_bytes()).await?;
    while let Some(f) = rx.recv().await {
        match f.kind {
            frame::RES_BODY if has_length => wr.write_all(&f.payload).await?,
            frame::RES_BODY if !f.payload.is_empty() => {
                wr.write_all(format!("{:x}\r\n", f.payload.len()).as_bytes())
                    .await?;
                wr.write_all(&f.payload).await?;
                wr.write_all(b"\r\n").await?;
            }
            frame::RES_BODY => {}
            frame::ERROR => bail!("stream {id}: {}", String::from_utf8_lossy(&f.payload)),
            frame::RES_END => {
                if !has_length {
                    wr.write_all(b"0\r\n\r\n").await?;
                }
                return Ok(());
            }
            other => bail!("stream {id}: unexpected frame type {other}"),
        }
    }
    bail!("stream {id}: connection lost mid-response")
}
