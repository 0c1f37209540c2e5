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
//!
//! # Losing a worker
//!
//! Every worker (attention and expert) holds a control connection; the
//! process supervisor (the server's, for the workers it started) reports
//! exits. When a worker is lost, the others find their group broken (m2n's
//! `PeerLost`; each aborts, so the rest fail fast) and say so. The engine
//! then:
//!
//! 1. collects: every worker has said `broken` or is lost; one silent past
//!    the loss window (hung, or stopped) is lost too;
//! 2. opens a new group (a fresh rendezvous id), closes the lost workers'
//!    control channels (fencing them: a worker without one exits) and has
//!    the supervisor replace them (it kills what still runs);
//! 3. tells the survivors to re-form: they keep their weights, and the
//!    attention workers their sequences and KV caches, rolling back the
//!    step the old group could not finish, which the next step runs again;
//! 4. once every survivor has re-formed and every replacement has said
//!    hello, resubmits the sequences of a lost attention worker to its
//!    replacement with the tokens they had generated (`Request::resume`):
//!    prefilled again, they go on where they stopped, and their streams
//!    see no token twice or missing.
//!
//! A second loss during a recovery starts it over; if the group is not
//! whole again by the recovery deadline, every request in flight ends with
//! an error naming why and the server reports itself down.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use m2n::Role;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::api::{FinishReason, GenerateRequest, GeneratedToken, PromptToken, RequestId};
use super::control::{FromWorker, ToWorker, SECRET_ENV};
use super::metrics::Metrics;
use crate::worker::attention::{Finish, MbTiming, PromptLogprob, Request, Sampling, SeqId, Token};

/// Limits of the scheduler.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    pub attention: usize,
    pub experts: usize,
    /// Most sequences running at once, over all workers.
    pub max_batch: usize,
    /// Most requests waiting; beyond it, new ones are refused (429).
    pub max_queue: usize,
    /// KV-cache tokens per attention worker.
    pub kv_tokens_per_worker: usize,
    /// Longest a step may take before the group is declared stuck.
    pub step_timeout: Duration,
    /// After a loss, how long a worker may stay silent before it is
    /// judged lost too (hung or stopped): longer than m2n's peer timeout,
    /// so that every live worker has noticed the broken group by then.
    pub loss_window: Duration,
    /// From a loss to the group whole again; past it, requests in flight
    /// fail and the server is down.
    pub recovery_timeout: Duration,
    /// The deployment every worker must share (attention, experts,
    /// micro-batches, rows per micro-batch; see `control::deployment_words`).
    pub deployment: [usize; 4],
}

/// A worker's place in the group: its role and rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Slot {
    pub role: Role,
    pub rank: usize,
}

impl Slot {
    pub fn attention(rank: usize) -> Self {
        Slot {
            role: Role::Attention,
            rank,
        }
    }
    pub fn expert(rank: usize) -> Self {
        Slot {
            role: Role::Expert,
            rank,
        }
    }
}

impl Slot {
    fn key(&self) -> (bool, usize) {
        (self.role == Role::Expert, self.rank)
    }
}

/// Attention ranks first, then experts.
impl Ord for Slot {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

impl PartialOrd for Slot {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.role, self.rank)
    }
}

/// Starts and stops the worker processes for the engine.
pub trait Supervisor: Send {
    /// Opens a rendezvous for a new group of every worker; its unique id.
    fn new_group(&mut self) -> Result<String, String>;
    /// Stops `slot`'s worker if it still runs (it was judged lost), and
    /// starts one for the same slot (it says hello, then waits for the
    /// group's id); its process id. `None`: the place is not this
    /// supervisor's (its worker came from elsewhere): the engine waits
    /// for one to join.
    fn replace(&mut self, slot: Slot) -> Result<Option<u32>, String>;
}

/// Whether the service can serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceState {
    /// Every worker is in the group.
    Whole,
    /// A worker was lost and the group is being re-formed: requests wait.
    Degraded(String),
    /// It cannot serve (a recovery failed, or the server is stopping).
    Down(String),
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
    /// A worker connected and said hello: its place, its connection's
    /// number, its process id, whether it is a standby, and the stream to
    /// write to.
    Joined {
        slot: Slot,
        conn: u64,
        pid: u32,
        standby: bool,
        stream: TcpStream,
    },
    /// A line from a worker's connection (or why it ended).
    Worker(Slot, u64, Result<FromWorker, String>),
    /// The supervisor saw a worker's process (this id) end.
    Lost(Slot, u32, String),
    Drain(Instant),
}

/// State the HTTP side reads without asking the engine.
#[derive(Debug, Default)]
pub struct Shared {
    unhealthy: Mutex<Option<String>>,
    recovering: Mutex<Option<String>>,
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
    fn set_recovering(&self, why: Option<String>) {
        *self.recovering.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }
    /// Whole, degraded (re-forming the group after a loss) or down.
    pub fn state(&self) -> ServiceState {
        if let Some(why) = self.unhealthy() {
            return ServiceState::Down(why);
        }
        if self.draining() {
            return ServiceState::Down("the server is shutting down".into());
        }
        match self
            .recovering
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            Some(why) => ServiceState::Degraded(why),
            None => ServiceState::Whole,
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
            Cmd::Joined {
                slot, conn, pid, ..
            } => write!(f, "Joined({slot}, {conn}, pid {pid})"),
            Cmd::Worker(s, c, m) => write!(f, "Worker({s}, {c}, {m:?})"),
            Cmd::Lost(s, p, w) => write!(f, "Lost({s}, pid {p}, {w})"),
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

    /// Reports a worker process that ended (from the process supervisor).
    pub fn lost(&self, slot: Slot, pid: u32, why: String) {
        let _ = self.tx.send(Cmd::Lost(slot, pid, why));
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
        resume: Vec::new(),
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
    /// The request as submitted, and the tokens it has generated so far:
    /// what a replacement worker needs to resume it.
    request: Request,
    generated: Vec<u32>,
    /// The last prompt position whose log-probability went out (a resumed
    /// prefill reports them again; the stream must not).
    prompt_sent: u32,
}

/// Accepts workers' control connections on `listener` for as long as the
/// process lives (replacements, standbys and workers from other hosts say
/// hello at any time): each must say hello within 5 s with a role and rank
/// that fit the group and the group's secret.
fn accept_workers(listener: TcpListener, tx: Sender<Cmd>, gate: Gate) {
    let mut next_conn = 0u64;
    for stream in listener.incoming() {
        let Ok(s) = stream else { continue };
        next_conn += 1;
        let (conn, tx, gate) = (next_conn, tx.clone(), gate.clone());
        std::thread::spawn(move || {
            let peer = s.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string());
            let (hello, reader) = match gate.hello(&s) {
                Ok(x) => x,
                Err(why) => {
                    eprintln!("moe-serve: refused a control connection from {peer}: {why}");
                    let _ = s.shutdown(std::net::Shutdown::Both);
                    return;
                }
            };
            let slot = hello.slot;
            let Ok(writer) = s.try_clone() else { return };
            let joined = Cmd::Joined {
                slot,
                conn,
                pid: hello.pid,
                standby: hello.standby,
                stream: writer,
            };
            if tx.send(joined).is_err() {
                return;
            }
            for line in reader.lines() {
                let msg = match line {
                    Ok(l) => serde_json::from_str(&l)
                        .map_err(|e| format!("{slot}: bad message {l:?}: {e}")),
                    Err(e) => Err(format!("{slot}: control channel: {e}")),
                };
                let stop = msg.is_err();
                if tx.send(Cmd::Worker(slot, conn, msg)).is_err() || stop {
                    return;
                }
            }
            let _ = tx.send(Cmd::Worker(
                slot,
                conn,
                Err(format!("{slot} closed its control channel")),
            ));
        });
    }
}

/// What a control connection must show to be taken: a hello that fits the
/// group's shape, with the group's secret.
#[derive(Clone)]
struct Gate {
    attention: usize,
    experts: usize,
    secret: Arc<String>,
}

/// A hello the gate let through.
struct Hello {
    slot: Slot,
    pid: u32,
    standby: bool,
}

/// The longest hello line read (a stranger cannot make us buffer more).
const MAX_HELLO: u64 = 4096;

impl Gate {
    /// Reads a worker's hello: who it is, and the reader for what follows;
    /// or why it is refused.
    fn hello(&self, s: &TcpStream) -> Result<(Hello, BufReader<TcpStream>), String> {
        let io = |e: std::io::Error| e.to_string();
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(io)?;
        s.set_nodelay(true).map_err(io)?;
        let mut reader = BufReader::new(s.try_clone().map_err(io)?);
        let mut line = String::new();
        std::io::Read::take(&mut reader, MAX_HELLO)
            .read_line(&mut line)
            .map_err(|e| format!("no hello within 5 s: {e}"))?;
        if !line.ends_with('\n') {
            return Err(format!(
                "no complete hello line (at most {MAX_HELLO} bytes)"
            ));
        }
        s.set_read_timeout(None).map_err(io)?;
        let (role, rank, pid, secret, standby) = match serde_json::from_str(line.trim_end()) {
            Ok(FromWorker::Hello {
                role,
                rank,
                pid,
                secret,
                standby,
            }) => (role, rank, pid, secret, standby),
            Ok(FromWorker::Error { message }) => return Err(format!("it reported {message}")),
            _ => return Err("not a worker's hello".into()),
        };
        use subtle::ConstantTimeEq;
        if !bool::from(secret.as_bytes().ct_eq(self.secret.as_bytes())) {
            return Err(format!(
                "{role} {rank} did not present the group's secret ({SECRET_ENV})"
            ));
        }
        let (m, n) = (self.attention, self.experts);
        let slot = match role.parse::<Role>() {
            Ok(Role::Attention) if rank < m => Slot::attention(rank),
            Ok(Role::Expert) if rank < n => Slot::expert(rank),
            Ok(role) => return Err(format!("{role} {rank} is not in a group of {m} x {n}")),
            Err(e) => return Err(format!("role {role:?}: {e}")),
        };
        Ok((Hello { slot, pid, standby }, reader))
    }
}

/// Accepts the workers' control connections on `listener` (each says
/// hello with its role, rank and the group's `secret`), forms the group
/// once every place has a worker, then runs the engine on its own thread.
pub fn start(
    listener: TcpListener,
    secret: String,
    cfg: EngineConfig,
    metrics: Arc<Metrics>,
    accept_timeout: Duration,
    supervisor: Box<dyn Supervisor>,
) -> Result<(EngineHandle, std::thread::JoinHandle<()>), String> {
    let (tx, rx) = channel();
    {
        let tx = tx.clone();
        let gate = Gate {
            attention: cfg.attention,
            experts: cfg.experts,
            secret: Arc::new(secret),
        };
        std::thread::Builder::new()
            .name("moe-control-accept".into())
            .spawn(move || accept_workers(listener, tx, gate))
            .map_err(|e| e.to_string())?;
    }
    let shared = Arc::new(Shared::default());
    let handle = EngineHandle {
        tx,
        shared: shared.clone(),
        max_queue: cfg.max_queue,
    };
    let mut engine = Engine {
        cfg,
        rx,
        writers: BTreeMap::new(),
        pids: BTreeMap::new(),
        standbys: Vec::new(),
        supervisor,
        shared,
        metrics,
        waiting: VecDeque::new(),
        running: HashMap::new(),
        per_rank: vec![0; cfg.attention],
        kv_used: vec![0; cfg.attention],
        drain: None,
        failure: None,
        recovered_from: None,
    };
    engine.form_first(Instant::now() + accept_timeout)?;
    engine.metrics.service_state.set(0);
    let thread = std::thread::Builder::new()
        .name("moe-engine".into())
        .spawn(move || engine.run())
        .map_err(|e| e.to_string())?;
    Ok((handle, thread))
}

fn all_slots(cfg: &EngineConfig) -> Vec<Slot> {
    (0..cfg.attention)
        .map(Slot::attention)
        .chain((0..cfg.experts).map(Slot::expert))
        .collect()
}

/// A group that lost members, while the engine re-forms it.
#[derive(Debug)]
struct Failure {
    began: Instant,
    /// Workers lost, and why.
    lost: BTreeMap<Slot, String>,
    /// Workers that said their group broke (they wait to re-form).
    broken: BTreeSet<Slot>,
    /// Attention ranks whose sequences must be resumed (lost at any point
    /// of this recovery).
    resume: BTreeSet<usize>,
    /// Workers told to join a group that then failed, not yet heard from.
    rejoining: BTreeSet<Slot>,
    /// Every worker lost in this failure, in order (for the log).
    names: Vec<String>,
}

/// How long a re-formed group's rendezvous waits for its members (every
/// one has loaded its weights by then: it only has to connect).
pub const REFORM_ROOT_TIMEOUT: Duration = Duration::from_secs(10);

struct Engine {
    cfg: EngineConfig,
    rx: Receiver<Cmd>,
    /// Each worker's control connection (its number, and the writer).
    writers: BTreeMap<Slot, (u64, TcpStream)>,
    /// Each worker's process id (from its hello, or its replacement's
    /// start): an exit the supervisor reports for another is old news.
    pids: BTreeMap<Slot, u32>,
    /// Standby workers (connection, process id, stream), by the place
    /// each stands by for.
    standbys: Vec<(Slot, u64, u32, TcpStream)>,
    supervisor: Box<dyn Supervisor>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    waiting: VecDeque<Waiting>,
    running: HashMap<SeqId, Running>,
    per_rank: Vec<usize>,
    kv_used: Vec<usize>,
    drain: Option<Instant>,
    failure: Option<Failure>,
    /// When the loss the last recovery answered happened, until the first
    /// step after it is done.
    recovered_from: Option<Instant>,
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
            if self.failure.is_some() && self.shared.unhealthy().is_none() {
                self.recover();
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
                self.step();
                continue;
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

    /// Whether a message on connection `conn` comes from `slot`'s current
    /// worker (a replaced worker's last words are ignored).
    fn current(&self, slot: Slot, conn: u64) -> bool {
        self.writers.get(&slot).is_some_and(|(c, _)| *c == conn)
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
            Cmd::Joined {
                slot,
                conn,
                pid,
                standby: true,
                stream,
            } => {
                eprintln!("moe-serve: a standby for {slot} joined (pid {pid})");
                self.standbys.push((slot, conn, pid, stream));
            }
            Cmd::Joined {
                slot, pid, stream, ..
            } => {
                // A place is filled only when the engine asks (at the
                // start, in a recovery); anyone else is refused: its
                // channel closes, so it exits.
                eprintln!("moe-serve: refused {slot} (pid {pid}): the place is taken");
                let _ = stream.shutdown(std::net::Shutdown::Both);
            }
            Cmd::Worker(slot, conn, msg) if self.standbys.iter().any(|s| s.1 == conn) => {
                if let Err(why) | Ok(FromWorker::Error { message: why }) = msg {
                    eprintln!("moe-serve: the standby for {slot} left: {why}");
                    self.standbys.retain(|s| s.1 != conn);
                }
            }
            Cmd::Worker(slot, conn, _) if !self.current(slot, conn) => {}
            Cmd::Worker(_, _, Ok(FromWorker::Rejected { id, message })) => {
                if let Some(r) = self.running.remove(&id) {
                    self.release(&r);
                    self.metrics.requests_failed.inc();
                    let _ = r.events.send(SeqEvent::Error(400, message));
                }
            }
            Cmd::Worker(
                _,
                _,
                Ok(FromWorker::Stepped {
                    tokens,
                    prompt_logprobs,
                    timings,
                    ..
                }),
            ) => self.stepped(tokens, prompt_logprobs, &timings),
            Cmd::Worker(slot, _, Ok(FromWorker::Broken { message, peer })) => {
                let peer = peer.map(|p| format!(" (it names {p})")).unwrap_or_default();
                self.failure().broken.insert(slot);
                self.shared
                    .set_recovering(Some(format!("{slot}: {message}{peer}")));
            }
            Cmd::Worker(slot, _, Ok(FromWorker::Error { message })) => self.lose(slot, message),
            Cmd::Worker(slot, _, Err(message)) => self.lose(slot, message),
            Cmd::Worker(slot, _, Ok(other)) => {
                self.lose(slot, format!("{slot} sent {other:?} out of turn"))
            }
            Cmd::Lost(slot, pid, why) => {
                if self.pids.get(&slot) == Some(&pid) {
                    self.lose(slot, format!("{slot} {why}"))
                }
            }
            Cmd::Drain(deadline) => self.drain = Some(deadline),
        }
    }

    /// The current failure, begun now if there is none.
    fn failure(&mut self) -> &mut Failure {
        self.failure.get_or_insert_with(|| Failure {
            began: Instant::now(),
            lost: BTreeMap::new(),
            broken: BTreeSet::new(),
            resume: BTreeSet::new(),
            rejoining: BTreeSet::new(),
            names: Vec::new(),
        })
    }

    /// `slot`'s worker is lost: its control channel closes (fencing it).
    fn lose(&mut self, slot: Slot, why: String) {
        if self.drain.is_some() && self.running.is_empty() {
            return; // workers end on their own at shutdown
        }
        if self
            .failure
            .as_ref()
            .is_some_and(|f| f.lost.contains_key(&slot))
        {
            return; // already lost
        }
        if let Some((_, w)) = self.writers.remove(&slot) {
            // Both halves: the reader's copy too, so that the worker sees
            // its channel close and exits even if it wakes much later.
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
        eprintln!("moe-serve: lost {slot}: {why}");
        self.metrics
            .worker_losses
            .with_label_values(&[slot.role.name()])
            .inc();
        self.shared.set_recovering(Some(why.clone()));
        let f = self.failure();
        f.broken.remove(&slot);
        if slot.role == Role::Attention {
            f.resume.insert(slot.rank);
        }
        f.names.push(slot.to_string());
        f.lost.insert(slot, why);
    }

    fn send(&mut self, slot: Slot, cmd: &ToWorker) -> Result<(), String> {
        let mut line = serde_json::to_string(cmd).expect("serialisable");
        line.push('\n');
        let Some((_, w)) = self.writers.get_mut(&slot) else {
            return Err(format!("{slot} is not connected"));
        };
        w.write_all(line.as_bytes())
            .map_err(|e| format!("{slot}: control channel: {e}"))
    }

    /// Sends `cmd` to `slot`; a worker that cannot be told is lost.
    fn tell(&mut self, slot: Slot, cmd: &ToWorker) -> bool {
        match self.send(slot, cmd) {
            Ok(()) => true,
            Err(why) => {
                if self.writers.contains_key(&slot) {
                    self.lose(slot, why);
                }
                false
            }
        }
    }

    fn release(&mut self, r: &Running) {
        self.per_rank[r.rank] -= 1;
        self.kv_used[r.rank] -= r.reserved;
    }

    fn cancel(&mut self, id: SeqId) {
        if let Some(r) = self.running.remove(&id) {
            self.release(&r);
            self.tell(Slot::attention(r.rank), &ToWorker::Cancel { id });
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
            self.metrics.requests_failed.inc();
            let _ = r.events.send(SeqEvent::Error(status, why.to_string()));
        }
        for w in self.waiting.drain(..) {
            self.metrics.requests_failed.inc();
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
            self.metrics
                .prompt_tokens
                .inc_by(w.request.prompt.len() as u64);
            self.per_rank[rank] += 1;
            self.kv_used[rank] += need;
            // Running before it is sent: if the worker is lost on the way,
            // the recovery resumes it with the rest.
            let cmd = ToWorker::Submit {
                id: w.id,
                request: w.request.clone(),
            };
            self.running.insert(
                w.id,
                Running {
                    rank,
                    events: w.events,
                    reserved: need,
                    generated: Vec::with_capacity(w.request.max_new),
                    request: w.request,
                    prompt_sent: 0,
                },
            );
            if !self.tell(Slot::attention(rank), &cmd) {
                return;
            }
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
    /// their replies and routes the tokens. A failure ends it early (the
    /// recovery collects the rest).
    fn step(&mut self) {
        for r in 0..self.cfg.attention {
            if !self.tell(Slot::attention(r), &ToWorker::Step) {
                return;
            }
        }
        let deadline = Instant::now() + self.cfg.step_timeout;
        let mut replied = vec![false; self.cfg.attention];
        let mut iteration_tokens = 0;
        while replied.iter().any(|r| !r) {
            let left = deadline.saturating_duration_since(Instant::now());
            let c = match self.rx.recv_timeout(left) {
                Ok(c) => c,
                Err(_) => {
                    // Nobody reported a failure: the silent ones are
                    // judged (by the loss window) in the recovery.
                    let why = format!("a step took longer than {:?}", self.cfg.step_timeout);
                    self.shared.set_recovering(Some(why));
                    self.failure();
                    return;
                }
            };
            match c {
                Cmd::Worker(slot, conn, Ok(FromWorker::Stepped { rows, .. }))
                    if self.current(slot, conn) && slot.role == Role::Attention =>
                {
                    replied[slot.rank] = true;
                    iteration_tokens += rows;
                    self.handle(c);
                }
                other => self.handle(other),
            }
            if self.failure.is_some() {
                return;
            }
        }
        self.metrics
            .iteration_tokens
            .observe(iteration_tokens as f64);
        self.publish();
        if self.recovered_from.is_some() {
            self.recovered();
        }
    }

    /// The first step after a recovery is done: the time from the loss.
    fn recovered(&mut self) {
        if let Some(began) = self.recovered_from.take() {
            let t = began.elapsed();
            self.metrics.recovery.observe(t.as_secs_f64());
            eprintln!(
                "moe-serve: serving again {:.3} s after the loss",
                t.as_secs_f64()
            );
        }
    }

    /// A worker's step: its timings, prompt log-probabilities and tokens.
    fn stepped(&mut self, tokens: Vec<Token>, prompt: Vec<PromptLogprob>, timings: &[MbTiming]) {
        for t in timings {
            self.metrics.observe_timing(t);
        }
        for p in prompt {
            if let Some(r) = self.running.get_mut(&p.seq) {
                if p.pos > r.prompt_sent {
                    r.prompt_sent = p.pos;
                    let _ = r.events.send(SeqEvent::Prompt(prompt_from_worker(p)));
                }
            }
        }
        for t in tokens {
            self.route(t);
        }
    }

    fn route(&mut self, t: Token) {
        self.metrics.generation_tokens.inc();
        let finished = t.finish.is_some();
        let id = t.seq;
        let Some(r) = self.running.get_mut(&id) else {
            return; // cancelled meanwhile
        };
        r.generated.push(t.token);
        let _ = r.events.send(SeqEvent::Token(from_worker(t)));
        if finished {
            if let Some(r) = self.running.remove(&id) {
                self.release(&r);
            }
        }
    }

    /// Re-forms the group after a loss (see the module docs); on failure
    /// by the deadline, the server is down.
    fn recover(&mut self) {
        let began = self.failure().began;
        self.metrics.service_state.set(1);
        let deadline = began + self.cfg.recovery_timeout;
        let outcome = loop {
            match self.try_reform(deadline) {
                Ok(true) => break Ok(()),
                Ok(false) => {
                    // Another loss: start over (not in a tight loop when a
                    // replacement dies at once).
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                Err(why) => break Err(why),
            }
        };
        let failure = self.failure.take().expect("a failure is being recovered");
        match outcome {
            Ok(()) => {
                self.resume(&failure.resume);
                self.metrics.service_state.set(0);
                self.shared.set_recovering(None);
                eprintln!(
                    "moe-serve: group re-formed in {:.0?} after losing {}",
                    began.elapsed(),
                    failure.names.join(", ")
                );
                // Recovered once the group's first step is done (or now,
                // if nothing runs).
                self.recovered_from = Some(began);
                if self.running.is_empty() {
                    self.recovered();
                }
            }
            Err(why) => {
                self.metrics.service_state.set(2);
                self.shared.set_recovering(None);
                self.shared.set_unhealthy(why);
            }
        }
    }

    /// One attempt: collect, replace, re-form. `Ok(false)` when another
    /// worker was lost meanwhile (try again), `Err` past the deadline.
    fn try_reform(&mut self, deadline: Instant) -> Result<bool, String> {
        let all = all_slots(&self.cfg);
        // 1. Every worker broken or lost; the silent ones past the window
        //    are lost. A survivor still joining the last attempt's group
        //    answers once that group's rendezvous gives up.
        let rejoining = !self.failure.as_ref().expect("failing").rejoining.is_empty();
        let window = if rejoining {
            self.cfg.loss_window + REFORM_ROOT_TIMEOUT
        } else {
            self.cfg.loss_window
        };
        let window = (Instant::now() + window).min(deadline);
        loop {
            let f = self.failure.as_ref().expect("failing");
            let silent: Vec<Slot> = all
                .iter()
                .filter(|s| !f.lost.contains_key(s) && !f.broken.contains(s))
                .copied()
                .collect();
            if silent.is_empty() {
                break;
            }
            let left = window.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(c) => self.handle(c),
                Err(RecvTimeoutError::Timeout) => {
                    for s in silent {
                        let why = format!(
                            "{s} said nothing for {:?} after the group broke (hung or stopped)",
                            window.saturating_duration_since(Instant::now()) + self.cfg.loss_window
                        );
                        self.lose(s, why);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Err("the engine stopped".into()),
            }
        }
        let f = self.failure.as_mut().expect("failing");
        let lost: Vec<Slot> = f.lost.keys().copied().collect();
        let why = f.lost.values().cloned().collect::<Vec<_>>().join("; ");
        let timeout = self.cfg.recovery_timeout;
        let late = |what: String| {
            format!("the group could not be re-formed within {timeout:?}: {what} (lost: {why})")
        };
        if Instant::now() >= deadline {
            return Err(late("out of time".into()));
        }
        f.lost.clear();
        f.broken.clear();
        f.rejoining.clear();
        // 2. The lost are replaced: by a standby, else by a new worker
        //    (started here, or joining from elsewhere), which says hello
        //    once its weights are loaded.
        let mut expect: BTreeMap<Slot, Option<u32>> = BTreeMap::new();
        for &slot in &lost {
            if let Some(i) = self.standbys.iter().position(|s| s.0 == slot) {
                let (_, conn, pid, stream) = self.standbys.remove(i);
                eprintln!("moe-serve: the standby (pid {pid}) takes over {slot}");
                self.writers.insert(slot, (conn, stream));
                self.pids.insert(slot, pid);
            } else {
                let pid = self
                    .supervisor
                    .replace(slot)
                    .map_err(|e| format!("{slot} cannot be replaced: {e} (lost: {why})"))?;
                if let Some(pid) = pid {
                    self.pids.insert(slot, pid);
                } else {
                    eprintln!("moe-serve: waiting for a worker to join as {slot}");
                }
                expect.insert(slot, pid);
            }
            self.metrics
                .worker_replacements
                .with_label_values(&[slot.role.name()])
                .inc();
        }
        if let Err(what) = self.await_hellos(expect, deadline, true) {
            return match what {
                None => Ok(false),
                Some(what) => Err(late(what)),
            };
        }
        // 3. Everyone joins the new group: the survivors keep their state.
        match self.form(deadline) {
            Ok(()) => Ok(true),
            Err(None) => Ok(false),
            Err(Some(what)) => Err(late(what)),
        }
    }

    /// Waits for a hello from each place in `expect` (from that process,
    /// when its id is known). A standby fills a place only when
    /// `standbys_fill` (a recovery waiting for someone to join); at the
    /// first formation it waits in the pool, so that the place's own
    /// worker is not refused when the standby happens to say hello first.
    /// `Err(None)`: a worker was lost meanwhile; `Err(Some(why))`: the
    /// deadline passed.
    fn await_hellos(
        &mut self,
        mut expect: BTreeMap<Slot, Option<u32>>,
        deadline: Instant,
        standbys_fill: bool,
    ) -> Result<(), Option<String>> {
        while !expect.is_empty() {
            let Some(c) = self.next_before(deadline) else {
                let names: Vec<String> = expect.keys().map(Slot::to_string).collect();
                return Err(Some(format!(
                    "no worker said hello as {}",
                    names.join(", ")
                )));
            };
            match c {
                Cmd::Joined {
                    slot,
                    conn,
                    pid,
                    stream,
                    standby,
                } if (standbys_fill || !standby)
                    && expect
                        .get(&slot)
                        .is_some_and(|e| e.is_none_or(|p| p == pid)) =>
                {
                    self.writers.insert(slot, (conn, stream));
                    self.pids.insert(slot, pid);
                    expect.remove(&slot);
                }
                other => self.handle(other),
            }
            if self.failure.as_ref().is_some_and(|f| !f.lost.is_empty()) {
                return Err(None);
            }
        }
        Ok(())
    }

    /// Every worker joins a new group (the first, or one re-formed).
    /// `Err(None)`: a worker was lost or found the group broken meanwhile;
    /// `Err(Some(why))`: the deadline passed or no group could be opened.
    fn form(&mut self, deadline: Instant) -> Result<(), Option<String>> {
        let all = all_slots(&self.cfg);
        let uid = self.supervisor.new_group().map_err(Some)?;
        for &slot in &all {
            let reform = ToWorker::Reform {
                uid: uid.clone(),
                deployment: self.cfg.deployment,
            };
            if !self.tell(slot, &reform) {
                return Err(None);
            }
        }
        let mut pending: BTreeSet<Slot> = all.iter().copied().collect();
        while !pending.is_empty() {
            let Some(c) = self.next_before(deadline) else {
                let names: Vec<String> = pending.iter().map(Slot::to_string).collect();
                return Err(Some(format!("{} did not join", names.join(", "))));
            };
            match c {
                Cmd::Worker(slot, conn, Ok(FromWorker::Reformed)) if self.current(slot, conn) => {
                    pending.remove(&slot);
                }
                other => self.handle(other),
            }
            if let Some(f) = self.failure.as_mut() {
                if !f.lost.is_empty() || !f.broken.is_empty() {
                    // Those still joining answer when the rendezvous gives up.
                    f.rejoining = pending
                        .iter()
                        .filter(|s| !f.lost.contains_key(s) && !f.broken.contains(s))
                        .copied()
                        .collect();
                    return Err(None);
                }
            }
        }
        Ok(())
    }

    /// The first group: every place's worker says hello (started here or
    /// joining from elsewhere), then all join.
    fn form_first(&mut self, deadline: Instant) -> Result<(), String> {
        let expect = all_slots(&self.cfg)
            .into_iter()
            .map(|s| (s, None))
            .collect();
        let failed = |e: &mut Self, what: Option<String>| {
            let lost = e
                .failure
                .take()
                .map(|f| f.lost.into_values().collect::<Vec<_>>().join("; "))
                .unwrap_or_default();
            match what {
                Some(w) if lost.is_empty() => w,
                Some(w) => format!("{w}; {lost}"),
                None => lost,
            }
        };
        if let Err(what) = self.await_hellos(expect, deadline, false) {
            return Err(failed(self, what));
        }
        if let Err(what) = self.form(deadline) {
            return Err(failed(self, what));
        }
        Ok(())
    }

    /// The next command, or `None` at `deadline`.
    fn next_before(&self, deadline: Instant) -> Option<Cmd> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.rx.recv_timeout(left).ok()
    }

    /// Sequences of lost attention workers go to their replacements with
    /// the tokens they had generated.
    fn resume(&mut self, ranks: &BTreeSet<usize>) {
        let mut ids: Vec<SeqId> = self
            .running
            .iter()
            .filter(|(_, r)| ranks.contains(&r.rank))
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        for id in ids {
            let r = &self.running[&id];
            let mut request = r.request.clone();
            request.resume = r.generated.clone();
            let rank = r.rank;
            self.metrics.requests_resumed.inc();
            if !self.tell(Slot::attention(rank), &ToWorker::Submit { id, request }) {
                return;
            }
        }
    }

    fn shutdown_workers(&mut self) {
        for slot in all_slots(&self.cfg) {
            let _ = self.send(slot, &ToWorker::Shutdown);
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
                resume: Vec::new(),
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
