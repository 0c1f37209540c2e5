//! Every fast CPU kernel against its reference on random shapes and values,
//! with tolerances that fit bf16 (8 bits of mantissa), plus the router's and
//! the layout's exact properties.

use half::bf16;
use kernels::cpu::attention::{
    attention, attention_ref, prefill_attention, prefill_attention_ref, AttnScratch, KvCache,
};
use kernels::cpu::ffn::{swiglu, swiglu_ref, swiglu_rows, Expert, FfnScratch, GEMM_TOKENS};
use kernels::cpu::gemv::{matmul_bf16, matmul_bf16_on, matmul_ref, Isa};
use kernels::cpu::layout::{combine, combine_ref, permute, permute_ref};
use kernels::cpu::norm::{rmsnorm, rmsnorm_ref};
use kernels::cpu::random_bf16 as values;
use kernels::cpu::rope::{rope, rope_ref};
use kernels::cpu::router::{route, route_ref, Route};
use kernels::LayerShape;
use proptest::prelude::*;

/// Close within bf16 rounding: relative to each element and to the
/// output's overall scale (sums of many rounded terms).
fn assert_close(fast: &[bf16], reference: &[bf16], rtol: f32, what: &str) {
    assert_eq!(fast.len(), reference.len(), "{what}: lengths");
    let rms = (reference.iter().map(|v| v.to_f32().powi(2)).sum::<f32>()
        / reference.len().max(1) as f32)
        .sqrt();
    for (i, (a, b)) in fast.iter().zip(reference).enumerate() {
        let (a, b) = (a.to_f32(), b.to_f32());
        let tol = rtol * a.abs().max(b.abs()) + rtol * rms + 1e-6;
        assert!(
            (a - b).abs() <= tol,
            "{what}[{i}]: fast {a} vs reference {b} (tolerance {tol})"
        );
    }
}

fn shape(
    heads_per_kv: usize,
    kv_heads: usize,
    head_dim: usize,
    experts: usize,
    top_k: usize,
    ffn: usize,
) -> LayerShape {
    LayerShape {
        hidden: heads_per_kv * kv_heads * head_dim,
        heads: heads_per_kv * kv_heads,
        kv_heads,
        head_dim,
        experts,
        top_k,
        ffn,
        rope_theta: 1e4,
        norm_eps: 1e-5,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn rmsnorm_matches(seed in any::<u64>(), n in 1usize..6, h in 1usize..300) {
        let x = values(seed, n * h, 3.0);
        let w = values(seed ^ 1, h, 1.0);
        let (mut a, mut b) = (vec![bf16::ZERO; n * h], vec![bf16::ZERO; n * h]);
        rmsnorm(&x, &w, 1e-5, &mut a);
        rmsnorm_ref(&x, &w, 1e-5, &mut b);
        assert_close(&a, &b, 1e-2, "rmsnorm");
    }

    #[test]
    fn rope_matches(seed in any::<u64>(), n in 1usize..5, heads in 1usize..5, half in 1usize..33) {
        let hd = 2 * half;
        let pos: Vec<u32> = (0..n as u32).map(|t| t * 37 + (seed % 1000) as u32).collect();
        let mut a = values(seed, n * heads * hd, 2.0);
        let mut b = a.clone();
        rope(&mut a, heads, hd, &pos, 1e4);
        rope_ref(&mut b, heads, hd, &pos, 1e4);
        assert_close(&a, &b, 1e-2, "rope");
    }

    #[test]
    fn attention_matches(seed in any::<u64>(), g in 1usize..4, kvh in 1usize..3, hd in 1usize..40, lens in proptest::collection::vec(1usize..40, 1..4)) {
        let s = shape(g, kvh, hd, 2, 1, 8);
        let caches: Vec<KvCache> = lens.iter().enumerate().map(|(i, &len)| KvCache {
            k: values(seed ^ (i as u64 * 7 + 1), len * kvh * hd, 2.0),
            v: values(seed ^ (i as u64 * 7 + 2), len * kvh * hd, 2.0),
            len,
        }).collect();
        let q = values(seed ^ 99, lens.len() * s.heads * hd, 2.0);
        let (mut a, mut b) = (vec![bf16::ZERO; q.len()], vec![bf16::ZERO; q.len()]);
        attention(&q, &caches, &s, &mut a);
        attention_ref(&q, &caches, &s, &mut b);
        assert_close(&a, &b, 2e-2, "attention");
    }

    #[test]
    fn prefill_attention_matches_and_equals_decode_steps(seed in any::<u64>(), g in 1usize..4, kvh in 1usize..3, hd in 1usize..40, start in 0usize..6, c in 1usize..7) {
        let s = shape(g, kvh, hd, 2, 1, 8);
        let len = start + c;
        let cache = KvCache {
            k: values(seed ^ 1, len * kvh * hd, 2.0),
            v: values(seed ^ 2, len * kvh * hd, 2.0),
            len,
        };
        let row = s.heads * hd;
        let q = values(seed ^ 3, c * row, 2.0);
        let (mut a, mut b) = (vec![bf16::ZERO; q.len()], vec![bf16::ZERO; q.len()]);
        let mut scratch = AttnScratch::default();
        prefill_attention(&q, &cache, start, &s, &mut a, &mut scratch);
        prefill_attention_ref(&q, &cache, start, &s, &mut b);
        assert_close(&a, &b, 2e-2, "prefill attention");
        // Causal: token i sees exactly the first start + i + 1 rows, with the
        // decode kernel's arithmetic (so chunked prefill changes no bit).
        for i in 0..c {
            let n = (start + i + 1) * kvh * hd;
            let prefix = KvCache { k: cache.k[..n].to_vec(), v: cache.v[..n].to_vec(), len: start + i + 1 };
            let mut d = vec![bf16::ZERO; row];
            attention(&q[i * row..][..row], std::slice::from_ref(&prefix), &s, &mut d);
            prop_assert_eq!(&a[i * row..][..row], &d[..], "token {}", i);
        }
    }

    #[test]
    fn every_instruction_set_matches_the_definition_and_is_batch_invariant(seed in any::<u64>(), n in 1usize..11, k in 1usize..300, m in 1usize..6) {
        let x: Vec<f32> = kernels::cpu::to_f32(&values(seed, n * k, 1.0));
        let w = values(seed ^ 4, m * k, 1.0);
        let mut want = vec![0.0f32; n * m];
        matmul_ref(&x, n, k, &w, m, &mut want);
        for isa in Isa::available() {
            let mut all = vec![0.0f32; n * m];
            matmul_bf16_on(isa, &x, n, k, &w, m, &mut all);
            for (i, (a, b)) in all.iter().zip(&want).enumerate() {
                prop_assert!((a - b).abs() <= 1e-4 * (k as f32).sqrt() * (1.0 + b.abs()), "{:?} [{}]: {} vs {}", isa, i, a, b);
            }
            for t in 0..n {
                let mut one = vec![0.0f32; m];
                matmul_bf16_on(isa, &x[t * k..][..k], 1, k, &w, m, &mut one);
                prop_assert_eq!(&all[t * m..][..m], &one[..], "{:?}: token {} of {}", isa, t, n);
            }
        }
    }

    #[test]
    fn gemv_and_swiglu_rows_are_batch_invariant(seed in any::<u64>(), n in 1usize..9, k in 1usize..80, m in 1usize..20, f in 1usize..40) {
        // Each token alone must give the same bits as inside any batch.
        let x: Vec<f32> = kernels::cpu::to_f32(&values(seed, n * k, 1.0));
        let w = values(seed ^ 4, m * k, 1.0);
        let mut all = vec![0.0f32; n * m];
        matmul_bf16(&x, n, k, &w, m, &mut all);
        for t in 0..n {
            let mut one = vec![0.0f32; m];
            matmul_bf16(&x[t * k..][..k], 1, k, &w, m, &mut one);
            prop_assert_eq!(&all[t * m..][..m], &one[..], "token {} of {}", t, n);
        }
        let e = Expert::new(k, f, values(seed, f * k, 0.5), values(seed ^ 1, f * k, 0.5), values(seed ^ 2, k * f, 0.5));
        let xb = values(seed ^ 9, n * k, 1.0);
        let mut sc = FfnScratch::default();
        let mut out = vec![bf16::ZERO; n * k];
        swiglu_rows(&e, &xb, &mut out, &mut sc);
        assert_close(&out, &swiglu_ref(&e, &xb), 3e-2, "swiglu_rows");
        for t in (0..n).rev() {
            let mut one = vec![bf16::ZERO; k];
            swiglu_rows(&e, &xb[t * k..][..k], &mut one, &mut sc);
            prop_assert_eq!(&out[t * k..][..k], &one[..], "swiglu token {} of {}", t, n);
        }
    }

    #[test]
    fn router_matches(seed in any::<u64>(), n in 1usize..8, h in 1usize..64, experts in 1usize..10, k in 1usize..10) {
        let k = k.min(experts);
        let x = values(seed, n * h, 1.0);
        let w = values(seed ^ 5, experts * h, 1.0);
        let (a, b) = (route(&x, h, &w, experts, k), route_ref(&x, h, &w, experts, k));
        for (ra, rb) in a.iter().zip(&b) {
            prop_assert_eq!(ra.experts.len(), k);
            prop_assert!((ra.weights.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            // Near-ties may order differently by rounding; the weights must agree.
            for (wa, wb) in ra.weights.iter().zip(&rb.weights) {
                prop_assert!((wa - wb).abs() < 1e-3, "{:?} vs {:?}", ra, rb);
            }
        }
    }

    #[test]
    fn permute_and_combine_match(seed in any::<u64>(), n in 0usize..12, h in 1usize..40, experts in 1usize..9, k in 1usize..4, ranks in 1usize..5) {
        let k = k.min(experts);
        let ranks = ranks.min(experts);
        let x = values(seed, n * h, 2.0);
        let w = values(seed ^ 3, experts * h, 1.0);
        let routes = route_ref(&x, h, &w, experts, k);
        let (a, b) = (permute(&x, h, &routes, experts, ranks), permute_ref(&x, h, &routes, experts, ranks));
        prop_assert_eq!(&a, &b);
        // Experts "compute" something token- and expert-dependent: scale rows by (expert + 1).
        let outs: Vec<Vec<bf16>> = a.iter().map(|rb| rb.rows.chunks(h).zip(&rb.entries)
            .flat_map(|(r, e)| r.iter().map(move |v| bf16::from_f32(v.to_f32() * (e.expert as f32 + 1.0)))).collect()).collect();
        let refs: Vec<&[bf16]> = outs.iter().map(|o| o.as_slice()).collect();
        assert_close(&combine(&refs, &a, n, h), &combine_ref(&refs, &a, n, h), 1e-2, "combine");
    }

    #[test]
    fn swiglu_matches_on_both_paths(seed in any::<u64>(), small in 1usize..6, h in 1usize..48, f in 1usize..64, big in any::<bool>()) {
        let n = if big { GEMM_TOKENS + small } else { small };
        let e = Expert::new(h, f, values(seed, f * h, 0.5), values(seed ^ 1, f * h, 0.5), values(seed ^ 2, h * f, 0.5));
        let x = values(seed ^ 9, n * h, 1.0);
        assert_close(&swiglu(&e, &x), &swiglu_ref(&e, &x), 3e-2, "swiglu");
    }
}

#[test]
fn router_ties_go_to_the_lower_expert_and_k_equal_to_experts_keeps_all() {
    // All logits equal: top-2 of 4 are experts 0 and 1, weights 0.5 each.
    let h = 4;
    let x = vec![bf16::ONE; h];
    let w = vec![bf16::ONE; 4 * h];
    for r in [route(&x, h, &w, 4, 2), route_ref(&x, h, &w, 4, 2)] {
        assert_eq!(
            r[0],
            Route {
                experts: vec![0, 1],
                weights: vec![0.5, 0.5]
            }
        );
    }
    let w2 = values(1, 4 * h, 1.0);
    for r in [route(&x, h, &w2, 4, 4), route_ref(&x, h, &w2, 4, 4)] {
        let mut e = r[0].experts.clone();
        e.sort();
        assert_eq!(e, vec![0, 1, 2, 3]);
        assert!((r[0].weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}

#[test]
fn permute_then_combine_with_unit_weights_restores_the_input_exactly() {
    let (n, h, experts) = (16, 24, 8);
    let x = values(7, n * h, 3.0);
    for (k, wt) in [(1usize, 1.0f32), (2, 0.5), (4, 0.25)] {
        let routes: Vec<Route> = (0..n)
            .map(|t| Route {
                experts: (0..k).map(|j| (t * 3 + j * 5) % experts).collect(),
                weights: vec![wt; k],
            })
            .collect();
        for ranks in [1, 2, 3, 8] {
            let plans = permute(&x, h, &routes, experts, ranks);
            let rows: Vec<&[bf16]> = plans.iter().map(|p| p.rows.as_slice()).collect();
            assert_eq!(combine(&rows, &plans, n, h), x, "k {k} ranks {ranks}");
        }
    }
}

#[test]
fn a_rank_with_no_tokens_gets_an_empty_buffer() {
    let (n, h) = (5, 8);
    let x = values(3, n * h, 1.0);
    // Every token goes to expert 0: ranks holding experts 4..8 get nothing.
    let routes = vec![
        Route {
            experts: vec![0],
            weights: vec![1.0]
        };
        n
    ];
    let plans = permute(&x, h, &routes, 8, 2);
    assert_eq!(plans[0].entries.len(), n);
    assert!(plans[1].rows.is_empty() && plans[1].entries.is_empty());
    let e = Expert::new(
        h,
        4,
        values(1, 4 * h, 0.5),
        values(2, 4 * h, 0.5),
        values(3, 4 * h, 0.5),
    );
    assert!(
        swiglu(&e, &plans[1].rows).is_empty(),
        "an expert with no tokens returns nothing, not an error"
    );
}
