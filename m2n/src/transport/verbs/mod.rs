//! The verbs backend: RDMA WRITE WITH IMMEDIATE over RC queue pairs.
//!
//! Per peer and lane one RC queue pair, so the ACK lane can ride a higher
//! traffic class (GRH `traffic_class`) and service level than data, as
//! MegaScale-Infer does. Writes go straight from registered memory into the
//! peer's registered ring (zero copy); a write with immediate consumes one
//! zero-SGE receive from this process's shared receive queue, which is kept
//! replenished. Work requests posted between two polls go out as one linked
//! list per queue pair (one doorbell); only every write the caller asks to
//! be signalled, plus one in every `sq_depth / 2`, generates a completion;
//! payloads up to the QP's inline limit are sent inline.

pub mod ib;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use ib::{Context, Cq, IbError, Mr, PathSettings, Pd, Qp, Srq};
use rdma_sys::*;

use super::segment::Segment;
use super::{
    Completion, Lane, LocalMemory, LocalRegions, Region, RegionId, RemoteRegion, Transport,
    TransportCounters, TransportError, TransportKind, WriteRequest,
};
use crate::codec::{DecodeError, Reader, Writer};

const ENDPOINT_MAGIC: u32 = 0x4d32_4e56; // "M2NV"
const REGION_MAGIC: u32 = 0x4d32_4e4d; // "M2NM"
const SEQ_BITS: u32 = 40;

/// Settings of the verbs transport (`M2N_IB_*`).
pub use super::options::IbConfig as VerbsOptions;

fn ib_err(e: IbError) -> TransportError {
    match e {
        IbError::NoDevice
        | IbError::DeviceNotFound { .. }
        | IbError::NoActivePort { .. }
        | IbError::NoGid { .. } => TransportError::Unavailable(TransportKind::Verbs, e.to_string()),
        other => TransportError::os(other.to_string(), std::io::Error::other("verbs")),
    }
}

/// Whether this host has a usable RDMA device under `opts`, and which.
pub fn probe(opts: &VerbsOptions) -> Result<String, TransportError> {
    let ctx = Context::open(opts.device.as_deref()).map_err(ib_err)?;
    let (port, attr) = ctx.choose_port(opts.port).map_err(ib_err)?;
    let (gid_index, _) = ctx
        .choose_gid(port, &attr, opts.gid_index)
        .map_err(ib_err)?;
    Ok(format!("{} port {port} gid {gid_index}", ctx.name))
}

/// Memory of a verbs region: its bytes and their registration.
#[derive(Debug)]
struct VerbsMemory {
    base: *mut u8,
    len: usize,
    mr: Mr,
    /// The memory, when the transport allocated it (dropped after `mr`).
    _owner: Option<Box<dyn std::fmt::Debug + Send + Sync>>,
}

// SAFETY: plain memory plus a thread-safe MR handle.
unsafe impl Send for VerbsMemory {}
// SAFETY: as above.
unsafe impl Sync for VerbsMemory {}

impl LocalMemory for VerbsMemory {
    fn base(&self) -> *mut u8 {
        self.base
    }
    fn len(&self) -> usize {
        self.len
    }
    fn key(&self) -> u32 {
        self.mr.lkey()
    }
}

/// A work request waiting for its doorbell or its completion.
struct InFlight {
    seq: u64,
    user_wr_id: u64,
    report: bool,
    _keep: Arc<dyn LocalMemory>,
}

struct Pending {
    wr_id: u64,
    addr: u64,
    len: u32,
    lkey: u32,
    remote_addr: u64,
    rkey: u32,
    imm: Option<u32>,
    signaled: bool,
    inline: bool,
}

struct QpSlot {
    qp: Qp,
    peer: usize,
    lane: Lane,
    next_seq: u64,
    unsignaled_run: u32,
    /// Posted (or about to be), not yet known complete, in order.
    in_flight: VecDeque<InFlight>,
    batch: Vec<Pending>,
}

impl std::fmt::Debug for QpSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QpSlot")
            .field("qpn", &self.qp.num())
            .field("peer", &self.peer)
            .field("lane", &self.lane)
            .field("in_flight", &self.in_flight.len())
            .finish()
    }
}

#[derive(Debug, Clone, Copy)]
struct Imported {
    peer: usize,
    addr: u64,
    rkey: u32,
}

/// The verbs transport of one process.
#[derive(Debug)]
pub struct VerbsTransport {
    me: usize,
    world: usize,
    opts: VerbsOptions,
    ctx: Arc<Context>,
    pd: Arc<Pd>,
    send_cq: Arc<Cq>,
    recv_cq: Arc<Cq>,
    srq: Arc<Srq>,
    port: u8,
    gid_index: u8,
    gid: [u8; 16],
    lid: u16,
    mtu: u32,
    /// Index `2 * peer + lane`.
    qps: Vec<QpSlot>,
    by_qpn: HashMap<u32, usize>,
    locals: LocalRegions,
    imports: Vec<Imported>,
    closed: Vec<Option<String>>,
    /// Receives consumed but not yet re-posted.
    srq_owed: usize,
    done: Vec<Completion>,
    wcs: WcBuf,
    counters: TransportCounters,
    scratch: WrScratch,
}

/// Room for polled work completions.
struct WcBuf(Vec<ibv_wc>);

/// Scratch space for building work requests (empty between calls).
#[derive(Default)]
struct WrScratch {
    sges: Vec<ibv_sge>,
    wrs: Vec<ibv_send_wr>,
}

// SAFETY: the raw pointers inside the work requests point into these same
// vectors and only while `flush` builds and posts a list; the vectors are
// empty at every other time.
unsafe impl Send for WrScratch {}

impl std::fmt::Debug for WrScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WrScratch")
    }
}

impl std::fmt::Debug for WcBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WcBuf({})", self.0.len())
    }
}

fn lane_index(lane: Lane) -> usize {
    match lane {
        Lane::Data => 0,
        Lane::Ack => 1,
    }
}

impl VerbsTransport {
    pub fn new(me: usize, world: usize, opts: VerbsOptions) -> Result<Self, TransportError> {
        let ctx = Context::open(opts.device.as_deref()).map_err(ib_err)?;
        let (port, attr) = ctx.choose_port(opts.port).map_err(ib_err)?;
        let (gid_index, gid) = ctx
            .choose_gid(port, &attr, opts.gid_index)
            .map_err(ib_err)?;
        let mtu = opts.mtu.min(ib::mtu_bytes(attr.active_mtu));
        let pd = Pd::new(&ctx).map_err(ib_err)?;
        let cq_depth = (opts.sq_depth as i32) * 2 * world as i32 + 64;
        let send_cq = Cq::new(&ctx, cq_depth).map_err(ib_err)?;
        let recv_cq = Cq::new(&ctx, opts.srq_depth as i32 + 64).map_err(ib_err)?;
        let srq = Srq::new(&pd, opts.srq_depth).map_err(ib_err)?;
        srq.post_receives(opts.srq_depth as usize).map_err(ib_err)?;
        let mut qps = Vec::with_capacity(2 * world);
        let mut by_qpn = HashMap::new();
        for peer in 0..world {
            for lane in [Lane::Data, Lane::Ack] {
                let qp = Qp::new(
                    &pd,
                    &send_cq,
                    &recv_cq,
                    &srq,
                    opts.sq_depth,
                    opts.max_inline,
                )
                .map_err(ib_err)?;
                by_qpn.insert(qp.num(), qps.len());
                qps.push(QpSlot {
                    qp,
                    peer,
                    lane,
                    next_seq: 0,
                    unsignaled_run: 0,
                    in_flight: VecDeque::new(),
                    batch: Vec::new(),
                });
            }
        }
        Ok(Self {
            me,
            world,
            ctx,
            pd,
            send_cq,
            recv_cq,
            srq,
            port,
            gid_index,
            gid,
            lid: attr.lid,
            mtu,
            qps,
            by_qpn,
            locals: LocalRegions::default(),
            imports: Vec::new(),
            closed: vec![None; world],
            srq_owed: 0,
            done: Vec::new(),
            // SAFETY: zeroed plain-data completion entries are valid.
            wcs: WcBuf((0..64).map(|_| unsafe { std::mem::zeroed() }).collect()),
            opts,
            counters: TransportCounters::default(),
            scratch: WrScratch::default(),
        })
    }

    fn close_peer(&mut self, peer: usize, reason: String) {
        if self.closed[peer].is_none() {
            self.closed[peer] = Some(reason);
        }
    }

    /// Rings each queue pair's doorbell for its batch (one doorbell per
    /// queue pair and call). The work requests are built in scratch
    /// vectors kept across calls, so a round allocates nothing.
    fn flush(&mut self) {
        for i in 0..self.qps.len() {
            if self.qps[i].batch.is_empty() {
                continue;
            }
            let slot = &mut self.qps[i];
            let WrScratch { sges, wrs } = &mut self.scratch;
            sges.clear();
            wrs.clear();
            for p in &slot.batch {
                sges.push(ibv_sge {
                    addr: p.addr,
                    length: p.len,
                    lkey: p.lkey,
                });
                // SAFETY: a zeroed plain-data work request, filled in below.
                let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
                wr.wr_id = p.wr_id;
                wr.num_sge = i32::from(p.len > 0);
                wr.opcode = if p.imm.is_some() {
                    ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM
                } else {
                    ibv_wr_opcode::IBV_WR_RDMA_WRITE
                };
                let mut flags = 0;
                if p.signaled {
                    flags |= ibv_send_flags::IBV_SEND_SIGNALED.0;
                }
                if p.inline {
                    flags |= ibv_send_flags::IBV_SEND_INLINE.0;
                }
                wr.send_flags = flags;
                wr.imm_data_invalidated_rkey_union.imm_data = p.imm.unwrap_or(0).to_be();
                wr.wr.rdma = rdma_t {
                    remote_addr: p.remote_addr,
                    rkey: p.rkey,
                };
                wrs.push(wr);
            }
            // Link the list only now: the vectors no longer grow.
            let n = wrs.len();
            for k in 0..n {
                wrs[k].sg_list = &mut sges[k];
                if k + 1 < n {
                    let next: *mut ibv_send_wr = &mut wrs[k + 1];
                    wrs[k].next = next;
                }
            }
            self.counters.work_requests += n as u64;
            self.counters.inline += slot.batch.iter().filter(|p| p.inline).count() as u64;
            self.counters.signaled += slot.batch.iter().filter(|p| p.signaled).count() as u64;
            self.counters.doorbells += 1;
            slot.batch.clear();
            // SAFETY: a well-formed list; every SGE names memory registered in
            // this PD and kept alive by `in_flight` until its completion.
            let posted = unsafe { slot.qp.post_send(wrs.as_mut_ptr()) };
            sges.clear();
            wrs.clear();
            if let Err(e) = posted {
                let peer = slot.peer;
                self.close_peer(peer, format!("ibv_post_send failed: {e}"));
            }
        }
    }

    fn retire(&mut self, slot_index: usize, seq: u64) {
        let slot = &mut self.qps[slot_index];
        while slot.in_flight.front().is_some_and(|f| f.seq <= seq) {
            let f = slot.in_flight.pop_front().expect("front exists");
            if f.report {
                self.done.push(Completion::WriteDone {
                    wr_id: f.user_wr_id,
                });
            }
        }
    }
}

/// What a peer needs to connect its queue pairs to ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub lid: u16,
    pub gid: [u8; 16],
    pub mtu: u32,
    /// For every transport rank: our (data, ack) queue pair numbers for it.
    pub qpns: Vec<(u32, u32)>,
}

impl Endpoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u32(ENDPOINT_MAGIC)
            .u16(self.lid)
            .raw(&self.gid)
            .u32(self.mtu)
            .u32(self.qpns.len() as u32);
        for &(d, a) in &self.qpns {
            w.u32(d).u32(a);
        }
        w.finish()
    }

    /// Decodes a peer's endpoint; it must list exactly `world` ranks.
    pub fn decode(blob: &[u8], world: usize) -> Result<Endpoint, DecodeError> {
        let mut r = Reader::new(blob);
        r.magic("verbs endpoint magic", ENDPOINT_MAGIC, "a verbs endpoint")?;
        let lid = r.u16("lid")?;
        let mut gid = [0u8; 16];
        gid.copy_from_slice(r.raw(16, "gid")?);
        let mtu = r.u32("mtu")?;
        let n = r.u32("world")? as usize;
        if n != world {
            return Err(DecodeError::Invalid {
                field: "world",
                detail: format!("peer has world {n}, ours is {world}"),
            });
        }
        let qpns = (0..n)
            .map(|_| Ok((r.u32("data qpn")?, r.u32("ack qpn")?)))
            .collect::<Result<Vec<_>, DecodeError>>()?;
        r.finish()?;
        Ok(Endpoint {
            lid,
            gid,
            mtu,
            qpns,
        })
    }
}

/// A region a peer may write: where it is and its remote key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionDescriptor {
    pub addr: u64,
    pub rkey: u32,
    pub len: usize,
}

impl RegionDescriptor {
    pub fn encode(&self) -> Vec<u8> {
        Writer::new()
            .u32(REGION_MAGIC)
            .u64(self.addr)
            .u32(self.rkey)
            .u64(self.len as u64)
            .finish()
    }

    pub fn decode(blob: &[u8]) -> Result<RegionDescriptor, DecodeError> {
        let mut r = Reader::new(blob);
        r.magic(
            "verbs region magic",
            REGION_MAGIC,
            "a verbs region descriptor",
        )?;
        let addr = r.u64("address")?;
        let rkey = r.u32("rkey")?;
        let len = r.len_from("length", addr)?;
        r.finish()?;
        Ok(RegionDescriptor { addr, rkey, len })
    }
}

impl VerbsTransport {
    /// Registers device memory: dma-buf first (upstream kernels), then the
    /// peer-memory path (nvidia-peermem), where ibv_reg_mr takes the device
    /// pointer. `remote_write` for receive rings (dma-buf MRs always allow it).
    #[cfg(feature = "cuda")]
    fn register_gpu_mr(
        &self,
        dptr: u64,
        len: usize,
        remote_write: bool,
    ) -> Result<Mr, TransportError> {
        let gpu = |e: crate::gpu::GpuError| {
            TransportError::Unavailable(TransportKind::Verbs, format!("GPU memory: {e}"))
        };
        crate::gpu::init().map_err(gpu)?;
        let dmabuf = crate::gpu::dmabuf_fd(dptr, len)
            .map_err(|e| e.to_string())
            .and_then(|fd| {
                // SAFETY: the fd describes exactly dptr..dptr+len; the MR owns nothing else.
                unsafe { ib::Mr::register_dmabuf(&self.pd, fd, dptr, len) }
                    .map_err(|e| e.to_string())
            });
        match dmabuf {
            Ok(mr) => Ok(mr),
            // SAFETY: the caller's contract: the device memory outlives the MR.
            Err(dmabuf_err) => unsafe { Mr::register(&self.pd, dptr as *mut u8, len, remote_write) }.map_err(|e| {
                TransportError::Unavailable(
                    TransportKind::Verbs,
                    format!("GPU memory could not be registered: dma-buf: {dmabuf_err}; ibv_reg_mr (peer memory): {e}"),
                )
            }),
        }
    }
}

impl Transport for VerbsTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Verbs
    }

    fn counters(&self) -> TransportCounters {
        self.counters
    }

    /// Device, port, GID index and MTU in use.
    fn describe(&self) -> String {
        format!(
            "verbs on {} port {} gid index {} mtu {}",
            self.ctx.name, self.port, self.gid_index, self.mtu
        )
    }

    fn endpoint(&self) -> Vec<u8> {
        Endpoint {
            lid: self.lid,
            gid: self.gid,
            mtu: self.mtu,
            qpns: (0..self.world)
                .map(|p| (self.qps[2 * p].qp.num(), self.qps[2 * p + 1].qp.num()))
                .collect(),
        }
        .encode()
    }

    fn alloc(&mut self, len: usize) -> Result<Region, TransportError> {
        let id = self.locals.next_id();
        let seg = Segment::create(&format!("m2n-verbs-r{}", id.index()), len)?;
        let base = seg.as_ptr().as_ptr();
        // SAFETY: the segment lives in the same VerbsMemory as the MR.
        let mr = unsafe { Mr::register(&self.pd, base, len, true) }.map_err(ib_err)?;
        let descriptor = RegionDescriptor {
            addr: base as u64,
            rkey: mr.rkey(),
            len,
        }
        .encode();
        Ok(self.locals.add(
            Arc::new(VerbsMemory {
                base,
                len,
                mr,
                _owner: Some(Box::new(seg)),
            }),
            descriptor,
        ))
    }

    unsafe fn register(&mut self, ptr: *mut u8, len: usize) -> Result<Region, TransportError> {
        super::check_registrable(ptr, len)?;
        // SAFETY: forwarded contract: valid until the region drops.
        let mr = unsafe { Mr::register(&self.pd, ptr, len, false) }.map_err(ib_err)?;
        Ok(self.locals.add(
            Arc::new(VerbsMemory {
                base: ptr,
                len,
                mr,
                _owner: None,
            }),
            Vec::new(),
        ))
    }

    #[cfg(feature = "cuda")]
    unsafe fn register_device(&mut self, dptr: u64, len: usize) -> Result<Region, TransportError> {
        let mr = self.register_gpu_mr(dptr, len, false)?;
        Ok(self.locals.add_device(Arc::new(VerbsMemory {
            base: dptr as *mut u8,
            len,
            mr,
            _owner: None,
        })))
    }

    #[cfg(feature = "cuda")]
    fn alloc_gpu_ring(&mut self, len: usize, device: usize) -> Result<Region, TransportError> {
        let buf = crate::gpu::DeviceBuffer::alloc(device, len).map_err(|e| {
            TransportError::Unavailable(TransportKind::Verbs, format!("GPU receive ring: {e}"))
        })?;
        let dptr = buf.dptr;
        let mr = self.register_gpu_mr(dptr, len, true)?;
        let descriptor = RegionDescriptor {
            addr: dptr,
            rkey: mr.rkey(),
            len,
        }
        .encode();
        let mut region = self.locals.add_device(Arc::new(VerbsMemory {
            base: dptr as *mut u8,
            len,
            mr,
            _owner: Some(Box::new(buf)),
        }));
        region.descriptor = descriptor;
        Ok(region)
    }

    fn connect(&mut self, peer: usize, endpoint: &[u8]) -> Result<(), TransportError> {
        if peer >= self.world || peer == self.me {
            return Err(TransportError::NotConnected(peer));
        }
        let ep = Endpoint::decode(endpoint, self.world)
            .map_err(|source| TransportError::BadDescriptor { peer, source })?;
        let (lid, gid, mtu) = (ep.lid, ep.gid, ep.mtu);
        let (data_qpn, ack_qpn) = ep.qpns[self.me];
        for (lane, remote_qpn, class) in [
            (Lane::Data, data_qpn, self.opts.data),
            (Lane::Ack, ack_qpn, self.opts.ack),
        ] {
            let path = PathSettings {
                port: self.port,
                gid_index: self.gid_index,
                remote_gid: gid,
                remote_lid: lid,
                remote_qpn,
                mtu: mtu.min(self.mtu),
                traffic_class: class.traffic_class,
                service_level: class.service_level,
                timeout: self.opts.timeout,
                retry_cnt: self.opts.retry_cnt,
                rnr_retry: self.opts.rnr_retry,
            };
            self.qps[2 * peer + lane_index(lane)]
                .qp
                .connect(&path)
                .map_err(ib_err)?;
        }
        Ok(())
    }

    fn import(&mut self, peer: usize, descriptor: &[u8]) -> Result<RemoteRegion, TransportError> {
        let RegionDescriptor { addr, rkey, len } = RegionDescriptor::decode(descriptor)
            .map_err(|source| TransportError::BadDescriptor { peer, source })?;
        let key = self.imports.len() as u32;
        self.imports.push(Imported { peer, addr, rkey });
        Ok(RemoteRegion { peer, key, len })
    }

    unsafe fn post_write(
        &mut self,
        peer: usize,
        lane: Lane,
        req: &WriteRequest,
    ) -> Result<(), TransportError> {
        super::check_open(&self.closed, peer)?;
        let remote = *self
            .imports
            .get(req.remote.key as usize)
            .filter(|r| r.peer == peer)
            .ok_or(TransportError::NotConnected(peer))?;
        // The library refuses out-of-range writes before posting.
        let local = self.locals.source(peer, req, req.remote.len)?;
        // `source` checked that the length fits in 32 bits.
        let len = req.len as u32;
        let sq_depth = self.opts.sq_depth as usize;
        let slot_index = 2 * peer + lane_index(lane);
        let slot = &mut self.qps[slot_index];
        if slot.in_flight.len() + 1 >= sq_depth {
            return Err(TransportError::WouldBlock);
        }
        // Selective signalling: the caller's choice, plus one in every
        // sq_depth / 2 so unsignalled requests are retired in time.
        let signaled = req.signaled || slot.unsignaled_run + 1 >= (sq_depth / 2) as u32;
        slot.unsignaled_run = if signaled { 0 } else { slot.unsignaled_run + 1 };
        let seq = slot.next_seq;
        slot.next_seq += 1;
        let inline = len > 0 && len <= slot.qp.max_inline;
        slot.batch.push(Pending {
            wr_id: ((slot_index as u64) << SEQ_BITS) | seq,
            // SAFETY: in range, checked above.
            addr: unsafe { local.base().add(req.local_offset) } as u64,
            len,
            lkey: local.key(),
            remote_addr: remote.addr + req.remote_offset as u64,
            rkey: remote.rkey,
            imm: req.imm,
            signaled,
            inline,
        });
        slot.in_flight.push_back(InFlight {
            seq,
            user_wr_id: req.wr_id,
            report: req.signaled,
            _keep: local,
        });
        if slot.batch.len() >= 16 {
            self.flush();
        }
        Ok(())
    }

    fn owns(&self, region: RegionId) -> bool {
        self.locals.owns(region)
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<(), TransportError> {
        self.flush();
        let mut wcs = std::mem::take(&mut self.wcs.0);
        loop {
            let n = self.send_cq.poll(&mut wcs).map_err(ib_err)?;
            self.counters.cq_polls += 1;
            self.counters.completions += n as u64;
            for wc in &wcs[..n] {
                let slot_index = (wc.wr_id >> SEQ_BITS) as usize;
                let seq = wc.wr_id & ((1 << SEQ_BITS) - 1);
                if slot_index >= self.qps.len() {
                    continue;
                }
                if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
                    let peer = self.qps[slot_index].peer;
                    self.close_peer(peer, format!("write failed: {}", ib::status_str(wc.status)));
                }
                self.retire(slot_index, seq);
            }
            if n < wcs.len() {
                break;
            }
        }
        let mut consumed = self.srq_owed;
        loop {
            let n = self.recv_cq.poll(&mut wcs).map_err(ib_err)?;
            self.counters.cq_polls += 1;
            self.counters.completions += n as u64;
            for wc in &wcs[..n] {
                consumed += 1;
                let Some(&slot_index) = self.by_qpn.get(&wc.qp_num) else {
                    continue;
                };
                let peer = self.qps[slot_index].peer;
                if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
                    self.close_peer(
                        peer,
                        format!("receive failed: {}", ib::status_str(wc.status)),
                    );
                    continue;
                }
                if wc.opcode == ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM {
                    // SAFETY: with IBV_WC_RECV_RDMA_WITH_IMM the union holds the immediate.
                    let imm = u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data });
                    out.push(Completion::Arrived {
                        peer,
                        imm,
                        len: wc.byte_len as usize,
                    });
                }
            }
            if n < wcs.len() {
                break;
            }
        }
        self.wcs.0 = wcs;
        // Keep the shared receive queue full, a batch at a time (each post
        // may be a system call, e.g. on Soft-RoCE).
        let batch = (self.opts.srq_depth as usize / 8).clamp(1, 64);
        if consumed >= batch {
            self.counters.recv_posts += 1;
            self.srq.post_receives(consumed).map_err(ib_err)?;
            consumed = 0;
        }
        self.srq_owed = consumed;
        out.append(&mut self.done);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Two connected transports in this process, or `None` (with the reason
    /// printed) when there is no RDMA device.
    fn pair() -> Option<(VerbsTransport, VerbsTransport)> {
        if ib::device_names().is_empty() {
            println!("SKIPPED: no RDMA device here; scripts/rxe-vm runs this on Soft-RoCE");
            return None;
        }
        let mut a = VerbsTransport::new(0, 2, VerbsOptions::default()).unwrap();
        let mut b = VerbsTransport::new(1, 2, VerbsOptions::default()).unwrap();
        let (ea, eb) = (a.endpoint(), b.endpoint());
        a.connect(1, &eb).unwrap();
        b.connect(0, &ea).unwrap();
        Some((a, b))
    }

    fn req(
        local: &Region,
        remote: RemoteRegion,
        off: usize,
        len: usize,
        imm: Option<u32>,
    ) -> WriteRequest {
        WriteRequest::test(local, remote, off, len, imm, 9)
    }

    #[test]
    fn write_with_imm_lands_and_out_of_range_is_refused_before_posting() {
        let Some((mut a, mut b)) = pair() else { return };
        let mut src = a.alloc(1 << 20).unwrap();
        crate::pattern::fill(src.as_mut_slice(), 5);
        let dst = b.alloc((1 << 20) + 64).unwrap();
        let remote = a.import(1, dst.descriptor()).unwrap();
        // SAFETY: src is not modified until its completion.
        let err = unsafe { a.post_write(1, Lane::Data, &req(&src, remote, 65, 1 << 20, None)) }
            .unwrap_err();
        assert!(
            matches!(err, TransportError::OutOfBounds { side: "remote", .. }),
            "{err}"
        );
        for (off, len, imm) in [(64, 1 << 20, 0xabcd), (0, 0, 7), (8, 8, 8)] {
            // SAFETY: as above.
            unsafe { a.post_write(1, Lane::Data, &req(&src, remote, off, len, Some(imm))) }
                .unwrap();
            let (mut ca, mut cb) = (Vec::new(), Vec::new());
            let deadline = Instant::now() + Duration::from_secs(20);
            while cb.is_empty() || !ca.contains(&Completion::WriteDone { wr_id: 9 }) {
                assert!(Instant::now() < deadline, "no completion: {ca:?} {cb:?}");
                a.poll(&mut ca).unwrap();
                b.poll(&mut cb).unwrap();
            }
            assert_eq!(cb, vec![Completion::Arrived { peer: 0, imm, len }]);
        }
        assert_eq!(crate::pattern::count_wrong(&dst.as_slice()[64..], 5), 0);
    }

    #[test]
    fn no_device_is_a_clear_unavailable_error() {
        if !ib::device_names().is_empty() {
            println!(
                "skipped: this machine has RDMA devices {:?}",
                ib::device_names()
            );
            return;
        }
        let err = VerbsTransport::new(0, 2, VerbsOptions::default()).unwrap_err();
        assert!(
            matches!(err, TransportError::Unavailable(TransportKind::Verbs, _)),
            "{err}"
        );
        assert!(err.to_string().contains("no RDMA device"), "{err}");
        let err = probe(&VerbsOptions {
            device: Some("mlx5_9".into()),
            ..VerbsOptions::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("RDMA device"), "{err}");
    }

    #[test]
    fn descriptors_round_trip_and_reject_garbage() {
        let ep = Endpoint {
            lid: 7,
            gid: [0xfe; 16],
            mtu: 1024,
            qpns: vec![(11, 12), (21, 22), (31, 32)],
        };
        assert_eq!(Endpoint::decode(&ep.encode(), 3).unwrap(), ep);
        let err = Endpoint::decode(&ep.encode(), 4).unwrap_err().to_string();
        assert!(err.contains("world 3, ours is 4"), "{err}");
        let mut cut = ep.encode();
        cut.truncate(cut.len() - 2);
        assert!(Endpoint::decode(&cut, 3).is_err());
        let rd = RegionDescriptor {
            addr: 0x7f00_0000_1000,
            rkey: 0xabcd,
            len: 4096,
        };
        assert_eq!(RegionDescriptor::decode(&rd.encode()).unwrap(), rd);
        let err = RegionDescriptor::decode(&ep.encode())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a verbs region descriptor"), "{err}");
        let wrap = RegionDescriptor {
            addr: u64::MAX - 10,
            rkey: 1,
            len: 4096,
        };
        let err = RegionDescriptor::decode(&wrap.encode())
            .unwrap_err()
            .to_string();
        assert!(err.contains("wrap around"), "{err}");
    }

    #[test]
    fn mtu_conversions() {
        assert_eq!(ib::mtu_bytes(ib::mtu_enum(4096)), 4096);
        assert_eq!(ib::mtu_bytes(ib::mtu_enum(3000)), 2048);
        assert_eq!(ib::mtu_bytes(ib::mtu_enum(1)), 256);
        assert_eq!(ib::mtu_bytes(ibv_mtu::IBV_MTU_1024), 1024);
    }
}
