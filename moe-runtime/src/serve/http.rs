//! The OpenAI-compatible HTTP front end (axum): `POST /v1/completions`,
//! `POST /v1/chat/completions` (streamed as server-sent events or not),
//! `GET /v1/models`, `GET /health`, `GET /metrics`. Request and response
//! shapes follow OpenAI's API as vLLM serves it; errors are
//! `{"error": {"message", "type", "param", "code"}}` with 400 (bad
//! request, naming the field), 404 (unknown model), 429 (queue full) or
//! 503 (workers lost, shutting down).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::engine::{EngineHandle, Refused, SeqEvent};
use super::metrics::Metrics;
use super::tokenizer::{ChatMessage, Detokenizer, Tokenizer};
use crate::worker::attention::{Finish, Request, Sampling, Token};

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<Tokenizer>,
    pub metrics: Arc<Metrics>,
    /// The name clients pass as `model`.
    pub model: String,
    /// Prompt plus generated tokens may not exceed this.
    pub max_model_len: usize,
    pub created: u64,
    /// The model's vocabulary (token-id prompts are checked against it).
    pub engine_vocab: usize,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// An error in OpenAI's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    fn bad(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: None,
        }
    }
    fn status(status: u16, message: impl Into<String>) -> Self {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self {
            status,
            message: message.into(),
            kind: match status.as_u16() {
                400 => "invalid_request_error",
                429 => "rate_limit_exceeded",
                _ => "service_unavailable",
            },
            param: None,
            code: None,
        }
    }
    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [
        {"id": st.model, "object": "model", "created": st.created, "owned_by": "m2n", "max_model_len": st.max_model_len}
    ]}))
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    if let Some(why) = st.engine.shared.unhealthy() {
        return ApiError::status(503, format!("unhealthy: {why}")).into_response();
    }
    if st.engine.shared.draining() {
        return ApiError::status(503, "the server is shutting down").into_response();
    }
    (StatusCode::OK, "").into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(),
    )
        .into_response()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

/// A request, checked.
#[derive(Debug)]
struct Parsed {
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: Sampling,
    stop: Vec<String>,
    stream: bool,
    include_usage: bool,
    /// Chat: `logprobs: true`; completions: `logprobs: N`.
    logprobs: bool,
    /// vLLM's extensions: generate past the end-of-sequence token, and
    /// name logprob tokens `token_id:N`.
    ignore_eos: bool,
    ids_as_tokens: bool,
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

fn parse(st: &AppState, body: &[u8], kind: Kind) -> Result<Parsed, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("body", format!("the body is not valid JSON: {e}")))?;
    let Value::Object(v) = v else {
        return Err(ApiError::bad("body", "the body must be a JSON object"));
    };
    let known: &[&str] = match kind {
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
    };
    for k in v.keys() {
        if !known.contains(&k.as_str()) {
            return Err(ApiError::bad(k, format!("unsupported parameter {k:?}")));
        }
    }
    // Parameters accepted only at their neutral value.
    for (k, neutral) in [("presence_penalty", 0.0), ("frequency_penalty", 0.0)] {
        if let Some(x) = field(&v, k) {
            if x.as_f64() != Some(neutral) {
                return Err(ApiError::bad(
                    k,
                    format!("{k} is not supported (only {neutral})"),
                ));
            }
        }
    }
    if let Some(x) = field(&v, "logit_bias") {
        if x.as_object().is_none_or(|m| !m.is_empty()) {
            return Err(ApiError::bad("logit_bias", "logit_bias is not supported"));
        }
    }
    if let Some(x) = field(&v, "echo") {
        if x != &Value::Bool(false) {
            return Err(ApiError::bad("echo", "echo is not supported"));
        }
    }
    if let Some(x) = field(&v, "best_of") {
        if x.as_u64() != Some(1) {
            return Err(ApiError::bad("best_of", "best_of must be 1"));
        }
    }
    if let Some(x) = field(&v, "suffix") {
        return Err(ApiError::bad(
            "suffix",
            format!("suffix is not supported, got {x}"),
        ));
    }
    match field(&v, "model") {
        None => return Err(ApiError::bad("model", "model is required")),
        Some(Value::String(m)) if *m == st.model => {}
        Some(Value::String(m)) => {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "The model `{m}` does not exist; this server serves `{}`.",
                    st.model
                ),
                kind: "NotFoundError",
                param: Some("model".into()),
                code: Some("model_not_found"),
            })
        }
        Some(x) => {
            return Err(ApiError::bad(
                "model",
                format!("model must be a string, got {x}"),
            ))
        }
    }
    if let Some(n) = uint(&v, "n", u64::MAX)? {
        if n != 1 {
            return Err(ApiError::bad("n", format!("n must be 1, got {n}")));
        }
    }
    let (prompt, prompt_param) = match kind {
        Kind::Completion => (prompt_of(st, &v)?, "prompt"),
        Kind::Chat => (chat_prompt_of(st, &v)?, "messages"),
    };
    if prompt.is_empty() {
        return Err(ApiError::bad(
            prompt_param,
            format!("{prompt_param} is empty"),
        ));
    }
    let room = st.max_model_len.saturating_sub(prompt.len());
    if room == 0 {
        return Err(ApiError::bad(
            prompt_param,
            format!(
                "This model's maximum context length is {} tokens. However, your {prompt_param} has {} tokens.",
                st.max_model_len,
                prompt.len()
            ),
        ));
    }
    let max_param = if field(&v, "max_completion_tokens").is_some() {
        "max_completion_tokens"
    } else {
        "max_tokens"
    };
    let max_tokens = match uint(&v, max_param, u32::MAX as u64)? {
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
    if prompt.len() + max_tokens > st.max_model_len {
        return Err(ApiError::bad(
            max_param,
            format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the {prompt_param}, {max_tokens} in the completion).",
                st.max_model_len,
                prompt.len() + max_tokens,
                prompt.len()
            ),
        ));
    }
    let temperature = number(&v, "temperature", 0.0, 2.0)?.unwrap_or(1.0) as f32;
    let top_p = number(&v, "top_p", 0.0, 1.0)?.unwrap_or(1.0) as f32;
    if field(&v, "top_p").is_some() && top_p <= 0.0 {
        return Err(ApiError::bad("top_p", "top_p must be greater than 0"));
    }
    let seed = match field(&v, "seed") {
        None => now_nanos_seed(),
        Some(x) => x
            .as_i64()
            .map(|s| s as u64)
            .ok_or_else(|| ApiError::bad("seed", format!("seed must be an integer, got {x}")))?,
    };
    let stop = match field(&v, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(|x| x.is_string()) => a
            .iter()
            .map(|x| x.as_str().unwrap_or_default().to_string())
            .collect(),
        Some(x) => {
            return Err(ApiError::bad(
                "stop",
                format!("stop must be a string or a list of up to 4 strings, got {x}"),
            ))
        }
    };
    let stream = boolean(&v, "stream")?;
    let include_usage = match field(&v, "stream_options") {
        None => false,
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
            boolean(o, "include_usage").map_err(|_| {
                ApiError::bad("stream_options", "include_usage must be true or false")
            })?
        }
        Some(x) => {
            return Err(ApiError::bad(
                "stream_options",
                format!("stream_options must be an object, got {x}"),
            ))
        }
    };
    let (logprobs, top_logprobs) = match kind {
        Kind::Completion => match uint(&v, "logprobs", 20)? {
            None => (false, 0),
            Some(n) => (true, n as usize),
        },
        Kind::Chat => {
            let on = boolean(&v, "logprobs")?;
            let top = uint(&v, "top_logprobs", 20)?;
            if top.is_some() && !on {
                return Err(ApiError::bad(
                    "top_logprobs",
                    "top_logprobs needs logprobs: true",
                ));
            }
            (on, top.unwrap_or(0) as usize)
        }
    };
    let ignore_eos = boolean(&v, "ignore_eos")?;
    let ids_as_tokens = boolean(&v, "return_tokens_as_token_ids")?;
    Ok(Parsed {
        ignore_eos,
        ids_as_tokens,
        prompt,
        max_tokens,
        sampling: Sampling {
            temperature,
            top_p,
            seed,
            top_logprobs,
        },
        stop,
        stream,
        include_usage,
        logprobs,
    })
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

/// What one request turned into, as it goes.
#[derive(Debug)]
struct Progress {
    detok: Detokenizer,
    tokens: Vec<Token>,
    finish: Option<&'static str>,
    start: Instant,
    first: Option<Instant>,
}

fn finish_name(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

impl Progress {
    /// Takes one token; returns the new text.
    fn push(&mut self, st: &AppState, t: Token) -> String {
        if self.first.is_none() {
            let now = Instant::now();
            self.first = Some(now);
            st.metrics.ttft.observe((now - self.start).as_secs_f64());
        }
        let is_eos = t.finish == Some(Finish::Stop) && st.tokenizer.eos_id() == Some(t.token);
        let mut text = if is_eos {
            String::new()
        } else {
            self.detok.push(&st.tokenizer, t.token)
        };
        if self.detok.stopped() {
            self.finish = Some("stop");
        } else if let Some(f) = t.finish {
            self.finish = Some(finish_name(f));
        }
        if self.finish.is_some() {
            text.push_str(&self.detok.finish(&st.tokenizer));
        }
        self.tokens.push(t);
        text
    }

    fn record(&self, st: &AppState) {
        let e2e = self.start.elapsed().as_secs_f64();
        st.metrics.e2e.observe(e2e);
        if let (Some(first), n) = (self.first, self.tokens.len()) {
            if n > 1 {
                let ttft = (first - self.start).as_secs_f64();
                st.metrics.tpot.observe((e2e - ttft) / (n - 1) as f64);
            }
        }
        if let Some(f) = self.finish {
            st.metrics.success.with_label_values(&[f]).inc();
        }
    }
}

fn token_text(st: &AppState, id: u32, ids: bool) -> String {
    if ids {
        format!("token_id:{id}")
    } else {
        st.tokenizer.decode(&[id])
    }
}

/// Chat logprobs of some tokens: `{"content": [...]}` entries.
fn chat_logprobs(st: &AppState, toks: &[Token], ids: bool) -> Value {
    let entry = |id: u32, lp: f32| {
        let text = token_text(st, id, ids);
        json!({"token": text, "logprob": lp, "bytes": text.as_bytes()})
    };
    Value::Array(
        toks.iter()
            .map(|t| {
                let mut e = entry(t.token, t.logprob);
                e["top_logprobs"] = Value::Array(t.top.iter().map(|&(i, l)| entry(i, l)).collect());
                e
            })
            .collect(),
    )
}

/// Completion logprobs: `{tokens, token_logprobs, top_logprobs, text_offset}`.
fn completion_logprobs(st: &AppState, toks: &[Token], offset0: usize, ids: bool) -> Value {
    let mut offset = offset0;
    let mut tokens = Vec::new();
    let mut lps = Vec::new();
    let mut tops = Vec::new();
    let mut offsets = Vec::new();
    for t in toks {
        let text = token_text(st, t.token, ids);
        offsets.push(offset);
        offset += text.len();
        tokens.push(text);
        lps.push(t.logprob);
        let mut m = Map::new();
        for &(i, l) in &t.top {
            m.insert(token_text(st, i, ids), json!(l));
        }
        tops.push(Value::Object(m));
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

fn refused(r: Refused) -> ApiError {
    match r {
        Refused::QueueFull(q) => ApiError::status(
            429,
            format!("the server is at capacity: {q} requests are already waiting; retry later"),
        ),
        Refused::Unavailable(why) => ApiError::status(503, why),
    }
}

async fn completions(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    serve(st, body, Kind::Completion).await
}

async fn chat_completions(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    serve(st, body, Kind::Chat).await
}

async fn serve(st: Arc<AppState>, body: Bytes, kind: Kind) -> Response {
    let start = Instant::now();
    let p = match parse(&st, &body, kind) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let request = Request {
        prompt: p.prompt.clone(),
        max_new: p.max_tokens,
        stop: if p.ignore_eos {
            Vec::new()
        } else {
            st.tokenizer.eos_id().into_iter().collect()
        },
        sampling: p.sampling,
    };
    let (id, rx) = match st.engine.submit(request) {
        Ok(x) => x,
        Err(r) => return refused(r).into_response(),
    };
    let progress = Progress {
        detok: Detokenizer::new(p.stop.clone()),
        tokens: Vec::new(),
        finish: None,
        start,
        first: None,
    };
    let rid = match kind {
        Kind::Completion => format!("cmpl-{id}-{}", now_s()),
        Kind::Chat => format!("chatcmpl-{id}-{}", now_s()),
    };
    if p.stream {
        let (tx, out) = unbounded_channel();
        tokio::spawn(stream_task(st.clone(), p, kind, id, rid, rx, progress, tx));
        Sse::new(UnboundedReceiverStream::new(out)).into_response()
    } else {
        whole(st, p, kind, id, rid, rx, progress).await
    }
}

/// A non-streamed response: waits for the whole completion.
async fn whole(
    st: Arc<AppState>,
    p: Parsed,
    kind: Kind,
    id: u64,
    rid: String,
    mut rx: UnboundedReceiver<SeqEvent>,
    mut pr: Progress,
) -> Response {
    // Cancel the sequence if this future is dropped (the client left).
    let guard = CancelOnDrop {
        engine: st.engine.clone(),
        id,
        armed: true,
    };
    while pr.finish.is_none() {
        match rx.recv().await {
            Some(SeqEvent::Token(t)) => {
                pr.push(&st, t);
            }
            Some(SeqEvent::Error(status, why)) => {
                return ApiError::status(status, why).into_response()
            }
            None => return ApiError::status(503, "the engine stopped").into_response(),
        }
    }
    drop(guard.disarm_if(pr.finish.is_some() && !pr.detok.stopped()));
    pr.record(&st);
    let text = pr.detok.text().to_string();
    let usage = json!({
        "prompt_tokens": p.prompt.len(),
        "completion_tokens": pr.tokens.len(),
        "total_tokens": p.prompt.len() + pr.tokens.len(),
    });
    let finish = pr.finish.unwrap_or("length");
    let body = match kind {
        Kind::Completion => json!({
            "id": rid, "object": "text_completion", "created": now_s(), "model": st.model,
            "choices": [{
                "index": 0, "text": text, "finish_reason": finish,
                "logprobs": if p.logprobs { completion_logprobs(&st, &pr.tokens, 0, p.ids_as_tokens) } else { Value::Null },
            }],
            "usage": usage,
        }),
        Kind::Chat => json!({
            "id": rid, "object": "chat.completion", "created": now_s(), "model": st.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": if p.logprobs { json!({"content": chat_logprobs(&st, &pr.tokens, p.ids_as_tokens)}) } else { Value::Null },
            }],
            "usage": usage,
        }),
    };
    Json(body).into_response()
}

/// Cancels a sequence in the engine when dropped while armed.
struct CancelOnDrop {
    engine: EngineHandle,
    id: u64,
    armed: bool,
}

impl CancelOnDrop {
    /// Keeps the cancel armed unless `finished` (the engine already let the
    /// sequence go); a stop string ends it early, which needs the cancel.
    fn disarm_if(mut self, finished: bool) -> Self {
        if finished {
            self.armed = false;
        }
        self
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.engine.cancel(self.id);
        }
    }
}

fn sse(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

/// A streamed response: one chunk per token, the finish reason on the last
/// content chunk, the usage chunk if asked, then `[DONE]`. If the client
/// goes away, sending fails and the sequence is cancelled.
#[allow(clippy::too_many_arguments)]
async fn stream_task(
    st: Arc<AppState>,
    p: Parsed,
    kind: Kind,
    id: u64,
    rid: String,
    mut rx: UnboundedReceiver<SeqEvent>,
    mut pr: Progress,
    tx: UnboundedSender<Result<Event, Infallible>>,
) {
    let guard = CancelOnDrop {
        engine: st.engine.clone(),
        id,
        armed: true,
    };
    let created = now_s();
    let chunk = |choice: Value| -> Value {
        match kind {
            Kind::Completion => {
                json!({"id": rid, "object": "text_completion", "created": created, "model": st.model, "choices": [choice]})
            }
            Kind::Chat => {
                json!({"id": rid, "object": "chat.completion.chunk", "created": created, "model": st.model, "choices": [choice]})
            }
        }
    };
    if kind == Kind::Chat {
        let first = chunk(
            json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}),
        );
        if tx.send(sse(&first)).is_err() {
            return;
        }
    }
    let mut offset = 0;
    while pr.finish.is_none() {
        let ev = match rx.recv().await {
            Some(ev) => ev,
            None => SeqEvent::Error(503, "the engine stopped".into()),
        };
        let t = match ev {
            SeqEvent::Token(t) => t,
            SeqEvent::Error(status, why) => {
                let e = ApiError::status(status, why);
                let _ = tx.send(sse(&e.body()));
                let _ = tx.send(Ok(Event::default().data("[DONE]")));
                return;
            }
        };
        let tok = t.clone();
        let text = pr.push(&st, t);
        let finish = pr.finish;
        let c = match kind {
            Kind::Completion => chunk(json!({
                "index": 0, "text": text, "finish_reason": finish,
                "logprobs": if p.logprobs { completion_logprobs(&st, std::slice::from_ref(&tok), offset, p.ids_as_tokens) } else { Value::Null },
            })),
            Kind::Chat => chunk(json!({
                "index": 0,
                "delta": if text.is_empty() && finish.is_some() { json!({}) } else { json!({"content": text}) },
                "finish_reason": finish,
                "logprobs": if p.logprobs { json!({"content": chat_logprobs(&st, std::slice::from_ref(&tok), p.ids_as_tokens)}) } else { Value::Null },
            })),
        };
        offset += text.len();
        if tx.send(sse(&c)).is_err() {
            return; // the client left: the guard cancels the sequence
        }
    }
    let _guard = guard.disarm_if(!pr.detok.stopped());
    pr.record(&st);
    if p.include_usage {
        let mut u = chunk(Value::Null);
        u["choices"] = json!([]);
        u["usage"] = json!({
            "prompt_tokens": p.prompt.len(),
            "completion_tokens": pr.tokens.len(),
            "total_tokens": p.prompt.len() + pr.tokens.len(),
        });
        let _ = tx.send(sse(&u));
    }
    let _ = tx.send(Ok(Event::default().data("[DONE]")));
}
