//! A cross-built static binary (aarch64, armv7, …) under qemu-user as the provider, with the
//! native build as the consumer: the binary a Raspberry Pi or a router runs, carrying a request
//! and a 5 MB download checked by SHA-256. Runs when TUNNEL_CROSS_BIN names that binary and
//! TUNNEL_CROSS_QEMU the emulator for it (`make static-arm64`, `make static-armv7` build one and
//! run this test); otherwise it says so and passes. TUNNEL_CROSS_TARGET, when set, is the target
//! triple `--version` must name.

mod common;
use common::*;
use tiny_http::Response;

#[test]
fn cross_built_provider_serves_the_native_consumer() {
    let (Ok(bin), Ok(qemu)) = (
        std::env::var("TUNNEL_CROSS_BIN"),
        std::env::var("TUNNEL_CROSS_QEMU"),
    ) else {
        eprintln!(
            "skipped: set TUNNEL_CROSS_BIN and TUNNEL_CROSS_QEMU (make static-arm64 and make \
             static-armv7 do)"
        );
        return;
    };
    // The emulated binary names its own target.
    let out = std::process::Command::new(&qemu)
        .args([&bin, "--version"])
        .output()
        .expect("run the cross-built binary under qemu");
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(out.status.success(), "{qemu} {bin} --version failed");
    let target = version
        .split(['(', ','])
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_string();
    if let Ok(want) = std::env::var("TUNNEL_CROSS_TARGET") {
        assert_eq!(target, want, "{version}");
    }
    let answer = format!("{{\"target\":\"{target}\"}}");
    let blob: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
    let served = blob.clone();
    let small = answer.clone().into_bytes();
    let up = upstream(move |req| {
        let resp = match req.url() {
            "/blob" => Response::from_data(served.clone()),
            _ => Response::from_data(small.clone()),
        };
        let _ = req.respond(resp);
    });
    let (_signal, saddr) = signal(&[]);
    let url = format!("ws://{saddr}");
    let mut serve = Proc::start_program(
        &qemu,
        &[
            &bin,
            "serve",
            "--signal",
            &url,
            "--room",
            "cross",
            "--upstream",
            &up,
            "--ice-addr",
            "127.0.0.1",
        ],
        &[],
    );
    let (mut proxy, addr) = proxy(&url, "cross");
    serve.wait_line("tunnel ready", 60);
    proxy.wait_line("tunnel ready", 60);
    let (status, _, body) = request(addr, "GET", "/v1/models", b"");
    assert_eq!((status, body.as_slice()), (200, answer.as_bytes()));
    let (status, _, body) = request(addr, "GET", "/blob", b"");
    assert_eq!(status, 200);
    assert_eq!(sha256(&body), sha256(&blob));
    eprintln!("{version}: request and 5 MB download through qemu ok");
}
