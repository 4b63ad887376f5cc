use std::sync::atomic::{AtomicUsize, Ordering};

// Process-wide totals (PATCHES.md §4), in `usize` atomics: 32-bit MIPS has no 64-bit ones.
// There they wrap after 2^32 counts.

/// Chunks retransmitted (fast retransmit, tail-loss probe or T3-rtx) by every association of
/// this process; see [`process_retransmitted_chunks`].
static RETRANSMITTED_CHUNKS: AtomicUsize = AtomicUsize::new(0);
/// T3-rtx timeouts of every association of this process.
static T3_TIMEOUTS: AtomicUsize = AtomicUsize::new(0);

/// DATA chunks sent again, over every association of this process since it started. For an
/// application that holds its associations through a library that keeps them private (str0m's
/// `Rtc`) and wants a retransmission counter for its metrics.
pub fn process_retransmitted_chunks() -> u64 {
    RETRANSMITTED_CHUNKS.load(Ordering::Relaxed) as u64
}

/// T3-rtx timeouts, over every association of this process since it started.
pub fn process_t3_timeouts() -> u64 {
    T3_TIMEOUTS.load(Ordering::Relaxed) as u64
}

/// Counts `n` chunks sent again, in the process-wide total.
pub(crate) fn add_retransmitted_chunks(n: usize) {
    RETRANSMITTED_CHUNKS.fetch_add(n, Ordering::Relaxed);
}

/// Association statistics
#[derive(Default, Debug, Copy, Clone)]
pub struct AssociationStats {
    n_datas: u64,
    n_sacks: u64,
    n_t3timeouts: u64,
    n_ack_timeouts: u64,
    n_fast_retrans: u64,
}

impl AssociationStats {
    pub fn inc_datas(&mut self) {
        self.n_datas += 1;
    }

    pub fn get_num_datas(&mut self) -> u64 {
        self.n_datas
    }

    pub fn inc_sacks(&mut self) {
        self.n_sacks += 1;
    }

    pub fn get_num_sacks(&mut self) -> u64 {
        self.n_sacks
    }

    pub fn inc_t3timeouts(&mut self) {
        self.n_t3timeouts += 1;
        T3_TIMEOUTS.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get_num_t3timeouts(&mut self) -> u64 {
        self.n_t3timeouts
    }

    pub fn inc_ack_timeouts(&mut self) {
        self.n_ack_timeouts += 1;
    }

    pub fn get_num_ack_timeouts(&mut self) -> u64 {
        self.n_ack_timeouts
    }

    pub fn inc_fast_retrans(&mut self) {
        self.n_fast_retrans += 1;
        add_retransmitted_chunks(1);
    }

    pub fn get_num_fast_retrans(&mut self) -> u64 {
        self.n_fast_retrans
    }

    pub fn reset(&mut self) {
        self.n_datas = 0;
        self.n_sacks = 0;
        self.n_t3timeouts = 0;
        self.n_ack_timeouts = 0;
        self.n_fast_retrans = 0;
    }
}
