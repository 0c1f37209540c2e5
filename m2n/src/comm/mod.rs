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

mod error;
mod liveness;
mod proxy;
mod setup;
mod staging;
mod streams;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

pub use error::{Error, Result};
use liveness::{LinkPlan, Liveness, LivenessListener, Lost};
pub use proxy::Proxy;

use crate::bootstrap::{self, UniqueId};
use crate::config::Config;
use crate::group::{Peer, Role, Shape};
use crate::proto::{ChannelId, Geometry, Lane, RecvChannel, SendChannel, WriteOp};
use crate::transport::{
    Completion, Region, RegionId, RemoteRegion, Transport, TransportError, TransportKind,
    WriteRequest,
};
use crate::wait::Backoff;

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
    /// The time as last read (see [`Communicator::now`]).
    clock: Clock,
    /// Stream-ordered operations (see [`crate::stream`]).
    streams: streams::Streams,
    /// Host stages of device memory (shm and tcp).
    stages: staging::Stages,
}

/// Reads of the clock on the polling paths: one real read in
/// [`Clock::EVERY`] calls, the cached time in between. Every poll of a
/// blocking wait used to read it several times, and where
/// `clock_gettime` is a system call (no usable TSC, as in VMs) that was
/// most of a round's cost. The cached time is used for deadlines and
/// liveness only, where a few polls of staleness do not matter.
#[derive(Debug)]
struct Clock {
    now: Instant,
    calls: u32,
}

impl Clock {
    const EVERY: u32 = 64;
}

impl Communicator {
    /// Joins the group identified by `uid` as `role` `rank` of `shape`:
    /// allocates the rings, rendezvous, connects and barriers. Blocks until
    /// every rank has done the same, or `config.bootstrap_timeout`.
    pub fn init(
        config: Config,
        role: Role,
        rank: usize,
        shape: Shape,
        uid: &UniqueId,
    ) -> Result<Self> {
        config.validate()?;
        if shape.attention == 0 || shape.experts == 0 {
            return Err(Error::InvalidArgument(format!(
                "shape {shape} needs at least one rank per side"
            )));
        }
        if rank >= shape.side(role) {
            return Err(Error::InvalidArgument(format!(
                "{role} rank {rank} is outside 0..{}",
                shape.side(role)
            )));
        }
        let deadline = Instant::now() + config.bootstrap_timeout;
        let me = shape.global(role, rank);
        let (send_id, recv_id, send_cfg, recv_cfg) = match role {
            Role::Attention => (
                ChannelId::Dispatch,
                ChannelId::Combine,
                config.dispatch,
                config.combine,
            ),
            Role::Expert => (
                ChannelId::Combine,
                ChannelId::Dispatch,
                config.combine,
                config.dispatch,
            ),
        };
        let mine = shape.side(role);
        let theirs = shape.world() - mine;
        let send_geo = Geometry {
            senders: mine,
            receivers: theirs,
            depth: send_cfg.depth,
            slot_bytes: send_cfg.slot_bytes,
        };
        let recv_geo = Geometry {
            senders: theirs,
            receivers: mine,
            depth: recv_cfg.depth,
            slot_bytes: recv_cfg.slot_bytes,
        };
        let proto = |source| Error::Protocol {
            peer: Peer { role, rank },
            source,
        };
        let send_proto = SendChannel::new(send_geo, send_id, rank).map_err(proto)?;
        let recv_proto = RecvChannel::new(recv_geo, recv_id, config.credit_refresh)
            .map_err(proto)?
            .with_credit_batch(config.credit_batch);

        // Phase 1: where everyone is. Liveness links listen on the address
        // the transport will use.
        let ip = setup::local_ip(&config, uid.root)?;
        let listener = LivenessListener::bind(ip).map_err(|e| {
            Error::Bootstrap(bootstrap::BootstrapError::Io {
                op: format!("liveness listener on {ip}"),
                source: e,
            })
        })?;
        // Probing for an RDMA device is only worth it when verbs may be chosen.
        let verbs = matches!(config.transport, TransportKind::Verbs | TransportKind::Auto)
            && setup::verbs_here(&config).is_ok();
        let presence = setup::Presence {
            host: crate::transport::host_identity(),
            liveness: listener.addr,
            verbs,
            settings: setup::Settings::of(&config),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let mut rv = bootstrap::join(uid, role, rank, shape, presence.encode(), left)?;
        let everyone = rv
            .payloads
            .iter()
            .enumerate()
            .map(|(g, blob)| {
                setup::Presence::decode(blob).map_err(|source| Error::Transport {
                    peer: Some(setup::peer(shape, g)),
                    source: TransportError::BadDescriptor { peer: g, source },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        setup::check_agreement(shape, &everyone)?;
        let kind = setup::choose_transport(config.transport, shape, &everyone)?;
        let mut config = config;
        let local_ranks = everyone
            .iter()
            .filter(|p| p.host == everyone[me].host)
            .count();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        config.wait = config.wait.resolve(local_ranks, cores);
        // This rank's index among the ranks on its host picks its device
        // from an M2N_IB_DEVICE list.
        let local_rank = everyone[..me]
            .iter()
            .filter(|p| p.host == everyone[me].host)
            .count();
        let device_list = config.ib.device.clone();
        config.ib = config.ib.for_local_rank(local_rank);

        // Phase 2: the transport, its rings, and their descriptors.
        let mut transport = setup::make_transport(kind, &config, ip, me, shape.world())?;
        let t = |source| Error::Transport { peer: None, source };
        let ring_bytes = recv_geo.ring_bytes().expect("validated");
        let ring = if config.gpu_rings {
            transport.alloc_gpu_ring(ring_bytes, config.cuda_device)
        } else {
            transport.alloc_ring(ring_bytes)
        }
        .map_err(t)?;
        let credits = transport.alloc(8 * theirs).map_err(t)?;
        let credit_src = transport.alloc(8).map_err(t)?;
        let published = setup::Published {
            endpoint: transport.endpoint(),
            ring: ring.descriptor().to_vec(),
            credits: credits.descriptor().to_vec(),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let payloads = rv.all_gather(published.encode(), left)?;

        let other = match role {
            Role::Attention => Role::Expert,
            Role::Expert => Role::Attention,
        };
        let mut rings = Vec::with_capacity(theirs);
        let mut credit_dst = Vec::with_capacity(theirs);
        let mut dial = Vec::new();
        let mut accept = Vec::new();
        for i in 0..theirs {
            let g = shape.global(other, i);
            let peer = Peer {
                role: other,
                rank: i,
            };
            let tp = |source| Error::Transport {
                peer: Some(peer),
                source,
            };
            let p = setup::Published::decode(&payloads[g])
                .map_err(|source| tp(TransportError::BadDescriptor { peer: g, source }))?;
            transport.connect(g, &p.endpoint).map_err(tp)?;
            rings.push(transport.import(g, &p.ring).map_err(tp)?);
            credit_dst.push(transport.import(g, &p.credits).map_err(tp)?);
            // Attention ranks dial, experts accept.
            match role {
                Role::Attention => dial.push((g, everyone[g].liveness)),
                Role::Expert => accept.push(g),
            }
        }
        let plan = LinkPlan {
            shape,
            me,
            secret: &uid.secret,
            dial: &dial,
            accept: &accept,
            timeout: config.peer_timeout,
            interval: config.heartbeat_interval,
        };
        let liveness = Liveness::establish(listener, plan, deadline)
            .map_err(|e| Error::Bootstrap(bootstrap::BootstrapError::Group(e)))?;
        rv.barrier(deadline.saturating_duration_since(Instant::now()))?;
        let mut detail = transport.describe();
        if kind == TransportKind::Verbs && device_list.as_deref().is_some_and(|l| l.contains(',')) {
            detail += &format!(
                " (local rank {local_rank}, from M2N_IB_DEVICE={})",
                device_list.as_deref().unwrap_or_default()
            );
        }

        Ok(Self {
            detail,
            clock: Clock {
                now: Instant::now(),
                calls: 0,
            },
            role,
            rank,
            shape,
            config,
            transport,
            send: SendSide {
                id: send_id,
                proto: send_proto,
                rings,
                credits,
                sources: VecDeque::new(),
                sources_base: 0,
                stalled: None,
            },
            recv: RecvSide {
                id: recv_id,
                proto: recv_proto,
                ring,
                credit_src,
                credit_dst,
                credit_owed: Vec::new(),
                credit_writes: 0,
            },
            liveness,
            completions: Vec::new(),
            fatal: None,
            streams: streams::Streams::default(),
            stages: staging::Stages::default(),
        })
    }

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

    fn check_fatal(&self) -> Result<()> {
        match &self.fatal {
            None => Ok(()),
            Some(Fatal::Protocol(peer, e)) => Err(Error::Protocol {
                peer: *peer,
                source: e.clone(),
            }),
            Some(Fatal::Transport(peer, msg)) => Err(Error::Transport {
                peer: *peer,
                source: TransportError::Corrupt {
                    peer: peer.map_or(usize::MAX, |p| p.rank),
                    detail: msg.clone(),
                },
            }),
            Some(Fatal::Aborted) => Err(Error::Aborted),
        }
    }

    fn fail(&mut self, err: Error) -> Error {
        self.fatal = match &err {
            Error::Protocol { peer, source } => Some(Fatal::Protocol(*peer, source.clone())),
            Error::Transport { peer, source } => Some(Fatal::Transport(*peer, source.to_string())),
            _ => return err,
        };
        err
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
        if let Err(e) = self.check_lost(&lost, &needed) {
            // Streams waiting on this group would wait for ever.
            self.streams.let_go(&e);
            return Err(e);
        }
        Ok(moved)
    }

    fn progress_inner(&mut self) -> Result<bool> {
        let r = self.progress_steps();
        if let Err(e) = &r {
            self.streams.let_go(e);
        }
        r
    }

    fn progress_steps(&mut self) -> Result<bool> {
        self.check_fatal()?;
        let now = self.now();
        let streams = self.streams_active();
        let mut moved = streams && self.drive_stream_sends()?;
        moved |= self.post_writes()?;
        moved |= self.post_credits(now)?;
        moved |= self.poll_transport()?;
        moved |= self.read_credits()?;
        if streams {
            moved |= self.drive_stream_completions()?;
            moved |= self.post_credits(now)?;
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
            // SAFETY: the source bytes stay untouched until the round is sent:
            // that is the documented contract of `Channel::send`.
            match unsafe { self.transport.post_write(peer_global, op.lane, &req) } {
                Ok(()) => moved = true,
                Err(TransportError::WouldBlock) => {
                    self.send.stalled = Some(op);
                    break;
                }
                Err(TransportError::PeerClosed { reason, .. }) => {
                    // Keep the write: the state stays consistent and every
                    // later call reports the same lost peer.
                    self.send.stalled = Some(op);
                    return Err(Error::PeerLost {
                        peer: self.other_side(op.receiver),
                        reason,
                    });
                }
                Err(source) => {
                    let peer = Some(self.other_side(op.receiver));
                    return Err(self.fail(Error::Transport { peer, source }));
                }
            }
        }
        Ok(moved)
    }

    fn post_credits(&mut self, now: Instant) -> Result<bool> {
        if let Some(c) = self.recv.proto.poll_credit(now) {
            self.recv.credit_src.store_u64(0, c.released);
            self.recv.credit_owed = (0..self.recv.credit_dst.len()).collect();
        }
        if self.recv.credit_owed.is_empty() {
            return Ok(false);
        }
        let my_slot = self.rank * 8;
        let mut owed = std::mem::take(&mut self.recv.credit_owed);
        let mut result = Ok(true);
        let mut posted = 0;
        owed.retain(|&sender| {
            if result.is_err() {
                return true;
            }
            let req = WriteRequest {
                local: self.recv.credit_src.id(),
                local_offset: 0,
                len: 8,
                remote: self.recv.credit_dst[sender],
                remote_offset: my_slot,
                imm: None,
                wr_id: u64::MAX,
                signaled: false,
            };
            let peer_global = self.shape.global(self.other_side(0).role, sender);
            // SAFETY: the credit word only ever grows and any value of it is a
            // valid credit, so changes while in flight are harmless.
            match unsafe { self.transport.post_write(peer_global, Lane::Ack, &req) } {
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
                    let from = self.peer_of_global(peer);
                    let index = if from.role == self.role {
                        usize::MAX
                    } else {
                        from.rank
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
            self.send.sources.pop_front();
            self.send.sources_base += 1;
        }
        Ok(moved)
    }

    fn read_credits(&mut self) -> Result<bool> {
        let mut moved = false;
        for r in 0..self.send.rings.len() {
            let v = self.send.credits.load_u64(r * 8);
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

    /// The time, read for real once in [`Clock::EVERY`] calls.
    fn now(&mut self) -> Instant {
        self.clock.calls += 1;
        if self.clock.calls >= Clock::EVERY {
            self.clock.calls = 0;
            self.clock.now = Instant::now();
        }
        self.clock.now
    }

    /// The time, read now (deadlines are computed from it).
    fn fresh_now(&mut self) -> Instant {
        self.clock.calls = 0;
        self.clock.now = Instant::now();
        self.clock.now
    }

    /// Polls liveness and returns the other-side peers lost so far. Take
    /// the snapshot *before* draining the transport: whatever a peer wrote
    /// before it left is then drained before its loss is judged.
    fn lost_snapshot(&mut self, force: bool) -> Vec<(usize, Lost)> {
        let now = if force { self.fresh_now() } else { self.now() };
        self.liveness.poll(now, force);
        let n = self.shape.side(self.other_side(0).role);
        (0..n)
            .filter_map(|i| {
                self.liveness
                    .lost(self.other_side(i))
                    .map(|l| (i, l.clone()))
            })
            .collect()
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

/// A round's messages, checked: each receiver's source, the lengths, and
/// the device-to-stage copies to make first.
#[derive(Debug)]
struct Prepared {
    sources: Vec<(RegionId, usize)>,
    lens: Vec<usize>,
    copies: Vec<staging::StageCopy>,
}

/// One channel of a communicator, as seen from this rank: it either sends
/// on it or receives on it, depending on the role.
#[derive(Debug)]
pub struct Channel<'a> {
    comm: &'a mut Communicator,
    id: ChannelId,
}

impl Channel<'_> {
    fn sending(&self) -> Result<()> {
        if self.comm.send.id == self.id {
            Ok(())
        } else {
            Err(Error::Usage(format!(
                "{} ranks receive on the {:?} channel; they cannot send on it",
                self.comm.role, self.id
            )))
        }
    }

    fn receiving(&self) -> Result<()> {
        if self.comm.recv.id == self.id {
            Ok(())
        } else {
            Err(Error::Usage(format!(
                "{} ranks send on the {:?} channel; they cannot receive on it",
                self.comm.role, self.id
            )))
        }
    }

    /// Posts the next round without blocking: `msgs[r]` goes to receiver
    /// `r` (one per receiver; [`Msg::EMPTY`] for nothing). Returns the round
    /// number, or `None` when some receiver still holds `depth` rounds
    /// (`PeerLost` if such a receiver is gone: its credit will never come).
    ///
    /// The bytes named by `msgs` must stay unchanged until
    /// [`is_sent`](Self::is_sent) says the round is sent.
    pub fn try_send(&mut self, msgs: &[Msg<'_>]) -> Result<Option<u64>> {
        self.sending()?;
        self.comm.check_no_stream_sends()?;
        let lost = self.comm.lost_snapshot(false);
        self.comm.progress_inner()?;
        let Prepared {
            sources,
            lens,
            copies,
        } = self.validate(msgs)?;
        // Device memory through a host stage: copied in just before the
        // round is posted, once the round can be posted and the stage's
        // previous round has left it.
        if !copies.is_empty() {
            let stage_busy = copies.iter().any(|c| {
                self.comm
                    .stages
                    .last_round(c.region)
                    .is_some_and(|r| !self.comm.send.proto.round_sent(r))
            });
            if stage_busy || !self.comm.send.proto.can_post() {
                if !lost.is_empty() {
                    let blocking: Vec<usize> = self.comm.send.proto.blocking_receivers().collect();
                    self.comm.check_lost(&lost, &blocking)?;
                }
                return Ok(None);
            }
            for c in &copies {
                c.run()?;
            }
        }
        let peer = self.comm.me();
        let posted = self
            .comm
            .send
            .proto
            .post_round(&lens)
            .map_err(|source| Error::Protocol { peer, source })?;
        let Some(round) = posted else {
            // Blocked on credit: a receiver that is gone will never give it.
            if !lost.is_empty() {
                let blocking: Vec<usize> = self.comm.send.proto.blocking_receivers().collect();
                self.comm.check_lost(&lost, &blocking)?;
            }
            return Ok(None);
        };
        debug_assert_eq!(
            round,
            self.comm.send.sources_base + self.comm.send.sources.len() as u64
        );
        self.comm.send.sources.push_back(sources);
        for c in &copies {
            self.comm.stages.sent_from(c.region, round);
        }
        self.comm.progress_inner()?;
        Ok(Some(round))
    }

    /// Checks a round's messages: one per receiver, each inside its
    /// region (of this communicator) and its slot.
    fn validate(&self, msgs: &[Msg<'_>]) -> Result<Prepared> {
        let geo = *self.comm.send.proto.geometry();
        if msgs.len() != geo.receivers {
            return Err(Error::InvalidArgument(format!(
                "a round needs one message per receiver: got {}, there are {}",
                msgs.len(),
                geo.receivers
            )));
        }
        let mut sources = Vec::with_capacity(msgs.len());
        for (r, m) in msgs.iter().enumerate() {
            let src = match m.region {
                Some(region) if !self.comm.transport.owns(region.id()) => {
                    return Err(Error::InvalidArgument(format!(
                        "message for receiver {r}: its region was registered with another communicator"
                    )));
                }
                Some(region) => {
                    let ok = m
                        .offset
                        .checked_add(m.len)
                        .is_some_and(|end| end <= region.len());
                    if !ok {
                        return Err(Error::InvalidArgument(format!(
                            "message for receiver {r}: {}+{} is outside its region of {} bytes",
                            m.offset,
                            m.len,
                            region.len()
                        )));
                    }
                    (region.id(), m.offset)
                }
                None => (self.comm.recv.credit_src.id(), 0),
            };
            if m.len > geo.slot_bytes {
                let source = crate::proto::ProtoError::MessageTooLarge {
                    receiver: r,
                    len: m.len,
                    slot_bytes: geo.slot_bytes,
                };
                return Err(Error::InvalidArgument(source.to_string()));
            }
            sources.push(src);
        }
        let lens: Vec<usize> = msgs.iter().map(|m| m.len).collect();
        let copies = msgs
            .iter()
            .filter_map(|m| {
                let region = m.region?;
                let staging = region.staging()?.clone();
                (m.len > 0).then(|| staging::StageCopy {
                    region: region.id(),
                    staging,
                    offset: m.offset,
                    len: m.len,
                })
            })
            .collect();
        Ok(Prepared {
            sources,
            lens,
            copies,
        })
    }

    /// Posts the next round, waiting up to `timeout` for credit.
    pub fn send(&mut self, msgs: &[Msg<'_>], timeout: Duration) -> Result<u64> {
        let deadline = self.comm.fresh_now() + timeout;
        let mut backoff = Backoff::new(self.comm.config.wait);
        loop {
            let late = self.comm.now() >= deadline;
            let lost = self.comm.lost_snapshot(late);
            if let Some(round) = self.try_send(msgs)? {
                return Ok(round);
            }
            if !lost.is_empty() {
                let blocking: Vec<usize> = self.comm.send.proto.blocking_receivers().collect();
                self.comm.check_lost(&lost, &blocking)?;
            }
            if late {
                let blocking: Vec<usize> = self.comm.send.proto.blocking_receivers().collect();
                return Err(Error::Timeout {
                    what: format!(
                        "credit from {}",
                        blocking
                            .iter()
                            .map(|&r| self.comm.other_side(r).to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    waited: timeout,
                });
            }
            backoff.wait(false);
        }
    }

    /// Whether every write of `round` has completed, so its source bytes
    /// may change; `PeerLost` while it has not and a receiver is gone.
    pub fn is_sent(&mut self, round: u64) -> Result<bool> {
        self.sending()?;
        let next = self.comm.send.proto.next_round();
        if round >= next {
            return Err(Error::InvalidArgument(format!(
                "round {round} was never posted (the next round is {next})"
            )));
        }
        let lost = self.comm.lost_snapshot(false);
        self.comm.progress_inner()?;
        if self.comm.send.proto.round_sent(round) {
            return Ok(true);
        }
        if !lost.is_empty() {
            let all: Vec<usize> = (0..self.comm.send.rings.len()).collect();
            self.comm.check_lost(&lost, &all)?;
        }
        Ok(false)
    }

    /// Waits until `round` is sent (see [`is_sent`](Self::is_sent)).
    pub fn wait_sent(&mut self, round: u64, timeout: Duration) -> Result<()> {
        let deadline = self.comm.fresh_now() + timeout;
        let mut backoff = Backoff::new(self.comm.config.wait);
        loop {
            let late = self.comm.now() >= deadline;
            let lost = self.comm.lost_snapshot(late);
            if self.is_sent(round)? {
                return Ok(());
            }
            if !lost.is_empty() {
                let all: Vec<usize> = (0..self.comm.send.rings.len()).collect();
                self.comm.check_lost(&lost, &all)?;
            }
            if late {
                return Err(Error::Timeout {
                    what: format!("local completion of round {round}"),
                    waited: timeout,
                });
            }
            backoff.wait(false);
        }
    }

    /// The next complete round, if it is in; `PeerLost` if a sender whose
    /// message is missing is gone (it will never come).
    pub fn try_recv(&mut self) -> Result<Option<RecvRound>> {
        self.receiving()?;
        self.comm.check_no_stream_recvs()?;
        let lost = self.comm.lost_snapshot(false);
        self.comm.progress_inner()?;
        if let Some(d) = self.comm.recv.proto.poll_round() {
            return Ok(Some(RecvRound {
                round: d.round,
                slot: d.slot,
                lens: d.lens,
            }));
        }
        // Not in yet: a sender that is gone will never complete it.
        if !lost.is_empty() {
            let missing: Vec<usize> = self.comm.recv.proto.missing_senders().collect();
            self.comm.check_lost(&lost, &missing)?;
        }
        Ok(None)
    }

    /// Waits up to `timeout` for the next complete round. A sender that is
    /// lost while its message is missing fails the wait with `PeerLost`.
    pub fn recv(&mut self, timeout: Duration) -> Result<RecvRound> {
        let deadline = self.comm.fresh_now() + timeout;
        let mut backoff = Backoff::new(self.comm.config.wait);
        loop {
            let late = self.comm.now() >= deadline;
            let lost = self.comm.lost_snapshot(late);
            if let Some(r) = self.try_recv()? {
                return Ok(r);
            }
            if !lost.is_empty() {
                let missing: Vec<usize> = self.comm.recv.proto.missing_senders().collect();
                self.comm.check_lost(&lost, &missing)?;
            }
            if late {
                let missing: Vec<usize> = self.comm.recv.proto.missing_senders().collect();
                return Err(Error::Timeout {
                    what: format!(
                        "round {} from {}",
                        self.comm.recv.proto.next_round(),
                        missing
                            .iter()
                            .map(|&s| self.comm.other_side(s).to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    waited: timeout,
                });
            }
            backoff.wait(false);
        }
    }

    /// Hands a round back: its slots return to the senders as credit.
    pub fn release(&mut self, round: RecvRound) -> Result<()> {
        self.receiving()?;
        let peer = Peer {
            role: self.comm.role,
            rank: self.comm.rank,
        };
        self.comm
            .recv
            .proto
            .release(round.round)
            .map_err(|source| Error::Protocol { peer, source })?;
        self.comm.progress_inner()?;
        Ok(())
    }
}
