//! The closest stand-in here for two hosts: attention workers in one
//! network namespace, expert workers in another, joined by a veth pair,
//! m2n over tcp on their own addresses; the tokens must equal the
//! reference's. Needs root and iproute2; skips with a reason otherwise.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use moe_runtime::model::init::StoreDtype;
use support::*;

#[path = "../../tests/support/netns.rs"]
mod netns;
use netns::Net;

fn in_ns(ns: &str, args: &[String], env: &[(&str, &str)]) -> Child {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, MOE_RUN]).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start a worker")
}

#[test]
fn attention_and_experts_in_two_namespaces_over_tcp_match_the_reference() {
    let net = match Net::create("moe", 9) {
        Ok(n) => n,
        Err(why) => {
            println!(
                "SKIPPED: cannot create network namespaces here ({why}); needs root and iproute2"
            );
            return;
        }
    };
    let dir = TempDir::new("netns");
    let model = checkpoint(dir.path(), "mixtral-mini", 31, 1, StoreDtype::Bf16);
    let prompts: Vec<Vec<u32>> = vec![vec![1, 2, 3], (10..30).collect(), vec![77]];
    let mut common = vec!["--model".to_string(), model.display().to_string()];
    common.extend(prompt_args(&prompts));
    common.extend(
        ["--max-new-tokens", "16", "--logprobs"]
            .iter()
            .map(|s| s.to_string()),
    );
    let reference = moe_run(&[common.clone(), vec!["--reference".into()]].concat(), &[]);
    assert!(reference.status.success(), "{}", stderr(&reference));

    let mut root = in_ns(
        &net.a,
        &[
            "--serve-root".into(),
            "10.231.9.1:0".into(),
            "--timeout-s".into(),
            "60".into(),
        ],
        &[],
    );
    let mut line = String::new();
    BufReader::new(root.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let uid = line
        .trim()
        .strip_prefix("M2N-UID ")
        .expect("the root prints its id")
        .to_string();
    assert!(uid.contains("10.231.9.1"), "{uid}");

    let env = [
        ("M2N_UNIQUE_ID", uid.as_str()),
        ("M2N_TRANSPORT", "tcp"),
        ("M2N_WAIT", "yield"),
    ];
    let shape = ["--attention", "2", "--experts", "2", "--microbatches", "2"].map(String::from);
    let mut workers = Vec::new();
    for (ns, role) in [(&net.a, "attention"), (&net.b, "expert")] {
        for rank in 0..2 {
            let mut args = [common.clone(), shape.to_vec()].concat();
            args.extend([
                "--worker".into(),
                role.into(),
                "--rank".into(),
                rank.to_string(),
            ]);
            workers.push((role, rank, in_ns(ns, &args, &env)));
        }
    }
    let mut lines = Vec::new();
    for (role, rank, w) in workers {
        let o = w.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "{role} {rank}: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        lines.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.strip_prefix("MOE-OUT ").map(str::to_string)),
        );
    }
    assert!(root.wait().unwrap().success());
    // "<i> tokens: ..." lines, in prompt order, without the index.
    let mut keyed: Vec<(usize, bool, String)> = lines
        .iter()
        .map(|l| {
            let (i, rest) = l.split_once(' ').unwrap();
            (
                i.parse().unwrap(),
                rest.starts_with("logprobs"),
                rest.to_string(),
            )
        })
        .collect();
    keyed.sort();
    let got: String = keyed.into_iter().map(|(_, _, t)| t + "\n").collect();
    assert_eq!(got, stdout(&reference));
}

const MOE_SERVE: &str = env!("CARGO_BIN_EXE_moe-serve");
const SECRET: &str = "netns-test-secret-0123456789";

/// `moe-serve` in namespace `ns` with `args` (m2n over tcp, a short peer
/// timeout, the test's secret unless `secret` says otherwise).
/// moe-serve in namespace `ns`; its stderr relayed (see `relay`), its
/// stdout piped for the caller (who relays what it does not read).
fn serve_in(ns: &str, args: &[&str], secret: &str) -> Child {
    let mut c = Command::new("ip")
        .args(["netns", "exec", ns, MOE_SERVE])
        .args(args)
        .env("M2N_TRANSPORT", "tcp")
        .env("M2N_WAIT", "yield")
        .env("M2N_PEER_TIMEOUT_MS", "1500")
        .env("MOE_SERVE_SECRET", secret)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start moe-serve");
    relay(&format!("{ns} {}", c.id()), c.stderr.take().unwrap());
    c
}

/// curl in namespace `ns`: (HTTP status, body).
fn curl_in(ns: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, "curl", "-s", "--max-time", "60"])
        .args(["-w", "\n%{http_code}"]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "-d", b]);
    }
    let out = c
        .arg(format!("http://127.0.0.1:8000{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn metric_in(ns: &str, name: &str) -> f64 {
    let (_, text) = curl_in(ns, "/metrics", None);
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing from /metrics"))
}

/// Greedy completions of four prompts at once: (status, text) each.
fn four_completions(ns: &str) -> Vec<(u16, String)> {
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let ns = ns.to_string();
            std::thread::spawn(move || {
                let body = format!(
                    r#"{{"model": "test-model", "prompt": "Hello number {i}", "max_tokens": 120, "ignore_eos": true, "temperature": 0}}"#
                );
                let (st, body) = curl_in(&ns, "/v1/completions", Some(&body));
                let text = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["choices"][0]["text"].as_str().map(str::to_string))
                    .unwrap_or(body);
                (st, text)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

struct KillOnDrop(Vec<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGCONT,
            );
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The process under `ip netns exec` (its only child, the worker).
fn worker_pid(c: &Child) -> i32 {
    // `ip netns exec` execs the program: same process.
    c.id() as i32
}

fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !ok() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(secs),
            "{what}: not within {secs} s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn experts_join_moe_serve_from_another_namespace_and_standbys_take_over() {
    use nix::sys::signal::Signal::{SIGCONT, SIGKILL, SIGSTOP};
    let net = match Net::create("msv", 10) {
        Ok(n) => n,
        Err(why) => {
            println!(
                "SKIPPED: cannot create network namespaces here ({why}); needs root and iproute2"
            );
            return;
        }
    };
    let dir = TempDir::new("netns-serve");
    let model = checkpoint(dir.path(), "tiny", 4, 1, StoreDtype::Bf16);
    let model = model.display().to_string();
    let control = "10.231.10.1:7411";
    let shape = ["--attention", "1", "--experts", "2"];
    let mut server = serve_in(
        &net.a,
        &[
            &["--model", &model, "--served-model-name", "test-model"],
            &shape[..],
            &["--spawn", "attention", "--control-listen", control],
            &["--port", "8000", "--recovery-timeout-s", "30"],
        ]
        .concat(),
        SECRET,
    );
    let expert = |rank: &str, extra: &[&str], secret: &str| {
        let mut c = serve_in(
            &net.b,
            &[
                &["--join", control, "--worker", "expert", "--rank", rank],
                &["--model", &model][..],
                &shape[..],
                extra,
            ]
            .concat(),
            secret,
        );
        relay(
            &format!("expert {rank} {}", c.id()),
            c.stdout.take().unwrap(),
        );
        c
    };
    let mut procs = KillOnDrop(vec![
        expert("0", &[], SECRET),
        expert("1", &[], SECRET),
        expert("1", &["--standby"], SECRET),
    ]);
    let mut line = String::new();
    let mut out = BufReader::new(server.stdout.take().unwrap());
    out.read_line(&mut line).unwrap();
    assert!(line.contains("listening on"), "moe-serve said {line:?}");
    relay("server", out);
    procs.0.push(server);
    let a = net.a.clone();
    assert!(curl_in(&a, "/health", None).1.contains("whole"));

    // A worker without the secret is refused and exits.
    let stranger = expert("0", &["--standby"], "not-the-secret-at-all")
        .wait_with_output()
        .unwrap();
    assert!(
        !stranger.status.success(),
        "a worker without the secret was taken"
    );

    let reference = four_completions(&a);
    assert!(reference.iter().all(|(s, _)| *s == 200), "{reference:?}");
    let replaced = || {
        metric_in(
            &a,
            "m2n_serve:worker_replacements_total{model_name=\"test-model\",role=\"expert\"}",
        )
    };
    let run_with_fault = |fault: &mut dyn FnMut()| {
        let replaced_before = replaced();
        let before = metric_in(&a, "m2n_serve:generation_tokens_total");
        let ns = a.clone();
        let load = std::thread::spawn(move || four_completions(&ns));
        wait_for("tokens", 30, || {
            metric_in(&a, "m2n_serve:generation_tokens_total") > before + 40.0
        });
        fault();
        let got = load.join().unwrap();
        for (i, ((st, text), (_, want))) in got.iter().zip(&reference).enumerate() {
            assert_eq!(*st, 200, "request {i} failed: {text}");
            assert_eq!(text, want, "request {i} differs from the undisturbed run");
        }
        // The place is filled (the requests may have ended first).
        wait_for("a replacement", 30, || replaced() > replaced_before);
        wait_for("whole again", 30, || {
            curl_in(&a, "/health", None).1.contains("whole")
        });
    };

    // 1. Expert 1 is killed: the standby takes over, no process starts.
    let killed = worker_pid(&procs.0[1]);
    run_with_fault(&mut || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(killed), SIGKILL).unwrap();
    });
    assert!(
        procs.0[2].try_wait().unwrap().is_none(),
        "the standby serves as expert 1"
    );

    // 2. Expert 0 stops: judged lost after the window, a standby that
    //    joins meanwhile takes over; woken, the stopped one finds its
    //    channel closed and exits.
    let stopped = worker_pid(&procs.0[0]);
    let mut newcomer = None;
    run_with_fault(&mut || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(stopped), SIGSTOP).unwrap();
        newcomer = Some(expert("0", &["--standby"], SECRET));
    });
    procs.0.push(newcomer.take().unwrap());
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(stopped), SIGCONT).unwrap();
    wait_for("the woken worker exits", 20, || {
        procs.0[0].try_wait().unwrap().is_some()
    });
    assert_eq!(replaced(), 2.0);
    assert_eq!(metric_in(&a, "m2n_serve:request_failures_total"), 0.0);
}
