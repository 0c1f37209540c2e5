//! GQA decode attention: one new query token per sequence against that
//! sequence's KV cache.

use half::bf16;

use crate::LayerShape;

/// One sequence's KV cache: `[len, kv_heads, head_dim]` for keys and values.
#[derive(Debug, Clone, PartialEq)]
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
    let (hd, kvh, g) = (s.head_dim, s.kv_heads, s.group());
    let scale = 1.0 / (hd as f32).sqrt();
    let mut qf = vec![0.0f32; g * hd];
    let mut acc = vec![0.0f32; g * hd];
    for (t, cache) in caches.iter().enumerate() {
        let n = cache.len;
        let mut scores = vec![0.0f32; g * n];
        for kh in 0..kvh {
            super::gemv::widen(&q[(t * s.heads + kh * g) * hd..][..g * hd], &mut qf);
            for p in 0..n {
                let kr = &cache.k[(p * kvh + kh) * hd..][..hd];
                for j in 0..g {
                    scores[j * n + p] = super::gemv::dot_bf16(&qf[j * hd..][..hd], kr) * scale;
                }
            }
            let mut sums = vec![0.0f32; g];
            for j in 0..g {
                let sc = &mut scores[j * n..][..n];
                let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for x in sc.iter_mut() {
                    *x = (*x - max).exp();
                }
                sums[j] = sc.iter().sum();
            }
            acc.iter_mut().for_each(|a| *a = 0.0);
            for p in 0..n {
                let vr = &cache.v[(p * kvh + kh) * hd..][..hd];
                for j in 0..g {
                    super::gemv::axpy_bf16(&mut acc[j * hd..][..hd], scores[j * n + p], vr);
                }
            }
            for j in 0..g {
                let o = &mut out[(t * s.heads + kh * g + j) * hd..][..hd];
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
}
