//! One-sided RDMA semantics behind a small trait.
//!
//! A transport registers memory (handing out a portable descriptor a peer
//! can import), connects to peers from their endpoint descriptors, posts
//! writes with or without an immediate on a [`Lane`], and reports
//! completions when polled. "Not now" is [`TransportError::WouldBlock`], a
//! normal answer: call [`Transport::poll`] and try again.
//!
//! Backends: [`shm`] (processes on one host). The `tcp`, `verbs` and
//! `fabric` (libfabric) backends implement the same trait.

use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use thiserror::Error;

use crate::codec::DecodeError;
pub use crate::proto::Lane;

#[cfg(feature = "cuda")]
pub mod cuda_ipc;
#[cfg(feature = "fabric")]
pub mod fabric;
pub mod options;
/// Shared-memory segments (memfds), which shm, tcp and verbs all allocate from.
pub(crate) mod segment;
pub mod shm;
pub mod tcp;
#[cfg(feature = "verbs")]
pub mod verbs;

/// Which backend moves the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Shm,
    Tcp,
    Verbs,
    /// libfabric: reliable datagram endpoints and RMA writes with remote
    /// CQ data, on the provider `M2N_FI_PROVIDER` names (feature `fabric`).
    Fabric,
    /// CUDA IPC between processes on one host: receive rings in GPU
    /// memory, writes are device-to-device copies (feature `cuda`).
    CudaIpc,
    /// Pick the best one that reaches every peer.
    Auto,
}

impl TransportKind {
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Shm => "shm",
            TransportKind::Tcp => "tcp",
            TransportKind::Verbs => "verbs",
            TransportKind::Fabric => "fabric",
            TransportKind::CudaIpc => "cuda-ipc",
            TransportKind::Auto => "auto",
        }
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for TransportKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "shm" => Ok(Self::Shm),
            "tcp" => Ok(Self::Tcp),
            "verbs" => Ok(Self::Verbs),
            "fabric" | "ofi" | "libfabric" => Ok(Self::Fabric),
            "cuda-ipc" | "cuda_ipc" => Ok(Self::CudaIpc),
            "auto" => Ok(Self::Auto),
            other => Err(format!(
                "unknown transport {other:?}: expected shm, tcp, verbs, fabric, cuda-ipc or auto"
            )),
        }
    }
}

/// Errors of the transport layer; each names the operation and peer.
#[derive(Debug, Error)]
pub enum TransportError {
    /// A queue is full; poll completions and retry. Not a failure.
    #[error("transport queue full, retry after polling")]
    WouldBlock,
    #[error("{op}: {source}")]
    Os {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("bad descriptor from peer {peer}: {source}")]
    BadDescriptor {
        peer: usize,
        #[source]
        source: DecodeError,
    },
    #[error(
        "{side} range {offset}+{len} is outside its region of {region_len} bytes (peer {peer})"
    )]
    OutOfBounds {
        side: &'static str,
        peer: usize,
        offset: usize,
        len: usize,
        region_len: usize,
    },
    #[error("peer {0} is not connected")]
    NotConnected(usize),
    /// The peer's connection is gone (it exited, crashed or hung up).
    #[error("peer {peer} closed: {reason}")]
    PeerClosed { peer: usize, reason: String },
    #[error("local region {0} is not registered with this communicator (or was freed)")]
    UnknownRegion(u32),
    #[error("peer {peer} corrupted shared state: {detail}")]
    Corrupt { peer: usize, detail: String },
    #[error("transport {0} is not available: {1}")]
    Unavailable(TransportKind, String),
    /// A call into the transport's library never returned and was broken
    /// off (a peer died inside it, holding its lock): the transport makes
    /// no more calls, and the caller learns who died from its peers'
    /// liveness. `peer`: the peer a write to which was broken off, if it
    /// was a write.
    #[error("{detail}")]
    Stuck { peer: Option<usize>, detail: String },
}

impl TransportError {
    pub(crate) fn os(op: impl Into<String>, source: impl Into<std::io::Error>) -> Self {
        Self::Os {
            op: op.into(),
            source: source.into(),
        }
    }
}

/// Identifies a local registered region within its transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RegionId {
    /// Which transport instance registered it (regions of another
    /// communicator are refused, not misread).
    owner: u32,
    index: u32,
}

impl RegionId {
    /// The region's index within its transport.
    pub fn index(self) -> u32 {
        self.index
    }
}

/// A peer's region this process may write into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteRegion {
    pub peer: usize,
    /// The transport's handle for the imported region.
    pub key: u32,
    pub len: usize,
}

/// The memory behind a local region: a segment m2n allocated, or memory
/// the application registered.
pub(crate) trait LocalMemory: Send + Sync + fmt::Debug {
    fn base(&self) -> *mut u8;
    fn len(&self) -> usize;
    /// The transport's local key for this memory (a verbs lkey; 0 elsewhere).
    #[cfg_attr(not(feature = "verbs"), allow(dead_code))]
    fn key(&self) -> u32 {
        0
    }
    /// The transport's local descriptor for this memory (libfabric's
    /// `fi_mr_desc`; 0 elsewhere).
    #[cfg_attr(not(feature = "fabric"), allow(dead_code))]
    fn desc(&self) -> usize {
        0
    }
    /// Whether the memory is a GPU's (the host cannot read it directly).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn is_device(&self) -> bool {
        false
    }
}

impl LocalMemory for segment::Segment {
    fn base(&self) -> *mut u8 {
        self.as_ptr().as_ptr()
    }
    fn len(&self) -> usize {
        segment::Segment::len(self)
    }
}

/// Application memory registered with [`Transport::register`].
#[derive(Debug)]
pub(crate) struct External {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the registrant promised the memory stays valid while registered;
// m2n only reads it while posting writes.
unsafe impl Send for External {}
// SAFETY: as above.
unsafe impl Sync for External {}

impl LocalMemory for External {
    fn base(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len(&self) -> usize {
        self.len
    }
}

/// A transport's local regions, held weakly: dropping a [`Region`]
/// deregisters it.
#[derive(Debug)]
pub(crate) struct LocalRegions {
    owner: u32,
    /// Each region's memory, and what it said of itself when registered
    /// (it never changes: read on the posting path without taking a
    /// reference).
    regions: Vec<(Weak<dyn LocalMemory>, LocalView)>,
}

/// A registered region's place and keys, as [`LocalMemory`] gives them: a
/// copy that keeps nothing alive. For a write whose source is read before
/// its post returns (an injected or copied one); a write read later keeps
/// the region by [`LocalRegions::source`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct LocalView {
    pub(crate) base: *mut u8,
    pub(crate) len: usize,
    #[cfg_attr(not(feature = "fabric"), allow(dead_code))]
    pub(crate) desc: usize,
    #[cfg_attr(not(feature = "fabric"), allow(dead_code))]
    pub(crate) device: bool,
}

// SAFETY: a view is the address and keys of memory that is itself Send and
// Sync (every LocalMemory is); it is only read through under the contract
// of the write that names it, on whichever thread posts that write.
unsafe impl Send for LocalView {}
// SAFETY: as above; a view is never written through.
unsafe impl Sync for LocalView {}

impl Default for LocalRegions {
    fn default() -> Self {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        Self {
            owner: NEXT.fetch_add(1, Ordering::Relaxed),
            regions: Vec::new(),
        }
    }
}

impl LocalRegions {
    pub(crate) fn next_id(&self) -> RegionId {
        RegionId {
            owner: self.owner,
            index: self.regions.len() as u32,
        }
    }

    /// Whether `id` was registered here.
    pub(crate) fn owns(&self, id: RegionId) -> bool {
        id.owner == self.owner
    }

    /// Registers `mem` and returns its handle.
    pub(crate) fn add(&mut self, mem: Arc<dyn LocalMemory>, descriptor: Vec<u8>) -> Region {
        let id = self.next_id();
        let view = LocalView {
            base: mem.base(),
            len: mem.len(),
            desc: mem.desc(),
            device: mem.is_device(),
        };
        self.regions.push((Arc::downgrade(&mem), view));
        Region {
            id,
            ptr: NonNull::new(mem.base()).unwrap_or(NonNull::dangling()),
            len: mem.len(),
            descriptor,
            host: true,
            staging: None,
            _mem: mem,
        }
    }

    /// Registers device memory: like [`add`](Self::add), not host-accessible.
    #[cfg(feature = "cuda")]
    pub(crate) fn add_device(&mut self, mem: Arc<dyn LocalMemory>) -> Region {
        let mut r = self.add(mem, Vec::new());
        r.host = false;
        r
    }

    /// Registers application memory as a write source (not remotely writable).
    ///
    /// # Safety
    /// As [`Transport::register`].
    pub(crate) unsafe fn add_external(
        &mut self,
        ptr: *mut u8,
        len: usize,
    ) -> Result<Region, TransportError> {
        check_registrable(ptr, len)?;
        let ptr = NonNull::new(ptr).unwrap_or(NonNull::dangling());
        Ok(self.add(Arc::new(External { ptr, len }), Vec::new()))
    }

    /// The source of `req`, after checking both ranges: the remote one
    /// against `remote_len` (the peer's region) and the local one against
    /// the registered region, and that the length fits the 32 bits every
    /// transport carries it in. Nothing is posted when a check fails.
    pub(crate) fn source(
        &self,
        peer: usize,
        req: &WriteRequest,
        remote_len: usize,
    ) -> Result<Arc<dyn LocalMemory>, TransportError> {
        self.view(peer, req, remote_len)?;
        self.get(req.local)
    }

    /// [`source`](Self::source)'s checks, and the source's view: no
    /// reference taken (an atomic read-modify-write and a release per
    /// write), so the region must stay registered until the source is read.
    #[inline]
    pub(crate) fn view(
        &self,
        peer: usize,
        req: &WriteRequest,
        remote_len: usize,
    ) -> Result<LocalView, TransportError> {
        if u32::try_from(req.len).is_err() {
            return Err(TransportError::OutOfBounds {
                side: "write",
                peer,
                offset: req.local_offset,
                len: req.len,
                region_len: u32::MAX as usize,
            });
        }
        check_range("remote", peer, req.remote_offset, req.len, remote_len)?;
        // (`let else`, not `ok_or`, on the posting path: `ok_or` builds
        // its error, and drops it, on every write.)
        let Some(&(_, view)) = self
            .regions
            .get(req.local.index as usize)
            .filter(|(mem, _)| self.owns(req.local) && mem.strong_count() > 0)
        else {
            return Err(TransportError::UnknownRegion(req.local.index));
        };
        check_range("local", peer, req.local_offset, req.len, view.len)?;
        Ok(view)
    }

    pub(crate) fn get(&self, id: RegionId) -> Result<Arc<dyn LocalMemory>, TransportError> {
        self.regions
            .get(id.index as usize)
            .filter(|_| self.owns(id))
            .and_then(|(mem, _)| mem.upgrade())
            .ok_or(TransportError::UnknownRegion(id.index))
    }
}

/// Registered memory: readable and writable by the transport (and, for
/// regions m2n allocated, by peers).
///
/// While a write from this region is in flight (posted, completion not yet
/// seen), its bytes must not change; while a peer may write into it, the
/// protocol (credits) says who owns which bytes.
pub struct Region {
    id: RegionId,
    ptr: NonNull<u8>,
    len: usize,
    descriptor: Vec<u8>,
    /// Whether the bytes live in host memory (false for GPU memory).
    host: bool,
    /// For device memory on a transport that cannot read it (shm, tcp):
    /// the host stage the transport sends from, and how bytes get there.
    staging: Option<Arc<Staging>>,
    /// Keeps the memory (and its registration) alive.
    _mem: Arc<dyn LocalMemory>,
}

/// Device memory sent through a host stage: the transport sends the
/// stage's bytes; each send first copies the message's bytes from the
/// device to the stage (synchronously, or on the caller's stream).
pub(crate) struct Staging {
    /// The device address of the region's byte 0.
    pub(crate) device: u64,
    /// The stage's host address of byte 0.
    pub(crate) host: usize,
    /// Which streams can copy it (CUDA; host streams for simulated devices).
    pub(crate) kind: crate::proto::gate::StreamKind,
    /// Copies `len` bytes from device address `src` to host address `dst`, blocking.
    pub(crate) copy: StagingCopy,
    /// Undoes the stage's pinning when dropped.
    pub(crate) _pin: Option<Box<dyn Send + Sync>>,
}

/// A blocking device-to-host copy: (host destination, device source, length).
pub(crate) type StagingCopy = Box<dyn Fn(usize, u64, usize) -> Result<(), String> + Send + Sync>;

impl fmt::Debug for Staging {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Staging")
            .field("device", &format_args!("{:#x}", self.device))
            .field("kind", &self.kind)
            .finish()
    }
}

// SAFETY: the memory is owned through `_mem` (Send + Sync) and the handle
// hands out references only through `&self`/`&mut self` borrows.
unsafe impl Send for Region {}
// SAFETY: as above; shared access is read-only except through atomics.
unsafe impl Sync for Region {}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region")
            .field("id", &self.id)
            .field("len", &self.len)
            .finish()
    }
}

impl Region {
    pub fn id(&self) -> RegionId {
        self.id
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The portable blob a peer passes to [`Transport::import`] (empty for
    /// registered application memory, which peers cannot write).
    pub fn descriptor(&self) -> &[u8] {
        &self.descriptor
    }
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Whether the bytes are in host memory (GPU regions are not).
    pub fn is_host(&self) -> bool {
        self.host
    }

    /// Whether sends from this region copy it to a host stage first (GPU
    /// memory on the shm and tcp transports).
    pub fn is_staged(&self) -> bool {
        self.staging.is_some()
    }

    pub(crate) fn staging(&self) -> Option<&Arc<Staging>> {
        self.staging.as_ref()
    }

    /// This region (a host stage the transport sends from) as the view of
    /// the device memory it stages: `as_ptr` gives the device address.
    pub(crate) fn into_staged(mut self, staging: Staging) -> Region {
        self.ptr = NonNull::new(staging.device as *mut u8).unwrap_or(NonNull::dangling());
        self.host = false;
        self.staging = Some(Arc::new(staging));
        self
    }

    /// # Panics
    /// For GPU memory, which the host cannot read.
    pub fn as_slice(&self) -> &[u8] {
        assert!(self.host, "a GPU memory region has no host view");
        // SAFETY: valid for `len` bytes while `_mem` lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// # Panics
    /// For GPU memory, which the host cannot write.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        assert!(self.host, "a GPU memory region has no host view");
        // SAFETY: as above, and `&mut self` makes this the only borrow through the handle.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Reads an 8-byte word that peers write atomically (credits).
    pub fn load_u64(&self, offset: usize) -> u64 {
        assert!(
            offset.is_multiple_of(8) && offset + 8 <= self.len,
            "unaligned or out-of-range word {offset}"
        );
        // SAFETY: in range and 8-aligned (mappings are page-aligned); peers write it atomically.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(offset).cast()) }.load(Ordering::Acquire)
    }

    /// Writes an 8-byte word atomically (the source of a credit write).
    pub fn store_u64(&self, offset: usize, value: u64) {
        assert!(
            offset.is_multiple_of(8) && offset + 8 <= self.len,
            "unaligned or out-of-range word {offset}"
        );
        // SAFETY: in range and 8-aligned; concurrent readers use atomics too.
        unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(offset).cast()) }
            .store(value, Ordering::Release)
    }
}

/// One write to a peer's region.
#[derive(Debug, Clone, Copy)]
pub struct WriteRequest {
    pub local: RegionId,
    pub local_offset: usize,
    pub len: usize,
    pub remote: RemoteRegion,
    pub remote_offset: usize,
    /// With an immediate, the peer sees a [`Completion::Arrived`].
    pub imm: Option<u32>,
    /// Returned in [`Completion::WriteDone`] when `signaled`.
    pub wr_id: u64,
    pub signaled: bool,
}

#[cfg(test)]
impl WriteRequest {
    /// A signalled test write of `len` bytes from the start of `local` to
    /// `remote_offset` of `remote`.
    pub(crate) fn test(
        local: &Region,
        remote: RemoteRegion,
        remote_offset: usize,
        len: usize,
        imm: Option<u32>,
        wr_id: u64,
    ) -> Self {
        Self {
            local: local.id(),
            local_offset: 0,
            len,
            remote,
            remote_offset,
            imm,
            wr_id,
            signaled: true,
        }
    }
}

/// A credit offered to [`Transport::post_data`] to ride in a data write
/// to the same peer: one message instead of two.
#[derive(Debug, Clone, Copy)]
pub struct Rider<'a> {
    /// The credit: an unsignalled write without immediate, to the data
    /// lane's credit word (where it lands when it rides).
    pub req: &'a WriteRequest,
    /// Whether the caller would post it on the data lane anyway
    /// (piggybacked credits): it then rides wherever the transport can
    /// carry it. Otherwise only where leaving the ACK lane costs the
    /// credit nothing (see [`Transport::credit_rides`]).
    pub data_lane: bool,
}

/// What [`Transport::poll`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// A signalled local write finished; its source may be reused.
    WriteDone { wr_id: u64 },
    /// A peer's write with immediate landed in one of our regions.
    /// `peer` is [`PEER_IN_IMMEDIATE`] where the transport cannot tell
    /// (fabric): the immediate's sender index names the writer.
    Arrived { peer: usize, imm: u32, len: usize },
}

/// The `peer` of a [`Completion::Arrived`] whose transport does not know
/// the writer: libfabric 1.17's rxm reports no source address for remote
/// writes, so the immediate's sender index and channel are taken at their
/// word (a misrouted write is then not detected as such).
pub const PEER_IN_IMMEDIATE: usize = usize::MAX;

/// The transport contract (see the module docs).
///
/// Writes of exactly 8 bytes between 8-aligned offsets are single-copy
/// atomic: credits rely on it.
/// Work a transport has done since it was created: what costs time per
/// message on a NIC (work requests, doorbells, signalled completions,
/// completion-queue polls, receive posts). Transports without such
/// queues report zeros.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransportCounters {
    /// Work requests posted (writes, with or without immediate).
    pub work_requests: u64,
    /// Of those, sent inline.
    pub inline: u64,
    /// Of those, signalled (each produces a send completion).
    pub signaled: u64,
    /// Calls that rang a doorbell (`ibv_post_send`).
    pub doorbells: u64,
    /// Completion-queue polls (`ibv_poll_cq`), and the completions they returned.
    pub cq_polls: u64,
    pub completions: u64,
    /// Calls posting receives to the shared receive queue.
    pub recv_posts: u64,
}

impl TransportCounters {
    /// The names of [`values`](Self::values), in order.
    pub const FIELDS: [&'static str; 7] = [
        "work_requests",
        "inline",
        "signaled",
        "doorbells",
        "cq_polls",
        "completions",
        "recv_posts",
    ];

    /// Every counter, in the order of [`FIELDS`](Self::FIELDS).
    pub fn values(&self) -> [u64; 7] {
        [
            self.work_requests,
            self.inline,
            self.signaled,
            self.doorbells,
            self.cq_polls,
            self.completions,
            self.recv_posts,
        ]
    }

    /// `self - earlier`, field by field.
    pub fn since(&self, earlier: &TransportCounters) -> TransportCounters {
        TransportCounters {
            work_requests: self.work_requests - earlier.work_requests,
            inline: self.inline - earlier.inline,
            signaled: self.signaled - earlier.signaled,
            doorbells: self.doorbells - earlier.doorbells,
            cq_polls: self.cq_polls - earlier.cq_polls,
            completions: self.completions - earlier.completions,
            recv_posts: self.recv_posts - earlier.recv_posts,
        }
    }
}

pub trait Transport: Send + fmt::Debug {
    fn kind(&self) -> TransportKind;

    /// Work done so far (see [`TransportCounters`]).
    fn counters(&self) -> TransportCounters {
        TransportCounters::default()
    }

    /// What this endpoint runs on, for logs and benchmark headers (verbs:
    /// device, port, GID index and MTU).
    fn describe(&self) -> String {
        self.kind().name().to_string()
    }

    /// This endpoint's descriptor, for peers' [`connect`](Self::connect).
    fn endpoint(&self) -> Vec<u8>;

    /// Allocates and registers `len` bytes that peers can write into.
    fn alloc(&mut self, len: usize) -> Result<Region, TransportError>;

    /// Allocates a receive ring: as [`alloc`](Self::alloc), in the memory
    /// this transport delivers into (GPU memory for cuda-ipc).
    fn alloc_ring(&mut self, len: usize) -> Result<Region, TransportError> {
        self.alloc(len)
    }

    /// Allocates a receive ring in the memory of GPU `device`, written by
    /// peers directly (`M2N_GPU_RINGS=1`): verbs (GPUDirect RDMA) and
    /// cuda-ipc. shm and tcp deliver into host memory (mapped for kernels
    /// by the stream-ordered receive).
    fn alloc_gpu_ring(&mut self, len: usize, device: usize) -> Result<Region, TransportError> {
        let _ = (len, device);
        Err(TransportError::Unavailable(
            self.kind(),
            "GPU receive rings (M2N_GPU_RINGS=1) need verbs (GPUDirect RDMA) or cuda-ipc; this transport delivers into host memory, which stream-ordered receives map for kernels".into(),
        ))
    }

    /// Registers application memory as a source of writes (peers cannot
    /// write into it). Dropping the region deregisters it.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid for reads until the region is dropped
    /// and every write posted from it has completed.
    unsafe fn register(&mut self, ptr: *mut u8, len: usize) -> Result<Region, TransportError>;

    /// Registers GPU memory (a CUDA device pointer) as a source of writes.
    /// The region's bytes are not host-accessible.
    ///
    /// # Safety
    /// As [`register`](Self::register), for device memory.
    #[cfg(feature = "cuda")]
    unsafe fn register_device(&mut self, dptr: u64, len: usize) -> Result<Region, TransportError> {
        let _ = (dptr, len);
        Err(TransportError::Unavailable(
            self.kind(),
            "GPU memory needs the verbs transport (GPUDirect RDMA)".into(),
        ))
    }

    /// Connects to transport peer `peer` from its endpoint descriptor.
    fn connect(&mut self, peer: usize, endpoint: &[u8]) -> Result<(), TransportError>;

    /// Imports a region descriptor received from `peer`.
    fn import(&mut self, peer: usize, descriptor: &[u8]) -> Result<RemoteRegion, TransportError>;

    /// Whether `region` was registered with this transport (and not with
    /// another communicator's).
    fn owns(&self, region: RegionId) -> bool;

    /// Posts one write. Bounds are checked against both regions before a
    /// byte moves.
    ///
    /// # Safety
    /// The bytes `req.local_offset..+req.len` of the local region must not
    /// be modified until the write's completion (or, unsignalled, until a
    /// later signalled write on the same peer and lane completes).
    unsafe fn post_write(
        &mut self,
        peer: usize,
        lane: Lane,
        req: &WriteRequest,
    ) -> Result<(), TransportError>;

    /// Posts a data write, as [`post_write`](Self::post_write), with what
    /// the caller's pass knows beyond it:
    /// - `credit`: a credit due now to the same peer, which the transport
    ///   may carry inside this write (see [`Rider`]). Returns whether it
    ///   did; if not, the caller posts the credit itself.
    /// - `last`: the caller posts no more data writes in this pass, nor
    ///   credits on this lane but the one offered (which follows if it
    ///   does not ride and is for the data lane): a transport that holds
    ///   writes for one doorbell may send them now instead of at the
    ///   next poll.
    ///
    /// By default the data write is posted alone and the credit left to
    /// the caller.
    ///
    /// # Safety
    /// As [`post_write`](Self::post_write), for both writes.
    unsafe fn post_data(
        &mut self,
        peer: usize,
        lane: Lane,
        req: &WriteRequest,
        credit: Option<Rider<'_>>,
        last: bool,
    ) -> Result<bool, TransportError> {
        let _ = (credit, last);
        // SAFETY: the caller's contract.
        unsafe { self.post_write(peer, lane, req) }.map(|()| false)
    }

    /// Appends completions to `out`.
    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<(), TransportError>;

    /// Whether everything `peer` sent has been delivered, as far as the
    /// transport can tell (its connection is closed or there is none).
    /// Transports whose writes land synchronously always say yes.
    fn peer_drained(&self, _peer: usize) -> bool {
        true
    }

    /// Whether an unsignalled `len`-byte write to `peer` (a credit), posted
    /// now on the data lane, would ride in a data write to `peer` already
    /// queued there, and should: the transport then sends it inside that
    /// write instead of as a write of its own on the ACK lane, where that
    /// lane buys it no priority. No by default.
    fn credit_rides(&self, _peer: usize, _len: usize) -> bool {
        false
    }
}

/// Identifies this boot of this host, so processes on different hosts (or
/// in different kernels) never try to share memory.
pub fn host_identity() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Refuses a null pointer with a non-zero length (application memory to
/// register); a null pointer of length 0 is an empty region.
pub(crate) fn check_registrable(ptr: *mut u8, len: usize) -> Result<(), TransportError> {
    if ptr.is_null() && len > 0 {
        return Err(TransportError::os(
            "register",
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "null pointer with a non-zero length",
            ),
        ));
    }
    Ok(())
}

/// `Ok` when `peer` is a rank of this world (`closed` has one entry per
/// rank) whose connection is not closed: `NotConnected` for a rank out of
/// range, `PeerClosed` with the reason for a closed one.
#[cfg_attr(not(any(feature = "verbs", feature = "fabric")), allow(dead_code))]
#[inline]
pub(crate) fn check_open(closed: &[Option<String>], peer: usize) -> Result<(), TransportError> {
    match closed.get(peer) {
        None => Err(TransportError::NotConnected(peer)),
        Some(Some(reason)) => Err(TransportError::PeerClosed {
            peer,
            reason: reason.clone(),
        }),
        Some(None) => Ok(()),
    }
}

/// Checks `offset + len <= region_len` without overflow.
#[inline]
pub(crate) fn check_range(
    side: &'static str,
    peer: usize,
    offset: usize,
    len: usize,
    region_len: usize,
) -> Result<(), TransportError> {
    match offset.checked_add(len) {
        Some(end) if end <= region_len => Ok(()),
        _ => Err(TransportError::OutOfBounds {
            side,
            peer,
            offset,
            len,
            region_len,
        }),
    }
}
