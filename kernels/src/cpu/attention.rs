//! GQA decode attention: one new query token per sequence against that
//! sequence's KV cache.

use half::bf16;

use crate::LayerShape;

/// `x[i] = exp(x[i] - max x)` in place, returning their sum (in index
/// order): a softmax's numerators and denominator.
pub fn exp_shifted(x: &mut [f32]) -> f32 {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for v in x.iter_mut() {
        *v = (*v - max).exp();
    }
    x.iter().sum()
}

/// One sequence's KV cache: `[len, kv_heads, head_dim]` for keys and values.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KvCache {
    pub k: Vec<bf16>,
    pub v: Vec<bf16>,
    pub len: usize,
}

impl KvCache {
    /// Appends one token's keys and values (`kv_heads * head_dim` each).
    pub fn push(&mut self, k: &[bf16], v: &[bf16]) {
        self.k.extend_from_slice(k);
        self.v.extend_from_slice(v);
        self.len += 1;
    }

    /// Keeps the first `tokens` tokens (no-op when it holds fewer): drops
    /// what a step that did not finish appended.
    pub fn truncate(&mut self, tokens: usize) {
        if tokens >= self.len {
            return;
        }
        let (kw, vw) = (self.k.len() / self.len, self.v.len() / self.len);
        self.k.truncate(tokens * kw);
        self.v.truncate(tokens * vw);
        self.len = tokens;
    }
}

/// Reference: `out[h] = softmax(q[h] . K[g(h)] / sqrt(d)) V[g(h)]` per head.
pub fn attention_ref(q: &[bf16], caches: &[KvCache], s: &LayerShape, out: &mut [bf16]) {
    let (hd, kvh, g) = (s.head_dim, s.kv_heads, s.group());
    let scale = 1.0 / (hd as f32).sqrt();
    for (t, cache) in caches.iter().enumerate() {
        for h in 0..s.heads {
            let kh = h / g;
            let qv = &q[(t * s.heads + h) * hd..][..hd];
            let scores: Vec<f32> = (0..cache.len)
                .map(|p| {
                    let kr = &cache.k[(p * kvh + kh) * hd..][..hd];
                    qv.iter()
                        .zip(kr)
                        .map(|(a, b)| a.to_f32() * b.to_f32())
                        .sum::<f32>()
                        * scale
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f32 = exps.iter().sum();
            for d in 0..hd {
                let mut acc = 0.0f32;
                for (p, e) in exps.iter().enumerate() {
                    acc += e * cache.v[(p * kvh + kh) * hd + d].to_f32();
                }
                out[(t * s.heads + h) * hd + d] =
                    bf16::from_f32(if sum > 0.0 { acc / sum } else { 0.0 });
            }
        }
    }
}

/// Fast: each KV row is read once for every query head of its group,
/// widened from bf16 in registers (AVX2/FMA where available).
pub fn attention(q: &[bf16], caches: &[KvCache], s: &LayerShape, out: &mut [bf16]) {
    let mut scratch = AttnScratch::default();
    let row = s.heads * s.head_dim;
    for (t, cache) in caches.iter().enumerate() {
        attend(
            &q[t * row..][..row],
            cache,
            cache.len,
            s,
            &mut out[t * row..][..row],
            &mut scratch,
        );
    }
}

/// Reference causal (prefill) attention: `q` holds `c` query tokens of one
/// sequence, at positions `start..start + c`, whose keys and values are
/// already in `cache`; token `i` attends to cache rows `0..=start + i`.
pub fn prefill_attention_ref(
    q: &[bf16],
    cache: &KvCache,
    start: usize,
    s: &LayerShape,
    out: &mut [bf16],
) {
    let row = s.heads * s.head_dim;
    let c = q.len() / row;
    assert!(start + c <= cache.len, "prefill past the cache");
    for i in 0..c {
        let len = start + i + 1;
        let prefix = KvCache {
            k: cache.k[..len * s.kv_heads * s.head_dim].to_vec(),
            v: cache.v[..len * s.kv_heads * s.head_dim].to_vec(),
            len,
        };
        attention_ref(
            &q[i * row..][..row],
            std::slice::from_ref(&prefix),
            s,
            &mut out[i * row..][..row],
        );
    }
}

/// Fast causal (prefill) attention, as [`prefill_attention_ref`]. Each
/// query row runs exactly the arithmetic of a decode step at its position,
/// so prefilling a prompt in one piece, in chunks, or token by token gives
/// the same bits.
pub fn prefill_attention(
    q: &[bf16],
    cache: &KvCache,
    start: usize,
    s: &LayerShape,
    out: &mut [bf16],
    scratch: &mut AttnScratch,
) {
    let row = s.heads * s.head_dim;
    let c = q.len() / row;
    assert!(start + c <= cache.len, "prefill past the cache");
    for i in 0..c {
        attend(
            &q[i * row..][..row],
            cache,
            start + i + 1,
            s,
            &mut out[i * row..][..row],
            scratch,
        );
    }
}

/// Reusable buffers of the fast attention (no allocation per call once
/// they have grown).
#[derive(Debug, Default)]
pub struct AttnScratch {
    qf: Vec<f32>,
    acc: Vec<f32>,
    scores: Vec<f32>,
    sums: Vec<f32>,
}

impl AttnScratch {
    /// Grows the buffers for contexts of up to `len` tokens, so that no
    /// call up to that length allocates.
    pub fn reserve(&mut self, s: &LayerShape, len: usize) {
        let (g, hd) = (s.group(), s.head_dim);
        for (v, n) in [
            (&mut self.qf, g * hd),
            (&mut self.acc, g * hd),
            (&mut self.scores, g * len),
            (&mut self.sums, g),
        ] {
            v.reserve(n.saturating_sub(v.len()));
        }
    }
}

/// One query token (`heads * head_dim`) against the first `len` rows of
/// `cache`.
fn attend(
    q: &[bf16],
    cache: &KvCache,
    len: usize,
    s: &LayerShape,
    out: &mut [bf16],
    sc: &mut AttnScratch,
) {
    let (hd, kvh, g) = (s.head_dim, s.kv_heads, s.group());
    let scale = 1.0 / (hd as f32).sqrt();
    let n = len;
    sc.qf.resize(g * hd, 0.0);
    sc.acc.resize(g * hd, 0.0);
    sc.scores.resize(g * n, 0.0);
    sc.sums.resize(g, 0.0);
    let AttnScratch {
        qf,
        acc,
        scores,
        sums,
    } = sc;
    for kh in 0..kvh {
        super::gemv::widen(&q[kh * g * hd..][..g * hd], qf);
        for p in 0..n {
            let kr = &cache.k[(p * kvh + kh) * hd..][..hd];
            for j in 0..g {
                scores[j * n + p] = super::gemv::dot_bf16(&qf[j * hd..][..hd], kr) * scale;
            }
        }
        for j in 0..g {
            sums[j] = exp_shifted(&mut scores[j * n..][..n]);
        }
        acc.iter_mut().for_each(|a| *a = 0.0);
        for p in 0..n {
            let vr = &cache.v[(p * kvh + kh) * hd..][..hd];
            for j in 0..g {
                super::gemv::axpy_bf16(&mut acc[j * hd..][..hd], scores[j * n + p], vr);
            }
        }
        for j in 0..g {
            let o = &mut out[(kh * g + j) * hd..][..hd];
            for d in 0..hd {
                o[d] = bf16::from_f32(if sums[j] > 0.0 {
                    acc[j * hd + d] / sums[j]
                } else {
                    0.0
                });
            }
        }
    }
}

#[cfg(test)]
mod kv_tests {
    use super::*;

    #[test]
    fn truncate_keeps_the_first_tokens_of_both_halves() {
        let b = |x: f32| bf16::from_f32(x);
        let mut c = KvCache::default();
        for t in 0..4 {
            let t = t as f32;
            c.push(&[b(t), b(t + 0.5)], &[b(-t), b(-t), b(-t)]);
        }
        c.truncate(9);
        assert_eq!((c.len, c.k.len(), c.v.len()), (4, 8, 12));
        c.truncate(2);
        assert_eq!((c.len, c.k.len(), c.v.len()), (2, 4, 6));
        assert_eq!(c.k, [b(0.0), b(0.5), b(1.0), b(1.5)]);
        assert_eq!(c.v[3..], [b(-1.0), b(-1.0), b(-1.0)]);
        c.truncate(0);
        assert_eq!((c.len, c.k.len(), c.v.len()), (0, 0, 0));
    }
}
