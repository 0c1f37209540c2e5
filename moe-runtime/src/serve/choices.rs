//! A checked request ([`Parsed`]) run as its choices, and OpenAI's
//! response written from them, whole or streamed.
//!
//! Each prompt gets `best_of` choices (`n` unless `best_of` says more),
//! each its own sequence in the engine: choice `j` samples with `seed + j`
//! (as vLLM seeds its parallel samples), so choices differ when sampling
//! and are identical when greedy. Choice `index` is `prompt * n + j`; with
//! `best_of > n` the `n` with the highest cumulative log-probability are
//! returned, best first. `echo` puts the prompt's text (and, with
//! `logprobs`, its tokens' log-probabilities, the first one `null`) before
//! the completion's; `max_tokens: 0` with `echo` scores the prompt and
//! generates nothing.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::api::{FinishReason, GenerateRequest, GeneratedToken, PromptToken, RequestId};
use super::engine::{EngineHandle, Refused, SeqEvent};
use super::http::{now_s, ApiError, AppState};
use super::request::{Kind, Parsed};
use super::tokenizer::{DetokenizeOptions, Detokenizer};

/// Runs `p` and answers: the whole response, or a stream of events.
pub(super) async fn respond(st: Arc<AppState>, p: Parsed, kind: Kind, start: Instant) -> Response {
    let choices = match submit_all(&st, &p, start) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let id = choices.first().map_or(0, |c| c.id);
    let framing = Framing {
        rid: match kind {
            Kind::Completion => format!("cmpl-{id}-{}", now_s()),
            Kind::Chat => format!("chatcmpl-{id}-{}", now_s()),
        },
        created: now_s(),
        model: st.model.clone(),
        kind,
    };
    if p.stream {
        let (tx, out) = unbounded_channel();
        tokio::spawn(stream_all(st, Arc::new(p), Arc::new(framing), choices, tx));
        Sse::new(UnboundedReceiverStream::new(out)).into_response()
    } else {
        match whole(&st, &p, &framing, choices).await {
            Ok(body) => Json(body).into_response(),
            Err(e) => e.into_response(),
        }
    }
}

/// One choice in the engine.
struct Choice {
    id: RequestId,
    /// Which prompt it continues.
    prompt: usize,
    rx: UnboundedReceiver<SeqEvent>,
    guard: CancelOnDrop,
    progress: Progress,
}

/// Submits every choice of every prompt; a refusal cancels those already
/// in (their guards drop).
fn submit_all(st: &AppState, p: &Parsed, start: Instant) -> Result<Vec<Choice>, ApiError> {
    let scoring = p.max_tokens == 0;
    let mut stop_tokens: Vec<u32> = if p.ignore_eos || scoring {
        Vec::new()
    } else {
        st.tokenizer.eos_id().into_iter().collect()
    };
    if !scoring {
        stop_tokens.extend(&p.stop_token_ids);
    }
    let mut choices = Vec::with_capacity(p.prompts.len() * p.best_of);
    for (i, prompt) in p.prompts.iter().enumerate() {
        for j in 0..p.best_of {
            let request = GenerateRequest {
                prompt: prompt.clone(),
                // Scoring runs the prompt and one token it throws away.
                max_tokens: p.max_tokens.max(1),
                stop_tokens: stop_tokens.clone(),
                sampling: super::api::SamplingParams {
                    seed: p.sampling.seed.wrapping_add(j as u64),
                    ..p.sampling
                },
                prompt_logprobs: p.engine_prompt_logprobs(),
            };
            let (id, rx) = st.engine.submit(request).map_err(refused)?;
            choices.push(Choice {
                id,
                prompt: i,
                rx,
                guard: CancelOnDrop {
                    engine: st.engine.clone(),
                    id,
                    armed: true,
                },
                progress: Progress::new(p, start),
            });
        }
    }
    Ok(choices)
}

pub(super) fn refused(r: Refused) -> ApiError {
    match r {
        Refused::QueueFull(q) => ApiError::status(
            429,
            format!("the server is at capacity: {q} requests are already waiting; retry later"),
        ),
        Refused::Unavailable(why) => ApiError::status(503, why),
    }
}

/// Cancels a sequence in the engine when dropped while armed.
struct CancelOnDrop {
    engine: EngineHandle,
    id: RequestId,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.engine.cancel(self.id);
        }
    }
}

/// What one choice turned into, as it goes.
#[derive(Debug)]
struct Progress {
    detok: Detokenizer,
    /// Generated tokens (none when scoring).
    tokens: Vec<GeneratedToken>,
    prompt_lps: Vec<PromptToken>,
    finish: Option<&'static str>,
    /// vLLM's `stop_reason`: the stop string or stop token id that ended
    /// the choice (`null` for end of sequence and length).
    stop_reason: Value,
    include_stop: bool,
    scoring: bool,
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
    fn new(p: &Parsed, start: Instant) -> Self {
        let opts = DetokenizeOptions {
            skip_special: p.skip_special_tokens,
            include_stop: p.include_stop_str_in_output,
            min_tokens: p.sampling.min_tokens as usize,
        };
        Self {
            detok: Detokenizer::with(p.stop.clone(), opts),
            tokens: Vec::new(),
            prompt_lps: Vec::new(),
            finish: None,
            stop_reason: Value::Null,
            include_stop: p.include_stop_str_in_output,
            scoring: p.max_tokens == 0,
            start,
            first: None,
        }
    }

    /// Takes one event; returns the new text, or the error that ends the
    /// choice.
    fn take(&mut self, st: &AppState, ev: Option<SeqEvent>) -> Result<String, ApiError> {
        match ev {
            Some(SeqEvent::Prompt(pt)) => {
                self.prompt_lps.push(pt);
                Ok(String::new())
            }
            Some(SeqEvent::Token(t)) => Ok(self.push(st, t)),
            Some(SeqEvent::Error(status, why)) => Err(ApiError::status(status, why)),
            None => Err(ApiError::status(503, "the engine stopped")),
        }
    }

    fn push(&mut self, st: &AppState, t: GeneratedToken) -> String {
        if self.first.is_none() {
            let now = Instant::now();
            self.first = Some(now);
            st.metrics.ttft.observe((now - self.start).as_secs_f64());
        }
        if self.scoring {
            self.finish = Some("length");
            return String::new();
        }
        // A stop token (end of sequence or one of `stop_token_ids`) stays
        // out of the text unless asked for.
        let stop_token = t.finish == Some(FinishReason::Stop);
        let mut text = if stop_token && !self.include_stop {
            String::new()
        } else {
            self.detok.push(&st.tokenizer, t.token)
        };
        if let Some(s) = self.detok.stop_string() {
            self.finish = Some("stop");
            self.stop_reason = json!(s);
        } else if let Some(f) = t.finish {
            self.finish = Some(finish_name(f));
            if stop_token && st.tokenizer.eos_id() != Some(t.token) {
                self.stop_reason = json!(t.token);
            }
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

    /// Sum of the generated tokens' log-probabilities (`best_of` ranks by it).
    fn cumulative_logprob(&self) -> f64 {
        self.tokens.iter().map(|t| f64::from(t.logprob)).sum()
    }
}

impl Choice {
    /// Waits for the choice to end; a stop string ends it here, so the
    /// engine is told to drop it (the guard stays armed).
    async fn run(mut self, st: &AppState) -> Result<(usize, Progress), ApiError> {
        while self.progress.finish.is_none() {
            let ev = self.rx.recv().await;
            self.progress.take(st, ev)?;
        }
        self.finish(st);
        Ok((self.prompt, self.progress))
    }

    fn finish(&mut self, st: &AppState) {
        // The engine let the sequence go when it finished by itself.
        if !self.progress.detok.stopped() {
            self.guard.armed = false;
        }
        self.progress.record(st);
    }
}

/// How a response's chunks and bodies are framed.
#[derive(Debug)]
struct Framing {
    rid: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Framing {
    fn chunk(&self, choice: Value) -> Value {
        let object = match self.kind {
            Kind::Completion => "text_completion",
            Kind::Chat => "chat.completion.chunk",
        };
        json!({"id": self.rid, "object": object, "created": self.created, "model": self.model, "choices": [choice]})
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
    let content = toks
        .iter()
        .map(|t| {
            let mut e = entry(t.token, t.logprob);
            e["top_logprobs"] = Value::Array(t.top.iter().map(|&(i, l)| entry(i, l)).collect());
            e
        })
        .collect();
    json!({ "content": Value::Array(content) })
}

/// One position of completion logprobs: the token, its log-probability and
/// its alternatives (`None` for the prompt's first token).
struct Position<'a> {
    token: u32,
    scored: Option<(f32, &'a [(u32, f32)])>,
}

/// Completion logprobs: `{tokens, token_logprobs, top_logprobs,
/// text_offset}` over `positions`, offsets from `offset0`.
fn completion_logprobs(st: &AppState, positions: &[Position], offset0: usize, ids: bool) -> Value {
    let mut offset = offset0;
    let (mut tokens, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for pos in positions {
        let text = token_text(st, pos.token, ids);
        offsets.push(offset);
        offset += text.len();
        tokens.push(text);
        match pos.scored {
            None => {
                lps.push(Value::Null);
                tops.push(Value::Null);
            }
            Some((lp, top)) => {
                lps.push(json!(lp));
                let mut m = Map::new();
                for &(i, l) in top {
                    m.insert(token_text(st, i, ids), json!(l));
                }
                tops.push(Value::Object(m));
            }
        }
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// The echoed prompt's positions: its first token unscored, then each
/// token with its log-probability and `k` alternatives (the token itself
/// first when it is not among them, as vLLM reports it).
fn prompt_positions<'a>(
    prompt: &[u32],
    lps: &'a [PromptToken],
    k: usize,
    with_self: &'a mut Vec<Vec<(u32, f32)>>,
) -> Vec<Position<'a>> {
    with_self.clear();
    for pt in lps {
        let mut top: Vec<(u32, f32)> = pt.top.iter().take(k).copied().collect();
        if !top.iter().any(|&(i, _)| i == pt.token) {
            top.insert(0, (pt.token, pt.logprob));
        }
        with_self.push(top);
    }
    let mut out = vec![Position {
        token: prompt[0],
        scored: None,
    }];
    out.extend(lps.iter().zip(with_self.iter()).map(|(pt, top)| Position {
        token: pt.token,
        scored: Some((pt.logprob, top.as_slice())),
    }));
    out
}

fn generated_positions(toks: &[GeneratedToken]) -> impl Iterator<Item = Position<'_>> {
    toks.iter().map(|t| Position {
        token: t.token,
        scored: Some((t.logprob, t.top.as_slice())),
    })
}

/// vLLM's `prompt_logprobs`: `null` for the first token, then per token a
/// map from token id to `{logprob, rank, decoded_token}` (the token itself
/// and its `k` most likely alternatives).
fn vllm_prompt_logprobs(st: &AppState, lps: &[PromptToken], k: usize) -> Value {
    let mut out = vec![Value::Null];
    for pt in lps {
        let mut m = Map::new();
        m.insert(
            pt.token.to_string(),
            json!({"logprob": pt.logprob, "rank": pt.rank, "decoded_token": st.tokenizer.decode(&[pt.token])}),
        );
        for (r, &(i, l)) in pt.top.iter().take(k).enumerate() {
            m.entry(i.to_string()).or_insert_with(
                || json!({"logprob": l, "rank": r + 1, "decoded_token": st.tokenizer.decode(&[i])}),
            );
        }
        out.push(Value::Object(m));
    }
    Value::Array(out)
}

/// The whole response: every choice run to its end, `best_of` applied.
async fn whole(
    st: &AppState,
    p: &Parsed,
    framing: &Framing,
    choices: Vec<Choice>,
) -> Result<Value, ApiError> {
    // Their tokens queue in their channels meanwhile, so one after another
    // is as fast as all at once.
    let mut done: Vec<(usize, Progress)> = Vec::with_capacity(choices.len());
    for c in choices {
        done.push(c.run(st).await?);
    }
    let mut out = Vec::with_capacity(p.prompts.len() * p.n);
    for (i, group) in done.chunks_mut(p.best_of).enumerate() {
        if p.best_of > p.n {
            group.sort_by(|a, b| {
                b.1.cumulative_logprob()
                    .total_cmp(&a.1.cumulative_logprob())
            });
        }
        for (j, (prompt, pr)) in group.iter().take(p.n).enumerate() {
            out.push(choice_body(
                st,
                p,
                framing.kind,
                i * p.n + j,
                &p.prompts[*prompt],
                pr,
            ));
        }
    }
    let completion: usize = done.iter().map(|(_, pr)| pr.tokens.len()).sum();
    let prompt_tokens: usize = p.prompts.iter().map(Vec::len).sum();
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    });
    let object = match framing.kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion",
    };
    let mut body = json!({
        "id": framing.rid, "object": object, "created": framing.created, "model": framing.model,
        "choices": out, "usage": usage,
    });
    if framing.kind == Kind::Chat {
        if let (Some(k), Some((_, pr))) = (p.prompt_logprobs, done.first()) {
            body["prompt_logprobs"] = vllm_prompt_logprobs(st, &pr.prompt_lps, k);
        }
    }
    Ok(body)
}

/// One choice of a whole response.
fn choice_body(
    st: &AppState,
    p: &Parsed,
    kind: Kind,
    index: usize,
    prompt: &[u32],
    pr: &Progress,
) -> Value {
    let text = pr.detok.text();
    let finish = pr.finish.unwrap_or("length");
    match kind {
        Kind::Completion => {
            let echoed = if p.echo {
                st.tokenizer.decode_with(prompt, p.skip_special_tokens)
            } else {
                String::new()
            };
            let logprobs = if p.logprobs {
                let mut tops = Vec::new();
                let mut positions = if p.echo {
                    prompt_positions(prompt, &pr.prompt_lps, p.sampling.top_logprobs, &mut tops)
                } else {
                    Vec::new()
                };
                positions.extend(generated_positions(&pr.tokens));
                completion_logprobs(st, &positions, 0, p.ids_as_tokens)
            } else {
                Value::Null
            };
            json!({
                "index": index, "text": echoed + text, "logprobs": logprobs,
                "finish_reason": finish, "stop_reason": pr.stop_reason,
                "prompt_logprobs": p.prompt_logprobs.map(|k| vllm_prompt_logprobs(st, &pr.prompt_lps, k)),
            })
        }
        Kind::Chat => json!({
            "index": index,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish, "stop_reason": pr.stop_reason,
            "logprobs": if p.logprobs { chat_logprobs(st, &pr.tokens, p.ids_as_tokens) } else { Value::Null },
        }),
    }
}

fn sse(v: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().data(v.to_string()))
}

/// A streamed response: every choice's chunks as they come (each naming
/// its `index`), the usage chunk if asked, then `[DONE]`. If the client
/// goes away, sending fails and the choices are cancelled.
async fn stream_all(
    st: Arc<AppState>,
    p: Arc<Parsed>,
    framing: Arc<Framing>,
    choices: Vec<Choice>,
    tx: UnboundedSender<Result<Event, Infallible>>,
) {
    let tasks: Vec<_> = choices
        .into_iter()
        .enumerate()
        .map(|(index, c)| {
            let (st, p, framing, tx) = (st.clone(), p.clone(), framing.clone(), tx.clone());
            tokio::spawn(async move { stream_choice(&st, &p, &framing, index, c, &tx).await })
        })
        .collect();
    let mut completion = Some(0);
    for t in tasks {
        completion = match (completion, t.await) {
            (Some(sum), Ok(Some(n))) => Some(sum + n),
            _ => None,
        };
    }
    if let (true, Some(completion)) = (p.include_usage, completion) {
        let prompt_tokens: usize = p.prompts.iter().map(Vec::len).sum();
        let mut u = framing.chunk(Value::Null);
        u["choices"] = json!([]);
        u["usage"] = json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        });
        let _ = tx.send(sse(&u));
    }
    let _ = tx.send(Ok(Event::default().data("[DONE]")));
}

/// One choice's chunks; returns its token count, or `None` when it ended
/// in an error (sent as an error event) or the client left.
async fn stream_choice(
    st: &AppState,
    p: &Parsed,
    framing: &Framing,
    index: usize,
    mut c: Choice,
    tx: &UnboundedSender<Result<Event, Infallible>>,
) -> Option<usize> {
    let send = |v: Value| tx.send(sse(&framing.chunk(v))).is_ok();
    // Chat's role chunk goes out with the first token, as vLLM sends it:
    // clients (vLLM's benchmark among them) take the first chunk as the
    // first token's arrival.
    let mut role_pending = framing.kind == Kind::Chat;
    // The echoed prompt goes out with the first token, when its
    // log-probabilities (which come before it) are all in.
    let mut echo_pending = p.echo;
    let mut offset = 0;
    while c.progress.finish.is_none() {
        let ev = c.rx.recv().await;
        let is_token = matches!(ev, Some(SeqEvent::Token(_)));
        let text = match c.progress.take(st, ev) {
            Ok(text) => text,
            Err(e) => {
                let _ = tx.send(sse(&e.body()));
                return None;
            }
        };
        if !is_token {
            continue;
        }
        if role_pending {
            role_pending = false;
            let role = json!({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
            if !send(role) {
                return None;
            }
        }
        if echo_pending {
            echo_pending = false;
            let prompt = &p.prompts[c.prompt];
            let echoed = st.tokenizer.decode_with(prompt, p.skip_special_tokens);
            let logprobs = if p.logprobs {
                let mut tops = Vec::new();
                let positions = prompt_positions(
                    prompt,
                    &c.progress.prompt_lps,
                    p.sampling.top_logprobs,
                    &mut tops,
                );
                completion_logprobs(st, &positions, 0, p.ids_as_tokens)
            } else {
                Value::Null
            };
            offset = echoed.len();
            if !send(
                json!({"index": index, "text": echoed, "logprobs": logprobs, "finish_reason": null}),
            ) {
                return None;
            }
        }
        let finish = c.progress.finish;
        let stop_reason = if finish.is_some() {
            c.progress.stop_reason.clone()
        } else {
            Value::Null
        };
        let toks = &c.progress.tokens;
        let new = &toks[toks.len().saturating_sub(1)..];
        let chunk = match framing.kind {
            Kind::Completion => json!({
                "index": index, "text": text, "finish_reason": finish, "stop_reason": stop_reason,
                "logprobs": if p.logprobs {
                    let positions: Vec<Position> = generated_positions(new).collect();
                    completion_logprobs(st, &positions, offset, p.ids_as_tokens)
                } else { Value::Null },
            }),
            Kind::Chat => json!({
                "index": index,
                "delta": if text.is_empty() && finish.is_some() { json!({}) } else { json!({"content": text}) },
                "finish_reason": finish, "stop_reason": stop_reason,
                "logprobs": if p.logprobs { chat_logprobs(st, new, p.ids_as_tokens) } else { Value::Null },
            }),
        };
        offset += text.len();
        if !send(chunk) {
            return None; // the client left: the guard cancels the choice
        }
    }
    c.finish(st);
    Some(c.progress.tokens.len())
}
