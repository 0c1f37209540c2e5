//! moe-plan: MegaScale-Infer's deployment plan search.
//!
//! ```text
//! moe-plan --model mixtral-8x22b --attention-gpu H20 --expert-gpu L40S --slo-ms 150
//! moe-plan --model dbrx --gpu H800                 # homogeneous
//! moe-plan --model dbrx --heterogeneous            # every attention x expert pair of the catalogue
//! ```

use clap::Parser;
use moe_runtime::plan::gpu::{self, GpuSpec};
use moe_runtime::plan::model::ModelConfig;
use moe_runtime::plan::perf::{Efficiency, Profile, Setting, UtilCurve};
use moe_runtime::plan::{search, Plan, PlanError, SearchResult};

#[derive(Debug, Parser)]
#[command(
    name = "moe-plan",
    about = "Plan a disaggregated MoE deployment (MegaScale-Infer, Algorithm 1)"
)]
struct Cli {
    /// Preset: mixtral-8x22b, dbrx, scaled-moe, tiny, mixtral-mini, dbrx-mini, qwen3-mini, olmoe-mini,
    /// qwen2-moe-mini, deepseek-v3-mini.
    #[arg(long, conflicts_with = "hf_config")]
    model: Option<String>,
    /// A Hugging Face config.json instead of a preset.
    #[arg(long)]
    hf_config: Option<std::path::PathBuf>,
    /// One GPU type for both sides.
    #[arg(long, conflicts_with_all = ["attention_gpu", "expert_gpu", "heterogeneous"])]
    gpu: Option<String>,
    #[arg(long, requires = "expert_gpu")]
    attention_gpu: Option<String>,
    #[arg(long, requires = "attention_gpu")]
    expert_gpu: Option<String>,
    /// Search every (attention GPU, expert GPU) pair of the catalogue.
    #[arg(long)]
    heterogeneous: bool,
    /// Per-output-token latency SLO.
    #[arg(long, default_value_t = 150.0)]
    slo_ms: f64,
    /// Context length for KV-cache reads and memory.
    #[arg(long, default_value_t = 2048)]
    seq_len: u64,
    /// Largest number of micro-batches tried (N_m).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(3..=16))]
    micro_batches: u64,
    /// Extra or replacement GPUs (JSON list of {name, price, memory_gb, bandwidth_gbps, tflops, nic_gbits}).
    #[arg(long)]
    gpu_catalog: Option<std::path::PathBuf>,
    /// Link utilisation curve from `m2n_perf --json`.
    #[arg(long)]
    util: Option<std::path::PathBuf>,
    /// Measured coefficients: a `kernels-bench --json` report (fitted for the
    /// model), or {"attention": {"per_token", "fixed"}, "expert": {...}} in seconds.
    #[arg(long)]
    profile: Option<std::path::PathBuf>,
    /// Predict one fixed deployment instead of searching: `M,N,m,B` (attention
    /// nodes, expert nodes, micro-batches, global batch), with `--profile`
    /// (e.g. `moe-bench --json`) and `--util` (whose peak is the link
    /// bandwidth unless `--gpu` names one).
    #[arg(long, value_delimiter = ',')]
    predict: Option<Vec<u64>>,
    /// With --predict: a measured tokens/s to print the prediction against.
    #[arg(long, requires = "predict")]
    measured: Option<f64>,
    /// Runners-up shown.
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Also show why candidates were rejected.
    #[arg(long)]
    explain: bool,
}

fn read(path: &std::path::Path) -> Result<String, PlanError> {
    std::fs::read_to_string(path)
        .map_err(|e| PlanError::BadConfig(format!("{}: {e}", path.display())))
}

fn run(cli: Cli) -> Result<(), PlanError> {
    let model = match (&cli.model, &cli.hf_config) {
        (Some(name), _) => ModelConfig::preset(name)?,
        (None, Some(path)) => {
            let name = path
                .parent()
                .and_then(|p| p.file_name())
                .map_or("hf-model".into(), |n| n.to_string_lossy().into_owned());
            ModelConfig::from_hf_config(&name, &read(path)?)?
        }
        (None, None) => {
            return Err(PlanError::BadConfig(
                "give --model NAME or --hf-config FILE".into(),
            ))
        }
    };
    if let Some(p) = &cli.predict {
        return predict_one(&cli, &model, p);
    }
    let catalogue = match &cli.gpu_catalog {
        Some(p) => gpu::with_file(&read(p)?)?,
        None => gpu::catalogue(),
    };
    let pairs: Vec<(GpuSpec, GpuSpec)> = if let Some(g) = &cli.gpu {
        let g = gpu::find(&catalogue, g)?;
        vec![(g.clone(), g)]
    } else if let (Some(a), Some(e)) = (&cli.attention_gpu, &cli.expert_gpu) {
        vec![(gpu::find(&catalogue, a)?, gpu::find(&catalogue, e)?)]
    } else if cli.heterogeneous {
        catalogue
            .iter()
            .flat_map(|a| catalogue.iter().map(move |e| (a.clone(), e.clone())))
            .collect()
    } else {
        return Err(PlanError::BadConfig(
            "give --gpu X, --attention-gpu X --expert-gpu Y, or --heterogeneous".into(),
        ));
    };
    let util = match &cli.util {
        Some(p) => UtilCurve::from_m2n_perf(&read(p)?)?,
        None => UtilCurve::default(),
    };
    let profile: Option<Profile> = match &cli.profile {
        Some(p) => Some(Profile::from_json(&read(p)?, &model.name)?),
        None => None,
    };
    if !cli.slo_ms.is_finite() || cli.slo_ms <= 0.0 {
        return Err(PlanError::BadConfig(format!(
            "--slo-ms {} must be positive",
            cli.slo_ms
        )));
    }
    let mut all = SearchResult::default();
    for (a, e) in pairs {
        let s = Setting {
            model: model.clone(),
            attention_gpu: a,
            expert_gpu: e,
            seq_len: cli.seq_len,
            slo_s: cli.slo_ms / 1e3,
            eff: Efficiency::default(),
            util: util.clone(),
            profile,
            max_micro_batches: cli.micro_batches,
        };
        let r = search(&s);
        all.plans.extend(r.plans);
        all.rejected.extend(r.rejected);
    }
    all.plans
        .sort_by(|a, b| b.tokens_per_s_per_cost.total_cmp(&a.tokens_per_s_per_cost));
    if cli.json {
        let v = serde_json::json!({
            "model": model,
            "slo_ms": cli.slo_ms,
            "seq_len": cli.seq_len,
            "best": all.plans.first(),
            "runners_up": all.plans.iter().skip(1).take(cli.top).collect::<Vec<_>>(),
            "rejected": if cli.explain { serde_json::to_value(&all.rejected).unwrap_or_default() } else { serde_json::Value::Null },
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    println!(
        "model {}: {:.1}B parameters ({} layers, h {}, {} experts, top-{}), SLO {} ms per token, context {}",
        model.name,
        model.total_params() as f64 / 1e9,
        model.layers,
        model.hidden,
        model.experts,
        model.top_k,
        cli.slo_ms,
        cli.seq_len
    );
    match all.plans.first() {
        None => println!("no feasible plan (run with --explain to see why)"),
        Some(p) => print_best(p),
    }
    if all.plans.len() > 1 {
        println!("\nrunners-up:");
        print_table(all.plans.iter().skip(1).take(cli.top));
    }
    if cli.explain {
        println!("\nrejected candidates ({}):", all.rejected.len());
        for r in &all.rejected {
            let m = r.m.map_or("-".into(), |m| m.to_string());
            println!(
                "  {:>5}/{:<5} tp_a {:>2} tp_e {} m {:>2}: {}",
                r.attention_gpu, r.expert_gpu, r.tp_a, r.tp_e, m, r.reason
            );
        }
    }
    Ok(())
}

/// `--predict M,N,m,B`: one deployment's estimate, from measured
/// coefficients and the measured link.
fn predict_one(cli: &Cli, model: &ModelConfig, p: &[u64]) -> Result<(), PlanError> {
    let &[n_a, n_e, m, batch] = p else {
        return Err(PlanError::BadConfig(format!(
            "--predict takes M,N,m,B (4 values), got {p:?}"
        )));
    };
    if n_a == 0 || n_e == 0 || m == 0 || batch == 0 {
        return Err(PlanError::BadConfig(format!(
            "--predict {p:?}: every value must be at least 1"
        )));
    }
    let Some(profile_path) = &cli.profile else {
        return Err(PlanError::BadConfig(
            "--predict needs --profile (moe-bench --json or coefficients)".into(),
        ));
    };
    let profile = Profile::from_json(&read(profile_path)?, &model.name)?;
    let (util, link) = match &cli.util {
        Some(u) => {
            let text = read(u)?;
            (
                UtilCurve::from_m2n_perf(&text)?,
                UtilCurve::peak_from_m2n_perf(&text)?,
            )
        }
        None => (UtilCurve::default(), f64::NAN),
    };
    let mut g = match &cli.gpu {
        Some(name) => gpu::find(&gpu::catalogue(), name)?,
        None if link.is_finite() => GpuSpec {
            name: "this-host".into(),
            price: 1.0,
            memory_gb: 1e6,
            bandwidth_gbps: 1.0,
            tflops: 1.0,
            nic_gbits: 0.0,
        },
        None => {
            return Err(PlanError::BadConfig(
                "--predict needs --util (m2n_perf --json) or --gpu for the link".into(),
            ))
        }
    };
    if cli.gpu.is_none() {
        g.nic_gbits = link * 8.0 / 1e9;
    }
    let s = Setting {
        model: model.clone(),
        attention_gpu: g.clone(),
        expert_gpu: g,
        seq_len: cli.seq_len,
        slo_s: f64::INFINITY,
        eff: Efficiency::default(),
        util,
        profile: Some(profile),
        max_micro_batches: m,
    };
    let e = moe_runtime::plan::predict(&s, n_a, n_e, m, batch);
    if cli.json {
        let v = serde_json::json!({"predict": {"attention": n_a, "experts": n_e, "microbatches": m, "batch": batch}, "estimate": e, "measured_tokens_per_s": cli.measured});
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    print!(
        "predicted {} x {} m {} B {}: T_a {:.3} ms  T_e {:.3} ms  T_c {:.3} ms  iteration {:.2} ms  {:.1} tokens/s",
        n_a, n_e, m, batch, e.t_a * 1e3, e.t_e * 1e3, e.t_c * 1e3, e.t_total * 1e3, e.tokens_per_s
    );
    match cli.measured {
        Some(meas) => println!(
            "  measured {meas:.1} tokens/s  predicted/measured {:.2}",
            e.tokens_per_s / meas
        ),
        None => println!(),
    }
    Ok(())
}

fn print_best(p: &Plan) {
    let e = p.estimate;
    println!(
        "\nbest plan: attention on {} , experts on {}",
        p.attention_gpu, p.expert_gpu
    );
    println!(
        "  tp_a {}  n_a {}  tp_e {}  E {}  m {}  B {}  b_a {}  b_e {:.1}",
        p.tp_a, p.n_a, p.tp_e, p.e, p.m, p.batch, p.b_a, p.b_e
    );
    println!(
        "  T_a {:.3} ms  T_e {:.3} ms  T_c {:.3} ms  T_iter {:.1} ms  T_total {:.1} ms",
        e.t_a * 1e3,
        e.t_e * 1e3,
        e.t_c * 1e3,
        e.t_iter * 1e3,
        e.t_total * 1e3
    );
    println!(
        "  {:.0} tokens/s, {:.1} tokens/s per GPU, {:.1} tokens/s per cost unit; {} GPUs, cost {:.2}",
        e.tokens_per_s, p.tokens_per_s_per_gpu, p.tokens_per_s_per_cost, p.gpus, p.cost
    );
}

fn print_table<'a>(plans: impl Iterator<Item = &'a Plan>) {
    println!(
        "  {:>5} {:>5} {:>4} {:>4} {:>4} {:>3} {:>2} {:>6} {:>5} {:>7} {:>7} {:>7} {:>7} {:>9} {:>7} {:>8} {:>4}",
        "attn", "exp", "tp_a", "n_a", "tp_e", "E", "m", "B", "b_a", "T_a ms", "T_e ms", "T_c ms", "Titer", "tok/s", "/GPU", "/cost", "GPUs"
    );
    for p in plans {
        let e = p.estimate;
        println!(
            "  {:>5} {:>5} {:>4} {:>4} {:>4} {:>3} {:>2} {:>6} {:>5} {:>7.3} {:>7.3} {:>7.3} {:>7.1} {:>9.0} {:>7.1} {:>8.1} {:>4}",
            p.attention_gpu,
            p.expert_gpu,
            p.tp_a,
            p.n_a,
            p.tp_e,
            p.e,
            p.m,
            p.batch,
            p.b_a,
            e.t_a * 1e3,
            e.t_e * 1e3,
            e.t_c * 1e3,
            e.t_iter * 1e3,
            e.tokens_per_s,
            p.tokens_per_s_per_gpu,
            p.tokens_per_s_per_cost,
            p.gpus
        );
    }
}

fn main() {
    if let Err(e) = run(Cli::parse()) {
        eprintln!("moe-plan: {e}");
        std::process::exit(2);
    }
}
