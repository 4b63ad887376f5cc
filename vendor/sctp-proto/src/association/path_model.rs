//! What the sender has measured about its path, for loss-tolerant congestion control and
//! time-based loss detection (PATCHES.md §3): the minimum and recent round-trip time, the
//! delivery rate (a windowed maximum of per-round samples, as in BBR and TCP Westwood+) and the
//! share of chunks lost in the last rounds. `Association` feeds it from SACK processing and asks
//! it, when a loss is detected, whether the loss is congestion (a queue is building, or many
//! chunks are lost) or noise (the path drops packets at random while the queue stays empty).

use std::time::{Duration, Instant};

/// Delivery-rate samples kept: the bandwidth estimate is the largest of the last this many rounds.
const RATE_ROUNDS: usize = 10;
/// How long a minimum RTT stands before a newer sample may replace it.
const MIN_RTT_WINDOW: Duration = Duration::from_secs(30);
/// A loss is noise only while the recent RTT is within this share of the minimum (1/4) …
const QUEUE_RTT_SHARE: u32 = 4;
/// … or within this much of it, whichever is larger (timer granularity, scheduling jitter).
const QUEUE_RTT_SLACK: Duration = Duration::from_millis(4);
/// A loss is congestion when more than 1 in this many chunks of the last two rounds was lost.
const CONGESTION_LOSS_RATIO: u64 = 10;
/// … counted over at least this many chunks (in a small window one loss is not a share).
const LOSS_SHARE_MIN_CHUNKS: u64 = 50;

#[derive(Debug, Default)]
pub(crate) struct PathModel {
    min_rtt: Option<(Duration, Instant)>,
    /// The smallest RTT sample of this round and of the one before: one sample inflated by a
    /// delayed SACK does not move it; a queue at the bottleneck delays them all.
    round_rtt: [Option<Duration>; 2],
    /// Bytes acknowledged so far (cumulatively or by gap blocks).
    delivered: u64,
    /// Start of the current round: when, and `delivered` then.
    round: Option<(Instant, u64)>,
    rates: [u64; RATE_ROUNDS],
    next_rate: usize,
    /// Chunks acknowledged and chunks declared lost, this round and the one before.
    acked: [u64; 2],
    lost: [u64; 2],
}

impl PathModel {
    /// A round-trip sample: a chunk acknowledged on its first transmission (Karn), `rtt`
    /// after it was sent.
    pub(crate) fn on_rtt(&mut self, rtt: Duration, now: Instant) {
        self.round_rtt[0] = Some(self.round_rtt[0].map_or(rtt, |r| r.min(rtt)));
        match self.min_rtt {
            Some((min, at)) if rtt > min && now.saturating_duration_since(at) < MIN_RTT_WINDOW => {}
            _ => self.min_rtt = Some((rtt, now)),
        }
    }

    pub(crate) fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt.map(|(rtt, _)| rtt)
    }

    /// `bytes` in `chunks` newly acknowledged by a SACK at `now`.
    pub(crate) fn on_acked(&mut self, bytes: u64, chunks: u64, now: Instant) {
        self.delivered += bytes;
        self.acked[0] += chunks;
        let Some((start, delivered_then)) = self.round else {
            self.round = Some((now, self.delivered));
            return;
        };
        let elapsed = now.saturating_duration_since(start);
        let round = self.min_rtt().unwrap_or(Duration::from_millis(100));
        if elapsed < round.max(Duration::from_millis(1)) {
            return;
        }
        let rate = (self.delivered - delivered_then) as u128 * 1_000_000 / elapsed.as_micros();
        self.rates[self.next_rate] = u64::try_from(rate).unwrap_or(u64::MAX);
        self.next_rate = (self.next_rate + 1) % RATE_ROUNDS;
        self.round = Some((now, self.delivered));
        self.acked = [0, self.acked[0]];
        self.lost = [0, self.lost[0]];
        self.round_rtt = [None, self.round_rtt[0]];
    }

    /// `chunks` newly declared lost.
    pub(crate) fn on_lost(&mut self, chunks: u64) {
        self.lost[0] += chunks;
    }

    /// The bandwidth-delay product measured: the best delivery rate of the last rounds times
    /// the minimum RTT (0 before both are known).
    pub(crate) fn bdp(&self) -> u32 {
        let Some(min_rtt) = self.min_rtt() else {
            return 0;
        };
        let rate = self.rates.iter().copied().max().unwrap_or(0) as u128;
        u32::try_from(rate * min_rtt.as_micros() / 1_000_000).unwrap_or(u32::MAX)
    }

    /// Whether the loss just detected is congestion: the recent RTT (the smallest sample of
    /// this round and the one before) stands above the minimum by more than a quarter (a queue
    /// is building at the bottleneck), or more than one chunk in ten of the last two rounds was
    /// lost (of at least 50). Before the first RTT sample, every loss is.
    pub(crate) fn loss_is_congestion(&self) -> bool {
        if self.min_rtt().is_none() || self.queue_building() {
            return true;
        }
        let lost: u64 = self.lost.iter().sum();
        let acked: u64 = self.acked.iter().sum();
        lost + acked >= LOSS_SHARE_MIN_CHUNKS && lost * CONGESTION_LOSS_RATIO > lost + acked
    }

    /// The recent RTT stands above the minimum by more than a quarter (at least 4 ms): a queue
    /// is building at the bottleneck.
    fn queue_building(&self) -> bool {
        let Some(min) = self.min_rtt() else {
            return false;
        };
        let recent = self.round_rtt.iter().flatten().min();
        recent.is_some_and(|r| r.saturating_sub(min) > (min / QUEUE_RTT_SHARE).max(QUEUE_RTT_SLACK))
    }

    /// The path has room: RTT samples this round or the one before, and none above the
    /// minimum by as much as a queue would add. The sender may then keep growing its window
    /// as in slow start even above ssthresh, which a timeout or a loss while the flight was
    /// small may have left far below the path's capacity.
    pub(crate) fn has_room(&self) -> bool {
        // A sample in `round_rtt` has set `min_rtt` too.
        self.round_rtt.iter().any(Option::is_some) && !self.queue_building()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bdp_is_the_best_rate_of_the_last_rounds_times_the_minimum_rtt() {
        let t0 = Instant::now();
        let mut m = PathModel::default();
        m.on_rtt(Duration::from_millis(50), t0);
        m.on_acked(1000, 1, t0);
        // 100 kB over each 50 ms round: 2 MB/s, a 100 kB BDP.
        for i in 1..=5 {
            m.on_acked(100_000, 80, t0 + Duration::from_millis(50 * i));
        }
        assert_eq!(m.bdp(), 100_000);
        // A slow round does not lower the estimate; a faster one raises it.
        m.on_acked(10_000, 8, t0 + Duration::from_millis(300));
        assert_eq!(m.bdp(), 100_000);
        m.on_acked(200_000, 160, t0 + Duration::from_millis(350));
        assert_eq!(m.bdp(), 200_000);
    }

    #[test]
    fn random_loss_on_an_empty_queue_is_noise_a_queue_or_heavy_loss_is_congestion() {
        let t0 = Instant::now();
        let mut m = PathModel::default();
        assert!(m.loss_is_congestion(), "nothing measured yet");
        m.on_rtt(Duration::from_millis(50), t0);
        m.on_acked(100_000, 100, t0);
        m.on_lost(1);
        assert!(!m.loss_is_congestion(), "1 % lost, RTT at its minimum");
        // A new round whose every sample is 40 % above the minimum: a queue.
        m.on_acked(100_000, 100, t0 + Duration::from_millis(50));
        m.on_acked(100_000, 100, t0 + Duration::from_millis(100));
        m.on_rtt(Duration::from_millis(70), t0 + Duration::from_millis(100));
        assert!(m.loss_is_congestion(), "RTT 40 % above its minimum");
        m.on_rtt(Duration::from_millis(55), t0 + Duration::from_millis(110));
        assert!(
            !m.loss_is_congestion(),
            "one sample near the minimum: no queue"
        );
        m.on_lost(50);
        assert!(m.loss_is_congestion(), "a third lost");
    }

    #[test]
    fn the_path_has_room_while_recent_rtts_show_no_queue() {
        let t0 = Instant::now();
        let mut m = PathModel::default();
        assert!(!m.has_room(), "nothing measured yet");
        m.on_rtt(Duration::from_millis(50), t0);
        m.on_acked(100_000, 100, t0);
        assert!(m.has_room(), "RTT at its minimum");
        // Rounds whose samples stand 40 % above the minimum: a queue, so no more slow start.
        m.on_acked(100_000, 100, t0 + Duration::from_millis(50));
        m.on_rtt(Duration::from_millis(70), t0 + Duration::from_millis(60));
        m.on_acked(100_000, 100, t0 + Duration::from_millis(110));
        m.on_rtt(Duration::from_millis(70), t0 + Duration::from_millis(120));
        assert!(!m.has_room(), "RTT 40 % above its minimum");
        // Two rounds without a sample (an idle or app-limited sender): nothing to go by.
        m.on_acked(100_000, 100, t0 + Duration::from_millis(170));
        m.on_acked(100_000, 100, t0 + Duration::from_millis(230));
        assert!(!m.has_room(), "no recent sample");
        m.on_rtt(Duration::from_millis(51), t0 + Duration::from_millis(240));
        assert!(m.has_room(), "back near the minimum");
    }

    #[test]
    fn the_minimum_rtt_ages_out() {
        let t0 = Instant::now();
        let mut m = PathModel::default();
        m.on_rtt(Duration::from_millis(20), t0);
        m.on_rtt(Duration::from_millis(40), t0 + Duration::from_secs(10));
        assert_eq!(m.min_rtt(), Some(Duration::from_millis(20)));
        m.on_rtt(
            Duration::from_millis(40),
            t0 + MIN_RTT_WINDOW + Duration::from_secs(1),
        );
        assert_eq!(m.min_rtt(), Some(Duration::from_millis(40)));
    }
}
