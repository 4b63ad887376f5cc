//! The demo upstream on its own (`tunnel::demo::spawn_upstream`), spoken to with a raw HTTP/1.1
//! client: the models list, health, a streamed chat completion that really streams, the
//! non-streamed answer, keep-alive and errors.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tunnel::http1::{parse_response, BodyDecoder};

fn upstream() -> SocketAddr {
    tunnel::demo::spawn_upstream("127.0.0.1:0".parse().unwrap()).expect("spawn upstream")
}

/// A response: status, content type, and the body pieces with the time each one arrived.
struct Answer {
    status: u16,
    content_type: String,
    pieces: Vec<(Instant, Vec<u8>)>,
}

impl Answer {
    fn body(&self) -> Vec<u8> {
        self.pieces.iter().flat_map(|(_, p)| p.clone()).collect()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body()).expect("JSON body")
    }
}

/// Sends `request` on `stream` and reads one response, leaving the connection usable.
fn exchange_on(stream: &mut TcpStream, method: &str, request: &[u8]) -> Answer {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut read = |stream: &mut TcpStream, buf: &mut Vec<u8>| {
        let n = stream.read(&mut chunk).expect("read");
        buf.extend_from_slice(&chunk[..n]);
        n
    };
    let (head, n) = loop {
        if let Some(parsed) = parse_response(&buf).expect("response head") {
            break parsed;
        }
        assert!(read(stream, &mut buf) > 0, "closed before the head");
    };
    buf.drain(..n);
    let mut decoder = BodyDecoder::new(head.body_framing(method).unwrap());
    let mut pieces = Vec::new();
    while !decoder.is_done() {
        let step = decoder.decode(&buf).expect("body framing");
        if !step.data.is_empty() {
            pieces.push((Instant::now(), step.data.to_vec()));
        }
        let consumed = step.consumed;
        buf.drain(..consumed);
        if consumed == 0 && !decoder.is_done() && read(stream, &mut buf) == 0 {
            decoder.finish_eof().expect("complete body");
        }
    }
    Answer {
        status: head.status,
        content_type: tunnel::http1::header(&head.headers, "content-type")
            .unwrap_or_default()
            .to_string(),
        pieces,
    }
}

fn exchange(addr: SocketAddr, method: &str, request: &[u8]) -> Answer {
    let mut stream = TcpStream::connect(addr).unwrap();
    exchange_on(&mut stream, method, request)
}

fn post_chat(body: &Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn models_and_health() {
    let addr = upstream();
    let models = exchange(
        addr,
        "GET",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(models.status, 200);
    assert_eq!(models.content_type, "application/json");
    assert_eq!(
        models.json(),
        json!({"object":"list","data":[{"id":"demo-model","object":"model","owned_by":"tunnel"}]})
    );
    let health = exchange(
        addr,
        "GET",
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(health.status, 200);
    assert_eq!(health.json(), json!({"status": "ok"}));
}

#[test]
fn streamed_chat_completion_streams() {
    let addr = upstream();
    let start = Instant::now();
    let answer = exchange(
        addr,
        "POST",
        &post_chat(
            &json!({"model":"demo-model","stream":true,"messages":[{"role":"user","content":"hi"}]}),
        ),
    );
    let end = Instant::now();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.content_type, "text/event-stream");

    // Events, each with the time its last byte arrived.
    let mut events: Vec<(Instant, String)> = Vec::new();
    let mut pending = String::new();
    for (at, piece) in &answer.pieces {
        pending.push_str(std::str::from_utf8(piece).unwrap());
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            let data = event
                .trim_end()
                .strip_prefix("data: ")
                .expect("every event is one data line");
            events.push((*at, data.to_string()));
        }
    }
    assert!(pending.is_empty(), "trailing partial event: {pending:?}");
    assert!(events.len() >= 10, "only {} events", events.len());
    assert_eq!(events.last().unwrap().1, "[DONE]");

    let mut text = String::new();
    for (_, data) in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(data).expect("event JSON");
        assert_eq!(v["object"], "chat.completion.chunk");
        assert_eq!(v["id"], "chatcmpl-demo");
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
    }
    assert!(text.contains("tunnel"), "sentence: {text:?}");

    let first = events.first().unwrap().0 - start;
    let last = events.last().unwrap().0 - start;
    let total = end - start;
    assert!(
        first < total / 2,
        "first event after {first:?} of {total:?}: not streamed"
    );
    assert!(
        last >= Duration::from_millis(500),
        "whole stream in {last:?}: not paced"
    );
}

#[test]
fn plain_chat_completion_and_keep_alive() {
    let addr = upstream();
    let mut stream = TcpStream::connect(addr).unwrap();
    let body =
        json!({"model":"demo-model","messages":[{"role":"user","content":"hi"}]}).to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
         {:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    let first = exchange_on(&mut stream, "POST", request.as_bytes());
    assert_eq!(first.status, 200);
    let v = first.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("tunnel"));

    // Same connection, second request.
    let second = exchange_on(
        &mut stream,
        "GET",
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(second.status, 200);
    assert_eq!(second.json(), json!({"status": "ok"}));
}

#[test]
fn errors_are_json() {
    let addr = upstream();
    let missing = exchange(
        addr,
        "GET",
        b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(missing.status, 404);
    assert!(missing.json()["error"]["message"].is_string());

    let wrong_method = exchange(
        addr,
        "DELETE",
        b"DELETE /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(wrong_method.status, 405);

    let not_json = exchange(addr, "POST", &{
        let mut r =
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n".to_vec();
        r.extend_from_slice(b"{{{");
        r
    });
    assert_eq!(not_json.status, 400);

    let garbage = exchange(addr, "GET", b"\x00\x01 not http\r\n\r\n");
    assert_eq!(garbage.status, 400);
}
