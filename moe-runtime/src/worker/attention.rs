//! The attention worker: sequences, KV caches, attention, router and
//! dispatch layout, the LM head; and the engine API a driver uses
//! ([`AttentionWorker::submit`], [`step`](AttentionWorker::step),
//! [`cancel`](AttentionWorker::cancel)).
//!
//! # The ping-pong schedule
//!
//! A step runs every sequence forward by its next rows (a prefill chunk or
//! one decode token). The rows are split into `m` micro-batches, and each
//! layer is pipelined over them: while the experts work on micro-batch
//! `i`, attention works on `i + 1`:
//!
//! ```text
//! for layer l:
//!     for micro-batch i:
//!         if l > 0: recv combine (l-1, i); x_i = h_i + combine   (finish)
//!         h_i = x_i + attention_l(x_i); route; send dispatch (l, i)
//! for micro-batch i: recv combine (L-1, i); x_i = h_i + combine
//! LM head on each sequence's last row
//! ```
//!
//! Dense layers (DeepSeek-V3's first `first_k_dense_replace`, the Qwen
//! families' `mlp_only_layers`) run their MLP here too, right after their
//! attention, and have no round: the experts never see them (the rounds'
//! order skips them on both sides, see [`super::round_position`]). They
//! do not overlap anything; their time is attention-side time.
//!
//! Families with a shared expert (Qwen2-MoE, DeepSeek-V3) run it here, on the attention
//! side, right after `send dispatch (l, i)`: every token goes through it,
//! so it needs no routing, and computing it while the routed experts work
//! on round `(l, i)` hides it behind the round trip. Its output joins the
//! combine in `finish` (`x_i = h_i + (combine + shared)`); its time counts
//! in T_a.
//!
//! Rounds go out in `(layer, micro-batch)` order on both channels, so at
//! most `m` rounds are in flight per attention worker and m2n's depth must
//! be at least `m`. Every attention worker sends every expert worker one
//! message per round (with zero rows when it has nothing for it), so all
//! ranks stay in lockstep whatever their batches.
//!
//! # Ending
//!
//! Each dispatch carries ACTIVE (this rank has sequences this step); the
//! experts OR them in the first round of a step and echo the result in
//! every combine as GROUP_ACTIVE. A step in which no attention rank had
//! work is the group's last: every rank finishes it and stops.

use std::time::{Duration, Instant};

use half::bf16;
use kernels::cpu::attention::KvCache;
use kernels::cpu::layout::{plan_into, Combiner, Entry, PlanScratch};
use kernels::LayerShape;
use m2n::{Communicator, Msg, Region};

use super::msg::{self, Header, FLAG_ACTIVE, FLAG_WAITED, WAIT_THRESHOLD_NS};
use super::sampling::apply_penalties;
pub use super::sampling::{sample, sample_with, Sampling};
use super::{recycle, step_rounds, Deployment, POLL};
use crate::model::forward::{self, Scratch, Segment};
use crate::model::reference::check_prompt;
use crate::model::weights::AttentionWeights;
use crate::model::{ModelConfig, RuntimeError};

/// A sequence's id, chosen by the driver.
pub type SeqId = u64;

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Finish {
    /// It generated a stop token.
    Stop,
    /// It reached its token budget.
    Length,
}

/// What a step produced for one sequence.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Token {
    pub seq: SeqId,
    pub token: u32,
    /// Natural-log probability of `token` under the f32 logits.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, best first, as
    /// many as the request asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<(u32, f32)>,
    /// The sequence ended with this token (and left the batch).
    pub finish: Option<Finish>,
}

/// A sequence to run.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_new: usize,
    /// Token ids that end the sequence (e.g. end of sequence).
    pub stop: Vec<u32>,
    pub sampling: Sampling,
    /// Report the log-probability of each prompt token after the first
    /// (given the tokens before it) with this many most likely
    /// alternatives; `None`: do not (it costs an LM head per prompt row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<usize>,
    /// Tokens this sequence already generated elsewhere (a worker that was
    /// lost): they are prefilled after the prompt and count as generated
    /// (for `max_new`, `min_tokens`, the penalties and the seeded draws),
    /// so the sequence goes on exactly where it stopped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resume: Vec<u32>,
}

/// A prompt token's log-probability given the tokens before it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PromptLogprob {
    pub seq: SeqId,
    /// Its index in the prompt (from 1: the first token has no context).
    pub pos: u32,
    pub token: u32,
    pub logprob: f32,
    /// 1 + the number of tokens the model found more likely.
    pub rank: u32,
    /// The most likely tokens and their log-probabilities, best first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub top: Vec<(u32, f32)>,
}

/// Timing of one micro-batch in one layer, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct MbTiming {
    pub layer: u16,
    pub microbatch: u16,
    /// Rows (tokens) of the micro-batch.
    pub rows: u32,
    /// Rows sent to experts (tokens x top-k).
    pub expert_rows: u32,
    /// Attention compute for this micro-batch and layer (T_a): attention,
    /// router, layout into the send buffer, and the shared expert.
    pub t_a: u64,
    /// Of `t_a`, the shared expert's part (0 in families without one).
    pub t_shared: u64,
    /// Slowest expert's compute on it (T_e).
    pub t_e: u64,
    /// Communication (T_c): dispatch posted to combine received, less the
    /// time the round spent at the slowest expert.
    pub t_c: u64,
    /// Whether `t_c` is pure communication: both sides were waiting for
    /// the round (so it queued behind no other micro-batch at the experts
    /// and no attention work here). With `m > 1` some rounds queue by
    /// design; only these samples measure the transfer.
    pub t_c_clean: bool,
    /// Time the round spent at the slowest expert (received to posted).
    pub residence: u64,
}

/// One step's outcome. [`AttentionWorker::step_into`] refills one report
/// step after step without allocating.
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    pub tokens: Vec<Token>,
    /// Prompt log-probabilities of the rows prefilled this step, for the
    /// sequences that asked (in prompt order per sequence).
    pub prompt_logprobs: Vec<PromptLogprob>,
    /// Whether any attention rank had work this step; when false, this was
    /// the group's last step and the experts have stopped.
    pub group_active: bool,
    /// Rows this rank ran, prefill and decode.
    pub rows: usize,
    pub wall_ns: u64,
    /// Time blocked waiting for combine rounds.
    pub wait_ns: u64,
    /// Time in the dense layers (attention and MLP, every micro-batch);
    /// they have no round, so no entry in `timings`.
    pub dense_ns: u64,
    pub timings: Vec<MbTiming>,
}

#[derive(Debug)]
struct Sequence {
    id: SeqId,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    max_new: usize,
    stop: Vec<u32>,
    sampling: Sampling,
    prompt_logprobs: Option<usize>,
    rng: u64,
    caches: Vec<KvCache>,
    /// Tokens in the caches.
    pos: usize,
    /// This step: micro-batch and rows, if scheduled.
    mb: Option<usize>,
    rows: usize,
}

impl Sequence {
    /// Tokens of its context: the prompt, then what it generated.
    fn context_len(&self) -> usize {
        self.prompt.len() + self.generated.len()
    }

    /// Rows it wants next (up to `cap`): the context not yet in its KV
    /// cache. A prefill chunk, one decode token, or (resumed) the prompt
    /// and the tokens it had generated.
    fn wanted(&self, cap: usize) -> usize {
        (self.context_len() - self.pos).min(cap)
    }

    /// Whether it is decoding (its next row is its last token).
    fn decoding(&self) -> bool {
        self.pos >= self.prompt.len() && self.context_len() - self.pos == 1
    }

    /// Appends the tokens of its next `rows` rows to `out`.
    fn input_into(&self, rows: usize, out: &mut Vec<u32>) {
        let (start, end) = (self.pos, self.pos + rows);
        let p = self.prompt.len();
        if start < p {
            out.extend_from_slice(&self.prompt[start..end.min(p)]);
        }
        if end > p {
            out.extend_from_slice(&self.generated[start.max(p) - p..end - p]);
        }
    }

    /// Forgets whatever a step that did not finish wrote to its KV caches.
    fn roll_back(&mut self) {
        for c in &mut self.caches {
            c.truncate(self.pos);
        }
        self.mb = None;
        self.rows = 0;
    }
}

/// One micro-batch's state within a step.
#[derive(Debug, Default)]
struct MicroBatch {
    /// The residual stream (`rows x hidden`).
    x: Vec<bf16>,
    /// The experts' input (post-attention norm).
    y: Vec<bf16>,
    /// Entries per expert rank (the dispatch layout).
    entries: Vec<Vec<Entry>>,
    /// Dispatch round in flight, and when it was posted.
    round: Option<u64>,
    /// The shared expert's output (families that have one), computed while
    /// the round is at the routed experts.
    shared: Vec<bf16>,
    posted: Option<Instant>,
    t_a: u64,
    t_shared: u64,
}

/// An attention worker. See the module docs.
#[derive(Debug)]
pub struct AttentionWorker {
    config: ModelConfig,
    shape: LayerShape,
    deploy: Deployment,
    rank: usize,
    weights: AttentionWeights,
    comm: Communicator,
    /// One registered send buffer per micro-batch: a section of
    /// `dispatch.slot_bytes` per expert rank.
    send: Vec<Region>,
    section: usize,
    seqs: Vec<Sequence>,
    mbs: Vec<MicroBatch>,
    step: u64,
    scratch: Scratch,
    plan: PlanScratch,
    combiner: Combiner,
    moe_out: Vec<bf16>,
    logits: Vec<f32>,
    /// The logits after the penalties (sequences that ask for any), and
    /// a flag per vocabulary entry for them (see `sampling`).
    processed: Vec<f32>,
    seen: Vec<bool>,
    /// Per-step lists kept for their allocations (a decode step allocates
    /// nothing once warm; `tests/alloc.rs` holds it to that).
    load: Vec<usize>,
    order: Vec<usize>,
    tokens: Vec<u32>,
    lens: Vec<usize>,
    probs: Vec<(u32, f64)>,
    spare_msgs: Vec<Msg<'static>>,
    spare_segs: Vec<Segment<'static>>,
    timeout: Duration,
}

impl AttentionWorker {
    /// The transport this worker's communicator runs on (what `auto`
    /// chose, or what `M2N_TRANSPORT` named).
    pub fn transport(&self) -> m2n::TransportKind {
        self.comm.transport_kind()
    }

    /// Wraps a communicator (joined as attention rank `rank`) and the
    /// weights into a worker.
    pub fn new(
        config: ModelConfig,
        deploy: Deployment,
        weights: AttentionWeights,
        mut comm: Communicator,
        timeout: Duration,
    ) -> Result<Self, RuntimeError> {
        deploy.validate(&config)?;
        let section = comm.config().dispatch.slot_bytes;
        let send = (0..deploy.microbatches)
            .map(|_| comm.alloc(section * deploy.experts))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            shape: config.layer_shape(),
            rank: comm.rank(),
            config,
            deploy,
            weights,
            comm,
            send,
            section,
            seqs: Vec::new(),
            mbs: (0..deploy.microbatches)
                .map(|_| MicroBatch::default())
                .collect(),
            step: 0,
            scratch: Scratch::default(),
            plan: PlanScratch::default(),
            combiner: Combiner::default(),
            moe_out: Vec::new(),
            logits: Vec::new(),
            processed: Vec::new(),
            seen: Vec::new(),
            load: Vec::new(),
            order: Vec::new(),
            tokens: Vec::new(),
            lens: Vec::new(),
            probs: Vec::new(),
            spare_msgs: Vec::new(),
            spare_segs: Vec::new(),
            timeout,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Adds a sequence: it joins the batch at the next step.
    pub fn submit(&mut self, id: SeqId, req: Request) -> Result<(), RuntimeError> {
        let Request {
            prompt,
            max_new,
            stop,
            sampling,
            prompt_logprobs,
            resume,
        } = req;
        check_prompt(&prompt, self.config.vocab)?;
        if let Some(&t) = resume.iter().find(|&&t| u64::from(t) >= self.config.vocab) {
            return Err(RuntimeError::Request(format!(
                "resumed token {t} is outside the vocabulary of {}",
                self.config.vocab
            )));
        }
        if resume.len() >= max_new {
            return Err(RuntimeError::Request(format!(
                "{} tokens to resume leave none of the {max_new} to generate",
                resume.len()
            )));
        }
        if let Some(why) = sampling.check() {
            return Err(RuntimeError::Request(why));
        }
        if let Some(&t) = stop.iter().find(|&&t| u64::from(t) >= self.config.vocab) {
            return Err(RuntimeError::Request(format!(
                "stop token {t} is outside the vocabulary of {}",
                self.config.vocab
            )));
        }
        if max_new == 0 {
            return Err(RuntimeError::Request(
                "max new tokens must be at least 1".into(),
            ));
        }
        if self.seqs.iter().any(|s| s.id == id) {
            return Err(RuntimeError::Request(format!(
                "sequence {id} is already running"
            )));
        }
        // The KV cache and the token list are sized for the whole sequence
        // now, so that its decode steps allocate nothing (and a sequence
        // that cannot fit is refused here, not half-way through).
        let context = prompt.len().saturating_add(max_new);
        let (k_width, v_width) = self.config.kv_widths();
        let no_room = || {
            RuntimeError::Request(format!(
                "a KV cache for {context} tokens ({} prompt + {max_new} new) does not fit in memory",
                prompt.len()
            ))
        };
        let mut caches = Vec::with_capacity(self.config.layers as usize);
        for _ in 0..self.config.layers {
            let mut c = KvCache::default();
            c.k.try_reserve_exact(context.saturating_mul(k_width))
                .map_err(|_| no_room())?;
            c.v.try_reserve_exact(context.saturating_mul(v_width))
                .map_err(|_| no_room())?;
            caches.push(c);
        }
        let mut generated = Vec::new();
        generated
            .try_reserve_exact(max_new)
            .map_err(|_| no_room())?;
        generated.extend_from_slice(&resume);
        self.scratch.reserve(&self.shape, context);
        // One draw per sampled token: a resumed sequence's generator skips
        // the draws its tokens took.
        let mut rng = sampling.seed ^ 0x9E37_79B9_7F4A_7C15;
        if sampling.temperature > 0.0 {
            for _ in 0..resume.len() {
                super::sampling::next_u64(&mut rng);
            }
        }
        self.seqs.push(Sequence {
            id,
            prompt,
            generated,
            max_new,
            stop,
            sampling,
            prompt_logprobs,
            rng,
            caches,
            pos: 0,
            mb: None,
            rows: 0,
        });
        Ok(())
    }

    /// Drops a sequence and its KV cache; false if it is not running.
    pub fn cancel(&mut self, id: SeqId) -> bool {
        let before = self.seqs.len();
        self.seqs.retain(|s| s.id != id);
        self.seqs.len() != before
    }

    /// Drops every sequence.
    pub fn cancel_all(&mut self) {
        self.seqs.clear();
    }

    /// Sequences running on this worker.
    pub fn running(&self) -> usize {
        self.seqs.len()
    }

    /// KV-cache tokens held, over all sequences (per layer).
    pub fn kv_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.pos).sum()
    }

    /// Splits this step's rows over the micro-batches: each sequence goes
    /// to the micro-batch with the fewest rows; a prefill chunk is cut to
    /// the room left; a sequence that finds no room waits a step.
    fn schedule(&mut self) -> usize {
        let m = self.deploy.microbatches;
        let cap = self.deploy.max_tokens;
        let load = &mut self.load;
        load.clear();
        load.resize(m, 0);
        let mut total = 0;
        // Decode rows first (one each, they must not starve), then prefill.
        let seqs = &self.seqs;
        self.order.clear();
        self.order.extend(
            (0..seqs.len())
                .filter(|&i| seqs[i].decoding())
                .chain((0..seqs.len()).filter(|&i| !seqs[i].decoding())),
        );
        for &i in &self.order {
            let s = &mut self.seqs[i];
            let (mb, used) = load
                .iter()
                .enumerate()
                .min_by_key(|&(_, &l)| l)
                .map(|(i, &l)| (i, l))
                .expect("m >= 1");
            let want = s.wanted(cap);
            let rows = want.min(cap - used);
            if rows == 0 {
                s.mb = None;
                s.rows = 0;
                continue;
            }
            s.mb = Some(mb);
            s.rows = rows;
            load[mb] += rows;
            total += rows;
        }
        total
    }

    /// Runs one step of the whole group: every layer, pipelined over the
    /// micro-batches, with the experts across m2n. Returns the tokens made.
    pub fn step(&mut self) -> Result<StepReport, RuntimeError> {
        let mut report = StepReport::default();
        self.step_into(&mut report)?;
        Ok(report)
    }

    /// [`step`](Self::step) into `report` (cleared first): a driver that
    /// keeps one report makes decode steps that allocate nothing.
    pub fn step_into(&mut self, report: &mut StepReport) -> Result<(), RuntimeError> {
        let start = Instant::now();
        let rows = self.schedule();
        let active = !self.seqs.is_empty();
        let layers = self.config.layers as usize;
        let m = self.deploy.microbatches;
        let h = self.shape.hidden;
        report.tokens.clear();
        report.prompt_logprobs.clear();
        report.timings.clear();
        report.rows = rows;
        report.wait_ns = 0;
        report.dense_ns = 0;
        // Embeddings of each micro-batch's rows.
        for (i, mb) in self.mbs.iter_mut().enumerate() {
            self.tokens.clear();
            for s in self.seqs.iter().filter(|s| s.mb == Some(i)) {
                s.input_into(s.rows, &mut self.tokens);
            }
            forward::embed(&self.weights, h, &self.tokens, &mut mb.x);
        }
        let mut group_active = active;
        for (l, i) in step_rounds(layers, m) {
            if l > 0 && !self.config.is_dense(l - 1) {
                group_active = self.finish_moe(l - 1, i, report)?;
            }
            let t_layer = Instant::now();
            self.attention_and_dispatch(l, i, active)?;
            if self.config.is_dense(l) {
                report.dense_ns += t_layer.elapsed().as_nanos() as u64;
            }
        }
        if !self.config.is_dense(layers - 1) {
            for i in 0..m {
                group_active = self.finish_moe(layers - 1, i, report)?;
            }
        }
        report.group_active = group_active;
        self.sample(report);
        self.step += 1;
        report.wall_ns = start.elapsed().as_nanos() as u64;
        Ok(())
    }

    /// Attention of micro-batch `i` in layer `l`, its routes and layout
    /// straight into the registered send buffer, and the dispatch.
    fn attention_and_dispatch(
        &mut self,
        l: usize,
        i: usize,
        active: bool,
    ) -> Result<(), RuntimeError> {
        let t0 = Instant::now();
        let s = self.shape;
        let h = s.hidden;
        let w = &self.weights.layers[l];
        let mb = &mut self.mbs[i];
        let mut segs: Vec<Segment<'_>> = recycle(std::mem::take(&mut self.spare_segs));
        segs.extend(
            self.seqs
                .iter_mut()
                .filter(|q| q.mb == Some(i))
                .map(|q| Segment {
                    start: q.pos,
                    len: q.rows,
                    cache: &mut q.caches[l],
                }),
        );
        forward::attention(&s, w, &mut mb.x, &mut segs, &mut self.scratch);
        self.spare_segs = recycle(segs);
        if w.dense.is_some() {
            // A dense layer: its MLP here, and no round.
            forward::dense_mlp(&s, w, &mut mb.x, &mut self.scratch);
            return Ok(());
        }
        let routes = forward::moe_input(
            &s,
            w,
            &self.weights.routing,
            &mb.x,
            &mut mb.y,
            &mut self.scratch,
        );
        plan_into(
            routes,
            s.experts,
            self.deploy.experts,
            &mut self.plan,
            &mut mb.entries,
        );
        // The previous round from this buffer must be out before we overwrite it.
        if let Some(prev) = mb.round.take() {
            self.comm.dispatch().wait_sent(prev, self.timeout)?;
        }
        let per = s.experts / self.deploy.experts;
        let head = |rows: usize| Header {
            flags: if active { FLAG_ACTIVE } else { 0 },
            step: self.step as u32,
            layer: l as u16,
            microbatch: i as u16,
            rows: rows as u32,
            hidden: h as u32,
            extra: [self.deploy.microbatches as u32, self.config.layers as u32],
        };
        let buf = &mut self.send[i];
        self.lens.clear();
        for (r, entries) in mb.entries.iter().enumerate() {
            debug_assert!(entries.iter().all(|e| e.expert / per == r));
            let out = &mut buf.as_mut_slice()[r * self.section..(r + 1) * self.section];
            self.lens.push(msg::write_dispatch(
                out,
                &head(entries.len()),
                entries,
                &mb.y,
                h,
            ));
        }
        let buf = &self.send[i];
        let mut msgs: Vec<Msg<'_>> = recycle(std::mem::take(&mut self.spare_msgs));
        msgs.extend(
            self.lens
                .iter()
                .enumerate()
                .map(|(r, &len)| Msg::new(buf, r * self.section, len)),
        );
        mb.t_a = t0.elapsed().as_nanos() as u64;
        mb.posted = Some(Instant::now());
        let round = loop {
            match self.comm.dispatch().send(&msgs, POLL) {
                Ok(r) => break r,
                Err(m2n::Error::Timeout { .. }) if t0.elapsed() < self.timeout => continue,
                Err(e) => return Err(e.into()),
            }
        };
        mb.round = Some(round);
        self.spare_msgs = recycle(msgs);
        // The shared expert runs here, while the routed experts work on
        // the round just sent: it overlaps the round trip, and counts in T_a.
        if let Some(sh) = &w.shared {
            let t1 = Instant::now();
            forward::shared_expert(sh, &mb.y, &mut mb.shared, &mut self.scratch);
            mb.t_shared = t1.elapsed().as_nanos() as u64;
            mb.t_a += mb.t_shared;
        }
        Ok(())
    }

    /// Receives the combine of micro-batch `i` in layer `l` and adds it to
    /// the residual stream. Returns GROUP_ACTIVE.
    fn finish_moe(
        &mut self,
        l: usize,
        i: usize,
        report: &mut StepReport,
    ) -> Result<bool, RuntimeError> {
        let h = self.shape.hidden;
        let t0 = Instant::now();
        let round = loop {
            match self.comm.combine().recv(POLL) {
                Ok(r) => break r,
                Err(m2n::Error::Timeout { .. }) if t0.elapsed() < self.timeout => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let arrived = Instant::now();
        report.wait_ns += (arrived - t0).as_nanos() as u64;
        let mb = &mut self.mbs[i];
        self.combiner.start(mb.x.len() / h, h);
        let (mut t_e, mut residence, mut group_active) = (0u64, 0u64, false);
        let mut clean = (arrived - t0).as_nanos() as u64 > WAIT_THRESHOLD_NS;
        for r in 0..self.deploy.experts {
            let m = self.comm.message(&round, r);
            let (head, rows) = msg::read_combine(
                m,
                h,
                self.step as u32,
                l as u16,
                i as u16,
                mb.entries[r].len(),
            )
            .map_err(|detail| RuntimeError::Message {
                peer: format!("expert {r}"),
                detail,
            })?;
            group_active |= head.flags & FLAG_ACTIVE != 0;
            clean &= head.flags & FLAG_WAITED != 0;
            residence = residence.max(u64::from(head.extra[0]));
            t_e = t_e.max(u64::from(head.extra[1]));
            // Summed rank by rank, in rank order: the order combine_into uses.
            self.combiner.add(rows, &mb.entries[r]);
        }
        self.moe_out.clear();
        self.moe_out.resize(mb.x.len(), bf16::ZERO);
        self.combiner.finish(&mut self.moe_out);
        if self.weights.layers[l].shared.is_some() {
            forward::add_shared(&mut self.moe_out, &mb.shared);
        }
        self.comm.combine().release(round)?;
        forward::add_residual(&mut mb.x, &self.moe_out);
        let rtt = mb.posted.map_or(0, |p| {
            arrived.saturating_duration_since(p).as_nanos() as u64
        });
        report.timings.push(MbTiming {
            layer: l as u16,
            microbatch: i as u16,
            rows: (mb.x.len() / h) as u32,
            expert_rows: mb.entries.iter().map(|e| e.len() as u32).sum(),
            t_a: mb.t_a,
            t_shared: mb.t_shared,
            t_e,
            t_c: rtt.saturating_sub(residence),
            t_c_clean: clean,
            residence,
        });
        Ok(group_active)
    }

    /// LM head on each scheduled sequence's last row (when its prompt is
    /// all in), the next token chosen (see [`super::sampling`]), and the
    /// sequences that end leave. Sequences that asked for prompt
    /// log-probabilities get an LM head on every prefilled row too.
    fn sample(&mut self, report: &mut StepReport) {
        let h = self.shape.hidden;
        let vocab = self.config.vocab as usize;
        for (i, mb) in self.mbs.iter().enumerate() {
            let mut row = 0;
            for s in self.seqs.iter_mut().filter(|s| s.mb == Some(i)) {
                let first = row;
                let last = row + s.rows - 1;
                row += s.rows;
                if let Some(k) = s.prompt_logprobs {
                    // Row `first + j` holds position `pos + j`, which
                    // predicts the prompt token after it.
                    for j in 0..s.rows {
                        let q = s.pos + j;
                        let Some(&token) = s.prompt.get(q + 1) else {
                            break;
                        };
                        forward::lm_head(
                            &self.shape,
                            &self.weights,
                            &mb.x[(first + j) * h..][..h],
                            &mut self.logits,
                            &mut self.scratch,
                        );
                        let logits = &self.logits[..vocab];
                        let l = logits[token as usize];
                        report.prompt_logprobs.push(PromptLogprob {
                            seq: s.id,
                            pos: (q + 1) as u32,
                            token,
                            logprob: forward::logprob(logits, token as usize),
                            rank: 1 + logits.iter().filter(|&&x| x > l).count() as u32,
                            top: forward::top_logprobs(logits, k),
                        });
                    }
                }
                s.pos += s.rows;
                if s.pos < s.context_len() {
                    continue; // more prompt (or resumed context) to prefill
                }
                forward::lm_head(
                    &self.shape,
                    &self.weights,
                    &mb.x[last * h..][..h],
                    &mut self.logits,
                    &mut self.scratch,
                );
                let raw = &self.logits[..vocab];
                // The penalties work on a copy: log-probabilities are the
                // raw logits'.
                let chosen = if s.sampling.processes(s.generated.len(), &s.stop) {
                    self.processed.clear();
                    self.processed.extend_from_slice(raw);
                    self.seen.resize(vocab, false);
                    apply_penalties(
                        &mut self.processed,
                        &s.sampling,
                        &s.prompt,
                        &s.generated,
                        &s.stop,
                        &mut self.seen,
                    );
                    &self.processed[..]
                } else {
                    raw
                };
                let token = if s.sampling.temperature > 0.0 {
                    sample_with(chosen, &s.sampling, &mut s.rng, &mut self.probs)
                } else {
                    forward::greedy(chosen).0
                };
                let logprob = forward::logprob(raw, token as usize);
                let top = forward::top_logprobs(raw, s.sampling.top_logprobs);
                s.generated.push(token);
                let finish = if s.stop.contains(&token) {
                    Some(Finish::Stop)
                } else if s.generated.len() >= s.max_new {
                    Some(Finish::Length)
                } else {
                    None
                };
                report.tokens.push(Token {
                    seq: s.id,
                    token,
                    logprob,
                    top,
                    finish,
                });
            }
        }
        let tokens = &report.tokens;
        self.seqs
            .retain(|s| !tokens.iter().any(|t| t.seq == s.id && t.finish.is_some()));
        for s in &mut self.seqs {
            s.mb = None;
            s.rows = 0;
        }
    }

    /// Aborts the communicator, so that peers fail fast.
    pub fn abort(&mut self) {
        self.comm.abort();
    }

    /// Moves to a new group (`comm`, joined as the same rank after the
    /// old group lost a member): the sequences and their KV caches stay;
    /// whatever the step the old group could not finish wrote is rolled
    /// back, so the next step runs it again. The new group counts its
    /// steps from 0, as its experts do.
    pub fn reform(&mut self, mut comm: Communicator) -> Result<(), RuntimeError> {
        if comm.rank() != self.rank {
            return Err(RuntimeError::Config(format!(
                "attention {} cannot join a new group as rank {}",
                self.rank,
                comm.rank()
            )));
        }
        let section = comm.config().dispatch.slot_bytes;
        let send = (0..self.deploy.microbatches)
            .map(|_| comm.alloc(section * self.deploy.experts))
            .collect::<Result<Vec<_>, _>>()?;
        // The old buffers go before the old communicator they came from.
        self.send.clear();
        self.comm = comm;
        self.send = send;
        self.section = section;
        self.step = 0;
        for mb in &mut self.mbs {
            mb.round = None;
            mb.posted = None;
        }
        for s in &mut self.seqs {
            s.roll_back();
        }
        Ok(())
    }

    /// The ids of the sequences running here (for a driver that lost
    /// track, and for tests).
    pub fn sequence_ids(&self) -> Vec<SeqId> {
        self.seqs.iter().map(|s| s.id).collect()
    }

    /// Keeps the group's liveness links alive while no step runs (an idle
    /// rank that stops calling into m2n would look hung to its peers).
    pub fn idle(&mut self) -> Result<(), RuntimeError> {
        self.comm.progress()?;
        Ok(())
    }
}
