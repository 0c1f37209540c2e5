//! The host's half of stream-ordered operations: what the progress engine
//! does with the flags of [`crate::proto::gate`] (see [`crate::stream`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use super::{Channel, Communicator, Error, Msg, RecvRound, Result};
use crate::proto::gate::{Flag, RecvGate, SendGate};
use crate::stream::{FlagBlock, MappedRegion, Stream, StreamKind, StreamRound};
use crate::transport::RegionId;

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
}

impl Streams {
    fn active(&self) -> bool {
        self.flags.is_some()
    }

    /// Whether any stream operation is still outstanding.
    pub(super) fn busy(&self) -> bool {
        self.send.busy() || self.recv.busy()
    }

    /// Lets every stream wait go (the data of the rounds concerned are not
    /// valid; the host's calls report why), once the group has failed.
    pub(super) fn let_go(&mut self, why: &Error) {
        let Some(flags) = &self.flags else { return };
        if self.broken.is_none() {
            self.broken = Some(why.to_string());
        }
        flags.store(Flag::Sent, self.send.last_issued());
        flags.store(Flag::Arrived, self.recv.last_issued());
    }

    /// On drop of the communicator: let waits go; flags that CUDA streams
    /// may still read are left allocated (a stream may run behind the host).
    pub(super) fn close(&mut self) {
        if self.busy() {
            self.let_go(&Error::Usage("the communicator was destroyed".into()));
            if let Some(flags) = &self.flags {
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
        let f = Arc::new(stream.alloc_flags()?);
        self.streams.flags = Some(f.clone());
        Ok(f)
    }

    /// Posts stream sends whose data the stream has produced (in order, as
    /// credit allows). Before the writes are posted.
    pub(super) fn drive_stream_sends(&mut self) -> Result<bool> {
        let Some(flags) = self.streams.flags.clone() else {
            return Ok(false);
        };
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
        let mut moved = false;
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
        if self.streams.recv.wants_round() {
            peers.extend(self.recv.proto.missing_senders());
        }
        if !self.streams.queued.is_empty() {
            peers.extend(self.send.proto.blocking_receivers());
        }
        if self.streams.send.in_flight().next().is_some() {
            peers.extend(0..self.send.rings.len());
        }
        peers
    }

    pub(super) fn streams_active(&self) -> bool {
        self.streams.active()
    }
}

impl Channel<'_> {
    /// Enqueues this rank's next round on `stream`: its writes are posted
    /// once the work enqueued on `stream` before this call is done, and
    /// work enqueued after it waits until the data have left their buffers
    /// (so the producer may overwrite them). Returns the round's number.
    /// The host's half runs in [`Communicator::progress`] (or any blocking
    /// call, or a [proxy](Communicator::start_proxy)).
    ///
    /// The regions must stay registered until the round is sent.
    pub fn send_on_stream(&mut self, msgs: &[Msg<'_>], stream: &dyn Stream) -> Result<u64> {
        self.sending()?;
        self.comm.check_fatal()?;
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
    pub fn recv_on_stream(&mut self, stream: &dyn Stream) -> Result<StreamRound> {
        self.receiving()?;
        self.comm.check_fatal()?;
        let flags = self.comm.stream_flags(stream)?;
        if self.comm.streams.ring.is_none() {
            let rdma = self.comm.transport.kind() == crate::transport::TransportKind::Verbs;
            self.comm.streams.ring = Some(stream.map_region(&self.comm.recv.ring, rdma)?);
        }
        let geo = *self.comm.recv.proto.geometry();
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
