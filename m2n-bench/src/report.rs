//! What m2n_perf prints and writes: the nccl-tests-style header, one row
//! per size, the footer, and the same figures as JSON (`--json`).

use std::io::Write;
use std::time::Duration;

use m2n::{TransportKind, WaitPolicy};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use serde::Serialize;

use crate::cli::{Args, Baseline};
use crate::run::Place;
use crate::sweep::{Row, Side, Sweep, WorkPerRound};

/// The run's settings as the header states them and the report records
/// them: the same on every rank.
#[derive(Debug)]
pub struct Run<'a> {
    pub args: &'a Args,
    /// This rank's place (its `m` and `n` are the group's shape).
    pub place: Place,
    /// The transport m2n resolved to.
    pub transport: TransportKind,
    /// Rounds a sender may run ahead, as configured.
    pub depth: usize,
    /// The wait policy m2n resolved to.
    pub wait: WaitPolicy,
    pub peer_timeout: Duration,
    /// The MPI baseline's path (see `mpi_base::MpiPath`).
    pub baseline_path: &'a str,
}

impl Run<'_> {
    /// What m2n's utilisation is measured against.
    fn peak_source(&self) -> &'static str {
        if self.transport == TransportKind::Shm {
            "single-core memcpy at the same size"
        } else {
            "the best m2n busbw of the sweep"
        }
    }
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    tool: &'static str,
    version: &'static str,
    pattern: String,
    transport: String,
    baseline: String,
    /// The MPI baseline's path (TCP against m2n's tcp), as in the header.
    baseline_path: &'a str,
    /// Transport work per round and rank (verbs only).
    work_per_round: Option<&'a WorkPerRound>,
    senders: usize,
    receivers: usize,
    iters: u32,
    warmup: u32,
    wait: String,
    depth: usize,
    timing: &'static str,
    peak_source: &'a str,
    rows: &'a [Row],
    /// Achieved / peak bandwidth per message size: what the deployment
    /// planner's Util() reads.
    utilisation_curve: Vec<(usize, f64)>,
}

/// Every rank's line for the header's "Using devices" (a collective: every
/// rank calls it; each gets all lines).
pub fn host_lines(world: &SimpleCommunicator, place: Place, detail: &str) -> Vec<String> {
    const LINE: usize = 192;
    let (role, rank) = (place.role, place.rank);
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let line = format!(
        "Pid {:6} on {:>12} role {role} {rank}: {detail}",
        std::process::id(),
        host.trim()
    );
    let mut mine = [0u8; LINE];
    let n = (0..=line.len().min(LINE))
        .rev()
        .find(|&i| line.is_char_boundary(i))
        .unwrap_or(0);
    mine[..n].copy_from_slice(&line.as_bytes()[..n]);
    let mut all = vec![0u8; LINE * world.size() as usize];
    world.all_gather_into(&mine[..], &mut all[..]);
    all.chunks(LINE)
        .map(|c| {
            String::from_utf8_lossy(&c[..c.iter().position(|&b| b == 0).unwrap_or(LINE)])
                .into_owned()
        })
        .collect()
}

/// The header: every setting, the ranks' hosts, and the column heads.
pub fn print_header(run: &Run, hosts: &[String], with_baseline: bool) {
    let (args, m, n) = (run.args, run.place.m, run.place.n);
    println!(
        "# m2n_perf {} : M2N {:?}, nccl-tests layout",
        env!("CARGO_PKG_VERSION"),
        args.pattern
    );
    println!(
        "# senders (attention) M: {m}  receivers (experts) N: {n}  ranks: {}",
        m + n
    );
    println!(
        "# minBytes {} maxBytes {} step: {}(factor) warmup iters: {} iters: {} validation: {} per-iter stats: {}",
        args.min_bytes, args.max_bytes, args.factor, args.warmup, args.iters, args.check, args.iter_stats
    );
    println!(
        "# transport: {}  depth: {}  slot: {} B  wait: {}  peer timeout: {:?}  m2n send buffers: {}",
        run.transport,
        run.depth,
        args.max_bytes,
        run.wait,
        run.peer_timeout,
        send_buffers(args, run.transport)
    );
    println!(
        "# baseline: {}",
        baseline_description(args.baseline, run.wait)
    );
    if args.baseline == Baseline::Mpi {
        println!("# baseline MPI path: {}", run.baseline_path);
    }
    println!(
        "# machine: {} cpus, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| format!("Linux {}", s.trim()))
            .unwrap_or_default()
    );
    println!(
        "# timing: {}; time = mean, p50/p99 over {} samples",
        args.timing.describe(),
        args.iters
    );
    println!("# size = bytes per sender-receiver pair and round; algbw = all pairs' bytes / time; busbw = busiest rank's bytes / time");
    println!("# Using devices");
    for (i, h) in hosts.iter().enumerate() {
        println!("#  Rank {i:2} {h}");
    }
    let (head, unit) = column_heads(args, with_baseline);
    println!("{head}\n{unit}");
}

/// Where m2n sends from, as the header says it.
fn send_buffers(args: &Args, transport: TransportKind) -> &'static str {
    if !args.gpu_buffers() {
        return "host";
    }
    match transport {
        TransportKind::Shm | TransportKind::Tcp => {
            "GPU (through a pinned host stage: this transport copies)"
        }
        _ => "GPU (zero-copy)",
    }
}

/// What the baseline does per round, as the header says it.
fn baseline_description(baseline: Baseline, wait: WaitPolicy) -> String {
    match baseline {
        Baseline::Mpi => {
            let mpi_version = mpi::environment::library_version().unwrap_or_default();
            format!(
                "MPI_Isend/MPI_Irecv per round, completed by {} ({})",
                if wait == WaitPolicy::Spin {
                    "MPI_Waitall"
                } else {
                    "MPI_Testall polled with the same wait policy"
                },
                mpi_version
                    .lines()
                    .next()
                    .unwrap_or("MPI")
                    .replace('\t', " ")
                    .trim()
            )
        }
        Baseline::Nccl => "NCCL grouped ncclSend/ncclRecv per round on GPU buffers, then a stream sync; m2n sends from GPU buffers too".into(),
        Baseline::Verbs => "raw RDMA WRITE WITH IMMEDIATE per peer into a registered region (inline when small, signalled), SRQ, CQ polled with the same wait policy; no credits or checks".into(),
        Baseline::CudaMemcpy => "cuMemcpyAsync into each peer's CUDA-IPC-opened GPU buffer (as cudaMemcpyPeerAsync), cudaStreamSynchronize, then a 1-byte MPI note per peer; m2n sends from GPU buffers too".into(),
        Baseline::None => "none".into(),
    }
}

/// The table's two heading lines: the column names and their units.
fn column_heads(args: &Args, with_baseline: bool) -> (String, String) {
    let mut head = format!(
        "#{:>11} {:>12} {:>6} {:>9} {:>8} {:>8} {:>7} {:>9} {:>9}",
        "size", "count", "type", "time", "algbw", "busbw", "#wrong", "p50", "p99"
    );
    let mut unit = format!(
        "#{:>11} {:>12} {:>6} {:>9} {:>8} {:>8} {:>7} {:>9} {:>9}",
        "(B)", "(elements)", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(us)"
    );
    if args.iter_stats == 1 {
        head += &format!(" {:>9} {:>9} {:>6}", "i_min", "i_max", "i_cv%");
        unit += &format!(" {:>9} {:>9} {:>6}", "(us)", "(us)", "");
    }
    if with_baseline {
        head += &format!(
            " | {:>9} {:>8} {:>8} {:>7} {:>9} {:>9} | {:>6} {:>7} {:>7}",
            format!("{} time", args.baseline.name()),
            "algbw",
            "busbw",
            "#wrong",
            "p50",
            "p99",
            "bw x",
            "p50 -%",
            "p99 -%"
        );
        unit += &format!(
            " | {:>9} {:>8} {:>8} {:>7} {:>9} {:>9} | {:>6} {:>7} {:>7}",
            "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(us)", "", "", ""
        );
    }
    head += &format!(" | {:>8} {:>6}", "memcpy", "%lim");
    unit += &format!(" | {:>8} {:>6}", "(GB/s)", "");
    (head, unit)
}

/// One size's row of the table, flushed at once.
pub fn print_row(args: &Args, size: usize, m2n: &Side, baseline: Option<&Side>, memcpy: f64) {
    let mut line = format!(
        "{:>12} {:>12} {:>6} {:>9.2} {:>8.2} {:>8.2} {:>7} {:>9.2} {:>9.2}",
        size,
        size,
        "uint8",
        m2n.time_us,
        m2n.algbw_gbps,
        m2n.busbw_gbps,
        m2n.wrong,
        m2n.stats.p50_us,
        m2n.stats.p99_us
    );
    if args.iter_stats == 1 {
        line += &format!(
            " {:>9.2} {:>9.2} {:>6.1}",
            m2n.stats.min_us, m2n.stats.max_us, m2n.stats.cv_pct
        );
    }
    if let Some(b) = baseline {
        line += &format!(
            " | {:>9.2} {:>8.2} {:>8.2} {:>7} {:>9.2} {:>9.2} | {:>6.2} {:>7.1} {:>7.1}",
            b.time_us,
            b.algbw_gbps,
            b.busbw_gbps,
            b.wrong,
            b.stats.p50_us,
            b.stats.p99_us,
            m2n.algbw_gbps / b.algbw_gbps,
            100.0 * (1.0 - m2n.stats.p50_us / b.stats.p50_us),
            100.0 * (1.0 - m2n.stats.p99_us / b.stats.p99_us),
        );
    }
    line += &format!(
        " | {:>8.2} {:>6.1}",
        memcpy,
        100.0 * m2n.busbw_gbps / memcpy
    );
    println!("{line}");
    let _ = std::io::stdout().flush();
}

/// Rank 0's end of the run: each row's utilisation, the footer, the JSON
/// report when asked; exits 1 when a byte was wrong (or the report could
/// not be written).
pub fn conclude(run: &Run, mut sweep: Sweep) {
    set_utilisation(&mut sweep.rows, run.transport);
    print_footer(run, &sweep);
    if let Some(path) = &run.args.json {
        let text = serde_json::to_string_pretty(&report(run, &sweep)).expect("serialisable");
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("m2n_perf: cannot write {}: {e}", path.display());
            std::process::exit(1);
        }
    }
    if sweep.total_wrong > 0 {
        std::process::exit(1);
    }
}

/// m2n's busbw at each size over the peak: the memcpy limit at that size
/// over shm, the sweep's best busbw otherwise.
fn set_utilisation(rows: &mut [Row], transport: TransportKind) {
    let best = rows.iter().map(|r| r.m2n.busbw_gbps).fold(0.0, f64::max);
    for r in rows {
        let peak = if transport == TransportKind::Shm {
            r.memcpy_gbps
        } else {
            best
        };
        r.utilisation = (r.m2n.busbw_gbps / peak).min(1.0);
    }
}

/// The footer: wrong bytes, average bus bandwidths, and m2n's transport
/// work per round where the transport counts it.
fn print_footer(run: &Run, sweep: &Sweep) {
    let (rows, total_wrong) = (&sweep.rows, sweep.total_wrong);
    let avg = rows.iter().map(|r| r.m2n.busbw_gbps).sum::<f64>() / rows.len().max(1) as f64;
    println!(
        "# Out of bounds values : {} {}",
        total_wrong,
        if total_wrong == 0 { "OK" } else { "FAILED" }
    );
    println!("# Avg bus bandwidth    : {avg:.4}");
    if let Some(avg_b) = (!rows.is_empty() && rows[0].baseline.is_some()).then(|| {
        rows.iter()
            .filter_map(|r| r.baseline.as_ref())
            .map(|b| b.busbw_gbps)
            .sum::<f64>()
            / rows.len() as f64
    }) {
        println!(
            "# Avg bus bandwidth ({}): {avg_b:.4}",
            run.args.baseline.name()
        );
    }
    if let Some(w) = &sweep.per_round {
        for (side, c) in [("attention", &w.attention), ("expert", &w.expert)] {
            println!(
                "# m2n {} work per round, {side} rank (mean): {:.2} work requests ({:.2} inline, {:.2} signalled), {:.2} doorbells, {:.2} CQ polls returning {:.2} completions, {:.2} receive posts",
                run.transport, c[0], c[1], c[2], c[3], c[4], c[5], c[6]
            );
        }
    }
    println!("# M2N test concluded: {:?}", run.args.pattern);
}

/// The JSON report (`--json`).
fn report<'a>(run: &'a Run, sweep: &'a Sweep) -> Report<'a> {
    let args = run.args;
    Report {
        tool: "m2n_perf",
        version: env!("CARGO_PKG_VERSION"),
        pattern: format!("{:?}", args.pattern).to_lowercase(),
        transport: run.transport.to_string(),
        baseline: format!("{:?}", args.baseline).to_lowercase(),
        baseline_path: run.baseline_path,
        work_per_round: sweep.per_round.as_ref(),
        senders: run.place.m,
        receivers: run.place.n,
        iters: args.iters,
        warmup: args.warmup,
        wait: run.wait.to_string(),
        depth: run.depth,
        timing: args.timing.describe(),
        peak_source: run.peak_source(),
        rows: &sweep.rows,
        utilisation_curve: sweep
            .rows
            .iter()
            .map(|r| (r.bytes, r.utilisation))
            .collect(),
    }
}
