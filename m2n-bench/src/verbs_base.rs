//! The raw-verbs baseline (`--baseline verbs`): the same pattern, sizes
//! and timing as m2n, as RDMA WRITE WITH IMMEDIATE straight into a
//! pre-registered receive region, with a shared receive queue and busy
//! completion polling, and no protocol at all: no credits, no slot rings,
//! no checks of arrivals. One RC queue pair per peer, every write
//! signalled (one per queue pair and round, so nothing is saved by
//! signalling fewer), small writes inline. It is the like-for-like floor
//! m2n's verbs transport is measured against in the same run.
//!
//! Without credits a sender could overwrite a message its receiver has
//! not read; the benchmark's barrier before every round is what makes
//! that impossible here (one round per barrier). With `--timing loop`
//! only `roundtrip` is safe (a sender's next round waits for the combine
//! of its last), so m2n_perf refuses loop timing of `dispatch` with this
//! baseline.

use std::sync::Arc;

use m2n::config::IbConfig;
use m2n::pattern;
use m2n::proto::ChannelId;
use m2n::transport::verbs::ib::{Context, Cq, Mr, PathSettings, Pd, Qp, Srq};
use m2n::{Role, WaitPolicy};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use rdma_sys::*;

use crate::cli::Pattern;
use crate::run::{Clock, Place, Sample};

/// What a rank publishes: GID, LID, its receive region, and the number of
/// the queue pair it keeps for every MPI rank (0 for ranks on its side).
const fn record_bytes(world: usize) -> usize {
    16 + 2 + 8 + 4 + 4 * world
}

/// A region of host memory registered for (remote) writes.
struct Buffer {
    /// Declared first: deregistered before the memory is freed.
    mr: Mr,
    bytes: Vec<u8>,
}

impl Buffer {
    fn new(pd: &Arc<Pd>, len: usize, remote_write: bool) -> Result<Self, String> {
        let mut bytes = vec![0u8; len.max(1)];
        // SAFETY: `bytes` is never reallocated and outlives the Mr (the
        // Buffer owns both and drops the Mr first).
        let mr = unsafe { Mr::register(pd, bytes.as_mut_ptr(), bytes.len(), remote_write) }
            .map_err(|e| e.to_string())?;
        Ok(Buffer { mr, bytes })
    }
    fn addr(&self) -> u64 {
        self.bytes.as_ptr() as u64
    }
}

/// Raw verbs on one rank.
pub struct VerbsRank {
    place: Place,
    wait: WaitPolicy,
    max_bytes: usize,
    send_cq: Arc<Cq>,
    recv_cq: Arc<Cq>,
    srq: Arc<Srq>,
    /// One queue pair per peer on the other side.
    qps: Vec<Qp>,
    /// Where peer `p`'s message goes: its receive region + our slot.
    remote: Vec<(u64, u32)>,
    send: Buffer,
    /// One `max_bytes` slot per peer, written by that peer.
    recv: Buffer,
    wcs: Vec<ibv_wc>,
    k: u64,
}

impl VerbsRank {
    /// Opens the device m2n uses on this rank (`ib`, as the communicator
    /// resolved it), connects a queue pair to every peer (addresses
    /// exchanged with an MPI all-gather) and posts the receives.
    pub fn new(
        world: &SimpleCommunicator,
        place: Place,
        ib: &IbConfig,
        max_bytes: usize,
        wait: WaitPolicy,
    ) -> Result<Self, String> {
        let e = |e: m2n::transport::verbs::ib::IbError| e.to_string();
        let ctx = Context::open(ib.device.as_deref()).map_err(e)?;
        let (port, attr) = ctx.choose_port(ib.port).map_err(e)?;
        let (gid_index, gid) = ctx.choose_gid(port, &attr, ib.gid_index).map_err(e)?;
        let active = m2n::transport::verbs::ib::mtu_bytes(attr.active_mtu);
        let mtu = ib.mtu.min(active);
        let pd = Pd::new(&ctx).map_err(e)?;
        let peers = place.peers();
        let depth = (4 * peers).max(16) as i32;
        let send_cq = Cq::new(&ctx, depth).map_err(e)?;
        let recv_cq = Cq::new(&ctx, depth).map_err(e)?;
        let srq = Srq::new(&pd, depth as u32).map_err(e)?;
        let qps = (0..peers)
            .map(|_| Qp::new(&pd, &send_cq, &recv_cq, &srq, 16, ib.max_inline).map_err(e))
            .collect::<Result<Vec<_>, _>>()?;
        let send = Buffer::new(&pd, peers * max_bytes, false)?;
        let recv = Buffer::new(&pd, peers * max_bytes, true)?;

        // Publish, gather, connect.
        let size = world.size() as usize;
        let rec = record_bytes(size);
        let mut mine = vec![0u8; rec];
        mine[..16].copy_from_slice(&gid);
        mine[16..18].copy_from_slice(&attr.lid.to_le_bytes());
        mine[18..26].copy_from_slice(&recv.addr().to_le_bytes());
        mine[26..30].copy_from_slice(&recv.mr.rkey().to_le_bytes());
        for (p, qp) in qps.iter().enumerate() {
            let at = 30 + 4 * place.mpi_rank(p) as usize;
            mine[at..at + 4].copy_from_slice(&qp.num().to_le_bytes());
        }
        let mut all = vec![0u8; rec * size];
        world.all_gather_into(&mine[..], &mut all[..]);
        let me = world.rank() as usize;
        let mut remote = Vec::with_capacity(peers);
        for (p, qp) in qps.iter().enumerate() {
            let r = &all[rec * place.mpi_rank(p) as usize..][..rec];
            let u32_at = |at: usize| u32::from_le_bytes(r[at..at + 4].try_into().expect("4 bytes"));
            let mut remote_gid = [0u8; 16];
            remote_gid.copy_from_slice(&r[..16]);
            let path = PathSettings {
                port,
                gid_index,
                remote_gid,
                remote_lid: u16::from_le_bytes([r[16], r[17]]),
                remote_qpn: u32_at(30 + 4 * me),
                mtu,
                traffic_class: ib.data.traffic_class,
                service_level: ib.data.service_level,
                timeout: ib.timeout,
                retry_cnt: ib.retry_cnt,
                rnr_retry: ib.rnr_retry,
            };
            qp.connect(&path).map_err(e)?;
            let addr = u64::from_le_bytes(r[18..26].try_into().expect("8 bytes"));
            // Our slot in the peer's region is our index on our side.
            remote.push((addr + (place.rank * max_bytes) as u64, u32_at(26)));
        }
        srq.post_receives(depth as usize).map_err(e)?;
        // Every queue pair is ready before anyone writes.
        world.barrier();
        Ok(VerbsRank {
            place,
            wait,
            max_bytes,
            send_cq,
            recv_cq,
            srq,
            qps,
            remote,
            send,
            recv,
            // SAFETY: zeroed plain-data completion entries are valid.
            wcs: (0..depth).map(|_| unsafe { std::mem::zeroed() }).collect(),
            k: 0,
        })
    }

    /// One WRITE WITH IMMEDIATE of `size` bytes to every peer, one
    /// doorbell per queue pair, every write signalled.
    fn post_writes(&mut self, size: usize) -> Result<(), String> {
        for p in 0..self.qps.len() {
            let (addr, rkey) = self.remote[p];
            let mut sge = ibv_sge {
                addr: self.send.addr() + (p * self.max_bytes) as u64,
                length: size as u32,
                lkey: self.send.mr.lkey(),
            };
            // SAFETY: zeroed plain-data work request, filled in below.
            let mut wr: ibv_send_wr = unsafe { std::mem::zeroed() };
            wr.wr_id = p as u64;
            wr.sg_list = &mut sge;
            wr.num_sge = 1;
            wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
            let mut flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
            if size as u32 <= self.qps[p].max_inline {
                flags |= ibv_send_flags::IBV_SEND_INLINE.0;
            }
            wr.send_flags = flags;
            wr.imm_data_invalidated_rkey_union.imm_data = (self.place.rank as u32).to_be();
            wr.wr.rdma = rdma_t {
                remote_addr: addr,
                rkey,
            };
            // SAFETY: one well-formed request; the SGE names `send`, which is
            // registered in this PD and not changed until the completion.
            unsafe { self.qps[p].post_send(&mut wr) }
                .map_err(|e| format!("ibv_post_send to peer {p}: {e}"))?;
        }
        Ok(())
    }

    /// Polls `cq` until `want` completions (checking each one's status).
    fn poll(&mut self, recv: bool, want: usize) -> Result<(), String> {
        let mut got = 0;
        let mut backoff = m2n::wait::Backoff::new(self.wait);
        while got < want {
            let cq = if recv { &self.recv_cq } else { &self.send_cq };
            let n = cq
                .poll(&mut self.wcs[..want - got])
                .map_err(|e| e.to_string())?;
            for wc in &self.wcs[..n] {
                if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
                    return Err(format!(
                        "{} completion failed: {}",
                        if recv { "receive" } else { "write" },
                        m2n::transport::verbs::ib::status_str(wc.status)
                    ));
                }
            }
            got += n;
            backoff.wait(n > 0);
        }
        if recv {
            self.srq.post_receives(want).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn fill(&mut self, channel: ChannelId, size: usize) {
        for p in 0..self.place.peers() {
            let at = p * self.max_bytes;
            pattern::fill(
                &mut self.send.bytes[at..at + size],
                pattern::seed(channel, self.place.rank, p, self.k),
            );
        }
    }

    fn count_wrong(&self, channel: ChannelId, size: usize) -> u64 {
        (0..self.place.peers())
            .map(|p| {
                let at = p * self.max_bytes;
                pattern::count_wrong(
                    &self.recv.bytes[at..at + size],
                    pattern::seed(channel, p, self.place.rank, self.k),
                ) as u64
            })
            .sum()
    }

    pub fn iteration(
        &mut self,
        world: &SimpleCommunicator,
        clock: &mut Clock,
        pattern: Pattern,
        size: usize,
        verify: bool,
    ) -> Result<Sample, String> {
        let peers = self.place.peers();
        let mut wrong = 0;
        if verify && self.place.role == Role::Attention {
            self.fill(ChannelId::Dispatch, size);
        }
        let t0 = clock.start(world);
        match (self.place.role, pattern) {
            (Role::Attention, p) => {
                self.post_writes(size)?;
                self.poll(false, peers)?;
                if p == Pattern::Roundtrip {
                    self.poll(true, peers)?;
                }
            }
            (Role::Expert, p) => {
                self.poll(true, peers)?;
                if p == Pattern::Roundtrip {
                    if verify {
                        wrong += self.count_wrong(ChannelId::Dispatch, size);
                        self.fill(ChannelId::Combine, size);
                    }
                    self.post_writes(size)?;
                    self.poll(false, peers)?;
                }
            }
        }
        let t1 = clock.stop();
        if let Some(ch) = self.place.checked_at_end(pattern).filter(|_| verify) {
            wrong += self.count_wrong(ch, size);
        }
        self.k += 1;
        Ok(Sample {
            span: t1 - t0,
            wrong,
        })
    }
}
