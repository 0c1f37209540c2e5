//! The top-k softmax router: `softmax(x W_r^T)`, the k largest (ties to the
//! lower expert index), their weights renormalised to sum to one.

use half::bf16;

/// One token's experts and gate weights, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub experts: Vec<usize>,
    pub weights: Vec<f32>,
}

fn top_k(logits: &[f32], k: usize) -> Route {
    let mut route = Route {
        experts: Vec::new(),
        weights: Vec::new(),
    };
    top_k_into(
        logits,
        k,
        true,
        &mut Vec::new(),
        &mut Vec::new(),
        &mut route,
    );
    route
}

/// The top `k` of `logits` into `out`, reusing its vectors and the
/// buffers `p` and `idx`. Weights: the softmax probabilities of the chosen
/// experts, renormalised to sum to one when `renormalize`.
fn top_k_into(
    logits: &[f32],
    k: usize,
    renormalize: bool,
    p: &mut Vec<f32>,
    idx: &mut Vec<usize>,
    out: &mut Route,
) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    p.clear();
    p.extend(logits.iter().map(|l| (l - max).exp()));
    idx.clear();
    idx.extend(0..logits.len());
    // By descending probability, equal values in index order (a total
    // order, so the unstable sort is deterministic and allocates nothing).
    idx.sort_unstable_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    let top = &idx[..k];
    let sum: f32 = if renormalize {
        top.iter().map(|&i| p[i]).sum()
    } else {
        p.iter().sum()
    };
    out.experts.clear();
    out.experts.extend_from_slice(top);
    out.weights.clear();
    out.weights.extend(top.iter().map(|&i| p[i] / sum));
}

/// Reference router over `n` tokens.
pub fn route_ref(x: &[bf16], hidden: usize, w: &[bf16], experts: usize, k: usize) -> Vec<Route> {
    assert!(k >= 1 && k <= experts, "top-k {k} with {experts} experts");
    x.chunks(hidden)
        .map(|xr| {
            let logits: Vec<f32> = (0..experts)
                .map(|e| {
                    xr.iter()
                        .zip(&w[e * hidden..][..hidden])
                        .map(|(a, b)| a.to_f32() * b.to_f32())
                        .sum()
                })
                .collect();
            top_k(&logits, k)
        })
        .collect()
}

/// Fast router: logits through the bf16 GEMV.
pub fn route(x: &[bf16], hidden: usize, w: &[bf16], experts: usize, k: usize) -> Vec<Route> {
    let mut out = Vec::new();
    route_into(
        x,
        hidden,
        w,
        experts,
        k,
        true,
        &mut RouterScratch::default(),
        &mut out,
    );
    out
}

/// Reusable buffers of [`route_into`].
#[derive(Debug, Default)]
pub struct RouterScratch {
    xf: Vec<f32>,
    logits: Vec<f32>,
    p: Vec<f32>,
    idx: Vec<usize>,
}

/// [`route`] into `out`, whose routes are reused (it grows to the largest
/// batch and never shrinks): returns this batch's routes, `out[..n]`. No
/// allocation once the buffers have grown. `renormalize`: the chosen
/// experts' weights sum to one (Mixtral; Qwen3-MoE's `norm_topk_prob`),
/// else they are their softmax probabilities over all experts.
#[allow(clippy::too_many_arguments)]
pub fn route_into<'a>(
    x: &[bf16],
    hidden: usize,
    w: &[bf16],
    experts: usize,
    k: usize,
    renormalize: bool,
    sc: &mut RouterScratch,
    out: &'a mut Vec<Route>,
) -> &'a [Route] {
    assert!(k >= 1 && k <= experts, "top-k {k} with {experts} experts");
    let n = x.len() / hidden;
    let RouterScratch { xf, logits, p, idx } = sc;
    xf.clear();
    xf.extend(x.iter().map(|v| v.to_f32()));
    logits.clear();
    logits.resize(n * experts, 0.0);
    super::gemv::matmul_bf16(xf, n, hidden, w, experts, logits);
    while out.len() < n {
        out.push(Route {
            experts: Vec::with_capacity(k),
            weights: Vec::with_capacity(k),
        });
    }
    for (l, r) in logits.chunks(experts).zip(out.iter_mut()) {
        top_k_into(l, k, renormalize, p, idx, r);
    }
    &out[..n]
}
