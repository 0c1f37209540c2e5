//! Stream-ordered operations: sends, receives and releases enqueued on a
//! stream instead of blocking the CPU (issue 16).
//!
//! A [`Stream`] is an in-order queue of work that m2n can extend with two
//! operations on 32-bit flags: write a value once everything enqueued
//! before is done, and hold everything enqueued after until a flag reaches
//! a value (wrap-aware, [`reached`]). A CUDA stream does both in its front
//! end (`cuStreamWriteValue32` / `cuStreamWaitValue32`: no kernel, no SM;
//! [`CudaStream`], feature `cuda`); a [`HostStream`] does them on a CPU
//! thread, for machines without a GPU and for tests of the ordering.
//!
//! The flags of a communicator live in one [`FlagBlock`] (pinned, mapped
//! host memory for CUDA streams) and the protocol over them is
//! [`crate::proto::gate`]; the communicator's progress engine (or its
//! proxy thread, [`Proxy`]) drives the host's half. See
//! [`crate::Channel::send_on_stream`].
//!
//! Recorded and replayed (CUDA graphs): in [`StreamMode::GraphSafe`]
//! (`Channel::set_stream_mode`) every flag value a stream writes or waits
//! on is a constant, so a recording of a whole cycle of ring slots can be
//! launched again and again ([`crate::proto::gate`] has the protocol).
//! [`HostStream::begin_capture`] / [`HostStream::end_capture`] /
//! [`HostGraph::launch`] record and replay on host streams as
//! `cuStreamBeginCapture` / `cuStreamEndCapture` / `cuGraphLaunch` do.

#[cfg(feature = "cuda")]
mod cuda;
mod host;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

#[cfg(feature = "cuda")]
pub use cuda::CudaStream;
pub use host::{HostGraph, HostStream};

pub use crate::proto::gate::{reached, Flag, StreamKind, StreamMode};
use crate::transport::Region;

/// Why a stream operation could not be enqueued or done.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StreamError {
    /// The stream or the machine cannot do it (no CUDA driver, no GPU,
    /// a feature left out of the build).
    #[error("{0}")]
    Unsupported(String),
    /// A CUDA call failed.
    #[error("{call} failed: {code}")]
    Call { call: &'static str, code: String },
    /// Streams of different kinds on one communicator (their flags live in
    /// different memory).
    #[error("this communicator's stream operations use {have} streams; a {got} stream cannot share their flags")]
    Mixed {
        have: &'static str,
        got: &'static str,
    },
    /// A host stream gave up waiting (it was dropped, or synchronise timed out).
    #[error("{0}")]
    Abandoned(String),
    /// Recording misused (begun twice, ended without a beginning,
    /// synchronised while recording, work that cannot be replayed).
    #[error("{0}")]
    Capture(String),
}

/// An in-order queue of work that m2n can gate (see the module docs).
pub trait Stream {
    fn kind(&self) -> StreamKind;

    /// Enqueues: once all work enqueued before is done, `flags[flag] = value`
    /// (with every earlier write of that work visible before it).
    fn write_value(
        &self,
        flags: &Arc<FlagBlock>,
        flag: Flag,
        value: u32,
    ) -> Result<(), StreamError>;

    /// Enqueues: work enqueued after waits until `reached(flags[flag], value)`.
    fn wait_value(&self, flags: &Arc<FlagBlock>, flag: Flag, value: u32)
        -> Result<(), StreamError>;

    /// A new, zeroed flag block of `layout` that this kind of stream can
    /// read and write.
    fn alloc_flags(&self, layout: FlagLayout) -> Result<FlagBlock, StreamError>;

    /// Whether the stream is recording (a CUDA stream capture, or
    /// [`HostStream::begin_capture`]): what is enqueued now does not run
    /// now but each time the recording is launched, with the values and
    /// addresses it has now.
    fn is_capturing(&self) -> Result<bool, StreamError>;

    /// The stream as a host stream, if it is one (to launch a
    /// [`HostGraph`] on).
    fn as_host(&self) -> Option<&HostStream> {
        None
    }

    /// Where work on this stream reads `region` (a receive ring): the host
    /// address for host streams and for device memory; for host memory on
    /// a CUDA stream, its mapped device address (registered with the
    /// driver while the returned value lives). `rdma`: the NIC writes it
    /// (device memory then needs a flush before each arrival is told).
    fn map_region(&self, region: &Region, rdma: bool) -> Result<MappedRegion, StreamError>;

    /// Enqueues a copy of `len` bytes from device address `src` to host
    /// address `dst` (a staged region's host stage; see
    /// [`crate::Communicator::register_gpu`]).
    fn copy_to_host(&self, dst: usize, src: u64, len: usize) -> Result<(), StreamError>;
}

/// Makes writes that landed in a region (by a NIC, say) visible to work
/// on streams before the host tells them the data are in.
pub type Fence = Box<dyn Fn() -> Result<(), StreamError> + Send + Sync>;

/// A region as streams of one kind see it.
pub struct MappedRegion {
    /// The region's first byte, as work on the stream addresses it.
    pub addr: u64,
    /// Run before each arrival is published, if the memory needs it
    /// (device memory written by RDMA: `cuFlushGPUDirectRDMAWrites`).
    pub fence: Option<Fence>,
    /// Undoes the mapping when dropped.
    pub owner: Option<Box<dyn Send + Sync>>,
}

impl std::fmt::Debug for MappedRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedRegion")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("fence", &self.fence.is_some())
            .finish()
    }
}

/// Flag words, each on its own 64-byte line.
const LINE_WORDS: usize = 16;
const FLAGS: [Flag; 4] = [Flag::Ready, Flag::Sent, Flag::Arrived, Flag::Released];

/// Bytes of a flag block without graph-safe slots.
pub const FLAG_BLOCK_BYTES: usize = FLAGS.len() * LINE_WORDS * 4;

/// How many graph-safe slot flags a block holds: a `ready` and a `sent`
/// per slot of the send side, an `arrived` and a `released` per slot of
/// the receive side (after the four sequence-mode flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlagLayout {
    pub send_slots: u32,
    pub recv_slots: u32,
}

impl FlagLayout {
    fn lines(&self) -> usize {
        FLAGS.len() + 2 * self.send_slots as usize + 2 * self.recv_slots as usize
    }

    /// Bytes of a block of this layout.
    pub fn bytes(&self) -> usize {
        self.lines() * LINE_WORDS * 4
    }

    /// The flag's line; panics naming a slot the layout does not have.
    fn index(&self, flag: Flag) -> usize {
        let (s, r) = (self.send_slots, self.recv_slots);
        let slot = |n: u32, of: u32, base: usize| {
            assert!(n < of, "{flag:?}: the flag block has {of} slots there");
            base + n as usize
        };
        match flag {
            Flag::Ready => 0,
            Flag::Sent => 1,
            Flag::Arrived => 2,
            Flag::Released => 3,
            Flag::SlotReady(n) => slot(n, s, 4),
            Flag::SlotSent(n) => slot(n, s, 4 + s as usize),
            Flag::SlotArrived(n) => slot(n, r, 4 + 2 * s as usize),
            Flag::SlotReleased(n) => slot(n, r, 4 + 2 * s as usize + r as usize),
        }
    }
}

/// The flags of one communicator's stream operations, in memory both the
/// host and the streams can reach: the four sequence-mode flags (only
/// ever moved forward) and the graph-safe handshake flags of its
/// [`FlagLayout`] (0 or 1).
pub struct FlagBlock {
    host: *const AtomicU32,
    /// The block's address as the streams see it.
    device: u64,
    kind: StreamKind,
    layout: FlagLayout,
    /// Frees the memory (heap or pinned) when the block goes.
    _owner: Box<dyn Send + Sync>,
}

// SAFETY: the words are atomics in memory owned by `_owner` for the block's life; nothing else is reachable through the pointer.
unsafe impl Send for FlagBlock {}
// SAFETY: as above: shared access is through atomics only.
unsafe impl Sync for FlagBlock {}

impl std::fmt::Debug for FlagBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("FlagBlock");
        d.field("kind", &self.kind);
        for flag in FLAGS {
            d.field(&format!("{flag:?}"), &self.load(flag));
        }
        d.finish()
    }
}

impl FlagBlock {
    /// A block on the heap, for host streams, without graph-safe slots.
    pub fn host() -> Self {
        Self::host_with(FlagLayout::default())
    }

    /// A block on the heap, for host streams.
    pub fn host_with(layout: FlagLayout) -> Self {
        let words: Box<[AtomicU32]> = (0..layout.lines() * LINE_WORDS)
            .map(|_| AtomicU32::new(0))
            .collect();
        let host = words.as_ptr();
        FlagBlock {
            host,
            device: host as u64,
            kind: StreamKind::Host,
            layout,
            _owner: Box::new(words),
        }
    }

    /// A block in memory someone else allocated (pinned host memory).
    ///
    /// # Safety
    /// `host` must point to `layout.bytes()` zeroed, 4-byte aligned
    /// bytes that stay valid while `owner` lives, and `device` must be
    /// their address as `kind` streams see it.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) unsafe fn from_raw(
        host: *mut u8,
        device: u64,
        kind: StreamKind,
        layout: FlagLayout,
        owner: Box<dyn Send + Sync>,
    ) -> Self {
        FlagBlock {
            host: host.cast(),
            device,
            kind,
            layout,
            _owner: owner,
        }
    }

    pub fn kind(&self) -> StreamKind {
        self.kind
    }

    pub fn layout(&self) -> FlagLayout {
        self.layout
    }

    fn word(&self, flag: Flag) -> &AtomicU32 {
        // SAFETY: the block has layout.lines() lines of LINE_WORDS words (index() checks the slot) and lives as long as `self` (see the type's invariants).
        unsafe { &*self.host.add(self.layout.index(flag) * LINE_WORDS) }
    }

    /// The flag's value (acquire: what the stream wrote before it is visible).
    pub fn load(&self, flag: Flag) -> u32 {
        self.word(flag).load(Ordering::Acquire)
    }

    /// Sets the flag (release: what the host wrote before it is visible).
    pub fn store(&self, flag: Flag, value: u32) {
        self.word(flag).store(value, Ordering::Release)
    }

    /// The flag's address as streams see it.
    pub fn device_addr(&self, flag: Flag) -> u64 {
        self.device + (self.layout.index(flag) * LINE_WORDS * 4) as u64
    }
}

/// A round a stream-ordered receive will deliver: known when the receive
/// is enqueued (rounds arrive in order, and each sender's message of round
/// `r` lands in slot `r % depth` of its part of the ring), readable by
/// work enqueued on the stream after the receive.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a stream round holds its slots until released on a stream"]
pub struct StreamRound {
    pub(crate) round: u64,
    /// Where each sender's message starts, as the stream sees it.
    pub(crate) addrs: Vec<u64>,
    pub(crate) slot_bytes: usize,
}

impl StreamRound {
    /// The round's number on its channel.
    pub fn round(&self) -> u64 {
        self.round
    }
    /// Where `sender`'s message starts, as work on the stream sees it (a
    /// device address for CUDA streams). Its length is known once the round
    /// is in: [`crate::Communicator::stream_round_lens`]; at most
    /// [`slot_bytes`](Self::slot_bytes).
    ///
    /// # Panics
    /// If `sender` is not a sender of the channel.
    pub fn message_addr(&self, sender: usize) -> u64 {
        self.addrs[sender]
    }
    /// The most bytes any message of the round can have.
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }
}

#[cfg(test)]
mod tests;
