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
use kernels::cpu::attention::exp_shifted;
use kernels::cpu::ffn::Expert;
use kernels::cpu::gemv::{matmul_bf16, widen};
use kernels::LayerShape;

use super::forward::rope_mla;
use super::weights::{
    AttentionLayer, AttentionWeights, ExpertWeights, MlaWeights, Routing, SelfAttn,
};

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
            let sum = exp_shifted(&mut scores[..=t]);
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

/// One token's experts and weights from its router `logits`: the softmax
/// router (top-k, ties to the lower expert, renormalised when
/// `norm_topk`), or DeepSeek-V3's sigmoid router with its score-correction
/// `bias`, group-limited choice and scale.
fn choose(l: &[f32], k: usize, bias: Option<&[f32]>, r: &Routing) -> Vec<(usize, f32)> {
    let n = l.len();
    let by_desc = |v: &[f32], idx: &mut Vec<usize>| {
        idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(a.cmp(&b)));
    };
    let Some(bias) = bias else {
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let p: Vec<f32> = l.iter().map(|v| (v - max).exp()).collect();
        let total: f32 = p.iter().sum();
        let mut idx: Vec<usize> = (0..n).collect();
        by_desc(&p, &mut idx);
        let top = &idx[..k];
        let chosen: f32 = top.iter().map(|&i| p[i] / total).sum();
        return top
            .iter()
            .map(|&e| (e, p[e] / total / if r.norm_topk { chosen } else { 1.0 }))
            .collect();
    };
    let scores: Vec<f32> = l.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
    let choice: Vec<f32> = scores.iter().zip(bias).map(|(s, b)| s + b).collect();
    let per = n / r.groups;
    let group_score: Vec<f32> = choice
        .chunks(per)
        .map(|g| {
            let mut g = g.to_vec();
            g.sort_by(|a, b| b.total_cmp(a));
            g.iter().take(2).sum()
        })
        .collect();
    let mut groups: Vec<usize> = (0..r.groups).collect();
    by_desc(&group_score, &mut groups);
    let mut masked = vec![f32::NEG_INFINITY; n];
    for &g in &groups[..r.topk_groups] {
        masked[g * per..(g + 1) * per].copy_from_slice(&choice[g * per..(g + 1) * per]);
    }
    let mut idx: Vec<usize> = (0..n).collect();
    by_desc(&masked, &mut idx);
    let top = &idx[..k];
    let sum = top.iter().map(|&e| scores[e]).sum::<f32>() + 1e-20;
    top.iter()
        .map(|&e| {
            let w = if r.norm_topk {
                scores[e] / sum
            } else {
                scores[e]
            };
            (e, w * r.scale)
        })
        .collect()
}

/// The MoE block on `y` (`n x hidden`): the router's choice, the chosen
/// experts' weighted sum, and the shared expert (gated where it is).
fn moe(
    y: &[f32],
    s: &LayerShape,
    w: &AttentionLayer,
    routing: &Routing,
    experts: &[Expert],
) -> Vec<f32> {
    let h = s.hidden;
    let logits = linear(y, h, &w.gate, s.experts);
    let mut out = vec![0.0; y.len()];
    for (t, l) in logits.chunks(s.experts).enumerate() {
        let row = &y[t * h..][..h];
        for (e, wt) in choose(l, s.top_k, w.score_bias.as_deref(), routing) {
            for (o, v) in out[t * h..][..h].iter_mut().zip(expert(&experts[e], row)) {
                *o += wt * v;
            }
        }
        if let Some(sh) = &w.shared {
            let g = sh.gate.as_ref().map_or(1.0, |gate| {
                let logit: f32 = row.iter().zip(gate).map(|(a, b)| a * b.to_f32()).sum();
                1.0 / (1.0 + (-logit).exp())
            });
            for (o, v) in out[t * h..][..h].iter_mut().zip(expert(&sh.expert, row)) {
                *o += g * v;
            }
        }
    }
    out
}

/// Multi-head latent attention over the whole sequence `xn` (normalised,
/// `n x hidden`), as transformers computes it: every token's keys and
/// values materialised from its latent through `kv_b_proj`. Returns
/// `n x heads * v_head_dim`.
fn mla(xn: &[f32], s: &LayerShape, w: &MlaWeights) -> Vec<f32> {
    let (h, heads) = (s.hidden, s.heads);
    let d = &w.dims;
    let (kvl, rope) = (d.kv_lora_rank as usize, d.qk_rope_head_dim as usize);
    let (nope, vd) = (d.qk_nope_head_dim as usize, d.v_head_dim as usize);
    let qk = nope + rope;
    let n = xn.len() / h;
    let mut q = match &w.q_a {
        Some((qa, norm)) => {
            let mut a = linear(xn, h, qa, norm.len());
            rmsnorm(&mut a, norm, s.norm_eps);
            linear(&a, norm.len(), &w.q_b, heads * qk)
        }
        None => linear(xn, h, &w.q_b, heads * qk),
    };
    let kv = linear(xn, h, &w.kv_a, kvl + rope);
    let mut latent = Vec::with_capacity(n * kvl);
    let mut k_rot = Vec::with_capacity(n * rope);
    for row in kv.chunks(kvl + rope) {
        latent.extend_from_slice(&row[..kvl]);
        k_rot.extend_from_slice(&row[kvl..]);
    }
    rmsnorm(&mut latent, &w.kv_a_norm, s.norm_eps);
    let mut tmp = Vec::new();
    for (t, kr) in k_rot.chunks_mut(rope).enumerate() {
        rope_mla(
            kr,
            t as u32,
            &w.inv_freq,
            w.rope_factor,
            d.rope_interleave,
            &mut tmp,
        );
    }
    for (t, tok) in q.chunks_mut(heads * qk).enumerate() {
        for head in tok.chunks_mut(qk) {
            rope_mla(
                &mut head[nope..],
                t as u32,
                &w.inv_freq,
                w.rope_factor,
                d.rope_interleave,
                &mut tmp,
            );
        }
    }
    // Every token's keys (nope part) and values, per head.
    let kvb = linear(&latent, kvl, &w.kv_b, heads * (nope + vd));
    let mut out = vec![0.0; n * heads * vd];
    let mut scores = vec![0.0f32; n];
    for t in 0..n {
        for hd in 0..heads {
            let qv = &q[(t * heads + hd) * qk..][..qk];
            for (p, sc) in scores[..=t].iter_mut().enumerate() {
                let kn = &kvb[(p * heads + hd) * (nope + vd)..][..nope];
                let kr = &k_rot[p * rope..][..rope];
                let dot: f32 = qv[..nope].iter().zip(kn).map(|(a, b)| a * b).sum::<f32>()
                    + qv[nope..].iter().zip(kr).map(|(a, b)| a * b).sum::<f32>();
                *sc = dot * w.softmax_scale;
            }
            let sum = exp_shifted(&mut scores[..=t]);
            let o = &mut out[(t * heads + hd) * vd..][..vd];
            for (p, &e) in scores[..=t].iter().enumerate() {
                let vr = &kvb[(p * heads + hd) * (nope + vd) + nope..][..vd];
                for (ov, &vv) in o.iter_mut().zip(vr) {
                    *ov += e / sum * vv;
                }
            }
        }
    }
    out
}

/// Grouped-query attention over the whole sequence `xn` (normalised):
/// projections, biases, query and key norms, rope, attention.
fn gqa(xn: &[f32], s: &LayerShape, w: &AttentionLayer, [wq, wk, wv]: [&[bf16]; 3]) -> Vec<f32> {
    let h = s.hidden;
    let (qw, kw) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let mut q = linear(xn, h, wq, qw);
    let mut k = linear(xn, h, wk, kw);
    let mut v = linear(xn, h, wv, kw);
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
    attention(&q, &k, &v, s)
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
    let mut x: Vec<f32> = tokens
        .iter()
        .flat_map(|&t| attn.embed[t as usize * h..][..h].iter().map(|v| v.to_f32()))
        .collect();
    for (l, w) in attn.layers.iter().enumerate() {
        let mut xn = x.clone();
        rmsnorm(&mut xn, &w.input_norm, s.norm_eps);
        let a = match &w.attn {
            SelfAttn::Gqa { q, k, v } => gqa(&xn, s, w, [q, k, v]),
            SelfAttn::Mla(m) => mla(&xn, s, m),
        };
        let o = linear(&a, a.len() / tokens.len(), &w.o, h);
        for (xv, ov) in x.iter_mut().zip(&o) {
            *xv += ov;
        }
        let mut y = x.clone();
        rmsnorm(&mut y, &w.post_norm, s.norm_eps);
        let m = match &w.dense {
            Some(mlp) => y.chunks(h).flat_map(|row| expert(mlp, row)).collect(),
            None => moe(&y, s, w, &attn.routing, &experts.layers[l]),
        };
        for (xv, mv) in x.iter_mut().zip(&m) {
            *xv += mv;
        }
    }
    rmsnorm(&mut x, &attn.norm, s.norm_eps);
    let vocab = attn.lm_head.len() / h;
    linear(&x, h, &attn.lm_head, vocab)
}
