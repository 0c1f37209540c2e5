//! Stream-ordered gating: the flag protocol between GPU streams and the
//! progress engine, as sans-IO logic (issue 16's foundation).
//!
//! A framework enqueues m2n's operations on a CUDA stream instead of
//! blocking its CPU. Each operation becomes a pair of stream memory
//! operations on 32-bit flags in pinned host memory, and the progress
//! engine (or a proxy thread) drives the other half:
//!
//! | call | enqueued on the stream | the host, when it sees | the host then |
//! |---|---|---|---|
//! | send `s` | write `ready = s` (after the producer's work), then wait `sent >= s` | `ready >= s` | posts send `s`'s writes; once they have left their buffers, sets `sent = s` |
//! | receive `s` | wait `arrived >= s` | the `s`-th round delivered (and visible to the GPU) | sets `arrived = s` |
//! | release `s` | write `released = s` (after the consumer's work) | `released >= s` | releases the round of release `s` |
//!
//! So no kernel is launched and no SM spins: the GPU's front end waits on
//! the flags (`cuStreamWaitValue32` / `cuStreamWriteValue32`).
//!
//! Sequence numbers are per gate, start at 1 (flags start at 0: nothing
//! reached) and wrap at 2^32. `CU_STREAM_WAIT_VALUE_GEQ` compares wrap-aware
//! (`(int32_t)(*flag - value) >= 0`), and so does [`reached`]; that is
//! sound while fewer than 2^31 operations of a gate are outstanding, which
//! each gate enforces (ring depths keep it far lower in practice). The
//! host only ever moves a flag forward, in order: `sent` and `arrived` name
//! the last operation all of whose predecessors are done too.

use std::collections::VecDeque;

use thiserror::Error;

/// The kinds of stream, whose flags live in different memory. Here at the
/// bottom because transports name it too (which streams can copy a staged
/// region), and transports sit below streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Host,
    Cuda,
}

impl StreamKind {
    pub fn name(self) -> &'static str {
        match self {
            StreamKind::Host => "host",
            StreamKind::Cuda => "CUDA",
        }
    }
}

/// Most operations one gate may have outstanding (see the module docs).
pub const MAX_OUTSTANDING: u32 = (1 << 31) - 1;

/// Whether a flag holding `flag` satisfies a wait for `seq` (wrap-aware,
/// as `CU_STREAM_WAIT_VALUE_GEQ`).
pub fn reached(flag: u32, seq: u32) -> bool {
    flag.wrapping_sub(seq) as i32 >= 0
}

/// Misuse of a gate.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum GateError {
    #[error(
        "{0} stream-ordered operations are outstanding on this gate; at most {MAX_OUTSTANDING}"
    )]
    TooMany(u32),
    #[error("the host was told about {what} {got}, but {expected} is the next one")]
    OutOfOrder {
        what: &'static str,
        got: u64,
        expected: u64,
    },
}

/// Stream operations to enqueue for one call, in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamOp {
    /// `cuStreamWriteValue32(flag, value)` on the named flag.
    Write(Flag, u32),
    /// `cuStreamWaitValue32(flag, value, GEQ)` on the named flag.
    Wait(Flag, u32),
}

/// The flags of one channel side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Flag {
    /// Stream to host: the send's data are produced.
    Ready,
    /// Host to stream: the send's data have left their buffers.
    Sent,
    /// Host to stream: the round is in and visible.
    Arrived,
    /// Stream to host: the consumer is done with the round.
    Released,
}

/// Sequence numbers: the next one, and how many are outstanding.
#[derive(Debug)]
struct Seq {
    next: u32,
    outstanding: u32,
}

impl Seq {
    fn new() -> Self {
        Seq {
            next: 1,
            outstanding: 0,
        }
    }

    fn take(&mut self) -> Result<u32, GateError> {
        if self.outstanding >= MAX_OUTSTANDING {
            return Err(GateError::TooMany(self.outstanding));
        }
        let s = self.next;
        self.next = self.next.wrapping_add(1);
        self.outstanding += 1;
        Ok(s)
    }
}

/// The send side of one channel: sends gated on `ready`, reported on `sent`.
#[derive(Debug)]
pub struct SendGate {
    seq: Seq,
    /// Enqueued, waiting for the stream to reach them (`ready`).
    waiting: VecDeque<u32>,
    /// Posted: (sequence number, m2n round), in order, and whether sent.
    posted: VecDeque<(u32, u64, bool)>,
}

impl Default for SendGate {
    fn default() -> Self {
        Self::new()
    }
}

impl SendGate {
    pub fn new() -> Self {
        SendGate {
            seq: Seq::new(),
            waiting: VecDeque::new(),
            posted: VecDeque::new(),
        }
    }

    /// A stream-ordered send: its sequence number and the stream
    /// operations to enqueue (signal `ready`, then wait for `sent`).
    pub fn enqueue(&mut self) -> Result<(u32, [StreamOp; 2]), GateError> {
        let s = self.seq.take()?;
        self.waiting.push_back(s);
        Ok((
            s,
            [
                StreamOp::Write(Flag::Ready, s),
                StreamOp::Wait(Flag::Sent, s),
            ],
        ))
    }

    /// The next send whose data the stream has produced (given the `ready`
    /// flag's value), to post now; `None` while the stream is behind.
    /// Sends are released in order.
    pub fn next_ready(&self, ready: u32) -> Option<u32> {
        self.waiting.front().copied().filter(|&s| reached(ready, s))
    }

    /// Send `seq` (from [`next_ready`](Self::next_ready)) was posted as m2n
    /// round `round`.
    pub fn on_posted(&mut self, seq: u32, round: u64) -> Result<(), GateError> {
        match self.waiting.front() {
            Some(&s) if s == seq => {}
            other => {
                return Err(GateError::OutOfOrder {
                    what: "posted send",
                    got: u64::from(seq),
                    expected: other.map_or(0, |&s| u64::from(s)),
                })
            }
        }
        self.waiting.pop_front();
        self.posted.push_back((seq, round, false));
        Ok(())
    }

    /// Round `round` has left its buffers. Returns the new value of the
    /// `sent` flag when it moves (every earlier send is out too).
    pub fn on_sent(&mut self, round: u64) -> Option<u32> {
        self.poll_sent(|r| r == round)
    }

    /// Marks every posted round that `is_sent` says has left its buffers;
    /// returns the new value of the `sent` flag when it moves.
    pub fn poll_sent(&mut self, mut is_sent: impl FnMut(u64) -> bool) -> Option<u32> {
        for p in self.posted.iter_mut().filter(|p| !p.2) {
            p.2 = is_sent(p.1);
        }
        let mut publish = None;
        while let Some(&(s, _, true)) = self.posted.front() {
            self.posted.pop_front();
            self.seq.outstanding -= 1;
            publish = Some(s);
        }
        publish
    }

    /// Sends enqueued and not yet posted.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The last sequence number handed out: setting `sent` to it releases
    /// every stream waiting on this gate (used when the group failed, so
    /// that no stream waits for ever).
    pub fn last_issued(&self) -> u32 {
        self.seq.next.wrapping_sub(1)
    }

    /// Whether any send is enqueued and not yet out.
    pub fn busy(&self) -> bool {
        self.seq.outstanding > 0
    }

    /// Rounds posted and not yet sent, oldest first.
    pub fn in_flight(&self) -> impl Iterator<Item = u64> + '_ {
        self.posted.iter().filter(|p| !p.2).map(|p| p.1)
    }
}

/// The receive side of one channel: receives reported on `arrived`,
/// releases gated on `released`.
#[derive(Debug)]
pub struct RecvGate {
    recv_seq: Seq,
    /// Receives enqueued and not yet satisfied, in order.
    awaiting: VecDeque<u32>,
    release_seq: Seq,
    /// Releases enqueued: (sequence number, round), in order.
    releases: VecDeque<(u32, u64)>,
}

impl Default for RecvGate {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvGate {
    pub fn new() -> Self {
        RecvGate {
            recv_seq: Seq::new(),
            awaiting: VecDeque::new(),
            release_seq: Seq::new(),
            releases: VecDeque::new(),
        }
    }

    /// A stream-ordered receive of the next round: its sequence number and
    /// the stream operation to enqueue (wait for `arrived`).
    pub fn enqueue_recv(&mut self) -> Result<(u32, StreamOp), GateError> {
        let s = self.recv_seq.take()?;
        self.awaiting.push_back(s);
        Ok((s, StreamOp::Wait(Flag::Arrived, s)))
    }

    /// Stream-ordered receives enqueued and not yet satisfied.
    pub fn awaiting(&self) -> usize {
        self.awaiting.len()
    }

    /// The last receive sequence number handed out (see
    /// [`SendGate::last_issued`]).
    pub fn last_issued(&self) -> u32 {
        self.recv_seq.next.wrapping_sub(1)
    }

    /// Whether any receive or release is enqueued and not yet done.
    pub fn busy(&self) -> bool {
        self.recv_seq.outstanding > 0 || self.release_seq.outstanding > 0
    }

    /// Whether a stream-ordered receive is waiting for a round.
    pub fn wants_round(&self) -> bool {
        !self.awaiting.is_empty()
    }

    /// The next round is in and visible: the new value of `arrived`, or
    /// `None` if no stream-ordered receive asked for it (the round then
    /// stays with the caller of the non-stream API).
    pub fn on_delivered(&mut self) -> Option<u32> {
        let s = self.awaiting.pop_front()?;
        self.recv_seq.outstanding -= 1;
        Some(s)
    }

    /// A stream-ordered release of `round`: the stream operation to
    /// enqueue after the consumer's work (write `released`).
    pub fn enqueue_release(&mut self, round: u64) -> Result<(u32, StreamOp), GateError> {
        let s = self.release_seq.take()?;
        self.releases.push_back((s, round));
        Ok((s, StreamOp::Write(Flag::Released, s)))
    }

    /// Rounds the stream is done with (given the `released` flag's
    /// value), in order: release them now.
    pub fn releasable(&mut self, released: u32) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(&(s, round)) = self.releases.front() {
            if !reached(released, s) {
                break;
            }
            self.releases.pop_front();
            self.release_seq.outstanding -= 1;
            out.push(round);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reached_is_wrap_aware_like_cuda_geq() {
        assert!(reached(5, 5) && reached(6, 5) && !reached(4, 5));
        assert!(!reached(0, 1), "a fresh flag reaches nothing");
        assert!(reached(2, u32::MAX), "2 is 3 past u32::MAX after the wrap");
        assert!(!reached(u32::MAX, 2));
        assert!(reached(5u32.wrapping_add(MAX_OUTSTANDING), 5));
    }

    /// A stream and a host over one send gate: the stream writes `ready`
    /// in order, the host posts and completes rounds (completions out of
    /// order); `sent` only moves forward, past sends that are all out.
    fn run_sends(start: u32, n: u32, seed: u64) {
        let mut g = SendGate::new();
        g.seq.next = start;
        let mut rng = seed | 1;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let seqs: Vec<u32> = (0..n).map(|_| g.enqueue().unwrap().0).collect();
        assert_eq!(seqs[0], start);
        let (mut ready, mut sent_flag) = (start.wrapping_sub(1), start.wrapping_sub(1));
        let (mut posted, mut round) = (Vec::new(), 100u64);
        let mut sent_rounds = std::collections::HashSet::new();
        while sent_flag != seqs[n as usize - 1] {
            match next() % 3 {
                0 if ready != seqs[n as usize - 1] => ready = ready.wrapping_add(1),
                1 => {
                    if let Some(s) = g.next_ready(ready) {
                        assert!(reached(ready, s));
                        g.on_posted(s, round).unwrap();
                        posted.push((s, round));
                        round += 1;
                    }
                }
                _ => {
                    let open: Vec<u64> = g.in_flight().collect();
                    if !open.is_empty() {
                        let r = open[next() as usize % open.len()];
                        sent_rounds.insert(r);
                        if let Some(v) = g.on_sent(r) {
                            assert!(
                                reached(v, sent_flag) && v != sent_flag,
                                "sent moves forward"
                            );
                            // Every send up to v is out.
                            for &(s, r) in &posted {
                                if reached(v, s) {
                                    assert!(
                                        sent_rounds.contains(&r),
                                        "sent = {v} before round {r} left"
                                    );
                                }
                            }
                            sent_flag = v;
                        }
                    }
                }
            }
        }
        assert_eq!(g.seq.outstanding, 0);
        assert_eq!(posted.len(), n as usize);
    }

    #[test]
    fn sends_wrap_around_u32() {
        run_sends(u32::MAX - 5, 12, 7);
        run_sends(1, 50, 3);
    }

    proptest! {
        #[test]
        fn sends_in_any_interleaving(start in any::<u32>(), n in 1u32..40, seed in any::<u64>()) {
            run_sends(start, n, seed);
        }
    }

    #[test]
    fn a_send_is_posted_only_once_the_stream_reaches_it() {
        let mut g = SendGate::new();
        let (s1, ops) = g.enqueue().unwrap();
        assert_eq!(
            ops,
            [
                StreamOp::Write(Flag::Ready, 1),
                StreamOp::Wait(Flag::Sent, 1)
            ]
        );
        let (s2, _) = g.enqueue().unwrap();
        assert_eq!(g.next_ready(0), None);
        assert_eq!(g.next_ready(1), Some(s1));
        assert_eq!(
            g.on_posted(s2, 0),
            Err(GateError::OutOfOrder {
                what: "posted send",
                got: 2,
                expected: 1
            })
        );
        g.on_posted(s1, 7).unwrap();
        assert_eq!(g.next_ready(1), None, "send 2 waits for ready >= 2");
        assert_eq!(g.next_ready(2), Some(s2));
        g.on_posted(s2, 8).unwrap();
        assert_eq!(g.on_sent(8), None, "send 1 is still in flight");
        assert_eq!(g.on_sent(7), Some(2), "both out: sent jumps to 2");
    }

    #[test]
    fn receives_and_releases_in_order() {
        let mut g = RecvGate::new();
        assert_eq!(g.on_delivered(), None, "nobody asked on a stream");
        let (r1, op) = g.enqueue_recv().unwrap();
        assert_eq!(op, StreamOp::Wait(Flag::Arrived, 1));
        let (r2, _) = g.enqueue_recv().unwrap();
        assert!(g.wants_round());
        assert_eq!(g.on_delivered(), Some(r1));
        assert_eq!(g.on_delivered(), Some(r2));
        assert!(!g.wants_round());
        let (_, op) = g.enqueue_release(40).unwrap();
        assert_eq!(op, StreamOp::Write(Flag::Released, 1));
        g.enqueue_release(41).unwrap();
        assert_eq!(g.releasable(0), Vec::<u64>::new());
        assert_eq!(g.releasable(1), vec![40]);
        assert_eq!(g.releasable(5), vec![41]);
        assert_eq!(g.releasable(5), Vec::<u64>::new());
    }

    #[test]
    fn a_gate_refuses_more_than_it_can_compare() {
        let mut g = RecvGate::new();
        g.recv_seq.outstanding = MAX_OUTSTANDING;
        assert_eq!(g.enqueue_recv(), Err(GateError::TooMany(MAX_OUTSTANDING)));
    }
}
