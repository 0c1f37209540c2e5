//! moe-serve end to end: the official openai client, curl's view of SSE,
//! moe-loadgen, a client that disconnects, a full queue, SIGTERM drain,
//! and a killed expert worker. Each test starts its own server on a tiny
//! random model (with its test-made tokenizer) and stops it.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use moe_runtime::model::init::StoreDtype;
use support::*;

const MOE_SERVE: &str = env!("CARGO_BIN_EXE_moe-serve");
const MOE_LOADGEN: &str = env!("CARGO_BIN_EXE_moe-loadgen");

struct Server {
    child: Child,
    port: u16,
    model: String,
    _dir: TempDir,
    model_dir: PathBuf,
}

impl Server {
    fn start(tag: &str, preset: &str, extra: &[&str]) -> Server {
        Self::start_with(tag, preset, extra, &[])
    }

    fn start_with(tag: &str, preset: &str, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let dir = TempDir::new(tag);
        let model_dir = checkpoint(dir.path(), preset, 4, 1, StoreDtype::Bf16);
        let port = free_port();
        let child = serve_command(&model_dir, port)
            .args(extra)
            .envs(env.iter().copied())
            .spawn()
            .unwrap();
        Self::ready(child, port, dir, model_dir)
    }

    /// The server `child` on `port`, once it says it listens and answers
    /// `/health`.
    fn ready(mut child: Child, port: u16, dir: TempDir, model_dir: PathBuf) -> Server {
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        out.read_line(&mut line).unwrap();
        assert!(
            line.contains(&format!("listening on http://127.0.0.1:{port}")),
            "moe-serve said {line:?}"
        );
        relay("moe-serve", out);
        if let Some(err) = child.stderr.take() {
            relay("moe-serve", err);
        }
        let s = Server {
            child,
            port,
            model: "test-model".into(),
            _dir: dir,
            model_dir,
        };
        let t0 = Instant::now();
        while http(s.port, "GET", "/health", "").0 != 200 {
            assert!(t0.elapsed() < Duration::from_secs(30), "never healthy");
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn metric(&self, name: &str) -> f64 {
        let (_, text) = http(self.port, "GET", "/metrics", "");
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    }

    fn pid_of(&self, needle: &str) -> i32 {
        pid_with(&self.model_dir.display().to_string(), needle)
            .unwrap_or_else(|| panic!("no process with {needle}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// moe-serve on `model_dir` and `port`, served as `test-model`, polling
/// with yields (the tests oversubscribe two cores), output piped.
fn serve_command(model_dir: &Path, port: u16) -> Command {
    let mut c = Command::new(MOE_SERVE);
    c.args(["--model", &model_dir.display().to_string()])
        .args(["--port", &port.to_string()])
        .args(["--served-model-name", "test-model"])
        .env("M2N_WAIT", "yield")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// A plain HTTP/1.1 request (Connection: close): (status, body).
fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return (0, String::new());
    };
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}

fn python_has_openai(pydeps: &Path) -> bool {
    Command::new("python3")
        .args(["-c", "import openai"])
        .env("PYTHONPATH", pydeps)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Where the openai Python client is, or `None` (after saying why the
/// test skips) when it is not installed.
fn openai_client() -> Option<PathBuf> {
    let pydeps = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pydeps/openai");
    if python_has_openai(&pydeps) {
        return Some(pydeps);
    }
    println!("SKIPPED: the openai Python client is not installed (scripts/setup puts it in target/pydeps/openai)");
    None
}

/// Runs `script` (in tests/) with the openai client at `pydeps`; it must
/// pass.
fn run_python(pydeps: &Path, script: &str, args: &[String]) {
    let o = Command::new("python3")
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests")
                .join(script),
        )
        .args(args)
        .env("PYTHONPATH", pydeps)
        .output()
        .unwrap();
    println!("{}", String::from_utf8_lossy(&o.stdout));
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn the_official_openai_client_works_and_greedy_tokens_equal_the_reference() {
    let Some(pydeps) = openai_client() else {
        return;
    };
    let s = Server::start(
        "openai",
        "mixtral-mini",
        &["--attention", "2", "--experts", "2"],
    );
    let r = moe_run(
        &[
            "--model".into(),
            s.model_dir.display().to_string(),
            "--reference".into(),
            "--prompt-ids".into(),
            "1,2,3".into(),
            "--max-new-tokens".into(),
            "16".into(),
            "--logprobs".into(),
        ],
        &[],
    );
    let (ids, lps) = results(&stdout(&r)).remove(0);
    let join = |v: Vec<String>| v.join(" ");
    run_python(
        &pydeps,
        "serve_openai.py",
        &[
            s.url(),
            s.model.clone(),
            join(ids.iter().map(|x| x.to_string()).collect()),
            join(lps.iter().map(|x| format!("{x:?}")).collect()),
        ],
    );
}

#[test]
fn the_openai_request_in_full_and_vllms_sampling_extensions_work() {
    let Some(pydeps) = openai_client() else {
        return;
    };
    let s = Server::start("api", "mixtral-mini", &[]);
    let prompt = [1u32, 17, 200, 33, 5, 91, 4, 250];
    let ids: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let r = moe_run(
        &[
            "--model".into(),
            s.model_dir.display().to_string(),
            "--reference".into(),
            "--score".into(),
            "--prompt-ids".into(),
            ids.join(","),
        ],
        &[],
    );
    assert!(r.status.success(), "{}", stderr(&r));
    let scores = stdout(&r)
        .lines()
        .find_map(|l| l.strip_prefix("scores:").map(str::trim).map(String::from))
        .expect("moe-run --score prints scores");
    run_python(
        &pydeps,
        "serve_api.py",
        &[
            s.url(),
            s.model.clone(),
            s.model_dir.display().to_string(),
            ids.join(" "),
            scores,
        ],
    );
}

#[test]
fn an_api_key_guards_v1_and_leaves_health_and_metrics_open() {
    let dir = TempDir::new("key");
    let model_dir = checkpoint(dir.path(), "tiny", 4, 1, StoreDtype::Bf16);
    let port = free_port();
    let mut child = Command::new(MOE_SERVE)
        .args(["--model", &model_dir.display().to_string()])
        .args(["--port", &port.to_string(), "--served-model-name", "m"])
        .env("MOE_SERVE_API_KEY", "s3cret-key")
        .env("M2N_WAIT", "yield")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    relay("moe-serve", child.stderr.take().unwrap());
    let t0 = Instant::now();
    while http(port, "GET", "/health", "").0 != 200 {
        assert!(t0.elapsed() < Duration::from_secs(30), "never healthy");
        std::thread::sleep(Duration::from_millis(50));
    }
    let body = r#"{"model": "m", "prompt": "hi", "max_tokens": 2}"#;
    let call = |auth: Option<&str>, method: &str, path: &str| {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let header = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
        let b = if method == "POST" { body } else { "" };
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{header}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
            b.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let status: u16 = out.split(' ').nth(1).unwrap().parse().unwrap();
        (status, out.split_once("\r\n\r\n").unwrap().1.to_string())
    };
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer s3cret-ke"),
        Some("s3cret-key"),
    ] {
        let (status, text) = call(auth, "POST", "/v1/completions");
        assert_eq!(status, 401, "{auth:?}: {text}");
        let e: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(e["error"]["type"], "authentication_error", "{text}");
        assert_eq!(call(auth, "GET", "/v1/models").0, 401);
    }
    assert_eq!(
        call(Some("Bearer s3cret-key"), "POST", "/v1/completions").0,
        200
    );
    assert_eq!(call(Some("Bearer s3cret-key"), "GET", "/v1/models").0, 200);
    assert_eq!(call(None, "GET", "/health").0, 200);
    assert_eq!(call(None, "GET", "/metrics").0, 200);
    let _ = child.kill();
    let _ = child.wait();
}

/// `vllm bench serve`'s request bodies (captured from vLLM 0.32's
/// benchmark client, `tests/vllm_bench_payloads.json`), replayed: both
/// endpoints stream every token, the usage chunk and `[DONE]`.
#[test]
fn vllm_bench_serve_payloads_are_served_as_they_are() {
    let s = Server::start("vllm-bench", "tiny", &[]);
    let captured: serde_json::Value =
        serde_json::from_str(include_str!("vllm_bench_payloads.json")).unwrap();
    for (endpoint, key, object) in [
        ("/v1/completions", "completions", "text_completion"),
        ("/v1/chat/completions", "chat", "chat.completion.chunk"),
    ] {
        let mut body = captured[key].clone();
        body["model"] = s.model.clone().into();
        let o = Command::new("curl")
            .args(["-sN", "--fail-with-body", "--max-time", "120"])
            .args([
                "-H",
                "Content-Type: application/json",
                "-d",
                &body.to_string(),
            ])
            .arg(format!("{}{endpoint}", s.url()))
            .output()
            .expect("curl (scripts/setup installs it)");
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{endpoint}: {text}");
        let events: Vec<&str> = text
            .split("\n\n")
            .map(str::trim)
            .filter(|e| e.starts_with("data: "))
            .collect();
        assert_eq!(*events.last().unwrap(), "data: [DONE]", "{endpoint}");
        let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(&e["data: ".len()..]).unwrap())
            .collect();
        assert!(chunks.iter().all(|c| c["object"] == object), "{endpoint}");
        let usage = &chunks.last().unwrap()["usage"];
        assert_eq!(
            usage["completion_tokens"], 128,
            "{endpoint}: ignore_eos, max tokens"
        );
        let finish: Vec<&serde_json::Value> = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0))
            .map(|c| &c["finish_reason"])
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finish, vec!["length"], "{endpoint}");
    }
}

#[test]
fn curl_sees_well_formed_server_sent_events() {
    let s = Server::start("curl", "tiny", &[]);
    let body = format!(
        r#"{{"model": "{}", "messages": [{{"role": "user", "content": "Hi"}}], "max_tokens": 6, "stream": true, "ignore_eos": true, "stream_options": {{"include_usage": true}}}}"#,
        s.model
    );
    let o = Command::new("curl")
        .args([
            "-sN",
            "--max-time",
            "60",
            "-H",
            "Content-Type: application/json",
            "-d",
            &body,
        ])
        .arg(format!("{}/v1/chat/completions", s.url()))
        .output()
        .expect("curl (scripts/setup installs it)");
    let text = String::from_utf8_lossy(&o.stdout);
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert!(
        events
            .iter()
            .all(|e| e.starts_with("data: ") && !e.contains('\n')),
        "{text}"
    );
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let chunks: Vec<serde_json::Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(&e["data: ".len()..]).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 6);
    let finish: Vec<&serde_json::Value> = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|c| &c["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, vec!["length"]);
}

#[test]
fn loadgen_counts_add_up_with_the_server() {
    let s = Server::start("loadgen", "tiny", &["--max-batch", "8"]);
    let dir = TempDir::new("lg");
    let json = dir.path().join("lg.json");
    let o = Command::new(MOE_LOADGEN)
        .args([
            "--url",
            &s.url(),
            "--num-prompts",
            "12",
            "--request-rate",
            "40",
            "--len-scale",
            "0.05",
            "--seed",
            "3",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for line in [
        "Successful requests:",
        "Mean TTFT (ms):",
        "P99 TPOT (ms):",
        "Median ITL (ms):",
        "P99 E2EL (ms):",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(
        r["completed"].as_u64().unwrap() + r["failed"].as_u64().unwrap(),
        12
    );
    assert_eq!(r["failed"], 0, "{:?}", r["errors"]);
    let outs: u64 = r["output_lens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .sum();
    assert_eq!(outs, r["total_output_tokens"].as_u64().unwrap());
    assert_eq!(
        s.metric("m2n_serve:generation_tokens_total") as u64,
        outs,
        "the server generated what the client counted"
    );
    let ins: u64 = r["input_lens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .sum();
    assert_eq!(s.metric("m2n_serve:prompt_tokens_total") as u64, ins);
    assert_eq!(
        s.metric("m2n_serve:request_success_total{finished_reason=\"length\"") as u64,
        12
    );
}

#[test]
fn a_client_that_disconnects_frees_its_sequence() {
    let s = Server::start("disconnect", "tiny", &[]);
    let body = format!(
        r#"{{"model": "{}", "prompt": "Once upon a time", "max_tokens": 1500, "stream": true, "ignore_eos": true}}"#,
        s.model
    );
    let mut c = TcpStream::connect(("127.0.0.1", s.port)).unwrap();
    write!(
        c,
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = [0u8; 2048];
    let n = c.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
    // The response starts when the request is queued; the gauge counts it
    // once the engine has admitted it into the running batch.
    let t0 = Instant::now();
    while s.metric("m2n_serve:num_requests_running") != 1.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the request never entered the running batch"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(c);
    let t0 = Instant::now();
    while s.metric("m2n_serve:num_requests_running") != 0.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the sequence kept running after its client left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let generated = s.metric("m2n_serve:generation_tokens_total");
    assert!(generated < 1500.0, "it stopped early: {generated} tokens");
}

#[test]
fn a_full_queue_answers_429_with_an_openai_error() {
    let s = Server::start("queue", "tiny", &["--max-batch", "1", "--max-queue", "1"]);
    let body = format!(
        r#"{{"model": "{}", "prompt": "x", "max_tokens": 1500, "ignore_eos": true}}"#,
        s.model
    );
    let handles: Vec<_> = (0..5)
        .map(|_| {
            let (port, body) = (s.port, body.clone());
            std::thread::spawn(move || http(port, "POST", "/v1/completions", &body))
        })
        .collect();
    let answers: Vec<(u16, String)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = answers.iter().filter(|a| a.0 == 200).count();
    let full: Vec<&(u16, String)> = answers.iter().filter(|a| a.0 == 429).collect();
    assert!(
        ok >= 1 && !full.is_empty() && ok + full.len() == 5,
        "{answers:?}"
    );
    let e: serde_json::Value = serde_json::from_str(&full[0].1).unwrap();
    assert!(
        e["error"]["message"].as_str().unwrap().contains("capacity"),
        "{e}"
    );
    assert_eq!(http(s.port, "GET", "/health", "").0, 200);
}

#[test]
fn sigterm_drains_running_requests_then_exits_zero() {
    let mut s = Server::start("drain", "tiny", &[]);
    let body = format!(
        r#"{{"model": "{}", "prompt": "Hello", "max_tokens": 300, "ignore_eos": true}}"#,
        s.model
    );
    let port = s.port;
    let req = std::thread::spawn(move || http(port, "POST", "/v1/completions", &body));
    let t0 = Instant::now();
    while s.metric("m2n_serve:num_requests_running") != 1.0 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(5));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(s.child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let (status, text) = req.join().unwrap();
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["usage"]["completion_tokens"], 300,
        "the running request finished"
    );
    let t0 = Instant::now();
    let code = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "moe-serve did not exit after draining"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(code.success(), "exit {code}");
    assert_eq!(
        http(s.port, "GET", "/health", "").0,
        0,
        "no longer listening"
    );
}

/// Completions of `prompts` (greedy, or seeded sampling for every third),
/// all at once, each on its own connection: (status, text) per prompt.
fn completions_at_once(
    port: u16,
    model: &str,
    prompts: &[String],
    max_tokens: usize,
) -> Vec<(u16, String)> {
    let threads: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let sampling = if i % 3 == 2 {
                r#""temperature": 0.8, "seed": 7"#
            } else {
                r#""temperature": 0"#
            };
            let body = format!(
                r#"{{"model": "{model}", "prompt": "{p}", "max_tokens": {max_tokens}, "ignore_eos": true, {sampling}}}"#
            );
            std::thread::spawn(move || {
                let (status, body) = http(port, "POST", "/v1/completions", &body);
                let text = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["choices"][0]["text"].as_str().map(str::to_string))
                    .unwrap_or(body);
                (status, text)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn health(s: &Server) -> (u16, String) {
    http(s.port, "GET", "/health", "")
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).unwrap();
}

#[test]
fn lost_workers_are_replaced_and_every_request_ends_as_if_nothing_happened() {
    // A short peer timeout: a stopped worker is noticed in 1.5 s.
    let s = Server::start_with(
        "replace",
        "tiny",
        &["--attention", "2", "--experts", "2"],
        &[("M2N_PEER_TIMEOUT_MS", "1500")],
    );
    assert!(health(&s).1.contains("whole"), "{:?}", health(&s));
    let prompts: Vec<String> = (0..6).map(|i| format!("Hello number {i}")).collect();
    let max_tokens = 160;
    let reference = completions_at_once(s.port, &s.model, &prompts, max_tokens);
    assert!(reference.iter().all(|(st, _)| *st == 200), "{reference:?}");
    // Steady load from moe-loadgen through all three faults.
    let dir = TempDir::new("replace-load");
    let load_json = dir.path().join("load.json");
    let mut loadgen = Command::new(MOE_LOADGEN)
        .args([
            "--url",
            &s.url(),
            "--num-prompts",
            "400",
            "--request-rate",
            "40",
        ])
        .args(["--input-len-median", "16", "--output-len-median", "24"])
        .arg("--json")
        .arg(&load_json)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    use nix::sys::signal::Signal::{SIGCONT, SIGKILL, SIGSTOP};
    let faults: [(&str, nix::sys::signal::Signal); 3] = [
        ("--worker expert --rank 1", SIGKILL),
        ("--worker attention --rank 0", SIGKILL),
        ("--worker expert --rank 0", SIGSTOP),
    ];
    let all_replaced = || {
        ["attention", "expert"]
            .iter()
            .map(|role| {
                s.metric(&format!(
                    "m2n_serve:worker_replacements_total{{model_name=\"test-model\",role=\"{role}\"}}"
                ))
            })
            .sum::<f64>()
    };
    for (n, (who, sig)) in faults.iter().enumerate() {
        let before = s.metric("m2n_serve:generation_tokens_total");
        let port = s.port;
        let (ps, mt, model) = (prompts.clone(), max_tokens, s.model.clone());
        let load = std::thread::spawn(move || completions_at_once(port, &model, &ps, mt));
        // Strike mid-generation: every request has started.
        let t0 = Instant::now();
        while s.metric("m2n_serve:generation_tokens_total") < before + 60.0 {
            assert!(t0.elapsed() < Duration::from_secs(30), "no tokens");
            std::thread::sleep(Duration::from_millis(5));
        }
        let pid = s.pid_of(who);
        signal(pid, *sig);
        let got = load.join().unwrap();
        for (i, ((st, text), (_, want))) in got.iter().zip(&reference).enumerate() {
            assert_eq!(
                *st, 200,
                "fault {n} ({who} {sig}): request {i} failed: {text}"
            );
            assert_eq!(text, want, "fault {n} ({who} {sig}): request {i} differs");
        }
        // The place is filled (the requests may have ended first), then whole.
        let t0 = Instant::now();
        while all_replaced() < (n + 1) as f64 || !health(&s).1.contains("whole") {
            assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", health(&s));
            std::thread::sleep(Duration::from_millis(20));
        }
        if *sig == SIGSTOP {
            // Replaced (killed) meanwhile: waking it changes nothing.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), SIGCONT);
        }
        assert_ne!(s.pid_of(who), pid, "{who} was replaced");
    }
    let replaced = |role: &str| {
        s.metric(&format!(
            "m2n_serve:worker_replacements_total{{model_name=\"test-model\",role=\"{role}\"}}"
        ))
    };
    assert_eq!(replaced("expert"), 2.0);
    assert_eq!(replaced("attention"), 1.0);
    assert!(s.metric("m2n_serve:requests_resumed_total") >= 1.0);
    assert!(loadgen.wait().unwrap().success());
    let load: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&load_json).unwrap()).unwrap();
    assert_eq!(
        load["failed"], 0,
        "moe-loadgen saw failures: {}",
        load["errors"]
    );
    assert!(load["completed"].as_u64().unwrap() >= 400);
    assert_eq!(s.metric("m2n_serve:request_failures_total"), 0.0);
    // And it still serves.
    let again = completions_at_once(s.port, &s.model, &prompts[..2], max_tokens);
    assert_eq!(again, reference[..2]);
}

#[test]
fn a_replacement_that_cannot_start_ends_requests_with_the_reason_and_the_server_is_down() {
    let s = Server::start(
        "noreplace",
        "tiny",
        &["--experts", "2", "--recovery-timeout-s", "4"],
    );
    // The running workers mapped their weights; a new one cannot load them.
    for e in std::fs::read_dir(&s.model_dir).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "safetensors") {
            std::fs::remove_file(e.path()).unwrap();
        }
    }
    let port = s.port;
    let model = s.model.clone();
    let load = std::thread::spawn(move || {
        let prompts = ["Hello".to_string(), "World".to_string()];
        completions_at_once(port, &model, &prompts, 2000)
    });
    let t0 = Instant::now();
    while s.metric("m2n_serve:generation_tokens_total") < 10.0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "no tokens");
        std::thread::sleep(Duration::from_millis(5));
    }
    signal(
        s.pid_of("--worker expert --rank 1"),
        nix::sys::signal::Signal::SIGKILL,
    );
    let t0 = Instant::now();
    let got = load.join().unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "ended by the deadline"
    );
    for (st, text) in &got {
        assert_eq!(*st, 503, "{text}");
        assert!(
            text.contains("expert 1") && text.contains("safetensors"),
            "the error names the worker and why it could not be replaced: {text}"
        );
    }
    let (status, body) = health(&s);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("down"), "{body}");
    assert_eq!(s.metric("m2n_serve:service_state"), 2.0);
}

#[test]
fn expert_workers_launched_by_mpiexec_join_the_server() {
    if Command::new("mpiexec").arg("--version").output().is_err() {
        println!("SKIPPED: no mpiexec here (MPICH's, from scripts/setup)");
        return;
    }
    let (port, control) = (free_port(), free_port());
    let control = format!("127.0.0.1:{control}");
    let dir = TempDir::new("mpijoin");
    let model_dir = checkpoint(dir.path(), "tiny", 4, 1, StoreDtype::Bf16);
    let model = model_dir.display().to_string();
    let secret = "mpiexec-test-secret-0123456789";
    let shape = ["--attention", "1", "--experts", "2"];
    let child = serve_command(&model_dir, port)
        .args(shape)
        .args(["--spawn", "attention", "--control-listen", &control])
        .env("MOE_SERVE_SECRET", secret)
        .spawn()
        .unwrap();
    // Expert ranks from the launcher's world ranks.
    let mut mpi = Command::new("mpiexec")
        .args([
            "-n", "2", MOE_SERVE, "--join", &control, "--worker", "expert",
        ])
        .args(["--model", &model])
        .args(shape)
        .env("M2N_WAIT", "yield")
        .env("MOE_SERVE_SECRET", secret)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    relay("mpiexec", mpi.stderr.take().unwrap());
    let s = Server::ready(child, port, dir, model_dir);
    let prompts = ["Hello".to_string(), "World".to_string()];
    let got = completions_at_once(s.port, &s.model, &prompts, 12);
    assert!(got.iter().all(|(st, _)| *st == 200), "{got:?}");
    assert!(health(&s).1.contains("whole"));
    drop(s);
    // The server gone, the workers find their channel closed and exit.
    let t0 = Instant::now();
    while mpi.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "mpiexec's workers outlived the server"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
