//! Attention and expert workers joined by one m2n communicator.
//!
//! `M` attention workers are data parallel: each owns a disjoint set of
//! sequences with their KV caches, and the embedding, attention, router and
//! LM-head weights. `N` expert workers each own `E / N` experts of every
//! layer. Every layer and micro-batch, each attention worker sends each
//! expert worker the rows routed to its experts ([`msg`], the dispatch) and
//! gets their outputs back (the combine), all through m2n; see
//! [`attention`] for the ping-pong schedule and [`expert`] for the other
//! side.

pub mod attention;
pub mod expert;
pub mod msg;
pub mod sampling;

use std::ops::Range;
use std::time::Duration;

use m2n::Config;

use crate::model::{ModelConfig, RuntimeError};

/// How a model is split over processes. Every rank must use the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deployment {
    /// Attention workers M.
    pub attention: usize,
    /// Expert workers N (must divide the number of experts).
    pub experts: usize,
    /// Micro-batches per layer m (1..=4): the ping-pong depth.
    pub microbatches: usize,
    /// Most rows (tokens) in one micro-batch: bounds the message sizes;
    /// long prompts are prefilled in chunks that fit.
    pub max_tokens: usize,
}

/// The rounds of one step in the order they go out on both channels:
/// `(layer, micro-batch)`, layer by layer. The attention side walks it
/// (see [`attention`]'s schedule); the expert side maps a round count back
/// onto it with [`round_position`]. The one place that order is written.
pub fn step_rounds(layers: usize, microbatches: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..layers).flat_map(move |l| (0..microbatches).map(move |i| (l, i)))
}

/// Where the group's `k`-th round (from 0) falls: `(step, layer,
/// micro-batch)`, in [`step_rounds`] order over the layers with experts
/// (`moe_layers`, ascending: a dense layer has no round).
pub fn round_position(k: u64, moe_layers: &[usize], microbatches: usize) -> (u64, usize, usize) {
    let per_step = (moe_layers.len() * microbatches) as u64;
    let in_step = (k % per_step) as usize;
    (
        k / per_step,
        moe_layers[in_step / microbatches],
        in_step % microbatches,
    )
}

/// Empties `v` and hands its allocation back for items of another type of
/// the same size and alignment (in practice: the same type with another
/// lifetime). Lets a worker keep one vector for the per-round lists that
/// borrow its buffers (messages, segments) instead of allocating one each
/// round. Relies on the standard library's in-place collection, which the
/// counting-allocator test pins.
pub(crate) fn recycle<T, U>(mut v: Vec<T>) -> Vec<U> {
    v.clear();
    v.into_iter()
        .map(|_| unreachable!("the vector was emptied"))
        .collect()
}

/// How long a blocked worker waits for its peers before it checks again;
/// a lost peer ends the wait earlier (m2n's liveness links).
pub const POLL: Duration = Duration::from_secs(1);

impl Deployment {
    pub fn validate(&self, c: &ModelConfig) -> Result<(), RuntimeError> {
        let bad = |s: String| Err(RuntimeError::Config(s));
        if self.attention == 0 || self.experts == 0 {
            return bad("at least one attention and one expert worker".into());
        }
        if !(c.experts as usize).is_multiple_of(self.experts) {
            return bad(format!(
                "{} experts do not split evenly over {} expert workers",
                c.experts, self.experts
            ));
        }
        if !(1..=4).contains(&self.microbatches) {
            return bad(format!(
                "{} micro-batches: the ping-pong pipeline takes 1 to 4",
                self.microbatches
            ));
        }
        if self.max_tokens == 0 {
            return bad("max tokens per micro-batch must be at least 1".into());
        }
        if c.layers > u64::from(u16::MAX) {
            return bad(format!("{} layers do not fit the message header", c.layers));
        }
        Ok(())
    }

    /// Experts held by expert worker `rank`.
    pub fn experts_of(&self, c: &ModelConfig, rank: usize) -> Range<usize> {
        let per = c.experts as usize / self.experts;
        rank * per..(rank + 1) * per
    }

    /// Most rows one expert worker can get from one attention worker in
    /// one micro-batch.
    pub fn max_rows(&self, c: &ModelConfig) -> usize {
        let per = c.experts as usize / self.experts;
        self.max_tokens * per.min(c.top_k as usize)
    }

    /// m2n's configuration: `base` (defaults plus `M2N_*`), with slots that
    /// fit the largest messages and a depth of at least `m`.
    pub fn m2n_config(&self, c: &ModelConfig, mut base: Config) -> Config {
        let h = c.hidden as usize;
        let rows = self.max_rows(c);
        let round = |b: usize| b.div_ceil(4096) * 4096;
        let d = round(msg::dispatch_len(rows, h));
        let k = round(msg::combine_len(rows, h));
        base.dispatch.slot_bytes = base.dispatch.slot_bytes.max(d);
        base.combine.slot_bytes = base.combine.slot_bytes.max(k);
        base.dispatch.depth = base.dispatch.depth.max(self.microbatches);
        base.combine.depth = base.combine.depth.max(self.microbatches);
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_positions_follow_the_step_order() {
        let all = |n: usize| (0..n).collect::<Vec<_>>();
        for (layers, moe, m) in [
            (1, all(1), 1),
            (3, all(3), 2),
            (2, all(2), 4),
            (4, vec![1, 2, 3], 2),
            (5, vec![0, 2, 4], 3),
        ] {
            let order: Vec<(usize, usize)> = step_rounds(layers, m)
                .filter(|(l, _)| moe.contains(l))
                .collect();
            assert_eq!(order.len(), moe.len() * m);
            for step in 0..3u64 {
                for (j, &(l, i)) in order.iter().enumerate() {
                    let k = step * order.len() as u64 + j as u64;
                    assert_eq!(round_position(k, &moe, m), (step, l, i), "round {k}");
                }
            }
        }
    }

    #[test]
    fn recycled_vectors_keep_their_allocation() {
        let mut v: Vec<&str> = Vec::with_capacity(16);
        v.push("x");
        let ptr = v.as_ptr() as usize;
        let w: Vec<&'static str> = recycle(v);
        assert!(w.is_empty());
        assert_eq!(w.capacity(), 16);
        assert_eq!(w.as_ptr() as usize, ptr);
    }
}
