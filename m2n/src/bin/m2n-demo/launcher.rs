//! The demo's launcher: hosts the bootstrap root, starts one process per
//! rank, and summarises what they report.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use hdrhistogram::Histogram;
use m2n::{Role, Root};

use crate::{Pattern, RunArgs};

struct Report {
    role: Role,
    rank: usize,
    transport: String,
    elapsed_ns: u64,
    wrong: u64,
    latencies_ns: Vec<u64>,
    /// Transport work over the run (see `worker::work`).
    work: Vec<u64>,
    /// Credit writes this rank posted as a receiver over the run.
    credits: Option<u64>,
}

fn parse_result(line: &str) -> Option<Report> {
    let mut it = line.strip_prefix("M2N-RESULT ")?.split(' ');
    let role = it.next()?.parse().ok()?;
    let rank = it.next()?.parse().ok()?;
    let mut report = Report {
        role,
        rank,
        transport: String::new(),
        elapsed_ns: 0,
        wrong: 0,
        latencies_ns: Vec::new(),
        work: Vec::new(),
        credits: None,
    };
    for field in it {
        let (k, v) = field.split_once('=')?;
        match k {
            "transport" => report.transport = v.to_string(),
            "elapsed_ns" => report.elapsed_ns = v.parse().ok()?,
            "wrong" => report.wrong = v.parse().ok()?,
            "work" => {
                report.work = v
                    .split(',')
                    .map(|x| x.parse().ok())
                    .collect::<Option<_>>()?
            }
            "credits" => report.credits = Some(v.parse().ok()?),
            "lat_ns" if !v.is_empty() => {
                report.latencies_ns = v
                    .split(',')
                    .map(|x| x.parse().ok())
                    .collect::<Option<_>>()?
            }
            _ => {}
        }
    }
    Some(report)
}

struct Rank {
    role: Role,
    rank: usize,
    child: Child,
    output: std::thread::JoinHandle<Vec<String>>,
}

/// Hosts only a bootstrap root: prints `M2N-UID <id>`, serves one group.
pub fn serve_root(addr: std::net::SocketAddr, timeout_s: u64) -> i32 {
    let root = match Root::bind(addr) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("m2n-demo: cannot start the bootstrap root at {addr}: {e}");
            return 1;
        }
    };
    println!("M2N-UID {}", root.unique_id());
    match root.serve(Duration::from_secs(timeout_s)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("m2n-demo: bootstrap: {e}");
            1
        }
    }
}

pub fn main(args: &RunArgs) -> i32 {
    let (m, n) = (args.senders as usize, args.receivers as usize);
    let root = match Root::bind("127.0.0.1:0".parse().expect("literal address")) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("m2n-demo: cannot start the bootstrap root: {e}");
            return 1;
        }
    };
    let uid = root.unique_id().to_string();
    let served = root.spawn(Duration::from_secs(args.timeout_s));
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("m2n-demo: cannot find my own executable: {e}");
            return 1;
        }
    };
    let mut ranks = Vec::new();
    for (role, count) in [(Role::Attention, m), (Role::Expert, n)] {
        for rank in 0..count {
            let spawned = Command::new(&exe)
                .args([
                    "--worker",
                    "--role",
                    role.name(),
                    "--rank",
                    &rank.to_string(),
                ])
                .args(["--senders", &m.to_string(), "--receivers", &n.to_string()])
                .args([
                    "--rounds",
                    &args.rounds.to_string(),
                    "--bytes",
                    &args.bytes.to_string(),
                ])
                .args(["--pattern", args.pattern.name()])
                .args([
                    "--window",
                    &args.window.to_string(),
                    "--timeout-s",
                    &args.timeout_s.to_string(),
                ])
                .args(args.nonblocking.then_some("--nonblocking"))
                .args(args.streams.then_some("--streams"))
                .env("M2N_UNIQUE_ID", &uid)
                .stdout(Stdio::piped())
                .spawn();
            let mut child = match spawned {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("m2n-demo: cannot start {role} {rank}: {e}");
                    ranks.iter_mut().for_each(|r: &mut Rank| {
                        let _ = r.child.kill();
                    });
                    return 1;
                }
            };
            let stdout = child.stdout.take().expect("piped");
            let output = std::thread::spawn(move || {
                BufReader::new(stdout)
                    .lines()
                    .map_while(Result::ok)
                    .collect()
            });
            ranks.push(Rank {
                role,
                rank,
                child,
                output,
            });
        }
    }
    let mut reports = Vec::new();
    let mut devices = Vec::new();
    let mut failed = false;
    for r in ranks {
        let Rank {
            role,
            rank,
            mut child,
            output,
        } = r;
        let status = child.wait();
        let lines = output.join().unwrap_or_default();
        if let Some(on) = lines
            .iter()
            .find(|l| l.starts_with("M2N-READY"))
            .and_then(|l| l.split_once(" on "))
        {
            devices.push(format!("{role} {rank}: {}", on.1));
        }
        match lines.iter().find_map(|l| parse_result(l)) {
            Some(rep) if status.as_ref().is_ok_and(|s| s.success()) => reports.push(rep),
            _ => {
                failed = true;
                let why = lines
                    .iter()
                    .find(|l| l.starts_with("M2N-ERROR"))
                    .cloned()
                    .unwrap_or_else(|| format!("exited with {status:?}"));
                eprintln!("m2n-demo: {role} {rank} failed: {why}");
                for l in lines.iter().filter(|l| l.starts_with("M2N-RESULT")) {
                    if let Some(rep) = parse_result(l) {
                        eprintln!("m2n-demo: {role} {rank} found {} wrong bytes", rep.wrong);
                    }
                }
            }
        }
    }
    if failed {
        // The root may still wait for ranks that died; do not wait for it.
        return 1;
    }
    if let Ok(Err(e)) = served.join() {
        eprintln!("m2n-demo: bootstrap: {e}");
        return 1;
    }
    summarise(args, &reports);
    // Where verbs ranks run (device, port, GID): worth a line each.
    for d in devices.iter().filter(|d| d.contains(": verbs on ")) {
        println!("  {d}");
    }
    0
}

fn summarise(args: &RunArgs, reports: &[Report]) {
    let (m, n) = (args.senders as u64, args.receivers as u64);
    let elapsed_s = reports
        .iter()
        .map(|r| r.elapsed_ns)
        .max()
        .unwrap_or(1)
        .max(1) as f64
        / 1e9;
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid bounds");
    for r in reports.iter().filter(|r| r.role == Role::Attention) {
        for &ns in &r.latencies_ns {
            let _ = hist.record(ns.max(1));
        }
    }
    // What a round is: payload moved over every pair and round (both
    // directions for round trips), and what a sample measures.
    let (directions, payload, sample, measured) = match args.pattern {
        Pattern::Roundtrip => (
            2,
            "dispatch + combine",
            "round latency : ",
            "dispatch posted -> combine received",
        ),
        Pattern::Dispatch => (
            1,
            "dispatch",
            "round interval: ",
            "from one round's post to the next one's",
        ),
    };
    let messages = directions * m * n * args.rounds;
    let bytes = messages as f64 * args.bytes as f64;
    let transport = reports.first().map_or("?", |r| r.transport.as_str());
    println!(
        "m2n-demo: {m} attention x {n} expert ranks over {transport}, {} {} rounds of {} B per pair, window {}",
        args.rounds,
        args.pattern.name(),
        args.bytes,
        args.window
    );
    println!("  rounds/s      : {:.1}", args.rounds as f64 / elapsed_s);
    println!(
        "  GB/s          : {:.3}  ({payload} payload over all pairs, GB = 1e9 B)",
        bytes / elapsed_s / 1e9
    );
    println!(
        "  {sample}p50 {:.1} us, p99 {:.1} us, max {:.1} us  ({measured}, {} samples)",
        hist.value_at_quantile(0.5) as f64 / 1e3,
        hist.value_at_quantile(0.99) as f64 / 1e3,
        hist.max() as f64 / 1e3,
        hist.len()
    );
    let wrong: u64 = reports.iter().map(|r| r.wrong).sum();
    let ranks: Vec<String> = reports
        .iter()
        .map(|r| format!("{} {}", r.role, r.rank))
        .collect();
    println!(
        "  data check    : {messages} messages, every byte checked, {wrong} wrong  ({} ranks: {})",
        reports.len(),
        ranks.join(", ")
    );
    // Credit writes per round (every transport): with coalescing (the
    // default), fewer than one per sender and round.
    let credits = |role: Role| -> Option<f64> {
        let side: Vec<u64> = reports
            .iter()
            .filter(|r| r.role == role)
            .map(|r| r.credits)
            .collect::<Option<_>>()?;
        (!side.is_empty()).then(|| {
            side.iter().sum::<u64>() as f64 / side.len() as f64 / args.rounds.max(1) as f64
        })
    };
    if let (Some(a), Some(e)) = (credits(Role::Attention), credits(Role::Expert)) {
        println!("  credit writes : {a:.3} per attention rank and round, {e:.3} per expert rank and round");
    }
    // Per-round transport work, where the transport counts it (verbs).
    for role in [Role::Attention, Role::Expert] {
        let side: Vec<&Report> = reports
            .iter()
            .filter(|r| r.role == role && r.work.len() == 7)
            .collect();
        if side.is_empty() || side.iter().all(|r| r.work.iter().all(|&v| v == 0)) {
            continue;
        }
        let mean = |i: usize| {
            side.iter().map(|r| r.work[i] as f64).sum::<f64>()
                / side.len() as f64
                / args.rounds as f64
        };
        println!(
            "  work per round: {role} rank (mean): {:.3} work requests, {:.3} inline, {:.3} signalled, {:.3} doorbells, {:.3} CQ polls, {:.3} completions, {:.3} receive posts",
            mean(0), mean(1), mean(2), mean(3), mean(4), mean(5), mean(6)
        );
    }
}
