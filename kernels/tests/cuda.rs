//! CUDA: every source compiles to PTX with NVRTC (no GPU needed), and on a
//! GPU every kernel matches the CPU reference (skipped, with the reason
//! printed, where there is none).
#![cfg(feature = "cuda")]

use half::bf16;
use kernels::cpu;
use kernels::cpu::random_bf16 as values;
use kernels::cuda::{compile, CudaError, Gpu, SOURCES};
use kernels::LayerShape;

#[test]
fn every_source_compiles_to_ptx_for_compute_90() {
    for (file, src, names) in SOURCES {
        match compile(file, src, "compute_90") {
            Ok(ptx) => {
                for n in *names {
                    assert!(
                        ptx.contains(&format!(".entry {n}")),
                        "{file}: no entry point {n} in the PTX"
                    );
                }
            }
            Err(CudaError::NoNvrtc) if std::env::var_os("M2N_REQUIRE_NVRTC").is_none() => {
                println!("SKIPPED: {}", CudaError::NoNvrtc);
                return;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn a_compile_error_names_the_file() {
    match compile(
        "broken.cu",
        "extern \"C\" __global__ void f() { undefined_thing(); }",
        "compute_90",
    ) {
        Err(CudaError::Compile { file, detail, .. }) => {
            assert_eq!(file, "broken.cu");
            assert!(!detail.is_empty());
        }
        Err(CudaError::NoNvrtc) => println!("SKIPPED: {}", CudaError::NoNvrtc),
        other => panic!("expected a compile error, got {other:?}"),
    }
}

fn close(gpu: &[bf16], cpu: &[bf16], rtol: f32, what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}");
    let rms =
        (cpu.iter().map(|v| v.to_f32().powi(2)).sum::<f32>() / cpu.len().max(1) as f32).sqrt();
    for (i, (a, b)) in gpu.iter().zip(cpu).enumerate() {
        let (a, b) = (a.to_f32(), b.to_f32());
        assert!(
            (a - b).abs() <= rtol * (a.abs().max(b.abs()) + rms) + 1e-6,
            "{what}[{i}]: gpu {a} cpu {b}"
        );
    }
}

#[test]
fn every_kernel_matches_the_cpu_reference_on_a_gpu() {
    let gpu = match Gpu::new() {
        Ok(g) => g,
        Err(e) => {
            println!("SKIPPED: no GPU to run on: {e}");
            return;
        }
    };
    println!("running on {}", gpu.name);
    let s = LayerShape::mixtral_8x22b().scaled(16);
    let (n, h) = (5, s.hidden);
    let x = values(1, n * h, 2.0);
    let w = values(2, h, 1.0);
    let mut want = vec![bf16::ZERO; x.len()];
    cpu::norm::rmsnorm_ref(&x, &w, s.norm_eps, &mut want);
    close(
        &gpu.rmsnorm(&x, &w, s.norm_eps).unwrap(),
        &want,
        1e-2,
        "rmsnorm",
    );

    let pos: Vec<u32> = (0..n as u32).map(|t| 100 + t).collect();
    let q = values(3, n * s.heads * s.head_dim, 1.0);
    let mut want = q.clone();
    cpu::rope::rope_ref(&mut want, s.heads, s.head_dim, &pos, s.rope_theta);
    close(
        &gpu.rope(&q, s.heads, s.head_dim, &pos, s.rope_theta)
            .unwrap(),
        &want,
        2e-2,
        "rope",
    );

    let caches: Vec<cpu::attention::KvCache> = (0..n)
        .map(|i| cpu::attention::KvCache {
            k: values(10 + i as u64, (20 + i) * s.kv_heads * s.head_dim, 1.0),
            v: values(20 + i as u64, (20 + i) * s.kv_heads * s.head_dim, 1.0),
            len: 20 + i,
        })
        .collect();
    let mut want = vec![bf16::ZERO; q.len()];
    cpu::attention::attention_ref(&q, &caches, &s, &mut want);
    close(
        &gpu.attention(&q, &caches, &s).unwrap(),
        &want,
        2e-2,
        "attention",
    );

    let rw = values(4, s.experts * h, 0.5);
    let routes = cpu::router::route_ref(&x, h, &rw, s.experts, s.top_k);
    let got = gpu.route(&x, h, &rw, s.experts, s.top_k).unwrap();
    for (g, c) in got.iter().zip(&routes) {
        for (a, b) in g.weights.iter().zip(&c.weights) {
            assert!((a - b).abs() < 1e-2, "router: {g:?} vs {c:?}");
        }
    }
    let plans = cpu::layout::permute_ref(&x, h, &routes, s.experts, 2);
    assert_eq!(gpu.permute(&x, h, &routes, s.experts, 2).unwrap(), plans);
    let rows: Vec<&[bf16]> = plans.iter().map(|p| p.rows.as_slice()).collect();
    close(
        &gpu.combine(&rows, &plans, n, h).unwrap(),
        &cpu::layout::combine_ref(&rows, &plans, n, h),
        1e-2,
        "combine",
    );

    let e = cpu::ffn::Expert::new(
        h,
        s.ffn,
        values(5, s.ffn * h, 0.05),
        values(6, s.ffn * h, 0.05),
        values(7, h * s.ffn, 0.05),
    );
    close(
        &gpu.swiglu(&e, &x).unwrap(),
        &cpu::ffn::swiglu_ref(&e, &x),
        3e-2,
        "swiglu",
    );
}
