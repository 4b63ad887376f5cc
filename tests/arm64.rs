//! The static aarch64 build under qemu-aarch64 as the provider, with the native build as the
//! consumer: the binary a Raspberry Pi runs, carrying a request and a 5 MB download. Runs when
//! TUNNEL_ARM64_BIN names that binary (`make static-arm64` builds it and runs this test);
//! otherwise it says so and passes.

mod common;
use common::*;
use tiny_http::Response;

#[test]
fn arm64_provider_serves_the_native_consumer() {
    let Ok(arm) = std::env::var("TUNNEL_ARM64_BIN") else {
        eprintln!("skipped: set TUNNEL_ARM64_BIN to the aarch64 build (make static-arm64 does)");
        return;
    };
    let blob: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    let served = blob.clone();
    let up = upstream(move |req| {
        let resp = match req.url() {
            "/blob" => Response::from_data(served.clone()),
            _ => Response::from_data(b"{\"arch\":\"aarch64\"}".to_vec()),
        };
        let _ = req.respond(resp);
    });
    let (_signal, saddr) = signal(&[]);
    let url = format!("ws://{saddr}");
    let mut serve = Proc::start_program(
        "qemu-aarch64",
        &[
            &arm,
            "serve",
            "--signal",
            &url,
            "--room",
            "arm64",
            "--upstream",
            &up,
            "--ice-addr",
            "127.0.0.1",
        ],
        &[],
    );
    let (mut proxy, addr) = proxy(&url, "arm64");
    serve.wait_line("tunnel ready", 60);
    proxy.wait_line("tunnel ready", 60);
    let (status, _, body) = request(addr, "GET", "/v1/models", b"");
    assert_eq!(
        (status, body.as_slice()),
        (200, &b"{\"arch\":\"aarch64\"}"[..])
    );
    let (status, _, body) = request(addr, "GET", "/blob", b"");
    assert_eq!(status, 200);
    assert_eq!(sha256(&body), sha256(&blob));
}
