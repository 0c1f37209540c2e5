//! The serving front end: tokenizer, the engine that drives the attention
//! workers, the OpenAI-compatible HTTP server (`http`: routes and
//! responses; `request`: request bodies, parsed and checked) and its
//! metrics.

pub mod api;
mod choices;
pub mod control;
pub mod engine;
pub mod http;
pub mod metrics;
mod request;
/// The tokenizer is the model's ([`crate::model::tokenizer`]); the server
/// speaks through it.
pub use crate::model::tokenizer;
