//! The server's own request and token types: what the HTTP layer asks the
//! engine for ([`GenerateRequest`]) and what comes back
//! ([`GeneratedToken`]). The engine alone turns them into the attention
//! worker's types and back (`engine::to_worker`, `engine::from_worker`),
//! so the HTTP side does not depend on the worker layer.

/// A request's id in the engine (the same id names its sequence in the
/// attention workers).
pub type RequestId = u64;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0: greedy; else sample from `softmax(logits / temperature)`.
    pub temperature: f32,
    /// Nucleus: sample among the most likely tokens whose probabilities add
    /// up to `top_p` (1: all).
    pub top_p: f32,
    /// Seed of the request's own random stream: the same seed gives the
    /// same tokens.
    pub seed: u64,
    /// How many most likely alternatives to report with each token.
    pub top_logprobs: usize,
}

/// A generation to run: a prompt's tokens in, up to `max_tokens` out.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// Token ids that end the generation (the end-of-sequence token,
    /// unless the client asked to ignore it).
    pub stop_tokens: Vec<u32>,
    pub sampling: SamplingParams,
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It generated one of its stop tokens.
    Stop,
    /// It reached `max_tokens`.
    Length,
}

/// One generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedToken {
    pub token: u32,
    /// Natural-log probability of `token`.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, best first, as
    /// many as `top_logprobs` asked for.
    pub top: Vec<(u32, f32)>,
    /// The generation ended with this token.
    pub finish: Option<FinishReason>,
}
