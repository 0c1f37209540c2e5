//! The deployment planner of MegaScale-Infer: for a model, GPU types and a
//! per-token latency SLO, the tensor-parallel sizes, attention nodes per
//! expert set, micro-batches and batch size with the most tokens per second
//! per unit cost (Algorithm 1). See [`perf`] for the model's formulas.

pub mod gpu;
pub mod model;
pub mod perf;
mod search;

pub use search::{
    balance_attention_nodes, evaluate, largest_batch, predict, search, Estimate, Plan, Rejection,
    SearchResult,
};

/// A planner input problem, naming what was wrong.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("unknown model {name:?}; known: {known}")]
    UnknownModel { name: String, known: String },
    #[error("unknown GPU {name:?}; known: {known}")]
    UnknownGpu { name: String, known: String },
    #[error("bad input: {0}")]
    BadConfig(String),
}
