//! The fabric backend: m2n over libfabric (`M2N_TRANSPORT=fabric`).
//!
//! The same one-sided protocol as verbs, on the API that AWS EFA, HPE
//! Slingshot and the rest of the OFI world speak. Each process opens one
//! reliable datagram endpoint (`FI_EP_RDM`) per lane, so credits travel
//! apart from data and can ask for their own traffic class (`FI_TC_*`).
//! Peers write to the data lane's endpoint, so that a connection-oriented
//! provider carries a ping-pong both ways on one connection (net: one TCP
//! stream, whose acknowledgements then ride on the replies), except over
//! rxm (tcp and verbs), where a third endpoint only receives ([`Receiver`]);
//! all share one address vector and one completion queue. Receive rings
//! are memory regions with `FI_REMOTE_WRITE`; each message is one RMA
//! write carrying 64 bits of remote CQ data (`fi_writemsg` with
//! `FI_REMOTE_CQ_DATA`, the general form of `fi_writedata`, so that each
//! write can also say `FI_INJECT` and whether it wants a completion), which
//! the receiver reads from its queue exactly where verbs reads the
//! immediate. Two things verbs' completion says, libfabric 1.17's rxm
//! (the layer under tcp and verbs) does not: the writer (it reports no
//! source address for remote writes) and the length (it reports 0). The
//! immediate names the writer ([`PEER_IN_IMMEDIATE`](super::PEER_IN_IMMEDIATE)),
//! and the length rides in the CQ data's upper half where the provider
//! carries 64 bits of it (tcp, net, shm and efa). rxm over verbs carries
//! the 32 of an immediate: there each write goes without CQ data and a
//! 16-byte message with the same 64 bits and the written region's key
//! follows it on the same endpoint, ordered after it (`FI_ORDER_SAW`), into
//! buffers the receiver keeps posted (`M2N_FI_NOTIFY`: `auto` picks per
//! provider).
//!
//! Region keys start at a random number per process: over net and tcp an
//! address is an IP and a port, which a process of another job may get
//! once its owner died, while the dead peer's writers still write there
//! (the provider reconnects). Their writes name keys not registered here,
//! so the provider refuses them, and a notice naming none of this
//! process's regions is let go.
//!
//! Writes posted between two polls go out per endpoint as one train, all
//! but the last flagged `FI_MORE` (the doorbell batching of verbs); the
//! last data write of the communicator's pass
//! ([`Transport::post_data`]) sends the train at once, or, where it has
//! its lane to itself, goes alone (one call into the provider, on the
//! round trip's path). A credit offered with a data write, or queued
//! behind one to the same peer, rides in it (one `fi_writemsg` naming
//! both ranges, where the provider takes two: net, tcp and shm do), so
//! that piggybacked credits cost no message of their own.
//! Only writes too large to inject ask for a completion
//! (`FI_SELECTIVE_COMPLETION`), each with its own context from a fixed
//! table, so a round allocates nothing; an injected write the caller waits
//! for is done once the provider has taken it.
//!
//! Peers' addresses come through m2n's rendezvous (`fi_getname`, then
//! `fi_av_insert`). `M2N_FI_PROVIDER` picks the provider; by default it is
//! the first `fi_getinfo` ranks among those with what m2n needs.

// bindgen types the header's constants by their values (u32 or u64), which
// may differ between libfabric versions: every use casts to the field's type.
#![allow(clippy::unnecessary_cast)]

pub(crate) mod fi;

use std::sync::Arc;

use m2n_fabric_sys as sys;

use super::segment::PrivateMemory;
use super::{
    Completion, Lane, LocalMemory, LocalRegions, Region, RegionId, RemoteRegion, Rider, Transport,
    TransportCounters, TransportError, TransportKind, WriteRequest,
};
use crate::codec::{DecodeError, Reader, Writer};
use fi::{Av, Cq, Domain, Ep, Fabric, FiError, Info, Mr, Wants};

const ENDPOINT_MAGIC: u32 = 0x4d32_4e46; // "M2NF"
const REGION_MAGIC: u32 = 0x4d32_4e4b; // "M2NK"
/// Longest raw endpoint address accepted from a peer (EFA's is 32 bytes,
/// an IPv6 socket address 28).
pub const MAX_NAME: usize = 256;
/// Longest provider name accepted from a peer.
pub const MAX_PROVIDER: usize = 128;
/// Writes queued per lane before a post has to wait for the provider.
const MAX_BATCH: usize = 64;
/// A train is sent once it holds this many writes, without waiting for a poll.
const FLUSH_AT: usize = 16;
/// No completion context (an injected write nobody waits for).
const NO_SLOT: u32 = u32::MAX;
/// The most bytes of writes to a peer, in flight or queued, that a credit
/// riding in a data write to it may queue behind (see
/// [`FabricTransport::ride_acks`]).
const RIDE_BEHIND: usize = 16 << 10;

/// Settings of the fabric transport (`M2N_FI_*`).
pub use super::options::FabricConfig as FabricOptions;
use super::options::{CreditRide, Notify};

/// Whether `provider`'s traffic classes stay on the host (`net` and `tcp`
/// use them only to choose `TCP_NODELAY`, `shm` has no wire): the ACK
/// lane's own endpoint then buys credits no priority.
fn classes_stay_on_host(provider: &str) -> bool {
    matches!(
        provider.split(';').next(),
        Some("net" | "tcp" | "shm" | "sockets" | "udp")
    )
}

/// Whether `provider`'s lanes share one endpoint. Over shm they do: it
/// has no wire and no connections, and a write from either of two
/// endpoints lands in the same command queue of the peer's region, in the
/// order of the calls, so a second endpoint buys the ACK lane nothing.
/// It would cost every read of the completion queue: the provider
/// progresses each endpoint bound to it (one endpoint: an average provider
/// call 97-102 ns instead of 106-110, the round trip 2-3% shorter at 8
/// and 64 B in 30 interleaved pairs). Elsewhere the ACK lane's endpoint
/// has its own traffic class on the wire (verbs) or its own connection,
/// which data does not hold up (net, tcp).
fn lanes_share_an_endpoint(provider: &str) -> bool {
    provider.split(';').next() == Some("shm")
}

/// The endpoint peers write to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Receiver {
    /// The data lane's: a ping-pong goes both ways on one connection.
    DataLane,
    /// One that only receives, so that each pair of endpoints is connected
    /// from one side only: libfabric 1.17's rxm (under tcp and verbs)
    /// crashes on some simultaneous connects. net has its own connection
    /// manager, which settles them; shm and efa have no connections.
    Own,
}

impl Receiver {
    fn of(provider: &str) -> Self {
        if provider.split(';').any(|layer| layer == "ofi_rxm") {
            Receiver::Own
        } else {
            Receiver::DataLane
        }
    }
}

/// The exit status of a process whose libfabric call never returned.
pub const STUCK_EXIT_CODE: i32 = 70;

/// The watchdog's last resort, for a call the escape signal did not break
/// off: says why on stderr and exits at once, without running exit
/// handlers (libfabric's own would wait on the same lock).
fn exit_stuck(provider: String) -> watchdog::OnStuck {
    Box::new(move |for_| {
        eprintln!(
            "m2n: fabric transport (provider {provider}): a libfabric call has not returned in \
             {for_:?}, even after the escape signal (another handler of signal SIGRTMAX-4?): \
             a peer that died or stopped inside the provider (shm: holding the spinlock of a \
             shared region) leaves its peers spinning there, out of reach of m2n's peer \
             timeout; exiting with status {STUCK_EXIT_CODE} (M2N_FI_STUCK_MS)"
        );
        // SAFETY: _exit ends the process at once; nothing runs after it.
        unsafe { libc::_exit(STUCK_EXIT_CODE) }
    })
}

fn fi_err(e: FiError) -> TransportError {
    if e.is_broken_off() {
        return stuck(None);
    }
    TransportError::os(e.to_string(), std::io::Error::other("libfabric"))
}

/// The error of every call on a transport whose provider was left wedged
/// (`peer`: the one a write to which was broken off).
fn stuck(peer: Option<usize>) -> TransportError {
    let what = match peer {
        Some(p) => format!("a write to peer {p}"),
        None => "a libfabric call".into(),
    };
    TransportError::Stuck {
        peer,
        detail: format!(
            "{what} never returned and was broken off by the watchdog (M2N_FI_STUCK_MS): a \
             process that died or stopped inside the provider (shm: holding the spinlock of a \
             shared region) left it spinning; the provider's state is abandoned and this \
             transport makes no more calls"
        ),
    }
}

fn unavailable(why: String) -> TransportError {
    TransportError::Unavailable(TransportKind::Fabric, why)
}

/// What m2n needs of a provider, as `fi_getinfo` hints.
fn wants(opts: &FabricOptions, hmem: bool) -> Wants {
    // Messages too: the notices that follow writes where the provider has
    // too little remote CQ data (see `Notify::Message`).
    let mut caps = sys::FI_RMA as u64
        | sys::FI_WRITE as u64
        | sys::FI_REMOTE_WRITE as u64
        | sys::FI_MSG as u64
        | sys::FI_SEND as u64
        | sys::FI_RECV as u64;
    let mut mr_mode =
        sys::FI_MR_LOCAL | sys::FI_MR_VIRT_ADDR | sys::FI_MR_ALLOCATED | sys::FI_MR_PROV_KEY;
    if hmem {
        caps |= sys::FI_HMEM;
        mr_mode |= sys::FI_MR_HMEM;
    }
    Wants {
        provider: opts.provider.clone(),
        domain: opts.domain.clone(),
        caps,
        mr_mode,
        // Writes from one rank to another land in order (the receiver
        // expects rounds in order, and a credit never overtakes a newer one).
        msg_order: sys::FI_ORDER_WAW as u64,
    }
}

/// The provider `opts` names or, by default, the best `fi_getinfo` offers
/// with a way to notify writes (`opts.notify`: 8 bytes of remote CQ data,
/// or messages ordered after writes) and keys of at most 64 bits; and the
/// way it notifies.
fn choose(opts: &FabricOptions, hmem: bool) -> Result<(Info, Notify), TransportError> {
    sys::library().map_err(unavailable)?;
    let hints = Info::hints(&wants(opts, hmem)).map_err(fi_err)?;
    let what = match &opts.provider {
        Some(p) => format!("provider {p:?}"),
        None => "any provider".into(),
    };
    let list = match Info::get(&hints) {
        Ok(list) => list,
        Err(e) if e.code == sys::FI_ENODATA as i32 => {
            return Err(unavailable(format!(
                "{what}{}: no reliable datagram endpoint (FI_EP_RDM) with RMA writes and \
                 ordered writes (FI_ORDER_WAW){} (`fi_info -l` lists the installed providers)",
                opts.domain
                    .as_ref()
                    .map(|d| format!(" on domain {d:?}"))
                    .unwrap_or_default(),
                if hmem { " and FI_HMEM" } else { "" },
            )))
        }
        Err(e) => return Err(unavailable(format!("{what}: {e}"))),
    };
    let mut refused = Vec::new();
    for e in list.entries() {
        // SAFETY: the domain attributes of a fi_getinfo result.
        let (dom, tx) = unsafe { (&*e.domain_attr, &*e.tx_attr) };
        let name = fi::prov_name(e);
        let cq_data = dom.cq_data_size >= 8;
        let saw = tx.msg_order & sys::FI_ORDER_SAW as u64 != 0;
        let notify = match opts.notify {
            Notify::Auto | Notify::CqData if cq_data => Some(Notify::CqData),
            Notify::Auto | Notify::Message if saw => Some(Notify::Message),
            _ => None,
        };
        if opts.provider.is_none() && passed_over(e) {
            refused.push(format!(
                "{name}: passed over by default in libfabric before 1.18 (name it to use it)"
            ));
            continue;
        }
        let Some(notify) = notify else {
            let data = format!(
                "{} bytes of remote CQ data (cq-data needs 8: the immediate and the length, \
                 which providers do not all report)",
                dom.cq_data_size
            );
            let order = "no sends ordered after writes (message needs FI_ORDER_SAW)";
            refused.push(match opts.notify {
                Notify::CqData => format!("{name}: {data} (M2N_FI_NOTIFY=cq-data)"),
                Notify::Message => format!("{name}: {order} (M2N_FI_NOTIFY=message)"),
                Notify::Auto => format!("{name}: {data}, and {order}"),
            });
            continue;
        };
        if dom.mr_key_size > 8 {
            refused.push(format!("{name}: {}-byte memory keys", dom.mr_key_size));
        } else if e.src_addrlen > MAX_NAME {
            refused.push(format!("{name}: {}-byte addresses", e.src_addrlen));
        } else {
            return Ok((Info::dup(e).map_err(fi_err)?, notify));
        }
    }
    Err(unavailable(format!(
        "{what}: every match falls short of m2n's needs: {}",
        refused.join("; ")
    )))
}

/// The source address for shm endpoints: `fi_shm://m2n-PID-TOKEN`, which
/// the provider turns into the names of its files in /dev/shm (adding the
/// uid and an endpoint index). Its default, `fi_shm://PID`, collides with
/// the files a killed process left behind (no signal handler runs on
/// SIGKILL) once the pid is reused: libfabric 1.17 then fails `fi_enable`
/// with EBUSY, since the stale region names a live pid (this process).
fn shm_endpoint_name() -> Result<String, TransportError> {
    Ok(format!(
        "fi_shm://m2n-{}-{:016x}",
        std::process::id(),
        random_u64()?
    ))
}

fn random_u64() -> Result<u64, TransportError> {
    let mut token = [0u8; 8];
    getrandom::getrandom(&mut token)
        .map_err(|e| TransportError::os("getrandom", std::io::Error::other(e.to_string())))?;
    Ok(u64::from_le_bytes(token))
}

/// A peer's shm provider files, found by the stem of the name
/// [`shm_endpoint_name`] gave it (`m2n-PID-TOKEN`). A killed process cannot
/// remove its files (the provider's handlers run only for signals that can
/// be caught), so survivors remove those of peers that died when they close:
/// each is 16 MiB or more of memory in tmpfs.
#[derive(Debug, Clone, PartialEq)]
struct ShmFiles {
    pid: i32,
    stem: String,
}

impl ShmFiles {
    /// The files behind a peer's address, if it is one m2n named; anything
    /// else a peer sends is ignored (it never names a path here).
    fn of(address: &[u8]) -> Option<ShmFiles> {
        let text = std::str::from_utf8(address).ok()?.trim_end_matches('\0');
        let start = text.find("m2n-")?;
        let stem = text[start..].split(':').next()?;
        let (pid, token) = stem["m2n-".len()..].split_once('-')?;
        let token_ok = token.len() == 16 && token.bytes().all(|b| b.is_ascii_hexdigit());
        let pid = pid
            .parse::<i32>()
            .ok()
            .filter(|_| pid.bytes().all(|b| b.is_ascii_digit()))?;
        (token_ok && pid > 0).then(|| ShmFiles {
            pid,
            stem: stem.to_string(),
        })
    }

    /// Whether the process is gone: no such pid, or a zombie its parent
    /// has not reaped yet.
    fn process_is_dead(&self) -> bool {
        if let Err(nix::errno::Errno::ESRCH) =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), None)
        {
            return true;
        }
        // The state follows the command name's closing parenthesis.
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).is_ok_and(|stat| {
            let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
            matches!(state.and_then(|s| s.chars().next()), Some('Z' | 'X'))
        })
    }

    /// Removes the files if their process has died.
    fn remove_if_dead(&self) {
        if !self.process_is_dead() {
            return;
        }
        let Ok(dir) = std::fs::read_dir("/dev/shm") else {
            return;
        };
        let prefix = format!("{}:", self.stem);
        for entry in dir.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// The error of a registration of GPU `gpu`'s memory that the provider
/// answered with `FI_ENOSYS`: libfabric's CUDA support is not initialised
/// (its `fi_mr_regattr` checks that first), because it was built without it
/// or found no CUDA runtime. Debian's libfabric1 is built without CUDA, and
/// advertises FI_HMEM all the same.
fn no_cuda_registration(provider: &str, gpu: i32) -> TransportError {
    // SAFETY: fi_version() has no preconditions.
    let version = unsafe { fi::lib().fi_version() };
    unavailable(format!(
        "{provider} cannot register memory of GPU {gpu} (fi_mr_regattr: FI_ENOSYS): the CUDA \
         support of libfabric {}.{} is not initialised; it was built without CUDA (as Debian's \
         libfabric1 is) or found no CUDA runtime. GPU memory over fabric needs a libfabric \
         built --with-cuda, such as the EFA installer's",
        version >> 16,
        version & 0xffff
    ))
}

/// Stacks the default passes over: in libfabric before 1.18, rxm over tcp
/// crashes (SIGSEGV in `rxm_handle_comp_error`) when two ranks connect to
/// each other at once or a peer dies; `net`, the native reliable datagram
/// tcp provider of 1.17 (called `tcp` from 1.18), does neither. Named
/// explicitly (`M2N_FI_PROVIDER=tcp`), rxm over tcp is still used.
fn passed_over(e: &sys::fi_info) -> bool {
    // SAFETY: fi_version() has no preconditions.
    let version = unsafe { fi::lib().fi_version() };
    version < sys::fi_version_of(1, 18) && fi::prov_name(e) == "tcp;ofi_rxm"
}

/// Whether libfabric offers m2n a provider under `opts`, and which
/// (`tcp;ofi_rxm on fabric 127.0.0.1/32, domain lo`).
pub fn probe(opts: &FabricOptions) -> Result<String, TransportError> {
    let (info, notify) = choose(opts, false)?;
    let (fabric, domain) = fi::fabric_domain(info.get_ref());
    Ok(format!(
        "{} on fabric {fabric}, domain {domain}{}",
        fi::prov_name(info.get_ref()),
        if notify == Notify::Message {
            ", notices by message"
        } else {
            ""
        }
    ))
}

/// Memory of a fabric region: its bytes and their registration.
#[derive(Debug)]
struct FabricMemory {
    base: *mut u8,
    len: usize,
    /// `None` for an empty region (nothing to register).
    _mr: Option<Mr>,
    /// The memory, when the transport allocated it (dropped after the MR).
    _owner: Option<Box<dyn std::fmt::Debug + Send + Sync>>,
    device: bool,
}

// SAFETY: plain memory plus a registration of a thread-safe domain.
unsafe impl Send for FabricMemory {}
// SAFETY: as above.
unsafe impl Sync for FabricMemory {}

impl LocalMemory for FabricMemory {
    fn base(&self) -> *mut u8 {
        self.base
    }
    fn len(&self) -> usize {
        self.len
    }
    fn is_device(&self) -> bool {
        self.device
    }
    fn desc(&self) -> usize {
        self._mr.as_ref().map_or(0, |mr| mr.desc() as usize)
    }
}

/// A write waiting for its completion.
#[derive(Debug)]
struct InFlight {
    user_wr_id: u64,
    report: bool,
    peer: usize,
    /// The write's bytes (see [`Contexts::bytes_to`]).
    len: usize,
    _keep: Arc<dyn LocalMemory>,
    /// The source of a credit that rides in this write.
    _rider: Option<Arc<dyn LocalMemory>>,
}

/// One range of a write: the local bytes and where they go.
#[derive(Debug, Clone, Copy)]
struct Range {
    local: usize,
    len: usize,
    desc: usize,
    remote_addr: u64,
    key: u64,
}

/// A write queued for the next train of its lane.
#[derive(Debug, Clone, Copy)]
struct Pending {
    peer: usize,
    dest: sys::fi_addr_t,
    /// The data's bytes and where they go.
    range: Range,
    data: u64,
    flags: u64,
    slot: u32,
    /// An injected write the caller waits for: its `WriteDone`, reported
    /// as soon as the provider has taken it (and with it a copy of the
    /// bytes), since a completion from the provider would say no more.
    done_at_post: Option<u64>,
    /// Message mode: the write is posted, its notice not yet.
    written: bool,
    /// A credit posted inside this write, as its first range (see
    /// [`FabricTransport::carrier`]).
    rider: Option<Range>,
}

/// The index in `table` of the context at `p`, if `p` is one of them (a
/// completion's `op_context`: ours, or the provider's own).
fn context_index(table: &[sys::fi_context2], p: *mut libc::c_void) -> Option<usize> {
    let size = std::mem::size_of::<sys::fi_context2>();
    let off = (p as usize).checked_sub(table.as_ptr() as usize)?;
    (off % size == 0 && off / size < table.len()).then_some(off / size)
}

/// Completion contexts: one per write that asks for a completion, at a
/// fixed address until it is read back (providers with `FI_CONTEXT` mode
/// keep their state in it).
struct Contexts {
    ctx: Box<[sys::fi_context2]>,
    ops: Vec<Option<InFlight>>,
    free: Vec<u32>,
    /// Bytes of the writes to each peer that hold a context (queued or
    /// posted, not yet complete): what a credit riding in a new write to
    /// that peer may queue behind.
    bytes_to: Vec<usize>,
    /// The context of writes without completion.
    spare: Box<sys::fi_context2>,
}

// SAFETY: the contexts are plain memory the provider writes only while a
// call on this transport runs or before their completion is read.
unsafe impl Send for Contexts {}

impl std::fmt::Debug for Contexts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Contexts({} in flight)",
            self.ctx.len() - self.free.len()
        )
    }
}

impl Contexts {
    fn new(n: usize, peers: usize) -> Self {
        Self {
            ctx: (0..n).map(|_| sys::fi_context2::default()).collect(),
            ops: (0..n).map(|_| None).collect(),
            free: (0..n as u32).rev().collect(),
            bytes_to: vec![0; peers],
            spare: Box::default(),
        }
    }

    fn ptr(&mut self, slot: u32) -> *mut libc::c_void {
        if slot == NO_SLOT {
            return (&mut *self.spare as *mut sys::fi_context2).cast();
        }
        (&mut self.ctx[slot as usize] as *mut sys::fi_context2).cast()
    }

    /// The slot whose context is at `p`, if it is one of ours.
    fn slot_of(&self, p: *mut libc::c_void) -> Option<usize> {
        context_index(&self.ctx, p)
    }

    /// A free slot for `op`, or `None` when all are in flight.
    fn claim(&mut self, op: InFlight) -> Option<u32> {
        let slot = self.free.pop()?;
        self.bytes_to[op.peer] += op.len;
        self.ops[slot as usize] = Some(op);
        Some(slot)
    }

    /// Keeps `source` alive as long as the write of `slot`: the source of
    /// a credit that rides in it, read by the provider until it completes.
    fn keep_rider(&mut self, slot: u32, source: Arc<dyn LocalMemory>) {
        if let Some(Some(op)) = self.ops.get_mut(slot as usize) {
            op._rider = Some(source);
        }
    }

    fn release(&mut self, slot: usize) -> Option<InFlight> {
        let op = self.ops[slot].take();
        if let Some(op) = &op {
            self.free.push(slot as u32);
            self.bytes_to[op.peer] -= op.len;
        }
        op
    }
}

/// Notices posted at once on the receiving endpoint (message mode).
/// More in flight than this wait in the provider (rxm keeps unexpected
/// messages) until a buffer is reposted.
const NOTICE_BUFFERS: usize = 256;
/// The bytes of a notice.
const NOTICE_BYTES: usize = std::mem::size_of::<Notice>();

/// A notice: the write's 64 bits of CQ data, and the key of the region it
/// wrote (the receiver lets go of one that names none of its regions: a
/// write meant for another process, see [`FabricTransport::next_key`]).
type Notice = [u64; 2];

/// Message mode's receive side: buffers posted on the receiving endpoint
/// for the notices that follow writes, each with its own context; a buffer
/// is reposted as soon as its notice is read.
struct Notices {
    buf: Box<[Notice]>,
    ctx: Box<[sys::fi_context2]>,
    /// The buffers' registration, where the provider wants one for local
    /// memory (`FI_MR_LOCAL`).
    mr: Option<Mr>,
    /// Buffers the provider could not take back yet.
    repost: Vec<usize>,
}

// SAFETY: plain memory the provider writes only while a call on the
// owning transport runs.
unsafe impl Send for Notices {}

impl std::fmt::Debug for Notices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Notices({} buffers)", self.buf.len())
    }
}

impl Notices {
    /// Registers the buffers (where the provider asks) and posts them all
    /// on `ep`.
    /// Registers the buffers with key `local_mr` where the provider asks.
    fn post(
        domain: &Arc<Domain>,
        ep: &Ep,
        local_mr: Option<u64>,
    ) -> Result<Notices, TransportError> {
        let mut buf = vec![[0u64; 2]; NOTICE_BUFFERS].into_boxed_slice();
        let mr = if let Some(key) = local_mr {
            let len = std::mem::size_of_val(&*buf);
            // SAFETY: the buffers live (boxed, never moved) as long as the
            // registration, which is a field of the same struct.
            let mr = unsafe {
                domain.register(buf.as_mut_ptr().cast(), len, sys::FI_RECV as u64, key, None)
            };
            Some(mr.map_err(fi_err)?)
        } else {
            None
        };
        let mut n = Notices {
            buf,
            ctx: (0..NOTICE_BUFFERS)
                .map(|_| sys::fi_context2::default())
                .collect(),
            mr,
            repost: Vec::new(),
        };
        for i in 0..NOTICE_BUFFERS {
            n.post_one(ep, i).map_err(fi_err)?;
        }
        Ok(n)
    }

    fn post_one(&mut self, ep: &Ep, i: usize) -> Result<(), FiError> {
        let iov = libc::iovec {
            iov_base: (&mut self.buf[i] as *mut Notice).cast(),
            iov_len: NOTICE_BYTES,
        };
        let mut desc = self.mr.as_ref().map_or(std::ptr::null_mut(), Mr::desc);
        let msg = sys::fi_msg {
            msg_iov: &iov,
            desc: &mut desc,
            iov_count: 1,
            addr: fi::ADDR_UNSPEC,
            context: (&mut self.ctx[i] as *mut sys::fi_context2).cast(),
            data: 0,
        };
        // SAFETY: the buffer and its context are boxed in self, which the
        // transport drops only after the endpoint (cancelling the receive).
        unsafe { ep.recv_msg(&msg, sys::FI_COMPLETION as u64) }
    }

    /// The buffer whose context is at `p`, if it is one of these.
    fn index_of(&self, p: *mut libc::c_void) -> Option<usize> {
        context_index(&self.ctx, p)
    }

    /// Reads notice `i` (its completion read) and reposts its buffer, or
    /// queues the repost when the provider cannot take it now.
    fn take(&mut self, ep: &Ep, i: usize) -> Result<Notice, FiError> {
        // SAFETY: an aligned notice in self; the provider wrote it before
        // the completion that named it was read.
        let data = unsafe { std::ptr::read_volatile(&self.buf[i]) };
        match self.post_one(ep, i) {
            Err(e) if e.is_again() => self.repost.push(i),
            other => other?,
        }
        Ok(data)
    }

    /// Retries the reposts the provider refused for now.
    fn retry(&mut self, ep: &Ep) -> Result<(), FiError> {
        while let Some(&i) = self.repost.last() {
            match self.post_one(ep, i) {
                Err(e) if e.is_again() => return Ok(()),
                other => other?,
            }
            self.repost.pop();
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct Imported {
    peer: usize,
    addr: u64,
    key: u64,
}

/// What a peer needs to reach this process: the provider (both sides must
/// run the same) and the raw address of its receiving endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub provider: String,
    pub address: Vec<u8>,
}

impl Endpoint {
    pub fn encode(&self) -> Vec<u8> {
        Writer::new()
            .u32(ENDPOINT_MAGIC)
            .bytes(self.provider.as_bytes())
            .bytes(&self.address)
            .finish()
    }

    /// Decodes a peer's endpoint; it must run `provider`, and its address
    /// (of the provider's format, up to [`MAX_NAME`] bytes) must not be empty.
    pub fn decode(blob: &[u8], provider: &str) -> Result<Endpoint, DecodeError> {
        let mut r = Reader::new(blob);
        r.magic("fabric endpoint magic", ENDPOINT_MAGIC, "a fabric endpoint")?;
        let prov = r.bytes("provider", MAX_PROVIDER)?;
        let prov = std::str::from_utf8(prov).map_err(|_| DecodeError::Invalid {
            field: "provider",
            detail: "not UTF-8".into(),
        })?;
        if prov != provider {
            return Err(DecodeError::Invalid {
                field: "provider",
                detail: format!("peer runs {prov:?}, this process {provider:?}"),
            });
        }
        let address = r.bytes("address", MAX_NAME)?.to_vec();
        if address.is_empty() {
            return Err(DecodeError::Invalid {
                field: "address",
                detail: "empty".into(),
            });
        }
        r.finish()?;
        Ok(Endpoint {
            provider: prov.to_string(),
            address,
        })
    }
}

/// A region a peer may write: its address in the provider's terms (the
/// virtual address with `FI_MR_VIRT_ADDR`, else 0) and its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionDescriptor {
    pub addr: u64,
    pub key: u64,
    pub len: usize,
}

impl RegionDescriptor {
    pub fn encode(&self) -> Vec<u8> {
        Writer::new()
            .u32(REGION_MAGIC)
            .u64(self.addr)
            .u64(self.key)
            .u64(self.len as u64)
            .finish()
    }

    pub fn decode(blob: &[u8]) -> Result<RegionDescriptor, DecodeError> {
        let mut r = Reader::new(blob);
        r.magic(
            "fabric region magic",
            REGION_MAGIC,
            "a fabric region descriptor",
        )?;
        let addr = r.u64("address")?;
        let key = r.u64("key")?;
        let len = r.len_from("length", addr)?;
        r.finish()?;
        Ok(RegionDescriptor { addr, key, len })
    }
}

fn lane_index(lane: Lane) -> usize {
    match lane {
        Lane::Data => 0,
        Lane::Ack => 1,
    }
}

/// The fabric transport of one process.
#[derive(Debug)]
pub struct FabricTransport {
    me: usize,
    world: usize,
    provider: String,
    fabric_name: String,
    domain_name: String,
    opts: FabricOptions,
    domain: Arc<Domain>,
    cq: Arc<Cq>,
    av: Arc<Av>,
    /// The data lane's and the ACK lane's endpoints (one for both where
    /// they share it, see [`lanes_share_an_endpoint`]), and over rxm one
    /// more that only receives.
    eps: Vec<Ep>,
    /// Per lane (`lane_index`), its endpoint in `eps`.
    lane_ep: [usize; 2],
    /// Which of `eps` peers write to.
    rx: usize,
    /// Message mode's posted notice buffers (after `eps`: the endpoints
    /// close, cancelling the receives, before the buffers go).
    notices: Option<Notices>,
    /// The receiving endpoint's address.
    name: Vec<u8>,
    /// Per peer, the fabric address of its receiving endpoint.
    addrs: Vec<sys::fi_addr_t>,
    /// Per peer over shm, its files (removed at close if it died).
    shm_files: Vec<Option<ShmFiles>>,
    /// Over shm, the stem of this transport's endpoint names, by which
    /// [`linger`] knows it.
    shm_stem: Option<String>,
    virt_addr: bool,
    /// The key of the next region. The first is random: over net and tcp an address is an IP and a port, which a new
    /// process (of another job) may get once its owner died, while the
    /// dead peer's writers still write to it (the provider reconnects).
    /// Their writes name the dead peer's regions: with keys that count
    /// from one, the region of the same rank here, which such a write
    /// would corrupt. A random key names none here, and the provider
    /// refuses the write.
    next_key: u64,
    /// The keys' width (`mr_key_size`) as a mask.
    key_mask: u64,
    /// The keys of the regions peers write to (a notice naming another
    /// is let go).
    remote_keys: Vec<u64>,
    inject_size: usize,
    /// A write may name two local and two remote ranges (the provider's
    /// `iov_limit` and `rma_iov_limit`): a credit then rides in the data
    /// write it is queued behind.
    two_ranges: bool,
    /// A credit may leave the ACK lane to ride in a data write to the same
    /// peer (see [`Transport::credit_rides`]), where that lane's own
    /// endpoint buys it no priority (`M2N_FI_CREDIT_RIDE`).
    ride_acks: bool,
    /// Why GPU memory cannot be registered (no GPU, or no provider with
    /// FI_HMEM); `None` where it can (FI_HMEM).
    no_hmem: Option<String>,
    locals: LocalRegions,
    imports: Vec<Imported>,
    closed: Vec<Option<String>>,
    contexts: Contexts,
    batch: [Vec<Pending>; 2],
    done: Vec<Completion>,
    entries: Vec<sys::fi_cq_data_entry>,
    counters: TransportCounters,
    /// Breaks off a call into the provider that never returns (or, as a
    /// last resort, exits the process). Boxed: it is lent out of `self`
    /// for each call into the provider (see `watched`), and moving a
    /// pointer in and out cost fewer instructions than moving the watchdog.
    watchdog: Option<Box<watchdog::Watchdog>>,
    /// The peer a write to which was broken off (the provider is wedged).
    stuck_writing_to: Option<usize>,
    _fabric: Arc<Fabric>,
    _info: Info,
}

// SAFETY: every libfabric object is of a FI_THREAD_SAFE domain; the raw
// pointers in the completion entries are plain data.
unsafe impl Send for FabricTransport {}

/// What a transport over shm leaves to [`linger`] at its close: its
/// endpoints, then (closed after them) the notice buffers they may hold
/// and the sources of its writes still in flight, which a receiver over
/// shm may read after the post.
struct Parked {
    _eps: Vec<Ep>,
    _notices: Option<Notices>,
    _contexts: Contexts,
}

impl Drop for FabricTransport {
    fn drop(&mut self) {
        for files in self.shm_files.iter().flatten() {
            files.remove_if_dead();
        }
        if let Some(stem) = self.shm_stem.take() {
            let parked = Parked {
                _eps: std::mem::take(&mut self.eps),
                _notices: self.notices.take(),
                _contexts: std::mem::replace(&mut self.contexts, Contexts::new(0, 0)),
            };
            linger::closed(&stem, Box::new(parked));
        }
    }
}

impl FabricTransport {
    pub fn new(me: usize, world: usize, opts: FabricOptions) -> Result<Self, TransportError> {
        // Device memory registration (FI_HMEM) is asked for only where a
        // GPU is present: providers may pick slower paths for it.
        #[cfg(feature = "cuda")]
        let gpu = crate::gpu::init().map(drop).map_err(|e| e.to_string());
        #[cfg(not(feature = "cuda"))]
        let gpu: Result<(), String> = Err("m2n was built without the cuda feature".into());
        let ((info, notify), no_hmem) = match gpu {
            Ok(()) => match choose(&opts, true) {
                Ok(chosen) => (chosen, None),
                Err(e) => (choose(&opts, false)?, Some(format!("with FI_HMEM, {e}"))),
            },
            Err(e) => (
                choose(&opts, false)?,
                Some(format!(
                    "FI_HMEM is asked of a provider only where a GPU is present: {e}"
                )),
            ),
        };
        let e = info.get_ref();
        let provider = fi::prov_name(e);
        let (fabric_name, domain_name) = fi::fabric_domain(e);
        // SAFETY: attribute structs of a fi_getinfo result.
        let (dom, tx) = unsafe { (&*e.domain_attr, &*e.tx_attr) };
        let (mr_mode, inject_size) = (dom.mr_mode as u32, tx.inject_size);
        let two_ranges = tx.iov_limit >= 2 && tx.rma_iov_limit >= 2;
        let fabric = Fabric::open(&info).map_err(fi_err)?;
        let domain = Domain::open(&fabric, &info).map_err(fi_err)?;
        let cq = Cq::open(&domain, 2 * opts.tx_depth + 4096).map_err(fi_err)?;
        let av = Av::open(&domain, 2 * world).map_err(fi_err)?;
        let shm_name = (provider == "shm").then(shm_endpoint_name).transpose()?;
        let open = |class: super::options::TrafficClass| -> Result<Ep, TransportError> {
            let lane_info = Info::dup(info.get_ref()).map_err(fi_err)?;
            // SAFETY: a copy this closure owns; its attributes are
            // allocated with it.
            unsafe {
                let i = lane_info.as_ptr();
                (*(*i).tx_attr).tclass = class.0;
                if notify == Notify::Message {
                    // Notices must not overtake the writes they announce.
                    (*(*i).tx_attr).msg_order |= sys::FI_ORDER_SAW as u64;
                    (*(*i).rx_attr).msg_order |= sys::FI_ORDER_SAW as u64;
                }
            }
            if let Some(name) = &shm_name {
                lane_info.set_src_addr(name).map_err(fi_err)?;
            }
            Ep::open(&domain, &lane_info, &av, &cq).map_err(|e| {
                TransportError::os(
                    format!(
                        "opening an endpoint of provider {provider}: {e} \
                         (FI_LOG_LEVEL=warn makes libfabric say why)"
                    ),
                    std::io::Error::other("libfabric"),
                )
            })
        };
        let mut eps = vec![open(opts.data)?];
        if !lanes_share_an_endpoint(&provider) {
            eps.push(open(opts.ack)?);
        }
        let lane_ep = [0, eps.len() - 1];
        let rx = match Receiver::of(&provider) {
            Receiver::DataLane => 0,
            Receiver::Own => {
                eps.push(open(super::options::TrafficClass::UNSPEC)?);
                eps.len() - 1
            }
        };
        let name = eps[rx].name().map_err(fi_err)?;
        let local_mr = mr_mode & sys::FI_MR_LOCAL != 0;
        let key_mask = match dom.mr_key_size {
            8.. => u64::MAX,
            n => (1u64 << (8 * n)) - 1,
        };
        let key_base = random_u64()? & key_mask;
        let notices = match notify {
            Notify::Message => Some(Notices::post(
                &domain,
                &eps[rx],
                local_mr.then_some(key_base),
            )?),
            _ => None,
        };
        // Without the escape signal's handler (sigaction failed), a call
        // that never returns ends the process at once.
        let escape = watchdog::escape_signal().ok();
        let watchdog = opts
            .stuck_after
            .map(|limit| watchdog::Watchdog::start(limit, escape, exit_stuck(provider.clone())))
            .transpose()
            .map_err(|e| TransportError::os("spawning the fabric watchdog thread", e))?
            .map(Box::new);
        let ride_acks = two_ranges
            && notify != Notify::Message
            && match opts.credit_ride {
                CreditRide::Never => false,
                CreditRide::Always => true,
                CreditRide::Auto => classes_stay_on_host(&provider),
            };
        if me == 0 {
            eprintln!(
                "m2n: fabric transport: provider {provider} (fabric {fabric_name}, domain {domain_name}{}{})",
                if no_hmem.is_none() { ", FI_HMEM" } else { "" },
                if notify == Notify::Message { ", notices by message" } else { "" }
            );
        }
        // Over shm, the transport is known to `linger` from here on (nothing
        // below fails).
        let shm_stem = ShmFiles::of(&name).map(|f| f.stem);
        if let Some(stem) = &shm_stem {
            linger::opened(stem);
        }
        Ok(Self {
            me,
            world,
            provider,
            fabric_name,
            domain_name,
            domain,
            cq,
            av,
            eps,
            lane_ep,
            rx,
            notices,
            name,
            addrs: vec![fi::ADDR_NOTAVAIL; world],
            shm_files: vec![None; world],
            shm_stem,
            virt_addr: mr_mode & sys::FI_MR_VIRT_ADDR != 0,
            key_mask,
            next_key: key_base.wrapping_add(1) & key_mask,
            remote_keys: Vec::new(),
            inject_size,
            two_ranges,
            ride_acks,
            no_hmem,
            locals: LocalRegions::default(),
            imports: Vec::new(),
            closed: vec![None; world],
            contexts: Contexts::new(opts.tx_depth, world),
            batch: [Vec::with_capacity(MAX_BATCH), Vec::with_capacity(MAX_BATCH)],
            // Writes reported done between two polls: completions read
            // (up to the contexts) and injected writes done when posted
            // (up to two full trains per flush): sized now, so a warm run
            // does not allocate for a new high.
            done: Vec::with_capacity(opts.tx_depth + 4 * MAX_BATCH),
            entries: vec![sys::fi_cq_data_entry::default(); 64],
            counters: TransportCounters::default(),
            watchdog,
            stuck_writing_to: None,
            opts,
            _fabric: fabric,
            _info: info,
        })
    }

    /// The provider in use (`tcp;ofi_rxm`).
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// Refuses every call once a call into the provider was broken off.
    fn check_usable(&self) -> Result<(), TransportError> {
        if self._fabric.is_wedged() {
            return Err(stuck(self.stuck_writing_to));
        }
        Ok(())
    }

    fn close_peer(&mut self, peer: usize, reason: String) {
        if peer < self.world && self.closed[peer].is_none() {
            self.closed[peer] = Some(reason);
        }
    }

    /// Registers `len` bytes at `base` (host memory, or GPU `device`'s).
    ///
    /// # Safety
    /// The memory stays valid until the registration is dropped.
    unsafe fn register_mr(
        &mut self,
        base: *mut u8,
        len: usize,
        remote_write: bool,
        device: Option<i32>,
    ) -> Result<Option<Mr>, TransportError> {
        if len == 0 {
            return Ok(None);
        }
        let mut access = sys::FI_WRITE as u64;
        if remote_write {
            access |= sys::FI_REMOTE_WRITE as u64;
        }
        let key = self.next_key;
        self.next_key = key.wrapping_add(1) & self.key_mask;
        // SAFETY: forwarded contract.
        unsafe { self.domain.register(base, len, access, key, device) }
            .map(Some)
            .map_err(|e| match device {
                Some(gpu) if e.code == sys::FI_ENOSYS as i32 => {
                    // Later registrations are refused at once, for the
                    // same reason (`require_hmem`).
                    let err = no_cuda_registration(&self.provider, gpu);
                    self.no_hmem = Some(err.to_string());
                    err
                }
                _ => fi_err(e),
            })
    }

    /// Adds a registered region; its descriptor (for remote writes) when
    /// `remote` is set.
    fn add(&mut self, mem: FabricMemory, remote: bool) -> Region {
        let key = mem._mr.as_ref().map_or(0, Mr::key);
        if remote && mem._mr.is_some() {
            self.remote_keys.push(key);
        }
        let descriptor = if remote {
            RegionDescriptor {
                addr: if self.virt_addr { mem.base as u64 } else { 0 },
                key,
                len: mem.len,
            }
            .encode()
        } else {
            Vec::new()
        };
        let device = mem.device;
        let mut region = self.locals.add(Arc::new(mem), Vec::new());
        region.descriptor = descriptor;
        region.host = !device;
        region
    }

    #[cfg(feature = "cuda")]
    fn require_hmem(&self) -> Result<(), TransportError> {
        match &self.no_hmem {
            None => Ok(()),
            Some(why) => Err(unavailable(format!(
                "GPU memory needs FI_HMEM, and the transport runs on {} without it: {why}",
                self.provider
            ))),
        }
    }

    /// Posts each lane's train: every write but the last with `FI_MORE`.
    /// A write the provider cannot take now stays queued for the next call.
    fn flush(&mut self) {
        // Most calls find nothing queued (a polling loop's): no call into
        // the provider, so nothing to watch.
        if self.batch.iter().all(Vec::is_empty) || self._fabric.is_wedged() {
            return;
        }
        self.watched(Self::post_batches);
    }

    /// Runs `f`, which calls into the provider, under the watchdog: the
    /// watchdog is lent out of `self` for the call, so that its guard (a
    /// borrow) and `f`'s `&mut self` do not overlap.
    fn watched<R>(&mut self, f: impl FnOnce(&mut Self) -> R) -> R {
        let dog = self.watchdog.take();
        let r = {
            let _inside = dog.as_deref().map(watchdog::Watchdog::enter);
            f(self)
        };
        self.watchdog = dog;
        r
    }

    /// Posts the queued writes of both lanes, in order, as far as the
    /// provider takes them (see [`flush`](Self::flush)).
    fn post_batches(&mut self) {
        for lane in 0..2 {
            let n = self.batch[lane].len();
            let mut posted = 0;
            while posted < n {
                // The fields the post needs, not the whole entry (a copy
                // of which was a call to memcpy per write).
                let p = &self.batch[lane][posted];
                let (peer, slot) = (p.peer, p.slot);
                let (pflags, written, done_at_post) = (p.flags, p.written, p.done_at_post);
                let more = if posted + 1 < n {
                    sys::FI_MORE as u64
                } else {
                    0
                };
                // Message mode: the write goes without CQ data, and the
                // notice (the same 64 bits) follows it as a message.
                let notice = self.notices.is_some() && pflags & sys::FI_REMOTE_CQ_DATA as u64 != 0;
                if written {
                    match self.post_notice(lane, posted, more) {
                        Ok(()) => {}
                        Err(e) if e.is_again() => break,
                        Err(e) if e.is_broken_off() => return,
                        Err(e) => self.close_peer(peer, format!("notice failed: {e}")),
                    }
                    posted += 1;
                    continue;
                }
                let flags = if notice {
                    pflags & !(sys::FI_REMOTE_CQ_DATA as u64) | sys::FI_MORE as u64
                } else {
                    pflags | more
                };
                let p = &self.batch[lane][posted];
                // A train of one is a write alone (its flags are its own).
                let r = if n == 1 && !notice {
                    Self::write_alone(&self.eps[self.lane_ep[lane]], &mut self.contexts, p)
                } else {
                    Self::write_pending(&self.eps[self.lane_ep[lane]], &mut self.contexts, p, flags)
                };
                match r {
                    Ok(()) => {
                        self.note_posted(pflags, done_at_post);
                        if notice {
                            match self.post_notice(lane, posted, more) {
                                Ok(()) => {}
                                Err(e) if e.is_again() => {
                                    self.batch[lane][posted].written = true;
                                    break;
                                }
                                Err(e) if e.is_broken_off() => return,
                                Err(e) => self.close_peer(peer, format!("notice failed: {e}")),
                            }
                        }
                    }
                    Err(e) if e.is_again() => break,
                    // The provider is wedged: the next call says so.
                    Err(e) if e.is_broken_off() => {
                        self.stuck_writing_to = Some(peer);
                        return;
                    }
                    Err(e) => {
                        self.close_peer(peer, format!("write failed: {e}"));
                        if slot != NO_SLOT {
                            self.contexts.release(slot as usize);
                        }
                    }
                }
                posted += 1;
            }
            if posted > 0 {
                self.counters.doorbells += 1;
                self.batch[lane].drain(..posted);
            }
        }
    }

    /// Posts `p`, a write that goes alone (no `FI_MORE`: see
    /// [`post_alone`](Self::post_alone), and a train of one), on `ep`,
    /// with its own flags.
    fn write_alone(ep: &Ep, contexts: &mut Contexts, p: &Pending) -> Result<(), FiError> {
        // A write of one range that is injected and asks no completion
        // (a round trip's reply carrying no credit, a credit alone) goes
        // through the provider's inject entry, as fabtests' ping-pong
        // posts. A write that has others after it (`FI_MORE`) stays with
        // `fi_writemsg`: the flag is the provider's to batch the doorbell,
        // and only that entry takes it.
        let inject = sys::FI_INJECT as u64;
        let cq_data = sys::FI_REMOTE_CQ_DATA as u64;
        if p.rider.is_none() && p.flags & !cq_data == inject {
            let w = &p.range;
            let data = (p.flags & cq_data != 0).then_some(p.data);
            // SAFETY: injected (`pending` chose it for a source within the
            // inject size), so the source is read before this returns; it
            // is registered memory, checked by `target`.
            let r = unsafe {
                ep.inject_write(
                    (w.local as *const u8, w.len),
                    data,
                    p.dest,
                    (w.remote_addr, w.key),
                )
            };
            if let Some(r) = r {
                return r;
            }
        }
        Self::write_pending(ep, contexts, p, p.flags)
    }

    /// Posts `p` (and the credit riding in it) with `flags` on `ep`.
    /// An associated function, not a method: its callers lend it the
    /// entry in place (a train's) and the contexts, fields of `self`.
    fn write_pending(
        ep: &Ep,
        contexts: &mut Contexts,
        p: &Pending,
        flags: u64,
    ) -> Result<(), FiError> {
        // The data's range, after the credit riding in it (whose arrival
        // the data's CQ data then announces too).
        let (ranges, n) = match p.rider {
            Some(credit) => ([credit, p.range], 2),
            None => ([p.range, p.range], 1),
        };
        let iov = ranges.map(|w| libc::iovec {
            iov_base: w.local as *mut libc::c_void,
            iov_len: w.len,
        });
        let mut desc = ranges.map(|w| w.desc as *mut libc::c_void);
        let rma = ranges.map(|w| sys::fi_rma_iov {
            addr: w.remote_addr,
            len: w.len,
            key: w.key,
        });
        let msg = sys::fi_msg_rma {
            msg_iov: iov.as_ptr(),
            desc: desc.as_mut_ptr(),
            iov_count: n,
            addr: p.dest,
            rma_iov: rma.as_ptr(),
            rma_iov_count: n,
            context: contexts.ptr(p.slot),
            data: p.data,
        };
        // SAFETY: the sources are registered memory kept alive by the
        // in-flight entry (the rider's too), or copied at once with
        // FI_INJECT; the remote ranges were checked against the peers'
        // regions; the context lives in the fixed table until its
        // completion.
        unsafe { ep.write_msg(&msg, flags) }
    }

    /// Counts a write the provider took (flagged `pflags`), and reports
    /// it done if it was injected and waited for.
    fn note_posted(&mut self, pflags: u64, done_at_post: Option<u64>) {
        self.counters.work_requests += 1;
        if pflags & sys::FI_INJECT as u64 != 0 {
            self.counters.inline += 1;
        }
        if pflags & sys::FI_COMPLETION as u64 != 0 {
            self.counters.signaled += 1;
        }
        if let Some(wr_id) = done_at_post {
            self.done.push(Completion::WriteDone { wr_id });
        }
    }

    /// The queued write of `lane` that a credit of `len` bytes to `peer`
    /// can ride in: the last write queued to `peer` (so that the credit
    /// still lands after every earlier write to it, as it would alone), if
    /// that is a data write (with CQ data) carrying no credit yet, where
    /// the provider takes two ranges per write (and not in message mode,
    /// whose notice follows the write alone) and the pair stays injectable
    /// if the data write is injected (an injected write has no completion
    /// to keep a rider's source alive by).
    fn carrier(&self, lane: usize, peer: usize, len: usize) -> Option<usize> {
        let at = self.batch[lane].iter().rposition(|p| p.peer == peer)?;
        self.can_carry(&self.batch[lane][at], len).then_some(at)
    }

    /// Whether `req` is a write that may ride in a data write: a credit
    /// (no CQ data, nothing to report) small enough to inject. Its
    /// source must also be host memory (see `target`).
    fn may_ride(&self, req: &WriteRequest) -> bool {
        req.imm.is_none() && !req.signaled && req.len <= self.inject_size
    }

    /// Whether a credit of `len` bytes can ride in `p` (see
    /// [`carrier`](Self::carrier)).
    fn can_carry(&self, p: &Pending, len: usize) -> bool {
        if !self.two_ranges || self.notices.is_some() {
            return false;
        }
        let fits = p.flags & sys::FI_INJECT as u64 == 0 || p.range.len + len <= self.inject_size;
        let data = p.flags & sys::FI_REMOTE_CQ_DATA as u64 != 0;
        data && fits && p.rider.is_none() && !p.written
    }

    /// Whether a credit to `peer` may leave the ACK lane to ride in a data
    /// write: `ride_acks`, and at most [`RIDE_BEHIND`] bytes of writes to
    /// `peer` in flight or queued, so that a credit does not wait behind
    /// bulk data on the peer's connection, as it would not on the ACK
    /// lane's.
    fn leaves_ack_lane(&self, peer: usize) -> bool {
        self.ride_acks
            && self
                .contexts
                .bytes_to
                .get(peer)
                .is_some_and(|&b| b <= RIDE_BEHIND)
    }

    /// Where `req` goes, checked (see [`post_write`](Transport::post_write)):
    /// the peer's address, the write's range, and whether its source is
    /// device memory.
    #[inline(always)]
    fn target(
        &self,
        peer: usize,
        req: &WriteRequest,
    ) -> Result<(sys::fi_addr_t, Range, bool), TransportError> {
        super::check_open(&self.closed, peer)?;
        let dest = self.addrs[peer];
        if dest == fi::ADDR_NOTAVAIL {
            return Err(TransportError::NotConnected(peer));
        }
        let Some(&remote) = self
            .imports
            .get(req.remote.key as usize)
            .filter(|r| r.peer == peer)
        else {
            return Err(TransportError::NotConnected(peer));
        };
        // The library refuses out-of-range writes before posting. An
        // injected write's source is read when its batch is posted, within
        // the caller's pass or (if the provider is busy) a later one, while
        // the round is not yet sent, so still the caller's to keep: it
        // takes no reference to the region.
        let local = self.locals.view(peer, req, req.remote.len)?;
        // SAFETY: in range, checked by `view`.
        let addr = unsafe { local.base.add(req.local_offset) } as usize;
        let range = Range {
            local: addr,
            len: req.len,
            desc: local.desc,
            remote_addr: remote.addr + req.remote_offset as u64,
            key: remote.key,
        };
        Ok((dest, range, local.device))
    }

    /// The entry of a write of `req` to `peer` at `dest` (see `target`),
    /// with its completion context claimed where it asks for one.
    #[inline(always)]
    fn pending(
        &mut self,
        peer: usize,
        req: &WriteRequest,
        (dest, range, device): (sys::fi_addr_t, Range, bool),
    ) -> Result<Pending, TransportError> {
        // Small writes are injected: the provider copies them before the
        // post returns, so the source is free at once and they ask for no
        // completion (one the caller waits for is reported done when
        // posted). Larger ones ask for one: their source must stay alive
        // until the provider is done with it.
        let inject = req.len <= self.inject_size && !device;
        let complete = !inject;
        let mut flags = 0u64;
        if req.imm.is_some() {
            flags |= sys::FI_REMOTE_CQ_DATA as u64;
        }
        if inject {
            flags |= sys::FI_INJECT as u64;
        }
        if complete {
            flags |= sys::FI_COMPLETION as u64;
        }
        let slot = if complete {
            let op = InFlight {
                user_wr_id: req.wr_id,
                report: req.signaled,
                peer,
                len: req.len,
                _keep: self.locals.get(req.local)?,
                _rider: None,
            };
            self.contexts.claim(op).ok_or(TransportError::WouldBlock)?
        } else {
            NO_SLOT
        };
        Ok(Pending {
            peer,
            dest,
            range,
            // The immediate, and the length in the upper half (`view`
            // checked that it fits in 32 bits).
            data: u64::from(req.imm.unwrap_or(0)) | (req.len as u64) << 32,
            flags,
            slot,
            done_at_post: (inject && req.signaled).then_some(req.wr_id),
            written: false,
            rider: None,
        })
    }

    /// Queues `p` on `lane`'s train, sending the train once it is long
    /// enough (`FLUSH_AT`) or `now`.
    fn queue(&mut self, lane: usize, p: Pending, now: bool) {
        self.batch[lane].push(p);
        if now || self.batch[lane].len() >= FLUSH_AT {
            self.flush();
        }
    }

    /// Whether `lane` has room for one more write, sending its train if
    /// that makes room.
    fn room(&mut self, lane: usize) -> bool {
        if self.batch[lane].len() >= MAX_BATCH {
            self.flush();
        }
        self.batch[lane].len() < MAX_BATCH
    }

    /// Posts `p` at once on `lane`, whose train is empty: one call into
    /// the provider, no train. A write the provider cannot take now is
    /// queued for the next flush; one it refuses closes its peer (the next
    /// call says so), as in a train.
    fn post_alone(&mut self, lane: usize, p: Pending) {
        debug_assert!(self.batch[lane].is_empty() && self.notices.is_none());
        let r = self.watched(|t| Self::write_alone(&t.eps[t.lane_ep[lane]], &mut t.contexts, &p));
        match r {
            Ok(()) => {
                self.counters.doorbells += 1;
                self.note_posted(p.flags, p.done_at_post);
            }
            Err(e) if e.is_again() => self.batch[lane].push(p),
            // The provider is wedged: the next call says so.
            Err(e) if e.is_broken_off() => {
                self.stuck_writing_to = Some(p.peer);
                self.batch[lane].push(p);
            }
            Err(e) => {
                self.close_peer(p.peer, format!("write failed: {e}"));
                if p.slot != NO_SLOT {
                    self.contexts.release(p.slot as usize);
                }
            }
        }
    }

    /// Message mode: the notice of the write queued at `at` in `lane`'s
    /// train, injected on the endpoint that wrote it (so ordered after
    /// it, `FI_ORDER_SAW`).
    fn post_notice(&mut self, lane: usize, at: usize, more: u64) -> Result<(), FiError> {
        let p = &self.batch[lane][at];
        let notice: Notice = [p.data, p.range.key];
        let dest = p.dest;
        let iov = libc::iovec {
            iov_base: notice.as_ptr().cast_mut().cast(),
            iov_len: NOTICE_BYTES,
        };
        let mut desc = std::ptr::null_mut();
        let msg = sys::fi_msg {
            msg_iov: &iov,
            desc: &mut desc,
            iov_count: 1,
            addr: dest,
            context: self.contexts.ptr(NO_SLOT),
            data: 0,
        };
        // SAFETY: injected (copied before the call returns), no completion asked (the spare context).
        unsafe { self.eps[self.lane_ep[lane]].send_msg(&msg, sys::FI_INJECT as u64 | more) }?;
        self.counters.work_requests += 1;
        self.counters.inline += 1;
        Ok(())
    }

    /// Handles an error completion: a write's failure closes its peer. An
    /// error that is not one of m2n's writes (the provider's own traffic
    /// with a peer: a connection reset when a peer dies) does not say whose
    /// it is, so it is let go; the peer's writers see their own errors,
    /// and liveness judges the peer.
    fn on_error(&mut self, e: &sys::fi_cq_err_entry) {
        let slot = self.contexts.slot_of(e.op_context);
        if let Some(op) = slot.and_then(|s| self.contexts.release(s)) {
            let text = self.cq.err_text(e);
            self.close_peer(op.peer, format!("write failed: {text}"));
        }
    }

    /// Reads the completion queue dry into `out` (see `poll`).
    fn read_completions(&mut self, out: &mut Vec<Completion>) -> Result<(), TransportError> {
        if let Some(n) = &mut self.notices {
            n.retry(&self.eps[self.rx]).map_err(fi_err)?;
        }
        loop {
            let n = match self.cq.read(&mut self.entries) {
                Ok(n) => n,
                Err(e) if e.code == sys::FI_EAVAIL as i32 => {
                    while let Some(err) = self.cq.read_err() {
                        self.on_error(&err);
                    }
                    continue;
                }
                Err(e) => return Err(fi_err(e)),
            };
            self.counters.cq_polls += 1;
            self.counters.completions += n as u64;
            for i in 0..n {
                let e = self.entries[i];
                if e.flags & sys::FI_REMOTE_CQ_DATA as u64 != 0 {
                    out.push(Completion::Arrived {
                        peer: super::PEER_IN_IMMEDIATE,
                        imm: e.data as u32,
                        len: (e.data >> 32) as usize,
                    });
                } else if let Some(i) = self.notices.as_ref().and_then(|n| n.index_of(e.op_context))
                {
                    let notices = self.notices.as_mut().expect("index_of found it");
                    let [data, key] = notices.take(&self.eps[self.rx], i).map_err(fi_err)?;
                    if e.len != NOTICE_BYTES {
                        return Err(TransportError::os(
                            "reading a write's notice",
                            std::io::Error::new(
                                std::io::ErrorKind::InvalidData,
                                format!("{} bytes arrived (notices are {NOTICE_BYTES})", e.len),
                            ),
                        ));
                    }
                    self.counters.recv_posts += 1;
                    if !self.remote_keys.contains(&key) {
                        // The notice of a write meant for another process
                        // (see `next_key`), which the provider refused.
                        continue;
                    }
                    out.push(Completion::Arrived {
                        peer: super::PEER_IN_IMMEDIATE,
                        imm: data as u32,
                        len: (data >> 32) as usize,
                    });
                } else if let Some(slot) = self.contexts.slot_of(e.op_context) {
                    if let Some(op) = self.contexts.release(slot) {
                        if op.report {
                            self.done.push(Completion::WriteDone {
                                wr_id: op.user_wr_id,
                            });
                        }
                    }
                }
            }
            if n < self.entries.len() {
                break;
            }
        }
        out.append(&mut self.done);
        Ok(())
    }
}

impl Transport for FabricTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Fabric
    }

    fn counters(&self) -> TransportCounters {
        self.counters
    }

    /// Provider, fabric, domain and inject size in use.
    fn describe(&self) -> String {
        format!(
            "fabric provider {} on fabric {}, domain {}, inject {} B, ack class {}{}{}",
            self.provider,
            self.fabric_name,
            self.domain_name,
            self.inject_size,
            self.opts.ack.name(),
            if self.ride_acks {
                ", credits ride in data writes"
            } else {
                ""
            },
            if self.no_hmem.is_none() {
                ", FI_HMEM"
            } else {
                ""
            }
        )
    }

    fn endpoint(&self) -> Vec<u8> {
        Endpoint {
            provider: self.provider.clone(),
            address: self.name.clone(),
        }
        .encode()
    }

    fn alloc(&mut self, len: usize) -> Result<Region, TransportError> {
        self.check_usable()?;
        // Peers never map it: the provider moves the bytes.
        let mem = PrivateMemory::new(len)?;
        let base = mem.as_ptr().as_ptr();
        // SAFETY: the memory lives in the same FabricMemory as the MR.
        let mr = unsafe { self.register_mr(base, len, true, None) }?;
        Ok(self.add(
            FabricMemory {
                base,
                len,
                _mr: mr,
                _owner: Some(Box::new(mem)),
                device: false,
            },
            true,
        ))
    }

    unsafe fn register(&mut self, ptr: *mut u8, len: usize) -> Result<Region, TransportError> {
        self.check_usable()?;
        super::check_registrable(ptr, len)?;
        // SAFETY: forwarded contract: valid until the region drops.
        let mr = unsafe { self.register_mr(ptr, len, false, None) }?;
        Ok(self.add(
            FabricMemory {
                base: ptr,
                len,
                _mr: mr,
                _owner: None,
                device: false,
            },
            false,
        ))
    }

    #[cfg(feature = "cuda")]
    unsafe fn register_device(&mut self, dptr: u64, len: usize) -> Result<Region, TransportError> {
        self.check_usable()?;
        self.require_hmem()?;
        let device = self.opts.cuda_device as i32;
        // SAFETY: forwarded contract: the device memory outlives the region.
        let mr = unsafe { self.register_mr(dptr as *mut u8, len, false, Some(device)) }
            .inspect_err(|e| {
                // Unavailable: the communicator sends such memory through a
                // host stage, as over shm and tcp; the process is told once
                // why it copies.
                static TOLD: std::sync::Once = std::sync::Once::new();
                if matches!(e, TransportError::Unavailable(..)) {
                    TOLD.call_once(|| {
                        eprintln!(
                            "m2n: fabric transport: GPU memory goes through a host stage: {e}"
                        )
                    });
                }
            })?;
        Ok(self.add(
            FabricMemory {
                base: dptr as *mut u8,
                len,
                _mr: mr,
                _owner: None,
                device: true,
            },
            false,
        ))
    }

    #[cfg(feature = "cuda")]
    fn alloc_gpu_ring(&mut self, len: usize, device: usize) -> Result<Region, TransportError> {
        self.check_usable()?;
        self.require_hmem()?;
        let buf = crate::gpu::DeviceBuffer::alloc(device, len)
            .map_err(|e| unavailable(format!("GPU receive ring: {e}")))?;
        let dptr = buf.dptr;
        // SAFETY: the buffer lives in the same FabricMemory as the MR.
        let mr = unsafe { self.register_mr(dptr as *mut u8, len, true, Some(device as i32)) }?;
        Ok(self.add(
            FabricMemory {
                base: dptr as *mut u8,
                len,
                _mr: mr,
                _owner: Some(Box::new(buf)),
                device: true,
            },
            true,
        ))
    }

    fn connect(&mut self, peer: usize, endpoint: &[u8]) -> Result<(), TransportError> {
        self.check_usable()?;
        if peer >= self.world || peer == self.me {
            return Err(TransportError::NotConnected(peer));
        }
        let ep = Endpoint::decode(endpoint, &self.provider)
            .map_err(|source| TransportError::BadDescriptor { peer, source })?;
        self.addrs[peer] = self.av.insert(&ep.address).map_err(fi_err)?;
        if self.provider == "shm" {
            let files = ShmFiles::of(&ep.address);
            if let (Some(f), Some(stem)) = (&files, &self.shm_stem) {
                if f.pid as u32 == std::process::id() {
                    linger::linked(stem, &f.stem);
                }
            }
            self.shm_files[peer] = files;
        }
        Ok(())
    }

    fn import(&mut self, peer: usize, descriptor: &[u8]) -> Result<RemoteRegion, TransportError> {
        let RegionDescriptor { addr, key, len } = RegionDescriptor::decode(descriptor)
            .map_err(|source| TransportError::BadDescriptor { peer, source })?;
        let index = self.imports.len() as u32;
        self.imports.push(Imported { peer, addr, key });
        Ok(RemoteRegion {
            peer,
            key: index,
            len,
        })
    }

    unsafe fn post_write(
        &mut self,
        peer: usize,
        lane: Lane,
        req: &WriteRequest,
    ) -> Result<(), TransportError> {
        self.check_usable()?;
        let l = lane_index(lane);
        let target = self.target(peer, req)?;
        // A credit (no CQ data, nothing to report, injectable) rides in
        // the data write queued last to its peer where it can (see
        // `carrier`): one message instead of two.
        let carrier = if self.may_ride(req) && !target.2 {
            self.carrier(l, peer, req.len)
        } else {
            None
        };
        if let Some(at) = carrier {
            let carrier_slot = self.batch[l][at].slot;
            // A data write that is not injected reads the credit's source
            // until it completes: its entry keeps that alive.
            if carrier_slot != NO_SLOT {
                let source = self.locals.get(req.local)?;
                self.contexts.keep_rider(carrier_slot, source);
            }
            self.batch[l][at].rider = Some(target.1);
            return Ok(());
        }
        if !self.room(l) {
            return Err(TransportError::WouldBlock);
        }
        let p = self.pending(peer, req, target)?;
        self.queue(l, p, false);
        Ok(())
    }

    /// A data write that is `last` in its pass goes at once where it has
    /// its lane to itself (nothing queued, no notice to follow): one call
    /// into the provider, no train, no flush. Otherwise it joins the
    /// lane's train, which then goes if `last`. A credit offered rides in
    /// it where a credit queued behind it would (see `carrier` and
    /// `credit_rides`).
    ///
    /// # Safety
    /// As [`Transport::post_data`]: both writes' sources stay unchanged
    /// until they complete.
    unsafe fn post_data(
        &mut self,
        peer: usize,
        lane: Lane,
        req: &WriteRequest,
        credit: Option<Rider<'_>>,
        last: bool,
    ) -> Result<bool, TransportError> {
        self.check_usable()?;
        let l = lane_index(lane);
        let target = self.target(peer, req)?;
        if !self.room(l) {
            return Err(TransportError::WouldBlock);
        }
        let mut p = self.pending(peer, req, target)?;
        let mut rode = false;
        if let Some(c) = credit {
            let wanted = c.data_lane || self.leaves_ack_lane(peer);
            if wanted && self.may_ride(c.req) && self.can_carry(&p, c.req.len) {
                match self.target(peer, c.req) {
                    Ok((_, range, false)) => {
                        // As in `post_write`: a write that is not
                        // injected keeps the credit's source alive.
                        if p.slot != NO_SLOT {
                            match self.locals.get(c.req.local) {
                                Ok(source) => self.contexts.keep_rider(p.slot, source),
                                Err(e) => {
                                    self.contexts.release(p.slot as usize);
                                    return Err(e);
                                }
                            }
                        }
                        p.rider = Some(range);
                        rode = true;
                    }
                    // Device memory: the credit goes alone.
                    Ok(_) => {}
                    Err(e) => {
                        if p.slot != NO_SLOT {
                            self.contexts.release(p.slot as usize);
                        }
                        return Err(e);
                    }
                }
            }
        }
        // A piggybacked credit that could not ride follows on this lane:
        // the train waits for it.
        let last = last && (rode || credit.is_none_or(|c| !c.data_lane));
        if last && self.batch[l].is_empty() && self.notices.is_none() {
            self.post_alone(l, p);
        } else {
            self.queue(l, p, last);
        }
        Ok(rode)
    }

    fn owns(&self, region: RegionId) -> bool {
        self.locals.owns(region)
    }

    /// Never known: a provider may hold a peer's last writes (in a socket,
    /// in shm's command queue) after the peer said goodbye, and libfabric
    /// says nothing when a peer's stream ends. A peer that left is judged
    /// after the peer timeout, its writes delivered meanwhile.
    fn peer_drained(&self, _peer: usize) -> bool {
        false
    }

    /// Where credits may ride (`ride_acks`): a data write to `peer` is
    /// queued that can carry the credit (see [`carrier`](Self::carrier)),
    /// and at most
    /// [`RIDE_BEHIND`] bytes of writes to `peer` are in flight or queued,
    /// so that a credit does not wait behind bulk data on the peer's
    /// connection, as it would not on the ACK lane's.
    fn credit_rides(&self, peer: usize, len: usize) -> bool {
        self.leaves_ack_lane(peer) && self.carrier(lane_index(Lane::Data), peer, len).is_some()
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<(), TransportError> {
        self.flush();
        self.check_usable()?;
        self.watched(|t| t.read_completions(out))
    }
}

mod linger;
#[cfg(test)]
mod tests;
mod watchdog;
