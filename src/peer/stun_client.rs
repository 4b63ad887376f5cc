//! Sans-IO STUN client of the peer link (`super::Link`): asks a STUN server, from each UDP
//! socket, which public address the socket is seen from (for a server-reflexive ICE candidate).
//!
//! One Binding request per (socket, server) pair, retransmitted with an RTO of 250 ms that
//! doubles, [`MAX_TRIES`] sends in all. The link sends what [`StunClient::due`] returns, calls it
//! again at [`StunClient::next_deadline`], and offers every datagram read from a socket to
//! [`StunClient::handle_datagram`] before str0m sees it: responses to our own transaction ids are
//! consumed here, everything else (str0m's ICE checks included) is left alone.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::stun::{self, TransactionId};

/// Binding requests sent per query before giving up.
pub const MAX_TRIES: u32 = 5;
/// First retransmission timeout; it doubles after every send.
const INITIAL_RTO: Duration = Duration::from_millis(250);

/// One datagram to send.
#[derive(Debug, PartialEq, Eq)]
pub struct Transmit {
    /// Index of the link's UDP socket to send from.
    pub socket: usize,
    pub destination: SocketAddr,
    pub data: Vec<u8>,
}

/// A datagram that answered one of our queries.
#[derive(Debug, PartialEq, Eq)]
pub enum Response {
    /// The server saw socket `local` as `mapped`.
    Mapped {
        local: SocketAddr,
        mapped: SocketAddr,
        server: SocketAddr,
    },
    /// Ours, but nothing new: a duplicate, an error response or a malformed answer (logged).
    Other,
}

enum State {
    Waiting {
        sent: u32,
        next_at: Instant,
        rto: Duration,
    },
    Done,
}

struct Query {
    socket: usize,
    local: SocketAddr,
    server: SocketAddr,
    tid: TransactionId,
    state: State,
}

/// The outstanding and finished Binding transactions of one link.
pub struct StunClient {
    queries: Vec<Query>,
    silence_reported: bool,
}

/// Which server each socket asks: `(socket index, local address, server)`. A socket only asks a
/// server of its own address family, and a loopback socket only a loopback server (it could not
/// reach any other). With several servers of one family, the first one is used.
pub fn targets(
    locals: &[SocketAddr],
    servers: &[SocketAddr],
) -> Vec<(usize, SocketAddr, SocketAddr)> {
    locals
        .iter()
        .enumerate()
        .filter_map(|(index, local)| {
            servers
                .iter()
                .find(|s| {
                    s.is_ipv4() == local.is_ipv4()
                        && (!local.ip().is_loopback() || s.ip().is_loopback())
                })
                .map(|server| (index, *local, *server))
        })
        .collect()
}

impl StunClient {
    /// One query per target, the first request due at `now`.
    pub fn new(targets: Vec<(usize, SocketAddr, SocketAddr)>, now: Instant) -> StunClient {
        let queries = targets
            .into_iter()
            .map(|(socket, local, server)| Query {
                socket,
                local,
                server,
                tid: stun::new_transaction_id(),
                state: State::Waiting {
                    sent: 0,
                    next_at: now,
                    rto: INITIAL_RTO,
                },
            })
            .collect();
        StunClient {
            queries,
            silence_reported: false,
        }
    }

    /// The requests (first sends and retransmissions) due at `now`. A query whose last request
    /// went unanswered for its RTO is given up; the first one given up is logged at info.
    pub fn due(&mut self, now: Instant) -> Vec<Transmit> {
        let mut out = Vec::new();
        for q in &mut self.queries {
            let State::Waiting { sent, next_at, rto } = &mut q.state else {
                continue;
            };
            if *next_at > now {
                continue;
            }
            if *sent >= MAX_TRIES {
                q.state = State::Done;
                if !self.silence_reported {
                    self.silence_reported = true;
                    log::info!(
                        "STUN: no answer from {} (from {}); using host candidates only",
                        q.server,
                        q.local
                    );
                } else {
                    log::debug!("STUN: no answer from {} (from {})", q.server, q.local);
                }
                continue;
            }
            *sent += 1;
            *next_at = now + *rto;
            *rto *= 2;
            out.push(Transmit {
                socket: q.socket,
                destination: q.server,
                data: stun::binding_request(&q.tid),
            });
        }
        out
    }

    /// When `due` next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.queries
            .iter()
            .filter_map(|q| match q.state {
                State::Waiting { next_at, .. } => Some(next_at),
                State::Done => None,
            })
            .min()
    }

    /// Takes a datagram read on socket `socket` if it is a STUN response (success or error)
    /// carrying the transaction id of one of our queries from that socket (answered, pending or
    /// given up). `None`: not ours; it goes to str0m.
    pub fn handle_datagram(&mut self, socket: usize, data: &[u8]) -> Option<Response> {
        // The class's high bit (0x0100 of the message type) marks responses.
        let response = data.first().is_some_and(|b| b & 0x01 != 0);
        if !response || !stun::is_stun(data) {
            return None;
        }
        let tid = data.get(8..20)?;
        let q = self
            .queries
            .iter_mut()
            .find(|q| q.socket == socket && q.tid == tid)?;
        if matches!(q.state, State::Done) {
            log::trace!("STUN: late or duplicate answer from {}", q.server);
            return Some(Response::Other);
        }
        q.state = State::Done;
        match stun::parse_binding_response(data, &q.tid) {
            Ok(Some(mapped)) => Some(Response::Mapped {
                local: q.local,
                mapped,
                server: q.server,
            }),
            Ok(None) => {
                log::debug!("STUN: {} refused the binding request", q.server);
                Some(Response::Other)
            }
            Err(e) => {
                log::debug!("STUN: bad answer from {}: {e}", q.server);
                Some(Response::Other)
            }
        }
    }

    /// Stops every query.
    pub fn stop(&mut self) {
        for q in &mut self.queries {
            q.state = State::Done;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn picks_servers_by_family_and_reach() {
        let locals = [
            addr("127.0.0.1:1000"),
            addr("192.0.2.5:1001"),
            addr("[2001:db8::5]:1002"),
        ];
        let public = [addr("198.51.100.1:3478"), addr("[2001:db8::1]:3478")];
        assert_eq!(
            targets(&locals, &public),
            vec![(1, locals[1], public[0]), (2, locals[2], public[1]),]
        );
        let loopback = [addr("127.0.0.1:8787")];
        assert_eq!(
            targets(&locals, &loopback),
            vec![(0, locals[0], loopback[0]), (1, locals[1], loopback[0])]
        );
        assert!(targets(&locals[2..], &loopback).is_empty());
    }

    #[test]
    fn retransmits_with_doubling_rto_then_gives_up() {
        let t0 = Instant::now();
        let server = addr("127.0.0.1:3478");
        let mut client = StunClient::new(vec![(0, addr("127.0.0.1:1000"), server)], t0);
        assert_eq!(client.next_deadline(), Some(t0));
        let mut sends = Vec::new();
        let mut now = t0;
        while let Some(at) = client.next_deadline() {
            now = at;
            for t in client.due(now) {
                assert_eq!((t.socket, t.destination), (0, server));
                assert!(stun::is_stun(&t.data));
                sends.push(now - t0);
            }
        }
        let ms = |n| Duration::from_millis(n);
        assert_eq!(sends, vec![ms(0), ms(250), ms(750), ms(1750), ms(3750)]);
        assert_eq!(now - t0, ms(7750));
        assert!(client.due(now + ms(60_000)).is_empty());
        // Nothing early: a call before the deadline sends nothing.
        let mut client = StunClient::new(vec![(0, addr("127.0.0.1:1000"), server)], t0);
        assert_eq!(client.due(t0).len(), 1);
        assert!(client.due(t0 + ms(249)).is_empty());
        assert_eq!(client.due(t0 + ms(250)).len(), 1);
    }

    #[test]
    fn consumes_only_its_own_transactions() {
        let t0 = Instant::now();
        let server = addr("127.0.0.1:3478");
        let local = addr("127.0.0.1:1000");
        let other_local = addr("127.0.0.1:1001");
        let mut client = StunClient::new(vec![(0, local, server), (1, other_local, server)], t0);
        let sent = client.due(t0);
        assert_eq!(sent.len(), 2);
        let mapped = addr("203.0.113.9:40000");
        let answer = |request: &[u8]| {
            stun::binding_response(request, mapped)
                .unwrap()
                .expect("a response")
        };

        // Not STUN, or someone else's transaction (str0m's ICE checks): left alone.
        assert_eq!(client.handle_datagram(0, b"\x16\xfe\xfd dtls"), None);
        let foreign = stun::binding_request(&stun::new_transaction_id());
        assert_eq!(client.handle_datagram(0, &foreign), None);
        assert_eq!(client.handle_datagram(0, &answer(&foreign)), None);
        // A request (not a response) with our id is not an answer.
        assert_eq!(client.handle_datagram(0, &sent[0].data), None);
        // Socket 1's answer arriving on socket 0 is not socket 0's.
        let reply0 = answer(&sent[0].data);
        let reply1 = answer(&sent[1].data);
        assert_eq!(client.handle_datagram(0, &reply1), None);

        assert_eq!(
            client.handle_datagram(0, &reply0),
            Some(Response::Mapped {
                local,
                mapped,
                server
            })
        );
        // A duplicate is still consumed, without a second result.
        assert_eq!(client.handle_datagram(0, &reply0), Some(Response::Other));
        // Socket 0 is done; socket 1 still retransmits.
        let later = client.due(t0 + Duration::from_millis(250));
        assert_eq!(later.len(), 1);
        assert_eq!(later[0].socket, 1);

        // A malformed answer for our id is consumed and ends the query.
        let mut broken = reply1.clone();
        let last = broken.len() - 1;
        broken[last] ^= 0xff; // FINGERPRINT mismatch
        assert_eq!(client.handle_datagram(1, &broken), Some(Response::Other));
        assert_eq!(client.next_deadline(), None);
        assert_eq!(client.handle_datagram(1, &reply1), Some(Response::Other));
    }

    #[test]
    fn error_responses_end_the_query_and_stop_ends_all() {
        let t0 = Instant::now();
        let server = addr("127.0.0.1:3478");
        let mut client = StunClient::new(vec![(0, addr("127.0.0.1:1000"), server)], t0);
        let sent = client.due(t0);
        // A request with an unknown comprehension-required attribute earns a 420 error.
        let mut request = sent[0].data.clone();
        let fingerprint_at = request.len() - 8;
        request.truncate(fingerprint_at);
        request.extend_from_slice(&[0x7f, 0xff, 0, 0]);
        let len = u16::try_from(request.len() - 20).unwrap();
        request[2..4].copy_from_slice(&len.to_be_bytes());
        let error = stun::binding_response(&request, server)
            .unwrap()
            .expect("an error response");
        assert_eq!(client.handle_datagram(0, &error), Some(Response::Other));
        assert_eq!(client.next_deadline(), None);

        let mut client = StunClient::new(vec![(0, addr("127.0.0.1:1000"), server)], t0);
        client.stop();
        assert_eq!(client.next_deadline(), None);
        assert!(client.due(t0).is_empty());
    }
}
