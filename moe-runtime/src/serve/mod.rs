//! The serving front end: tokenizer, the engine that drives the attention
//! workers, the OpenAI-compatible HTTP server and its metrics.

pub mod control;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod tokenizer;
