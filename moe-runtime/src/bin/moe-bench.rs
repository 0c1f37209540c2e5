//! `moe-bench`: decode throughput of a disaggregated group for several
//! micro-batch counts and batch sizes, with the measured `T_a`, `T_e`,
//! `T_c` per micro-batch and each side's idle share, next to a colocated
//! baseline (one process, the same kernels, a thread per core) at the same
//! batch, measured in the same run. `--json` adds the fitted coefficients
//! `T_a = k1 b_a + k2`, `T_e = k3 b_e + k4` in the form `moe-plan
//! --profile` reads.
//!
//! A benchmark, not a test: nothing here asserts a time.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use m2n::Role;
use moe_runtime::bench::{self, AttentionBench, BenchSpec};
use moe_runtime::launch;
use moe_runtime::model::reference::Reference;
use moe_runtime::model::weights::Checkpoint;
use moe_runtime::model::{load_config, RuntimeError};
use moe_runtime::plan::model::ModelConfig;
use moe_runtime::plan::perf::{fit, Linear};
use moe_runtime::worker::Deployment;
use serde_json::json;

/// Decode throughput of a disaggregated MoE group against a colocated one.
#[derive(Debug, Parser)]
#[command(name = "moe-bench")]
struct Args {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 1)]
    attention: usize,
    #[arg(long, default_value_t = 1)]
    experts: usize,
    /// Micro-batch counts to measure (comma-separated, 1 to 4).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
    microbatches: Vec<usize>,
    /// Global batch sizes (sequences decoding together), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "32")]
    batch: Vec<usize>,
    /// Prompt tokens per sequence (the context the decode steps attend to).
    #[arg(long, default_value_t = 64)]
    prompt_len: usize,
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Measured decode steps per configuration.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Threads of the colocated baseline (default: the cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Skip the colocated baseline.
    #[arg(long)]
    no_colocated: bool,
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
    #[arg(long, hide = true)]
    worker: Option<String>,
    #[arg(long, hide = true)]
    rank: Option<usize>,
}

fn deployment(a: &Args, m: usize, batch: usize) -> Deployment {
    // Room for the whole prefill in one step.
    let per_mb = batch.div_ceil(a.attention).div_ceil(m);
    Deployment {
        attention: a.attention,
        experts: a.experts,
        microbatches: m,
        max_tokens: (per_mb * a.prompt_len).max(16),
    }
}

fn main() -> ExitCode {
    let a = Args::parse();
    if let (Some(role), Some(rank)) = (a.worker.as_deref(), a.rank) {
        return worker(&a, role, rank);
    }
    match launcher(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moe-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn worker(a: &Args, role: &str, rank: usize) -> ExitCode {
    let (m, batch) = (a.microbatches[0], a.batch[0]);
    let deploy = deployment(a, m, batch);
    let spec = BenchSpec {
        batch,
        prompt_len: a.prompt_len,
        warmup: a.warmup,
        steps: a.steps,
    };
    let timeout = Duration::from_secs(a.timeout_s);
    launch::worker_main("moe-bench", role, rank, |role, uid| {
        match role {
            Role::Attention => {
                let mut w = launch::attention_worker(&a.model, deploy, rank, uid, timeout)?;
                let vocab = load_config(&a.model)?.vocab;
                let b = bench::run_attention(&mut w, &spec, deploy.attention, vocab)?;
                println!("MOE-OUT {}", serde_json::to_string(&b).expect("JSON"));
            }
            Role::Expert => {
                let mut w = launch::expert_worker(&a.model, deploy, rank, uid, timeout)?;
                w.run()?;
            }
        }
        Ok(())
    })
}

/// One (batch, m) row of the report.
#[derive(Debug, Clone)]
struct Row {
    batch: usize,
    m: usize,
    tokens_per_s: f64,
    step_ms: f64,
    t_a_us: f64,
    /// Of T_a, the shared expert's (per micro-batch and layer).
    t_shared_us: f64,
    /// The dense layers' time per step (attention and MLP; no rounds).
    dense_ms: f64,
    t_e_us: f64,
    /// `None` when too few rounds qualify to say anything.
    t_c_us: Option<f64>,
    /// Share of samples in which both sides waited (T_c measured on them).
    t_c_share: f64,
    attention_idle: f64,
    expert_idle: f64,
    /// Mean rows per micro-batch at an attention rank, and per expert rank.
    b_a: f64,
    b_e: f64,
    /// The transport the workers ran on (what `auto` chose).
    transport: String,
}

/// Fewer rounds in which both sides waited than this say nothing about T_c.
const T_C_MIN_SAMPLES: f64 = 10.0;

fn measure(a: &Args, m: usize, batch: usize) -> Result<Row, RuntimeError> {
    let deploy = deployment(a, m, batch);
    let mut args: Vec<String> = vec![
        "--model".into(),
        a.model.display().to_string(),
        "--attention".into(),
        a.attention.to_string(),
        "--experts".into(),
        a.experts.to_string(),
        "--microbatches".into(),
        m.to_string(),
        "--batch".into(),
        batch.to_string(),
        "--prompt-len".into(),
        a.prompt_len.to_string(),
        "--warmup".into(),
        a.warmup.to_string(),
        "--steps".into(),
        a.steps.to_string(),
        "--timeout-s".into(),
        a.timeout_s.to_string(),
    ];
    args.push("--no-colocated".into());
    let group = launch::spawn(&deploy, &args, &[], Duration::from_secs(a.timeout_s), false)?;
    let outs = group.wait(Duration::from_secs(3));
    launch::verdict(&outs).map_err(RuntimeError::Io)?;
    let benches: Vec<AttentionBench> = outs
        .iter()
        .filter(|o| o.role == Role::Attention)
        .map(|o| {
            o.out
                .first()
                .and_then(|l| serde_json::from_str(l).ok())
                .ok_or_else(|| {
                    RuntimeError::Io(format!("attention {} reported no measurement", o.rank))
                })
        })
        .collect::<Result<_, _>>()?;
    let sum = |f: fn(&AttentionBench) -> u64| benches.iter().map(f).sum::<u64>() as f64;
    let wall = benches.iter().map(|b| b.wall_ns).max().unwrap_or(0) as f64;
    let samples = sum(|b| b.samples).max(1.0);
    let steps = benches.first().map_or(1, |b| b.steps.max(1)) as f64;
    let r0 = &benches[0];
    Ok(Row {
        batch,
        m,
        tokens_per_s: sum(|b| b.tokens) / (wall / 1e9),
        step_ms: wall / steps / 1e6,
        t_a_us: sum(|b| b.t_a_ns) / samples / 1e3,
        t_shared_us: sum(|b| b.t_shared_ns) / samples / 1e3,
        dense_ms: r0.dense_ns as f64 / steps / 1e6,
        t_e_us: sum(|b| b.t_e_ns) / samples / 1e3,
        t_c_us: (sum(|b| b.t_c_samples) >= T_C_MIN_SAMPLES)
            .then(|| sum(|b| b.t_c_ns) / sum(|b| b.t_c_samples) / 1e3),
        t_c_share: sum(|b| b.t_c_samples) / samples,
        attention_idle: sum(|b| b.wait_ns) / sum(|b| b.wall_ns).max(1.0),
        expert_idle: 1.0 - r0.residence_ns as f64 / r0.wall_ns.max(1) as f64,
        b_a: sum(|b| b.rows) / samples,
        b_e: sum(|b| b.expert_rows) / samples / a.experts as f64,
        transport: r0.transport.clone(),
    })
}

/// The table's title and column heads; `transport` is the one the workers
/// of the first measurement ran on.
fn print_header(a: &Args, config: &ModelConfig, transport: &str) {
    println!(
        "# moe-bench: {} ({} layers, hidden {}, {} experts top-{}), {} attention x {} expert workers over m2n ({transport})",
        config.name, config.layers, config.hidden, config.experts, config.top_k, a.attention, a.experts
    );
    println!(
        "# prompt {} tokens, {} warm-up + {} measured decode steps; T_a, T_e, T_c: mean per micro-batch and layer\n# (T_c: dispatch + combine, from the rounds both sides waited for; c_n: their share; 'few': under 10 such rounds, too few to say;\n# T_sh: of T_a, the shared expert's; dense_ms: per step, the dense layers' attention and MLP, which have no rounds)",
        a.prompt_len, a.warmup, a.steps
    );
    println!(
        "# {:>5} {:>2} {:>10} {:>8} {:>8} {:>8} {:>8} {:>5} {:>6} {:>6} {:>7} {:>12} {:>7} {:>7} {:>8}",
        "batch",
        "m",
        "tok/s",
        "step_ms",
        "T_a_us",
        "T_e_us",
        "T_c_us",
        "c_n",
        "a_idle",
        "e_idle",
        "vs_m=1",
        "coloc_tok/s",
        "dis/col",
        "T_sh_us",
        "dense_ms"
    );
}

fn launcher(a: &Args) -> Result<(), RuntimeError> {
    let config = load_config(&a.model)?;
    Checkpoint::open(&a.model)?.verify(&config)?;
    for &m in &a.microbatches {
        deployment(a, m, 1).validate(&config)?;
    }
    if a.batch.contains(&0) || a.steps == 0 {
        return Err(RuntimeError::Config(
            "batch sizes and --steps must be at least 1".into(),
        ));
    }
    let threads = a
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let reference = if a.no_colocated {
        None
    } else {
        Some(Reference::load(&a.model)?)
    };
    let mut rows = Vec::new();
    let mut colocated = Vec::new();
    for &batch in &a.batch {
        let spec = BenchSpec {
            batch,
            prompt_len: a.prompt_len,
            warmup: a.warmup,
            steps: a.steps,
        };
        let col = reference
            .as_ref()
            .map(|r| bench::run_colocated(r, &spec, threads));
        if let Some(c) = &col {
            colocated.push(
                json!({"batch": batch, "threads": c.threads, "tokens_per_s": c.tokens_per_s()}),
            );
        }
        let mut base = None;
        for &m in &a.microbatches {
            let r = measure(a, m, batch)?;
            if rows.is_empty() {
                print_header(a, &config, &r.transport);
            }
            let base_tps = *base.get_or_insert(if m == 1 { r.tokens_per_s } else { f64::NAN });
            let col_tps = col.map_or(f64::NAN, |c| c.tokens_per_s());
            println!(
                "  {:>5} {:>2} {:>10.1} {:>8.2} {:>8.1} {:>8.1} {:>8} {:>5.2} {:>6.2} {:>6.2} {:>7.2} {:>12.1} {:>7.2} {:>7.1} {:>8.2}",
                batch,
                m,
                r.tokens_per_s,
                r.step_ms,
                r.t_a_us,
                r.t_e_us,
                r.t_c_us.map_or("few".to_string(), |t| format!("{t:.1}")),
                r.t_c_share,
                r.attention_idle,
                r.expert_idle,
                r.tokens_per_s / base_tps,
                col_tps,
                r.tokens_per_s / col_tps,
                r.t_shared_us,
                r.dense_ms
            );
            rows.push(r);
        }
    }
    let pts_a: Vec<(f64, f64)> = rows.iter().map(|r| (r.b_a, r.t_a_us * 1e-6)).collect();
    let pts_e: Vec<(f64, f64)> = rows.iter().map(|r| (r.b_e, r.t_e_us * 1e-6)).collect();
    let profile = match (fit(&pts_a), fit(&pts_e)) {
        (Ok(att), Ok(exp)) => {
            println!(
                "# fitted per micro-batch and layer: T_a = {:.3} us/token x b_a + {:.1} us, T_e = {:.3} us/row x b_e + {:.1} us (b_e: rows per expert worker)",
                att.per_token * 1e6,
                att.fixed * 1e6,
                exp.per_token * 1e6,
                exp.fixed * 1e6
            );
            Some((att, exp))
        }
        (a, e) => {
            let why = a
                .err()
                .or(e.err())
                .map(|e| e.to_string())
                .unwrap_or_default();
            println!("# no fitted profile: {why}");
            None
        }
    };
    if let Some(path) = &a.json {
        let lin = |l: &Linear| json!({"per_token": l.per_token, "fixed": l.fixed});
        let mut doc = json!({
            "model": config.name,
            "layers": config.layers,
            "attention_workers": a.attention,
            "expert_workers": a.experts,
            "transport": rows.first().map(|r| r.transport.as_str()),
            "prompt_len": a.prompt_len,
            "steps": a.steps,
            "configs": rows.iter().map(|r| json!({
                "batch": r.batch, "microbatches": r.m, "tokens_per_s": r.tokens_per_s,
                "step_ms": r.step_ms, "t_a_us": r.t_a_us, "t_shared_us": r.t_shared_us, "dense_ms": r.dense_ms, "t_e_us": r.t_e_us, "t_c_us": r.t_c_us,
                "t_c_clean_share": r.t_c_share,
                "attention_idle": r.attention_idle, "expert_idle": r.expert_idle,
                "b_a": r.b_a, "b_e": r.b_e,
            })).collect::<Vec<_>>(),
            "colocated": colocated,
        });
        if let Some((att, exp)) = &profile {
            doc["attention"] = lin(att);
            doc["expert"] = lin(exp);
        }
        std::fs::write(path, serde_json::to_string_pretty(&doc).expect("JSON"))
            .map_err(|e| RuntimeError::Io(format!("{}: {e}", path.display())))?;
    }
    Ok(())
}
