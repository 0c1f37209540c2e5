//! `moe-run`: greedy decoding of some prompts on a disaggregated group
//! (M attention and N expert worker processes joined by m2n), or with
//! `--reference` in one process. Prints, in the order the prompts were
//! given, `tokens: <ids>` per prompt and with `--logprobs` a
//! `logprobs: <values>` line after it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use m2n::Role;
use moe_runtime::launch;
use moe_runtime::model::reference::{check_prompt, Reference};
use moe_runtime::model::weights::Checkpoint;
use moe_runtime::model::{load_config, RuntimeError};
use moe_runtime::worker::Deployment;

/// Greedy decoding over a disaggregated MoE group.
#[derive(Debug, Parser)]
#[command(name = "moe-run")]
struct Args {
    /// Model directory (config.json + safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Attention worker processes M.
    #[arg(long, default_value_t = 1)]
    attention: usize,
    /// Expert worker processes N (must divide the experts).
    #[arg(long, default_value_t = 1)]
    experts: usize,
    /// Micro-batches m (1 to 4) of the ping-pong pipeline.
    #[arg(long, default_value_t = 1)]
    microbatches: usize,
    /// A prompt as comma-separated token ids; repeat for more prompts.
    #[arg(long = "prompt-ids", required = true, value_delimiter = ',', num_args = 1, action = clap::ArgAction::Append)]
    prompt_ids: Vec<String>,
    #[arg(long, default_value_t = 16)]
    max_new_tokens: usize,
    /// Token ids that end a sequence (comma-separated).
    #[arg(long, value_delimiter = ',')]
    stop_ids: Vec<u32>,
    /// Most tokens in one micro-batch (longer prompts prefill in chunks).
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Run the single-process reference decoder instead.
    #[arg(long)]
    reference: bool,
    /// Also print each generated token's log-probability.
    #[arg(long)]
    logprobs: bool,
    /// Longest wait for a peer's round before giving up.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
    #[arg(long, hide = true)]
    worker: Option<String>,
    #[arg(long, hide = true)]
    rank: Option<usize>,
}

/// `--prompt-ids 1,2,3 --prompt-ids 4` arrives as one flat list per
/// occurrence; clap keeps occurrences apart through `get_occurrences`.
fn prompts() -> Vec<Vec<u32>> {
    use clap::CommandFactory;
    let m = Args::command().get_matches();
    m.get_occurrences::<String>("prompt_ids")
        .map(|occs| {
            occs.map(|occ| {
                occ.map(|v| v.trim().parse::<u32>().unwrap_or(u32::MAX))
                    .collect()
            })
            .collect()
        })
        .unwrap_or_default()
}

fn main() -> ExitCode {
    let a = Args::parse();
    let prompts = prompts();
    if prompts.iter().flatten().any(|&t| t == u32::MAX) {
        eprintln!("moe-run: --prompt-ids takes comma-separated token ids (non-negative integers)");
        return ExitCode::from(2);
    }
    let deploy = Deployment {
        attention: a.attention,
        experts: a.experts,
        microbatches: a.microbatches,
        max_tokens: a.max_tokens,
    };
    let timeout = Duration::from_secs(a.timeout_s);
    match (a.worker.as_deref(), a.rank) {
        (Some(role), Some(rank)) => {
            let role: Role = match role.parse() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("moe-run: --worker {role}: {e}");
                    return ExitCode::from(2);
                }
            };
            worker(&a, role, rank, deploy, &prompts, timeout)
        }
        _ if a.reference => reference(&a, &prompts),
        _ => launcher(&a, deploy, &prompts, timeout),
    }
}

fn print_result(i: usize, tokens: &[(u32, f32)], logprobs: bool, prefix: &str) {
    let ids: Vec<String> = tokens.iter().map(|t| t.0.to_string()).collect();
    println!("{prefix}{i} tokens: {}", ids.join(" "));
    if logprobs {
        let lps: Vec<String> = tokens.iter().map(|t| format!("{:?}", t.1)).collect();
        println!("{prefix}{i} logprobs: {}", lps.join(" "));
    }
}

fn reference(a: &Args, prompts: &[Vec<u32>]) -> ExitCode {
    let run = || -> Result<(), RuntimeError> {
        let r = Reference::load(&a.model)?;
        for p in prompts {
            let mut out = r.generate(p, a.max_new_tokens)?;
            if let Some(k) = out.iter().position(|t| a.stop_ids.contains(&t.0)) {
                out.truncate(k + 1);
            }
            let ids: Vec<String> = out.iter().map(|t| t.0.to_string()).collect();
            println!("tokens: {}", ids.join(" "));
            if a.logprobs {
                let lps: Vec<String> = out.iter().map(|t| format!("{:?}", t.1)).collect();
                println!("logprobs: {}", lps.join(" "));
            }
        }
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moe-run: {e}");
            ExitCode::FAILURE
        }
    }
}

fn launcher(a: &Args, deploy: Deployment, prompts: &[Vec<u32>], timeout: Duration) -> ExitCode {
    // Everything the workers would refuse, refused once, here.
    let checked = load_config(&a.model).and_then(|c| {
        deploy.validate(&c)?;
        Checkpoint::open(&a.model)?.verify(&c)?;
        for (i, p) in prompts.iter().enumerate() {
            check_prompt(p, c.vocab).map_err(|e| {
                RuntimeError::Request(format!(
                    "prompt {}: {}",
                    i + 1,
                    e.to_string().trim_start_matches("bad request: ")
                ))
            })?;
        }
        Ok(())
    });
    if let Err(e) = checked {
        eprintln!("moe-run: {e}");
        return ExitCode::from(2);
    }
    // Workers get the same command line, less nothing: they pick their part.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let group = match launch::spawn(&deploy, &args, timeout) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("moe-run: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outs = group.wait(Duration::from_secs(3));
    if let Err(why) = launch::verdict(&outs) {
        for line in why.lines() {
            eprintln!("moe-run: {line}");
        }
        return ExitCode::FAILURE;
    }
    // "<i> tokens: ..." and "<i> logprobs: ..." from the attention workers.
    let mut lines: Vec<(usize, usize, String)> = Vec::new();
    for o in &outs {
        for l in &o.out {
            let Some((i, rest)) = l.split_once(' ') else {
                continue;
            };
            let Ok(i) = i.parse::<usize>() else { continue };
            let kind = usize::from(rest.starts_with("logprobs"));
            lines.push((i, kind, rest.to_string()));
        }
    }
    lines.sort();
    let got: std::collections::BTreeSet<usize> = lines.iter().map(|l| l.0).collect();
    if got.len() != prompts.len() {
        eprintln!(
            "moe-run: results for {} of {} prompts came back",
            got.len(),
            prompts.len()
        );
        return ExitCode::FAILURE;
    }
    for (_, _, text) in lines {
        println!("{text}");
    }
    ExitCode::SUCCESS
}

fn worker(
    a: &Args,
    role: Role,
    rank: usize,
    deploy: Deployment,
    prompts: &[Vec<u32>],
    timeout: Duration,
) -> ExitCode {
    let run = || -> Result<(), RuntimeError> {
        let uid = launch::unique_id_from_env()?;
        match role {
            Role::Expert => {
                let mut w = launch::expert_worker(&a.model, deploy, rank, &uid, timeout)?;
                let st = w.run()?;
                println!(
                    "MOE-STATS expert {rank} rounds={} steps={} rows={} busy_ns={} idle_ns={}",
                    st.rounds, st.steps, st.rows, st.busy_ns, st.idle_ns
                );
            }
            Role::Attention => {
                let mut w = launch::attention_worker(&a.model, deploy, rank, &uid, timeout)?;
                let mine: Vec<usize> = (0..prompts.len())
                    .filter(|i| i % deploy.attention == rank)
                    .collect();
                let mut out: Vec<Vec<(u32, f32)>> = vec![Vec::new(); prompts.len()];
                for &i in &mine {
                    w.submit(
                        i as u64,
                        prompts[i].clone(),
                        a.max_new_tokens,
                        a.stop_ids.clone(),
                    )?;
                }
                loop {
                    let r = w.step()?;
                    for t in r.tokens {
                        out[t.seq as usize].push((t.token, t.logprob));
                    }
                    if !r.group_active {
                        break;
                    }
                }
                for &i in &mine {
                    print_result(i, &out[i], a.logprobs, "MOE-OUT ");
                }
            }
        }
        Ok(())
    };
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            launch::report_error(role, rank, &e);
            ExitCode::from(3)
        }
    }
}
