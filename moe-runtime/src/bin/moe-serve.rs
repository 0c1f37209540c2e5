//! `moe-serve`: an OpenAI-compatible server on the disaggregated runtime.
//! It starts `M` attention and `N` expert worker processes (every
//! activation crosses m2n between them), drives the attention workers with
//! continuous batching over a loopback control channel, and serves HTTP
//! with axum. SIGTERM or SIGINT drains: no new requests, running ones get
//! `--drain-timeout-s`, then the workers stop and it exits 0.
//!
//! A worker that dies (or hangs past m2n's peer timeout) is replaced: the
//! server starts another process for its place and the group is re-formed
//! around it, the survivors keeping their weights and sequences (see the
//! engine's module docs); requests wait and none is lost. `/health` says
//! `degraded` meanwhile; past `--recovery-timeout-s` the requests in flight
//! fail and the server is down.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Parser;
use m2n::Role;
use moe_runtime::launch::{self, WorkerOutput};
use moe_runtime::model::weights::Checkpoint;
use moe_runtime::model::{load_config, ModelConfig, RuntimeError};
use moe_runtime::serve::control::{self, CONTROL_ADDR_ENV};
use moe_runtime::serve::engine::{self, EngineConfig, EngineHandle, Slot, Supervisor};
use moe_runtime::serve::http::{self, AppState};
use moe_runtime::serve::metrics::Metrics;
use moe_runtime::serve::tokenizer::Tokenizer;
use moe_runtime::worker::attention::AttentionWorker;
use moe_runtime::worker::Deployment;

/// Serve a model over the OpenAI API on a disaggregated MoE group.
#[derive(Debug, Parser)]
#[command(name = "moe-serve")]
struct Args {
    /// Model directory (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 1)]
    attention: usize,
    #[arg(long, default_value_t = 1)]
    experts: usize,
    #[arg(long, default_value_t = 2)]
    microbatches: usize,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Most sequences in the running batch.
    #[arg(long, default_value_t = 64)]
    max_batch: usize,
    /// Most waiting requests; more get 429.
    #[arg(long, default_value_t = 256)]
    max_queue: usize,
    /// Rows per micro-batch (long prompts prefill in chunks of this).
    #[arg(long, default_value_t = 64)]
    max_tokens_per_mb: usize,
    /// Longest prompt plus completion.
    #[arg(long, default_value_t = 2048)]
    max_model_len: usize,
    /// KV-cache budget per attention worker, in tokens (default: max-batch x max-model-len / M).
    #[arg(long)]
    kv_tokens: Option<usize>,
    /// The name clients pass as `model` (default: the directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    #[arg(long, default_value_t = 30)]
    drain_timeout_s: u64,
    /// After a worker is lost, how long the group has to be whole again
    /// (a replacement started and joined) before the requests in flight
    /// fail and the server reports itself down.
    #[arg(long, default_value_t = 60)]
    recovery_timeout_s: u64,
    /// Require `Authorization: Bearer <key>` on `/v1/*` (as vLLM's
    /// `--api-key`; `/health` and `/metrics` stay open). Set it whenever
    /// `--host` is not a loopback address. From the environment, it stays
    /// out of the process list.
    #[arg(long, env = "MOE_SERVE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Where workers dial the server's control channel: loopback (a free
    /// port) by default; an address other hosts reach (and a fixed port)
    /// to take workers started there with `--join`.
    #[arg(long, default_value = "127.0.0.1:0")]
    control_listen: String,
    /// The workers this server starts itself: `all`, `attention`,
    /// `expert` or `none` (the others must join with `--join`).
    #[arg(long, default_value = "all")]
    spawn: String,
    /// A file holding the group's secret, which every worker presents (or
    /// `MOE_SERVE_SECRET`). Needed when workers join from other hosts;
    /// otherwise a random one is made for the local workers.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Run as a worker that joins the server whose control channel is at
    /// HOST:PORT (with `--worker ROLE --rank R`, the server's `--model`,
    /// `--attention`, `--experts`, `--microbatches`,
    /// `--max-tokens-per-mb`, and the group's secret). Under `mpiexec`,
    /// the rank comes from the MPI launcher when `--rank` is not given,
    /// and so does the role when `--worker` is not: world ranks `0..M`
    /// are the attention workers, the rest the experts.
    #[arg(long, value_name = "HOST:PORT")]
    join: Option<String>,
    /// With `--join`: wait as a standby for this place, and take it over
    /// (without a process start) when its worker is lost.
    #[arg(long, requires = "join")]
    standby: bool,
    /// The worker's role (`attention` or `expert`; with `--join`).
    #[arg(long)]
    worker: Option<String>,
    /// The worker's rank (with `--join`).
    #[arg(long)]
    rank: Option<usize>,
}

fn deployment(a: &Args) -> Deployment {
    Deployment {
        attention: a.attention,
        experts: a.experts,
        microbatches: a.microbatches,
        max_tokens: a.max_tokens_per_mb,
    }
}

fn main() -> ExitCode {
    let a = Args::parse();
    if a.join.is_some() {
        return match joining_place(&a) {
            Ok((role, rank)) => worker(&a, &role, rank),
            Err(e) => {
                eprintln!("moe-serve: {e}");
                ExitCode::from(2)
            }
        };
    }
    if let (Some(role), Some(rank)) = (a.worker.as_deref(), a.rank) {
        return worker(&a, role, rank);
    }
    match server(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moe-serve: {e}");
            ExitCode::FAILURE
        }
    }
}

fn worker(a: &Args, role: &str, rank: usize) -> ExitCode {
    // Steps are bounded by the engine's own timeout; a lost peer ends any wait.
    let timeout = Duration::from_secs(600);
    let body = |role, first: Option<&m2n::UniqueId>| {
        let deploy = deployment(a);
        let addr = match &a.join {
            Some(addr) => addr.clone(),
            None => std::env::var(CONTROL_ADDR_ENV)
                .map_err(|_| RuntimeError::Config(format!("{CONTROL_ADDR_ENV} is not set")))?,
        };
        let dial = control::Dial {
            addr,
            secret: secret(a)?.unwrap_or_default(),
            standby: a.standby,
            deploy,
        };
        let result = match role {
            Role::Attention => {
                let (config, weights) = launch::attention_weights(&a.model, deploy)?;
                let mut join = |uid: &m2n::UniqueId| {
                    launch::join(&config, &deploy, Role::Attention, rank, uid)
                };
                let build =
                    |comm| AttentionWorker::new(config.clone(), deploy, weights, comm, timeout);
                control::serve_attention(rank, &dial, first, &mut join, build)
            }
            Role::Expert => {
                let (config, weights) = launch::expert_weights(&a.model, deploy, rank)?;
                let mut make = |w, uid: &m2n::UniqueId| {
                    launch::expert_join(&config, deploy, w, rank, uid, timeout)
                };
                control::serve_expert(weights, rank, first, &dial, &mut make)
            }
        };
        // The server reads its workers' reports only at the end: say it now too.
        result.inspect_err(|e| eprintln!("moe-serve: {role} {rank}: {e}"))
    };
    if a.join.is_some() {
        // Started by hand (or by a service manager) on any host: it learns
        // its group over the control channel.
        return match role.parse::<Role>() {
            Ok(r) => match body(r, None) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::from(3),
            },
            Err(e) => {
                eprintln!("moe-serve: --worker {role}: {e}");
                ExitCode::from(2)
            }
        };
    }
    launch::serving_worker_main("moe-serve", role, rank, true, body)
}

/// The world rank an MPI launcher gave this process (MPICH's and Open
/// MPI's variables), if any.
fn mpi_rank() -> Option<usize> {
    ["PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

/// A joining worker's role and rank: the flags, else from the MPI world
/// rank (`--worker` given: that role's rank; neither: ranks `0..M` are
/// attention, the rest experts).
fn joining_place(a: &Args) -> Result<(String, usize), String> {
    let world = mpi_rank();
    match (&a.worker, a.rank, world) {
        (Some(role), Some(rank), _) => Ok((role.clone(), rank)),
        (Some(role), None, Some(w)) => Ok((role.clone(), w)),
        (None, None, Some(w)) if w < a.attention => Ok(("attention".into(), w)),
        (None, None, Some(w)) if w < a.attention + a.experts => {
            Ok(("expert".into(), w - a.attention))
        }
        (None, None, Some(w)) => Err(format!(
            "MPI rank {w} is past the {} attention + {} expert workers of --attention/--experts",
            a.attention, a.experts
        )),
        _ => Err(
            "--join needs --worker ROLE and --rank R (or an MPI launcher that gives the rank)"
                .into(),
        ),
    }
}

/// The group's secret: `--secret-file`, else `MOE_SERVE_SECRET`; `None`
/// when neither is given.
fn secret(a: &Args) -> Result<Option<String>, RuntimeError> {
    if let Some(path) = &a.secret_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RuntimeError::Config(format!("--secret-file {}: {e}", path.display())))?;
        let text = text.trim().to_string();
        if text.len() < 16 {
            return Err(RuntimeError::Config(format!(
                "--secret-file {}: a secret of at least 16 characters, please",
                path.display()
            )));
        }
        return Ok(Some(text));
    }
    Ok(std::env::var(control::SECRET_ENV)
        .ok()
        .filter(|s| !s.is_empty()))
}

/// A random secret for a group whose workers are all started here.
fn random_secret() -> Result<String, RuntimeError> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| RuntimeError::Io(format!("cannot read /dev/urandom for a secret: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The roles `--spawn` names.
fn spawned_roles(a: &Args) -> Result<Vec<Role>, RuntimeError> {
    Ok(match a.spawn.as_str() {
        "all" => vec![Role::Attention, Role::Expert],
        "attention" => vec![Role::Attention],
        "expert" => vec![Role::Expert],
        "none" => vec![],
        other => {
            return Err(RuntimeError::Config(format!(
                "--spawn {other}: all, attention, expert or none"
            )))
        }
    })
}

/// The server: checks the model and flags, starts the workers and the
/// engine, serves HTTP until a signal has drained it, then reports how the
/// workers ended.
fn server(a: &Args) -> Result<(), RuntimeError> {
    let config = checked_config(a)?;
    let tokenizer = Tokenizer::load(&a.model, config.vocab as usize)?;
    let name = served_model_name(a, &config);
    let (http, addr) = listen(a)?;
    if a.api_key.is_none() && !addr.ip().is_loopback() {
        eprintln!(
            "moe-serve: warning: listening on {addr} without an API key: anyone who can reach it can use it (set --api-key or MOE_SERVE_API_KEY)"
        );
    }
    let roles = spawned_roles(a)?;
    let control_addr: SocketAddr = a
        .control_listen
        .parse()
        .map_err(|e| RuntimeError::Config(format!("--control-listen {}: {e}", a.control_listen)))?;
    let secret = match secret(a)? {
        Some(s) => s,
        None if control_addr.ip().is_loopback() => random_secret()?,
        None => {
            return Err(RuntimeError::Config(format!(
                "--control-listen {control_addr} takes workers from other hosts: give the group a secret (--secret-file or {})",
                control::SECRET_ENV
            )))
        }
    };
    let control = TcpListener::bind(control_addr)
        .map_err(|e| RuntimeError::Io(format!("control listener on {control_addr}: {e}")))?;
    let control_addr = control
        .local_addr()
        .map_err(|e| RuntimeError::Io(e.to_string()))?;
    if roles.len() < 2 {
        eprintln!("moe-serve: waiting for workers to join at {control_addr}");
    }
    let group = Arc::new(Mutex::new(spawn_workers(a, &roles, control_addr, &secret)?));
    let metrics = Arc::new(Metrics::new(&name));
    let accept_timeout = Duration::from_secs(120);
    let supervisor = Box::new(Local {
        group: group.clone(),
        root_ip: control_addr.ip(),
    });
    let (engine, engine_thread) = match engine::start(
        control,
        secret,
        engine_config(a)?,
        metrics.clone(),
        accept_timeout,
        supervisor,
    ) {
        Ok(x) => x,
        Err(e) => return Err(workers_did_not_start(owned(group), e)),
    };
    let watcher = watch_workers(group, engine.clone());
    let state = Arc::new(AppState {
        engine: engine.clone(),
        tokenizer: Arc::new(tokenizer),
        metrics,
        model: name,
        max_model_len: a.max_model_len,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        engine_vocab: config.vocab as usize,
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
    });
    // Lives to the end: tasks still running after the HTTP server stops
    // (streams the drain ends) go with it, after the workers' report.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| RuntimeError::Io(format!("tokio: {e}")))?;
    serve_http(&rt, a, http, addr, state, &engine)?;
    let _ = engine_thread.join();
    let outs = watcher.join().unwrap_or_default();
    stopped(&engine, &outs)
}

/// The model's configuration, once the deployment, the checkpoint and the
/// batch flags are known to fit it.
fn checked_config(a: &Args) -> Result<ModelConfig, RuntimeError> {
    let config = load_config(&a.model)?;
    deployment(a).validate(&config)?;
    Checkpoint::open(&a.model)?.verify(&config)?;
    if a.max_batch == 0 || a.max_model_len < 2 {
        return Err(RuntimeError::Config(
            "--max-batch must be >= 1 and --max-model-len >= 2".into(),
        ));
    }
    Ok(config)
}

/// `--served-model-name`, else the model directory's name, else the
/// configuration's.
fn served_model_name(a: &Args, config: &ModelConfig) -> String {
    a.served_model_name.clone().unwrap_or_else(|| {
        a.model
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| config.name.clone())
    })
}

/// The HTTP listener on `--host`/`--port`.
fn listen(a: &Args) -> Result<(TcpListener, SocketAddr), RuntimeError> {
    let addr: SocketAddr = format!("{}:{}", a.host, a.port)
        .parse()
        .map_err(|e| RuntimeError::Config(format!("--host {} --port {}: {e}", a.host, a.port)))?;
    let http = TcpListener::bind(addr)
        .map_err(|e| RuntimeError::Io(format!("cannot listen on {addr}: {e}")))?;
    Ok((http, addr))
}

/// Starts the worker processes of `roles` (this executable with
/// `--worker`); they dial the engine at `control_addr` with `secret`.
fn spawn_workers(
    a: &Args,
    roles: &[Role],
    control_addr: SocketAddr,
    secret: &str,
) -> Result<launch::Group, RuntimeError> {
    let mut args: Vec<String> = vec![
        "--model".into(),
        a.model.display().to_string(),
        "--attention".into(),
        a.attention.to_string(),
        "--experts".into(),
        a.experts.to_string(),
        "--microbatches".into(),
        a.microbatches.to_string(),
        "--max-tokens-per-mb".into(),
        a.max_tokens_per_mb.to_string(),
    ];
    args.shrink_to_fit();
    let env = [
        (CONTROL_ADDR_ENV.to_string(), control_addr.to_string()),
        (control::SECRET_ENV.to_string(), secret.to_string()),
    ];
    launch::spawn_unjoined(&deployment(a), roles, &args, &env, Duration::from_secs(120))
}

/// The scheduler's limits from the flags (and m2n's peer timeout, which
/// bounds how long a live worker takes to notice a loss).
fn engine_config(a: &Args) -> Result<EngineConfig, RuntimeError> {
    let m2n = m2n::Config::from_env().map_err(|e| RuntimeError::Config(e.to_string()))?;
    Ok(EngineConfig {
        attention: a.attention,
        experts: a.experts,
        max_batch: a.max_batch,
        max_queue: a.max_queue,
        kv_tokens_per_worker: a
            .kv_tokens
            .unwrap_or_else(|| (a.max_batch * a.max_model_len).div_ceil(a.attention)),
        step_timeout: Duration::from_secs(120),
        loss_window: m2n.peer_timeout * 2 + Duration::from_secs(1),
        recovery_timeout: Duration::from_secs(a.recovery_timeout_s),
        deployment: control::deployment_words(&deployment(a)),
    })
}

/// The workers this server started, as the engine's supervisor: a new
/// group is a new rendezvous root here (on the control channel's address,
/// which workers from other hosts reach too); a replacement is a new
/// process, for the roles this server starts.
struct Local {
    group: Arc<Mutex<launch::Group>>,
    root_ip: std::net::IpAddr,
}

impl Supervisor for Local {
    fn new_group(&mut self) -> Result<String, String> {
        lock(&self.group)
            .new_root(self.root_ip, engine::REFORM_ROOT_TIMEOUT)
            .map_err(|e| e.to_string())
    }
    fn replace(&mut self, slot: Slot) -> Result<Option<u32>, String> {
        let mut g = lock(&self.group);
        if !g.starts(slot.role) {
            return Ok(None);
        }
        g.replace(slot.role, slot.rank)
            .map(Some)
            .map_err(|e| e.to_string())
    }
}

fn lock(g: &Mutex<launch::Group>) -> std::sync::MutexGuard<'_, launch::Group> {
    g.lock().unwrap_or_else(|p| p.into_inner())
}

/// The group back from its sharers (the engine's supervisor goes with the
/// engine).
fn owned(mut group: Arc<Mutex<launch::Group>>) -> launch::Group {
    loop {
        match Arc::try_unwrap(group) {
            Ok(m) => return m.into_inner().unwrap_or_else(|p| p.into_inner()),
            Err(back) => {
                group = back;
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// The engine could not start (`e`): stops the group and says why, with
/// what the workers reported.
fn workers_did_not_start(mut group: launch::Group, e: String) -> RuntimeError {
    group.kill_all();
    let outs = group.wait(Duration::from_secs(1));
    let why = launch::verdict(&outs).err().unwrap_or_default();
    RuntimeError::Io(format!("the workers did not start: {e}\n{why}"))
}

/// Watches the worker processes: each exit goes to the engine (which
/// replaces the worker). Once the engine has stopped, waits for the
/// workers (10 s at most), and the thread returns how each ended.
fn watch_workers(
    group: Arc<Mutex<launch::Group>>,
    engine: EngineHandle,
) -> JoinHandle<Vec<WorkerOutput>> {
    std::thread::spawn(move || loop {
        for (role, rank, pid, why) in lock(&group).newly_exited() {
            engine.lost(Slot { role, rank }, pid, why);
        }
        if engine.shared.stopped() {
            // Workers finish their last step and exit on their own.
            let t0 = Instant::now();
            let all_exited = || {
                let mut g = lock(&group);
                g.exited().len() == g.len()
            };
            while !all_exited() && t0.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let mut group = owned(group);
            group.kill_all();
            return group.wait(Duration::from_secs(1));
        }
        std::thread::sleep(Duration::from_millis(20));
    })
}

/// Serves HTTP on `http`, on `rt`, until SIGTERM or SIGINT, which drains
/// the engine (running requests get `--drain-timeout-s`).
fn serve_http(
    rt: &tokio::runtime::Runtime,
    a: &Args,
    http: TcpListener,
    addr: SocketAddr,
    state: Arc<AppState>,
    engine: &EngineHandle,
) -> Result<(), RuntimeError> {
    let drain = Duration::from_secs(a.drain_timeout_s);
    rt.block_on(async {
        http.set_nonblocking(true).map_err(|e| RuntimeError::Io(e.to_string()))?;
        let listener = tokio::net::TcpListener::from_std(http).map_err(|e| RuntimeError::Io(e.to_string()))?;
        println!(
            "moe-serve: model {} ({} attention x {} expert workers, {} micro-batches, {}) listening on http://{addr}",
            state.model,
            a.attention,
            a.experts,
            a.microbatches,
            state.tokenizer.describe()
        );
        axum::serve(listener, http::router(state))
            .with_graceful_shutdown(drain_on_signal(engine.clone(), drain))
            .await
            .map_err(|e| RuntimeError::Io(format!("HTTP server: {e}")))
    })
}

/// Waits for SIGTERM or SIGINT, then drains the engine: no new requests,
/// running ones get until `drain` from now.
async fn drain_on_signal(engine: EngineHandle, drain: Duration) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    eprintln!("moe-serve: draining (up to {drain:?})");
    engine.drain(Instant::now() + drain);
}

/// After the drain: an error if the engine stopped unhealthy; else the
/// workers that did not end well are named, and the server says it
/// stopped.
fn stopped(engine: &EngineHandle, outs: &[WorkerOutput]) -> Result<(), RuntimeError> {
    let failed: Vec<String> = outs
        .iter()
        .filter(|o| !o.ok())
        .map(|o| {
            format!(
                "{} {}: {}",
                o.role,
                o.rank,
                o.error.clone().unwrap_or_else(|| format!("{:?}", o.status))
            )
        })
        .collect();
    if let Some(why) = engine.shared.unhealthy() {
        return Err(RuntimeError::Io(format!("stopped unhealthy: {why}")));
    }
    if !failed.is_empty() {
        eprintln!("moe-serve: workers at shutdown: {}", failed.join("; "));
    }
    eprintln!("moe-serve: stopped");
    Ok(())
}
