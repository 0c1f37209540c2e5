//! `moe-loadgen`: a serving benchmark client in the layout of `vllm bench
//! serve`. Requests go to `/v1/completions` as token-id prompts, streamed,
//! with Gamma-distributed gaps (`--burstiness` 1: Poisson) at
//! `--request-rate` requests/s, or a fixed `--max-concurrency`. Prompt and
//! output lengths are drawn uniformly from 0.5x to 1.5x the medians (the
//! paper's workload: 571 in, 159 out) times `--len-scale`.
//!
//! TTFT = first streamed token - request sent; TPOT = (E2E - TTFT) /
//! (output tokens - 1); ITL = gaps between streamed tokens; E2EL = the
//! whole request. Output tokens are the server's `usage` counts.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

#[derive(Debug, Parser)]
#[command(name = "moe-loadgen")]
struct Args {
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    url: String,
    #[arg(long, default_value_t = 100)]
    num_prompts: usize,
    /// Requests per second (default: all at once, bounded by --max-concurrency).
    #[arg(long)]
    request_rate: Option<f64>,
    /// Gamma shape of the gaps: 1 is Poisson, smaller is burstier.
    #[arg(long, default_value_t = 1.0)]
    burstiness: f64,
    /// Most requests in flight.
    #[arg(long)]
    max_concurrency: Option<usize>,
    #[arg(long, default_value_t = 571)]
    input_len_median: usize,
    #[arg(long, default_value_t = 159)]
    output_len_median: usize,
    /// Scales both medians (small models on small machines).
    #[arg(long, default_value_t = 1.0)]
    len_scale: f64,
    /// The model name (default: the server's first).
    #[arg(long)]
    model: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: Option<PathBuf>,
    /// Per-request timeout.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
}

/// SplitMix64.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        (-2.0 * self.unit().ln()).sqrt() * (2.0 * std::f64::consts::PI * self.unit()).cos()
    }
    /// Gamma(shape k, scale theta), Marsaglia and Tsang.
    fn gamma(&mut self, k: f64, theta: f64) -> f64 {
        if k < 1.0 {
            return self.gamma(k + 1.0, theta) * self.unit().powf(1.0 / k);
        }
        let d = k - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = (1.0 + c * x).powi(3);
            if v <= 0.0 {
                continue;
            }
            if self.unit().ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v * theta;
            }
        }
    }
    fn around(&mut self, median: f64) -> usize {
        ((median * (0.5 + self.unit())).round() as usize).max(1)
    }
}

#[derive(Debug, Clone, Default)]
struct Outcome {
    ok: bool,
    error: String,
    input: usize,
    output: usize,
    ttft: f64,
    e2e: f64,
    itl: Vec<f64>,
}

async fn one(
    client: reqwest::Client,
    url: String,
    body: Value,
    input: usize,
    timeout: Duration,
) -> Outcome {
    let mut o = Outcome {
        input,
        ..Default::default()
    };
    let t0 = Instant::now();
    let resp = match client.post(&url).json(&body).timeout(timeout).send().await {
        Ok(r) => r,
        Err(e) => {
            o.error = format!("request: {e}");
            return o;
        }
    };
    if !resp.status().is_success() {
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        o.error = format!("HTTP {status}: {text}");
        return o;
    }
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut last: Option<Instant> = None;
    let mut done = false;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                o.error = format!("stream: {e}");
                return o;
            }
        };
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..pos + 2).collect();
            let text = String::from_utf8_lossy(&event);
            for line in text.lines() {
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: Value = match serde_json::from_str(data) {
                    Ok(v) => v,
                    Err(e) => {
                        o.error = format!("bad chunk {data:?}: {e}");
                        return o;
                    }
                };
                if let Some(err) = v.get("error") {
                    o.error = format!("server error: {err}");
                    return o;
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    o.output = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
                }
                let is_token = v["choices"].as_array().is_some_and(|c| !c.is_empty());
                if is_token {
                    let now = Instant::now();
                    match last {
                        None => o.ttft = (now - t0).as_secs_f64(),
                        Some(prev) => o.itl.push((now - prev).as_secs_f64()),
                    }
                    last = Some(now);
                }
            }
        }
    }
    o.e2e = t0.elapsed().as_secs_f64();
    if !done {
        o.error = "the stream ended without [DONE]".into();
        return o;
    }
    o.ok = true;
    o
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    v.sort_by(f64::total_cmp);
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    let q = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (mean, median, q(0.99))
}

async fn run(a: Args) -> Result<(), String> {
    let client = reqwest::Client::new();
    let base = a.url.trim_end_matches('/').to_string();
    let models: Value = client
        .get(format!("{base}/v1/models"))
        .send()
        .await
        .map_err(|e| format!("{base}/v1/models: {e}"))?
        .json()
        .await
        .map_err(|e| format!("{base}/v1/models: {e}"))?;
    let model = match &a.model {
        Some(m) => m.clone(),
        None => models["data"][0]["id"]
            .as_str()
            .ok_or("the server lists no model")?
            .to_string(),
    };
    let max_len = models["data"][0]["max_model_len"]
        .as_u64()
        .unwrap_or(u64::MAX) as usize;
    let mut rng = Rng(a.seed ^ 0x5EED);
    let (in_med, out_med) = (
        a.input_len_median as f64 * a.len_scale,
        a.output_len_median as f64 * a.len_scale,
    );
    let mut reqs = Vec::new();
    for _ in 0..a.num_prompts {
        let mut input = rng.around(in_med);
        let mut output = rng.around(out_med);
        if input + output > max_len {
            let f = max_len as f64 / (input + output) as f64;
            input = ((input as f64 * f) as usize).max(1);
            output = (max_len - input).max(1);
        }
        let prompt: Vec<u32> = (0..input).map(|_| (rng.next() % 200 + 32) as u32).collect();
        reqs.push((input, output, prompt));
    }
    println!(
        "moe-loadgen: {} requests to {base} (model {model}), rate {}, burstiness {}, max concurrency {}",
        a.num_prompts,
        a.request_rate.map_or("inf".into(), |r| format!("{r}")),
        a.burstiness,
        a.max_concurrency.map_or("none".into(), |c| c.to_string()),
    );
    let sem = a
        .max_concurrency
        .map(|c| Arc::new(Semaphore::new(c.max(1))));
    let url = format!("{base}/v1/completions");
    let timeout = Duration::from_secs(a.timeout_s);
    let start = Instant::now();
    let mut handles = Vec::new();
    for (input, output, prompt) in reqs {
        if let Some(rate) = a.request_rate {
            let gap = rng.gamma(a.burstiness, 1.0 / (rate * a.burstiness));
            tokio::time::sleep(Duration::from_secs_f64(gap)).await;
        }
        let permit = match &sem {
            Some(s) => Some(s.clone().acquire_owned().await.map_err(|e| e.to_string())?),
            None => None,
        };
        let body = json!({
            "model": model, "prompt": prompt, "max_tokens": output, "temperature": 0,
            "stream": true, "stream_options": {"include_usage": true}, "ignore_eos": true,
        });
        let client = client.clone();
        let url = url.clone();
        handles.push(tokio::spawn(async move {
            let o = one(client, url, body, input, timeout).await;
            drop(permit);
            o
        }));
    }
    let mut outs = Vec::new();
    for h in handles {
        outs.push(h.await.map_err(|e| e.to_string())?);
    }
    let duration = start.elapsed().as_secs_f64();
    let ok: Vec<&Outcome> = outs.iter().filter(|o| o.ok).collect();
    let failed: Vec<&Outcome> = outs.iter().filter(|o| !o.ok).collect();
    let total_in: usize = ok.iter().map(|o| o.input).sum();
    let total_out: usize = ok.iter().map(|o| o.output).sum();
    let ms = |v: Vec<f64>| {
        let (a, b, c) = stats(v);
        (a * 1e3, b * 1e3, c * 1e3)
    };
    let ttft = ms(ok.iter().map(|o| o.ttft).collect());
    let tpot = ms(ok
        .iter()
        .filter(|o| o.output > 1)
        .map(|o| (o.e2e - o.ttft) / (o.output - 1) as f64)
        .collect());
    let itl = ms(ok.iter().flat_map(|o| o.itl.iter().copied()).collect());
    let e2el = ms(ok.iter().map(|o| o.e2e).collect());
    println!("============ Serving Benchmark Result ============");
    println!("{:<40} {:<10}", "Successful requests:", ok.len());
    println!("{:<40} {:<10}", "Failed requests:", failed.len());
    if let Some(c) = a.max_concurrency {
        println!("{:<40} {:<10}", "Maximum request concurrency:", c);
    }
    println!("{:<40} {:<10.2}", "Benchmark duration (s):", duration);
    println!("{:<40} {:<10}", "Total input tokens:", total_in);
    println!("{:<40} {:<10}", "Total generated tokens:", total_out);
    println!(
        "{:<40} {:<10.2}",
        "Request throughput (req/s):",
        ok.len() as f64 / duration
    );
    println!(
        "{:<40} {:<10.2}",
        "Output token throughput (tok/s):",
        total_out as f64 / duration
    );
    println!(
        "{:<40} {:<10.2}",
        "Total Token throughput (tok/s):",
        (total_in + total_out) as f64 / duration
    );
    for (title, short, s) in [
        ("Time to First Token", "TTFT", ttft),
        ("Time per Output Token (excl. 1st token)", "TPOT", tpot),
        ("Inter-token Latency", "ITL", itl),
        ("End-to-end Latency", "E2EL", e2el),
    ] {
        println!("{:-^50}", title);
        println!("{:<40} {:<10.2}", format!("Mean {short} (ms):"), s.0);
        println!("{:<40} {:<10.2}", format!("Median {short} (ms):"), s.1);
        println!("{:<40} {:<10.2}", format!("P99 {short} (ms):"), s.2);
    }
    println!("{}", "=".repeat(50));
    for f in failed.iter().take(3) {
        println!("failed: {}", f.error);
    }
    if let Some(path) = &a.json {
        let doc = json!({
            "url": base, "model": model, "num_prompts": a.num_prompts,
            "request_rate": a.request_rate, "burstiness": a.burstiness, "max_concurrency": a.max_concurrency,
            "completed": ok.len(), "failed": failed.len(), "duration": duration,
            "total_input_tokens": total_in, "total_output_tokens": total_out,
            "request_throughput": ok.len() as f64 / duration,
            "output_throughput": total_out as f64 / duration,
            "total_token_throughput": (total_in + total_out) as f64 / duration,
            "mean_ttft_ms": ttft.0, "median_ttft_ms": ttft.1, "p99_ttft_ms": ttft.2,
            "mean_tpot_ms": tpot.0, "median_tpot_ms": tpot.1, "p99_tpot_ms": tpot.2,
            "mean_itl_ms": itl.0, "median_itl_ms": itl.1, "p99_itl_ms": itl.2,
            "mean_e2el_ms": e2el.0, "median_e2el_ms": e2el.1, "p99_e2el_ms": e2el.2,
            "input_lens": ok.iter().map(|o| o.input).collect::<Vec<_>>(),
            "output_lens": ok.iter().map(|o| o.output).collect::<Vec<_>>(),
            "errors": failed.iter().map(|o| o.error.clone()).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc).expect("JSON"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let a = Args::parse();
    if a.num_prompts == 0
        || a.request_rate.is_some_and(|r| !(r > 0.0 && r.is_finite()))
        || a.burstiness.is_nan()
        || a.burstiness <= 0.0
    {
        eprintln!("moe-loadgen: --num-prompts must be >= 1, --request-rate and --burstiness > 0");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("moe-loadgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(a)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moe-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
