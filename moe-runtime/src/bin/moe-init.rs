//! `moe-init`: writes `config.json` and a seeded random checkpoint in
//! Hugging Face's Mixtral layout (see `moe_runtime::model::init`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use moe_runtime::model::config_by_name;
use moe_runtime::model::init::{write_checkpoint, StoreDtype};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DtypeArg {
    Bf16,
    F32,
}

/// Writes a seeded random MoE checkpoint (config.json + safetensors).
#[derive(Debug, Parser)]
#[command(name = "moe-init")]
struct Args {
    /// A preset (tiny, mixtral-mini, dbrx-mini, qwen3-mini, olmoe-mini, qwen2-moe-mini, deepseek-v3-mini) or a
    /// Hugging Face config.json.
    #[arg(long)]
    config: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output directory (created).
    #[arg(long)]
    out: PathBuf,
    /// Number of safetensors files (more than one writes an index).
    #[arg(long, default_value_t = 1)]
    shards: usize,
    #[arg(long, value_enum, default_value_t = DtypeArg::Bf16)]
    dtype: DtypeArg,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let result = config_by_name(&a.config).and_then(|c| {
        let dtype = match a.dtype {
            DtypeArg::Bf16 => StoreDtype::Bf16,
            DtypeArg::F32 => StoreDtype::F32,
        };
        write_checkpoint(&c, a.seed, &a.out, a.shards, dtype)?;
        Ok(c)
    });
    match result {
        Ok(c) => {
            println!(
                "moe-init: {} ({:.1} M parameters, {} layers, {} experts top-{}) seed {} -> {}",
                c.name,
                c.total_params() as f64 / 1e6,
                c.layers,
                c.experts,
                c.top_k,
                a.seed,
                a.out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("moe-init: {e}");
            ExitCode::FAILURE
        }
    }
}
