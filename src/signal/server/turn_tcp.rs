//! The signal server driver's hooks for the built-in TURN relay (`signal::relay`): TURN over
//! TCP on the WebSocket listener — a connection whose first byte is 0x00 or 0x01 is taken from
//! the HTTP path by `http_ready` and read here, cut into messages with the codec's stream
//! framing — and the plumbing of relay ports, relay timers and TURN datagrams on the STUN
//! socket. Kept apart from `server.rs` so that file only carries small hooks.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::{TcpStream, UdpSocket};
use mio::{Poll, Token};

use super::{Conn, Server, State};
use crate::nbio::would_block;
use crate::signal::dialect::ConnId;
use crate::signal::relay::{Relay, TcpOut, TCP_QUEUE};
use crate::turn::codec::stream_frame_len;
use crate::turn::server::Client;

/// Largest datagram read on the shared STUN/TURN socket; longer ones arrive cut and are
/// dropped as malformed.
pub(super) const DATAGRAM: usize = 9216;
/// A TURN-over-TCP connection must hold an allocation this soon after it opened or its
/// allocation ended; else it is closed.
const IDLE: Duration = Duration::from_secs(30);

/// A TURN-over-TCP connection.
pub(super) struct TurnConn {
    pub(super) stream: TcpStream,
    pub(super) client: Client,
    inbuf: Vec<u8>,
    pub(super) out: Vec<u8>,
    allocated: bool,
}

/// Whether a datagram on the STUN socket is for the relay (if there is one).
pub(super) fn claims(relay: &Option<Relay>, buf: &[u8]) -> bool {
    relay.is_some() && crate::turn::server::claims(buf)
}

/// A TURN datagram from a client on the shared UDP socket.
pub(super) fn datagram(
    relay: &mut Option<Relay>,
    poll: &Poll,
    udp: &UdpSocket,
    from: SocketAddr,
    data: &[u8],
) {
    if let Some(relay) = relay {
        // Answers to a UDP client go out on `udp`; nothing is queued for TCP clients.
        relay.client_message(
            Instant::now(),
            Client::udp(from),
            data,
            poll.registry(),
            Some(udp),
        );
    }
}

impl Server {
    /// The HTTP connection `id` started with a TURN message: it is TURN over TCP from now on.
    pub(super) fn turn_upgrade(&mut self, id: ConnId, now: Instant) {
        let Some(Some(conn)) = self.conns.get_mut(id) else {
            return;
        };
        let State::Http(h) = std::mem::replace(&mut conn.state, State::Moving) else {
            return;
        };
        let Ok(addr) = h.stream.peer_addr() else {
            conn.state = State::Linger(h.stream);
            self.doomed.push(id);
            return;
        };
        log::debug!("connection {id}: TURN over TCP from {addr}");
        conn.state = State::Turn(TurnConn {
            stream: h.stream,
            client: Client::tcp(id, addr),
            inbuf: h.inbuf,
            out: Vec::new(),
            allocated: false,
        });
        self.set_deadline(id, Some(now + IDLE));
        self.turn_process(id, now);
    }

    /// Readiness of a TURN-over-TCP connection: read what came, write what waits.
    pub(super) fn turn_ready(&mut self, id: ConnId, now: Instant) {
        loop {
            let Some(Some(Conn {
                state: State::Turn(t),
                ..
            })) = self.conns.get_mut(id)
            else {
                return;
            };
            match t.stream.read(&mut self.scratch) {
                Ok(0) => {
                    self.doomed.push(id);
                    return;
                }
                Ok(n) => {
                    t.inbuf.extend_from_slice(&self.scratch[..n]);
                    self.turn_process(id, now);
                }
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.doomed.push(id);
                    return;
                }
            }
        }
        self.flush(id, now);
    }

    /// Feeds every whole message in the connection's buffer to the relay.
    fn turn_process(&mut self, id: ConnId, now: Instant) {
        let Some(relay) = self.relay.as_mut() else {
            return;
        };
        let Some(Some(Conn {
            state: State::Turn(t),
            ..
        })) = self.conns.get_mut(id)
        else {
            return;
        };
        let mut pos = 0;
        let mut bad = false;
        loop {
            match stream_frame_len(&t.inbuf[pos..]) {
                Ok(Some(len)) => {
                    let frame = &t.inbuf[pos..pos + len];
                    relay.client_message(
                        now,
                        t.client,
                        frame,
                        self.poll.registry(),
                        self.udp.as_ref(),
                    );
                    pos += len;
                }
                Ok(None) => break,
                Err(_) => {
                    bad = true;
                    break;
                }
            }
        }
        t.inbuf.drain(..pos);
        let allocated = relay.has_allocation(&t.client);
        let first_allocation = allocated && !t.allocated;
        t.allocated = allocated;
        if bad {
            log::debug!("connection {id}: not TURN framing, closing");
            self.doomed.push(id);
            return;
        }
        if first_allocation {
            self.set_deadline(id, None);
        }
        self.turn_deliver(now);
    }

    /// Writes what the relay queued for TCP clients.
    pub(super) fn turn_deliver(&mut self, now: Instant) {
        let Some(relay) = self.relay.as_mut() else {
            return;
        };
        let mut touched = Vec::new();
        let mut ended = Vec::new();
        for out in relay.take_tcp() {
            let (TcpOut::Send(id, _) | TcpOut::Ended(id)) = &out;
            let id = *id;
            let Some(Some(Conn {
                state: State::Turn(t),
                ..
            })) = self.conns.get_mut(id)
            else {
                continue;
            };
            match out {
                TcpOut::Send(_, bytes) => {
                    if t.out.len() + bytes.len() > TCP_QUEUE {
                        relay.tcp_dropped += 1;
                        continue;
                    }
                    t.out.extend_from_slice(&bytes);
                    touched.push(id);
                }
                TcpOut::Ended(_) => {
                    t.allocated = false;
                    ended.push(id);
                }
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for id in touched {
            self.flush(id, now);
        }
        for id in ended {
            self.set_deadline(id, Some(now + IDLE));
        }
    }

    /// A TURN-over-TCP connection went away: its allocation goes too.
    pub(super) fn turn_closed(&mut self, client: Client, now: Instant) {
        if let Some(relay) = self.relay.as_mut() {
            relay.tcp_closed(now, client, self.poll.registry(), self.udp.as_ref());
        }
        self.turn_deliver(now);
    }

    /// Datagrams arrived on a relay port.
    pub(super) fn relay_readable(&mut self, token: Token, now: Instant) {
        let (Some(relay), Some(port)) = (self.relay.as_mut(), Relay::port_of(token)) else {
            return;
        };
        relay.relay_readable(now, port, self.poll.registry(), self.udp.as_ref());
        self.turn_deliver(now);
    }

    /// The relay's expiries.
    pub(super) fn relay_timeout(&mut self, now: Instant) {
        let Some(relay) = self.relay.as_mut() else {
            return;
        };
        if relay.next_deadline().is_some_and(|t| t <= now) {
            relay.timeout(now, self.poll.registry(), self.udp.as_ref());
            self.turn_deliver(now);
        }
    }
}
