//! Several consumers on one provider, with the built binary: three `tunnel proxy` and one
//! `tunnel serve` through our `tunnel signal`, concurrent sha256-checked downloads, a proxy
//! killed while the others carry on, a late one joining, and the limits' answers.

mod common;

use std::sync::Arc;
use std::thread;

use common::*;
use tiny_http::Response;

/// 8 MiB of deterministic bytes, and its sha256.
fn blob() -> (Arc<Vec<u8>>, String) {
    const SIZE: usize = 8 * 1024 * 1024;
    let blob: Vec<u8> = (0..SIZE as u64)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let digest = sha256(&blob);
    (Arc::new(blob), digest)
}

fn blob_upstream(blob: Arc<Vec<u8>>) -> String {
    upstream(move |req| {
        let _ = if req.url() == "/blob" {
            req.respond(Response::from_data(blob.as_slice().to_vec()))
        } else {
            req.respond(Response::from_string("ok"))
        };
    })
}

/// Downloads /blob through each proxy at once; every body must be whole.
fn download_all(addrs: &[std::net::SocketAddr], want: &str) {
    let handles: Vec<_> = addrs
        .iter()
        .map(|&addr| thread::spawn(move || request(addr, "GET", "/blob", b"")))
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (status, _, body) = h.join().expect("download thread");
        assert_eq!(status, 200, "consumer {i}");
        assert_eq!(sha256(&body), want, "consumer {i}: download intact");
    }
}

#[test]
fn three_consumers_download_at_once_one_dies_a_late_one_joins() {
    let (blob, want) = blob();
    let up = blob_upstream(blob);
    let (_signal, saddr) = signal(&[]);
    let url = format!("ws://{saddr}");
    let room = "many";
    let mut serve = serve(&url, room, &up, &[]);
    let mut proxies: Vec<_> = (0..3).map(|_| proxy(&url, room)).collect();
    for (p, _) in &mut proxies {
        p.wait_line("tunnel ready", 20);
    }
    serve.wait_line("connected (3 of 32)", 20);
    let addrs: Vec<_> = proxies.iter().map(|(_, a)| *a).collect();
    download_all(&addrs, &want);

    // One consumer dies without a word; the provider notices (the signal server's peer-left)
    // and the others carry on, downloading at once again.
    let (mut dead, _) = proxies.remove(1);
    dead.child.kill().expect("kill a proxy");
    serve.wait_line(" left: ", 10);
    serve.wait_line("(2 of 32 connected)", 10);
    let addrs: Vec<_> = proxies.iter().map(|(_, a)| *a).collect();
    download_all(&addrs, &want);

    // A late consumer joins the running provider and gets the same answers.
    let (mut late, late_addr) = proxy(&url, room);
    late.wait_line("tunnel ready", 20);
    serve.wait_line("connected (3 of 32)", 20);
    download_all(&[addrs[0], addrs[1], late_addr], &want);
    // The survivors' sessions were never renegotiated: each proxy connected once.
    for (p, _) in &mut proxies {
        let ready = p
            .drain()
            .iter()
            .filter(|l| l.contains("tunnel ready"))
            .count();
        assert_eq!(ready, 1, "a surviving consumer kept its session");
    }
}

#[test]
fn max_streams_answers_503_with_the_reason() {
    // The upstream holds every /hold request until released, so streams stay in flight, and
    // tells the test when one has arrived.
    let (release, held) = std::sync::mpsc::channel::<()>();
    let (arrived_tx, arrived) = std::sync::mpsc::channel::<()>();
    let held = Arc::new(std::sync::Mutex::new(held));
    let arrived_tx = Arc::new(std::sync::Mutex::new(arrived_tx));
    let up = upstream(move |req| {
        if req.url() == "/hold" {
            let _ = arrived_tx.lock().map(|tx| tx.send(()));
            let _ = held.lock().map(|rx| rx.recv());
        }
        let _ = req.respond(Response::from_string("done"));
    });
    let (_signal, saddr) = signal(&[]);
    let url = format!("ws://{saddr}");
    let _serve = serve(&url, "streams", &up, &["--max-streams", "2"]);
    let (mut p, addr) = proxy(&url, "streams");
    p.wait_line("tunnel ready", 20);
    let holders: Vec<_> = (0..2)
        .map(|_| thread::spawn(move || request(addr, "GET", "/hold", b"")))
        .collect();
    for _ in 0..2 {
        arrived
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("a /hold request reaches the upstream");
    }
    // A third request while two are in flight is refused with the reason, at once.
    let (status, _, body) = request(addr, "GET", "/other", b"");
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("--max-streams 2"), "{body}");
    for _ in 0..2 {
        release.send(()).expect("release");
    }
    for h in holders {
        assert_eq!(h.join().expect("holder").0, 200);
    }
    // Below the cap again: served.
    assert_eq!(request(addr, "GET", "/other", b"").0, 200);
}

#[test]
fn max_consumers_refuses_the_extra_consumer_with_a_clear_error() {
    let up = upstream(|req| {
        let _ = req.respond(Response::from_string("ok"));
    });
    let (_signal, saddr) = signal(&["--max-consumers", "2"]);
    let url = format!("ws://{saddr}");
    let mut serve = serve(&url, "cap", &up, &["--max-consumers", "2"]);
    let (mut a, a_addr) = proxy(&url, "cap");
    let (mut b, _) = proxy(&url, "cap");
    a.wait_line("tunnel ready", 20);
    b.wait_line("tunnel ready", 20);
    serve.wait_line("connected (2 of 2)", 20);
    let (mut c, c_addr) = proxy(&url, "cap");
    c.wait_line("room 'cap' is full (max 2 consumers)", 10);
    let (status, _, body) = request(c_addr, "GET", "/x", b"");
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("is full (max 2 consumers)"), "{body}");
    assert_eq!(request(a_addr, "GET", "/x", b"").0, 200);
}
