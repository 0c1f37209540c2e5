//! The engine: continuous batching over the attention workers.
//!
//! One thread owns the control connections ([`super::control`]) and every
//! scheduling decision; HTTP handlers talk to it through [`EngineHandle`]
//! (a channel in, one event stream per request out), so nothing on the
//! m2n path takes a lock shared with the HTTP side. The handle speaks the
//! server's types ([`super::api`]); the engine converts them to and from
//! the attention worker's in one place (`to_worker`, `from_worker`).
//!
//! Each loop: take new requests and cancellations; drop sequences whose
//! client went away; admit waiting requests while the batch (`max_batch`
//! sequences) and the KV budget (prompt + max new tokens reserved per
//! sequence) allow, each to the attention worker with the fewest
//! sequences; then, if anything runs, one step of the whole group (every
//! worker steps together; prefill is chunked by the workers, so a long
//! prompt never stalls the running sequences for more than a chunk). A
//! finished sequence leaves at once and frees its reservation.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::api::{FinishReason, GenerateRequest, GeneratedToken, PromptToken, RequestId};
use super::control::{FromWorker, ToWorker};
use super::metrics::Metrics;
use crate::worker::attention::{Finish, PromptLogprob, Request, Sampling, SeqId, Token};

/// Limits of the scheduler.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    pub attention: usize,
    /// Most sequences running at once, over all workers.
    pub max_batch: usize,
    /// Most requests waiting; beyond it, new ones are refused (429).
    pub max_queue: usize,
    /// KV-cache tokens per attention worker.
    pub kv_tokens_per_worker: usize,
    /// Longest a step may take before the group is declared stuck.
    pub step_timeout: Duration,
}

/// What a request's stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum SeqEvent {
    /// A prompt token's log-probability (requests that asked; all of them
    /// come before the first generated token).
    Prompt(PromptToken),
    Token(GeneratedToken),
    /// The request ends with an error (HTTP status, message).
    Error(u16, String),
}

/// Why a request was not taken.
#[derive(Debug, Clone, PartialEq)]
pub enum Refused {
    /// 429: the queue is full.
    QueueFull(usize),
    /// 503: the workers are gone or the server is draining.
    Unavailable(String),
}

enum Cmd {
    Submit {
        id: SeqId,
        request: Request,
        events: UnboundedSender<SeqEvent>,
    },
    Cancel(SeqId),
    Worker(usize, Result<FromWorker, String>),
    Lost(String),
    Drain(Instant),
}

/// State the HTTP side reads without asking the engine.
#[derive(Debug, Default)]
pub struct Shared {
    unhealthy: Mutex<Option<String>>,
    draining: AtomicBool,
    waiting: AtomicUsize,
    running: AtomicUsize,
    next_id: AtomicU64,
    stopped: AtomicBool,
}

impl Shared {
    /// Why the server cannot serve, if it cannot.
    pub fn unhealthy(&self) -> Option<String> {
        self.unhealthy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
    fn set_unhealthy(&self, why: String) {
        let mut u = self.unhealthy.lock().unwrap_or_else(|p| p.into_inner());
        if u.is_none() {
            *u = Some(why);
        }
    }
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }
    /// Whether the engine has finished (after a drain).
    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }
}

/// The HTTP side's handle on the engine.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: Sender<Cmd>,
    pub shared: Arc<Shared>,
    max_queue: usize,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cmd::Submit { id, .. } => write!(f, "Submit({id})"),
            Cmd::Cancel(id) => write!(f, "Cancel({id})"),
            Cmd::Worker(r, m) => write!(f, "Worker({r}, {m:?})"),
            Cmd::Lost(w) => write!(f, "Lost({w})"),
            Cmd::Drain(_) => write!(f, "Drain"),
        }
    }
}

impl EngineHandle {
    /// Queues a request; its tokens come on the returned stream.
    pub fn submit(
        &self,
        request: GenerateRequest,
    ) -> Result<(RequestId, UnboundedReceiver<SeqEvent>), Refused> {
        if let Some(why) = self.shared.unhealthy() {
            return Err(Refused::Unavailable(why));
        }
        if self.shared.draining() {
            return Err(Refused::Unavailable("the server is shutting down".into()));
        }
        let waiting = self.shared.waiting.fetch_add(1, Ordering::Relaxed);
        if waiting >= self.max_queue {
            self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused::QueueFull(self.max_queue));
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (events, rx) = unbounded_channel();
        if self
            .tx
            .send(Cmd::Submit {
                id,
                request: to_worker(request),
                events,
            })
            .is_err()
        {
            self.shared.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused::Unavailable("the engine has stopped".into()));
        }
        Ok((id, rx))
    }

    /// Ends a request (its client left, or a stop string matched).
    pub fn cancel(&self, id: RequestId) {
        let _ = self.tx.send(Cmd::Cancel(id));
    }

    /// Reports a lost worker process (from the process monitor).
    pub fn lost(&self, what: String) {
        let _ = self.tx.send(Cmd::Lost(what));
    }

    /// Stops taking requests; running ones get until `deadline`, then the
    /// workers shut down and the engine ends.
    pub fn drain(&self, deadline: Instant) {
        self.shared.draining.store(true, Ordering::Relaxed);
        let _ = self.tx.send(Cmd::Drain(deadline));
    }
}

// The one place the server's types meet the attention worker's: a
// request becomes the worker's `Request` when it is submitted (its id is
// its sequence's id), and each of its tokens comes back as a
// `GeneratedToken`.

/// The worker's form of a request.
fn to_worker(r: GenerateRequest) -> Request {
    let s = r.sampling;
    Request {
        prompt: r.prompt,
        max_new: r.max_tokens,
        stop: r.stop_tokens,
        sampling: Sampling {
            temperature: s.temperature,
            top_p: s.top_p,
            seed: s.seed,
            top_logprobs: s.top_logprobs,
            top_k: s.top_k,
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            min_tokens: s.min_tokens,
        },
        prompt_logprobs: r.prompt_logprobs,
    }
}

/// The server's form of a prompt token's log-probability.
fn prompt_from_worker(p: PromptLogprob) -> PromptToken {
    PromptToken {
        pos: p.pos,
        token: p.token,
        logprob: p.logprob,
        rank: p.rank,
        top: p.top,
    }
}

/// The server's form of a token the workers made (its sequence's id is
/// already known to whoever receives it).
fn from_worker(t: Token) -> GeneratedToken {
    GeneratedToken {
        token: t.token,
        logprob: t.logprob,
        top: t.top,
        finish: t.finish.map(|f| match f {
            Finish::Stop => FinishReason::Stop,
            Finish::Length => FinishReason::Length,
        }),
    }
}

struct Waiting {
    id: SeqId,
    request: Request,
    events: UnboundedSender<SeqEvent>,
}

struct Running {
    rank: usize,
    events: UnboundedSender<SeqEvent>,
    reserved: usize,
}

/// Accepts the workers' control connections on `listener` (each says
/// hello with its rank), then runs the engine on its own thread.
pub fn start(
    listener: TcpListener,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
    accept_timeout: Duration,
) -> Result<(EngineHandle, std::thread::JoinHandle<()>), String> {
    let (tx, rx) = channel();
    let mut writers: Vec<Option<TcpStream>> = (0..cfg.attention).map(|_| None).collect();
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + accept_timeout;
    while writers.iter().any(Option::is_none) {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(5)))
                    .map_err(|e| e.to_string())?;
                let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
                let mut line = String::new();
                r.read_line(&mut line)
                    .map_err(|e| format!("a worker's hello: {e}"))?;
                let rank = match serde_json::from_str(line.trim_end()) {
                    Ok(FromWorker::Hello { rank }) if rank < cfg.attention => rank,
                    Ok(FromWorker::Error { message }) => return Err(message),
                    _ => return Err(format!("not a worker's hello: {line:?}")),
                };
                if writers[rank].is_some() {
                    return Err(format!("attention {rank} said hello twice"));
                }
                s.set_read_timeout(None).map_err(|e| e.to_string())?;
                s.set_nodelay(true).map_err(|e| e.to_string())?;
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for line in r.lines() {
                        let msg = match line {
                            Ok(l) => serde_json::from_str(&l)
                                .map_err(|e| format!("attention {rank}: bad message {l:?}: {e}")),
                            Err(e) => Err(format!("attention {rank}: control channel: {e}")),
                        };
                        let stop = msg.is_err();
                        if tx.send(Cmd::Worker(rank, msg)).is_err() || stop {
                            return;
                        }
                    }
                    let _ = tx.send(Cmd::Worker(
                        rank,
                        Err(format!("attention {rank} closed its control channel")),
                    ));
                });
                writers[rank] = Some(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<String> = writers
                        .iter()
                        .enumerate()
                        .filter(|(_, w)| w.is_none())
                        .map(|(i, _)| i.to_string())
                        .collect();
                    return Err(format!(
                        "attention workers {} did not connect within {accept_timeout:?}",
                        missing.join(", ")
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    let shared = Arc::new(Shared::default());
    let handle = EngineHandle {
        tx,
        shared: shared.clone(),
        max_queue: cfg.max_queue,
    };
    let engine = Engine {
        cfg,
        rx,
        writers: writers
            .into_iter()
            .map(|w| w.expect("all connected"))
            .collect(),
        shared,
        metrics,
        waiting: VecDeque::new(),
        running: HashMap::new(),
        per_rank: vec![0; cfg.attention],
        kv_used: vec![0; cfg.attention],
        drain: None,
    };
    let thread = std::thread::Builder::new()
        .name("moe-engine".into())
        .spawn(move || engine.run())
        .map_err(|e| e.to_string())?;
    Ok((handle, thread))
}

struct Engine {
    cfg: EngineConfig,
    rx: Receiver<Cmd>,
    writers: Vec<TcpStream>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    waiting: VecDeque<Waiting>,
    running: HashMap<SeqId, Running>,
    per_rank: Vec<usize>,
    kv_used: Vec<usize>,
    drain: Option<Instant>,
}

impl Engine {
    fn run(mut self) {
        loop {
            let busy = !self.running.is_empty();
            let first = if busy {
                self.rx.try_recv().ok()
            } else {
                match self.rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            };
            if let Some(c) = first {
                self.handle(c);
                while let Ok(c) = self.rx.try_recv() {
                    self.handle(c);
                }
            }
            self.drop_abandoned();
            if let Some(why) = self.shared.unhealthy() {
                self.fail_all(503, &why);
                if self.drain.is_some() {
                    break;
                }
                continue;
            }
            self.admit();
            self.publish();
            if !self.running.is_empty() {
                if let Err(why) = self.step() {
                    self.shared.set_unhealthy(why);
                    continue;
                }
            }
            if let Some(deadline) = self.drain {
                let idle = self.running.is_empty() && self.waiting.is_empty();
                if idle || Instant::now() >= deadline {
                    self.fail_all(503, "the server shut down before this request finished");
                    self.shutdown_workers();
                    break;
                }
            }
        }
        self.shared.stopped.store(true, Ordering::Relaxed);
    }

    fn handle(&mut self, c: Cmd) {
        match c {
            Cmd::Submit {
                id,
                request,
                events,
            } => self.waiting.push_back(Waiting {
                id,
                request,
                events,
            }),
            Cmd::Cancel(id) => self.cancel(id),
            Cmd::Worker(_, Ok(FromWorker::Rejected { id, message })) => {
                if let Some(r) = self.running.remove(&id) {
                    self.release(&r);
                    let _ = r.events.send(SeqEvent::Error(400, message));
                }
            }
            Cmd::Worker(_, Ok(FromWorker::Error { message })) | Cmd::Worker(_, Err(message)) => {
                self.shared.set_unhealthy(message)
            }
            Cmd::Worker(rank, Ok(other)) => self
                .shared
                .set_unhealthy(format!("attention {rank} sent {other:?} outside a step")),
            Cmd::Lost(what) => self.shared.set_unhealthy(what),
            Cmd::Drain(deadline) => self.drain = Some(deadline),
        }
    }

    fn send(&mut self, rank: usize, cmd: &ToWorker) -> Result<(), String> {
        let mut line = serde_json::to_string(cmd).expect("serialisable");
        line.push('\n');
        self.writers[rank]
            .write_all(line.as_bytes())
            .map_err(|e| format!("attention {rank}: control channel: {e}"))
    }

    fn release(&mut self, r: &Running) {
        self.per_rank[r.rank] -= 1;
        self.kv_used[r.rank] -= r.reserved;
    }

    fn cancel(&mut self, id: SeqId) {
        if let Some(r) = self.running.remove(&id) {
            self.release(&r);
            if let Err(why) = self.send(r.rank, &ToWorker::Cancel { id }) {
                self.shared.set_unhealthy(why);
            }
        } else if let Some(i) = self.waiting.iter().position(|w| w.id == id) {
            self.waiting.remove(i);
        }
    }

    /// Sequences whose client went away (the event stream is closed).
    fn drop_abandoned(&mut self) {
        let gone: Vec<SeqId> = self
            .running
            .iter()
            .filter(|(_, r)| r.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.cancel(id);
        }
        self.waiting.retain(|w| !w.events.is_closed());
    }

    fn fail_all(&mut self, status: u16, why: &str) {
        for (_, r) in self.running.drain() {
            let _ = r.events.send(SeqEvent::Error(status, why.to_string()));
        }
        for w in self.waiting.drain(..) {
            let _ = w.events.send(SeqEvent::Error(status, why.to_string()));
        }
        self.per_rank.iter_mut().for_each(|n| *n = 0);
        self.kv_used.iter_mut().for_each(|n| *n = 0);
        self.publish();
    }

    fn admit(&mut self) {
        while let Some(w) = self.waiting.front() {
            if self.running.len() >= self.cfg.max_batch {
                break;
            }
            let need = w.request.prompt.len() + w.request.max_new;
            // The worker with the fewest sequences that has room.
            let Some(rank) = (0..self.cfg.attention)
                .filter(|&r| self.kv_used[r] + need <= self.cfg.kv_tokens_per_worker)
                .min_by_key(|&r| self.per_rank[r])
            else {
                break;
            };
            let w = self.waiting.pop_front().expect("front exists");
            let cmd = ToWorker::Submit {
                id: w.id,
                request: w.request.clone(),
            };
            if let Err(why) = self.send(rank, &cmd) {
                let _ = w.events.send(SeqEvent::Error(503, why.clone()));
                self.shared.set_unhealthy(why);
                return;
            }
            self.metrics
                .prompt_tokens
                .inc_by(w.request.prompt.len() as u64);
            self.per_rank[rank] += 1;
            self.kv_used[rank] += need;
            self.running.insert(
                w.id,
                Running {
                    rank,
                    events: w.events,
                    reserved: need,
                },
            );
        }
    }

    fn publish(&self) {
        self.shared
            .waiting
            .store(self.waiting.len(), Ordering::Relaxed);
        self.shared
            .running
            .store(self.running.len(), Ordering::Relaxed);
        self.metrics.running.set(self.running.len() as i64);
        self.metrics.waiting.set(self.waiting.len() as i64);
        let used: usize = self.kv_used.iter().sum();
        let total = self.cfg.kv_tokens_per_worker * self.cfg.attention;
        self.metrics.kv_usage.set(used as f64 / total.max(1) as f64);
    }

    /// One step of the group: every worker steps, the engine collects all
    /// their replies and routes the tokens.
    fn step(&mut self) -> Result<(), String> {
        for r in 0..self.cfg.attention {
            self.send(r, &ToWorker::Step)?;
        }
        let deadline = Instant::now() + self.cfg.step_timeout;
        let mut replies = 0;
        let mut iteration_tokens = 0;
        while replies < self.cfg.attention {
            let left = deadline.saturating_duration_since(Instant::now());
            let c = match self.rx.recv_timeout(left) {
                Ok(c) => c,
                Err(_) => {
                    return Err(format!(
                        "a step took longer than {:?}",
                        self.cfg.step_timeout
                    ))
                }
            };
            match c {
                Cmd::Worker(
                    _,
                    Ok(FromWorker::Stepped {
                        tokens,
                        prompt_logprobs,
                        timings,
                        rows,
                        ..
                    }),
                ) => {
                    replies += 1;
                    iteration_tokens += rows;
                    for t in &timings {
                        self.metrics.observe_timing(t);
                    }
                    for p in prompt_logprobs {
                        if let Some(r) = self.running.get(&p.seq) {
                            let _ = r.events.send(SeqEvent::Prompt(prompt_from_worker(p)));
                        }
                    }
                    for t in tokens {
                        self.route(t);
                    }
                }
                other => {
                    self.handle(other);
                    if let Some(why) = self.shared.unhealthy() {
                        return Err(why);
                    }
                }
            }
        }
        self.metrics
            .iteration_tokens
            .observe(iteration_tokens as f64);
        self.publish();
        Ok(())
    }

    fn route(&mut self, t: Token) {
        self.metrics.generation_tokens.inc();
        let finished = t.finish.is_some();
        let id = t.seq;
        let Some(r) = self.running.get(&id) else {
            return; // cancelled meanwhile
        };
        let _ = r.events.send(SeqEvent::Token(from_worker(t)));
        if finished {
            if let Some(r) = self.running.remove(&id) {
                self.release(&r);
            }
        }
    }

    fn shutdown_workers(&mut self) {
        for r in 0..self.cfg.attention {
            let _ = self.send(r, &ToWorker::Shutdown);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::api::SamplingParams;

    #[test]
    fn requests_and_tokens_cross_to_the_worker_and_back_field_for_field() {
        let r = GenerateRequest {
            prompt: vec![5, 6, 7],
            max_tokens: 9,
            stop_tokens: vec![2],
            sampling: SamplingParams {
                temperature: 0.5,
                top_p: 0.9,
                seed: 42,
                top_logprobs: 3,
                top_k: 5,
                min_p: 0.1,
                repetition_penalty: 1.2,
                presence_penalty: 0.5,
                frequency_penalty: -0.5,
                min_tokens: 4,
            },
            prompt_logprobs: Some(2),
        };
        assert_eq!(
            to_worker(r),
            Request {
                prompt: vec![5, 6, 7],
                max_new: 9,
                stop: vec![2],
                sampling: Sampling {
                    temperature: 0.5,
                    top_p: 0.9,
                    seed: 42,
                    top_logprobs: 3,
                    top_k: 5,
                    min_p: 0.1,
                    repetition_penalty: 1.2,
                    presence_penalty: 0.5,
                    frequency_penalty: -0.5,
                    min_tokens: 4,
                },
                prompt_logprobs: Some(2),
            }
        );
        for (finish, reason) in [
            (None, None),
            (Some(Finish::Stop), Some(FinishReason::Stop)),
            (Some(Finish::Length), Some(FinishReason::Length)),
        ] {
            let t = Token {
                seq: 1,
                token: 11,
                logprob: -0.25,
                top: vec![(11, -0.25), (12, -2.0)],
                finish,
            };
            assert_eq!(
                from_worker(t),
                GeneratedToken {
                    token: 11,
                    logprob: -0.25,
                    top: vec![(11, -0.25), (12, -2.0)],
                    finish: reason,
                }
            );
        }
    }
}
