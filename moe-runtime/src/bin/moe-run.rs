//! `moe-run`: greedy decoding of some prompts on a disaggregated group
//! (M attention and N expert worker processes joined by m2n), or with
//! `--reference` in one process. Prints, in the order the prompts were
//! given, `tokens: <ids>` per prompt and with `--logprobs` a
//! `logprobs: <values>` line after it; with `--reference --score`, a
//! `scores: <values>` line per prompt (teacher-forced log-probabilities).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use m2n::Role;
use moe_runtime::launch;
use moe_runtime::model::reference::{check_prompt, Precision, Reference};
use moe_runtime::model::weights::Checkpoint;
use moe_runtime::model::{load_config, RuntimeError};
use moe_runtime::worker::attention::Request;
use moe_runtime::worker::Deployment;

/// Greedy decoding over a disaggregated MoE group.
#[derive(Debug, Parser)]
#[command(name = "moe-run")]
struct Args {
    /// Model directory (config.json + safetensors).
    #[arg(long, required_unless_present = "serve_root")]
    model: Option<PathBuf>,
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
    #[arg(long = "prompt-ids", required_unless_present = "serve_root", value_delimiter = ',', num_args = 1, action = clap::ArgAction::Append)]
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
    /// Instead of generating, print each prompt's teacher-forced scores:
    /// a `scores:` line with the log-probability of every token after the
    /// first given those before it (with --reference).
    #[arg(long, requires = "reference")]
    score: bool,
    /// Precision of the activations: bf16 (as the workers compute) or f32
    /// (every activation in f32, as transformers in float32; with
    /// --reference).
    #[arg(long, value_enum, default_value_t = Dtype::Bf16)]
    dtype: Dtype,
    /// Longest wait for a peer's round before giving up.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
    /// Only host a rendezvous root at ADDR (ip:port), print `M2N-UID <id>`
    /// and serve one group: for workers started by hand (`--worker ROLE
    /// --rank R` with `M2N_UNIQUE_ID`), e.g. on other hosts.
    #[arg(long, value_name = "ADDR")]
    serve_root: Option<std::net::SocketAddr>,
    #[arg(long, hide = true)]
    worker: Option<String>,
    #[arg(long, hide = true)]
    rank: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Dtype {
    Bf16,
    F32,
}

impl Args {
    fn model_dir(&self) -> &std::path::Path {
        self.model.as_deref().expect("clap requires --model")
    }
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
    if let Some(addr) = a.serve_root {
        return serve_root(addr, Duration::from_secs(a.timeout_s));
    }
    if a.dtype == Dtype::F32 && !a.reference {
        eprintln!(
            "moe-run: --dtype f32 runs with --reference (the workers compute in bf16, as the bf16 reference does)"
        );
        return ExitCode::from(2);
    }
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
        (Some(role), Some(rank)) => launch::worker_main("moe-run", role, rank, |role, uid| {
            for l in run_worker(&a, role, rank, deploy, &prompts, uid, timeout)? {
                println!("MOE-OUT {l}");
            }
            Ok(())
        }),
        _ if a.reference => reference(&a, &prompts),
        _ if std::env::var_os("PMI_RANK").is_some() => under_mpi(&a, deploy, &prompts, timeout),
        _ => launcher(&a, deploy, &prompts, timeout),
    }
}

fn serve_root(addr: std::net::SocketAddr, timeout: Duration) -> ExitCode {
    let root = match m2n::Root::bind(addr) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("moe-run: cannot host the rendezvous root at {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("M2N-UID {}", root.unique_id());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    match root.serve(timeout) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moe-run: rendezvous: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `"<i> tokens: ..."` and, with logprobs, `"<i> logprobs: ..."`.
fn result_lines(i: usize, tokens: &[(u32, f32)], logprobs: bool) -> Vec<String> {
    let ids: Vec<String> = tokens.iter().map(|t| t.0.to_string()).collect();
    let mut v = vec![format!("{i} tokens: {}", ids.join(" "))];
    if logprobs {
        let lps: Vec<String> = tokens.iter().map(|t| format!("{:?}", t.1)).collect();
        v.push(format!("{i} logprobs: {}", lps.join(" ")));
    }
    v
}

fn reference(a: &Args, prompts: &[Vec<u32>]) -> ExitCode {
    let run = || -> Result<(), RuntimeError> {
        let r = Reference::load(a.model_dir())?;
        let precision = match a.dtype {
            Dtype::Bf16 => Precision::Bf16,
            Dtype::F32 => Precision::F32,
        };
        for p in prompts {
            if a.score {
                let scores = r.score_in(p, precision)?;
                let lps: Vec<String> = scores.iter().map(|v| format!("{v:?}")).collect();
                println!("scores: {}", lps.join(" "));
                continue;
            }
            let mut out = r.generate_in(p, a.max_new_tokens, precision)?;
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
    let checked = load_config(a.model_dir()).and_then(|c| {
        deploy.validate(&c)?;
        Checkpoint::open(a.model_dir())?.verify(&c)?;
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
    let group = match launch::spawn(&deploy, &args, &[], timeout, true) {
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
    let lines: Vec<String> = outs.iter().flat_map(|o| o.out.iter().cloned()).collect();
    let got: std::collections::BTreeSet<&str> = lines
        .iter()
        .filter_map(|l| l.split_once(' ').map(|p| p.0))
        .collect();
    if got.len() != prompts.len() {
        eprintln!(
            "moe-run: results for {} of {} prompts came back",
            got.len(),
            prompts.len()
        );
        return ExitCode::FAILURE;
    }
    print_sorted(&lines);
    ExitCode::SUCCESS
}

/// Under `mpiexec -n M+N`: MPI ranks `0..M` are the attention workers,
/// the rest the experts; rank 0 hosts m2n's rendezvous and broadcasts the
/// unique id, and gathers and prints the results in prompt order. MPI is
/// only the launcher here: every activation still crosses m2n.
#[cfg(feature = "mpi")]
fn under_mpi(a: &Args, deploy: Deployment, prompts: &[Vec<u32>], timeout: Duration) -> ExitCode {
    use mpi::traits::*;
    let Some(universe) = mpi::initialize() else {
        eprintln!("moe-run: MPI could not be initialised");
        return ExitCode::FAILURE;
    };
    let world = universe.world();
    let (me, size) = (world.rank() as usize, world.size() as usize);
    let fail = |msg: &str| -> ! {
        eprintln!("moe-run: rank {me}: {msg}");
        world.abort(3)
    };
    if size != deploy.attention + deploy.experts {
        fail(&format!(
            "mpiexec started {size} ranks; --attention {} --experts {} needs {}",
            deploy.attention,
            deploy.experts,
            deploy.attention + deploy.experts
        ));
    }
    if let Err(e) = load_config(a.model_dir()).and_then(|c| deploy.validate(&c)) {
        fail(&e.to_string());
    }
    let uid = match m2n::bootstrap::mpi::share_unique_id(&world, timeout) {
        Ok(u) => u,
        Err(e) => fail(&e),
    };
    let (role, rank) = if me < deploy.attention {
        (Role::Attention, me)
    } else {
        (Role::Expert, me - deploy.attention)
    };
    let lines = match run_worker(a, role, rank, deploy, prompts, &uid, timeout) {
        Ok(lines) => lines,
        Err(e) => {
            eprintln!("moe-run: {role} {rank}: {e}");
            world.abort(3)
        }
    };
    // Results to rank 0, which prints them in prompt order.
    let text = lines.join("\n");
    if me == 0 {
        let mut all: Vec<String> = lines;
        for r in 1..size {
            let (bytes, _) = world.process_at_rank(r as i32).receive_vec::<u8>();
            all.extend(String::from_utf8_lossy(&bytes).lines().map(str::to_string));
        }
        print_sorted(&all);
    } else {
        world.process_at_rank(0).send(text.as_bytes());
    }
    ExitCode::SUCCESS
}

#[cfg(not(feature = "mpi"))]
fn under_mpi(_: &Args, _: Deployment, _: &[Vec<u32>], _: Duration) -> ExitCode {
    eprintln!("moe-run: started under mpiexec, but built without the `mpi` feature");
    ExitCode::FAILURE
}

/// Prints `"<i> tokens: ..."` / `"<i> logprobs: ..."` lines in prompt order,
/// without the index.
fn print_sorted(lines: &[String]) {
    let mut sorted: Vec<(usize, usize, &str)> = lines
        .iter()
        .filter_map(|l| {
            let (i, rest) = l.split_once(' ')?;
            Some((
                i.parse().ok()?,
                usize::from(rest.starts_with("logprobs")),
                rest,
            ))
        })
        .collect();
    sorted.sort();
    for (_, _, text) in sorted {
        println!("{text}");
    }
}

/// One worker's part; an attention worker returns its result lines
/// (`"<prompt index> tokens: ..."`), an expert none.
fn run_worker(
    a: &Args,
    role: Role,
    rank: usize,
    deploy: Deployment,
    prompts: &[Vec<u32>],
    uid: &m2n::UniqueId,
    timeout: Duration,
) -> Result<Vec<String>, RuntimeError> {
    let mut lines = Vec::new();
    match role {
        Role::Expert => {
            let mut w = launch::expert_worker(a.model_dir(), deploy, rank, uid, timeout)?;
            w.run()?;
        }
        Role::Attention => {
            let mut w = launch::attention_worker(a.model_dir(), deploy, rank, uid, timeout)?;
            let mine: Vec<usize> = (0..prompts.len())
                .filter(|i| i % deploy.attention == rank)
                .collect();
            let mut out: Vec<Vec<(u32, f32)>> = vec![Vec::new(); prompts.len()];
            for &i in &mine {
                w.submit(
                    i as u64,
                    Request {
                        prompt: prompts[i].clone(),
                        max_new: a.max_new_tokens,
                        stop: a.stop_ids.clone(),
                        ..Default::default()
                    },
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
                lines.extend(result_lines(i, &out[i], a.logprobs));
            }
        }
    }
    Ok(lines)
}
