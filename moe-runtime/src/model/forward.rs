//! One decoder layer's compute, as shared by the reference decoder and the
//! attention and expert workers, so that every execution runs the same
//! per-token arithmetic (the kernels are batch-invariant: a token's bits do
//! not depend on which tokens share its batch).
//!
//! Per layer, on a batch of rows (tokens) of several sequences:
//! 1. [`attention`]: `h = x + o(attn(rope(q(norm(x))), cache))`, appending
//!    the rows' keys and values to their sequences' caches;
//! 2. [`moe_input`]: `y = post_norm(h)` and the top-k routes of `y`;
//! 3. the experts: each runs [`expert_rows`] on its rows of `y`;
//! 4. combine (`kernels::cpu::layout::combine_into`, by expert) and
//!    [`add_residual`]: `x' = h + combine`.
//!
//! A dense layer (DeepSeek-V3's first ones, the Qwen families'
//! `mlp_only_layers`) replaces 2 to 4 with [`dense_mlp`].
//!
//! Attention is grouped-query attention, or DeepSeek's multi-head latent
//! attention ([`SelfAttn::Mla`]): its KV cache holds, per token, the
//! normalised latent (`kv_lora_rank`, in the cache's `k`) and the shared
//! rope key (`qk_rope_head_dim`, in `v`), and it attends in the latent
//! space: each head's query is taken through its key projection
//! (`q_nope W_uk`) and its output through its value projection after the
//! softmax (the absorbed form: the same products as materialising every
//! past token's keys and values, in another order; the f32 reference
//! materialises them as transformers does).

use half::bf16;
use kernels::cpu::attention::{exp_shifted, prefill_attention, AttnScratch, KvCache};
use kernels::cpu::ffn::{swiglu_rows, Expert, FfnScratch};

use kernels::cpu::gemv::{axpy_bf16, dot_bf16, matmul_bf16, widen};
use kernels::cpu::norm::rmsnorm_with;
use kernels::cpu::rope::rope_with;
use kernels::cpu::router::{route_into, Route, RouterScratch};
use kernels::LayerShape;

use kernels::cpu::router::{route_grouped_into, Grouped};

use super::weights::{
    AttentionLayer, AttentionWeights, MlaWeights, Routing, SelfAttn, SharedExpert,
};

/// Consecutive rows of a batch that belong to one sequence: its cache for
/// this layer and the position of its first row.
#[derive(Debug)]
pub struct Segment<'a> {
    pub cache: &'a mut KvCache,
    pub start: usize,
    pub len: usize,
}

/// Reusable buffers of [`attention`], [`moe_input`] and [`lm_head`]: once
/// they have grown (see [`Scratch::reserve`]), a decode step allocates
/// nothing.
#[derive(Debug, Default)]
pub struct Scratch {
    normed: Vec<bf16>,
    xf: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    qb: Vec<bf16>,
    kb: Vec<bf16>,
    attn: Vec<bf16>,
    attn_f: Vec<f32>,
    o: Vec<f32>,
    positions: Vec<u32>,
    attn_sc: AttnScratch,
    heads_tmp: Vec<bf16>,
    shared_ffn: FfnScratch,
    shared_row: Vec<f32>,
    norm: Vec<f32>,
    rope: Vec<f32>,
    router: RouterScratch,
    routes: Vec<Route>,
    dense_out: Vec<bf16>,
    mla: MlaScratch,
}

/// Multi-head latent attention's buffers.
#[derive(Debug, Default)]
struct MlaScratch {
    qa: Vec<f32>,
    qab: Vec<bf16>,
    qaf: Vec<f32>,
    kv: Vec<f32>,
    kvb: Vec<bf16>,
    latent: Vec<bf16>,
    q_lat: Vec<f32>,
    q_rot: Vec<f32>,
    scores: Vec<f32>,
    o_lat: Vec<f32>,
}

impl Scratch {
    /// Grows the attention buffers for contexts of up to `len` tokens.
    pub fn reserve(&mut self, s: &LayerShape, len: usize) {
        self.attn_sc.reserve(s, len);
        let more = len.saturating_sub(self.mla.scores.len());
        self.mla.scores.reserve(more);
    }
}

fn to_bf16_into(src: &[f32], dst: &mut Vec<bf16>) {
    dst.clear();
    dst.extend(src.iter().map(|&v| bf16::from_f32(v)));
}

/// `x[r] += bias` for every `bias.len()`-wide row `r` of `x`.
fn add_bias(x: &mut [f32], bias: &[bf16]) {
    for row in x.chunks_mut(bias.len()) {
        for (v, b) in row.iter_mut().zip(bias) {
            *v += b.to_f32();
        }
    }
}

/// RMSNorm of every head of `x` (`rows x heads x head_dim`) with the
/// `head_dim` weights `w`, in place (through `tmp`).
fn norm_heads(x: &mut Vec<bf16>, w: &[bf16], eps: f32, tmp: &mut Vec<bf16>, buf: &mut Vec<f32>) {
    tmp.clear();
    tmp.resize(x.len(), bf16::ZERO);
    rmsnorm_with(x, w, eps, tmp, buf);
    std::mem::swap(x, tmp);
}

/// Attention with its residual, in place: `x` (`rows x hidden`) becomes
/// `x + o(attn(...))`. `segs` cover the rows in order.
pub fn attention(
    s: &LayerShape,
    w: &AttentionLayer,
    x: &mut [bf16],
    segs: &mut [Segment<'_>],
    sc: &mut Scratch,
) {
    let h = s.hidden;
    let rows = x.len() / h;
    debug_assert_eq!(segs.iter().map(|g| g.len).sum::<usize>(), rows);
    if rows == 0 {
        return;
    }
    sc.normed.resize(rows * h, bf16::ZERO);
    rmsnorm_with(x, &w.input_norm, s.norm_eps, &mut sc.normed, &mut sc.norm);
    sc.xf.resize(rows * h, 0.0);
    widen(&sc.normed, &mut sc.xf);
    sc.positions.clear();
    for g in segs.iter() {
        sc.positions
            .extend((g.start..g.start + g.len).map(|p| p as u32));
    }
    let out_width = match &w.attn {
        SelfAttn::Gqa { q, k, v } => {
            gqa(s, w, [q, k, v], rows, segs, sc);
            s.heads * s.head_dim
        }
        SelfAttn::Mla(m) => {
            mla(s, m, rows, segs, sc);
            s.heads * m.dims.v_head_dim as usize
        }
    };
    sc.attn_f.resize(rows * out_width, 0.0);
    widen(&sc.attn, &mut sc.attn_f);
    sc.o.resize(rows * h, 0.0);
    matmul_bf16(&sc.attn_f, rows, out_width, &w.o, h, &mut sc.o);
    for (xv, &ov) in x.iter_mut().zip(&sc.o) {
        // o_proj's output is bf16, then the residual add (as in bf16 models).
        *xv = bf16::from_f32(xv.to_f32() + bf16::from_f32(ov).to_f32());
    }
}

/// Grouped-query attention of the `rows` normalised rows in `sc.xf`, into
/// `sc.attn` (`rows x heads * head_dim`, bf16).
fn gqa(
    s: &LayerShape,
    w: &AttentionLayer,
    [wq, wk, wv]: [&[bf16]; 3],
    rows: usize,
    segs: &mut [Segment<'_>],
    sc: &mut Scratch,
) {
    let h = s.hidden;
    let (qd, kvd) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    sc.q.resize(rows * qd, 0.0);
    sc.k.resize(rows * kvd, 0.0);
    sc.v.resize(rows * kvd, 0.0);
    matmul_bf16(&sc.xf, rows, h, wq, qd, &mut sc.q);
    matmul_bf16(&sc.xf, rows, h, wk, kvd, &mut sc.k);
    matmul_bf16(&sc.xf, rows, h, wv, kvd, &mut sc.v);
    // Qwen2-MoE: biased projections (added in f32, before any rounding).
    if let Some([qb, kb, vb]) = &w.qkv_bias {
        add_bias(&mut sc.q, qb);
        add_bias(&mut sc.k, kb);
        add_bias(&mut sc.v, vb);
    }
    to_bf16_into(&sc.q, &mut sc.qb);
    to_bf16_into(&sc.k, &mut sc.kb);
    // Qwen3-MoE: an RMSNorm over each head of the queries and keys, before rope.
    if let Some(qn) = &w.q_norm {
        norm_heads(&mut sc.qb, qn, s.norm_eps, &mut sc.heads_tmp, &mut sc.norm);
    }
    if let Some(kn) = &w.k_norm {
        norm_heads(&mut sc.kb, kn, s.norm_eps, &mut sc.heads_tmp, &mut sc.norm);
    }
    rope_with(
        &mut sc.qb,
        s.heads,
        s.head_dim,
        &sc.positions,
        s.rope_theta,
        &mut sc.rope,
    );
    rope_with(
        &mut sc.kb,
        s.kv_heads,
        s.head_dim,
        &sc.positions,
        s.rope_theta,
        &mut sc.rope,
    );
    sc.attn.resize(rows * qd, bf16::ZERO);
    let mut row = 0;
    for g in segs.iter_mut() {
        assert_eq!(g.cache.len, g.start, "a sequence's rows continue its cache");
        g.cache
            .k
            .extend_from_slice(&sc.kb[row * kvd..(row + g.len) * kvd]);
        g.cache.v.extend(
            sc.v[row * kvd..(row + g.len) * kvd]
                .iter()
                .map(|&v| bf16::from_f32(v)),
        );
        g.cache.len += g.len;
        prefill_attention(
            &sc.qb[row * qd..(row + g.len) * qd],
            g.cache,
            g.start,
            s,
            &mut sc.attn[row * qd..(row + g.len) * qd],
            &mut sc.attn_sc,
        );
        row += g.len;
    }
}

/// Rope on one head's rope part `x` (f32, in place) at `pos`: interleaved
/// pairs `(x0, x1), (x2, x3)...` each rotated by one frequency and laid out
/// as `[evens, odds]` (transformers' `apply_rotary_pos_emb_interleave`), or
/// the halves rotated (`apply_rotary_pos_emb`); cos and sin scaled by
/// `factor` (YaRN's attention factor). `tmp` holds a copy.
pub fn rope_mla(
    x: &mut [f32],
    pos: u32,
    inv_freq: &[f32],
    factor: f32,
    interleave: bool,
    tmp: &mut Vec<f32>,
) {
    let half = x.len() / 2;
    tmp.clear();
    tmp.extend_from_slice(x);
    for (i, &f) in inv_freq.iter().enumerate().take(half) {
        let (sn, cs) = (pos as f32 * f).sin_cos();
        let (sn, cs) = (sn * factor, cs * factor);
        let (a, b) = if interleave {
            (tmp[2 * i], tmp[2 * i + 1])
        } else {
            (tmp[i], tmp[half + i])
        };
        x[i] = a * cs - b * sn;
        x[half + i] = b * cs + a * sn;
    }
}

/// Multi-head latent attention of the `rows` normalised rows in `sc.xf`,
/// into `sc.attn` (`rows x heads * v_head_dim`, bf16), appending each
/// row's latent and rope key to its sequence's cache. Every row is
/// computed alone (batch-invariant), projections as bf16 linear layers.
fn mla(s: &LayerShape, w: &MlaWeights, rows: usize, segs: &mut [Segment<'_>], sc: &mut Scratch) {
    let h = s.hidden;
    let d = &w.dims;
    let heads = s.heads;
    let (kvl, rope) = (d.kv_lora_rank as usize, d.qk_rope_head_dim as usize);
    let (nope, vd) = (d.qk_nope_head_dim as usize, d.v_head_dim as usize);
    let qk = nope + rope;
    let m = &mut sc.mla;
    // Queries: q_b(norm(q_a(x))), or q(x); bf16 outputs.
    sc.q.resize(rows * heads * qk, 0.0);
    match &w.q_a {
        Some((qa, qa_norm)) => {
            let ql = qa_norm.len();
            m.qa.resize(rows * ql, 0.0);
            matmul_bf16(&sc.xf, rows, h, qa, ql, &mut m.qa);
            to_bf16_into(&m.qa, &mut m.qab);
            sc.heads_tmp.clear();
            sc.heads_tmp.resize(rows * ql, bf16::ZERO);
            rmsnorm_with(&m.qab, qa_norm, s.norm_eps, &mut sc.heads_tmp, &mut sc.norm);
            m.qaf.resize(rows * ql, 0.0);
            widen(&sc.heads_tmp, &mut m.qaf);
            matmul_bf16(&m.qaf, rows, ql, &w.q_b, heads * qk, &mut sc.q);
        }
        None => matmul_bf16(&sc.xf, rows, h, &w.q_b, heads * qk, &mut sc.q),
    }
    to_bf16_into(&sc.q, &mut sc.qb);
    // The compressed latent and the shared rope key.
    m.kv.resize(rows * (kvl + rope), 0.0);
    matmul_bf16(&sc.xf, rows, h, &w.kv_a, kvl + rope, &mut m.kv);
    to_bf16_into(&m.kv, &mut m.kvb);
    m.latent.clear();
    m.latent.resize(rows * kvl, bf16::ZERO);
    sc.kb.clear();
    sc.kb.resize(rows * kvl, bf16::ZERO);
    for r in 0..rows {
        sc.kb[r * kvl..(r + 1) * kvl].copy_from_slice(&m.kvb[r * (kvl + rope)..][..kvl]);
    }
    rmsnorm_with(
        &sc.kb,
        &w.kv_a_norm,
        s.norm_eps,
        &mut m.latent,
        &mut sc.norm,
    );
    sc.attn.clear();
    sc.attn.resize(rows * heads * vd, bf16::ZERO);
    let mut row = 0;
    for g in segs.iter_mut() {
        assert_eq!(g.cache.len, g.start, "a sequence's rows continue its cache");
        for r in row..row + g.len {
            let pos = sc.positions[r];
            // This row's rope key, roped, into the cache after its latent.
            sc.k.clear();
            sc.k.extend(
                m.kvb[r * (kvl + rope) + kvl..][..rope]
                    .iter()
                    .map(|v| v.to_f32()),
            );
            rope_mla(
                &mut sc.k,
                pos,
                &w.inv_freq,
                w.rope_factor,
                d.rope_interleave,
                &mut sc.rope,
            );
            g.cache
                .k
                .extend_from_slice(&m.latent[r * kvl..(r + 1) * kvl]);
            g.cache.v.extend(sc.k.iter().map(|&v| bf16::from_f32(v)));
            g.cache.len += 1;
            let t = g.cache.len;
            let latents = &g.cache.k[..t * kvl];
            for hd in 0..heads {
                let qrow = &sc.qb[(r * heads + hd) * qk..][..qk];
                let wk = &w.kv_b[hd * (nope + vd) * kvl..][..nope * kvl];
                let wv = &w.kv_b[(hd * (nope + vd) + nope) * kvl..][..vd * kvl];
                // q_nope through the head's key projection: q_lat = W_uk^T q_nope.
                m.q_lat.clear();
                m.q_lat.resize(kvl, 0.0);
                for (dd, qv) in qrow[..nope].iter().enumerate() {
                    axpy_bf16(&mut m.q_lat, qv.to_f32(), &wk[dd * kvl..(dd + 1) * kvl]);
                }
                m.q_rot.clear();
                m.q_rot.extend(qrow[nope..].iter().map(|v| v.to_f32()));
                rope_mla(
                    &mut m.q_rot,
                    pos,
                    &w.inv_freq,
                    w.rope_factor,
                    d.rope_interleave,
                    &mut sc.rope,
                );
                m.q_rot
                    .iter_mut()
                    .for_each(|v| *v = bf16::from_f32(*v).to_f32());
                m.scores.clear();
                for p in 0..t {
                    let lat = dot_bf16(&m.q_lat, &latents[p * kvl..(p + 1) * kvl]);
                    let rot = dot_bf16(&m.q_rot, &g.cache.v[p * rope..(p + 1) * rope]);
                    m.scores.push((lat + rot) * w.softmax_scale);
                }
                let sum = exp_shifted(&mut m.scores);
                m.o_lat.clear();
                m.o_lat.resize(kvl, 0.0);
                for (p, &e) in m.scores.iter().enumerate() {
                    axpy_bf16(&mut m.o_lat, e / sum, &latents[p * kvl..(p + 1) * kvl]);
                }
                // The head's output through its value projection.
                let out = &mut sc.attn[(r * heads + hd) * vd..][..vd];
                for (e, o) in out.iter_mut().enumerate() {
                    *o = bf16::from_f32(dot_bf16(&m.o_lat, &wv[e * kvl..(e + 1) * kvl]));
                }
            }
        }
        row += g.len;
    }
}

/// A dense layer's FFN with its residual, in place: `x += mlp(post_norm(x))`
/// (bf16, as the MoE combine is added).
pub fn dense_mlp(s: &LayerShape, w: &AttentionLayer, x: &mut [bf16], sc: &mut Scratch) {
    let mlp = w.dense.as_ref().expect("a dense layer");
    if x.is_empty() {
        return;
    }
    sc.normed.clear();
    sc.normed.resize(x.len(), bf16::ZERO);
    rmsnorm_with(x, &w.post_norm, s.norm_eps, &mut sc.normed, &mut sc.norm);
    sc.dense_out.clear();
    sc.dense_out.resize(x.len(), bf16::ZERO);
    swiglu_rows(mlp, &sc.normed, &mut sc.dense_out, &mut sc.shared_ffn);
    add_residual(x, &sc.dense_out);
}

/// The experts' input: `post_norm(h)` into `normed`, and each row's route
/// (held in the scratch until the next call), chosen as `routing` says:
/// the softmax router, or DeepSeek-V3's grouped sigmoid router in a layer
/// with a score-correction bias.
pub fn moe_input<'s>(
    s: &LayerShape,
    w: &AttentionLayer,
    routing: &Routing,
    h: &[bf16],
    normed: &mut Vec<bf16>,
    sc: &'s mut Scratch,
) -> &'s [Route] {
    normed.clear();
    normed.resize(h.len(), bf16::ZERO);
    if h.is_empty() {
        return &[];
    }
    rmsnorm_with(h, &w.post_norm, s.norm_eps, normed, &mut sc.norm);
    match &w.score_bias {
        Some(bias) => route_grouped_into(
            normed,
            s.hidden,
            &w.gate,
            s.experts,
            s.top_k,
            &Grouped {
                bias,
                groups: routing.groups,
                topk_groups: routing.topk_groups,
                renormalize: routing.norm_topk,
                scale: routing.scale,
            },
            &mut sc.router,
            &mut sc.routes,
        ),
        None => route_into(
            normed,
            s.hidden,
            &w.gate,
            s.experts,
            s.top_k,
            routing.norm_topk,
            &mut sc.router,
            &mut sc.routes,
        ),
    }
}

/// One expert on its rows: the batch-invariant SwiGLU.
pub fn expert_rows(e: &Expert, x: &[bf16], out: &mut [bf16], sc: &mut FfnScratch) {
    swiglu_rows(e, x, out, sc);
}

/// The shared expert on the experts' input `y` (`rows x hidden`), into
/// `out`: `swiglu(y_r)`, times `sigmoid(gate . y_r)` where it is gated,
/// per row, rounded to bf16.
/// It runs where the routers do, on the attention side (see the attention
/// worker's schedule), and like every kernel here a row's bits do not
/// depend on its batch.
pub fn shared_expert(sh: &SharedExpert, y: &[bf16], out: &mut Vec<bf16>, sc: &mut Scratch) {
    let h = sh.expert.hidden;
    out.clear();
    out.resize(y.len(), bf16::ZERO);
    if y.is_empty() {
        return;
    }
    swiglu_rows(&sh.expert, y, out, &mut sc.shared_ffn);
    let Some(gate) = &sh.gate else { return };
    sc.shared_row.resize(h, 0.0);
    for (yr, or) in y.chunks(h).zip(out.chunks_mut(h)) {
        widen(yr, &mut sc.shared_row);
        let logit = kernels::cpu::gemv::dot_bf16(&sc.shared_row, gate);
        let g = 1.0 / (1.0 + (-logit).exp());
        for o in or.iter_mut() {
            *o = bf16::from_f32(g * o.to_f32());
        }
    }
}

/// The routed experts' combine plus the shared expert's output, in bf16
/// (`moe += shared`), before the residual.
pub fn add_shared(moe: &mut [bf16], shared: &[bf16]) {
    add_residual(moe, shared);
}

/// The MoE residual: `h += y`, in bf16.
pub fn add_residual(h: &mut [bf16], y: &[bf16]) {
    for (a, b) in h.iter_mut().zip(y) {
        *a = bf16::from_f32(a.to_f32() + b.to_f32());
    }
}

/// Token embeddings into `out` (`tokens x hidden`). Token ids are checked
/// by the caller.
pub fn embed(w: &AttentionWeights, hidden: usize, tokens: &[u32], out: &mut Vec<bf16>) {
    out.clear();
    for &t in tokens {
        out.extend_from_slice(&w.embed[t as usize * hidden..][..hidden]);
    }
}

/// Final norm and LM head of some rows: `logits` (`rows x vocab`, f32).
pub fn lm_head(
    s: &LayerShape,
    w: &AttentionWeights,
    x: &[bf16],
    logits: &mut Vec<f32>,
    sc: &mut Scratch,
) {
    let rows = x.len() / s.hidden;
    let vocab = w.lm_head.len() / s.hidden;
    sc.normed.clear();
    sc.normed.resize(x.len(), bf16::ZERO);
    rmsnorm_with(x, &w.norm, s.norm_eps, &mut sc.normed, &mut sc.norm);
    sc.xf.clear();
    sc.xf.extend(sc.normed.iter().map(|v| v.to_f32()));
    logits.clear();
    logits.resize(rows * vocab, 0.0);
    matmul_bf16(&sc.xf, rows, s.hidden, &w.lm_head, vocab, logits);
}

/// Greedy choice: the largest logit (ties to the lower id) and its natural
/// log-probability under the f32 softmax.
pub fn greedy(logits: &[f32]) -> (u32, f32) {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    (best as u32, logprob(logits, best))
}

/// `log softmax(logits)[i]`, in f32 with the max subtracted.
pub fn logprob(logits: &[f32], i: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    logits[i] - max - sum.ln()
}

/// The `n` most likely tokens with their log-probabilities, best first
/// (ties to the lower id).
pub fn top_logprobs(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    if n == 0 {
        return Vec::new();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    idx.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    idx.truncate(n);
    idx.into_iter()
        .map(|i| (i, logits[i as usize] - lse))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_lower_id_on_ties_and_logprobs_normalise() {
        let l = [1.0, 3.0, 3.0, -2.0];
        let (t, lp) = greedy(&l);
        assert_eq!(t, 1);
        let total: f32 = (0..4).map(|i| logprob(&l, i).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        assert!((lp - logprob(&l, 2)).abs() < 1e-9);
    }
}
