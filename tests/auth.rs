//! Peer authentication with the built binary: `--secret` on both sides, a wrong secret, a
//! proxy without one, a version-1 peer, a proxy that requires a secret of a provider without
//! one, and a `--secret-file` revoked on SIGHUP. (The man in the middle is in `src/sim/tests.rs`,
//! on the simulated network.)

mod common;

use std::process::Command;

use common::*;
use tiny_http::Response;

fn ok_upstream() -> String {
    upstream(|req| {
        let _ = req.respond(Response::from_string("ok"));
    })
}

/// A signal server and a serve with `serve_extra`; returns them and the signal URL.
fn provider(room: &str, serve_extra: &[&str]) -> (Proc, Proc, String) {
    let (signal, saddr) = signal(&[]);
    let url = format!("ws://{saddr}");
    let serve = serve(&url, room, &ok_upstream(), serve_extra);
    (signal, serve, url)
}

fn body_of(addr: std::net::SocketAddr) -> (u16, String) {
    let (status, _, body) = request(addr, "GET", "/x", b"");
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn the_right_secret_is_served() {
    let (_signal, mut serve, url) = provider("auth-ok", &["--secret", "correct horse"]);
    serve.wait_line("joined room", 10);
    // The command for consumers names the room but never prints the secret.
    serve.wait_line(
        &format!("run: tunnel proxy --signal {url} --room auth-ok --secret <the secret>"),
        10,
    );
    assert!(
        !serve.drain().iter().any(|l| l.contains("no --secret")),
        "no open-door warning with a secret"
    );
    let (mut p, addr) = proxy_with(
        &url,
        "auth-ok",
        &["--secret", "correct horse", "--name", "laptop"],
    );
    p.wait_line("tunnel ready (authenticated as 'laptop'", 20);
    serve.wait_line("consumer", 10);
    serve.wait_line("as 'laptop' connected (1 of 32)", 10);
    assert_eq!(body_of(addr), (200, "ok".into()));
    for line in p.drain().iter().chain(serve.drain().iter()) {
        assert!(
            !line.contains("correct horse"),
            "a secret in the logs: {line}"
        );
    }
}

#[test]
fn a_wrong_secret_gets_403_and_the_provider_says_why() {
    let (_signal, mut serve, url) = provider("auth-wrong", &["--secret", "correct horse"]);
    let (mut p, addr) = proxy_with(
        &url,
        "auth-wrong",
        &["--secret", "battery staple", "--name", "mallory"],
    );
    p.wait_line(
        "the provider failed authentication: key confirmation failed",
        20,
    );
    serve.wait_line("authentication failed for 'mallory'", 10);
    let (status, body) = body_of(addr);
    assert_eq!(status, 403, "{body}");
    assert!(body.starts_with("tunnel authentication failed"), "{body}");
}

#[test]
fn no_secret_and_version_1_peers_are_refused_by_a_provider_with_one() {
    let (_signal, mut serve, url) = provider("auth-none", &["--secret", "s3cret-s3cret"]);
    // Our proxy without a secret, and one that speaks exactly version 1.
    for extra in [&[][..], &["--features", "sse"][..]] {
        let (mut p, addr) = proxy_with(&url, "auth-none", extra);
        p.wait_line("the provider refused us: authentication required", 20);
        let (status, body) = body_of(addr);
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("authentication required"), "{body}");
    }
    serve.wait_line("does not offer authentication", 10);
}

#[test]
fn a_proxy_with_a_secret_refuses_a_provider_without_one() {
    let (_signal, mut serve, url) = provider("auth-open", &[]);
    serve.wait_line("no --secret: anyone who knows the room name can use", 10);
    let (mut p, addr) = proxy_with(&url, "auth-open", &["--secret", "s3cret-s3cret"]);
    p.wait_line("the provider does not authenticate", 20);
    let (status, body) = body_of(addr);
    assert_eq!(status, 403, "{body}");
}

#[test]
fn sighup_reloads_the_secret_file_and_revokes_a_removed_name() {
    let dir = std::env::temp_dir().join(format!("tunnel-auth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join("secrets");
    std::fs::write(&file, "# consumers\nalice a-secret\nbob b-secret\n").expect("write");
    let path = file.to_string_lossy().into_owned();
    let (_signal, mut serve, url) = provider("auth-file", &["--secret-file", &path]);
    let (mut alice, alice_addr) = proxy_with(
        &url,
        "auth-file",
        &["--secret", "a-secret", "--name", "alice"],
    );
    let (mut bob, bob_addr) = proxy_with(
        &url,
        "auth-file",
        &["--secret", "b-secret", "--name", "bob"],
    );
    alice.wait_line("tunnel ready (authenticated as 'alice'", 20);
    bob.wait_line("tunnel ready (authenticated as 'bob'", 20);
    assert_eq!(body_of(alice_addr).0, 200);
    assert_eq!(body_of(bob_addr).0, 200);

    // Alice's line goes; serve re-reads the file on SIGHUP and ends her session at once.
    std::fs::write(&file, "bob b-secret\n").expect("rewrite");
    let status = Command::new("kill")
        .args(["-HUP", &serve.child.id().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success());
    serve.wait_line("reloaded (1 names); 1 session(s) revoked", 10);
    serve.wait_line("consumer 'alice' revoked", 10);
    alice.wait_line("the provider refused us: authentication revoked", 10);
    let (status, body) = body_of(alice_addr);
    assert_eq!(status, 403, "{body}");
    // Bob carries on, on the same session.
    assert_eq!(body_of(bob_addr).0, 200);
    assert_eq!(
        bob.drain()
            .iter()
            .filter(|l| l.contains("tunnel ready"))
            .count(),
        1
    );
    // A new attempt as alice is refused: her name is gone.
    let (mut again, again_addr) = proxy_with(
        &url,
        "auth-file",
        &["--secret", "a-secret", "--name", "alice"],
    );
    again.wait_line("the provider failed authentication", 20);
    serve.wait_line("authentication failed for 'alice' (unknown name)", 10);
    assert_eq!(body_of(again_addr).0, 403);
    // A broken file on the next SIGHUP keeps the secrets in force.
    std::fs::write(&file, "bob\n").expect("rewrite");
    Command::new("kill")
        .args(["-HUP", &serve.child.id().to_string()])
        .status()
        .expect("kill -HUP");
    serve.wait_line("keeping the old secrets", 10);
    assert_eq!(body_of(bob_addr).0, 200);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tunnel_secret_prints_a_fresh_secret() {
    let out = |()| {
        Command::new(BIN)
            .arg("secret")
            .output()
            .expect("run tunnel secret")
    };
    let (a, b) = (out(()), out(()));
    assert!(a.status.success());
    let a = String::from_utf8_lossy(&a.stdout).trim().to_string();
    let b = String::from_utf8_lossy(&b.stdout).trim().to_string();
    assert_eq!(a.len(), 23, "{a}");
    assert_ne!(a, b);
}

#[test]
fn secret_flags_are_checked_at_start() {
    let mut both = Proc::start(
        &[
            "serve",
            "--room",
            "r",
            "--upstream",
            "http://127.0.0.1:9",
            "--signal",
            "ws://127.0.0.1:9",
            "--secret",
            "x",
            "--secret-file",
            "/nonexistent",
        ],
        &[],
    );
    assert_eq!(both.wait_exit(10), Some(1));
    both.wait_line("not both", 5);
    let mut missing = Proc::start(
        &[
            "serve",
            "--room",
            "r",
            "--upstream",
            "http://127.0.0.1:9",
            "--signal",
            "ws://127.0.0.1:9",
            "--secret-file",
            "/nonexistent/secrets",
        ],
        &[],
    );
    assert_eq!(missing.wait_exit(10), Some(1));
    missing.wait_line("cannot read --secret-file /nonexistent/secrets", 5);
}
