//! The serving front end: tokenizer, the engine that drives the attention
//! workers, the OpenAI-compatible HTTP server and its metrics.

pub mod control;
pub mod engine;
pub mod http;
pub mod metrics;
/// The tokenizer is the model's ([`crate::model::tokenizer`]); the server
/// speaks through it.
pub use crate::model::tokenizer;
