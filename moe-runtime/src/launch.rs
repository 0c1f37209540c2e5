//! Starting a disaggregated group: a launcher hosts m2n's rendezvous root
//! and starts one process per worker (its own executable with `--worker
//! ROLE --rank R`), as `m2n-demo` does; each worker joins the group and
//! reports on stdout in lines the launcher reads:
//!
//! - `MOE-OUT <text>`: a result line, passed through;
//! - `MOE-ERROR <role> <rank>: <error>`: what stopped it.
//!
//! A worker that dies makes its peers fail with m2n's `PeerLost` naming it;
//! the launcher then reports every worker that failed, the lost ones (those
//! killed by a signal or that exited without a word) first.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use m2n::{Communicator, Config, Role, Root, Shape, UniqueId};

use crate::model::weights::{AttentionWeights, Checkpoint, ExpertWeights};
use crate::model::{load_config, ModelConfig, RuntimeError};
use crate::worker::attention::AttentionWorker;
use crate::worker::expert::ExpertWorker;
use crate::worker::Deployment;

/// Set in the workers a launcher starts (they then report `MOE-READY`).
pub const LAUNCHED_ENV: &str = "MOE_LAUNCHED";

/// Set in a replacement worker: it joins the group whose id its control
/// channel brings, not `M2N_UNIQUE_ID`.
pub const REPLACEMENT_ENV: &str = "MOE_REPLACEMENT";

fn ready(role: Role, rank: usize) {
    if std::env::var_os(LAUNCHED_ENV).is_some() {
        use std::io::Write;
        println!("MOE-READY {role} {rank}");
        let _ = std::io::stdout().flush();
    }
}

/// What one worker process printed and how it ended.
#[derive(Debug)]
pub struct WorkerOutput {
    pub role: Role,
    pub rank: usize,
    pub status: std::io::Result<ExitStatus>,
    /// Its `MOE-OUT` lines, without the prefix.
    pub out: Vec<String>,
    /// Its `MOE-ERROR` line, if any.
    pub error: Option<String>,
    /// The launcher stopped it after another worker failed.
    pub stopped: bool,
}

impl WorkerOutput {
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.status.as_ref().is_ok_and(|s| s.success())
    }

    /// Killed by a signal, or exited without saying why: a lost worker,
    /// not one that gave up because a peer was lost.
    pub fn lost(&self) -> Option<String> {
        use std::os::unix::process::ExitStatusExt;
        if self.stopped {
            return None;
        }
        match &self.status {
            Ok(s) if s.signal().is_some() => {
                Some(format!("killed by signal {}", s.signal().unwrap_or(0)))
            }
            Ok(s) if !s.success() && self.error.is_none() => {
                Some(format!("exited with {s} without an error report"))
            }
            Err(e) => Some(format!("could not be waited for: {e}")),
            _ => None,
        }
    }
}

/// One worker process a launcher started.
#[derive(Debug)]
struct Child1 {
    role: Role,
    rank: usize,
    child: Child,
    /// Its stdout lines, when it has ended.
    lines: std::thread::JoinHandle<Vec<String>>,
    /// Its `MOE-ERROR` line as soon as it prints one.
    error: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// Its exit was reported by [`Group::newly_exited`].
    reported: bool,
}

/// A started group of worker processes.
#[derive(Debug)]
pub struct Group {
    children: Vec<Child1>,
    root: Option<std::thread::JoinHandle<Result<(), m2n::bootstrap::BootstrapError>>>,
    exe: std::path::PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    bootstrap: Duration,
    joined: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    announce: bool,
    /// The roles whose workers this group starts (and replaces).
    roles: Vec<Role>,
}

/// Starts `deploy.attention + deploy.experts` copies of this executable
/// with `args` plus `--worker ROLE --rank R` and `env`, joined through a fresh
/// rendezvous root. With `announce`, prints `<program>: all N workers
/// joined the group` on stderr once every worker has joined.
pub fn spawn(
    deploy: &Deployment,
    args: &[String],
    env: &[(String, String)],
    bootstrap: Duration,
    announce: bool,
) -> Result<Group, RuntimeError> {
    let roles = [Role::Attention, Role::Expert];
    let mut group = Group::new(&roles, args, env, bootstrap, announce)?;
    let (uid, served) = group.open_root()?;
    group.root = Some(served);
    group.start_all(deploy, Some(&uid))?;
    Ok(group)
}

/// Starts the workers of `roles` (all ranks of each) as [`spawn`] does,
/// but without a group: each learns its group's id over its control
/// channel ([`REPLACEMENT_ENV`] is set), as `moe-serve`'s workers do.
pub fn spawn_unjoined(
    deploy: &Deployment,
    roles: &[Role],
    args: &[String],
    env: &[(String, String)],
    bootstrap: Duration,
) -> Result<Group, RuntimeError> {
    let mut group = Group::new(roles, args, env, bootstrap, false)?;
    group.start_all(deploy, None)?;
    Ok(group)
}

impl Group {
    /// A group of no workers yet, which starts those of `roles`.
    fn new(
        roles: &[Role],
        args: &[String],
        env: &[(String, String)],
        bootstrap: Duration,
        announce: bool,
    ) -> Result<Self, RuntimeError> {
        let exe = std::env::current_exe()
            .map_err(|e| RuntimeError::Io(format!("cannot find my own executable: {e}")))?;
        Ok(Group {
            children: Vec::new(),
            root: None,
            exe,
            args: args.to_vec(),
            env: env.to_vec(),
            bootstrap,
            joined: Default::default(),
            announce,
            roles: roles.to_vec(),
        })
    }

    /// Starts every rank of its roles (joining `uid`, if given); on a
    /// failure, stops those started.
    fn start_all(&mut self, deploy: &Deployment, uid: Option<&str>) -> Result<(), RuntimeError> {
        let total = deploy.attention + deploy.experts;
        for role in self.roles.clone() {
            let count = match role {
                Role::Attention => deploy.attention,
                Role::Expert => deploy.experts,
            };
            for rank in 0..count {
                if let Err(e) = self.start(role, rank, uid, total) {
                    self.kill_all();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Worker processes it holds.
    pub fn len(&self) -> usize {
        self.children.len()
    }

    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// Whether this group started (and replaces) the workers of `role`.
    pub fn starts(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// A rendezvous root for a new group, served on its own thread.
    #[allow(clippy::type_complexity)]
    fn open_root(
        &self,
    ) -> Result<
        (
            String,
            std::thread::JoinHandle<Result<(), m2n::bootstrap::BootstrapError>>,
        ),
        RuntimeError,
    > {
        let root = Root::bind("127.0.0.1:0".parse().expect("literal address"))
            .map_err(|e| RuntimeError::Io(format!("cannot start the rendezvous root: {e}")))?;
        let uid = root.unique_id().to_string();
        Ok((uid, root.spawn(self.bootstrap)))
    }

    /// Opens the rendezvous of a re-formed group (after a loss): its
    /// unique id, for the survivors and the replacements.
    pub fn new_root(
        &mut self,
        ip: std::net::IpAddr,
        timeout: Duration,
    ) -> Result<String, RuntimeError> {
        // The root's thread ends once every member joined, or times out.
        let root = Root::bind(std::net::SocketAddr::new(ip, 0))
            .map_err(|e| RuntimeError::Io(format!("cannot start the rendezvous root: {e}")))?;
        let uid = root.unique_id().to_string();
        let _served = root.spawn(timeout);
        Ok(uid)
    }

    /// Starts the worker `role rank` joining group `uid`; its process id.
    fn start(
        &mut self,
        role: Role,
        rank: usize,
        uid: Option<&str>,
        total: usize,
    ) -> Result<u32, RuntimeError> {
        let mut cmd = Command::new(&self.exe);
        cmd.args(&self.args)
            .args(["--worker", role.name(), "--rank", &rank.to_string()])
            .env(LAUNCHED_ENV, "1")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::piped());
        match uid {
            Some(uid) => cmd.env("M2N_UNIQUE_ID", uid).env_remove(REPLACEMENT_ENV),
            None => cmd.env(REPLACEMENT_ENV, "1").env_remove("M2N_UNIQUE_ID"),
        };
        let mut child = cmd
            .spawn()
            .map_err(|e| RuntimeError::Io(format!("cannot start {role} {rank}: {e}")))?;
        let stdout = child.stdout.take().expect("piped");
        let (joined, announce) = (self.joined.clone(), self.announce);
        let prog = self
            .exe
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let error = std::sync::Arc::new(std::sync::Mutex::new(None));
        let seen = error.clone();
        let lines = std::thread::spawn(move || {
            let mut out = Vec::new();
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if l.starts_with("MOE-READY ") {
                    let n = joined.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    if n == total && announce {
                        eprintln!("{prog}: all {total} workers joined the group");
                    }
                }
                if let Some(e) = l.strip_prefix("MOE-ERROR ") {
                    *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                }
                out.push(l);
            }
            out
        });
        let pid = child.id();
        self.children.push(Child1 {
            role,
            rank,
            child,
            lines,
            error,
            reported: false,
        });
        Ok(pid)
    }

    /// Stops the worker `role rank` if it still runs (SIGKILL: a stopped
    /// one too) and starts another for the same place; the new one's
    /// process id. Only it loads weights; it learns its group over the
    /// control channel ([`REPLACEMENT_ENV`] is set, `M2N_UNIQUE_ID` not).
    pub fn replace(&mut self, role: Role, rank: usize) -> Result<u32, RuntimeError> {
        if let Some(i) = self
            .children
            .iter()
            .position(|c| c.role == role && c.rank == rank)
        {
            let mut old = self.children.remove(i);
            let _ = old.child.kill();
            let _ = old.child.wait();
            let _ = old.lines.join();
        }
        self.start(role, rank, None, 0)
    }

    /// Workers that have exited, each reported once: role, rank, process
    /// id, and how it ended (its status and its `MOE-ERROR` line, if any).
    pub fn newly_exited(&mut self) -> Vec<(Role, usize, u32, String)> {
        let mut out = Vec::new();
        for c in self.children.iter_mut().filter(|c| !c.reported) {
            if let Ok(Some(s)) = c.child.try_wait() {
                c.reported = true;
                // Its last line may still be in the pipe.
                std::thread::sleep(Duration::from_millis(20));
                let error = c.error.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let why = match error {
                    Some(e) => format!("exited ({s}): {e}"),
                    None => format!("exited ({s})"),
                };
                out.push((c.role, c.rank, c.child.id(), why));
            }
        }
        out
    }

    /// Workers that have exited, with their status.
    pub fn exited(&mut self) -> Vec<(Role, usize, ExitStatus)> {
        let mut out = Vec::new();
        for c in self.children.iter_mut() {
            if let Ok(Some(s)) = c.child.try_wait() {
                out.push((c.role, c.rank, s));
            }
        }
        out
    }

    /// Kills every worker still running.
    pub fn kill_all(&mut self) {
        for c in self.children.iter_mut() {
            if let Ok(None) = c.child.try_wait() {
                let _ = c.child.kill();
            }
        }
    }

    /// Process ids, by role and rank (for fault tests).
    pub fn pids(&self) -> Vec<(Role, usize, u32)> {
        self.children
            .iter()
            .map(|c| (c.role, c.rank, c.child.id()))
            .collect()
    }

    /// Waits for every worker. Once one fails, the others get `grace` to
    /// notice (their errors name the lost peer) and are then stopped, so a
    /// worker stuck before the group formed cannot hold the launcher.
    pub fn wait(mut self, grace: Duration) -> Vec<WorkerOutput> {
        let mut children: Vec<(Role, usize, Child, std::thread::JoinHandle<Vec<String>>)> =
            std::mem::take(&mut self.children)
                .into_iter()
                .map(|c| (c.role, c.rank, c.child, c.lines))
                .collect();
        let mut status: Vec<Option<std::io::Result<ExitStatus>>> =
            children.iter().map(|_| None).collect();
        let mut stopped = vec![false; children.len()];
        let mut failed_at: Option<std::time::Instant> = None;
        while status.iter().any(Option::is_none) {
            for (i, (_, _, child, _)) in children.iter_mut().enumerate() {
                if status[i].is_some() {
                    continue;
                }
                match child.try_wait() {
                    Ok(Some(s)) => {
                        if !s.success() && failed_at.is_none() {
                            failed_at = Some(std::time::Instant::now());
                        }
                        status[i] = Some(Ok(s));
                    }
                    Ok(None) => {
                        if failed_at.is_some_and(|t| t.elapsed() > grace) {
                            let _ = child.kill();
                            stopped[i] = true;
                            status[i] = Some(child.wait());
                        }
                    }
                    Err(e) => status[i] = Some(Err(e)),
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let outs: Vec<WorkerOutput> = children
            .into_iter()
            .zip(status)
            .zip(stopped)
            .map(|(((role, rank, _child, lines), status), stopped)| {
                let lines = lines.join().unwrap_or_default();
                let mut error = lines
                    .iter()
                    .find_map(|l| l.strip_prefix("MOE-ERROR ").map(str::to_string));
                if stopped && error.is_none() {
                    error = Some(format!(
                        "{role} {rank}: stopped by the launcher {grace:?} after another worker failed"
                    ));
                }
                WorkerOutput {
                    role,
                    rank,
                    status: status.expect("every status is in"),
                    out: lines
                        .iter()
                        .filter_map(|l| l.strip_prefix("MOE-OUT ").map(str::to_string))
                        .collect(),
                    error,
                    stopped,
                }
            })
            .collect();
        // The root has served (or will time out on its own): do not wait for it
        // when a worker failed before joining.
        if outs.iter().all(WorkerOutput::ok) {
            if let Some(root) = self.root.take() {
                let _ = root.join();
            }
        }
        outs
    }
}

/// The launcher's verdict on a group: `Ok` when every worker succeeded,
/// else one message naming the lost workers and every error.
pub fn verdict(outs: &[WorkerOutput]) -> Result<(), String> {
    if outs.iter().all(WorkerOutput::ok) {
        return Ok(());
    }
    let mut lines = Vec::new();
    for o in outs {
        if let Some(why) = o.lost() {
            lines.push(format!("lost {} {}: {why}", o.role, o.rank));
        }
    }
    for o in outs {
        if let Some(e) = &o.error {
            lines.push(e.to_string());
        }
    }
    Err(lines.join("\n"))
}

/// m2n's configuration for a deployment: defaults, `M2N_*`, then slots and
/// depth that fit.
pub fn m2n_config(config: &ModelConfig, deploy: &Deployment) -> Result<Config, RuntimeError> {
    let base = Config::from_env().map_err(|e| RuntimeError::Config(e.to_string()))?;
    Ok(deploy.m2n_config(config, base))
}

/// The unique id a launcher passed in `M2N_UNIQUE_ID`.
pub fn unique_id_from_env() -> Result<UniqueId, RuntimeError> {
    let text = std::env::var("M2N_UNIQUE_ID").map_err(|_| {
        RuntimeError::Config("M2N_UNIQUE_ID is not set (the launcher sets it)".into())
    })?;
    text.parse()
        .map_err(|e: String| RuntimeError::Config(format!("M2N_UNIQUE_ID: {e}")))
}

/// Joins group `uid` as `role rank` with m2n's configuration for the
/// deployment (a worker's first group, or one re-formed after a loss).
pub fn join(
    config: &ModelConfig,
    deploy: &Deployment,
    role: Role,
    rank: usize,
    uid: &UniqueId,
) -> Result<Communicator, RuntimeError> {
    let cfg = m2n_config(config, deploy)?;
    let comm = Communicator::init(
        cfg,
        role,
        rank,
        Shape::new(deploy.attention, deploy.experts),
        uid,
    )?;
    ready(role, rank);
    Ok(comm)
}

/// Loads the attention weights.
pub fn attention_weights(
    dir: &Path,
    deploy: Deployment,
) -> Result<(ModelConfig, AttentionWeights), RuntimeError> {
    let config = load_config(dir)?;
    deploy.validate(&config)?;
    let weights = AttentionWeights::load(&Checkpoint::open(dir)?, &config)?;
    Ok((config, weights))
}

/// Loads the attention weights and joins the group as attention `rank`.
pub fn attention_worker(
    dir: &Path,
    deploy: Deployment,
    rank: usize,
    uid: &UniqueId,
    timeout: Duration,
) -> Result<AttentionWorker, RuntimeError> {
    let config = load_config(dir)?;
    deploy.validate(&config)?;
    let weights = AttentionWeights::load(&Checkpoint::open(dir)?, &config)?;
    let comm = join(&config, &deploy, Role::Attention, rank, uid)?;
    AttentionWorker::new(config, deploy, weights, comm, timeout)
}

/// Loads expert worker `rank`'s experts (memory-mapped where the
/// checkpoint allows).
pub fn expert_weights(
    dir: &Path,
    deploy: Deployment,
    rank: usize,
) -> Result<(ModelConfig, ExpertWeights), RuntimeError> {
    let config = load_config(dir)?;
    deploy.validate(&config)?;
    let range = deploy.experts_of(&config, rank);
    let weights = ExpertWeights::load(&Checkpoint::open(dir)?, &config, range.start, range.len())?;
    Ok((config, weights))
}

/// Joins group `uid` as expert `rank` with weights already loaded. When
/// the group does not form, the weights come back with the error (a
/// worker re-joining keeps them).
pub fn expert_join(
    config: &ModelConfig,
    deploy: Deployment,
    weights: ExpertWeights,
    rank: usize,
    uid: &UniqueId,
    timeout: Duration,
) -> Result<ExpertWorker, (Option<Box<ExpertWeights>>, RuntimeError)> {
    let comm = match join(config, &deploy, Role::Expert, rank, uid) {
        Ok(c) => c,
        Err(e) => return Err((Some(Box::new(weights)), e)),
    };
    ExpertWorker::new(config.clone(), deploy, weights, comm, timeout).map_err(|e| (None, e))
}

/// Loads this rank's experts and joins the group as expert `rank`.
pub fn expert_worker(
    dir: &Path,
    deploy: Deployment,
    rank: usize,
    uid: &UniqueId,
    timeout: Duration,
) -> Result<ExpertWorker, RuntimeError> {
    let (config, weights) = expert_weights(dir, deploy, rank)?;
    expert_join(&config, deploy, weights, rank, uid, timeout).map_err(|(_, e)| e)
}

/// The body of a worker process a launcher started: parses `--worker
/// ROLE` (exit 2 if it names none), reads `M2N_UNIQUE_ID`, runs `body`, and
/// reports its error as a `MOE-ERROR` line the launcher reads (exit 3).
pub fn worker_main(
    prog: &str,
    role: &str,
    rank: usize,
    body: impl FnOnce(Role, &UniqueId) -> Result<(), RuntimeError>,
) -> std::process::ExitCode {
    serving_worker_main(prog, role, rank, false, |role, uid| match uid {
        Some(uid) => body(role, uid),
        None => unreachable!("replacements are refused"),
    })
}

/// [`worker_main`] for a worker that may be a replacement
/// ([`REPLACEMENT_ENV`], when `replaceable`): its body gets no unique id
/// and learns it over its control channel.
pub fn serving_worker_main(
    prog: &str,
    role: &str,
    rank: usize,
    replaceable: bool,
    body: impl FnOnce(Role, Option<&UniqueId>) -> Result<(), RuntimeError>,
) -> std::process::ExitCode {
    let role: Role = match role.parse() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{prog}: --worker {role}: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let result = if replaceable && std::env::var_os(REPLACEMENT_ENV).is_some() {
        body(role, None)
    } else {
        unique_id_from_env().and_then(|uid| body(role, Some(&uid)))
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            report_error(role, rank, &e);
            std::process::ExitCode::from(3)
        }
    }
}

/// Prints a worker's error in the launcher's format.
pub fn report_error(role: Role, rank: usize, e: &RuntimeError) {
    println!("MOE-ERROR {role} {rank}: {e}");
}
