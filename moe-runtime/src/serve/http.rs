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

use super::api::{FinishReason, GenerateRequest, GeneratedToken, RequestId};
use super::engine::{EngineHandle, Refused, SeqEvent};
use super::metrics::Metrics;
use super::request::{parse, Kind, Parsed};
use super::tokenizer::{Detokenizer, Tokenizer};

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
    /// 400 naming the parameter at fault.
    pub(super) fn bad(param: &str, message: impl Into<String>) -> Self {
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

/// What one request turned into, as it goes.
#[derive(Debug)]
struct Progress {
    detok: Detokenizer,
    tokens: Vec<GeneratedToken>,
    finish: Option<&'static str>,
    start: Instant,
    first: Option<Instant>,
}

fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

impl Progress {
    /// Takes one token; returns the new text.
    fn push(&mut self, st: &AppState, t: GeneratedToken) -> String {
        if self.first.is_none() {
            let now = Instant::now();
            self.first = Some(now);
            st.metrics.ttft.observe((now - self.start).as_secs_f64());
        }
        let is_eos = t.finish == Some(FinishReason::Stop) && st.tokenizer.eos_id() == Some(t.token);
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
fn chat_logprobs(st: &AppState, toks: &[GeneratedToken], ids: bool) -> Value {
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
fn completion_logprobs(st: &AppState, toks: &[GeneratedToken], offset0: usize, ids: bool) -> Value {
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
    let request = GenerateRequest {
        prompt: p.prompt.clone(),
        max_tokens: p.max_tokens,
        stop_tokens: if p.ignore_eos {
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
    id: RequestId,
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
    id: RequestId,
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
    id: RequestId,
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
