//! Seeded random checkpoints in Hugging Face's Mixtral layout
//! (`config.json`, `model.safetensors` or shards with
//! `model.safetensors.index.json`), for tests and benchmarks: no weights can
//! be downloaded here.
//!
//! The scales are "sharp" on purpose: a random model with small scales has
//! a nearly uniform next-token distribution, where many real bugs (a
//! missing top-k renormalisation, swapped `w1`/`w3`, RoPE off by one) would
//! not change a single greedy token. Larger router, expert and LM-head
//! scales make the top-1 margins large and let every part of a layer move
//! the logits.

use std::collections::BTreeMap;
use std::path::Path;

use half::bf16;
use safetensors::tensor::{Dtype, TensorView};

use super::tensors::{names, tensor_specs, Kind, INDEX_FILE, SINGLE_FILE};
use super::{ModelConfig, RuntimeError};

/// How to store the tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDtype {
    Bf16,
    F32,
}

/// The uniform scale of a tensor's random values (`None`: a norm weight,
/// `1 + U(-0.2, 0.2)`), by what it does and its fan-in (a matrix's
/// second dimension).
fn scale(kind: Kind, shape: &[usize]) -> Option<f32> {
    let fan_in = shape.get(1).copied().unwrap_or(1).max(1);
    // Uniform(-a, a) has variance a^2 / 3: a = sqrt(3 / fan_in) keeps unit scale.
    let unit = (3.0 / fan_in as f32).sqrt();
    match kind {
        Kind::Embedding => Some(1.0),
        Kind::Norm => None,
        Kind::Query | Kind::Key => Some(2.0 * unit),
        Kind::Value | Kind::Output => Some(unit),
        Kind::Router => Some(4.0 * unit),
        Kind::ScoreBias => Some(0.2),
        Kind::ExpertGate | Kind::ExpertUp => Some(1.5 * unit),
        Kind::ExpertDown | Kind::SharedDown | Kind::SharedGate => Some(2.0 * unit),
        Kind::Bias => Some(0.5),
        Kind::LmHead => Some(6.0 * unit),
    }
}

fn seed_of(seed: u64, name: &str) -> u64 {
    // FNV-1a of the name, mixed with the seed.
    name.bytes().fold(0xcbf2_9ce4_8422_2325 ^ seed, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn values(seed: u64, name: &str, n: usize, scale: Option<f32>) -> Vec<bf16> {
    let s = seed_of(seed, name);
    match scale {
        Some(a) => kernels::cpu::random_bf16(s, n, a),
        None => kernels::cpu::random_bf16(s, n, 0.2)
            .into_iter()
            .map(|x| bf16::from_f32(1.0 + x.to_f32()))
            .collect(),
    }
}

/// Writes `config.json` and a random checkpoint of `c` from `seed` into
/// `dir`, in `shards` files (1: `model.safetensors`; more: an index and
/// `model-0000i-of-0000n.safetensors`, split by layer).
pub fn write_checkpoint(
    c: &ModelConfig,
    seed: u64,
    dir: &Path,
    shards: usize,
    dtype: StoreDtype,
) -> Result<(), RuntimeError> {
    let io = |file: &Path, e: &dyn std::fmt::Display| RuntimeError::Checkpoint {
        file: file.to_path_buf(),
        detail: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| io(dir, &e))?;
    let cfg_path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&c.to_hf_config()).expect("JSON value");
    std::fs::write(&cfg_path, text + "\n").map_err(|e| io(&cfg_path, &e))?;
    let shards = shards.max(1);
    let specs = tensor_specs(c);
    let layers = c.layers as usize;
    // Shard of a tensor: by layer (embeddings with the first, head with the last).
    let shard_of = |name: &str| -> usize {
        let layer = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<usize>().ok());
        match (layer, name) {
            (Some(l), _) => l * shards / layers.max(1),
            (None, names::EMBED) => 0,
            _ => shards - 1,
        }
    };
    let file_name = |i: usize| {
        if shards == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, shards)
        }
    };
    let mut weight_map = BTreeMap::new();
    for shard in 0..shards {
        let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for t in specs.iter().filter(|t| shard_of(&t.name) == shard) {
            let (name, shape) = (&t.name, &t.shape);
            let v = values(seed, name, shape.iter().product(), scale(t.kind, shape));
            let bytes: Vec<u8> = match dtype {
                StoreDtype::Bf16 => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
                StoreDtype::F32 => v.iter().flat_map(|x| x.to_f32().to_le_bytes()).collect(),
            };
            weight_map.insert(name.clone(), file_name(shard));
            data.push((name.clone(), shape.clone(), bytes));
        }
        let st = match dtype {
            StoreDtype::Bf16 => Dtype::BF16,
            StoreDtype::F32 => Dtype::F32,
        };
        let views: Vec<(String, TensorView<'_>)> = data
            .iter()
            .map(|(n, s, b)| {
                let view = TensorView::new(st, s.clone(), b).expect("shape matches the data");
                (n.clone(), view)
            })
            .collect();
        let path = dir.join(file_name(shard));
        let mut meta = std::collections::HashMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        safetensors::serialize_to_file(views, Some(meta), &path).map_err(|e| io(&path, &e))?;
    }
    // A tokenizer whose vocabulary is the model's, so that every token a
    // random model produces decodes (none below 258 ids: the byte-level
    // fallback serves those).
    if c.vocab >= 258 {
        super::tokenizer::write_tokenizer(dir, c.vocab as usize)?;
    }
    if shards > 1 {
        let path = dir.join(INDEX_FILE);
        let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&index).expect("JSON value"),
        )
        .map_err(|e| io(&path, &e))?;
    } else {
        let _ = std::fs::remove_file(dir.join(INDEX_FILE));
    }
    Ok(())
}
