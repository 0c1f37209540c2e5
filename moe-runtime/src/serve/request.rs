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
    pub(super) prompt: Vec<u32>,
    pub(super) max_tokens: usize,
    pub(super) sampling: SamplingParams,
    pub(super) stop: Vec<String>,
    pub(super) stream: bool,
    pub(super) include_usage: bool,
    /// Chat: `logprobs: true`; completions: `logprobs: N`.
    pub(super) logprobs: bool,
    /// vLLM's extensions: generate past the end-of-sequence token, and
    /// name logprob tokens `token_id:N`.
    pub(super) ignore_eos: bool,
    pub(super) ids_as_tokens: bool,
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
    match field(v, k) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(x) => Err(ApiError::bad(
            k,
            format!("{k} must be true or false, got {x}"),
        )),
    }
}

/// Checks a request body for `kind`'s endpoint. The checks run in a fixed
/// order (the body, unknown and unsupported parameters, the model, `n`, the
/// prompt, the token budget, sampling, stop, streaming, logprobs), so a
/// request with several faults is always told the same one.
pub(super) fn parse(st: &AppState, body: &[u8], kind: Kind) -> Result<Parsed, ApiError> {
    let v = json_object(body)?;
    check_known(&v, kind)?;
    refuse_unsupported(&v)?;
    check_model(st, &v)?;
    if let Some(n) = uint(&v, "n", u64::MAX)? {
        if n != 1 {
            return Err(ApiError::bad("n", format!("n must be 1, got {n}")));
        }
    }
    let (prompt, prompt_param) = prompt(st, &v, kind)?;
    let max_tokens = max_tokens(st, &v, kind, prompt.len(), prompt_param)?;
    let sampling = sampling(&v)?;
    let stop = stop(&v)?;
    let stream = boolean(&v, "stream")?;
    let include_usage = include_usage(&v, stream)?;
    let (logprobs, top_logprobs) = logprobs(&v, kind)?;
    let ignore_eos = boolean(&v, "ignore_eos")?;
    let ids_as_tokens = boolean(&v, "return_tokens_as_token_ids")?;
    Ok(Parsed {
        ignore_eos,
        ids_as_tokens,
        prompt,
        max_tokens,
        sampling: SamplingParams {
            top_logprobs,
            ..sampling
        },
        stop,
        stream,
        include_usage,
        logprobs,
    })
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
/// another: the penalties, `logit_bias`, `echo`, `best_of`, `suffix`.
fn refuse_unsupported(v: &Map<String, Value>) -> Result<(), ApiError> {
    for (k, neutral) in [("presence_penalty", 0.0), ("frequency_penalty", 0.0)] {
        if let Some(x) = field(v, k) {
            if x.as_f64() != Some(neutral) {
                return Err(ApiError::bad(
                    k,
                    format!("{k} is not supported (only {neutral})"),
                ));
            }
        }
    }
    if let Some(x) = field(v, "logit_bias") {
        if x.as_object().is_none_or(|m| !m.is_empty()) {
            return Err(ApiError::bad("logit_bias", "logit_bias is not supported"));
        }
    }
    if let Some(x) = field(v, "echo") {
        if x != &Value::Bool(false) {
            return Err(ApiError::bad("echo", "echo is not supported"));
        }
    }
    if let Some(x) = field(v, "best_of") {
        if x.as_u64() != Some(1) {
            return Err(ApiError::bad("best_of", "best_of must be 1"));
        }
    }
    if let Some(x) = field(v, "suffix") {
        return Err(ApiError::bad(
            "suffix",
            format!("suffix is not supported, got {x}"),
        ));
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

/// The prompt's tokens (`prompt`, or the chat template over `messages`)
/// and the parameter's name; not empty, with room left in the context.
fn prompt(
    st: &AppState,
    v: &Map<String, Value>,
    kind: Kind,
) -> Result<(Vec<u32>, &'static str), ApiError> {
    let (prompt, prompt_param) = match kind {
        Kind::Completion => (prompt_of(st, v)?, "prompt"),
        Kind::Chat => (chat_prompt_of(st, v)?, "messages"),
    };
    if prompt.is_empty() {
        return Err(ApiError::bad(
            prompt_param,
            format!("{prompt_param} is empty"),
        ));
    }
    if st.max_model_len <= prompt.len() {
        return Err(ApiError::bad(
            prompt_param,
            format!(
                "This model's maximum context length is {} tokens. However, your {prompt_param} has {} tokens.",
                st.max_model_len,
                prompt.len()
            ),
        ));
    }
    Ok((prompt, prompt_param))
}

/// Tokens to generate: `max_tokens` (or chat's `max_completion_tokens`),
/// by default 16 for completions and the rest of the context for chat;
/// the prompt and these must fit the context.
fn max_tokens(
    st: &AppState,
    v: &Map<String, Value>,
    kind: Kind,
    prompt_len: usize,
    prompt_param: &str,
) -> Result<usize, ApiError> {
    let room = st.max_model_len.saturating_sub(prompt_len);
    let max_param = if field(v, "max_completion_tokens").is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max_tokens = match uint(v, max_param, u32::MAX as u64)? {
        Some(0) => {
            return Err(ApiError::bad(
                max_param,
                format!("{max_param} must be at least 1"),
            ))
        }
        Some(n) => n as usize,
        None if kind == Kind::Completion => 16.min(room),
        None => room,
    };
    if prompt_len + max_tokens > st.max_model_len {
        return Err(ApiError::bad(
            max_param,
            format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the {prompt_param}, {max_tokens} in the completion).",
                st.max_model_len,
                prompt_len + max_tokens,
                prompt_len
            ),
        ));
    }
    Ok(max_tokens)
}

/// `temperature`, `top_p` and `seed` (the clock's nanoseconds when not
/// given); `top_logprobs` is left 0 for [`logprobs`] to set.
fn sampling(v: &Map<String, Value>) -> Result<SamplingParams, ApiError> {
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
    Ok(SamplingParams {
        temperature,
        top_p,
        seed,
        top_logprobs: 0,
    })
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

fn prompt_of(st: &AppState, v: &Map<String, Value>) -> Result<Vec<u32>, ApiError> {
    let vocab = st.tokenizer_vocab();
    match field(v, "prompt") {
        None => Err(ApiError::bad("prompt", "prompt is required")),
        Some(Value::String(s)) => encode(st, s, "prompt"),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            encode(st, a[0].as_str().unwrap_or_default(), "prompt")
        }
        Some(Value::Array(a)) if a.iter().all(|x| x.is_u64()) => a
            .iter()
            .map(|x| {
                let id = x.as_u64().unwrap_or(u64::MAX);
                if id < vocab as u64 {
                    Ok(id as u32)
                } else {
                    Err(ApiError::bad(
                        "prompt",
                        format!("token id {id} is outside the vocabulary of {vocab}"),
                    ))
                }
            })
            .collect(),
        Some(x) => Err(ApiError::bad(
            "prompt",
            format!("prompt must be a string or a list of token ids (one prompt: n = 1), got {x}"),
        )),
    }
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

impl AppState {
    fn tokenizer_vocab(&self) -> usize {
        self.engine_vocab
    }
}
