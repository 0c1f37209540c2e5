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
    /// Sample among the `top_k` most likely tokens (0: all).
    pub top_k: u32,
    /// Drop tokens less than `min_p` times as likely as the best (0: none).
    pub min_p: f32,
    /// vLLM's repetition penalty over prompt and output (1: off).
    pub repetition_penalty: f32,
    /// OpenAI's penalties over the output (0: off).
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// The stop tokens are barred until this many tokens are out.
    pub min_tokens: u32,
}

impl Default for SamplingParams {
    /// Greedy, every other knob neutral.
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            top_logprobs: 0,
            top_k: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            min_tokens: 0,
        }
    }
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
    /// Report each prompt token's log-probability (after the first) with
    /// this many alternatives; `None`: do not.
    pub prompt_logprobs: Option<usize>,
}

/// A prompt token's log-probability given the tokens before it.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptToken {
    /// Its index in the prompt (from 1).
    pub pos: u32,
    pub token: u32,
    pub logprob: f32,
    /// 1 + the number of tokens the model found more likely.
    pub rank: u32,
    pub top: Vec<(u32, f32)>,
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
