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
//!
//! ## Graph-safe mode ([`StreamMode::GraphSafe`], issue 26)
//!
//! A CUDA graph bakes every value and address of its memory operations in
//! at capture, so a replay of a sequence-numbered wait would wait for the
//! same number again. In graph-safe mode every value a stream writes or
//! waits on is constant, on handshake flags per ring slot (round `r` uses
//! slot `r % depth`, as the ring does):
//!
//! | call | enqueued on the stream | the host, when it sees | the host then |
//! |---|---|---|---|
//! | send (slot `s`) | write `ready[s] = 1`; wait `sent[s] >= 1`; write `sent[s] = 0` | `ready[s] == 1` for the next round's slot | sets `ready[s] = 0`, posts the round; once it left its buffers, sets `sent[s] = 1` |
//! | receive (slot `s`) | wait `arrived[s] >= 1`; write `arrived[s] = 0` | the next round (slot `s`) in and visible | sets `arrived[s] = 1` |
//! | release (slot `s`) | write `released[s] = 1` | `released[s] == 1` for the oldest delivered round | sets `released[s] = 0`, releases the round |
//!
//! The side of each flag that consumes a handshake resets it (the stream
//! resets `sent` and `arrived` right after its wait; the host resets
//! `ready` and `released` before acting), and no handshake can be set
//! again before its reset: slot `s`'s next send waits for round `r`'s
//! credit, the host sets `arrived[s]` for round `r + depth` only after
//! round `r`'s release, which the stream writes after its reset. The host
//! counts rounds itself (each `ready` is the next round; rounds arrive in
//! order), so it needs no value from the stream: a recording that covers
//! a whole cycle of slots (`depth` steps, or `depth` recordings launched
//! in rotation) replays for ever. A slot signalled out of turn (a
//! recording of part of a cycle) is refused ([`GateError::OutOfTurn`]).

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
    /// Graph-safe mode: a stream signalled a slot out of turn.
    #[error("graph-safe stream {what}: the stream signalled slot {got} while round {round} (slot {expected}) is next; a recording must cover whole cycles of the ring's {depth} slots, enqueued on one stream")]
    OutOfTurn {
        what: &'static str,
        got: u32,
        expected: u32,
        round: u64,
        depth: u32,
    },
    /// Graph-safe mode: the host was about to overwrite a handshake the
    /// stream has not consumed.
    #[error("graph-safe stream {what}: slot {slot}'s flag is still set for round {round}'s predecessor in that slot")]
    Unconsumed {
        what: &'static str,
        slot: u32,
        round: u64,
    },
    /// Graph-safe mode: more receives enqueued than the ring has slots.
    #[error("graph-safe stream receives: {0} are enqueued and not released, as many as the ring has slots; another would wait on a slot whose round cannot come until one is released")]
    RingFull(u32),
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
    /// Graph-safe mode: `Ready` of the sends whose rounds land in slot `n`
    /// (0 or 1; see [`GraphSendGate`]).
    SlotReady(u32),
    /// Graph-safe mode: `Sent` of slot `n`'s sends.
    SlotSent(u32),
    /// Graph-safe mode: `Arrived` of the rounds in slot `n` (see [`GraphRecvGate`]).
    SlotArrived(u32),
    /// Graph-safe mode: `Released` of the rounds in slot `n`.
    SlotReleased(u32),
}

/// How a channel side's stream-ordered operations use their flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamMode {
    /// Per-gate sequence numbers 1, 2, 3, ...: each enqueued operation
    /// waits for and writes its own number (cannot be replayed from a
    /// recording: the numbers are baked into it).
    #[default]
    Sequence,
    /// Constant values on per-slot handshake flags (see the module docs):
    /// a recording of a whole cycle of ring slots can be replayed.
    GraphSafe,
}

impl StreamMode {
    pub fn name(self) -> &'static str {
        match self {
            StreamMode::Sequence => "sequence",
            StreamMode::GraphSafe => "graph-safe",
        }
    }
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

/// Graph-safe sends of one channel side (see the module docs): the
/// host's count of rounds, and which slots' sends are posted and not yet
/// out.
#[derive(Debug)]
pub struct GraphSendGate {
    depth: u32,
    /// Posted: (round, slot), in order, not yet out.
    posted: VecDeque<(u64, u32)>,
}

impl GraphSendGate {
    pub fn new(depth: usize) -> Self {
        GraphSendGate {
            depth: depth as u32,
            posted: VecDeque::new(),
        }
    }

    pub fn slot_of(&self, round: u64) -> u32 {
        (round % u64::from(self.depth)) as u32
    }

    /// A send of round `round` (by the host's count of enqueued sends),
    /// known to the host as `id` (not 0): its slot and the constant stream
    /// operations to enqueue. The stream signals `id`, so the host knows
    /// which enqueued send (which messages) each launch is.
    pub fn enqueue(&self, round: u64, id: u32) -> (u32, [StreamOp; 3]) {
        assert_ne!(id, 0, "ready = 0 means no send");
        let s = self.slot_of(round);
        (
            s,
            [
                StreamOp::Write(Flag::SlotReady(s), id),
                StreamOp::Wait(Flag::SlotSent(s), 1),
                StreamOp::Write(Flag::SlotSent(s), 0),
            ],
        )
    }

    /// The id of the send the stream signalled for round `next` (the
    /// round the host will post next), if it did, reading flags with
    /// `load`. A `ready` set on another slot is a stream out of turn.
    pub fn ready(&self, next: u64, load: impl Fn(Flag) -> u32) -> Result<Option<u32>, GateError> {
        let s = self.slot_of(next);
        let id = load(Flag::SlotReady(s));
        if id != 0 {
            return Ok(Some(id));
        }
        if let Some(got) = (0..self.depth).find(|&o| o != s && load(Flag::SlotReady(o)) != 0) {
            // The stream writes in order: a later slot's flag seen set
            // means this one's would be too, were it in turn.
            let id = load(Flag::SlotReady(s));
            if id != 0 {
                return Ok(Some(id));
            }
            return Err(GateError::OutOfTurn {
                what: "send",
                got,
                expected: s,
                round: next,
                depth: self.depth,
            });
        }
        Ok(None)
    }

    /// Round `round` was posted (the host reset its `ready`).
    pub fn on_posted(&mut self, round: u64) {
        self.posted.push_back((round, self.slot_of(round)));
    }

    /// The slots whose `sent` to set now: posted rounds that `is_sent`
    /// says have left their buffers (each slot's handshake is its own, so
    /// in any order).
    pub fn poll_sent(&mut self, mut is_sent: impl FnMut(u64) -> bool) -> Vec<u32> {
        let mut out = Vec::new();
        self.posted.retain(|&(r, s)| {
            let done = is_sent(r);
            if done {
                out.push(s);
            }
            !done
        });
        out
    }

    /// Rounds posted and not yet out.
    pub fn in_flight(&self) -> impl Iterator<Item = u64> + '_ {
        self.posted.iter().map(|p| p.0)
    }
}

/// Graph-safe receives and releases of one channel side (see the module
/// docs): every round that arrives is handed to the stream.
#[derive(Debug)]
pub struct GraphRecvGate {
    depth: u32,
    /// Receives enqueued and their release not yet enqueued.
    open: u32,
    /// Delivered to the stream, not yet released: rounds in order.
    delivered: VecDeque<u64>,
}

impl GraphRecvGate {
    pub fn new(depth: usize) -> Self {
        GraphRecvGate {
            depth: depth as u32,
            open: 0,
            delivered: VecDeque::new(),
        }
    }

    pub fn slot_of(&self, round: u64) -> u32 {
        (round % u64::from(self.depth)) as u32
    }

    /// A receive of round `round` (by the host's count of enqueued
    /// receives): its slot and the constant stream operations to enqueue.
    /// Refused while `depth` receives have no release enqueued.
    pub fn enqueue_recv(&mut self, round: u64) -> Result<(u32, [StreamOp; 2]), GateError> {
        if self.open >= self.depth {
            return Err(GateError::RingFull(self.open));
        }
        self.open += 1;
        let s = self.slot_of(round);
        Ok((
            s,
            [
                StreamOp::Wait(Flag::SlotArrived(s), 1),
                StreamOp::Write(Flag::SlotArrived(s), 0),
            ],
        ))
    }

    /// The release of a received round in slot `slot`: the stream
    /// operation to enqueue after the consumer's work.
    pub fn enqueue_release(&mut self, slot: u32) -> StreamOp {
        self.open = self.open.saturating_sub(1);
        StreamOp::Write(Flag::SlotReleased(slot), 1)
    }

    /// Round `round` is in and visible: the slot whose `arrived` to set.
    /// Its previous handshake must have been consumed (`arrived` back at 0).
    pub fn on_delivered(&mut self, round: u64, arrived: u32) -> Result<u32, GateError> {
        let s = self.slot_of(round);
        if arrived != 0 {
            return Err(GateError::Unconsumed {
                what: "receive",
                slot: s,
                round,
            });
        }
        self.delivered.push_back(round);
        Ok(s)
    }

    /// The oldest delivered round, if the stream released it (reading
    /// flags with `load`); the host then resets its `released` and
    /// releases it. A `released` set on another slot is a stream out of
    /// turn.
    /// `next_round`: the next round to be delivered (named in the error).
    pub fn next_released(
        &mut self,
        next_round: u64,
        load: impl Fn(Flag) -> u32,
    ) -> Result<Option<u64>, GateError> {
        let expected = self.delivered.front().map(|&r| (r, self.slot_of(r)));
        if let Some((r, s)) = expected {
            if load(Flag::SlotReleased(s)) != 0 {
                self.delivered.pop_front();
                return Ok(Some(r));
            }
        }
        let Some(got) = (0..self.depth)
            .find(|&o| Some(o) != expected.map(|e| e.1) && load(Flag::SlotReleased(o)) != 0)
        else {
            return Ok(None);
        };
        // Written in order: re-read the expected one before judging.
        if let Some((r, s)) = expected {
            if load(Flag::SlotReleased(s)) != 0 {
                self.delivered.pop_front();
                return Ok(Some(r));
            }
        }
        let round = expected.map_or(next_round, |e| e.0);
        Err(GateError::OutOfTurn {
            what: "release",
            got,
            expected: self.slot_of(round),
            round,
            depth: self.depth,
        })
    }

    /// Rounds delivered to the stream and not yet released.
    pub fn delivered(&self) -> usize {
        self.delivered.len()
    }

    /// Receives enqueued whose release is not.
    pub fn open(&self) -> u32 {
        self.open
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

    /// A graph-safe channel end to end: a sending stream and a receiving
    /// stream each replay a recording of `steps` steps (constant flag
    /// operations only) `replays` times; the hosts count rounds, post,
    /// deliver and release; the data of round `r` is `r`. Returns the
    /// rounds the consumer saw, or the first gate error.
    fn graph_sim(
        depth: usize,
        steps: usize,
        replays: usize,
        seed: u64,
    ) -> Result<Vec<u64>, GateError> {
        use std::collections::HashMap;
        #[derive(Clone, Copy)]
        enum Op {
            Gate(StreamOp),
            Produce,
            Consume(u32),
        }
        let mut flags: HashMap<Flag, u32> = HashMap::new();
        let (mut sg, mut rg) = (GraphSendGate::new(depth), GraphRecvGate::new(depth));
        // The recordings: enqueued once, with the hosts' round counts.
        let (mut send_prog, mut recv_prog) = (Vec::new(), Vec::new());
        for step in 0..steps as u64 {
            send_prog.push(Op::Produce);
            send_prog.extend(sg.enqueue(step, step as u32 + 1).1.map(Op::Gate));
            let (slot, ops) = rg.enqueue_recv(step)?;
            recv_prog.extend(ops.map(Op::Gate));
            recv_prog.push(Op::Consume(slot));
            recv_prog.push(Op::Gate(rg.enqueue_release(slot)));
        }
        let total = (steps * replays) as u64;
        let (send_prog, recv_prog) = (send_prog.repeat(replays), recv_prog.repeat(replays));
        let (mut sp, mut rp) = (0, 0);
        let mut produced = 0u64; // the source buffer's value
        let mut ring = vec![u64::MAX; depth];
        let (mut next_post, mut arrived, mut delivered_to, mut released) = (0u64, 0u64, 0u64, 0u64);
        let mut in_flight: Vec<(u64, u64)> = Vec::new(); // (round, value)
        let mut left: Vec<u64> = Vec::new();
        let mut seen = Vec::new();
        let mut rng = seed | 1;
        let mut idle = 0;
        while seen.len() < total as usize {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let moved = match rng % 5 {
                // The sending stream.
                0 if sp < send_prog.len() => match send_prog[sp] {
                    Op::Produce => {
                        produced += 1;
                        sp += 1;
                        true
                    }
                    Op::Gate(StreamOp::Write(f, v)) => {
                        flags.insert(f, v);
                        sp += 1;
                        true
                    }
                    Op::Gate(StreamOp::Wait(f, v)) => {
                        let ok = reached(*flags.get(&f).unwrap_or(&0), v);
                        sp += usize::from(ok);
                        ok
                    }
                    Op::Consume(_) => unreachable!(),
                },
                // The receiving stream.
                1 if rp < recv_prog.len() => match recv_prog[rp] {
                    Op::Consume(slot) => {
                        seen.push(ring[slot as usize]);
                        rp += 1;
                        true
                    }
                    Op::Gate(StreamOp::Write(f, v)) => {
                        flags.insert(f, v);
                        rp += 1;
                        true
                    }
                    Op::Gate(StreamOp::Wait(f, v)) => {
                        let ok = reached(*flags.get(&f).unwrap_or(&0), v);
                        rp += usize::from(ok);
                        ok
                    }
                    Op::Produce => unreachable!(),
                },
                // The sending host: post the next round with credit, or
                // complete one in flight.
                2 => {
                    let f = flags.clone();
                    let id = sg.ready(next_post, |fl| *f.get(&fl).unwrap_or(&0))?;
                    if let (true, Some(id)) = (next_post < released + depth as u64, id) {
                        assert_eq!(
                            u64::from(id),
                            next_post % steps as u64 + 1,
                            "round {next_post} is the send recorded at its step"
                        );
                        flags.insert(Flag::SlotReady(sg.slot_of(next_post)), 0);
                        in_flight.push((next_post, produced));
                        sg.on_posted(next_post);
                        next_post += 1;
                        true
                    } else if let Some(&(r, v)) = in_flight.first() {
                        // It lands in the receiver's ring and leaves its buffer.
                        ring[(r % depth as u64) as usize] = v - 1;
                        left.push(r);
                        in_flight.remove(0);
                        arrived = arrived.max(r + 1);
                        for s in sg.poll_sent(|x| left.contains(&x)) {
                            flags.insert(Flag::SlotSent(s), 1);
                        }
                        true
                    } else {
                        false
                    }
                }
                // The receiving host: deliver, release.
                _ => {
                    let f = flags.clone();
                    if let Some(r) =
                        rg.next_released(delivered_to, |fl| *f.get(&fl).unwrap_or(&0))?
                    {
                        flags.insert(Flag::SlotReleased(rg.slot_of(r)), 0);
                        assert_eq!(r, released, "releases in order");
                        released += 1;
                        true
                    } else if delivered_to < arrived {
                        let s = rg.slot_of(delivered_to);
                        let a = *flags.get(&Flag::SlotArrived(s)).unwrap_or(&0);
                        let s = rg.on_delivered(delivered_to, a)?;
                        flags.insert(Flag::SlotArrived(s), 1);
                        delivered_to += 1;
                        true
                    } else {
                        false
                    }
                }
            };
            idle = if moved { 0 } else { idle + 1 };
            if idle > 10_000 {
                break; // stuck: a hang, returned as what was seen
            }
        }
        Ok(seen)
    }

    #[test]
    fn a_recording_of_a_whole_cycle_replays_every_round_in_order() {
        for depth in [1, 2, 3, 4] {
            for seed in [1, 2, 3, 99] {
                let seen = graph_sim(depth, depth, 40, seed).unwrap();
                assert_eq!(
                    seen,
                    (0..(depth * 40) as u64).collect::<Vec<_>>(),
                    "depth {depth}"
                );
            }
        }
        // Two cycles per recording work too.
        let seen = graph_sim(2, 4, 10, 5).unwrap();
        assert_eq!(seen, (0..40).collect::<Vec<_>>());
    }

    #[test]
    fn a_recording_of_part_of_a_cycle_is_refused_not_silently_wrong() {
        for seed in [1, 2, 3, 99] {
            match graph_sim(2, 1, 20, seed) {
                Err(GateError::OutOfTurn { depth: 2, .. }) => {}
                other => panic!("one step of a depth-2 ring, replayed: {other:?}"),
            }
        }
    }

    proptest! {
        #[test]
        fn graph_safe_rounds_in_any_interleaving(depth in 1usize..5, cycles in 1usize..3, seed in any::<u64>()) {
            let seen = graph_sim(depth, depth * cycles, 8, seed).unwrap();
            prop_assert_eq!(seen, (0..(depth * cycles * 8) as u64).collect::<Vec<_>>());
        }
    }

    #[test]
    fn graph_safe_receives_are_refused_past_the_ring() {
        let mut g = GraphRecvGate::new(2);
        let (s0, ops) = g.enqueue_recv(6).unwrap();
        assert_eq!(s0, 0);
        assert_eq!(
            ops,
            [
                StreamOp::Wait(Flag::SlotArrived(0), 1),
                StreamOp::Write(Flag::SlotArrived(0), 0)
            ]
        );
        g.enqueue_recv(7).unwrap();
        assert_eq!(g.enqueue_recv(8), Err(GateError::RingFull(2)));
        assert_eq!(
            g.enqueue_release(0),
            StreamOp::Write(Flag::SlotReleased(0), 1)
        );
        assert_eq!(g.enqueue_recv(8).unwrap().0, 0);
        assert_eq!(
            g.on_delivered(6, 1),
            Err(GateError::Unconsumed {
                what: "receive",
                slot: 0,
                round: 6
            })
        );
    }
}
