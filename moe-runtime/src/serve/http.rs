//! The OpenAI-compatible HTTP front end (axum): `POST /v1/completions`,
//! `POST /v1/chat/completions` (streamed as server-sent events or not),
//! `GET /v1/models`, `GET /health`, `GET /metrics`. Request and response
//! shapes follow OpenAI's API as vLLM serves it; errors are
//! `{"error": {"message", "type", "param", "code"}}` with 400 (bad
//! request, naming the field), 404 (unknown model), 429 (queue full) or
//! 503 (workers lost, shutting down).

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use super::choices::respond;
use super::engine::{EngineHandle, ServiceState};
use super::metrics::Metrics;
use super::request::{parse, Kind};
use super::tokenizer::Tokenizer;

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
    /// When set, `/v1/*` needs `Authorization: Bearer <key>` (as vLLM's
    /// `--api-key`); `/health` and `/metrics` stay open.
    pub api_key: Option<String>,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key))
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
    pub(super) fn status(status: u16, message: impl Into<String>) -> Self {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Self {
            status,
            message: message.into(),
            kind: match status.as_u16() {
                400 => "invalid_request_error",
                401 => "authentication_error",
                429 => "rate_limit_exceeded",
                _ => "service_unavailable",
            },
            param: None,
            code: None,
        }
    }
    pub(super) fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// Refuses a `/v1` request without the server's key (401 in OpenAI's
/// error shape). The comparison takes the same time wherever the given
/// key first differs.
async fn require_key(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
            let e = ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: "Unauthorized: pass the server's API key as `Authorization: Bearer <key>`"
                    .into(),
                kind: "authentication_error",
                param: None,
                code: Some("invalid_api_key"),
            };
            return e.into_response();
        }
    }
    next.run(req).await
}

pub(super) fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [
        {"id": st.model, "object": "model", "created": st.created, "owned_by": "m2n", "max_model_len": st.max_model_len}
    ]}))
}

/// 200 `{"status": "whole"}` when every worker is in the group; 200
/// `{"status": "degraded", "reason"}` while a lost worker is replaced (requests
/// wait, none is lost); 503 in the OpenAI error shape when it cannot serve.
async fn health(State(st): State<Arc<AppState>>) -> Response {
    match st.engine.shared.state() {
        ServiceState::Whole => {
            (StatusCode::OK, Json(serde_json::json!({"status": "whole"}))).into_response()
        }
        ServiceState::Degraded(why) => (
            StatusCode::OK,
            Json(serde_json::json!({"status": "degraded", "reason": why})),
        )
            .into_response(),
        ServiceState::Down(why) => ApiError::status(503, format!("down: {why}")).into_response(),
    }
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

async fn completions(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    serve(st, body, Kind::Completion).await
}

async fn chat_completions(State(st): State<Arc<AppState>>, body: Bytes) -> Response {
    serve(st, body, Kind::Chat).await
}

async fn serve(st: Arc<AppState>, body: Bytes, kind: Kind) -> Response {
    let start = Instant::now();
    match parse(&st, &body, kind) {
        Ok(p) => respond(st, p, kind, start).await,
        Err(e) => e.into_response(),
    }
}
