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
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let p: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    // Stable sort by descending probability: equal values keep index order.
    idx.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
    idx.truncate(k);
    let sum: f32 = idx.iter().map(|&i| p[i]).sum();
    Route {
        weights: idx.iter().map(|&i| p[i] / sum).collect(),
        experts: idx,
    }
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
    assert!(k >= 1 && k <= experts, "top-k {k} with {experts} experts");
    let n = x.len() / hidden;
    let xf = super::to_f32(x);
    let mut logits = vec![0.0f32; n * experts];
    super::gemv::matmul_bf16(&xf, n, hidden, w, experts, &mut logits);
    logits.chunks(experts).map(|l| top_k(l, k)).collect()
}
