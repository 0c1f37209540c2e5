//! Algorithm 1: the plan search.

use serde::Serialize;

use super::perf::Setting;

/// Tensor-parallel sizes tried on both sides.
pub const TP_SIZES: [u64; 4] = [1, 2, 4, 8];

/// Everything the model says about one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Estimate {
    pub t_a: f64,
    pub t_e: f64,
    pub t_c: f64,
    pub t_f: f64,
    /// Per-token iteration latency, its upper bound `m T_f L`.
    pub t_iter: f64,
    /// One iteration of the global batch: `(T_a + T_e + 2T_c) + T_f (mL - 1)`.
    pub t_total: f64,
    pub tokens_per_s: f64,
}

/// A deployment plan and its estimate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub attention_gpu: String,
    pub expert_gpu: String,
    pub tp_a: u64,
    pub n_a: u64,
    pub tp_e: u64,
    /// Expert nodes (one per expert).
    pub e: u64,
    pub m: u64,
    /// Global batch B = b_a m n_a.
    pub batch: u64,
    pub b_a: u64,
    pub b_e: f64,
    pub estimate: Estimate,
    pub gpus: u64,
    pub cost: f64,
    pub tokens_per_s_per_gpu: f64,
    pub tokens_per_s_per_cost: f64,
}

/// Why a candidate lost.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rejection {
    pub attention_gpu: String,
    pub expert_gpu: String,
    pub tp_a: u64,
    pub tp_e: u64,
    pub m: Option<u64>,
    pub reason: String,
}

/// Plans found, best first, and what was rejected.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SearchResult {
    pub plans: Vec<Plan>,
    pub rejected: Vec<Rejection>,
}

/// The balance rule `n_a = k1 E / (k3 K)`, rounded to the nearest whole
/// node and at least 1: attention then takes about as long as experts.
pub fn balance_attention_nodes(k1: f64, k3: f64, experts: u64, top_k: u64) -> u64 {
    ((k1 * experts as f64) / (k3 * top_k as f64))
        .round()
        .max(1.0) as u64
}

/// Whether `b_a` meets the constraints that only get worse as the batch
/// grows: memory and the latency SLO (`T_iter = m T_f L`).
fn within_capacity(
    s: &Setting,
    tp_a: u64,
    tp_e: u64,
    n_a: u64,
    m: u64,
    b_a: u64,
) -> Result<(), String> {
    let md = &s.model;
    if !s.attention_fits(tp_a, m, b_a) {
        return Err(format!(
            "memory: KV cache of {m} x {b_a} tokens plus attention weights exceed {tp_a} x {} GB",
            s.attention_gpu.memory_gb
        ));
    }
    let b_e = (b_a * n_a * md.top_k) as f64 / md.experts as f64;
    let t_f = s.attention(tp_a).at(b_a as f64).max(s.expert(tp_e).at(b_e));
    let t_iter = m as f64 * t_f * md.layers as f64;
    if t_iter > s.slo_s {
        return Err(format!(
            "SLO: T_iter {:.1} ms > {:.1} ms",
            t_iter * 1e3,
            s.slo_s * 1e3
        ));
    }
    Ok(())
}

/// The estimate for `b_a` tokens per attention node per micro-batch, or
/// why it is infeasible.
pub fn evaluate(
    s: &Setting,
    tp_a: u64,
    tp_e: u64,
    n_a: u64,
    m: u64,
    b_a: u64,
) -> Result<Estimate, String> {
    within_capacity(s, tp_a, tp_e, n_a, m, b_a)?;
    let md = &s.model;
    let b_e = (b_a * n_a * md.top_k) as f64 / md.experts as f64;
    let t_a = s.attention(tp_a).at(b_a as f64);
    let t_e = s.expert(tp_e).at(b_e);
    let t_c = s.comm(tp_a, tp_e, b_a as f64, b_e);
    let t_f = t_a.max(t_e);
    if t_c >= t_f {
        return Err(format!(
            "pipeline: T_c {:.3} ms >= T_f {:.3} ms",
            t_c * 1e3,
            t_f * 1e3
        ));
    }
    if (m as f64) < 2.0 * (1.0 + t_c / t_f) {
        return Err(format!(
            "pipeline: m = {m} < 2 (1 + T_c/T_f) = {:.2}",
            2.0 * (1.0 + t_c / t_f)
        ));
    }
    let l = md.layers as f64;
    let t_total = (t_a + t_e + 2.0 * t_c) + t_f * (m as f64 * l - 1.0);
    let batch = (b_a * m * n_a) as f64;
    Ok(Estimate {
        t_a,
        t_e,
        t_c,
        t_f,
        t_iter: m as f64 * t_f * l,
        t_total,
        tokens_per_s: batch / t_total,
    })
}

/// The largest `b` in `lo..=hi` for which `ok` holds, given `ok(lo)` and
/// that `ok` holds on a prefix of the range.
fn last_true(mut lo: u64, mut hi: u64, ok: impl Fn(u64) -> bool) -> u64 {
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if ok(mid) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    lo
}

/// The largest feasible `b_a` in `1..=limit`, by binary search. Memory and
/// the SLO only get worse as the batch grows, so the largest batch within
/// them, `b_max`, is found first. The pipeline conditions depend on
/// `T_c / T_f`, which moves one way with the batch (small messages use the
/// link poorly, so small batches can fail them too): if they hold at
/// `b_max` that is the answer; if they hold at 1, a second binary search
/// finds where they stop; otherwise no batch works. `Err` says why.
pub fn largest_batch(
    s: &Setting,
    tp_a: u64,
    tp_e: u64,
    n_a: u64,
    m: u64,
    limit: u64,
) -> Result<(u64, Estimate), String> {
    within_capacity(s, tp_a, tp_e, n_a, m, 1)?;
    let b_max = last_true(1, limit.max(1), |b| {
        within_capacity(s, tp_a, tp_e, n_a, m, b).is_ok()
    });
    if let Ok(e) = evaluate(s, tp_a, tp_e, n_a, m, b_max) {
        return Ok((b_max, e));
    }
    evaluate(s, tp_a, tp_e, n_a, m, 1)?;
    let b = last_true(1, b_max, |b| evaluate(s, tp_a, tp_e, n_a, m, b).is_ok());
    Ok((b, evaluate(s, tp_a, tp_e, n_a, m, b)?))
}

/// Algorithm 1 for one (attention GPU, expert GPU) pair of `s`.
pub fn search(s: &Setting) -> SearchResult {
    let md = &s.model;
    let mut out = SearchResult::default();
    let reject = |out: &mut SearchResult, tp_a, tp_e, m, reason: String| {
        out.rejected.push(Rejection {
            attention_gpu: s.attention_gpu.name.clone(),
            expert_gpu: s.expert_gpu.name.clone(),
            tp_a,
            tp_e,
            m,
            reason,
        })
    };
    for tp_e in TP_SIZES {
        if !s.expert_fits(tp_e) {
            reject(
                &mut out,
                0,
                tp_e,
                None,
                format!(
                    "memory: an expert ({:.1} GB) does not fit on {tp_e} x {} GB",
                    2.0 * md.expert_params() as f64 / 1e9,
                    s.expert_gpu.memory_gb
                ),
            );
            continue;
        }
        for tp_a in TP_SIZES {
            if !s.attention_fits(tp_a, 1, 0) {
                reject(
                    &mut out,
                    tp_a,
                    tp_e,
                    None,
                    format!(
                        "memory: attention weights ({:.1} GB) do not fit on {tp_a} x {} GB",
                        2.0 * md.attention_params() as f64 / 1e9,
                        s.attention_gpu.memory_gb
                    ),
                );
                continue;
            }
            let (k1, k3) = (s.attention(tp_a).per_token, s.expert(tp_e).per_token);
            let n_a = balance_attention_nodes(k1, k3, md.experts, md.top_k);
            for m in 3..=s.max_micro_batches.max(3) {
                match largest_batch(s, tp_a, tp_e, n_a, m, 1 << 16) {
                    Err(reason) => reject(&mut out, tp_a, tp_e, Some(m), reason),
                    Ok((b_a, est)) => {
                        let gpus = tp_a * n_a + tp_e * md.experts;
                        let cost = (tp_a * n_a) as f64 * s.attention_gpu.price
                            + (tp_e * md.experts) as f64 * s.expert_gpu.price;
                        out.plans.push(Plan {
                            attention_gpu: s.attention_gpu.name.clone(),
                            expert_gpu: s.expert_gpu.name.clone(),
                            tp_a,
                            n_a,
                            tp_e,
                            e: md.experts,
                            m,
                            batch: b_a * m * n_a,
                            b_a,
                            b_e: (b_a * n_a * md.top_k) as f64 / md.experts as f64,
                            estimate: est,
                            gpus,
                            cost,
                            tokens_per_s_per_gpu: est.tokens_per_s / gpus as f64,
                            tokens_per_s_per_cost: est.tokens_per_s / cost,
                        });
                    }
                }
            }
        }
    }
    out.plans
        .sort_by(|a, b| b.tokens_per_s_per_cost.total_cmp(&a.tokens_per_s_per_cost));
    out
}

/// The estimate for one fixed deployment, for comparing with a measured
/// run: `n_a` attention and `n_e` expert nodes (tensor parallel 1), `m`
/// micro-batches, a global batch of `batch` sequences. Unlike [`evaluate`]
/// it rejects nothing: a pipeline that cannot hide communication is simply
/// slower. Here `b_e` is the rows one expert *node* gets per micro-batch
/// (`b_a n_a K / n_e`; nodes may hold several experts), which is what
/// `moe-bench`'s fitted `T_e` line takes. Per layer, the micro-batches
/// cycle in `max(m T_f, T_a + T_e + 2 T_c)`; a full pipeline adds its fill
/// once per iteration, giving the paper's `(T_a + T_e + 2 T_c) + T_f (mL -
/// 1)`. A dense layer has no round: its micro-batches run one after the
/// other on the attention side, `m T_a` (its MLP taken to cost what a
/// sparse layer's router and shared expert do there).
pub fn predict(s: &Setting, n_a: u64, n_e: u64, m: u64, batch: u64) -> Estimate {
    let md = &s.model;
    let b_a = batch as f64 / (n_a * m) as f64;
    let b_e = b_a * (n_a * md.top_k) as f64 / n_e as f64;
    let t_a = s.attention(1).at(b_a);
    let t_e = s.expert(1).at(b_e);
    let t_c = s.comm(1, 1, b_a, b_e);
    let t_f = t_a.max(t_e);
    let serial = t_a + t_e + 2.0 * t_c;
    let l = md.sparse_layers() as f64;
    let cycle = (m as f64 * t_f).max(serial);
    let fill = if m as f64 * t_f >= serial {
        serial - t_f
    } else {
        0.0
    };
    let dense = md.dense_layers.len() as f64 * m as f64 * t_a;
    let t_total = l * cycle + fill + dense;
    Estimate {
        t_a,
        t_e,
        t_c,
        t_f,
        t_iter: t_total,
        t_total,
        tokens_per_s: batch as f64 / t_total,
    }
}

#[cfg(test)]
mod tests {
    use super::super::gpu::{catalogue, find};
    use super::super::model::ModelConfig;
    use super::super::perf::{Efficiency, UtilCurve};
    use super::*;
    use proptest::prelude::*;

    fn setting(model: &str, a: &str, e: &str, slo_ms: f64) -> Setting {
        let all = catalogue();
        Setting {
            model: ModelConfig::preset(model).unwrap(),
            attention_gpu: find(&all, a).unwrap(),
            expert_gpu: find(&all, e).unwrap(),
            seq_len: 2048,
            slo_s: slo_ms / 1e3,
            eff: Efficiency::default(),
            util: UtilCurve::default(),
            profile: None,
            max_micro_batches: 4,
        }
    }

    #[test]
    fn balance_rule() {
        assert_eq!(balance_attention_nodes(2.0, 1.0, 8, 2), 8);
        assert_eq!(
            balance_attention_nodes(1.0, 3.0, 16, 4),
            1,
            "rounds 1.33 to 1"
        );
        assert_eq!(balance_attention_nodes(1.0, 2.0, 16, 4), 2);
        assert_eq!(
            balance_attention_nodes(1e-9, 1.0, 8, 2),
            1,
            "never below one node"
        );
        let s = setting("dbrx", "H800", "H800", 150.0);
        for p in search(&s).plans {
            let (k1, k3) = (s.attention(p.tp_a).per_token, s.expert(p.tp_e).per_token);
            assert_eq!(p.n_a, ((k1 * 16.0) / (k3 * 4.0)).round().max(1.0) as u64);
        }
    }

    #[test]
    fn chosen_plans_satisfy_the_pipeline_conditions_and_memory() {
        for model in ["mixtral-8x22b", "dbrx", "scaled-moe"] {
            let s = setting(model, "H20", "L40S", 150.0);
            let r = search(&s);
            assert!(!r.plans.is_empty(), "{model}: {:?}", r.rejected.first());
            for p in &r.plans {
                let e = p.estimate;
                assert!(e.t_c < e.t_f);
                assert!(p.m as f64 >= 2.0 * (1.0 + e.t_c / e.t_f), "{p:?}");
                assert!(e.t_iter <= 0.150 + 1e-12);
                assert!(s.expert_fits(p.tp_e) && s.attention_fits(p.tp_a, p.m, p.b_a));
            }
        }
    }

    #[test]
    fn a_tp_size_whose_parameters_do_not_fit_is_never_chosen() {
        // Mixtral-8x22B's attention side (~2 x 3.8 GB) fits one 48 GB L40S; an
        // expert (~11 GB) too; Scaled-MoE's expert (2 x 9.7 GB) fits as well,
        // but on a 16 GB GPU neither fits at tp 1.
        let mut s = setting("scaled-moe", "L40S", "L40S", 150.0);
        s.expert_gpu.memory_gb = 16.0;
        s.attention_gpu.memory_gb = 16.0;
        let r = search(&s);
        assert!(r.plans.iter().all(|p| p.tp_e >= 2 && s.expert_fits(p.tp_e)));
        assert!(r
            .rejected
            .iter()
            .any(|x| x.tp_e == 1 && x.reason.starts_with("memory")));
    }

    #[test]
    fn binary_search_matches_a_brute_force_scan() {
        // Small shapes and SLOs where small batches fail on T_c (poor link
        // use), large ones on the SLO, and some where nothing fits.
        for (model, slo_ms) in [
            ("tiny", 5.0),
            ("tiny", 0.5),
            ("tiny", 0.05),
            ("mixtral-8x22b", 150.0),
            ("dbrx", 60.0),
        ] {
            let s = setting(model, "L40S", "L40S", slo_ms);
            for (tp_a, tp_e, m, n_a) in [(1, 1, 3, 2), (2, 1, 4, 1), (1, 4, 3, 3), (8, 8, 4, 2)] {
                let brute = (1..=3000)
                    .filter(|&b| evaluate(&s, tp_a, tp_e, n_a, m, b).is_ok())
                    .max();
                let found = largest_batch(&s, tp_a, tp_e, n_a, m, 3000)
                    .ok()
                    .map(|(b, _)| b);
                assert_eq!(
                    found, brute,
                    "{model} slo {slo_ms}: tp_a {tp_a} tp_e {tp_e} m {m} n_a {n_a}"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn loosening_the_slo_never_lowers_the_best_throughput(slo in 20.0f64..200.0, extra in 1.0f64..100.0) {
            let best = |slo| search(&setting("mixtral-8x22b", "H800", "H800", slo)).plans.first().map_or(0.0, |p| p.tokens_per_s_per_cost);
            prop_assert!(best(slo + extra) >= best(slo) * (1.0 - 1e-12));
        }
    }

    #[test]
    fn predict_is_serial_without_overlap_and_the_paper_formula_with_it() {
        use crate::plan::perf::{Linear, Profile, UtilCurve};
        let mut s = setting("mixtral-8x22b", "H20", "L40S", 1e9);
        s.profile = Some(Profile {
            attention: Linear {
                per_token: 1e-5,
                fixed: 0.0,
            },
            expert: Linear {
                per_token: 2e-5,
                fixed: 1e-4,
            },
        });
        s.util = UtilCurve::default();
        let l = s.model.layers as f64;
        let one = predict(&s, 1, 1, 1, 32);
        let serial = one.t_a + one.t_e + 2.0 * one.t_c;
        assert!((one.t_total - l * serial).abs() < 1e-12);
        let four = predict(&s, 1, 1, 4, 32);
        let paper = (four.t_a + four.t_e + 2.0 * four.t_c) + four.t_f * (4.0 * l - 1.0);
        assert!(4.0 * four.t_f >= four.t_a + four.t_e + 2.0 * four.t_c);
        assert!((four.t_total - paper).abs() < 1e-12);
        assert!(four.tokens_per_s > one.tokens_per_s);
    }
}
