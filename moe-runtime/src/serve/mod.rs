//! The serving front end: tokenizer, the engine that drives the attention
//! workers, the OpenAI-compatible HTTP server and its metrics.

pub mod tokenizer;
