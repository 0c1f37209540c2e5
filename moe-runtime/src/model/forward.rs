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

use half::bf16;
use kernels::cpu::attention::{prefill_attention, AttnScratch, KvCache};
use kernels::cpu::ffn::{swiglu_rows, Expert, FfnScratch};

use kernels::cpu::gemv::{matmul_bf16, widen};
use kernels::cpu::norm::rmsnorm_with;
use kernels::cpu::rope::rope_with;
use kernels::cpu::router::{route_into, Route, RouterScratch};
use kernels::LayerShape;

use super::weights::{AttentionLayer, AttentionWeights, SharedExpert};

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
}

impl Scratch {
    /// Grows the attention buffers for contexts of up to `len` tokens.
    pub fn reserve(&mut self, s: &LayerShape, len: usize) {
        self.attn_sc.reserve(s, len);
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
    let (qd, kvd) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    sc.normed.resize(rows * h, bf16::ZERO);
    rmsnorm_with(x, &w.input_norm, s.norm_eps, &mut sc.normed, &mut sc.norm);
    sc.xf.resize(rows * h, 0.0);
    widen(&sc.normed, &mut sc.xf);
    sc.q.resize(rows * qd, 0.0);
    sc.k.resize(rows * kvd, 0.0);
    sc.v.resize(rows * kvd, 0.0);
    matmul_bf16(&sc.xf, rows, h, &w.q, qd, &mut sc.q);
    matmul_bf16(&sc.xf, rows, h, &w.k, kvd, &mut sc.k);
    matmul_bf16(&sc.xf, rows, h, &w.v, kvd, &mut sc.v);
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
    sc.positions.clear();
    for g in segs.iter() {
        sc.positions
            .extend((g.start..g.start + g.len).map(|p| p as u32));
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
    sc.attn_f.resize(rows * qd, 0.0);
    widen(&sc.attn, &mut sc.attn_f);
    sc.o.resize(rows * h, 0.0);
    matmul_bf16(&sc.attn_f, rows, qd, &w.o, h, &mut sc.o);
    for (xv, &ov) in x.iter_mut().zip(&sc.o) {
        // o_proj's output is bf16, then the residual add (as in bf16 models).
        *xv = bf16::from_f32(xv.to_f32() + bf16::from_f32(ov).to_f32());
    }
}

/// The experts' input: `post_norm(h)` into `normed`, and each row's route
/// (held in the scratch until the next call); `norm_topk`: the chosen
/// experts' weights are renormalised to sum to one.
pub fn moe_input<'s>(
    s: &LayerShape,
    w: &AttentionLayer,
    norm_topk: bool,
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
    route_into(
        normed,
        s.hidden,
        &w.gate,
        s.experts,
        s.top_k,
        norm_topk,
        &mut sc.router,
        &mut sc.routes,
    )
}

/// One expert on its rows: the batch-invariant SwiGLU.
pub fn expert_rows(e: &Expert, x: &[bf16], out: &mut [bf16], sc: &mut FfnScratch) {
    swiglu_rows(e, x, out, sc);
}

/// The shared expert on the experts' input `y` (`rows x hidden`), into
/// `out`: `sigmoid(gate . y_r) * swiglu(y_r)` per row, rounded to bf16.
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
    sc.shared_row.resize(h, 0.0);
    for (yr, or) in y.chunks(h).zip(out.chunks_mut(h)) {
        widen(yr, &mut sc.shared_row);
        let logit = kernels::cpu::gemv::dot_bf16(&sc.shared_row, &sh.gate);
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
