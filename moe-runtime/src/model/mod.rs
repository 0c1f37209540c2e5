//! The model: its description ([`ModelConfig`], the same type the planner
//! uses), its checkpoint's tensors ([`tensors`]), its weights
//! ([`weights`]), seeded random checkpoints ([`init`]),
//! the layer's compute shared by every execution ([`forward`]) and the
//! single-process reference decoder, the oracle ([`reference`]).

pub mod config;
pub mod family;
pub mod forward;
pub mod init;
pub mod precise;
pub mod reference;
pub mod tensors;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

pub use config::ModelConfig;

/// What went wrong in the runtime, naming the tensor, file, worker or peer.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{file}: {detail}")]
    Checkpoint { file: PathBuf, detail: String },
    #[error("tensor {tensor} is missing from {file}")]
    MissingTensor { tensor: String, file: PathBuf },
    #[error("tensor {tensor} in {file} has shape {found:?}, the model needs {expected:?}")]
    TensorShape {
        tensor: String,
        file: PathBuf,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("model configuration: {0}")]
    Config(String),
    #[error("bad request: {0}")]
    Request(String),
    #[error("m2n: {0}")]
    M2n(#[from] m2n::Error),
    #[error("bad message from {peer}: {detail}")]
    Message { peer: String, detail: String },
    #[error("{0}")]
    Io(String),
}

/// Reads `dir/config.json` (Hugging Face naming) of a model to run: its
/// family must be one the runtime implements ([`family`]).
pub fn load_config(dir: &Path) -> Result<ModelConfig, RuntimeError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| RuntimeError::Checkpoint {
        file: path.clone(),
        detail: e.to_string(),
    })?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let bad = |detail: String| RuntimeError::Checkpoint {
        file: path.clone(),
        detail,
    };
    // The family first: a config of another family may parse as a shape
    // (with the wrong sizes) but must not run.
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    family::Family::of_config(&v).map_err(bad)?;
    ModelConfig::from_hf_config(&name, &text).map_err(|e| bad(e.to_string()))
}

/// A preset name or a `config.json` path.
pub fn config_by_name(what: &str) -> Result<ModelConfig, RuntimeError> {
    let p = Path::new(what);
    if p.extension().is_some_and(|e| e == "json") {
        let text = std::fs::read_to_string(p).map_err(|e| RuntimeError::Checkpoint {
            file: p.to_path_buf(),
            detail: e.to_string(),
        })?;
        let name = p
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        return ModelConfig::from_hf_config(&name, &text)
            .map_err(|e| RuntimeError::Config(e.to_string()));
    }
    ModelConfig::preset(what).map_err(|e| RuntimeError::Config(e.to_string()))
}
