//! Signaling and the webrtc-rs peer connection, as the original client does them: join at once,
//! the first joiner offers on `peer-joined` and creates the `tunnel` channel, SDP sent after up to
//! 5 s of ICE gathering while candidates are also trickled as strings holding
//! `RTCIceCandidateInit` JSON; messages without `peerId` are dropped. Called by `main`.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use webrtc::api::media_engine::MediaEngine;
use webrtc::api::setting_engine::SettingEngine;
use webrtc::api::APIBuilder;
use webrtc::data_channel::RTCDataChannel;
use webrtc::ice::mdns::MulticastDnsMode;
use webrtc::ice::network_type::NetworkType;
use webrtc::ice_transport::ice_candidate::{RTCIceCandidate, RTCIceCandidateInit};
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;
use webrtc::peer_connection::RTCPeerConnection;

use crate::tunnel::{proxy_listener, Role, Tunnel};

type Out = mpsc::UnboundedSender<Value>;

/// Runs the client forever: signaling sessions retried with backoff 2, 4, … 60 s.
pub async fn run(role: Role, signal: String, room: String, listen: String) -> Result<()> {
    let (drop_tx, mut drop_rx) = mpsc::unbounded_channel();
    let is_proxy = matches!(role, Role::Proxy);
    let t = Tunnel::new(role, drop_tx);
    tokio::spawn(t.clone().pinger());
    if is_proxy {
        let t = t.clone();
        tokio::spawn(async move {
            if let Err(e) = proxy_listener(t, listen).await {
                log::error!("proxy listener: {e:#}");
                std::process::exit(1);
            }
        });
    }
    let mut backoff = 2;
    loop {
        match session(&t, &signal, &room, &mut drop_rx).await {
            Ok(()) => log::info!("connection dropped"),
            Err(e) => log::warn!("session ended: {e:#}"),
        }
        t.reset();
        log::info!("retrying in {backoff} s");
        tokio::time::sleep(Duration::from_secs(backoff)).await;
        backoff = (backoff * 2).min(60);
    }
}

/// The ICE username fragment of an SDP.
fn ufrag_of(sdp: &str) -> String {
    sdp.lines()
        .find_map(|l| l.trim().strip_prefix("a=ice-ufrag:"))
        .unwrap_or("")
        .to_owned()
}

/// An incoming candidate: a string holding RTCIceCandidateInit JSON, or a bare candidate line.
fn parse_candidate(v: &Value) -> Option<RTCIceCandidateInit> {
    let init = match v {
        Value::String(s) => serde_json::from_str(s).unwrap_or_else(|_| RTCIceCandidateInit {
            candidate: s.clone(),
            ..Default::default()
        }),
        Value::Object(_) => serde_json::from_value(v.clone()).ok()?,
        _ => return None,
    };
    (!init.candidate.is_empty()).then_some(init)
}

async fn new_pc(
    t: &Arc<Tunnel>,
    out: &Out,
    ufrag: Arc<Mutex<String>>,
) -> Result<Arc<RTCPeerConnection>> {
    let mut se = SettingEngine::default();
    // ICE on 127.0.0.1, or on the one address in ORIG_ICE_ADDR (`make bench-wan` runs it on
    // the emulated path between two network namespaces).
    let only: IpAddr = std::env::var("ORIG_ICE_ADDR")
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    se.set_ip_filter(Box::new(move |ip: IpAddr| ip == only));
    se.set_include_loopback_candidate(true);
    se.set_ice_multicast_dns_mode(MulticastDnsMode::Disabled);
    se.set_network_types(vec![NetworkType::Udp4]);
    let mut me = MediaEngine::default();
    me.register_default_codecs()?;
    let api = APIBuilder::new()
        .with_media_engine(me)
        .with_setting_engine(se)
        .build();
    let pc = Arc::new(api.new_peer_connection(RTCConfiguration::default()).await?);

    let out2 = out.clone();
    pc.on_ice_candidate(Box::new(move |c: Option<RTCIceCandidate>| {
        let out = out2.clone();
        let ufrag = ufrag.clone();
        Box::pin(async move {
            let Some(c) = c else { return };
            match c.to_json() {
                Ok(init) => {
                    let init = RTCIceCandidateInit {
                        candidate: init.candidate,
                        sdp_mid: Some("0".into()),
                        sdp_mline_index: Some(0),
                        username_fragment: Some(
                            ufrag.lock().map(|u| u.clone()).unwrap_or_default(),
                        ),
                    };
                    match serde_json::to_string(&init) {
                        Ok(s) => {
                            log::debug!("local candidate {s}");
                            let _ = out.send(json!({"type":"candidate","candidate":s}));
                        }
                        Err(e) => log::warn!("candidate json: {e}"),
                    }
                }
                Err(e) => log::warn!("candidate to_json: {e}"),
            }
        })
    }));
    let t2 = t.clone();
    pc.on_peer_connection_state_change(Box::new(move |s: RTCPeerConnectionState| {
        let t = t2.clone();
        Box::pin(async move {
            log::info!("peer connection state: {s}");
            if s == RTCPeerConnectionState::Failed {
                t.drop_link(format!("peer connection {s}"));
            }
        })
    }));
    pc.on_ice_connection_state_change(Box::new(|s| {
        Box::pin(async move { log::info!("ICE connection state: {s}") })
    }));
    let t3 = t.clone();
    pc.on_data_channel(Box::new(move |dc: Arc<RTCDataChannel>| {
        let t = t3.clone();
        Box::pin(async move {
            log::info!("remote data channel '{}'", dc.label());
            if dc.label() == "tunnel" {
                t.attach(dc);
            }
        })
    }));
    Ok(pc)
}

/// Sets the local description, waits up to 5 s for gathering, returns the full SDP.
async fn local_sdp(
    pc: &RTCPeerConnection,
    desc: RTCSessionDescription,
    ufrag: &Mutex<String>,
) -> Result<String> {
    if let Ok(mut u) = ufrag.lock() {
        *u = ufrag_of(&desc.sdp);
    }
    let mut done = pc.gathering_complete_promise().await;
    pc.set_local_description(desc).await?;
    if tokio::time::timeout(Duration::from_secs(5), done.recv())
        .await
        .is_err()
    {
        log::warn!("ICE gathering not complete after 5 s; sending what we have");
    }
    let local = pc
        .local_description()
        .await
        .ok_or_else(|| anyhow!("no local description"))?;
    log::debug!("local SDP:\n{}", local.sdp);
    Ok(local.sdp)
}

async fn add_candidates(pc: &RTCPeerConnection, pending: &mut Vec<RTCIceCandidateInit>) {
    for c in pending.drain(..) {
        if let Err(e) = pc.add_ice_candidate(c.clone()).await {
            log::warn!("add_ice_candidate {}: {e}", c.candidate);
        }
    }
}

async fn close(pc: &mut Option<Arc<RTCPeerConnection>>) {
    if let Some(pc) = pc.take() {
        let _ = pc.close().await;
    }
}

/// One signaling connection; returns when the peer link is dropped.
async fn session(
    t: &Arc<Tunnel>,
    signal: &str,
    room: &str,
    drop_rx: &mut mpsc::UnboundedReceiver<String>,
) -> Result<()> {
    let (ws, _) = tokio_tungstenite::connect_async(signal).await?;
    log::info!("connected to {signal}");
    let (mut sink, mut stream) = ws.split();
    let (out, mut out_rx) = mpsc::unbounded_channel::<Value>();
    let writer = tokio::spawn(async move {
        while let Some(v) = out_rx.recv().await {
            if sink
                .send(Message::Text(v.to_string().into()))
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let _ = out.send(json!({"type":"join","room":room}));
    let ufrag = Arc::new(Mutex::new(String::new()));
    let mut offerer = false;
    let mut pc: Option<Arc<RTCPeerConnection>> = None;
    let mut pending: Vec<RTCIceCandidateInit> = Vec::new();
    while drop_rx.try_recv().is_ok() {}
    let result = loop {
        let msg = tokio::select! {
            reason = drop_rx.recv() => {
                log::info!("dropping the connection: {}", reason.unwrap_or_default());
                let _ = out.send(json!({"type":"bye"}));
                close(&mut pc).await;
                break Ok(());
            }
            msg = stream.next() => msg,
        };
        let text = match msg {
            None => break Err(anyhow!("signaling closed")),
            Some(Err(e)) => break Err(e.into()),
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(_))) => break Err(anyhow!("signaling closed")),
            Some(Ok(_)) => continue,
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if v.get("peerId").is_none() {
            log::debug!("dropping message without peerId: {v}");
            continue;
        }
        let kind = v["type"].as_str().unwrap_or("");
        log::debug!("signal ← {kind}");
        let step: Result<()> = async {
            match kind {
                "joined" => {
                    offerer = v["peers"].as_array().is_none_or(|p| p.is_empty());
                    log::info!(
                        "joined room {room} ({})",
                        if offerer { "offerer" } else { "answerer" }
                    );
                }
                "peer-joined" if offerer => {
                    close(&mut pc).await;
                    pending.clear();
                    let p = new_pc(t, &out, ufrag.clone()).await?;
                    pc = Some(p.clone());
                    let dc = p.create_data_channel("tunnel", None).await?;
                    t.attach(dc);
                    let offer = p.create_offer(None).await?;
                    let sdp = local_sdp(&p, offer, &ufrag).await?;
                    let _ = out.send(json!({"type":"offer","sdp":sdp}));
                }
                "offer" => {
                    close(&mut pc).await;
                    let p = new_pc(t, &out, ufrag.clone()).await?;
                    pc = Some(p.clone());
                    let sdp = v["sdp"]
                        .as_str()
                        .ok_or_else(|| anyhow!("offer without sdp"))?;
                    log::debug!("remote offer:\n{sdp}");
                    p.set_remote_description(RTCSessionDescription::offer(sdp.to_owned())?)
                        .await?;
                    add_candidates(&p, &mut pending).await;
                    let answer = p.create_answer(None).await?;
                    let sdp = local_sdp(&p, answer, &ufrag).await?;
                    let _ = out.send(json!({"type":"answer","sdp":sdp}));
                }
                "answer" => {
                    let p = pc
                        .clone()
                        .ok_or_else(|| anyhow!("answer without an offer"))?;
                    let sdp = v["sdp"]
                        .as_str()
                        .ok_or_else(|| anyhow!("answer without sdp"))?;
                    log::debug!("remote answer:\n{sdp}");
                    p.set_remote_description(RTCSessionDescription::answer(sdp.to_owned())?)
                        .await?;
                    add_candidates(&p, &mut pending).await;
                }
                "candidate" => {
                    let Some(c) = parse_candidate(&v["candidate"]) else {
                        log::debug!("skipping candidate {}", v["candidate"]);
                        return Ok(());
                    };
                    log::debug!("remote candidate {}", c.candidate);
                    pending.push(c);
                    if let Some(p) = &pc {
                        if p.remote_description().await.is_some() {
                            add_candidates(p, &mut pending).await;
                        }
                    }
                }
                "peer-left" => {
                    log::info!("peer left");
                    close(&mut pc).await;
                    t.reset();
                    pending.clear();
                    offerer = true;
                }
                _ => {}
            }
            Ok(())
        }
        .await;
        if let Err(e) = step {
            break Err(anyhow!("handling {kind}: {e:#}"));
        }
    };
    close(&mut pc).await;
    drop(out);
    let _ = writer.await;
    result
}
