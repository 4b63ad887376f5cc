// The peer side of the tunnel in plain browser JavaScript, shared by consumer.html and
// provider.html: signaling (spec/protocols.md §1) over a WebSocket, one WebRTC data channel
// labelled "tunnel" (created by whichever member offers), framing v1 helpers (§2), and reporting
// to the origin that served the page (tests/browser/run.py): POST /joined once in the room,
// POST /result with the outcome. Query: ?signal=ws://HOST:PORT&room=NAME, and optionally
// &ice=<JSON array of RTCIceServer> (else the signal server's `joined.iceServers`, else none),
// &policy=relay (iceTransportPolicy), &media=0 (no getUserMedia: Chromium then hides host
// addresses behind mDNS names, as it does by default).
"use strict";
const q = new URLSearchParams(location.search);
const t0 = performance.now();
const times = {};
const mark = (name) => { times[name] = Math.round(performance.now() - t0); };
const log = (...a) => {
  console.log("[" + document.title + "] " + a.join(" "));
  document.getElementById("out").textContent += a.join(" ") + "\n";
};
let reported = false;
async function report(result) {
  if (reported) return;
  reported = true;
  result.offerer = offerer;
  result.local_candidates = localCandidates;
  result.times = times;
  result.selected_pair = pc ? await selectedPair().catch((e) => "getStats: " + e) : null;
  log("result", JSON.stringify(result));
  fetch("/result", { method: "POST", body: JSON.stringify(result) });
}

// The nominated ICE candidate pair, as "type address:port" for each side.
async function selectedPair() {
  const stats = await pc.getStats();
  const describe = (id) => { const c = stats.get(id); return c && `${c.candidateType} ${c.address}:${c.port}`; };
  for (const s of stats.values()) {
    if (s.type === "transport" && s.selectedCandidatePairId) {
      const p = stats.get(s.selectedCandidatePairId);
      return { local: describe(p.localCandidateId), remote: describe(p.remoteCandidateId) };
    }
  }
  return null;
}
window.onerror = (msg) => report({ ok: false, error: "script error: " + msg });

// Framing v1: [type u8][stream_id u32 BE][payload].
const enc = new TextEncoder(), dec = new TextDecoder();
function frame(type, sid, payload) {
  const p = typeof payload === "string" ? enc.encode(payload) : (payload || new Uint8Array(0));
  const b = new Uint8Array(5 + p.length);
  b[0] = type;
  new DataView(b.buffer).setUint32(1, sid);
  b.set(p, 5);
  return b;
}
function parseFrame(data) {
  const b = new Uint8Array(data);
  if (b.length < 5) return null;
  return { type: b[0], sid: new DataView(b.buffer, b.byteOffset).getUint32(1), payload: b.subarray(5) };
}

let pc = null, offerer = false, onChannel = null;
let iceServers = q.get("ice") ? JSON.parse(q.get("ice")) : [];
const localCandidates = [];
let early = [];            // candidates that came before the remote description
let chain = Promise.resolve();
let ws = null;
const signal = (m) => ws.send(JSON.stringify(m));

// Joins the room and calls useChannel(channel) with the "tunnel" data channel (not yet open).
function startPeer(useChannel) {
  onChannel = (ch) => { ch.binaryType = "arraybuffer"; useChannel(ch); };
  // Without media permission Chromium gathers no host candidate when the only interface is
  // loopback (it hides local addresses); getUserMedia, granted by the driver's flags, lifts that.
  if (q.get("media") === "0") return connect();
  navigator.mediaDevices.getUserMedia({ audio: true })
    .then((s) => s.getTracks().forEach((t) => t.stop()), (e) => log("getUserMedia:", e))
    .then(connect);
}

function connect() {
  mark("media_permission");
  ws = new WebSocket(q.get("signal"));
  ws.onopen = () => { mark("ws_open"); signal({ type: "join", room: q.get("room") }); };
  ws.onerror = () => report({ ok: false, error: "signal WebSocket error" });
  // Handled one after another: a candidate must wait for the description before it.
  ws.onmessage = (ev) => {
    chain = chain.then(() => onSignal(JSON.parse(ev.data)))
      .catch((e) => report({ ok: false, error: "signaling: " + e }));
  };
}

function newPeer() {
  pc = new RTCPeerConnection({ iceServers, iceTransportPolicy: q.get("policy") || "all" });
  pc.onicecandidate = (e) => {
    if (!e.candidate || !e.candidate.candidate) return;
    log("local candidate", e.candidate.candidate);
    localCandidates.push(e.candidate.candidate);
    signal({ type: "candidate", candidate: JSON.stringify(e.candidate.toJSON()) });
  };
  pc.oniceconnectionstatechange = () => log("ice", pc.iceConnectionState);
  pc.onconnectionstatechange = () => {
    log("connection", pc.connectionState);
    if (pc.connectionState === "failed") report({ ok: false, error: "connection failed" });
  };
  pc.ondatachannel = (e) => { if (e.channel.label === "tunnel") onChannel(e.channel); };
}

async function onSignal(m) {
  log("signal <-", m.type);
  if (m.type === "joined") {
    offerer = m.peers.length === 0;
    if (!q.get("ice") && Array.isArray(m.iceServers)) iceServers = m.iceServers;
    fetch("/joined", { method: "POST", body: JSON.stringify({ offerer }) });
  } else if (m.type === "peer-joined" && offerer) {
    newPeer();
    onChannel(pc.createDataChannel("tunnel", { ordered: true }));
    await pc.setLocalDescription(await pc.createOffer());
    signal({ type: "offer", sdp: pc.localDescription.sdp });
  } else if (m.type === "offer") {
    newPeer();
    await pc.setRemoteDescription({ type: "offer", sdp: m.sdp });
    await pc.setLocalDescription(await pc.createAnswer());
    signal({ type: "answer", sdp: pc.localDescription.sdp });
  } else if (m.type === "answer") {
    await pc.setRemoteDescription({ type: "answer", sdp: m.sdp });
  } else if (m.type === "candidate") {
    const c = m.candidate || "";
    log("remote candidate", c);
    early.push(c.startsWith("{") ? JSON.parse(c) : { candidate: c, sdpMid: "0", sdpMLineIndex: 0 });
  } else if (m.type === "peer-left") {
    report({ ok: false, error: "peer left" });
  } else if (m.type === "error") {
    report({ ok: false, error: "signal server: " + m.message });
  }
  if (pc && pc.remoteDescription && early.length) {
    const waiting = early; early = [];
    for (const c of waiting) await pc.addIceCandidate(c);
  }
}
