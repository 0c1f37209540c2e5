//! Launching demo workers as separate processes, with the test as the
//! bootstrap root, so a test can kill, stop or mislead single ranks.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use m2n::{Role, Root, UniqueId};

pub const DEMO: &str = env!("CARGO_BIN_EXE_m2n-demo");

/// One worker process and its output lines.
pub struct Worker {
    pub role: Role,
    pub rank: usize,
    pub child: Child,
    lines: Receiver<String>,
    pub seen: Vec<String>,
}

impl Worker {
    /// Collects the output lines of `child` in the background.
    pub fn watch(role: Role, rank: usize, mut child: Child) -> Worker {
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Worker {
            role,
            rank,
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first error line it printed (`M2N-ERROR ...`), or "" if none
    /// (call after `wait_exit`, which collects its lines).
    pub fn error_line(&self) -> String {
        self.seen
            .iter()
            .find(|l| l.starts_with("M2N-ERROR"))
            .cloned()
            .unwrap_or_default()
    }

    /// Waits for a line starting with `prefix`, up to `timeout`.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Option<String> {
        if let Some(l) = self.seen.iter().find(|l| l.starts_with(prefix)) {
            return Some(l.clone());
        }
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return Some(l);
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }

    /// Waits for the process to exit, up to `timeout`; kills it otherwise.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                // Collect what is left of the output.
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(l);
                }
                return Some(s);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig)
            .expect("signal worker");
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // What libfabric's shm provider left in /dev/shm if the worker was
        // killed, and no survivor outlived it to remove (m2n names them
        // `m2n-PID-TOKEN:...`).
        let stem = format!("m2n-{}-", self.child.id());
        for entry in std::fs::read_dir("/dev/shm")
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with(&stem) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// Starts one worker of an `m` x `n` group with extra demo flags and env.
pub fn spawn_worker(
    uid: &UniqueId,
    role: Role,
    rank: usize,
    m: usize,
    n: usize,
    flags: &[&str],
    env: &[(&str, &str)],
) -> Worker {
    spawn_worker_in(&[], uid, role, rank, m, n, flags, env)
}

/// Like [`spawn_worker`], run under a command prefix (e.g. `ip netns exec ns`).
#[allow(clippy::too_many_arguments)]
pub fn spawn_worker_in(
    prefix: &[&str],
    uid: &UniqueId,
    role: Role,
    rank: usize,
    m: usize,
    n: usize,
    flags: &[&str],
    env: &[(&str, &str)],
) -> Worker {
    let mut cmd = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(DEMO);
            c
        }
        None => Command::new(DEMO),
    };
    cmd.args([
        "--worker",
        "--role",
        role.name(),
        "--rank",
        &rank.to_string(),
    ])
    .args(["--senders", &m.to_string(), "--receivers", &n.to_string()])
    .args(flags)
    .env("M2N_UNIQUE_ID", uid.to_string())
    .stdout(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn m2n-demo worker");
    Worker::watch(role, rank, child)
}

/// A bootstrap root on loopback, served on a thread for up to 60 s: its
/// unique id, and the thread.
pub fn served_root() -> (
    UniqueId,
    std::thread::JoinHandle<Result<(), m2n::bootstrap::BootstrapError>>,
) {
    let root = Root::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let uid = root.unique_id().clone();
    (uid, root.spawn(Duration::from_secs(60)))
}

/// A root plus every worker of an `m` x `n` group.
pub fn spawn_group(
    m: usize,
    n: usize,
    flags: &[&str],
    env: &[(&str, &str)],
) -> (
    Vec<Worker>,
    std::thread::JoinHandle<Result<(), m2n::bootstrap::BootstrapError>>,
) {
    let (uid, served) = served_root();
    let mut workers = Vec::new();
    for rank in 0..m {
        workers.push(spawn_worker(&uid, Role::Attention, rank, m, n, flags, env));
    }
    for rank in 0..n {
        workers.push(spawn_worker(&uid, Role::Expert, rank, m, n, flags, env));
    }
    (workers, served)
}

/// Runs the demo launcher and returns (success, stdout, stderr).
pub fn run_demo(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(DEMO);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run m2n-demo");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
