//! The deployment planner of MegaScale-Infer: for a model, GPU types and a
//! per-token latency SLO, the tensor-parallel sizes, attention nodes per
//! expert set, micro-batches and batch size with the most tokens per second
//! per unit cost (Algorithm 1). See [`perf`] for the model's formulas.

pub mod gpu;
/// The model's description, which the planner reads ([`crate::model::config`]).
pub use crate::model::config as model;
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

impl From<crate::model::config::ModelConfigError> for PlanError {
    fn from(e: crate::model::config::ModelConfigError) -> Self {
        use crate::model::config::ModelConfigError as M;
        match e {
            M::UnknownModel { name, known } => PlanError::UnknownModel { name, known },
            M::BadConfig(detail) => PlanError::BadConfig(detail),
        }
    }
}
