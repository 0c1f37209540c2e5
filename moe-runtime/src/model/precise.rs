//! The f32 reference: the same model with every activation in f32, the
//! way transformers computes a model loaded in float32. Weights stay as
//! loaded into bf16 (a checkpoint whose values are bf16, as the published
//! MoE checkpoints are, is computed exactly; an f32 checkpoint's weights
//! are rounded to bf16 first); nothing else is rounded.
//!
//! It is the oracle for the families' arithmetic (`moe-run --reference
//! --dtype f32`, checked against transformers in float32 by
//! `scripts/check-transformers`), not for the workers, which compute in
//! bf16 and are held to the bf16 reference bit for bit. It is plain: the
//! whole sequence in one pass, no KV cache (generation recomputes the
//! sequence each step).

use half::bf16;
use kernels::cpu::ffn::Expert;
use kernels::cpu::gemv::{matmul_bf16, widen};
use kernels::LayerShape;

use super::weights::{AttentionLayer, AttentionWeights, ExpertWeights};

fn wide(w: &[bf16]) -> Vec<f32> {
    let mut out = vec![0.0; w.len()];
    widen(w, &mut out);
    out
}

/// RMSNorm of every `w.len()`-wide piece of `x`, in place.
fn rmsnorm(x: &mut [f32], w: &[bf16], eps: f32) {
    let w = wide(w);
    for row in x.chunks_mut(w.len()) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for (v, g) in row.iter_mut().zip(&w) {
            *v = *v * r * g;
        }
    }
}

/// `x (n x k) W^T` for a bf16 `W` of `m x k`.
fn linear(x: &[f32], k: usize, w: &[bf16], m: usize) -> Vec<f32> {
    let n = x.len() / k;
    let mut out = vec![0.0; n * m];
    matmul_bf16(x, n, k, w, m, &mut out);
    out
}

/// Rotate-half rope on `x` (`n x heads x d`), token `t` at position `t`.
fn rope(x: &mut [f32], heads: usize, d: usize, theta: f32) {
    let half = d / 2;
    let inv: Vec<f32> = (0..half)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / d as f32))
        .collect();
    for (t, tok) in x.chunks_mut(heads * d).enumerate() {
        for head in tok.chunks_mut(d) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (s, c) = (t as f32 * inv[i]).sin_cos();
                let (x0, x1) = (a[i], b[i]);
                a[i] = x0 * c - x1 * s;
                b[i] = x1 * c + x0 * s;
            }
        }
    }
}

/// Causal GQA attention over the whole sequence.
fn attention(q: &[f32], k: &[f32], v: &[f32], s: &LayerShape) -> Vec<f32> {
    let (hd, g) = (s.head_dim, s.group());
    let (qw, kw) = (s.heads * hd, s.kv_heads * hd);
    let n = q.len() / qw;
    let scale = 1.0 / (hd as f32).sqrt();
    let mut out = vec![0.0; n * qw];
    let mut scores = vec![0.0f32; n];
    for t in 0..n {
        for h in 0..s.heads {
            let kh = h / g;
            let qv = &q[t * qw + h * hd..][..hd];
            for (p, sc) in scores[..=t].iter_mut().enumerate() {
                let kr = &k[p * kw + kh * hd..][..hd];
                *sc = qv.iter().zip(kr).map(|(a, b)| a * b).sum::<f32>() * scale;
            }
            let max = scores[..=t]
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for sc in &mut scores[..=t] {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            let o = &mut out[t * qw + h * hd..][..hd];
            for (p, &e) in scores[..=t].iter().enumerate() {
                let vr = &v[p * kw + kh * hd..][..hd];
                for (ov, &vv) in o.iter_mut().zip(vr) {
                    *ov += e / sum * vv;
                }
            }
        }
    }
    out
}

fn add_bias(x: &mut [f32], bias: &[bf16]) {
    for row in x.chunks_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b.to_f32();
        }
    }
}

/// One expert's SwiGLU on one row.
fn expert(e: &Expert, x: &[f32]) -> Vec<f32> {
    let g = linear(x, e.hidden, &e.gate, e.ffn);
    let u = linear(x, e.hidden, &e.up, e.ffn);
    let a: Vec<f32> = g
        .iter()
        .zip(&u)
        .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
        .collect();
    linear(&a, e.ffn, &e.down, e.hidden)
}

/// The MoE block on `y` (`n x hidden`): softmax router, top-k (ties to the
/// lower expert), weights renormalised when `norm_topk`.
fn moe(
    y: &[f32],
    s: &LayerShape,
    w: &AttentionLayer,
    norm_topk: bool,
    experts: &[Expert],
) -> Vec<f32> {
    let h = s.hidden;
    let logits = linear(y, h, &w.gate, s.experts);
    let mut out = vec![0.0; y.len()];
    for (t, l) in logits.chunks(s.experts).enumerate() {
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let p: Vec<f32> = l.iter().map(|v| (v - max).exp()).collect();
        let total: f32 = p.iter().sum();
        let mut idx: Vec<usize> = (0..s.experts).collect();
        idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
        let top = &idx[..s.top_k];
        let chosen: f32 = top.iter().map(|&i| p[i] / total).sum();
        let row = &y[t * h..][..h];
        for &e in top {
            let mut wt = p[e] / total;
            if norm_topk {
                wt /= chosen;
            }
            for (o, v) in out[t * h..][..h].iter_mut().zip(expert(&experts[e], row)) {
                *o += wt * v;
            }
        }
        if let Some(sh) = &w.shared {
            let logit: f32 = row.iter().zip(&sh.gate).map(|(a, b)| a * b.to_f32()).sum();
            let g = 1.0 / (1.0 + (-logit).exp());
            for (o, v) in out[t * h..][..h].iter_mut().zip(expert(&sh.expert, row)) {
                *o += g * v;
            }
        }
    }
    out
}

/// Log-probabilities (f32) of every next token after each row of
/// `tokens`: `vocab` values per token.
pub fn logits(
    s: &LayerShape,
    attn: &AttentionWeights,
    experts: &ExpertWeights,
    tokens: &[u32],
) -> Vec<f32> {
    let h = s.hidden;
    let (qw, kw) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let mut x: Vec<f32> = tokens
        .iter()
        .flat_map(|&t| attn.embed[t as usize * h..][..h].iter().map(|v| v.to_f32()))
        .collect();
    for (l, w) in attn.layers.iter().enumerate() {
        let mut xn = x.clone();
        rmsnorm(&mut xn, &w.input_norm, s.norm_eps);
        let mut q = linear(&xn, h, &w.q, qw);
        let mut k = linear(&xn, h, &w.k, kw);
        let mut v = linear(&xn, h, &w.v, kw);
        if let Some([qb, kb, vb]) = &w.qkv_bias {
            add_bias(&mut q, qb);
            add_bias(&mut k, kb);
            add_bias(&mut v, vb);
        }
        if let Some(qn) = &w.q_norm {
            rmsnorm(&mut q, qn, s.norm_eps);
        }
        if let Some(kn) = &w.k_norm {
            rmsnorm(&mut k, kn, s.norm_eps);
        }
        rope(&mut q, s.heads, s.head_dim, s.rope_theta);
        rope(&mut k, s.kv_heads, s.head_dim, s.rope_theta);
        let a = attention(&q, &k, &v, s);
        let o = linear(&a, qw, &w.o, h);
        for (xv, ov) in x.iter_mut().zip(&o) {
            *xv += ov;
        }
        let mut y = x.clone();
        rmsnorm(&mut y, &w.post_norm, s.norm_eps);
        let m = moe(&y, s, w, attn.norm_topk, &experts.layers[l]);
        for (xv, mv) in x.iter_mut().zip(&m) {
            *xv += mv;
        }
    }
    rmsnorm(&mut x, &attn.norm, s.norm_eps);
    let vocab = attn.lm_head.len() / h;
    linear(&x, h, &attn.lm_head, vocab)
}
