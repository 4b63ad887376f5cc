//! What both roles keep per stream, written once: the slab of sockets (a slot is a mio token),
//! the flow-control bookkeeping of the `window` extension, and the loop that turns an HTTP/1.1
//! body into frame payloads. `serve.rs` keeps upstream connections in it, `proxy.rs` its clients.

use crate::frame::body_chunks;
use crate::http1::{BodyDecoder, BodyError};

use super::{READ_CHUNK, WINDOW, WINDOW_ACK};

/// Slots for a role's sockets; a slot's mio token is `super::token_of(slot)`. Freed slots are
/// reused, so the table stays as large as the most streams held at once.
pub struct Slab<T> {
    slots: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
        }
    }
}

impl<T> Slab<T> {
    /// The slot the next [`Slab::insert`] will use.
    pub fn vacant(&mut self) -> usize {
        if let Some(&slot) = self.free.last() {
            return slot;
        }
        self.slots.push(None);
        self.free.push(self.slots.len() - 1);
        self.slots.len() - 1
    }

    /// Puts `value` in the vacant slot and returns it.
    pub fn insert(&mut self, value: T) -> usize {
        let slot = self.vacant();
        self.free.pop();
        self.slots[slot] = Some(value);
        slot
    }

    pub fn get(&self, slot: usize) -> Option<&T> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    pub fn get_mut(&mut self, slot: usize) -> Option<&mut T> {
        self.slots.get_mut(slot).and_then(Option::as_mut)
    }

    pub fn remove(&mut self, slot: usize) -> Option<T> {
        let value = self.slots.get_mut(slot).and_then(Option::take)?;
        self.free.push(slot);
        Some(value)
    }

    /// The occupied slots, in slot order.
    pub fn slots(&self) -> Vec<usize> {
        self.iter().map(|(i, _)| i).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (usize, &T)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.as_ref().map(|v| (i, v)))
    }
}

/// Flow control of one stream in one direction each way (feature `window`): `credit` is what we
/// may still send, `unacked` what we received and have not yet given back as WINDOW. Without
/// the feature only `paused` matters.
#[derive(Debug)]
pub struct Flow {
    pub credit: i64,
    pub unacked: usize,
    /// What the peer may have unacknowledged toward us: [`WINDOW`], or more once we widened it.
    pub limit: i64,
    /// Reading stopped because the channel (or the credit) could not take more.
    pub paused: bool,
}

impl Default for Flow {
    fn default() -> Self {
        Flow {
            credit: WINDOW,
            unacked: 0,
            limit: WINDOW,
            paused: false,
        }
    }
}

impl Flow {
    /// Bytes one read may take now: a chunk, or less when the credit is short (`window`).
    pub fn budget(&self, window: bool) -> usize {
        if window {
            self.credit.clamp(0, READ_CHUNK as i64) as usize
        } else {
            READ_CHUNK
        }
    }

    /// `n` body bytes were sent.
    pub fn spent(&mut self, n: usize) {
        self.credit -= n as i64;
    }

    /// The peer granted `n` more bytes.
    pub fn granted(&mut self, n: u32) {
        self.credit += i64::from(n);
    }

    /// `n` body bytes arrived and are queued toward the socket. True when the sender has now
    /// sent more than the credit it was given: `limit` plus every WINDOW we sent it (the
    /// bytes it sent and we did not give back yet are `unacked`). Only meaningful with
    /// `window`: a version-1 peer has no credit to exceed.
    pub fn received(&mut self, n: usize) -> bool {
        self.unacked += n;
        self.overdraft() > 0
    }

    /// Bytes received beyond the credit given.
    pub fn overdraft(&self) -> i64 {
        self.unacked as i64 - self.limit
    }

    /// Raises what the peer may have in flight toward us to `to` bytes (a long path needs
    /// more than [`WINDOW`]): the extra credit to send it in a WINDOW frame, if any. Any peer
    /// with `window` adds granted credit to its own, so the receiver alone decides this.
    pub fn widen(&mut self, to: i64) -> Option<u32> {
        let extra = u32::try_from(to - self.limit).ok().filter(|n| *n > 0)?;
        self.limit = to;
        Some(extra)
    }

    /// With `window`: the credit to give back once what is queued toward the socket (`queued`
    /// bytes) has fallen under [`WINDOW_ACK`], if any.
    pub fn ack(&mut self, window: bool, queued: usize) -> Option<u32> {
        if window && self.unacked > 0 && queued < WINDOW_ACK {
            Some(std::mem::take(&mut self.unacked) as u32)
        } else {
            None
        }
    }
}

/// What [`decode_body`] took from its input.
pub struct BodyStep {
    pub consumed: usize,
    pub done: bool,
}

/// Decodes as much of an HTTP/1.1 body as `input` holds, handing each payload piece (at most
/// one body frame long) to `emit`.
pub fn decode_body(
    dec: &mut BodyDecoder,
    input: &[u8],
    mut emit: impl FnMut(&[u8]),
) -> Result<BodyStep, BodyError> {
    let mut pos = 0;
    while !dec.is_done() {
        let d = dec.decode(input.get(pos..).unwrap_or_default())?;
        for piece in body_chunks(d.data) {
            emit(piece);
        }
        pos += d.consumed;
        if d.consumed == 0 {
            break;
        }
    }
    Ok(BodyStep {
        consumed: pos,
        done: dec.is_done(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::BodyFraming;

    #[test]
    fn slab_reuses_slots() {
        let mut s = Slab::default();
        assert_eq!(s.vacant(), 0);
        assert_eq!(s.insert("a"), 0);
        assert_eq!(s.insert("b"), 1);
        assert_eq!(s.remove(0), Some("a"));
        assert_eq!(s.remove(0), None);
        assert_eq!(s.vacant(), 0);
        assert_eq!(s.insert("c"), 0);
        assert_eq!(s.slots(), vec![0, 1]);
        assert_eq!(s.get(1), Some(&"b"));
    }

    #[test]
    fn flow_budget_and_acks() {
        let mut f = Flow::default();
        assert_eq!(f.budget(false), READ_CHUNK);
        f.spent(WINDOW as usize - 10);
        assert_eq!(f.budget(true), 10);
        f.spent(20);
        assert_eq!(f.budget(true), 0, "overdrawn credit reads nothing");
        f.granted(1000);
        assert_eq!(f.budget(true), 990);
        assert!(!f.received(500));
        assert_eq!(f.ack(true, WINDOW_ACK), None, "socket still backed up");
        assert_eq!(f.ack(false, 0), None, "no window, no acks");
        assert_eq!(f.ack(true, 0), Some(500));
        assert_eq!(f.ack(true, 0), None);
    }

    #[test]
    fn a_widened_flow_grants_the_difference_once_and_accepts_that_much_more() {
        let mut f = Flow::default();
        assert_eq!(f.widen(WINDOW), None, "nothing to grant");
        assert_eq!(f.widen(3 * WINDOW), Some(2 * WINDOW as u32));
        assert_eq!(f.widen(2 * WINDOW), None, "never narrowed");
        assert!(
            !f.received(3 * WINDOW as usize),
            "the widened window is fine"
        );
        assert!(f.received(1), "one byte beyond it is not");
    }

    #[test]
    fn flow_overdraft_is_what_the_sender_had_no_credit_for() {
        let mut f = Flow::default();
        assert!(!f.received(WINDOW as usize), "exactly the window is fine");
        assert_eq!(f.ack(true, 0), Some(WINDOW as u32));
        assert!(
            !f.received(WINDOW as usize),
            "and again after giving it back"
        );
        assert!(f.received(1), "one byte more than the credit");
        assert_eq!(f.overdraft(), 1);
    }

    #[test]
    fn chunked_body_in_pieces() {
        let mut dec = BodyDecoder::new(BodyFraming::Chunked);
        let mut got = Vec::new();
        let step = decode_body(&mut dec, b"3\r\nabc\r\n2\r\nde\r\n0\r\n", |p| {
            got.extend_from_slice(p)
        })
        .unwrap();
        assert_eq!(got, b"abcde");
        assert!(!step.done);
        let step = decode_body(&mut dec, b"\r\n", |_| {}).unwrap();
        assert!(step.done && step.consumed == 2);
    }
}
