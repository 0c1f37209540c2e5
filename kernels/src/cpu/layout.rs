//! The dispatch layout: tokens permuted into one contiguous buffer per
//! expert rank (rows grouped by expert, tokens in order within an expert),
//! with the index map that undoes it; and combine, its inverse, which
//! gathers expert outputs back and sums them with the gate weights.

use half::bf16;

use super::router::Route;

/// Which rank holds expert `e` when `experts` are split evenly, in order,
/// over `ranks` ranks.
pub fn rank_of(e: usize, experts: usize, ranks: usize) -> usize {
    e * ranks / experts
}

/// One row of a rank's buffer: which token, which expert, what weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Entry {
    pub token: usize,
    pub expert: usize,
    pub weight: f32,
}

/// What one expert rank receives.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RankBuffer {
    /// `entries.len() x hidden` rows, contiguous: the message to send.
    pub rows: Vec<bf16>,
    pub entries: Vec<Entry>,
}

/// Reference permute.
pub fn permute_ref(
    x: &[bf16],
    hidden: usize,
    routes: &[Route],
    experts: usize,
    ranks: usize,
) -> Vec<RankBuffer> {
    let mut out = vec![RankBuffer::default(); ranks];
    for e in 0..experts {
        let r = rank_of(e, experts, ranks);
        for (t, route) in routes.iter().enumerate() {
            for (&ex, &w) in route.experts.iter().zip(&route.weights) {
                if ex == e {
                    out[r].rows.extend_from_slice(&x[t * hidden..][..hidden]);
                    out[r].entries.push(Entry {
                        token: t,
                        expert: e,
                        weight: w,
                    });
                }
            }
        }
    }
    out
}

/// Fast permute: a counting sort by expert, then one row copy per entry
/// into buffers allocated once at their final size.
pub fn permute(
    x: &[bf16],
    hidden: usize,
    routes: &[Route],
    experts: usize,
    ranks: usize,
) -> Vec<RankBuffer> {
    let mut counts = vec![0usize; experts];
    for r in routes {
        for &e in &r.experts {
            counts[e] += 1;
        }
    }
    // Row index of each expert's first entry within its rank's buffer.
    let mut start = vec![0usize; experts];
    let mut per_rank = vec![0usize; ranks];
    for e in 0..experts {
        let r = rank_of(e, experts, ranks);
        start[e] = per_rank[r];
        per_rank[r] += counts[e];
    }
    let mut out: Vec<RankBuffer> = per_rank
        .iter()
        .map(|&n| RankBuffer {
            rows: vec![bf16::ZERO; n * hidden],
            entries: vec![
                Entry {
                    token: 0,
                    expert: 0,
                    weight: 0.0
                };
                n
            ],
        })
        .collect();
    let mut next = start;
    for (t, route) in routes.iter().enumerate() {
        for (&e, &w) in route.experts.iter().zip(&route.weights) {
            let rb = &mut out[rank_of(e, experts, ranks)];
            let i = next[e];
            next[e] += 1;
            rb.rows[i * hidden..(i + 1) * hidden].copy_from_slice(&x[t * hidden..][..hidden]);
            rb.entries[i] = Entry {
                token: t,
                expert: e,
                weight: w,
            };
        }
    }
    out
}

/// Reference combine: `out[t] = sum over t's entries of weight * row`.
pub fn combine_ref(
    outputs: &[&[bf16]],
    plans: &[RankBuffer],
    tokens: usize,
    hidden: usize,
) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; tokens * hidden];
    for t in 0..tokens {
        for d in 0..hidden {
            let mut acc = 0.0f32;
            for (rows, plan) in outputs.iter().zip(plans) {
                for (i, e) in plan.entries.iter().enumerate() {
                    if e.token == t {
                        acc += e.weight * rows[i * hidden + d].to_f32();
                    }
                }
            }
            out[t * hidden + d] = bf16::from_f32(acc);
        }
    }
    out
}

/// Fast combine: one pass over the received rows into f32 accumulators.
pub fn combine(
    outputs: &[&[bf16]],
    plans: &[RankBuffer],
    tokens: usize,
    hidden: usize,
) -> Vec<bf16> {
    let mut acc = vec![0.0f32; tokens * hidden];
    let mut row = vec![0.0f32; hidden];
    for (rows, plan) in outputs.iter().zip(plans) {
        for (i, e) in plan.entries.iter().enumerate() {
            super::gemv::widen(&rows[i * hidden..][..hidden], &mut row);
            for (a, v) in acc[e.token * hidden..][..hidden].iter_mut().zip(&row) {
                *a += e.weight * *v;
            }
        }
    }
    super::to_bf16(&acc)
}
