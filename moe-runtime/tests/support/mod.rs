//! Shared by the runtime's integration tests: test checkpoints and runs of
//! the `moe-run` binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use moe_runtime::model::config_by_name;
use moe_runtime::model::init::{write_checkpoint, StoreDtype};

pub const MOE_RUN: &str = env!("CARGO_BIN_EXE_moe-run");

/// A fresh directory under the target dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let base = std::env::var_os("CARGO_TARGET_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("moe-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A seeded random checkpoint of a preset in `dir/name`.
pub fn checkpoint(
    dir: &Path,
    preset: &str,
    seed: u64,
    shards: usize,
    dtype: StoreDtype,
) -> PathBuf {
    let out = dir.join(format!("{preset}-{seed}-{shards}-{dtype:?}"));
    let c = config_by_name(preset).unwrap();
    write_checkpoint(&c, seed, &out, shards, dtype).unwrap();
    out
}

/// Runs `moe-run` with `args` and `env`.
pub fn moe_run(args: &[String], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(MOE_RUN);
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("start moe-run")
}

/// Prompt flags: `--prompt-ids a,b,c` per prompt.
pub fn prompt_args(prompts: &[Vec<u32>]) -> Vec<String> {
    prompts
        .iter()
        .flat_map(|p| {
            [
                "--prompt-ids".to_string(),
                p.iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `(tokens, logprobs)` lines of a run, in order.
pub fn results(out: &str) -> Vec<(Vec<u32>, Vec<f32>)> {
    let mut r: Vec<(Vec<u32>, Vec<f32>)> = Vec::new();
    for line in out.lines() {
        if let Some(t) = line.strip_prefix("tokens:") {
            r.push((
                t.split_whitespace().map(|x| x.parse().unwrap()).collect(),
                Vec::new(),
            ));
        } else if let Some(l) = line.strip_prefix("logprobs:") {
            r.last_mut().expect("logprobs after tokens").1 =
                l.split_whitespace().map(|x| x.parse().unwrap()).collect();
        }
    }
    r
}

/// The pid of a process whose command line holds both `model` and `needle`
/// (a worker of a test's own group).
pub fn pid_with(model: &str, needle: &str) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(model) && cmd.contains(needle) {
            return Some(pid);
        }
    }
    None
}

/// Passes what a child writes to `from` on to this test's stderr, line by
/// line with `tag` in front, from a thread: a chatty child never blocks on
/// a full pipe that nobody reads, and the harness shows its log when the
/// test fails (spawned threads share the test's output capture).
#[allow(dead_code)] // not every test binary relays
pub fn relay(tag: &str, from: impl std::io::Read + Send + 'static) {
    use std::io::BufRead;
    let tag = tag.to_string();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            eprintln!("[{tag}] {line}");
        }
    });
}
