#!/usr/bin/env python3
"""Browser interop scenario for tests/browser.rs, run inside a network namespace that has only
`lo`: starts a tiny upstream, a page server (serves consumer.html, hears on POST /joined that the
page is in the room, receives its result on POST /result), `tunnel signal`, `tunnel serve` and
headless Chromium as the consumer, in the order `--order` names (the member that joins first
offers); waits for the page's result and prints one JSON line: {"result": ..., "serve_ready":
bool, "seconds": ..., "logs": {...}} (logs only when the page reported no success). Every process
it starts is ended before it exits."""

import argparse
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))


def http_server(handler_fn):
    """A threaded HTTP server on 127.0.0.1:0 calling handler_fn(handler, method); returns it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            handler_fn(self, "GET")

        def do_POST(self):
            handler_fn(self, "POST")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def reply(h, status, ctype, body):
    h.send_response(status)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


class Proc:
    """A child process whose merged output lines are kept and can be waited for."""

    def __init__(self, name, args, env=None):
        self.name = name
        self.lines = []
        self.q = queue.Queue()
        self.p = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in self.p.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.lines.append(line)
            self.q.put(line)

    def wait_line(self, pattern, deadline):
        """The first output line matching the regex `pattern` before `deadline`, or None."""
        for line in list(self.lines):
            if re.search(pattern, line):
                return line
        while time.monotonic() < deadline:
            try:
                line = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if re.search(pattern, line):
                return line
        return None

    def stop(self):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tunnel", required=True, help="path of the tunnel binary")
    ap.add_argument("--chromium", default="chromium")
    ap.add_argument("--upstream-body", required=True, help="body the upstream serves")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--order", choices=["serve-first", "browser-first"], default="serve-first")
    args = ap.parse_args()

    start = time.monotonic()
    deadline = start + args.timeout
    procs = []
    profile = tempfile.mkdtemp(prefix="tunnel-chromium-")
    out = {"result": None, "serve_ready": False}
    try:
        def upstream(h, method):
            if method == "GET" and h.path == "/v1/models":
                reply(h, 200, "application/json", args.upstream_body.encode())
            else:
                reply(h, 404, "text/plain", b"not found")

        up = http_server(upstream)

        results = queue.Queue()
        joined = queue.Queue()
        page = open(os.path.join(HERE, "consumer.html"), "rb").read()

        def pages(h, method):
            if method == "GET" and h.path.startswith("/consumer.html"):
                reply(h, 200, "text/html; charset=utf-8", page)
            elif method == "POST" and h.path == "/result":
                n = int(h.headers.get("Content-Length", "0"))
                results.put(h.rfile.read(n))
                reply(h, 204, "text/plain", b"")
            elif method == "POST" and h.path == "/joined":
                h.rfile.read(int(h.headers.get("Content-Length", "0")))
                joined.put(True)
                reply(h, 204, "text/plain", b"")
            else:
                reply(h, 404, "text/plain", b"not found")

        pg = http_server(pages)

        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        sig = Proc("signal", [args.tunnel, "signal", "--listen", "127.0.0.1:0"], env)
        procs.append(sig)
        line = sig.wait_line(r"listening on ws://", deadline)
        if not line:
            raise RuntimeError("tunnel signal printed no address")
        signal_url = "ws://" + line.split("ws://", 1)[1].split()[0]

        room = "browser-%d" % os.getpid()

        def start_serve():
            serve = Proc(
                "serve",
                [
                    args.tunnel, "serve", "--signal", signal_url, "--room", room,
                    "--upstream", "http://127.0.0.1:%d" % up.server_address[1],
                    "--ice-addr", "127.0.0.1",
                ],
                env,
            )
            procs.append(serve)
            if not serve.wait_line(r"joined room", deadline):
                raise RuntimeError("tunnel serve did not join the room")
            return serve

        url = "http://127.0.0.1:%d/consumer.html?signal=%s&room=%s" % (
            pg.server_address[1], signal_url, room)
        if args.order == "serve-first":
            serve = start_serve()
        chrome = Proc(
            "chromium",
            [
                args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--user-data-dir=" + profile,
                # Host candidates on 127.0.0.1: loopback allowed, local addresses not hidden
                # (the page's getUserMedia, granted here with a fake device, lifts the hiding;
                # without it Chromium gathers no host candidate at all).
                "--allow-loopback-in-peer-connection",
                "--disable-features=WebRtcHideLocalIpsWithMdns",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                "--enable-logging=stderr", "--v=0",
                url,
            ],
        )
        procs.append(chrome)
        launched = time.monotonic()
        if args.order == "browser-first":
            try:
                joined.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError("the page did not join the room")
            serve = start_serve()
        try:
            raw = results.get(timeout=max(0.0, deadline - time.monotonic()))
            out["result"] = json.loads(raw)
        except queue.Empty:
            out["result"] = {"ok": False, "error": "no result from the page within %.0f s" % args.timeout}
        out["page_seconds"] = round(time.monotonic() - launched, 3)
        out["serve_ready"] = serve.wait_line(r"tunnel ready", time.monotonic() + 2) is not None
    except Exception as e:  # reported as the result, the caller asserts on it
        out["result"] = {"ok": False, "error": "driver: %s" % e}
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(profile, ignore_errors=True)
    out["seconds"] = round(time.monotonic() - start, 3)
    if not (out["result"] or {}).get("ok"):
        out["logs"] = {p.name: p.lines[-200:] for p in procs}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
