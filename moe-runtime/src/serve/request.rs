//! OpenAI request bodies for `/v1/completions` and `/v1/chat/completions`:
//! parsed and checked into what the engine runs ([`Parsed`]), or refused
//! with a 400 (or 404 for another model) naming the parameter at fault.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use serde_json::{Map, Value};

use super::api::SamplingParams;
use super::http::{ApiError, AppState};
use super::tokenizer::ChatMessage;

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Kind {
    Completion,
    Chat,
}

/// A request, checked.
#[derive(Debug)]
pub(super) struct Parsed {
    /// One token list per prompt (chat: the one the template made).
    pub(super) prompts: Vec<Vec<u32>>,
    /// Choices returned per prompt (`n`).
    pub(super) n: usize,
    /// Choices generated per prompt (`best_of`, at least `n`): the `n`
    /// with the highest cumulative log-probability are returned.
    pub(super) best_of: usize,
    /// Tokens to generate; 0 only with `echo` (the prompt is scored).
    pub(super) max_tokens: usize,
    pub(super) sampling: SamplingParams,
    pub(super) stop: Vec<String>,
    /// vLLM's `stop_token_ids`: more tokens that end a choice.
    pub(super) stop_token_ids: Vec<u32>,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    /// Chat: `logprobs: true`; completions: `logprobs: N`.
    pub(super) logprobs: bool,
    /// Completions: the prompt comes back before the completion (with its
    /// log-probabilities when `logprobs` is set).
    pub(super) echo: bool,
    /// vLLM's `prompt_logprobs: N`: each prompt token's log-probability
    /// and its N most likely alternatives, in the response.
    pub(super) prompt_logprobs: Option<usize>,
    /// vLLM's extensions: generate past the end-of-sequence token, name
    /// logprob tokens `token_id:N`, keep special tokens out of the text,
    /// keep the stop string (or token) that ended a choice in its text.
    pub(super) ignore_eos: bool,
    pub(super) ids_as_tokens: bool,
    pub(super) skip_special_tokens: bool,
    pub(super) include_stop_str_in_output: bool,
}

impl Parsed {
    /// The prompt log-probabilities the engine must report: for
    /// `prompt_logprobs`, and for `echo` with `logprobs`.
    pub(super) fn engine_prompt_logprobs(&self) -> Option<usize> {
        let echoed = (self.echo && self.logprobs).then_some(self.sampling.top_logprobs);
        match (self.prompt_logprobs, echoed) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

fn field<'a>(v: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    v.get(k).filter(|x| !x.is_null())
}

fn uint(v: &Map<String, Value>, k: &str, max: u64) -> Result<Option<u64>, ApiError> {
    match field(v, k) {
        None => Ok(None),
        Some(x) => match x.as_u64() {
            Some(n) if n <= max => Ok(Some(n)),
            _ => Err(ApiError::bad(
                k,
                format!("{k} must be an integer from 0 to {max}, got {x}"),
            )),
        },
    }
}

fn number(v: &Map<String, Value>, k: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
    match field(v, k) {
        None => Ok(None),
        Some(x) => match x.as_f64() {
            Some(n) if (lo..=hi).contains(&n) => Ok(Some(n)),
            _ => Err(ApiError::bad(
                k,
                format!("{k} must be a number from {lo} to {hi}, got {x}"),
            )),
        },
    }
}

fn boolean(v: &Map<String, Value>, k: &str) -> Result<bool, ApiError> {
    boolean_or(v, k, false)
}

fn boolean_or(v: &Map<String, Value>, k: &str, default: bool) -> Result<bool, ApiError> {
    match field(v, k) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(x) => Err(ApiError::bad(
            k,
            format!("{k} must be true or false, got {x}"),
        )),
    }
}

/// Checks a request body for `kind`'s endpoint. The checks run in a fixed
/// order (the body, unknown and unsupported parameters, the model, the
/// choices, the prompt, the token budget, sampling, stop, streaming,
/// logprobs), so a request with several faults is always told the same one.
pub(super) fn parse(st: &AppState, body: &[u8], kind: Kind) -> Result<Parsed, ApiError> {
    let v = json_object(body)?;
    check_known(&v, kind)?;
    refuse_unsupported(&v, kind)?;
    check_model(st, &v)?;
    let stream = boolean(&v, "stream")?;
    let (n, best_of) = choices(&v, stream)?;
    let echo = boolean(&v, "echo")?;
    let (prompts, prompt_param) = prompts(st, &v, kind)?;
    let max_tokens = max_tokens(st, &v, kind, &prompts, prompt_param, echo)?;
    let sampling = sampling(&v, max_tokens)?;
    let stop = stop(&v)?;
    let stop_token_ids = stop_token_ids(st, &v)?;
    let include_usage = include_usage(&v, stream)?;
    let (logprobs, top_logprobs) = logprobs(&v, kind)?;
    let prompt_logprobs = uint(&v, "prompt_logprobs", 20)?.map(|k| k as usize);
    if prompt_logprobs.is_some() && stream {
        return Err(ApiError::bad(
            "prompt_logprobs",
            "prompt_logprobs is not available with stream: true",
        ));
    }
    Ok(Parsed {
        prompts,
        n,
        best_of,
        max_tokens,
        sampling: SamplingParams {
            top_logprobs,
            ..sampling
        },
        stop,
        stop_token_ids,
        stream,
        include_usage,
        logprobs,
        echo,
        prompt_logprobs,
        ignore_eos: boolean(&v, "ignore_eos")?,
        ids_as_tokens: boolean(&v, "return_tokens_as_token_ids")?,
        skip_special_tokens: boolean_or(&v, "skip_special_tokens", true)?,
        include_stop_str_in_output: boolean(&v, "include_stop_str_in_output")?,
    })
}

/// `n` (1 to 16) and `best_of` (from `n` to 16; not with streaming).
fn choices(v: &Map<String, Value>, stream: bool) -> Result<(usize, usize), ApiError> {
    const MOST: u64 = 16;
    let n = match uint(v, "n", u64::MAX)? {
        None => 1,
        Some(n) if (1..=MOST).contains(&n) => n as usize,
        Some(n) => {
            return Err(ApiError::bad(
                "n",
                format!("n must be from 1 to {MOST}, got {n}"),
            ))
        }
    };
    let best_of = match uint(v, "best_of", u64::MAX)? {
        None => n,
        Some(b) if (n as u64..=MOST).contains(&b) => b as usize,
        Some(b) => {
            return Err(ApiError::bad(
                "best_of",
                format!("best_of must be from n ({n}) to {MOST}, got {b}"),
            ))
        }
    };
    if best_of > n && stream {
        return Err(ApiError::bad(
            "best_of",
            "best_of larger than n is not available with stream: true",
        ));
    }
    Ok((n, best_of))
}

/// The body as a JSON object.
fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("body", format!("the body is not valid JSON: {e}")))?;
    let Value::Object(v) = v else {
        return Err(ApiError::bad("body", "the body must be a JSON object"));
    };
    Ok(v)
}

/// The parameters `kind`'s endpoint accepts (some only at a neutral value).
fn known_params(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Completion => &[
            "model",
            "prompt",
            "max_tokens",
            "temperature",
            "top_p",
            "seed",
            "stop",
            "n",
            "stream",
            "stream_options",
            "logprobs",
            "echo",
            "user",
            "presence_penalty",
            "frequency_penalty",
            "best_of",
            "suffix",
            "logit_bias",
            "ignore_eos",
            "return_tokens_as_token_ids",
            "repetition_penalty",
            "top_k",
            "min_p",
            "min_tokens",
            "stop_token_ids",
            "skip_special_tokens",
            "include_stop_str_in_output",
            "prompt_logprobs",
        ],
        Kind::Chat => &[
            "model",
            "messages",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "seed",
            "stop",
            "n",
            "stream",
            "stream_options",
            "logprobs",
            "top_logprobs",
            "user",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "ignore_eos",
            "return_tokens_as_token_ids",
            "repetition_penalty",
            "top_k",
            "min_p",
            "min_tokens",
            "stop_token_ids",
            "skip_special_tokens",
            "include_stop_str_in_output",
            "prompt_logprobs",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "response_format",
        ],
    }
}

/// Refuses the first parameter `kind`'s endpoint does not know.
fn check_known(v: &Map<String, Value>, kind: Kind) -> Result<(), ApiError> {
    let known = known_params(kind);
    for k in v.keys() {
        if !known.contains(&k.as_str()) {
            return Err(ApiError::bad(k, format!("unsupported parameter {k:?}")));
        }
    }
    Ok(())
}

/// Refuses parameters accepted only at their neutral value when they have
/// another: `logit_bias`, `suffix`, and chat's tools and response formats
/// (there is no tool-call parser and no constrained decoding).
fn refuse_unsupported(v: &Map<String, Value>, kind: Kind) -> Result<(), ApiError> {
    if let Some(x) = field(v, "logit_bias") {
        if x.as_object().is_none_or(|m| !m.is_empty()) {
            return Err(ApiError::bad("logit_bias", "logit_bias is not supported"));
        }
    }
    if let Some(x) = field(v, "suffix") {
        return Err(ApiError::bad(
            "suffix",
            format!("suffix is not supported (no fill-in-the-middle), got {x}"),
        ));
    }
    if kind == Kind::Chat {
        if let Some(x) = field(v, "tools") {
            if x.as_array().is_none_or(|a| !a.is_empty()) {
                return Err(ApiError::bad(
                    "tools",
                    "tools are not supported: this server has no tool-call parser",
                ));
            }
        }
        if let Some(x) = field(v, "tool_choice") {
            if x != "none" {
                return Err(ApiError::bad(
                    "tool_choice",
                    format!("tool_choice must be \"none\" (no tools are supported), got {x}"),
                ));
            }
        }
        if let Some(x) = field(v, "response_format") {
            if x.get("type").and_then(Value::as_str) != Some("text") {
                return Err(ApiError::bad(
                    "response_format",
                    format!("response_format must be {{\"type\": \"text\"}} (no constrained decoding), got {x}"),
                ));
            }
        }
        boolean(v, "parallel_tool_calls")?;
    }
    Ok(())
}

/// `model` must name the served model (404 for another name).
fn check_model(st: &AppState, v: &Map<String, Value>) -> Result<(), ApiError> {
    match field(v, "model") {
        None => Err(ApiError::bad("model", "model is required")),
        Some(Value::String(m)) if *m == st.model => Ok(()),
        Some(Value::String(m)) => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model `{m}` does not exist; this server serves `{}`.",
                st.model
            ),
            kind: "NotFoundError",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }),
        Some(x) => Err(ApiError::bad(
            "model",
            format!("model must be a string, got {x}"),
        )),
    }
}

/// The prompts' tokens (`prompt`, or the chat template over `messages`)
/// and the parameter's name; none empty, each with room left in the
/// context.
fn prompts(
    st: &AppState,
    v: &Map<String, Value>,
    kind: Kind,
) -> Result<(Vec<Vec<u32>>, &'static str), ApiError> {
    let (prompts, param) = match kind {
        Kind::Completion => (prompts_of(st, v)?, "prompt"),
        Kind::Chat => (vec![chat_prompt_of(st, v)?], "messages"),
    };
    let many = prompts.len() > 1;
    for (i, prompt) in prompts.iter().enumerate() {
        let which = if many {
            format!("{param}[{i}]")
        } else {
            param.to_string()
        };
        if prompt.is_empty() {
            return Err(ApiError::bad(param, format!("{which} is empty")));
        }
        if st.max_model_len <= prompt.len() {
            return Err(ApiError::bad(
                param,
                format!(
                    "This model's maximum context length is {} tokens. However, your {which} has {} tokens.",
                    st.max_model_len,
                    prompt.len()
                ),
            ));
        }
    }
    Ok((prompts, param))
}

/// Tokens to generate: `max_tokens` (or chat's `max_completion_tokens`),
/// by default 16 for completions and the rest of the context for chat;
/// every prompt and these must fit the context. 0 only with `echo`.
fn max_tokens(
    st: &AppState,
    v: &Map<String, Value>,
    kind: Kind,
    prompts: &[Vec<u32>],
    prompt_param: &str,
    echo: bool,
) -> Result<usize, ApiError> {
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let room = st.max_model_len.saturating_sub(longest);
    let max_param = if field(v, "max_completion_tokens").is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max_tokens = match uint(v, max_param, u32::MAX as u64)? {
        Some(0) if echo => 0,
        Some(0) => {
            return Err(ApiError::bad(
                max_param,
                format!("{max_param} must be at least 1 (0 only with echo, to score the prompt)"),
            ))
        }
        Some(n) => n as usize,
        None if kind == Kind::Completion => 16.min(room),
        None => room,
    };
    if longest + max_tokens > st.max_model_len {
        return Err(ApiError::bad(
            max_param,
            format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the {prompt_param}, {max_tokens} in the completion).",
                st.max_model_len,
                longest + max_tokens,
                longest
            ),
        ));
    }
    Ok(max_tokens)
}

/// `temperature`, `top_p`, `seed` (the clock's nanoseconds when not given)
/// and vLLM's `top_k`, `min_p`, `repetition_penalty`, `min_tokens` with
/// OpenAI's penalties; `top_logprobs` is left 0 for [`logprobs`] to set.
fn sampling(v: &Map<String, Value>, max_tokens: usize) -> Result<SamplingParams, ApiError> {
    let temperature = number(v, "temperature", 0.0, 2.0)?.unwrap_or(1.0) as f32;
    let top_p = number(v, "top_p", 0.0, 1.0)?.unwrap_or(1.0) as f32;
    if field(v, "top_p").is_some() && top_p <= 0.0 {
        return Err(ApiError::bad("top_p", "top_p must be greater than 0"));
    }
    let seed = match field(v, "seed") {
        None => now_nanos_seed(),
        Some(x) => x
            .as_i64()
            .map(|s| s as u64)
            .ok_or_else(|| ApiError::bad("seed", format!("seed must be an integer, got {x}")))?,
    };
    // vLLM: -1 or 0 is every token.
    let top_k = match field(v, "top_k") {
        None => 0,
        Some(x) => match x.as_i64() {
            Some(-1) => 0,
            Some(k) if (0..=i64::from(u32::MAX)).contains(&k) => k as u32,
            _ => {
                return Err(ApiError::bad(
                    "top_k",
                    format!("top_k must be -1 (all), 0 (all) or a positive integer, got {x}"),
                ))
            }
        },
    };
    let repetition_penalty = number(v, "repetition_penalty", 0.0, 2.0)?.unwrap_or(1.0) as f32;
    if repetition_penalty <= 0.0 {
        return Err(ApiError::bad(
            "repetition_penalty",
            "repetition_penalty must be greater than 0",
        ));
    }
    let min_tokens = uint(v, "min_tokens", u32::MAX as u64)?.unwrap_or(0);
    if min_tokens as usize > max_tokens {
        return Err(ApiError::bad(
            "min_tokens",
            format!("min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})"),
        ));
    }
    Ok(SamplingParams {
        temperature,
        top_p,
        seed,
        top_logprobs: 0,
        top_k,
        min_p: number(v, "min_p", 0.0, 1.0)?.unwrap_or(0.0) as f32,
        repetition_penalty,
        presence_penalty: number(v, "presence_penalty", -2.0, 2.0)?.unwrap_or(0.0) as f32,
        frequency_penalty: number(v, "frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0) as f32,
        min_tokens: min_tokens as u32,
    })
}

/// vLLM's `stop_token_ids`: token ids in the vocabulary.
fn stop_token_ids(st: &AppState, v: &Map<String, Value>) -> Result<Vec<u32>, ApiError> {
    let Some(x) = field(v, "stop_token_ids") else {
        return Ok(Vec::new());
    };
    let bad = || {
        ApiError::bad(
            "stop_token_ids",
            format!(
                "stop_token_ids must be a list of token ids below {}, got {x}",
                st.engine_vocab
            ),
        )
    };
    x.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|t| match t.as_u64() {
            Some(id) if id < st.engine_vocab as u64 => Ok(id as u32),
            _ => Err(bad()),
        })
        .collect()
}

/// `stop`: a string or up to 4 of them.
fn stop(v: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    match field(v, "stop") {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(|x| x.is_string()) => Ok(a
            .iter()
            .map(|x| x.as_str().unwrap_or_default().to_string())
            .collect()),
        Some(x) => Err(ApiError::bad(
            "stop",
            format!("stop must be a string or a list of up to 4 strings, got {x}"),
        )),
    }
}

/// `stream_options.include_usage` (only with `stream: true`).
fn include_usage(v: &Map<String, Value>, stream: bool) -> Result<bool, ApiError> {
    match field(v, "stream_options") {
        None => Ok(false),
        Some(Value::Object(o)) => {
            if !stream {
                return Err(ApiError::bad(
                    "stream_options",
                    "stream_options is only allowed with stream: true",
                ));
            }
            for k in o.keys() {
                if k != "include_usage" && k != "continuous_usage_stats" {
                    return Err(ApiError::bad(
                        "stream_options",
                        format!("unsupported stream option {k:?}"),
                    ));
                }
            }
            boolean(o, "include_usage")
                .map_err(|_| ApiError::bad("stream_options", "include_usage must be true or false"))
        }
        Some(x) => Err(ApiError::bad(
            "stream_options",
            format!("stream_options must be an object, got {x}"),
        )),
    }
}

/// Whether to return logprobs, and how many alternatives per token:
/// completions' `logprobs: N`, chat's `logprobs: true` and `top_logprobs`.
fn logprobs(v: &Map<String, Value>, kind: Kind) -> Result<(bool, usize), ApiError> {
    match kind {
        Kind::Completion => Ok(match uint(v, "logprobs", 20)? {
            None => (false, 0),
            Some(n) => (true, n as usize),
        }),
        Kind::Chat => {
            let on = boolean(v, "logprobs")?;
            let top = uint(v, "top_logprobs", 20)?;
            if top.is_some() && !on {
                return Err(ApiError::bad(
                    "top_logprobs",
                    "top_logprobs needs logprobs: true",
                ));
            }
            Ok((on, top.unwrap_or(0) as usize))
        }
    }
}

fn now_nanos_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// `prompt`: a string, a list of strings, a list of token ids or a list
/// of such lists (one prompt each).
fn prompts_of(st: &AppState, v: &Map<String, Value>) -> Result<Vec<Vec<u32>>, ApiError> {
    const SHAPE: &str =
        "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists";
    match field(v, "prompt") {
        None => Err(ApiError::bad("prompt", "prompt is required")),
        Some(Value::String(s)) => Ok(vec![encode(st, s, "prompt")?]),
        Some(Value::Array(a)) if a.is_empty() => Err(ApiError::bad("prompt", "prompt is empty")),
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => a
            .iter()
            .map(|s| encode(st, s.as_str().unwrap_or_default(), "prompt"))
            .collect(),
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => Ok(vec![token_ids(st, a)?]),
        Some(Value::Array(a)) if a.iter().all(Value::is_array) => a
            .iter()
            .map(|p| token_ids(st, p.as_array().map(Vec::as_slice).unwrap_or_default()))
            .collect(),
        Some(x) => Err(ApiError::bad("prompt", format!("{SHAPE}, got {x}"))),
    }
}

/// A list of token ids, each in the vocabulary.
fn token_ids(st: &AppState, a: &[Value]) -> Result<Vec<u32>, ApiError> {
    let vocab = st.engine_vocab;
    a.iter()
        .map(|x| match x.as_u64() {
            Some(id) if id < vocab as u64 => Ok(id as u32),
            Some(id) => Err(ApiError::bad(
                "prompt",
                format!("token id {id} is outside the vocabulary of {vocab}"),
            )),
            None => Err(ApiError::bad(
                "prompt",
                format!(
                    "a token id must be an integer from 0 to {}, got {x}",
                    vocab - 1
                ),
            )),
        })
        .collect()
}

fn encode(st: &AppState, text: &str, param: &str) -> Result<Vec<u32>, ApiError> {
    st.tokenizer
        .encode(text)
        .map_err(|e| ApiError::bad(param, e.to_string()))
}

fn chat_prompt_of(st: &AppState, v: &Map<String, Value>) -> Result<Vec<u32>, ApiError> {
    let Some(Value::Array(msgs)) = field(v, "messages") else {
        return Err(ApiError::bad(
            "messages",
            "messages must be a list of {role, content}",
        ));
    };
    if msgs.is_empty() {
        return Err(ApiError::bad("messages", "messages is empty"));
    }
    let mut out = Vec::with_capacity(msgs.len());
    for (i, m) in msgs.iter().enumerate() {
        let role = m.get("role").and_then(|r| r.as_str());
        let content = match m.get("content") {
            Some(Value::String(s)) => Some(s.clone()),
            // [{"type": "text", "text": ...}] parts.
            Some(Value::Array(parts)) => parts
                .iter()
                .map(|p| {
                    match (
                        p.get("type").and_then(|t| t.as_str()),
                        p.get("text").and_then(|t| t.as_str()),
                    ) {
                        (Some("text"), Some(t)) => Some(t.to_string()),
                        _ => None,
                    }
                })
                .collect::<Option<Vec<String>>>()
                .map(|v| v.concat()),
            _ => None,
        };
        match (role, content) {
            (Some(r @ ("system" | "user" | "assistant" | "developer")), Some(c)) => {
                out.push(ChatMessage {
                    role: r.to_string(),
                    content: c,
                })
            }
            _ => {
                return Err(ApiError::bad(
                    "messages",
                    format!(
                        "messages[{i}] needs a role (system, user, assistant) and text content"
                    ),
                ))
            }
        }
    }
    let text = st
        .tokenizer
        .apply_chat_template(&out)
        .map_err(|e| ApiError::bad("messages", e.to_string()))?;
    encode(st, &text, "messages")
}
