//! kernels-bench: every MoE decode kernel at Mixtral-8x22B and DBRX decode
//! shapes (scaled to this machine), next to this machine's limits measured
//! in the same run: memory bandwidth from a streaming copy and the f32 FMA
//! peak from a register-only loop (one core, as the kernels run).

use std::time::Instant;

use clap::Parser;
use half::bf16;
use kernels::cpu::attention::{attention, KvCache};
use kernels::cpu::ffn::{swiglu, Expert};
use kernels::cpu::layout::{combine, permute};
use kernels::cpu::norm::rmsnorm;
use kernels::cpu::random_bf16 as values;
use kernels::cpu::rope::rope;
use kernels::cpu::router::route;
use kernels::LayerShape;
use serde::Serialize;

#[derive(Debug, Parser)]
#[command(name = "kernels-bench")]
struct Cli {
    /// mixtral-8x22b, dbrx, or both.
    #[arg(long, default_value = "both")]
    model: String,
    /// Divide heads, hidden and FFN sizes by this (1: the real shapes).
    #[arg(long, default_value_t = 4)]
    scale: usize,
    /// Tokens per expert (decode batches and beyond).
    #[arg(long, value_delimiter = ',', default_value = "1,8,64,256,512")]
    tokens: Vec<usize>,
    /// Context length of each sequence's KV cache.
    #[arg(long, default_value_t = 2048)]
    context: usize,
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Also run the expert FFN on GPU 0 (feature `cuda`), next to the
    /// device's copy bandwidth and cuBLAS's GEMM rate measured in the run.
    #[arg(long)]
    gpu: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    model: String,
    kernel: &'static str,
    tokens: usize,
    time_us: f64,
    gflops: f64,
    gbps: f64,
    pct_mem: f64,
    pct_fma: f64,
}

/// Best of `reps` timed runs of `f` (after one warm-up run), in seconds.
fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

/// Streaming copy of 256 MiB: bytes read plus bytes written per second.
fn copy_bandwidth() -> f64 {
    let n = 256 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let t = time(5, || {
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
    });
    2.0 * n as f64 / t
}

/// Read-only streaming bandwidth over 256 MiB (a wrapping sum of u64 words):
/// printed beside the copy bandwidth, because decode GEMVs only read.
fn read_bandwidth() -> f64 {
    let n = 256 << 20;
    let src = vec![1u64; n / 8];
    let t = time(5, || {
        // Eight independent sums: the loop is limited by memory, not by an add chain.
        let mut acc = [0u64; 8];
        for c in src.chunks_exact(8) {
            for i in 0..8 {
                acc[i] = acc[i].wrapping_add(c[i]);
            }
        }
        std::hint::black_box(acc);
    });
    n as f64 / t
}

/// f32 FMA peak of one core (flop/s) from independent register-only chains.
fn fma_peak() -> f64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the features were detected above.
        let ymm = unsafe { fma_peak_avx2() };
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: as above. Some cores only reach their peak with zmm.
            return ymm.max(unsafe { fma_peak_avx512() });
        }
        return ymm;
    }
    let iters = 50_000_000u64;
    let mut acc = [1.0f32; 16];
    let t = Instant::now();
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = *a * 0.999_999 + 1e-7;
        }
    }
    std::hint::black_box(acc);
    (iters * 16 * 2) as f64 / t.elapsed().as_secs_f64()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_peak_avx2() -> f64 {
    use std::arch::x86_64::*;
    // Ten independent chains in named registers (ten accumulators plus the
    // two constants fit the 16 ymm registers without spilling): enough to
    // hide the FMA latency on two ports. Best of three runs.
    let iters = 50_000_000u64;
    let (m, c) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    let mut best = 0.0f64;
    for _ in 0..3 {
        let one = _mm256_set1_ps(1.0);
        let (mut a0, mut a1, mut a2, mut a3, mut a4) = (one, one, one, one, one);
        let (mut a5, mut a6, mut a7, mut a8, mut a9) = (one, one, one, one, one);
        let t = Instant::now();
        for _ in 0..iters {
            a0 = _mm256_fmadd_ps(a0, m, c);
            a1 = _mm256_fmadd_ps(a1, m, c);
            a2 = _mm256_fmadd_ps(a2, m, c);
            a3 = _mm256_fmadd_ps(a3, m, c);
            a4 = _mm256_fmadd_ps(a4, m, c);
            a5 = _mm256_fmadd_ps(a5, m, c);
            a6 = _mm256_fmadd_ps(a6, m, c);
            a7 = _mm256_fmadd_ps(a7, m, c);
            a8 = _mm256_fmadd_ps(a8, m, c);
            a9 = _mm256_fmadd_ps(a9, m, c);
        }
        std::hint::black_box([a0, a1, a2, a3, a4, a5, a6, a7, a8, a9]);
        best = best.max((iters * 10 * 8 * 2) as f64 / t.elapsed().as_secs_f64());
    }
    best
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_peak_avx512() -> f64 {
    use std::arch::x86_64::*;
    let iters = 50_000_000u64;
    let (m, c) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let mut best = 0.0f64;
    for _ in 0..3 {
        let one = _mm512_set1_ps(1.0);
        let (mut a0, mut a1, mut a2, mut a3, mut a4) = (one, one, one, one, one);
        let (mut a5, mut a6, mut a7, mut a8, mut a9) = (one, one, one, one, one);
        let t = Instant::now();
        for _ in 0..iters {
            a0 = _mm512_fmadd_ps(a0, m, c);
            a1 = _mm512_fmadd_ps(a1, m, c);
            a2 = _mm512_fmadd_ps(a2, m, c);
            a3 = _mm512_fmadd_ps(a3, m, c);
            a4 = _mm512_fmadd_ps(a4, m, c);
            a5 = _mm512_fmadd_ps(a5, m, c);
            a6 = _mm512_fmadd_ps(a6, m, c);
            a7 = _mm512_fmadd_ps(a7, m, c);
            a8 = _mm512_fmadd_ps(a8, m, c);
            a9 = _mm512_fmadd_ps(a9, m, c);
        }
        std::hint::black_box([a0, a1, a2, a3, a4, a5, a6, a7, a8, a9]);
        best = best.max((iters * 10 * 16 * 2) as f64 / t.elapsed().as_secs_f64());
    }
    best
}

struct Limits {
    mem: f64,
    fma: f64,
}

fn bench_model(name: &str, s: LayerShape, cli: &Cli, lim: &Limits, rows: &mut Vec<Row>) {
    let h = s.hidden;
    let expert = Expert::new(
        h,
        s.ffn,
        values(1, s.ffn * h, 0.02),
        values(2, s.ffn * h, 0.02),
        values(3, h * s.ffn, 0.02),
    );
    let router_w = values(4, s.experts * h, 0.1);
    let norm_w = values(5, h, 1.0);
    for &n in &cli.tokens {
        let mut record = |kernel: &'static str, secs: f64, flops: f64, bytes: f64| {
            let r = Row {
                model: name.into(),
                kernel,
                tokens: n,
                time_us: secs * 1e6,
                gflops: flops / secs / 1e9,
                gbps: bytes / secs / 1e9,
                pct_mem: 100.0 * bytes / secs / lim.mem,
                pct_fma: 100.0 * flops / secs / lim.fma,
            };
            println!(
                "  {:<14} {:<10} {:>6} {:>11.1} {:>9.2} {:>8.2} {:>6.1} {:>6.1}",
                r.model, r.kernel, r.tokens, r.time_us, r.gflops, r.gbps, r.pct_mem, r.pct_fma
            );
            rows.push(r);
        };
        let x = values(6 + n as u64, n * h, 1.0);
        let reps = if n >= 256 { 3 } else { 8 };
        // The expert FFN with n tokens routed to it; bytes: the weights it streams.
        let t = time(reps, || {
            std::hint::black_box(swiglu(&expert, &x));
        });
        record(
            "expert_ffn",
            t,
            6.0 * (h * s.ffn * n) as f64,
            expert.weight_bytes() as f64,
        );
        let mut y = vec![bf16::ZERO; n * h];
        let t = time(reps, || rmsnorm(&x, &norm_w, s.norm_eps, &mut y));
        record("rmsnorm", t, 4.0 * (n * h) as f64, (2 * n * h * 2) as f64);
        let pos: Vec<u32> = (0..n as u32).map(|i| i + cli.context as u32).collect();
        let mut q = values(7, n * s.heads * s.head_dim, 1.0);
        let t = time(reps, || {
            rope(&mut q, s.heads, s.head_dim, &pos, s.rope_theta)
        });
        record(
            "rope",
            t,
            6.0 * (n * s.heads * s.head_dim / 2) as f64,
            (2 * q.len() * 2) as f64,
        );
        let t = time(reps, || {
            std::hint::black_box(route(&x, h, &router_w, s.experts, s.top_k));
        });
        record(
            "router",
            t,
            2.0 * (n * s.experts * h) as f64,
            ((router_w.len() + x.len()) * 2) as f64,
        );
        let routes = route(&x, h, &router_w, s.experts, s.top_k);
        let ranks = s.experts.min(4);
        let t = time(reps, || {
            std::hint::black_box(permute(&x, h, &routes, s.experts, ranks));
        });
        record("permute", t, 0.0, (2 * n * s.top_k * h * 2) as f64);
        let plans = permute(&x, h, &routes, s.experts, ranks);
        let outs: Vec<&[bf16]> = plans.iter().map(|p| p.rows.as_slice()).collect();
        let t = time(reps, || {
            std::hint::black_box(combine(&outs, &plans, n, h));
        });
        record(
            "combine",
            t,
            2.0 * (n * s.top_k * h) as f64,
            ((n * s.top_k + n) * h * 2) as f64,
        );
        if n <= 64 {
            // Decode attention: n sequences with `context` cached tokens each.
            let kv = s.kv_heads * s.head_dim;
            let caches: Vec<KvCache> = (0..n)
                .map(|i| KvCache {
                    k: values(100 + i as u64, cli.context * kv, 1.0),
                    v: values(200 + i as u64, cli.context * kv, 1.0),
                    len: cli.context,
                })
                .collect();
            let qa = values(8, n * s.heads * s.head_dim, 1.0);
            let mut o = vec![bf16::ZERO; qa.len()];
            let t = time(reps.min(4), || attention(&qa, &caches, &s, &mut o));
            let flops = 4.0 * (n * cli.context * s.heads * s.head_dim) as f64;
            record("attention", t, flops, (n * 2 * cli.context * kv * 2) as f64);
        }
    }
}

#[cfg(feature = "cuda")]
type GpuHandle = kernels::cuda::Gpu;
#[cfg(not(feature = "cuda"))]
type GpuHandle = std::convert::Infallible;

/// Opens GPU 0 for `--gpu`, before any timing, or exits saying why not.
#[cfg(feature = "cuda")]
fn open_gpu() -> GpuHandle {
    kernels::cuda::Gpu::new().unwrap_or_else(|e| {
        eprintln!("kernels-bench: --gpu: {e}");
        std::process::exit(2);
    })
}

#[cfg(not(feature = "cuda"))]
fn open_gpu() -> GpuHandle {
    eprintln!("kernels-bench: --gpu needs a build with `--features cuda` (and a GPU)");
    std::process::exit(2);
}

#[cfg(feature = "cuda")]
fn gpu_bench(gpu: &GpuHandle, cli: &Cli, rows: &mut Vec<Row>) {
    let mut run = || -> Result<(), kernels::cuda::CudaError> {
        let mem = gpu.bench_copy(1 << 30, 5)?;
        let flops = gpu.bench_gemm(8192, 3)?;
        println!("# GPU {}: device copy {:.1} GB/s (read + written), cuBLAS bf16 GEMM 8192^3 {:.1} TFLOP/s", gpu.name, mem / 1e9, flops / 1e12);
        for (name, full) in [
            ("mixtral-8x22b", LayerShape::mixtral_8x22b()),
            ("dbrx", LayerShape::dbrx()),
        ] {
            // The real shapes: a GPU holds them.
            let s = full.scaled(cli.scale.min(1));
            let e = Expert::new(
                s.hidden,
                s.ffn,
                values(1, s.ffn * s.hidden, 0.02),
                values(2, s.ffn * s.hidden, 0.02),
                values(3, s.hidden * s.ffn, 0.02),
            );
            for &n in &cli.tokens {
                let t = gpu.bench_expert(&e, n, 10)?;
                let r = Row {
                    model: format!("{name} (gpu)"),
                    kernel: "expert_ffn",
                    tokens: n,
                    time_us: t * 1e6,
                    gflops: 6.0 * (s.hidden * s.ffn * n) as f64 / t / 1e9,
                    gbps: e.weight_bytes() as f64 / t / 1e9,
                    pct_mem: 100.0 * e.weight_bytes() as f64 / t / mem,
                    pct_fma: 100.0 * 6.0 * (s.hidden * s.ffn * n) as f64 / t / flops,
                };
                println!(
                    "  {:<20} {:<10} {:>6} {:>11.1} {:>9.2} {:>8.2} {:>6.1} {:>6.1}  (% of device copy, % of cuBLAS)",
                    r.model, r.kernel, r.tokens, r.time_us, r.gflops, r.gbps, r.pct_mem, r.pct_fma
                );
                rows.push(r);
            }
        }
        Ok(())
    };
    if let Err(e) = run() {
        eprintln!("kernels-bench: --gpu: {e}");
        std::process::exit(1);
    }
}

#[cfg(not(feature = "cuda"))]
fn gpu_bench(gpu: &GpuHandle, _cli: &Cli, _rows: &mut [Row]) {
    match *gpu {}
}

fn main() {
    let cli = Cli::parse();
    let models: Vec<(&str, LayerShape)> = match cli.model.as_str() {
        "mixtral-8x22b" => vec![("mixtral-8x22b", LayerShape::mixtral_8x22b())],
        "dbrx" => vec![("dbrx", LayerShape::dbrx())],
        "both" => vec![
            ("mixtral-8x22b", LayerShape::mixtral_8x22b()),
            ("dbrx", LayerShape::dbrx()),
        ],
        other => {
            eprintln!("kernels-bench: unknown model {other:?}; known: mixtral-8x22b, dbrx, both");
            std::process::exit(2);
        }
    };
    let gpu = cli.gpu.then(open_gpu);
    let lim = Limits {
        mem: copy_bandwidth(),
        fma: fma_peak(),
    };
    println!("# kernels-bench: one core; limits measured in this run:");
    println!(
        "#   memory bandwidth (streaming copy, bytes read + written): {:.2} GB/s",
        lim.mem / 1e9
    );
    println!(
        "#   read-only stream (context; %mem is of the copy):        {:.2} GB/s",
        read_bandwidth() / 1e9
    );
    println!(
        "#   f32 FMA peak (register-only loop):                       {:.2} GFLOP/s",
        lim.fma / 1e9
    );
    println!(
        "# shapes: heads, hidden and FFN divided by {}; KV context {}",
        cli.scale, cli.context
    );
    println!(
        "# {:<14} {:<10} {:>6} {:>11} {:>9} {:>8} {:>6} {:>6}",
        "model", "kernel", "tokens", "time(us)", "GFLOP/s", "GB/s", "%mem", "%fma"
    );
    let mut rows = Vec::new();
    for (name, full) in models {
        bench_model(name, full.scaled(cli.scale), &cli, &lim, &mut rows);
    }
    if let Some(g) = &gpu {
        gpu_bench(g, &cli, &mut rows);
    }
    if let Some(path) = &cli.json {
        let v = serde_json::json!({
            "memory_bandwidth_gbps": lim.mem / 1e9,
            "fma_peak_gflops": lim.fma / 1e9,
            "scale": cli.scale,
            "rows": rows,
        });
        if let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&v).unwrap_or_default()) {
            eprintln!("kernels-bench: cannot write {}: {e}", path.display());
            std::process::exit(1);
        }
    }
}
