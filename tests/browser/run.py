#!/usr/bin/env python3
"""Browser interop scenario for tests/browser.rs, run inside a network namespace that has only
`lo`. Starts a page server on 127.0.0.1 (serves consumer.html, provider.html and peer.js, answers
GET /v1/models as the tunnel's upstream, hears on POST /joined that the page is in the room and on
POST /result its outcome), `tunnel signal`, headless Chromium and our side of the tunnel:
`tunnel serve` when the browser is the consumer (--role consumer), `tunnel proxy` when it is the
provider (--role provider; then this script makes a GET /v1/models through the proxy). `--order`
says who joins the room first (the first member offers).

`--with-proxy` (consumer role only) adds a `tunnel proxy` as a second consumer of the same serve,
joining right after serve: the page holds its GET (consumer.html?hold=1) until serve has logged
two consumers connected; then the page's GET is released and a GET /v1/models is made through
the proxy, both before anything is stopped, and serve's log is read for consumers that left.

`--signal URL --room R` (consumer role only) uses a signal server someone else runs and starts no
`tunnel` process: the caller runs `tunnel serve` (tests/net.rs does, on another host of its
network-namespace testbed); `tunnel_ready` is then null. `--ice JSON` hands the page its
iceServers, `--policy relay` sets iceTransportPolicy, and `--mdns` leaves Chromium's default of
hiding host addresses behind mDNS names (no loopback or mDNS flags, no media permission).

Prints one JSON line: {"result": <the page's report>, "http": <the GET through the proxy>,
"tunnel_ready": bool, "serve_connected": [serve's `consumer … connected` lines] and
"serve_left": [its `consumer … left` lines] (with --with-proxy), "seconds": ...,
"logs": {...} (on failure, or always with --with-proxy)}. Every process it starts is ended
before it exits.
"""

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
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
PAGES = {"/consumer.html": "text/html", "/provider.html": "text/html", "/peer.js": "text/javascript"}


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

    def matching(self, pattern):
        """The output lines so far that match the regex `pattern`."""
        return [l for l in list(self.lines) if re.search(pattern, l)]

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
    ap.add_argument("--upstream-body", required=True, help="body GET /v1/models answers")
    ap.add_argument("--role", choices=["consumer", "provider"], default="consumer")
    ap.add_argument("--order", choices=["tunnel-first", "browser-first"], default="tunnel-first")
    ap.add_argument("--with-proxy", action="store_true",
                    help="consumer role: a tunnel proxy is a second consumer beside the page")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--signal", help="external signal server URL: start no tunnel process")
    ap.add_argument("--room", help="room name (default browser-<pid>)")
    ap.add_argument("--ice", help="iceServers for the page, as JSON")
    ap.add_argument("--policy", choices=["all", "relay"], default="all")
    ap.add_argument("--mdns", action="store_true",
                    help="Chromium's defaults: host addresses hidden behind mDNS names")
    args = ap.parse_args()
    if args.with_proxy and args.role != "consumer":
        ap.error("--with-proxy needs --role consumer")
    if args.signal and (args.role != "consumer" or args.with_proxy or args.order != "tunnel-first"):
        ap.error("--signal needs --role consumer --order tunnel-first, without --with-proxy")

    start = time.monotonic()
    deadline = start + args.timeout
    left = lambda: max(0.0, deadline - time.monotonic())
    procs = []
    profile = tempfile.mkdtemp(prefix="tunnel-chromium-")
    out = {"result": None, "tunnel_ready": False}
    results, joined = queue.Queue(), queue.Queue()
    go = threading.Event()  # answers the held page's GET /go

    def pages(h, method):
        name = h.path.split("?", 1)[0]
        if method == "GET" and name in PAGES:
            with open(os.path.join(HERE, name[1:]), "rb") as f:
                reply(h, 200, PAGES[name] + "; charset=utf-8", f.read())
        elif method == "GET" and name == "/v1/models":
            reply(h, 200, "application/json", args.upstream_body.encode())
        elif method == "GET" and name == "/go":
            reply(h, 204 if go.wait(left()) else 504, "text/plain", b"")
        elif method == "POST" and name in ("/result", "/joined"):
            body = h.rfile.read(int(h.headers.get("Content-Length", "0")))
            (results if name == "/result" else joined).put(body)
            reply(h, 204, "text/plain", b"")
        else:
            reply(h, 404, "text/plain", b"not found")

    try:
        pg = http_server(pages)
        origin = "http://127.0.0.1:%d" % pg.server_address[1]
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        if args.signal:
            signal_url = args.signal
        else:
            sig = Proc("signal", [args.tunnel, "signal", "--listen", "127.0.0.1:0"], env)
            procs.append(sig)
            line = sig.wait_line(r"listening on ws://", deadline)
            if not line:
                raise RuntimeError("tunnel signal printed no address")
            signal_url = "ws://" + line.split("ws://", 1)[1].split()[0]
        room = args.room or "browser-%d" % os.getpid()
        common = ["--signal", signal_url, "--room", room, "--ice-addr", "127.0.0.1"]

        beside = []  # with --with-proxy: the proxy, serve's second consumer

        def launch(name, argv):
            t = Proc(name, [args.tunnel] + argv + common, env)
            procs.append(t)
            if not t.wait_line(r"joined room", deadline):
                raise RuntimeError("tunnel %s did not join the room" % t.name)
            return t

        def start_tunnel():
            if args.role == "consumer":
                t = launch("serve", ["serve", "--upstream", origin])
                if args.with_proxy:
                    beside.append(launch("proxy", ["proxy", "--listen", "127.0.0.1:0"]))
                return t
            return launch("proxy", ["proxy", "--listen", "127.0.0.1:0"])

        def get_through(proxy):
            """GET /v1/models through `proxy` once it is ready: {"status", "body"}."""
            line = proxy.wait_line(r"proxy listening on http://", deadline)
            if not line or not proxy.wait_line(r"tunnel ready", deadline):
                raise RuntimeError("tunnel proxy never got ready")
            proxy_url = "http://" + line.split("http://", 1)[1].split()[0]
            try:
                with urllib.request.urlopen(proxy_url + "/v1/models", timeout=left()) as r:
                    status, body = r.status, r.read()
            except urllib.error.HTTPError as e:
                status, body = e.code, e.read()
            return {"status": status, "body": body.decode("utf-8", "replace")}

        tunnel = None
        if args.order == "tunnel-first" and not args.signal:
            tunnel = start_tunnel()
        page = "%s/%s.html?signal=%s&room=%s" % (origin, args.role, signal_url, room)
        if args.with_proxy:
            page += "&hold=1"
        if args.ice:
            page += "&ice=" + urllib.parse.quote(args.ice)
        if args.policy != "all":
            page += "&policy=" + args.policy
        if args.mdns:
            page += "&media=0"
            reveal = []
        else:
            # Host candidates on 127.0.0.1: loopback allowed, and local addresses not hidden,
            # which takes media permission (the page calls getUserMedia, granted here with a
            # fake device); without it Chromium gathers no host candidate on `lo` at all.
            reveal = [
                "--allow-loopback-in-peer-connection",
                "--disable-features=WebRtcHideLocalIpsWithMdns",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            ]
        chrome = Proc(
            "chromium",
            [
                args.chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--user-data-dir=" + profile,
            ] + reveal + ["--enable-logging=stderr", "--v=0", page],
        )
        procs.append(chrome)
        launched = time.monotonic()
        if args.order == "browser-first":
            try:
                joined.get(timeout=left())
            except queue.Empty:
                raise RuntimeError("the page did not join the room")
            tunnel = start_tunnel()
        if args.role == "provider":
            out["http"] = get_through(tunnel)
        if args.with_proxy:
            # Both consumers agreed with serve: release the page's GET, make the proxy's.
            if not tunnel.wait_line(r"consumer \S+ connected \(2 of ", deadline):
                raise RuntimeError("serve never had two consumers connected")
            go.set()
            out["http"] = get_through(beside[0])
        try:
            out["result"] = json.loads(results.get(timeout=left()))
        except queue.Empty:
            out["result"] = {"ok": False, "error": "no result from the page within %.0f s" % args.timeout}
        out["page_seconds"] = round(time.monotonic() - launched, 3)
        if tunnel is None:
            out["tunnel_ready"] = None
        else:
            out["tunnel_ready"] = tunnel.wait_line(r"tunnel ready", time.monotonic() + 2) is not None
        if args.with_proxy:
            out["serve_connected"] = tunnel.matching(r"consumer \S+ connected \(")
            out["serve_left"] = tunnel.matching(r"consumer \S+ left")
    except Exception as e:  # reported as the result, the caller asserts on it
        out["result"] = {"ok": False, "error": "driver: %s" % e}
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(profile, ignore_errors=True)
    out["seconds"] = round(time.monotonic() - start, 3)
    if args.with_proxy or not (out["result"] or {}).get("ok"):
        out["logs"] = {p.name: p.lines[-200:] for p in procs}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
