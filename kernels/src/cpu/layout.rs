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

/// The layout alone: for each rank, its entries in buffer order (by
/// expert, tokens in order within an expert), by a counting sort. The MoE
/// runtime gathers rows straight into its registered send buffers from
/// this; [`permute`] gathers them into vectors.
pub fn plan(routes: &[Route], experts: usize, ranks: usize) -> Vec<Vec<Entry>> {
    let mut out = Vec::new();
    plan_into(
        routes,
        experts,
        ranks,
        &mut PlanScratch::default(),
        &mut out,
    );
    out
}

/// Reusable buffers of [`plan_into`].
#[derive(Debug, Default)]
pub struct PlanScratch {
    counts: Vec<usize>,
    next: Vec<usize>,
    per_rank: Vec<usize>,
}

/// [`plan`] into `out` (one entry list per rank), reusing its lists: no
/// allocation once they have grown.
pub fn plan_into(
    routes: &[Route],
    experts: usize,
    ranks: usize,
    sc: &mut PlanScratch,
    out: &mut Vec<Vec<Entry>>,
) {
    let PlanScratch {
        counts,
        next,
        per_rank,
    } = sc;
    counts.clear();
    counts.resize(experts, 0);
    for r in routes {
        for &e in &r.experts {
            counts[e] += 1;
        }
    }
    // Row index of each expert's first entry within its rank's buffer.
    next.clear();
    next.resize(experts, 0);
    per_rank.clear();
    per_rank.resize(ranks, 0);
    for e in 0..experts {
        let r = rank_of(e, experts, ranks);
        next[e] = per_rank[r];
        per_rank[r] += counts[e];
    }
    let blank = Entry {
        token: 0,
        expert: 0,
        weight: 0.0,
    };
    out.resize_with(ranks, Vec::new);
    for (list, &n) in out.iter_mut().zip(per_rank.iter()) {
        list.clear();
        list.resize(n, blank);
    }
    for (t, route) in routes.iter().enumerate() {
        for (&e, &w) in route.experts.iter().zip(&route.weights) {
            let i = next[e];
            next[e] += 1;
            out[rank_of(e, experts, ranks)][i] = Entry {
                token: t,
                expert: e,
                weight: w,
            };
        }
    }
}

/// Fast permute: [`plan`], then one row copy per entry into buffers
/// allocated once at their final size.
pub fn permute(
    x: &[bf16],
    hidden: usize,
    routes: &[Route],
    experts: usize,
    ranks: usize,
) -> Vec<RankBuffer> {
    plan(routes, experts, ranks)
        .into_iter()
        .map(|entries| {
            let mut rows = vec![bf16::ZERO; entries.len() * hidden];
            for (row, e) in rows.chunks_exact_mut(hidden).zip(&entries) {
                row.copy_from_slice(&x[e.token * hidden..][..hidden]);
            }
            RankBuffer { rows, entries }
        })
        .collect()
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
    let entries: Vec<&[Entry]> = plans.iter().map(|p| p.entries.as_slice()).collect();
    let mut out = vec![bf16::ZERO; tokens * hidden];
    combine_into(
        outputs,
        &entries,
        hidden,
        &mut Combiner::default(),
        &mut out,
    );
    out
}

/// [`combine`] on bare entry lists, into `out` (`tokens x hidden`), with a
/// reusable accumulator. A token's terms are summed in rank order, then in
/// buffer order: by expert, whatever the number of ranks, so the result does
/// not depend on how the experts are split.
pub fn combine_into(
    outputs: &[&[bf16]],
    entries: &[&[Entry]],
    hidden: usize,
    acc: &mut Combiner,
    out: &mut [bf16],
) {
    acc.start(out.len() / hidden, hidden);
    for (rows, plan) in outputs.iter().zip(entries) {
        acc.add(rows, plan);
    }
    acc.finish(out);
}

/// The combine's f32 accumulators, fed one rank's rows at a time (so a
/// caller need not gather the ranks' outputs first): [`start`], then
/// [`add`] for each rank in rank order, then [`finish`]. The same sums, in
/// the same order, as [`combine_into`]; no allocation once grown.
///
/// [`start`]: Combiner::start
/// [`add`]: Combiner::add
/// [`finish`]: Combiner::finish
#[derive(Debug, Default)]
pub struct Combiner {
    acc: Vec<f32>,
    row: Vec<f32>,
    hidden: usize,
}

impl Combiner {
    /// Zeroes the accumulators for `tokens x hidden` outputs.
    pub fn start(&mut self, tokens: usize, hidden: usize) {
        self.hidden = hidden;
        self.acc.clear();
        self.acc.resize(tokens * hidden, 0.0);
        self.row.resize(hidden, 0.0);
    }

    /// Adds one rank's output rows (`entries.len() x hidden`), weighted.
    pub fn add(&mut self, rows: &[bf16], entries: &[Entry]) {
        let h = self.hidden;
        for (i, e) in entries.iter().enumerate() {
            super::gemv::widen(&rows[i * h..][..h], &mut self.row);
            for (a, v) in self.acc[e.token * h..][..h].iter_mut().zip(&self.row) {
                *a += e.weight * *v;
            }
        }
    }

    /// The sums, rounded to bf16, into `out` (`tokens x hidden`).
    pub fn finish(&self, out: &mut [bf16]) {
        debug_assert_eq!(out.len(), self.acc.len());
        for (o, a) in out.iter_mut().zip(&self.acc) {
            *o = bf16::from_f32(*a);
        }
    }
}
