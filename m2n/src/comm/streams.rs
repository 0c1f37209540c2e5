//! The host's half of stream-ordered operations: what the progress engine
//! does with the flags of [`crate::proto::gate`] (see [`crate::stream`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::{Channel, Communicator, Error, Msg, RecvRound, Result};
use crate::proto::gate::{
    Flag, GateError, GraphRecvGate, GraphSendGate, RecvGate, SendGate, StreamMode,
};
use crate::stream::{FlagBlock, FlagLayout, MappedRegion, Stream, StreamKind, StreamRound};
use crate::transport::RegionId;

/// A graph-safe send as the host keeps it: the stream signals its id.
#[derive(Debug, Clone)]
struct SendTemplate {
    sources: Vec<(RegionId, usize)>,
    lens: Vec<usize>,
    /// Recorded (a capture): launched any number of times, kept. Not
    /// recorded: runs once, forgotten once posted.
    recorded: bool,
}

/// Keeps graph-safe waits let go after the group failed: a replayed
/// recording resets `sent` and `arrived` after each wait, so one store
/// would hold only until the next launch.
#[derive(Debug)]
struct Releaser {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Releaser {
    fn start(flags: Arc<FlagBlock>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name("m2n-let-go".into())
            .spawn(move || {
                let l = flags.layout();
                while !st.load(Ordering::Acquire) {
                    for s in 0..l.send_slots {
                        flags.store(Flag::SlotSent(s), 1);
                    }
                    for s in 0..l.recv_slots {
                        flags.store(Flag::SlotArrived(s), 1);
                    }
                    std::thread::sleep(std::time::Duration::from_micros(100));
                }
            })
            .expect("spawning m2n's let-go thread");
        Releaser {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Releaser {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn usage(e: GateError) -> Error {
    Error::Usage(e.to_string())
}

/// A validated round: each receiver's source, and the lengths.
pub(super) type Sources = (Vec<(RegionId, usize)>, Vec<usize>);

/// Stream-ordered state of a communicator.
#[derive(Debug, Default)]
pub(super) struct Streams {
    flags: Option<Arc<FlagBlock>>,
    send: SendGate,
    /// Sends enqueued and not yet posted, oldest first.
    queued: VecDeque<Sources>,
    recv: RecvGate,
    /// The receive ring as stream work sees it.
    ring: Option<MappedRegion>,
    /// Rounds delivered to stream receives and not yet released.
    delivered: BTreeMap<u64, RecvRound>,
    /// Rounds handed out by stream receives whose release is not yet enqueued.
    unreleased: std::collections::BTreeSet<u64>,
    /// Rounds whose release flag passed before they were delivered (a
    /// release enqueued on another stream without ordering): released on
    /// delivery.
    early: Vec<u64>,
    /// Why stream operations stopped (the group failed); their waits were
    /// let go so that no stream waits for ever.
    broken: Option<String>,
    /// Graph-safe sends (this side in [`StreamMode::GraphSafe`]).
    gsend: Option<GraphSendGate>,
    /// Graph-safe sends by the id their stream signals in `ready`.
    templates: HashMap<u32, SendTemplate>,
    /// The next template id (never 0: `ready` at 0 means nothing).
    next_template: u32,
    /// The host's count of graph-safe sends enqueued: the round each
    /// would be were nothing replayed (only its slot matters).
    gsend_next: u64,
    /// Graph-safe receives and releases.
    grecv: Option<GraphRecvGate>,
    /// As `gsend_next`, for receives.
    grecv_next: u64,
    /// Stream receives handed out in graph-safe mode and not yet
    /// released: round -> slot.
    gunreleased: BTreeMap<u64, u32>,
    /// Keeps graph-safe waits let go once the group failed.
    releaser: Option<Releaser>,
}

impl Streams {
    fn active(&self) -> bool {
        self.flags.is_some()
    }

    /// Whether any stream operation is still outstanding (for graph-safe
    /// sides: a signalled send not yet out, a non-recorded send not yet
    /// posted, a round delivered to the stream not yet released; the host
    /// cannot know of launches still to come).
    pub(super) fn busy(&self) -> bool {
        self.send.busy()
            || self.recv.busy()
            || self
                .gsend
                .as_ref()
                .is_some_and(|g| g.in_flight().next().is_some())
            || self.templates.values().any(|t| !t.recorded)
            || self.grecv.as_ref().is_some_and(|g| g.delivered() > 0)
            || self.graph_signals_pending()
    }

    /// A graph-safe `ready` or `released` set and not yet seen.
    fn graph_signals_pending(&self) -> bool {
        let Some(flags) = &self.flags else {
            return false;
        };
        let l = flags.layout();
        (self.gsend.is_some() && (0..l.send_slots).any(|s| flags.load(Flag::SlotReady(s)) != 0))
            || (self.grecv.is_some()
                && (0..l.recv_slots).any(|s| flags.load(Flag::SlotReleased(s)) != 0))
    }

    /// Lets every stream wait go (the data of the rounds concerned are not
    /// valid; the host's calls report why), once the group has failed.
    /// Graph-safe waits are kept let go by a thread until the
    /// communicator is dropped (replays reset them).
    pub(super) fn let_go(&mut self, why: &Error) {
        let Some(flags) = &self.flags else { return };
        if self.broken.is_none() {
            self.broken = Some(why.to_string());
        }
        flags.store(Flag::Sent, self.send.last_issued());
        flags.store(Flag::Arrived, self.recv.last_issued());
        if (self.gsend.is_some() || self.grecv.is_some()) && self.releaser.is_none() {
            self.releaser = Some(Releaser::start(flags.clone()));
        }
    }

    /// On drop of the communicator: let waits go; flags that CUDA streams
    /// may still read are left allocated (a stream may run behind the
    /// host, and a recording holds their addresses).
    pub(super) fn close(&mut self) {
        let graph = self.gsend.is_some() || self.grecv.is_some();
        if self.busy() || graph {
            self.let_go(&Error::Usage("the communicator was destroyed".into()));
            // A last let-go once the thread is gone.
            self.releaser = None;
            if let Some(flags) = &self.flags {
                let l = flags.layout();
                for s in 0..l.send_slots {
                    flags.store(Flag::SlotSent(s), 1);
                }
                for s in 0..l.recv_slots {
                    flags.store(Flag::SlotArrived(s), 1);
                }
                if flags.kind() == StreamKind::Cuda {
                    std::mem::forget(flags.clone());
                    std::mem::forget(self.ring.take());
                }
            }
        }
    }
}

impl Communicator {
    /// The flags, allocated by the first stream used.
    fn stream_flags(&mut self, stream: &dyn Stream) -> Result<Arc<FlagBlock>> {
        if let Some(why) = &self.streams.broken {
            return Err(Error::Usage(format!(
                "stream operations stopped when the group failed: {why}"
            )));
        }
        if let Some(f) = &self.streams.flags {
            if f.kind() != stream.kind() {
                return Err(crate::stream::StreamError::Mixed {
                    have: f.kind().name(),
                    got: stream.kind().name(),
                }
                .into());
            }
            return Ok(f.clone());
        }
        let layout = FlagLayout {
            send_slots: self.send.proto.geometry().depth as u32,
            recv_slots: self.recv.proto.geometry().depth as u32,
        };
        let f = Arc::new(stream.alloc_flags(layout)?);
        self.streams.flags = Some(f.clone());
        Ok(f)
    }

    /// Refuses a sequence-mode operation on a recording stream: its
    /// sequence numbers would be baked into the recording.
    fn check_not_capturing(&self, stream: &dyn Stream, what: &str) -> Result<()> {
        if stream.is_capturing()? {
            return Err(Error::Usage(format!(
                "{what} on a stream that is recording, in sequence mode: a replay would wait for the same sequence number again; set_stream_mode(StreamMode::GraphSafe, ..) on this channel first"
            )));
        }
        Ok(())
    }

    /// Graph-safe sends: posts each round the stream signalled (in order,
    /// as credit allows) with the messages of the send it signalled.
    fn drive_graph_sends(&mut self, flags: &FlagBlock) -> Result<bool> {
        let mut moved = false;
        while let Some(g) = &self.streams.gsend {
            let next = self.send.proto.next_round();
            let Some(id) = g.ready(next, |f| flags.load(f)).map_err(usage)? else {
                break;
            };
            let slot = g.slot_of(next);
            let Some(t) = self.streams.templates.get(&id) else {
                return Err(Error::Usage(format!(
                    "graph-safe stream send: the stream signalled send {id} for round {next}, which this communicator never enqueued (a recording of another communicator, or one made before set_stream_mode)"
                )));
            };
            let posted = self.send.proto.post_round(&t.lens).map_err(|source| {
                let peer = self.me();
                Error::Protocol { peer, source }
            })?;
            let Some(round) = posted else { break };
            let t = if t.recorded {
                t.clone()
            } else {
                self.streams.templates.remove(&id).expect("checked")
            };
            flags.store(Flag::SlotReady(slot), 0);
            self.send.sources.push_back(t.sources);
            self.streams
                .gsend
                .as_mut()
                .expect("checked")
                .on_posted(round);
            moved = true;
        }
        Ok(moved)
    }

    /// Graph-safe receives: hands every round that is in to the stream,
    /// releases what the stream released (in order).
    fn drive_graph_recvs(&mut self, flags: &FlagBlock) -> Result<bool> {
        let mut moved = false;
        if let Some(g) = &mut self.streams.gsend {
            let proto = &self.send.proto;
            for slot in g.poll_sent(|r| proto.round_sent(r)) {
                flags.store(Flag::SlotSent(slot), 1);
                moved = true;
            }
        }
        if self.streams.grecv.is_none() {
            return Ok(moved);
        }
        loop {
            let next = self.recv.proto.next_round();
            let g = self.streams.grecv.as_mut().expect("checked");
            if let Some(round) = g.next_released(next, |f| flags.load(f)).map_err(usage)? {
                flags.store(Flag::SlotReleased(g.slot_of(round)), 0);
                self.release_stream_round(round)?;
                moved = true;
                continue;
            }
            let arrived = flags.load(Flag::SlotArrived(g.slot_of(next)));
            if arrived != 0 {
                // The stream has not consumed this slot's previous round:
                // it cannot be replaced yet (credit makes this rare).
                break;
            }
            let Some(d) = self.recv.proto.poll_round() else {
                break;
            };
            if let Some(fence) = self.streams.ring.as_ref().and_then(|m| m.fence.as_ref()) {
                fence()?;
            }
            let g = self.streams.grecv.as_mut().expect("checked");
            let slot = g.on_delivered(d.round, arrived).map_err(usage)?;
            self.streams.delivered.insert(
                d.round,
                RecvRound {
                    round: d.round,
                    slot: d.slot,
                    lens: d.lens,
                },
            );
            flags.store(Flag::SlotArrived(slot), 1);
            moved = true;
        }
        Ok(moved)
    }

    /// Posts stream sends whose data the stream has produced (in order, as
    /// credit allows). Before the writes are posted.
    pub(super) fn drive_stream_sends(&mut self) -> Result<bool> {
        let Some(flags) = self.streams.flags.clone() else {
            return Ok(false);
        };
        if self.streams.gsend.is_some() {
            return self.drive_graph_sends(&flags);
        }
        let mut moved = false;
        while let Some(seq) = self.streams.send.next_ready(flags.load(Flag::Ready)) {
            let lens = &self
                .streams
                .queued
                .front()
                .expect("a queued send per seq")
                .1;
            let posted = self.send.proto.post_round(lens).map_err(|source| {
                let peer = self.me();
                Error::Protocol { peer, source }
            })?;
            let Some(round) = posted else { break };
            let (sources, _) = self.streams.queued.pop_front().expect("checked");
            self.send.sources.push_back(sources);
            self.streams
                .send
                .on_posted(seq, round)
                .map_err(|e| Error::Usage(e.to_string()))?;
            moved = true;
        }
        Ok(moved)
    }

    /// After completions and arrivals: tells streams what is sent and what
    /// arrived, and releases what they are done with.
    pub(super) fn drive_stream_completions(&mut self) -> Result<bool> {
        let Some(flags) = self.streams.flags.clone() else {
            return Ok(false);
        };
        let mut moved = self.drive_graph_recvs(&flags)?;
        let proto = &self.send.proto;
        if let Some(v) = self.streams.send.poll_sent(|r| proto.round_sent(r)) {
            flags.store(Flag::Sent, v);
            moved = true;
        }
        while self.streams.recv.wants_round() {
            let Some(d) = self.recv.proto.poll_round() else {
                break;
            };
            if let Some(fence) = self.streams.ring.as_ref().and_then(|m| m.fence.as_ref()) {
                fence()?;
            }
            let round = d.round;
            self.streams.delivered.insert(
                round,
                RecvRound {
                    round,
                    slot: d.slot,
                    lens: d.lens,
                },
            );
            let v = self.streams.recv.on_delivered().expect("wants_round");
            flags.store(Flag::Arrived, v);
            if let Some(i) = self.streams.early.iter().position(|&e| e == round) {
                self.streams.early.swap_remove(i);
                self.release_stream_round(round)?;
            }
            moved = true;
        }
        for round in self.streams.recv.releasable(flags.load(Flag::Released)) {
            if self.streams.delivered.contains_key(&round) {
                self.release_stream_round(round)?;
            } else {
                self.streams.early.push(round);
            }
            moved = true;
        }
        Ok(moved)
    }

    fn release_stream_round(&mut self, round: u64) -> Result<()> {
        self.streams.delivered.remove(&round);
        let peer = self.me();
        self.recv
            .proto
            .release(round)
            .map_err(|source| Error::Protocol { peer, source })
    }

    /// The lengths of a stream round's messages, once it is in (the host
    /// has seen it arrive; the stream learns it from its wait); `None`
    /// before, and after its release.
    pub fn stream_round_lens(&self, round: &StreamRound) -> Option<&[u32]> {
        self.streams
            .delivered
            .get(&round.round)
            .map(|r| &r.lens[..])
    }

    /// Whether every stream-ordered operation enqueued so far is done on
    /// the host's side (sends out, receives delivered, releases done).
    pub fn streams_idle(&self) -> bool {
        !self.streams.busy()
    }

    /// Moves this communicator to a [`super::Proxy`] thread that
    /// calls [`progress`](Self::progress) while nobody else does (reach
    /// the communicator with `proxy.lock()`). The thread stops at the first
    /// error (every stream wait is then let go) or at `proxy.stop()`.
    pub fn start_proxy(self) -> super::Proxy<Communicator> {
        super::Proxy::spawn(
            Arc::new(std::sync::Mutex::new(self)),
            Communicator::progress,
        )
    }

    /// Refuses the non-stream API on a side whose stream operations are
    /// pending (their rounds are numbered in order with the host's).
    pub(super) fn check_no_stream_sends(&self) -> Result<()> {
        if self.streams.gsend.is_some() {
            return Err(Error::Usage(
                "this rank's sends are in graph-safe stream mode (each round is one a stream signalled); set_stream_mode(StreamMode::Sequence, ..) first".into(),
            ));
        }
        if self.streams.queued.is_empty() {
            Ok(())
        } else {
            Err(Error::Usage(format!(
                "{} stream-ordered send(s) wait for their stream; a direct send now would take their round",
                self.streams.queued.len()
            )))
        }
    }

    pub(super) fn check_no_stream_recvs(&self) -> Result<()> {
        if self.streams.grecv.is_some() {
            return Err(Error::Usage(
                "this rank's receives are in graph-safe stream mode (every round goes to the stream); set_stream_mode(StreamMode::Sequence, ..) first".into(),
            ));
        }
        if self.streams.recv.wants_round() {
            Err(Error::Usage(format!(
                "the next round is promised to a stream-ordered receive ({} waiting)",
                self.streams.recv.awaiting()
            )))
        } else {
            Ok(())
        }
    }

    /// Other-side peers that outstanding stream operations wait for: the
    /// senders of the round a stream receive waits for, the receivers
    /// whose credit a queued stream send waits for, and every receiver of
    /// a stream send still in flight.
    pub(super) fn stream_dependencies(&self) -> Vec<usize> {
        let mut peers = Vec::new();
        // Graph-safe sides: the host does not see launches, so only what
        // it sees pending counts (a signalled send waiting for credit, a
        // round in flight); a graph-safe receive waiting for a peer that
        // closed cleanly is not detected (close after synchronising).
        if self.streams.recv.wants_round() {
            peers.extend(self.recv.proto.missing_senders());
        }
        let signalled = self.streams.gsend.is_some() && self.streams.graph_signals_pending();
        if !self.streams.queued.is_empty() || signalled {
            peers.extend(self.send.proto.blocking_receivers());
        }
        let graph_in_flight = self
            .streams
            .gsend
            .as_ref()
            .is_some_and(|g| g.in_flight().next().is_some());
        if self.streams.send.in_flight().next().is_some() || graph_in_flight {
            peers.extend(0..self.send.rings.len());
        }
        peers
    }

    pub(super) fn streams_active(&self) -> bool {
        self.streams.active()
    }
}

impl Channel<'_> {
    /// How this side's stream-ordered operations use their flags
    /// ([`StreamMode::Sequence`] by default).
    pub fn stream_mode(&self) -> StreamMode {
        let graph = if self.comm.send.id == self.id {
            self.comm.streams.gsend.is_some()
        } else {
            self.comm.streams.grecv.is_some()
        };
        if graph {
            StreamMode::GraphSafe
        } else {
            StreamMode::Sequence
        }
    }

    /// Sets how this side's stream-ordered operations use their flags.
    ///
    /// [`StreamMode::GraphSafe`] makes them replayable from a recording
    /// (a CUDA graph captured from `cuStreamBeginCapture` to
    /// `cuStreamEndCapture`, launched with `cuGraphLaunch`; or
    /// [`crate::stream::HostStream::begin_capture`]): every value they
    /// write or wait on is a constant, on handshake flags per ring slot
    /// ([`crate::proto::gate`] has the protocol). A recorded operation
    /// runs at every launch: each launched send is the next round, with
    /// the messages given when it was recorded (same regions, offsets and
    /// lengths: a launch sends what those bytes hold then); each launched
    /// receive is the next round, read at the slot address it was recorded
    /// with. So a recording must cover a whole cycle of the ring: a
    /// multiple of `depth` receives (one recording of `depth` steps, or
    /// `depth` recordings launched in rotation; depth 1 lets one step be
    /// recorded and launched alone), and its sends likewise (out-of-turn
    /// slots are refused with an error). In this mode every round of this
    /// side belongs to streams (the direct API is refused), the host hands
    /// each round to the stream as soon as it is in, and the operations of
    /// this side must run on one stream (or streams the caller orders).
    ///
    /// `stream` allocates the flags (and maps the receive ring), so that
    /// nothing is allocated while a stream records. Refused while stream
    /// operations of the other mode are outstanding on this side.
    pub fn set_stream_mode(&mut self, mode: StreamMode, stream: &dyn Stream) -> Result<()> {
        self.comm.check_fatal()?;
        if stream.is_capturing()? {
            return Err(Error::Usage(
                "set_stream_mode on a stream that is recording: set the mode (it allocates) before the capture".into(),
            ));
        }
        let sending = self.comm.send.id == self.id;
        let current = self.stream_mode();
        let st = &self.comm.streams;
        let outstanding = if sending {
            st.send.busy()
                || st
                    .gsend
                    .as_ref()
                    .is_some_and(|g| g.in_flight().next().is_some())
                || st.templates.values().any(|t| !t.recorded)
        } else {
            st.recv.busy()
                || !st.unreleased.is_empty()
                || !st.gunreleased.is_empty()
                || st.grecv.as_ref().is_some_and(|g| g.delivered() > 0)
        };
        if mode != current && (outstanding || st.graph_signals_pending()) {
            return Err(Error::Usage(format!(
                "set_stream_mode({}): {} stream operations of this side are outstanding; synchronise the stream (and let progress see them done) first",
                mode.name(),
                current.name()
            )));
        }
        let flags = self.comm.stream_flags(stream)?;
        if !sending && self.comm.streams.ring.is_none() {
            let rdma = self.comm.transport.kind() == crate::transport::TransportKind::Verbs;
            self.comm.streams.ring = Some(stream.map_region(&self.comm.recv.ring, rdma)?);
        }
        if mode == current {
            return Ok(());
        }
        let l = flags.layout();
        let st = &mut self.comm.streams;
        match (sending, mode) {
            (true, StreamMode::GraphSafe) => {
                for s in 0..l.send_slots {
                    flags.store(Flag::SlotReady(s), 0);
                    flags.store(Flag::SlotSent(s), 0);
                }
                st.gsend = Some(GraphSendGate::new(l.send_slots as usize));
                st.gsend_next = self.comm.send.proto.next_round();
            }
            (false, StreamMode::GraphSafe) => {
                for s in 0..l.recv_slots {
                    flags.store(Flag::SlotArrived(s), 0);
                    flags.store(Flag::SlotReleased(s), 0);
                }
                st.grecv = Some(GraphRecvGate::new(l.recv_slots as usize));
                st.grecv_next = self.comm.recv.proto.next_round();
            }
            (true, StreamMode::Sequence) => {
                st.gsend = None;
                st.templates.clear();
            }
            (false, StreamMode::Sequence) => st.grecv = None,
        }
        Ok(())
    }

    /// A graph-safe send (see [`set_stream_mode`](Self::set_stream_mode)).
    fn send_on_stream_graph(
        &mut self,
        sources: Vec<(RegionId, usize)>,
        lens: Vec<usize>,
        stream: &dyn Stream,
        flags: &Arc<FlagBlock>,
    ) -> Result<u64> {
        let recorded = stream.is_capturing()?;
        let st = &mut self.comm.streams;
        let mut id = st.next_template.max(1);
        while st.templates.contains_key(&id) {
            id = id.wrapping_add(1).max(1);
        }
        st.next_template = id.wrapping_add(1);
        let round = st.gsend_next;
        let (_, ops) = st.gsend.as_ref().expect("graph-safe").enqueue(round, id);
        st.templates.insert(
            id,
            SendTemplate {
                sources,
                lens,
                recorded,
            },
        );
        for op in ops {
            let r = match op {
                crate::proto::gate::StreamOp::Write(f, v) => stream.write_value(flags, f, v),
                crate::proto::gate::StreamOp::Wait(f, v) => stream.wait_value(flags, f, v),
            };
            if let Err(e) = r {
                let err = Error::from(e);
                self.comm.streams.let_go(&err);
                return Err(err);
            }
        }
        self.comm.streams.gsend_next += 1;
        self.comm.progress_inner()?;
        Ok(round)
    }

    /// Enqueues this rank's next round on `stream`: its writes are posted
    /// once the work enqueued on `stream` before this call is done, and
    /// work enqueued after it waits until the data have left their buffers
    /// (so the producer may overwrite them). Returns the round's number.
    /// The host's half runs in [`Communicator::progress`] (or any blocking
    /// call, or a [proxy](Communicator::start_proxy)).
    ///
    /// The regions must stay registered until the round is sent (in
    /// graph-safe mode, recorded: while the recording may be launched).
    ///
    /// In [`StreamMode::GraphSafe`] the returned number is the round this
    /// send is at its first run (each launch of a recording is a later
    /// round).
    pub fn send_on_stream(&mut self, msgs: &[Msg<'_>], stream: &dyn Stream) -> Result<u64> {
        self.sending()?;
        self.comm.check_fatal()?;
        let graph = self.comm.streams.gsend.is_some();
        if !graph {
            self.comm.check_not_capturing(stream, "send_on_stream")?;
        }
        let prepared = self.validate(msgs)?;
        let flags = self.comm.stream_flags(stream)?;
        // Device memory through a host stage: the stream copies it in
        // before it signals the send (and, waiting for `sent` before any
        // later copy, never overwrites a stage still being sent).
        for c in &prepared.copies {
            if let Err(e) = c.enqueue(stream) {
                if !matches!(e, Error::Stream(crate::stream::StreamError::Mixed { .. })) {
                    self.comm.streams.let_go(&e);
                }
                return Err(e);
            }
        }
        if graph {
            return self.send_on_stream_graph(prepared.sources, prepared.lens, stream, &flags);
        }
        let sources = (prepared.sources, prepared.lens);
        let round = self.comm.send.proto.next_round() + self.comm.streams.queued.len() as u64;
        let (_, ops) = self
            .comm
            .streams
            .send
            .enqueue()
            .map_err(|e| Error::Usage(e.to_string()))?;
        debug_assert_eq!(
            self.comm.streams.send.waiting(),
            self.comm.streams.queued.len() + 1
        );
        for op in ops {
            let r = match op {
                crate::proto::gate::StreamOp::Write(f, v) => stream.write_value(&flags, f, v),
                crate::proto::gate::StreamOp::Wait(f, v) => stream.wait_value(&flags, f, v),
            };
            if let Err(e) = r {
                // The stream holds half a send: nothing can be trusted now.
                let err = Error::from(e);
                self.comm.streams.let_go(&err);
                return Err(err);
            }
        }
        self.comm.streams.queued.push_back(sources);
        self.comm.progress_inner()?;
        Ok(round)
    }

    /// Enqueues a receive of the next round on `stream`: work enqueued
    /// after it waits until every sender's message is in and visible to
    /// it. The round's messages are at [`StreamRound::message_addr`]; hand
    /// it back with [`release_on_stream`](Self::release_on_stream).
    ///
    /// The addresses point into the communicator's ring: synchronise the
    /// stream before dropping the communicator (after a failure its waits
    /// are let go, so it drains).
    ///
    /// In [`StreamMode::GraphSafe`] the round is the one this receive is at
    /// its first run; its addresses are its ring slot's, which every
    /// launch of a recording reads (the recording covers whole cycles of
    /// the ring, see [`set_stream_mode`](Self::set_stream_mode)). At most
    /// `depth` receives may be enqueued before their releases.
    pub fn recv_on_stream(&mut self, stream: &dyn Stream) -> Result<StreamRound> {
        self.receiving()?;
        self.comm.check_fatal()?;
        let graph = self.comm.streams.grecv.is_some();
        if !graph {
            self.comm.check_not_capturing(stream, "recv_on_stream")?;
        }
        let flags = self.comm.stream_flags(stream)?;
        if self.comm.streams.ring.is_none() {
            let rdma = self.comm.transport.kind() == crate::transport::TransportKind::Verbs;
            self.comm.streams.ring = Some(stream.map_region(&self.comm.recv.ring, rdma)?);
        }
        let geo = *self.comm.recv.proto.geometry();
        if graph {
            let round = self.comm.streams.grecv_next;
            let g = self.comm.streams.grecv.as_mut().expect("graph-safe");
            let (slot, ops) = g.enqueue_recv(round).map_err(usage)?;
            for op in ops {
                let r = match op {
                    crate::proto::gate::StreamOp::Write(f, v) => stream.write_value(&flags, f, v),
                    crate::proto::gate::StreamOp::Wait(f, v) => stream.wait_value(&flags, f, v),
                };
                if let Err(e) = r {
                    let err = Error::from(e);
                    self.comm.streams.let_go(&err);
                    return Err(err);
                }
            }
            let base = self.comm.streams.ring.as_ref().expect("mapped").addr;
            let addrs = (0..geo.senders)
                .map(|s| base + geo.slot_offset(s, slot as usize) as u64)
                .collect();
            self.comm.streams.grecv_next += 1;
            self.comm.streams.gunreleased.insert(round, slot);
            self.comm.progress_inner()?;
            return Ok(StreamRound {
                round,
                addrs,
                slot_bytes: geo.slot_bytes,
            });
        }
        let round = self.comm.recv.proto.next_round() + self.comm.streams.recv.awaiting() as u64;
        let (_, op) = self
            .comm
            .streams
            .recv
            .enqueue_recv()
            .map_err(|e| Error::Usage(e.to_string()))?;
        let crate::proto::gate::StreamOp::Wait(f, v) = op else {
            unreachable!("a receive waits")
        };
        if let Err(e) = stream.wait_value(&flags, f, v) {
            let err = Error::from(e);
            self.comm.streams.let_go(&err);
            return Err(err);
        }
        let base = self.comm.streams.ring.as_ref().expect("mapped").addr;
        let slot = geo.slot_of(round);
        let addrs = (0..geo.senders)
            .map(|s| base + geo.slot_offset(s, slot) as u64)
            .collect();
        self.comm.streams.unreleased.insert(round);
        self.comm.progress_inner()?;
        Ok(StreamRound {
            round,
            addrs,
            slot_bytes: geo.slot_bytes,
        })
    }

    /// Enqueues the release of a stream round on `stream`: once the work
    /// enqueued before it is done, the round's slots return to the senders
    /// as credit.
    pub fn release_on_stream(&mut self, round: StreamRound, stream: &dyn Stream) -> Result<()> {
        self.receiving()?;
        self.comm.check_fatal()?;
        if self.comm.streams.grecv.is_some() {
            let Some(&slot) = self.comm.streams.gunreleased.get(&round.round) else {
                return Err(Error::Usage(format!(
                    "round {} is not a graph-safe stream round awaiting release (released already, received in sequence mode, or from another communicator)",
                    round.round
                )));
            };
            let flags = self.comm.stream_flags(stream)?;
            let g = self.comm.streams.grecv.as_mut().expect("graph-safe");
            let crate::proto::gate::StreamOp::Write(f, v) = g.enqueue_release(slot) else {
                unreachable!("a release writes")
            };
            if let Err(e) = stream.write_value(&flags, f, v) {
                let err = Error::from(e);
                self.comm.streams.let_go(&err);
                return Err(err);
            }
            self.comm.streams.gunreleased.remove(&round.round);
            self.comm.progress_inner()?;
            return Ok(());
        }
        self.comm.check_not_capturing(stream, "release_on_stream")?;
        if !self.comm.streams.unreleased.contains(&round.round) {
            return Err(Error::Usage(format!(
                "round {} is not a stream round awaiting release (released already, or from another communicator)",
                round.round
            )));
        }
        let flags = self.comm.stream_flags(stream)?;
        let (_, op) = self
            .comm
            .streams
            .recv
            .enqueue_release(round.round)
            .map_err(|e| Error::Usage(e.to_string()))?;
        let crate::proto::gate::StreamOp::Write(f, v) = op else {
            unreachable!("a release writes")
        };
        if let Err(e) = stream.write_value(&flags, f, v) {
            let err = Error::from(e);
            self.comm.streams.let_go(&err);
            return Err(err);
        }
        self.comm.streams.unreleased.remove(&round.round);
        self.comm.progress_inner()?;
        Ok(())
    }
}
