//! The agent API guide's own Python (httpx) and Node (eventsource + fetch) clients, unchanged,
//! against the running server. Needs python3 with httpx and node with eventsource@2 under
//! target/tmp/agent-clients; `make test` installs both.

mod common;
use common::*;
use std::path::PathBuf;
use std::process::Command;

fn clients_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/agent_clients")
}

#[test]
fn seed_python_client_works_unchanged() {
    let (_server, addr) = signal(&[]);
    let out = Command::new("python3")
        .arg(clients_dir().join("agent_check.py"))
        .arg(format!("http://{addr}"))
        .current_dir(clients_dir())
        .output()
        .expect("python3 is needed for this test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'httpx'"),
        "httpx is missing: run `make test` (it installs it) or `pip install httpx`"
    );
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("python agent client: ok"), "{stdout}");
}

#[test]
fn seed_node_client_works_unchanged() {
    let (_server, addr) = signal(&[]);
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("agent-clients");
    assert!(
        dir.join("node_modules/eventsource").exists(),
        "eventsource is missing in {}: run `make test` (it installs it)",
        dir.display()
    );
    for f in ["seed_client.mjs", "agent_check.mjs"] {
        std::fs::copy(clients_dir().join(f), dir.join(f)).unwrap();
    }
    let out = Command::new("node")
        .arg(dir.join("agent_check.mjs"))
        .arg(format!("http://{addr}"))
        .current_dir(&dir)
        .output()
        .expect("node is needed for this test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("node agent client: ok"), "{stdout}");
}
