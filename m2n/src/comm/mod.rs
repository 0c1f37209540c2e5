//! The public API: a [`Communicator`] per process and its two [`Channel`]s.
//!
//! ```no_run
//! use std::time::Duration;
//! use m2n::{Communicator, Config, Msg, Role, Shape, UniqueId};
//!
//! # fn main() -> m2n::Result<()> {
//! let uid: UniqueId = std::env::var("M2N_UNIQUE_ID").unwrap().parse().unwrap();
//! let shape = Shape::new(2, 2);
//! let mut comm = Communicator::init(Config::from_env()?, Role::Attention, 0, shape, &uid)?;
//! let mut buf = comm.alloc(2 * 4096)?;
//! buf.as_mut_slice().fill(7);
//! // Round 0 of dispatch: 4 KiB to each expert, from one registered buffer.
//! let round = comm.dispatch().send(&[Msg::new(&buf, 0, 4096), Msg::new(&buf, 4096, 4096)],
//!                                  Duration::from_secs(5))?;
//! comm.dispatch().wait_sent(round, Duration::from_secs(5))?;
//! // The experts' answers, zero-copy, then released (which returns credit).
//! let got = comm.combine().recv(Duration::from_secs(5))?;
//! for expert in 0..shape.experts {
//!     let bytes: &[u8] = comm.message(&got, expert);
//!     # let _ = bytes;
//! }
//! comm.combine().release(got)?;
//! # Ok(()) }
//! ```

mod channel;
mod error;
mod init;
mod liveness;
mod proxy;
mod setup;
mod staging;
mod streams;

use std::collections::VecDeque;
use std::time::Instant;

use crate::clock::Clock;

pub use channel::Channel;
pub use error::{Error, Result};
use liveness::{Liveness, Lost};
pub use proxy::Proxy;

use crate::config::Config;
use crate::group::{Peer, Role, Shape};
use crate::proto::{ChannelId, Lane, RecvChannel, SendChannel, WriteOp};
use crate::transport::{
    Completion, Region, RegionId, RemoteRegion, Rider, Transport, TransportError, TransportKind,
    WriteRequest,
};

/// One message of a round: `len` bytes at `offset` of a registered region.
#[derive(Debug, Clone, Copy)]
pub struct Msg<'a> {
    region: Option<&'a Region>,
    offset: usize,
    len: usize,
}

impl<'a> Msg<'a> {
    pub fn new(region: &'a Region, offset: usize, len: usize) -> Self {
        Self {
            region: Some(region),
            offset,
            len,
        }
    }
    /// An empty message: the receiver still counts it toward the round.
    pub const EMPTY: Msg<'static> = Msg {
        region: None,
        offset: 0,
        len: 0,
    };
}

/// Bytes of a sender's credit region per receiver rank: two credit words,
/// one per lane the receiver writes them on (each only grows: writes on one
/// lane land in order), and the sender's credit from that receiver is the
/// larger. One word for both would go back when a credit on one lane
/// lands after a newer one on the other.
pub(crate) const CREDIT_BYTES: usize = 16;

/// The offset, in a sender's credit region, of receiver `rank`'s credit
/// word on `lane`.
fn credit_word(rank: usize, lane: Lane) -> usize {
    rank * CREDIT_BYTES
        + match lane {
            Lane::Ack => 0,
            Lane::Data => 8,
        }
}

/// A received round: every sender's message is in the ring. Read the
/// messages with [`Communicator::message`], then hand it back with
/// [`Channel::release`] so the senders may reuse the slots.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a received round holds its slots until released"]
pub struct RecvRound {
    round: u64,
    slot: usize,
    lens: Vec<u32>,
}

impl RecvRound {
    pub fn round(&self) -> u64 {
        self.round
    }
    /// Length of each sender's message.
    pub fn lens(&self) -> &[u32] {
        &self.lens
    }
}

#[derive(Debug)]
struct SendSide {
    id: ChannelId,
    proto: SendChannel,
    /// Receivers' rings, by receiver index.
    rings: Vec<RemoteRegion>,
    /// Receivers write their credits here, 8 bytes each.
    credits: Region,
    /// Sources of rounds `sources_base..`, one (region, offset) per receiver.
    sources: VecDeque<Vec<(RegionId, usize)>>,
    sources_base: u64,
    /// Source vectors of rounds that were sent, for reuse.
    spare_sources: Vec<Vec<(RegionId, usize)>>,
    /// The lengths of the round being posted (reused).
    lens_scratch: Vec<usize>,
    stalled: Option<WriteOp>,
}

#[derive(Debug)]
struct RecvSide {
    id: ChannelId,
    proto: RecvChannel,
    ring: Region,
    /// Our released-round counter, the source of credit writes.
    credit_src: Region,
    /// Senders' credit regions, by sender index.
    credit_dst: Vec<RemoteRegion>,
    /// Senders still owed the latest credit (their queue was full).
    credit_owed: Vec<usize>,
    /// Credit writes posted so far (one per sender per credit published).
    credit_writes: u64,
}

/// Why a communicator stopped working, kept to answer later calls.
#[derive(Debug, Clone)]
enum Fatal {
    Protocol(Peer, crate::proto::ProtoError),
    Transport(Option<Peer>, String),
    Aborted,
}

/// One process's membership in an M2N group. See the module docs.
#[derive(Debug)]
pub struct Communicator {
    role: Role,
    rank: usize,
    shape: Shape,
    config: Config,
    transport: Box<dyn Transport>,
    send: SendSide,
    recv: RecvSide,
    liveness: Liveness,
    completions: Vec<Completion>,
    fatal: Option<Fatal>,
    /// The transport's description, and how its device was chosen.
    detail: String,
    /// The time on the polling paths, without a system call where the CPU
    /// has a counter (see [`crate::clock`]).
    clock: Clock,
    /// Stream-ordered operations (see [`crate::stream`]).
    streams: streams::Streams,
    /// Host stages of device memory (shm and tcp).
    stages: staging::Stages,
}

impl Communicator {
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn shape(&self) -> Shape {
        self.shape
    }
    pub fn config(&self) -> &Config {
        &self.config
    }
    pub fn transport_kind(&self) -> TransportKind {
        self.transport.kind()
    }

    /// Work the transport has done (work requests, doorbells, signalled
    /// completions, polls; zeros where the transport has no such queues).
    pub fn transport_counters(&self) -> crate::transport::TransportCounters {
        self.transport.counters()
    }

    /// Reads of the operating system's clock so far (system calls where it
    /// has no user-space path, as in VMs): a few per second in the steady
    /// state, however many calls are made (see [`crate::clock`]).
    pub fn clock_reads(&self) -> u64 {
        self.clock.os_reads()
    }

    /// Credit writes this rank has posted as a receiver (one per sender
    /// each time it publishes a credit; see [`Config::credit_batch`]).
    pub fn credit_writes(&self) -> u64 {
        self.recv.credit_writes
    }

    /// What the transport runs on: for verbs the device, port, GID index
    /// and MTU (and, from an `M2N_IB_DEVICE` list, which entry this rank's
    /// local rank picked).
    pub fn transport_detail(&self) -> &str {
        &self.detail
    }

    /// Allocates `len` bytes of registered memory for outgoing messages.
    pub fn alloc(&mut self, len: usize) -> Result<Region> {
        self.transport
            .alloc(len)
            .map_err(|source| Error::Transport { peer: None, source })
    }

    /// Registers application memory (a tensor, a buffer) as a source of
    /// messages, without copying it. Dropping the region deregisters it.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid until the region is dropped and every
    /// round sent from it is sent ([`Channel::is_sent`]).
    pub unsafe fn register(&mut self, ptr: *mut u8, len: usize) -> Result<Region> {
        // SAFETY: forwarded contract.
        unsafe { self.transport.register(ptr, len) }
            .map_err(|source| Error::Transport { peer: None, source })
    }

    /// Registers GPU memory (a CUDA device pointer from the same process)
    /// as a source of messages. Over verbs it is zero-copy (GPUDirect RDMA,
    /// through dma-buf or, failing that, the peer-memory path). The shm
    /// and tcp transports cannot read device memory: there the region gets
    /// a pinned host stage, and each send first copies its messages from
    /// the device into it (blocking for [`Channel::send`], on the stream
    /// for [`Channel::send_on_stream`]): these transports copy. Without a
    /// GPU the error says what is missing.
    ///
    /// # Safety
    /// As [`register`](Self::register), for device memory.
    #[cfg(feature = "cuda")]
    pub unsafe fn register_gpu(&mut self, dptr: u64, len: usize) -> Result<Region> {
        // SAFETY: forwarded contract.
        match unsafe { self.transport.register_device(dptr, len) } {
            Ok(r) => Ok(r),
            Err(TransportError::Unavailable(..)) => {
                let gpu = |e: crate::gpu::GpuError| {
                    Error::Stream(crate::stream::StreamError::Unsupported(e.to_string()))
                };
                let ctx = crate::gpu::pointer_context(dptr).map_err(gpu)?;
                let copy: crate::transport::StagingCopy = Box::new(move |dst, src, n| {
                    crate::gpu::copy_to_host(ctx, dst, src, n).map_err(|e| e.to_string())
                });
                self.stage(dptr, len, crate::stream::StreamKind::Cuda, copy, |stage| {
                    let (ptr, len) = (stage.as_ptr(), stage.len());
                    // SAFETY: the stage lives as long as the region that owns this registration.
                    let reg = unsafe { crate::gpu::register_host(ctx, ptr, len) }.map_err(gpu)?;
                    Ok(Some(Box::new(reg) as Box<dyn Send + Sync>))
                })
            }
            Err(source) => Err(Error::Transport { peer: None, source }),
        }
    }

    /// The dispatch channel (attention sends, experts receive).
    pub fn dispatch(&mut self) -> Channel<'_> {
        Channel {
            comm: self,
            id: ChannelId::Dispatch,
        }
    }

    /// The combine channel (experts send, attention receives).
    pub fn combine(&mut self) -> Channel<'_> {
        Channel {
            comm: self,
            id: ChannelId::Combine,
        }
    }

    fn other_side(&self, index: usize) -> Peer {
        let role = match self.role {
            Role::Attention => Role::Expert,
            Role::Expert => Role::Attention,
        };
        Peer { role, rank: index }
    }

    /// Every pass starts here: the check inline, the error built aside.
    #[inline]
    fn check_fatal(&self) -> Result<()> {
        match &self.fatal {
            None => Ok(()),
            Some(fatal) => Err(Self::fatal_error(fatal)),
        }
    }

    #[cold]
    fn fatal_error(fatal: &Fatal) -> Error {
        match fatal {
            Fatal::Protocol(peer, e) => Error::Protocol {
                peer: *peer,
                source: e.clone(),
            },
            Fatal::Transport(peer, msg) => Error::Transport {
                peer: *peer,
                source: TransportError::Corrupt {
                    peer: peer.map_or(usize::MAX, |p| p.rank),
                    detail: msg.clone(),
                },
            },
            Fatal::Aborted => Error::Aborted,
        }
    }

    fn fail(&mut self, err: Error) -> Error {
        if let Error::Transport {
            source: TransportError::Stuck { peer, .. },
            ..
        } = &err
        {
            let writing_to = peer.map(|p| self.peer_of_global(p));
            if let Some(lost) = self.lost_behind_stuck(writing_to) {
                return lost;
            }
        }
        self.fatal = match &err {
            Error::Protocol { peer, source } => Some(Fatal::Protocol(*peer, source.clone())),
            Error::Transport { peer, source } => Some(Fatal::Transport(*peer, source.to_string())),
            _ => return err,
        };
        err
    }

    /// The loss behind a transport stuck inside its library (fabric over
    /// shm: a process died or stopped holding a lock of a shared region),
    /// as `PeerLost`. The transport refuses every later call, so every
    /// later call comes back here.
    ///
    /// Liveness is given a peer timeout to judge first, counted from its
    /// first read here: the heartbeats a stopped peer sent before it
    /// stopped were still unread while this rank spun inside the provider,
    /// and reading them now makes it look alive until a timeout after.
    ///
    /// - A peer liveness finds lost by then is the cause: it is named (a
    ///   killed one at once, a stopped one when the timeout runs out).
    /// - Otherwise, if a write to an other-side peer was broken off, that
    ///   peer cannot be reached any more: its region is locked by a
    ///   process this rank may have no link to, such as another sender. It
    ///   is named, with why.
    ///
    /// `None` if no peer is lost by then and no write was broken off (a
    /// receive was): the stuck transport is then this group's fatal error.
    fn lost_behind_stuck(&mut self, writing_to: Option<Peer>) -> Option<Error> {
        const STUCK: &str =
            "this rank's fabric provider was left stuck: broken off by the watchdog";
        // Read on the precise clock, as is each `now` below (which the
        // snapshot's coarse clock then returns): once `now` is past the
        // deadline, a peer silent since the first read has been silent for
        // more than the timeout.
        let deadline = self.clock.now() + self.config.peer_timeout + liveness::POLL_EVERY;
        loop {
            let now = self.clock.now();
            let lost = self.lost_snapshot(true);
            let first = lost
                .iter()
                .find(|(_, l)| !l.clean)
                .or(lost.first())
                .cloned();
            if let Some((i, l)) = first {
                return Some(Error::PeerLost {
                    peer: self.other_side(i),
                    reason: format!("{} (and {STUCK})", l.reason),
                });
            }
            if now >= deadline {
                return writing_to
                    .filter(|p| p.role != self.role)
                    .map(|peer| Error::PeerLost {
                        peer,
                        reason: format!(
                            "a write to it never returned: {STUCK} (it answers heartbeats, so \
                             another process died or stopped inside the provider holding the \
                             lock of {peer}'s shared region)"
                        ),
                    });
            }
            std::thread::sleep(liveness::POLL_EVERY);
        }
    }

    /// Moves everything that can move now: posts queued writes and credits,
    /// polls completions and arrivals, reads credits, checks peers.
    /// Never blocks. Returns whether anything happened, or `PeerLost` once
    /// a peer on the other side was killed, exited without closing its
    /// communicator, aborted or hung past the peer timeout (a peer that
    /// closed its communicator is reported by the calls that need it:
    /// receiving a round it did not send, sending to it).
    pub fn progress(&mut self) -> Result<bool> {
        let lost = self.lost_snapshot(false);
        let moved = self.progress_inner()?;
        let mut needed: Vec<usize> = lost
            .iter()
            .filter(|(_, l)| !l.clean)
            .map(|(i, _)| *i)
            .collect();
        if !lost.is_empty() {
            // Stream operations wait for peers too: a peer that left (even
            // cleanly) while a stream waits for its message or credit would
            // hold that stream for ever.
            needed.extend(self.stream_dependencies());
        }
        let checked = self.check_lost(&lost, &needed);
        self.let_streams_go_on_error(checked)?;
        Ok(moved)
    }

    /// One read of the transport and nothing else (a spinning receive's
    /// quick poll): what it finds is handled as in a full pass.
    pub(super) fn poll_transport_alone(&mut self) -> Result<bool> {
        let r = self.poll_transport();
        self.let_streams_go_on_error(r)
    }

    fn progress_inner(&mut self) -> Result<bool> {
        let r = self.progress_steps();
        self.let_streams_go_on_error(r)
    }

    /// Streams waiting on this group would wait for ever once a call fails:
    /// they are let go with the same error.
    fn let_streams_go_on_error<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.streams.let_go(e);
        }
        r
    }

    /// After a release that a sender may be waiting for (its window full):
    /// the credit goes out at once, and the transport is polled to send
    /// it. After any other release, a batch that is merely complete and
    /// the periodic refresh wait for the next pass (the next send, receive
    /// or progress call on this group), which posts them after that pass's
    /// data writes: a release on the way to the next send then neither
    /// costs a pass of its own nor puts its credit on the wire ahead of
    /// the data (in a round trip, the reply). A sender held by such a
    /// credit is not waiting for it yet, as with a batch not yet complete.
    pub(super) fn credit_after_release(&mut self) -> Result<()> {
        let r = self.check_fatal().and_then(|()| {
            let now = self.now();
            if self.post_credits(now, true)? {
                self.poll_transport()?;
            }
            Ok(())
        });
        self.let_streams_go_on_error(r)
    }

    /// One pass: the credits due are decided, then the data writes go
    /// (a credit due to the peer of one rides in it where the transport
    /// can carry it), then the credits left (after the data, so that
    /// piggybacked ones share its doorbell), then the transport's
    /// completions. With piggybacked credits (see
    /// [`Config::credit_piggyback`]) a batch of credits is held until a
    /// pass that writes data, on a rank that sends.
    fn progress_steps(&mut self) -> Result<bool> {
        self.check_fatal()?;
        let now = self.now();
        let streams = self.streams_active();
        let mut moved = streams && self.drive_stream_sends()?;
        let writes = self.send.stalled.is_some() || self.send.proto.has_queued();
        // A rank that has never sent (a one-way receiver) has no data to
        // carry credits: holding would only delay them to the full window.
        let hold = self.config.credit_piggyback && !writes && self.send.proto.next_round() > 0;
        self.credits_due(now, hold);
        moved |= self.post_writes()?;
        moved |= self.after_writes(now, hold, streams)?;
        Ok(moved)
    }

    /// A send's pass where its round, just posted with
    /// [`SendChannel::post_direct`], is all there is to write (no write
    /// queued or stalled, no streams): as [`progress_steps`](Self::progress_steps),
    /// the round's writes handed to the transport straight from its
    /// lengths, not through the protocol's queue. Writes the transport
    /// cannot take now are queued for the next pass.
    pub(super) fn progress_fresh(&mut self, round: u64, lens: &[usize]) -> Result<()> {
        let r = self.fresh_steps(round, lens);
        self.let_streams_go_on_error(r).map(drop)
    }

    fn fresh_steps(&mut self, round: u64, lens: &[usize]) -> Result<bool> {
        debug_assert!(self.send.stalled.is_none() && !self.send.proto.has_queued());
        let now = self.now();
        let mut left = lens.len();
        let mut posted = self.check_fatal().map(|()| true);
        if posted.is_ok() {
            self.credits_due(now, false);
            for (receiver, &len) in lens.iter().enumerate() {
                let op = self.send.proto.write_of(receiver, round, len);
                left -= 1;
                posted = self.post_op(op, left > 0);
                if !matches!(posted, Ok(true)) {
                    break;
                }
            }
        }
        // The writes not handed out wait in the protocol's queue (the one
        // refused is `stalled`), as the round's writes would have.
        for (receiver, &len) in lens.iter().enumerate().skip(lens.len() - left) {
            let op = self.send.proto.write_of(receiver, round, len);
            self.send.proto.retry(op);
        }
        posted?;
        self.after_writes(now, false, false)
    }

    /// The rest of a pass, after its data writes: the credits left, the
    /// transport's completions, the credits read, streams' completions,
    /// liveness.
    fn after_writes(&mut self, now: Instant, hold: bool, streams: bool) -> Result<bool> {
        let mut moved = self.post_owed_credits()?;
        moved |= self.poll_transport()?;
        moved |= self.read_credits()?;
        if streams {
            moved |= self.drive_stream_completions()?;
            moved |= self.post_credits(now, hold)?;
        }
        self.liveness.poll(now, false);
        Ok(moved)
    }

    /// This rank, as a peer.
    fn me(&self) -> Peer {
        Peer {
            role: self.role,
            rank: self.rank,
        }
    }

    /// Hands the protocol's queued writes to the transport, as far as it
    /// takes them.
    fn post_writes(&mut self) -> Result<bool> {
        let mut moved = false;
        loop {
            let op = match self.send.stalled.take() {
                Some(op) => op,
                None => match self.send.proto.poll_transmit() {
                    Some(op) => op,
                    None => break,
                },
            };
            let more = self.send.proto.has_queued();
            if !self.post_op(op, more)? {
                break;
            }
            moved = true;
        }
        Ok(moved)
    }

    /// Hands one data write to the transport (`more`: other data writes
    /// follow in this pass), with the credit owed to its peer offered to
    /// ride in it. `Ok(false)`: the transport cannot take it now, and it
    /// is kept as `stalled` for the next pass.
    fn post_op(&mut self, op: WriteOp, more: bool) -> Result<bool> {
        let (local, local_offset) =
            self.send.sources[(op.round - self.send.sources_base) as usize][op.receiver];
        let peer_global = self.shape.global(self.other_side(0).role, op.receiver);
        let req = WriteRequest {
            local,
            local_offset,
            len: op.len,
            remote: self.send.rings[op.receiver],
            remote_offset: op.remote_offset,
            imm: Some(op.imm),
            wr_id: op.round,
            signaled: true,
        };
        // The credit owed to this receiver (the sender of the same index
        // on the other channel is the same peer) may ride in its last
        // write of the pass.
        let owed = if self.recv.credit_owed.is_empty() || self.send.proto.has_queued_to(op.receiver)
        {
            None
        } else {
            self.recv.credit_owed.iter().position(|&s| s == op.receiver)
        };
        let credit = owed.map(|_| self.credit_request(op.receiver, Lane::Data));
        let rider = credit.as_ref().map(|req| Rider {
            req,
            data_lane: self.config.credit_piggyback,
        });
        // The last data write of the pass, unless piggybacked credits
        // other than its own follow it on the data lane (they share its
        // doorbell).
        let others = self.recv.credit_owed.len() - usize::from(owed.is_some());
        let followed = self.config.credit_piggyback && others > 0;
        let last = !followed && !more;
        // SAFETY: the source bytes stay untouched until the round is sent:
        // that is the documented contract of `Channel::send`; the
        // credit's, see `post_credits`.
        match unsafe {
            self.transport
                .post_data(peer_global, op.lane, &req, rider, last)
        } {
            Ok(rode) => {
                if let (true, Some(at)) = (rode, owed) {
                    self.recv.credit_owed.swap_remove(at);
                    self.recv.credit_writes += 1;
                }
                Ok(true)
            }
            Err(TransportError::WouldBlock) => {
                self.send.stalled = Some(op);
                Ok(false)
            }
            Err(TransportError::PeerClosed { reason, .. }) => {
                // Keep the write: the state stays consistent and every
                // later call reports the same lost peer.
                self.send.stalled = Some(op);
                Err(Error::PeerLost {
                    peer: self.other_side(op.receiver),
                    reason,
                })
            }
            Err(source) => {
                let peer = Some(self.other_side(op.receiver));
                Err(self.fail(Error::Transport { peer, source }))
            }
        }
    }

    /// Owes every sender the receive side's credit when it is due
    /// (`hold_batch`: a full batch alone waits for the next data write).
    fn credits_due(&mut self, now: Instant, hold_batch: bool) {
        if let Some(c) = self.recv.proto.poll_credit(now, hold_batch) {
            self.recv.credit_src.store_u64(0, c.released);
            let owed = &mut self.recv.credit_owed;
            owed.clear();
            owed.extend(0..self.recv.credit_dst.len());
        }
    }

    /// The write of the credit to `sender`, landing in its word for `lane`.
    fn credit_request(&self, sender: usize, lane: Lane) -> WriteRequest {
        WriteRequest {
            local: self.recv.credit_src.id(),
            local_offset: 0,
            len: 8,
            remote: self.recv.credit_dst[sender],
            remote_offset: credit_word(self.rank, lane),
            imm: None,
            wr_id: u64::MAX,
            signaled: false,
        }
    }

    /// Writes the receive side's credit to every sender when it is due
    /// (see [`credits_due`](Self::credits_due)).
    fn post_credits(&mut self, now: Instant, hold_batch: bool) -> Result<bool> {
        self.credits_due(now, hold_batch);
        self.post_owed_credits()
    }

    /// Writes the credit owed to every sender it has not reached yet.
    fn post_owed_credits(&mut self) -> Result<bool> {
        if self.recv.credit_owed.is_empty() {
            return Ok(false);
        }
        let mut owed = std::mem::take(&mut self.recv.credit_owed);
        let mut result = Ok(true);
        let mut posted = 0;
        owed.retain(|&sender| {
            if result.is_err() {
                return true;
            }
            let peer_global = self.shape.global(self.other_side(0).role, sender);
            // On the ACK lane; on the data lane when piggybacked, or where
            // the transport has it ride in a data write queued this pass.
            let lane =
                if self.config.credit_piggyback || self.transport.credit_rides(peer_global, 8) {
                    Lane::Data
                } else {
                    Lane::Ack
                };
            let req = self.credit_request(sender, lane);
            // SAFETY: the credit word only ever grows and any value of it is a
            // valid credit, so changes while in flight are harmless.
            match unsafe { self.transport.post_write(peer_global, lane, &req) } {
                Ok(()) => {
                    posted += 1;
                    false
                }
                Err(TransportError::WouldBlock) => true,
                // A departed sender needs no more credit.
                Err(TransportError::PeerClosed { .. }) => false,
                Err(source) => {
                    result = Err(Error::Transport {
                        peer: Some(self.other_side(sender)),
                        source,
                    });
                    true
                }
            }
        });
        self.recv.credit_owed = owed;
        self.recv.credit_writes += posted;
        result.map_err(|e| self.fail(e))
    }

    fn poll_transport(&mut self) -> Result<bool> {
        let mut comps = std::mem::take(&mut self.completions);
        comps.clear();
        if let Err(source) = self.transport.poll(&mut comps) {
            let peer = match &source {
                TransportError::Corrupt { peer, .. } => Some(self.peer_of_global(*peer)),
                _ => None,
            };
            return Err(self.fail(Error::Transport { peer, source }));
        }
        let moved = !comps.is_empty();
        for c in comps.drain(..) {
            match c {
                Completion::WriteDone { wr_id } => self.send.proto.on_write_complete(wr_id),
                Completion::Arrived { peer, imm, len } => {
                    let (from, index) = if peer == crate::transport::PEER_IN_IMMEDIATE {
                        // The transport cannot name the writer: the
                        // immediate does (its bounds are still checked).
                        let sender = usize::from(crate::proto::Immediate::decode(imm).sender);
                        (self.other_side(sender), sender)
                    } else {
                        let from = self.peer_of_global(peer);
                        let index = if from.role == self.role {
                            usize::MAX
                        } else {
                            from.rank
                        };
                        (from, index)
                    };
                    if let Err(source) = self.recv.proto.on_arrival(index, imm, len) {
                        return Err(self.fail(Error::Protocol { peer: from, source }));
                    }
                }
            }
        }
        self.completions = comps;
        // Forget sources of rounds whose writes all completed.
        while !self.send.sources.is_empty() && self.send.proto.round_sent(self.send.sources_base) {
            if let Some(v) = self.send.sources.pop_front() {
                self.send.spare_sources.push(v);
            }
            self.send.sources_base += 1;
        }
        Ok(moved)
    }

    fn read_credits(&mut self) -> Result<bool> {
        let mut moved = false;
        for r in 0..self.send.rings.len() {
            let credits = &self.send.credits;
            let v = credits
                .load_u64(credit_word(r, Lane::Ack))
                .max(credits.load_u64(credit_word(r, Lane::Data)));
            if v > self.send.proto.credit(r) {
                if let Err(source) = self.send.proto.on_credit(r, v) {
                    let peer = self.other_side(r);
                    return Err(self.fail(Error::Protocol { peer, source }));
                }
                moved = true;
            }
        }
        Ok(moved)
    }

    fn peer_of_global(&self, global: usize) -> Peer {
        let (role, rank) = self
            .shape
            .member(global.min(self.shape.world().saturating_sub(1)));
        Peer { role, rank }
    }

    /// The time (see [`crate::clock`]: no system call in the steady state;
    /// the CPU's counter read once in a few calls).
    fn now(&mut self) -> Instant {
        self.clock.coarse()
    }

    /// Polls liveness and returns the other-side peers lost so far. Take
    /// the snapshot *before* draining the transport: whatever a peer wrote
    /// before it left is then drained before its loss is judged.
    fn lost_snapshot(&mut self, force: bool) -> Vec<(usize, Lost)> {
        let now = self.now();
        self.liveness.poll(now, force);
        if !self.liveness.any_lost() {
            return Vec::new();
        }
        let n = self.shape.side(self.other_side(0).role);
        (0..n)
            .filter_map(|i| {
                self.liveness
                    .lost(self.other_side(i))
                    .map(|l| (i, l.clone()))
            })
            .collect()
    }

    /// For a blocking call's loop, whose `try_*` checks the peers it waits
    /// for itself: nothing before the deadline; at it, liveness read at
    /// once (see [`lost_snapshot`](Self::lost_snapshot)), so that a peer
    /// found dead then is reported as lost rather than as a timeout.
    pub(super) fn lost_at_deadline(&mut self, late: bool) -> Vec<(usize, Lost)> {
        if late {
            self.lost_snapshot(true)
        } else {
            Vec::new()
        }
    }

    /// `PeerLost` for the first of `indices` (other-side ranks) that was
    /// lost in `snapshot`. A peer that left (rather than hung) may still
    /// have data in flight on the transport (tcp can deliver it after the
    /// liveness goodbye): it counts once the transport has drained it, or
    /// a peer timeout after it left.
    fn check_lost(&self, snapshot: &[(usize, Lost)], indices: &[usize]) -> Result<()> {
        if snapshot.is_empty() {
            return Ok(());
        }
        let now = Instant::now();
        let other = self.other_side(0).role;
        for (i, lost) in snapshot.iter().filter(|(i, _)| indices.contains(i)) {
            let drained = self.transport.peer_drained(self.shape.global(other, *i));
            let grace_over = now.saturating_duration_since(lost.at) >= self.config.peer_timeout;
            if lost.hung || drained || grace_over {
                return Err(Error::PeerLost {
                    peer: self.other_side(*i),
                    reason: lost.reason.clone(),
                });
            }
        }
        Ok(())
    }

    /// Sender `sender`'s message of a received round: a borrowed, zero-copy
    /// view of the receive ring, valid until the round is released.
    ///
    /// # Panics
    /// If `sender` is not a sender index of the round's channel, or the
    /// ring is GPU memory (cuda-ipc: use [`message_addr`](Self::message_addr)).
    pub fn message(&self, round: &RecvRound, sender: usize) -> &[u8] {
        let geo = self.recv.proto.geometry();
        let off = geo.slot_offset(sender, round.slot);
        &self.recv.ring.as_slice()[off..off + round.lens[sender] as usize]
    }

    /// Where sender `sender`'s message of a received round is, and its
    /// length: a device address when the ring is GPU memory (cuda-ipc;
    /// [`rings_on_gpu`](Self::rings_on_gpu)), else a host address.
    ///
    /// # Panics
    /// If `sender` is not a sender index of the round's channel.
    pub fn message_addr(&self, round: &RecvRound, sender: usize) -> (u64, usize) {
        let geo = self.recv.proto.geometry();
        let off = geo.slot_offset(sender, round.slot);
        (
            self.recv.ring.as_ptr() as u64 + off as u64,
            round.lens[sender] as usize,
        )
    }

    /// Whether this rank's receive ring is GPU memory (cuda-ipc).
    pub fn rings_on_gpu(&self) -> bool {
        !self.recv.ring.is_host()
    }

    /// Aborts: closes every link without a goodbye, so peers fail fast with
    /// `PeerLost`, and makes every later call fail with `Aborted`.
    pub fn abort(&mut self) {
        self.liveness.close();
        self.fatal = Some(Fatal::Aborted);
        self.streams.let_go(&Error::Aborted);
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        self.streams.close();
        self.liveness.goodbye();
    }
}
