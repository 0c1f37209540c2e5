//! The expert worker: its `E / N` experts of every layer, fed by dispatch
//! rounds, answering with combine rounds.
//!
//! Rounds arrive in `(step, layer, micro-batch)` order. For each, every
//! attention rank's message is checked ([`super::msg::read_dispatch`]),
//! each run of rows of one expert goes through that expert straight from
//! the receive ring into the registered combine buffer, the dispatch round
//! is released (its slots return as credit) and the combine round is
//! posted. Two combine buffers alternate, so computing round `k + 1` never
//! waits for round `k` to leave.

use std::ops::Range;
use std::time::{Duration, Instant};

use kernels::cpu::ffn::FfnScratch;
use m2n::{Communicator, Msg, RecvRound, Region};

use super::msg::{self, Header, FLAG_ACTIVE, FLAG_WAITED, WAIT_THRESHOLD_NS};
use super::{recycle, round_position, Deployment, POLL};
use crate::model::forward;
use crate::model::weights::ExpertWeights;
use crate::model::{ModelConfig, RuntimeError};

/// What an expert worker did, for benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpertStats {
    pub rounds: u64,
    pub steps: u64,
    pub rows: u64,
    /// Time computing (from a round in to its combine posted).
    pub busy_ns: u64,
    /// Time waiting for dispatch rounds.
    pub idle_ns: u64,
}

/// An expert worker. See the module docs.
#[derive(Debug)]
pub struct ExpertWorker {
    config: ModelConfig,
    deploy: Deployment,
    weights: ExpertWeights,
    experts: Range<usize>,
    comm: Communicator,
    send: [Region; 2],
    sent: [Option<u64>; 2],
    section: usize,
    scratch: FfnScratch,
    /// Per-round lists kept for their allocations (a round allocates
    /// nothing once warm).
    rows_of: Vec<usize>,
    spare_msgs: Vec<Msg<'static>>,
    timeout: Duration,
}

impl ExpertWorker {
    pub fn new(
        config: ModelConfig,
        deploy: Deployment,
        weights: ExpertWeights,
        mut comm: Communicator,
        timeout: Duration,
    ) -> Result<Self, RuntimeError> {
        deploy.validate(&config)?;
        let experts = deploy.experts_of(&config, comm.rank());
        let first_moe = config.moe_layers().first().copied().unwrap_or(0);
        if weights.first != experts.start
            || weights.layers.get(first_moe).map_or(0, |l| l.len()) != experts.len()
        {
            return Err(RuntimeError::Config(format!(
                "expert rank {} needs experts {}..{}",
                comm.rank(),
                experts.start,
                experts.end
            )));
        }
        let section = comm.config().combine.slot_bytes;
        let total = section * deploy.attention;
        let send = [comm.alloc(total)?, comm.alloc(total)?];
        Ok(Self {
            config,
            deploy,
            weights,
            experts,
            comm,
            send,
            sent: [None, None],
            section,
            scratch: FfnScratch::default(),
            rows_of: Vec::with_capacity(deploy.attention),
            spare_msgs: Vec::with_capacity(deploy.attention),
            timeout,
        })
    }

    /// Serves rounds until the attention ranks finish a step in which none
    /// of them had work (see the attention module's "Ending").
    pub fn run(&mut self) -> Result<ExpertStats, RuntimeError> {
        let moe_layers = self.config.moe_layers();
        let (first, last) = (moe_layers[0], moe_layers[moe_layers.len() - 1]);
        let m = self.deploy.microbatches;
        let mut stats = ExpertStats::default();
        let mut idle_since = Instant::now();
        let mut group_active = true;
        for k in 0u64.. {
            let at = round_position(k, &moe_layers, m);
            let round = self.next_dispatch()?;
            let t_in = Instant::now();
            let idle = (t_in - idle_since).as_nanos() as u64;
            stats.idle_ns += idle;
            // Two combine buffers alternate: the one round k - 2 left from
            // must be free again.
            let buf = (k % 2) as usize;
            if let Some(prev) = self.sent[buf].take() {
                self.comm.combine().wait_sent(prev, self.timeout)?;
            }
            let any_active = self.compute(&round, at, buf, &mut stats)?;
            let (_, layer, mb) = at;
            if layer == first && mb == 0 {
                group_active = any_active;
            }
            let compute = t_in.elapsed().as_nanos() as u64;
            self.comm.dispatch().release(round)?;
            let residence = t_in.elapsed().as_nanos() as u64;
            let waited = if idle > WAIT_THRESHOLD_NS {
                FLAG_WAITED
            } else {
                0
            };
            let flags = waited | if group_active { FLAG_ACTIVE } else { 0 };
            self.post_combine(buf, at, flags, [clamp32(residence), clamp32(compute)])?;
            stats.rounds += 1;
            stats.busy_ns += t_in.elapsed().as_nanos() as u64;
            idle_since = Instant::now();
            if layer == last && mb == m - 1 {
                stats.steps += 1;
                if !group_active {
                    break;
                }
            }
        }
        for s in self.sent.iter_mut() {
            if let Some(r) = s.take() {
                self.comm.combine().wait_sent(r, self.timeout)?;
            }
        }
        Ok(stats)
    }

    /// The next dispatch round. Idle as long as the attention ranks are: a
    /// server may have no requests for hours. A lost or hung peer ends the
    /// wait (m2n's liveness links), so this never hangs on a dead group.
    fn next_dispatch(&mut self) -> Result<RecvRound, RuntimeError> {
        loop {
            match self.comm.dispatch().recv(POLL) {
                Ok(r) => return Ok(r),
                Err(m2n::Error::Timeout { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Checks every attention rank's message of the round at `(step,
    /// layer, micro-batch)` and runs its rows through this rank's experts,
    /// from the receive ring into combine buffer `buf`. Returns whether any
    /// attention rank said ACTIVE.
    fn compute(
        &mut self,
        round: &RecvRound,
        (step, layer, mb): (u64, usize, usize),
        buf: usize,
        stats: &mut ExpertStats,
    ) -> Result<bool, RuntimeError> {
        let h = self.config.hidden as usize;
        let range = self.experts.start as u32..self.experts.end as u32;
        let want = (
            step as u32,
            layer as u16,
            mb as u16,
            self.deploy.microbatches as u32,
            self.config.layers as u32,
        );
        self.rows_of.clear();
        let mut any_active = false;
        for a in 0..self.deploy.attention {
            let bad = |detail: String| RuntimeError::Message {
                peer: format!("attention {a}"),
                detail,
            };
            let d =
                msg::read_dispatch(self.comm.message(round, a), h, range.clone()).map_err(bad)?;
            let got = (
                d.head.step,
                d.head.layer,
                d.head.microbatch,
                d.head.extra[0],
                d.head.extra[1],
            );
            if got != want {
                return Err(bad(format!(
                    "(step, layer, micro-batch, micro-batches, layers) = {got:?}, expected {want:?}"
                )));
            }
            any_active |= d.head.flags & FLAG_ACTIVE != 0;
            let rows = d.rows();
            let out = &mut self.send[buf].as_mut_slice()[a * self.section..(a + 1) * self.section];
            let y = msg::combine_rows_mut(out, rows, h);
            // Each run of rows of one expert through that expert.
            let mut i = 0;
            while i < rows {
                let e = d.expert(i);
                let j = (i..rows).find(|&j| d.expert(j) != e).unwrap_or(rows);
                let expert = &self.weights.layers[layer][e as usize - self.experts.start];
                forward::expert_rows(
                    expert,
                    &d.data[i * h..j * h],
                    &mut y[i * h..j * h],
                    &mut self.scratch,
                );
                i = j;
            }
            stats.rows += rows as u64;
            self.rows_of.push(rows);
        }
        Ok(any_active)
    }

    /// Writes the combine headers into buffer `buf` (its rows are already
    /// there) and posts the combine round.
    fn post_combine(
        &mut self,
        buf: usize,
        (step, layer, mb): (u64, usize, usize),
        flags: u16,
        extra: [u32; 2],
    ) -> Result<(), RuntimeError> {
        let h = self.config.hidden as usize;
        for (a, &rows) in self.rows_of.iter().enumerate() {
            let head = Header {
                flags,
                step: step as u32,
                layer: layer as u16,
                microbatch: mb as u16,
                rows: rows as u32,
                hidden: h as u32,
                extra,
            };
            let out = &mut self.send[buf].as_mut_slice()[a * self.section..];
            msg::write_combine_header(out, &head);
        }
        let region = &self.send[buf];
        let mut msgs: Vec<Msg<'_>> = recycle(std::mem::take(&mut self.spare_msgs));
        msgs.extend(
            self.rows_of
                .iter()
                .enumerate()
                .map(|(a, &rows)| Msg::new(region, a * self.section, msg::combine_len(rows, h))),
        );
        let sent = self.comm.combine().send(&msgs, self.timeout)?;
        self.spare_msgs = recycle(msgs);
        self.sent[buf] = Some(sent);
        Ok(())
    }

    /// Aborts the communicator, so that peers fail fast.
    pub fn abort(&mut self) {
        self.comm.abort();
    }

    /// Leaves the group, keeping the weights (for a worker that joins the
    /// group re-formed after a loss: only a replacement loads weights).
    pub fn into_weights(self) -> ExpertWeights {
        let Self {
            weights,
            send,
            comm,
            ..
        } = self;
        drop(send);
        drop(comm);
        weights
    }
}

fn clamp32(ns: u64) -> u32 {
    ns.min(u64::from(u32::MAX)) as u32
}
