//! The single-process reference decoder: the oracle that every
//! disaggregated run must match token for token.
//!
//! It is deliberately plain: one sequence at a time, the whole prompt in
//! one prefill, then one token per step; every expert of a layer in this
//! process, in expert order; no micro-batches, no messages. It uses the
//! same batch-invariant kernels ([`super::forward`]) as the workers, so a
//! disaggregated run that gives other bits has a bug in its batching,
//! routing, messages or combine, not in the arithmetic.

use std::path::Path;

use half::bf16;
use kernels::cpu::attention::KvCache;
use kernels::cpu::ffn::FfnScratch;
use kernels::cpu::layout::{combine_into, plan, Combiner};
use kernels::LayerShape;

use super::forward::{self, Scratch, Segment};
use super::weights::{AttentionWeights, Checkpoint, ExpertWeights};
use super::{load_config, ModelConfig, RuntimeError};

/// A generated token and its natural-log probability.
pub type Generated = (u32, f32);

/// The precision of the reference's activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// As the workers compute: bf16 activations, f32 accumulation (the
    /// oracle the workers must match bit for bit).
    #[default]
    Bf16,
    /// Every activation in f32 ([`super::precise`]): what transformers
    /// computes in float32.
    F32,
}

/// Every weight of the model in one process.
#[derive(Debug)]
pub struct Reference {
    pub config: ModelConfig,
    shape: LayerShape,
    attn: AttentionWeights,
    experts: ExpertWeights,
}

impl Reference {
    pub fn load(dir: &Path) -> Result<Self, RuntimeError> {
        let config = load_config(dir)?;
        let ck = Checkpoint::open(dir)?;
        Ok(Self {
            shape: config.layer_shape(),
            attn: AttentionWeights::load(&ck, &config)?,
            experts: ExpertWeights::load(&ck, &config, 0, config.experts as usize)?,
            config,
        })
    }

    /// Greedy decoding of `max_new` tokens after `prompt`.
    pub fn generate(&self, prompt: &[u32], max_new: usize) -> Result<Vec<Generated>, RuntimeError> {
        check_prompt(prompt, self.config.vocab)?;
        let s = &self.shape;
        let mut caches = vec![KvCache::default(); self.config.layers as usize];
        let mut sc = Scratch::default();
        let mut ffn = FfnScratch::default();
        let mut out = Vec::with_capacity(max_new);
        let mut input: Vec<u32> = prompt.to_vec();
        let mut pos = 0;
        let mut x = Vec::new();
        let mut logits = Vec::new();
        while out.len() < max_new {
            forward::embed(&self.attn, s.hidden, &input, &mut x);
            for (l, cache) in caches.iter_mut().enumerate() {
                let mut segs = [Segment {
                    cache,
                    start: pos,
                    len: input.len(),
                }];
                self.layer(l, &mut x, &mut segs, &mut sc, &mut ffn);
            }
            let last = &x[(input.len() - 1) * s.hidden..];
            forward::lm_head(s, &self.attn, last, &mut logits, &mut sc);
            let (tok, lp) = forward::greedy(&logits);
            out.push((tok, lp));
            pos += input.len();
            input = vec![tok];
        }
        Ok(out)
    }

    /// [`generate`](Self::generate) in `precision`.
    pub fn generate_in(
        &self,
        prompt: &[u32],
        max_new: usize,
        precision: Precision,
    ) -> Result<Vec<Generated>, RuntimeError> {
        if precision == Precision::Bf16 {
            return self.generate(prompt, max_new);
        }
        check_prompt(prompt, self.config.vocab)?;
        let vocab = self.config.vocab as usize;
        let mut seq = prompt.to_vec();
        let mut out = Vec::with_capacity(max_new);
        while out.len() < max_new {
            let logits = super::precise::logits(&self.shape, &self.attn, &self.experts, &seq);
            let (tok, lp) = forward::greedy(&logits[logits.len() - vocab..]);
            out.push((tok, lp));
            seq.push(tok);
        }
        Ok(out)
    }

    /// [`score`](Self::score) in `precision`.
    pub fn score_in(&self, tokens: &[u32], precision: Precision) -> Result<Vec<f32>, RuntimeError> {
        if precision == Precision::Bf16 {
            return self.score(tokens);
        }
        check_prompt(tokens, self.config.vocab)?;
        let vocab = self.config.vocab as usize;
        let logits = super::precise::logits(&self.shape, &self.attn, &self.experts, tokens);
        Ok(tokens
            .iter()
            .enumerate()
            .skip(1)
            .map(|(i, &next)| forward::logprob(&logits[(i - 1) * vocab..][..vocab], next as usize))
            .collect())
    }

    /// Teacher-forced scores: for each token of `tokens` after the first,
    /// its natural-log probability given the tokens before it (one
    /// forward pass over the whole sequence, the LM head on every row).
    /// The way to compare two implementations without greedy divergence.
    pub fn score(&self, tokens: &[u32]) -> Result<Vec<f32>, RuntimeError> {
        check_prompt(tokens, self.config.vocab)?;
        let s = &self.shape;
        let mut caches = vec![KvCache::default(); self.config.layers as usize];
        let (mut sc, mut ffn) = (Scratch::default(), FfnScratch::default());
        let mut x = Vec::new();
        forward::embed(&self.attn, s.hidden, tokens, &mut x);
        for (l, cache) in caches.iter_mut().enumerate() {
            let mut segs = [Segment {
                cache,
                start: 0,
                len: tokens.len(),
            }];
            self.layer(l, &mut x, &mut segs, &mut sc, &mut ffn);
        }
        let mut logits = Vec::new();
        let mut out = Vec::with_capacity(tokens.len().saturating_sub(1));
        for (i, &next) in tokens.iter().enumerate().skip(1) {
            let row = &x[(i - 1) * s.hidden..i * s.hidden];
            forward::lm_head(s, &self.attn, row, &mut logits, &mut sc);
            out.push(forward::logprob(&logits, next as usize));
        }
        Ok(out)
    }

    /// Every layer on a batch of rows (`segs` cover them in order), in
    /// this process: what the colocated baseline runs.
    pub fn forward(
        &self,
        x: &mut [bf16],
        segs: &mut [Vec<KvCache>],
        starts: &[(usize, usize)],
        sc: &mut Scratch,
        ffn: &mut FfnScratch,
    ) {
        for l in 0..self.config.layers as usize {
            let mut layer_segs: Vec<Segment<'_>> = segs
                .iter_mut()
                .zip(starts)
                .map(|(c, &(start, len))| Segment {
                    cache: &mut c[l],
                    start,
                    len,
                })
                .collect();
            self.layer(l, x, &mut layer_segs, sc, ffn);
        }
    }

    /// Final norm, LM head and greedy choice for one row.
    pub fn next_token(&self, row: &[bf16], logits: &mut Vec<f32>, sc: &mut Scratch) -> (u32, f32) {
        forward::lm_head(&self.shape, &self.attn, row, logits, sc);
        forward::greedy(logits)
    }

    /// The embedding rows of `tokens`.
    pub fn embed(&self, tokens: &[u32], out: &mut Vec<bf16>) {
        forward::embed(&self.attn, self.shape.hidden, tokens, out);
    }

    fn layer(
        &self,
        l: usize,
        x: &mut [bf16],
        segs: &mut [Segment<'_>],
        sc: &mut Scratch,
        ffn: &mut FfnScratch,
    ) {
        let s = &self.shape;
        let w = &self.attn.layers[l];
        forward::attention(s, w, x, segs, sc);
        if w.dense.is_some() {
            forward::dense_mlp(s, w, x, sc);
            return;
        }
        let mut y = Vec::new();
        let routes = forward::moe_input(s, w, &self.attn.routing, x, &mut y, sc);
        let entries = plan(routes, s.experts, 1).remove(0);
        // Every expert's rows, in buffer order (by expert).
        let mut rows = vec![bf16::ZERO; entries.len() * s.hidden];
        for (r, e) in rows.chunks_exact_mut(s.hidden).zip(&entries) {
            r.copy_from_slice(&y[e.token * s.hidden..][..s.hidden]);
        }
        let mut outs = vec![bf16::ZERO; rows.len()];
        let mut i = 0;
        while i < entries.len() {
            let e = entries[i].expert;
            let j = i + entries[i..].iter().take_while(|x| x.expert == e).count();
            let span = i * s.hidden..j * s.hidden;
            forward::expert_rows(
                &self.experts.layers[l][e],
                &rows[span.clone()],
                &mut outs[span],
                ffn,
            );
            i = j;
        }
        let mut moe = vec![bf16::ZERO; x.len()];
        combine_into(
            &[&outs],
            &[&entries],
            s.hidden,
            &mut Combiner::default(),
            &mut moe,
        );
        if let Some(sh) = &w.shared {
            let mut shared = Vec::new();
            forward::shared_expert(sh, &y, &mut shared, sc);
            forward::add_shared(&mut moe, &shared);
        }
        forward::add_residual(x, &moe);
    }
}

/// A prompt must be non-empty and every id inside the vocabulary.
pub fn check_prompt(prompt: &[u32], vocab: u64) -> Result<(), RuntimeError> {
    if prompt.is_empty() {
        return Err(RuntimeError::Request("an empty prompt".into()));
    }
    if let Some(&bad) = prompt.iter().find(|&&t| u64::from(t) >= vocab) {
        return Err(RuntimeError::Request(format!(
            "token id {bad} is outside the vocabulary of {vocab}"
        )));
    }
    Ok(())
}
