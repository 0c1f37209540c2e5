//! The top-k routers. The softmax router (Mixtral, Qwen, OLMoE):
//! `softmax(x W_r^T)`, the k largest (ties to the lower expert index),
//! their weights renormalised to sum to one when asked. The sigmoid router
//! with group-limited choice (DeepSeek-V3): see [`Grouped`].

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
    grouped: GroupBufs,
}

/// The grouped router's own buffers.
#[derive(Debug, Default)]
struct GroupBufs {
    choice: Vec<f32>,
    group_score: Vec<f32>,
    group_idx: Vec<usize>,
}

/// DeepSeek-V3's router (transformers' `DeepseekV3TopkRouter`): scores
/// `s = sigmoid(x W_r^T)`; the choice adds a score-correction `bias`; the
/// experts fall in `groups` equal groups, each ranked by the sum of its two
/// best choice values, and the top k are chosen from the best
/// `topk_groups` groups (ties to the lower index); the weights are the
/// chosen experts' `s` (without the bias), renormalised to sum to one when
/// `renormalize` (with transformers' 1e-20 guard), times `scale`.
#[derive(Debug, Clone, Copy)]
pub struct Grouped<'a> {
    /// `experts`, f32 (DeepSeek keeps it in f32).
    pub bias: &'a [f32],
    pub groups: usize,
    pub topk_groups: usize,
    pub renormalize: bool,
    pub scale: f32,
}

/// The sigmoid router's choice on one token's `logits`, into `out`.
fn grouped_top_k_into(
    logits: &[f32],
    k: usize,
    g: &Grouped<'_>,
    p: &mut Vec<f32>,
    idx: &mut Vec<usize>,
    bufs: &mut GroupBufs,
    out: &mut Route,
) {
    let GroupBufs {
        choice,
        group_score,
        group_idx,
    } = bufs;
    let e = logits.len();
    let per = e / g.groups;
    p.clear();
    p.extend(logits.iter().map(|&l| 1.0 / (1.0 + (-l).exp())));
    choice.clear();
    choice.extend(p.iter().zip(g.bias).map(|(s, b)| s + b));
    group_score.clear();
    for grp in choice.chunks(per) {
        let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
        for &v in grp {
            if v > a {
                (a, b) = (v, a);
            } else if v > b {
                b = v;
            }
        }
        group_score.push(if per == 1 { a } else { a + b });
    }
    group_idx.clear();
    group_idx.extend(0..g.groups);
    group_idx.sort_unstable_by(|&a, &b| group_score[b].total_cmp(&group_score[a]).then(a.cmp(&b)));
    group_idx.truncate(g.topk_groups);
    idx.clear();
    for &grp in group_idx.iter() {
        idx.extend(grp * per..(grp + 1) * per);
    }
    idx.sort_unstable_by(|&a, &b| choice[b].total_cmp(&choice[a]).then(a.cmp(&b)));
    let top = &idx[..k];
    let sum: f32 = top.iter().map(|&i| p[i]).sum::<f32>() + 1e-20;
    out.experts.clear();
    out.experts.extend_from_slice(top);
    out.weights.clear();
    out.weights.extend(top.iter().map(|&i| {
        let w = if g.renormalize { p[i] / sum } else { p[i] };
        w * g.scale
    }));
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
    let n = logits_into(x, hidden, w, experts, k, sc, out);
    let RouterScratch { logits, p, idx, .. } = sc;
    for (l, r) in logits.chunks(experts).zip(out.iter_mut()) {
        top_k_into(l, k, renormalize, p, idx, r);
    }
    &out[..n]
}

/// The sigmoid, group-limited router ([`Grouped`]) into `out`, as
/// [`route_into`] (no allocation once the buffers have grown).
#[allow(clippy::too_many_arguments)]
pub fn route_grouped_into<'a>(
    x: &[bf16],
    hidden: usize,
    w: &[bf16],
    experts: usize,
    k: usize,
    g: &Grouped<'_>,
    sc: &mut RouterScratch,
    out: &'a mut Vec<Route>,
) -> &'a [Route] {
    assert!(
        g.groups >= 1
            && experts.is_multiple_of(g.groups)
            && (1..=g.groups).contains(&g.topk_groups)
            && k <= g.topk_groups * (experts / g.groups)
            && g.bias.len() == experts,
        "grouped routing: top-{k} of {experts} experts in {} groups, best {}, bias of {}",
        g.groups,
        g.topk_groups,
        g.bias.len()
    );
    let n = logits_into(x, hidden, w, experts, k, sc, out);
    let RouterScratch {
        logits,
        p,
        idx,
        grouped,
        ..
    } = sc;
    for (l, r) in logits.chunks(experts).zip(out.iter_mut()) {
        grouped_top_k_into(l, k, g, p, idx, grouped, r);
    }
    &out[..n]
}

/// The router's logits (f32) of the `n` rows of `x` into `sc.logits`, and
/// `out` grown to `n` routes; returns `n`.
fn logits_into(
    x: &[bf16],
    hidden: usize,
    w: &[bf16],
    experts: usize,
    k: usize,
    sc: &mut RouterScratch,
    out: &mut Vec<Route>,
) -> usize {
    assert!(k >= 1 && k <= experts, "top-k {k} with {experts} experts");
    let n = x.len() / hidden;
    let RouterScratch { xf, logits, .. } = sc;
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
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token over 8 experts in 4 groups of 2, logits chosen by hand:
    /// the single best expert sits in a group whose second is poor, so
    /// the group ranking (sum of the two best) leaves it out; the bias
    /// moves the choice but not the weights.
    #[test]
    fn grouped_routing_picks_from_the_best_groups_and_weights_without_the_bias() {
        let h = 1;
        let x = [bf16::ONE];
        let logits = [3.0f32, -4.0, 1.0, 1.0, 0.5, 0.6, -1.0, 0.0];
        let w: Vec<bf16> = logits.iter().map(|&l| bf16::from_f32(l)).collect();
        let sig = |l: f32| 1.0 / (1.0 + (-l).exp());
        let mut bias = [0.0f32; 8];
        let route = |bias: &[f32], renormalize: bool| {
            let g = Grouped {
                bias,
                groups: 4,
                topk_groups: 2,
                renormalize,
                scale: 2.5,
            };
            let mut out = Vec::new();
            route_grouped_into(&x, h, &w, 8, 2, &g, &mut RouterScratch::default(), &mut out)[0]
                .clone()
        };
        // Group sums: g0 0.95+0.018, g1 2 x 0.73, g2 0.62+0.65, g3 0.27+0.5:
        // the best groups are 1 and 2, so expert 0 (the best score) is out.
        let r = route(&bias, false);
        assert_eq!(r.experts, vec![2, 3]);
        assert!((r.weights[0] - 2.5 * sig(1.0)).abs() < 1e-6);
        // Renormalised: the two weights sum to the scale.
        let r = route(&bias, true);
        assert!((r.weights.iter().sum::<f32>() - 2.5).abs() < 1e-5);
        // A bias on expert 5 makes it the first choice; its weight is still
        // its sigmoid score.
        bias[5] = 0.5;
        let r = route(&bias, false);
        assert_eq!(r.experts[0], 5);
        assert!((r.weights[0] - 2.5 * sig(w[5].to_f32())).abs() < 1e-6);
        // A bias on expert 1 lifts group 0 into the best two.
        let mut b2 = [0.0f32; 8];
        b2[1] = 1.0;
        let r = route(&b2, false);
        assert_eq!(r.experts, vec![1, 0]);
        assert!((r.weights[0] - 2.5 * sig(-4.0)).abs() < 1e-6);
    }
}
