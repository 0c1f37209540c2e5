//! m2n_perf: an nccl-tests-style benchmark of M2N rounds, m2n against MPI
//! (and NCCL on GPUs), measured in the same run with the same timing. See
//! `run` for exactly how a sample is timed.

mod cli;
#[cfg(feature = "cuda")]
mod ipc_base;
mod limit;
mod mpi_base;
#[cfg(feature = "cuda")]
mod nccl_base;
mod pmi;
mod run;
mod stats;
#[cfg(feature = "verbs")]
mod verbs_base;

use std::io::Write;
use std::time::Duration;

use clap::Parser;
use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::Communicator as _;
use mpi::traits::*;
use serde::Serialize;

use cli::{Args, Baseline, Pattern};
use m2n::{Communicator, Config, Role, Shape};
use run::{M2nRank, MpiRank, Sample};
use stats::Summary;

/// The baseline a run compares with.
enum Contender {
    Mpi(MpiRank),
    #[cfg(feature = "verbs")]
    Verbs(Box<verbs_base::VerbsRank>),
    #[cfg(feature = "cuda")]
    Nccl(Box<nccl_base::NcclRank>),
    #[cfg(feature = "cuda")]
    CudaMemcpy(Box<ipc_base::IpcRank>),
}

#[derive(Debug, Serialize)]
struct Side {
    time_us: f64,
    algbw_gbps: f64,
    busbw_gbps: f64,
    wrong: u64,
    stats: Summary,
}

#[derive(Debug, Serialize)]
struct Row {
    bytes: usize,
    m2n: Side,
    baseline: Option<Side>,
    memcpy_gbps: f64,
    /// m2n busbw / the peak (see `peak_source`).
    utilisation: f64,
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

const TIMING: &str = "per iteration: MPI barrier, then each rank times from leaving the barrier to its part of the round being complete; the sample is the maximum over ranks";

fn fail(world: &SimpleCommunicator, msg: &str) -> ! {
    if world.rank() == 0 {
        eprintln!("m2n_perf: {msg}");
    } else {
        // When every rank fails alike, rank 0's message goes out before
        // another rank's exit makes the launcher end the job.
        std::thread::sleep(Duration::from_millis(200));
    }
    std::process::exit(2);
}

/// [`fail`] for a check that every rank makes alike (the arguments, the
/// build's features): rank 0 says why before any rank leaves, so the
/// launcher cannot cut rank 0 down, message unwritten, when another rank's
/// exit comes first (seen on a loaded machine).
fn fail_all(world: &SimpleCommunicator, msg: &str) -> ! {
    if world.rank() == 0 {
        eprintln!("m2n_perf: {msg}");
    }
    world.barrier();
    std::process::exit(2);
}

/// Transport work per round, averaged over each side's ranks: work
/// requests, inline, signalled, doorbells, CQ polls, completions, receive
/// posts (the order of [`m2n::transport::TransportCounters`]).
#[derive(Debug, Serialize)]
struct WorkPerRound {
    fields: [&'static str; 7],
    attention: [f64; 7],
    expert: [f64; 7],
}

/// Gathers every rank's counters over `rounds` rounds; `None` when the
/// transport counts nothing (shm, tcp).
fn work_per_round(
    world: &SimpleCommunicator,
    m: usize,
    c: m2n::transport::TransportCounters,
    rounds: u64,
) -> Option<WorkPerRound> {
    let v = c.values();
    let mine = [v[0], v[1], v[2], v[3], v[4], v[5], v[6], rounds];
    let mut all = vec![0u64; 8 * world.size() as usize];
    world.all_gather_into(&mine[..], &mut all[..]);
    if all.chunks(8).all(|r| r[..7].iter().all(|&v| v == 0)) {
        return None;
    }
    let mean = |ranks: &[&[u64]]| {
        let mut out = [0.0; 7];
        for r in ranks {
            for i in 0..7 {
                out[i] += r[i] as f64 / r[7].max(1) as f64 / ranks.len() as f64;
            }
        }
        out
    };
    let rows: Vec<&[u64]> = all.chunks(8).collect();
    Some(WorkPerRound {
        fields: m2n::transport::TransportCounters::FIELDS,
        attention: mean(&rows[..m]),
        expert: mean(&rows[m..]),
    })
}

fn host_line(world: &SimpleCommunicator, role: Role, rank: usize, detail: &str) -> Vec<String> {
    const LINE: usize = 192;
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

/// Runs warm-up, timed and check iterations of one contender at one size;
/// returns (samples as maxima over ranks, wrong bytes over all ranks).
fn measure(
    world: &SimpleCommunicator,
    args: &Args,
    mut iteration: impl FnMut(bool) -> Sample,
) -> (Vec<f64>, u64) {
    for _ in 0..args.warmup {
        iteration(false);
    }
    let mine: Vec<f64> = (0..args.iters).map(|_| iteration(false).secs).collect();
    let mut samples = vec![0.0f64; mine.len()];
    world.all_reduce_into(&mine[..], &mut samples[..], SystemOperation::max());
    let mut wrong = 0u64;
    if args.check == 1 {
        let mine = iteration(true).wrong;
        world.all_reduce_into(&mine, &mut wrong, SystemOperation::sum());
    }
    (samples, wrong)
}

fn side(args: &Args, m: usize, n: usize, size: usize, samples: &[f64], wrong: u64) -> Side {
    let stats = Summary::of(samples);
    let time = stats.mean_us * 1e-6;
    let rounds = if args.pattern == Pattern::Roundtrip {
        2.0
    } else {
        1.0
    };
    // algbw: all payload of one iteration over all pairs, per second.
    let algbw = rounds * (m * n * size) as f64 / time / 1e9;
    // busbw: what the busiest rank's link carries: max(N, M) messages each way.
    let busbw = rounds * (m.max(n) * size) as f64 / time / 1e9;
    Side {
        time_us: stats.mean_us,
        algbw_gbps: algbw,
        busbw_gbps: busbw,
        wrong,
        stats,
    }
}

/// Which path the MPI baseline's messages take. Against m2n over tcp it
/// must be MPI over TCP too (like for like): MPICH is kept off shared
/// memory and, with UCX, on its tcp transport, through the variables MPI
/// reads in MPI_Init, unless the user set them.
struct MpiPath {
    /// The header line.
    line: String,
    /// MPI over UCX's tcp transport can hang in MPI_Finalize (see `pmi`):
    /// ranks then leave through `pmi::finalize_and_exit` instead.
    skip_finalize: bool,
}

fn choose_mpi_path(args: &Result<Args, clap::Error>) -> MpiPath {
    let plain = |line: &str| MpiPath {
        line: line.into(),
        skip_finalize: false,
    };
    let Ok(args) = args else {
        return plain("");
    };
    if args.baseline != Baseline::Mpi {
        return plain("n/a");
    }
    let env = m2n::Config::from_env().unwrap_or_default();
    if args.m2n_config(&env).transport != m2n::TransportKind::Tcp {
        return plain("MPI's default (shared memory between ranks on one host)");
    }
    // MPI_Get_library_version may be called before MPI_Init.
    let version = mpi::environment::library_version().unwrap_or_default();
    let mut wanted = vec![("MPIR_CVAR_NOLOCAL", "1")];
    let ucx = version.contains("ch4:ucx");
    if ucx {
        wanted.push(("UCX_TLS", "tcp,self"));
    } else if version.contains("ch4:ofi") {
        wanted.push(("FI_PROVIDER", "tcp"));
    }
    let mut set = Vec::new();
    for (k, v) in wanted {
        match std::env::var(k) {
            Ok(have) => set.push(format!("{k}={have} (from the environment)")),
            Err(_) => {
                // Single-threaded still: MPI is not initialised yet.
                std::env::set_var(k, v);
                set.push(format!("{k}={v}"));
            }
        }
    }
    let device = version
        .lines()
        .find_map(|l| l.trim().strip_prefix("MPICH Device:"))
        .map(|d| d.trim().to_string())
        .unwrap_or_else(|| "unknown device".into());
    MpiPath {
        line: format!("TCP like m2n's ({device}: {})", set.join(" ")),
        skip_finalize: ucx,
    }
}

fn main() {
    let parsed = Args::try_parse();
    let mpi_path = choose_mpi_path(&parsed);
    let universe = mpi::initialize().expect("MPI_Init");
    let world = universe.world();
    let (size, me) = (world.size() as usize, world.rank() as usize);
    let args = match parsed {
        Ok(a) => a,
        Err(e) => {
            if me == 0 {
                let _ = e.print();
            }
            std::process::exit(2);
        }
    };
    if args.senders == 0 || args.senders >= size {
        fail_all(
            &world,
            &format!(
                "--senders {} needs 1..{} with {size} MPI ranks (the rest are receivers)",
                args.senders, size
            ),
        );
    }
    if args.min_bytes > args.max_bytes {
        fail_all(
            &world,
            &format!("-b {} is larger than -e {}", args.min_bytes, args.max_bytes),
        );
    }
    #[cfg(not(feature = "verbs"))]
    if args.baseline == Baseline::Verbs {
        fail_all(&world, "the raw-verbs baseline needs an m2n-bench built with the `verbs` feature (the default)");
    }
    #[cfg(not(feature = "cuda"))]
    if matches!(args.baseline, Baseline::Nccl | Baseline::CudaMemcpy) || args.device_buffers {
        fail_all(&world, "GPU buffers (--device-buffers, --baseline nccl or cuda-memcpy) need an m2n-bench built with `--features cuda` and a GPU; use --baseline mpi or none");
    }
    // On GPU buffers: open the GPU first, so a machine without one is told
    // so before anything else starts.
    #[cfg(feature = "cuda")]
    let gpu_stream = (args.device_buffers
        || matches!(args.baseline, Baseline::Nccl | Baseline::CudaMemcpy))
    .then(|| nccl_base::open_gpu(&world).unwrap_or_else(|e| fail(&world, &e)));
    let (m, n) = (args.senders, size - args.senders);
    let (role, rank) = if me < m {
        (Role::Attention, me)
    } else {
        (Role::Expert, me - m)
    };

    let place = run::Place { role, rank, m, n };
    let uid = m2n::bootstrap::mpi::share_unique_id(&world, Duration::from_secs(120))
        .unwrap_or_else(|e| fail(&world, &e));
    let env = Config::from_env().unwrap_or_else(|e| fail(&world, &e.to_string()));
    let config = args.m2n_config(&env);
    let depth = config.dispatch.depth;
    let comm = match Communicator::init(config.clone(), role, rank, Shape::new(m, n), &uid) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("m2n_perf: {role} {rank}: {e}");
            world.abort(3);
        }
    };
    let transport = comm.transport_kind();
    let detail = comm.transport_detail().to_string();
    // The device, port and GID m2n resolved on this rank: the raw-verbs
    // baseline uses the same.
    #[cfg(feature = "verbs")]
    let ib = comm.config().ib.clone();
    // The policy `auto` resolved to; the MPI baseline waits the same way.
    let wait = comm.config().wait;
    let mut contender = M2nRank::new(comm, args.max_bytes).unwrap_or_else(|e| {
        eprintln!("m2n_perf: {role} {rank}: {e}");
        world.abort(3)
    });
    let mut baseline: Option<Contender> = match args.baseline {
        Baseline::Mpi => Some(Contender::Mpi(MpiRank::new(place, args.max_bytes, wait))),
        #[cfg(feature = "verbs")]
        Baseline::Verbs => {
            if transport != m2n::TransportKind::Verbs {
                fail(
                    &world,
                    &format!("--baseline verbs compares with m2n over verbs; this run's transport is {transport} (use --transport verbs)"),
                );
            }
            let r = verbs_base::VerbsRank::new(&world, place, &ib, args.max_bytes, wait)
                .unwrap_or_else(|e| {
                    eprintln!("m2n_perf: {role} {rank}: raw verbs baseline: {e}");
                    world.abort(3)
                });
            Some(Contender::Verbs(Box::new(r)))
        }
        #[cfg(feature = "cuda")]
        Baseline::Nccl => {
            let stream = gpu_stream.clone().expect("opened above");
            let r = nccl_base::NcclRank::new(&world, stream, place, args.max_bytes, wait)
                .unwrap_or_else(|e| {
                    eprintln!("m2n_perf: {role} {rank}: {e}");
                    world.abort(3)
                });
            Some(Contender::Nccl(Box::new(r)))
        }
        #[cfg(feature = "cuda")]
        Baseline::CudaMemcpy => {
            let stream = gpu_stream.clone().expect("opened above");
            let r = ipc_base::IpcRank::new(&world, stream, place, args.max_bytes, wait)
                .unwrap_or_else(|e| {
                    eprintln!("m2n_perf: {role} {rank}: cuda-memcpy baseline: {e}");
                    world.abort(3)
                });
            Some(Contender::CudaMemcpy(Box::new(r)))
        }
        _ => None,
    };
    // With a GPU baseline (or when asked), m2n sends from GPU memory too.
    #[cfg(feature = "cuda")]
    if let Some(stream) = gpu_stream.clone() {
        contender = contender
            .with_gpu_buffers(stream, args.max_bytes)
            .unwrap_or_else(|e| {
                eprintln!("m2n_perf: {role} {rank}: m2n on GPU buffers: {e}");
                world.abort(3)
            });
    }
    let base_name = match args.baseline {
        Baseline::Mpi => "mpi",
        Baseline::Verbs => "verbs",
        Baseline::Nccl => "nccl",
        Baseline::CudaMemcpy => "cuda-memcpy",
        Baseline::None => "none",
    };
    let hosts = host_line(&world, role, rank, &detail);
    let sizes = args.sizes();
    let peak_source = if transport == m2n::TransportKind::Shm {
        "single-core memcpy at the same size"
    } else {
        "the best m2n busbw of the sweep"
    };

    if me == 0 {
        let mpi_version = mpi::environment::library_version().unwrap_or_default();
        println!(
            "# m2n_perf {} : M2N {:?}, nccl-tests layout",
            env!("CARGO_PKG_VERSION"),
            args.pattern
        );
        println!("# senders (attention) M: {m}  receivers (experts) N: {n}  ranks: {size}");
        println!(
            "# minBytes {} maxBytes {} step: {}(factor) warmup iters: {} iters: {} validation: {} per-iter stats: {}",
            args.min_bytes, args.max_bytes, args.factor, args.warmup, args.iters, args.check, args.iter_stats
        );
        println!(
            "# transport: {transport}  depth: {}  slot: {} B  wait: {}  peer timeout: {:?}  m2n send buffers: {}",
            depth,
            args.max_bytes,
            wait,
            config.peer_timeout,
            if args.device_buffers || matches!(args.baseline, Baseline::Nccl | Baseline::CudaMemcpy) {
                match transport {
                    m2n::TransportKind::Shm | m2n::TransportKind::Tcp => "GPU (through a pinned host stage: this transport copies)",
                    _ => "GPU (zero-copy)",
                }
            } else {
                "host"
            }
        );
        println!(
            "# baseline: {}",
            match args.baseline {
                Baseline::Mpi => format!(
                    "MPI_Isend/MPI_Irecv per round, completed by {} ({})",
                    if wait == m2n::WaitPolicy::Spin {
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
                ),
                Baseline::Nccl => "NCCL grouped ncclSend/ncclRecv per round on GPU buffers, then a stream sync; m2n sends from GPU buffers too".into(),
                Baseline::Verbs => "raw RDMA WRITE WITH IMMEDIATE per peer into a registered region (inline when small, signalled), SRQ, CQ polled with the same wait policy; no credits or checks".into(),
                Baseline::CudaMemcpy => "cuMemcpyAsync into each peer's CUDA-IPC-opened GPU buffer (as cudaMemcpyPeerAsync), cudaStreamSynchronize, then a 1-byte MPI note per peer; m2n sends from GPU buffers too".into(),
                Baseline::None => "none".into(),
            }
        );
        if args.baseline == Baseline::Mpi {
            println!("# baseline MPI path: {}", mpi_path.line);
        }
        println!(
            "# machine: {} cpus, {}",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| format!("Linux {}", s.trim()))
                .unwrap_or_default()
        );
        println!(
            "# timing: {TIMING}; time = mean, p50/p99 over {} samples",
            args.iters
        );
        println!("# size = bytes per sender-receiver pair and round; algbw = all pairs' bytes / time; busbw = busiest rank's bytes / time");
        println!("# Using devices");
        for (i, h) in hosts.iter().enumerate() {
            println!("#  Rank {i:2} {h}");
        }
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
        if baseline.is_some() {
            head += &format!(
                " | {:>9} {:>8} {:>8} {:>7} {:>9} {:>9} | {:>6} {:>7} {:>7}",
                format!("{} time", base_name),
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
        println!("{head}\n{unit}");
    }

    let mut rows: Vec<Row> = Vec::new();
    let mut total_wrong = 0u64;
    let (work_before, rounds_before) = (contender.comm.transport_counters(), contender.rounds());
    for &s in &sizes {
        let (samples, wrong) = measure(&world, &args, |verify| {
            contender
                .iteration(&world, args.pattern, s, verify)
                .unwrap_or_else(|e| {
                    eprintln!("m2n_perf: {role} {rank}: {e}");
                    world.abort(3)
                })
        });
        let m2n_side = side(&args, m, n, s, &samples, wrong);
        let base_side = baseline.as_mut().map(|b| {
            let (samples, wrong) = measure(&world, &args, |verify| match b {
                Contender::Mpi(r) => r.iteration(&world, args.pattern, s, verify),
                #[cfg(feature = "verbs")]
                Contender::Verbs(r) => {
                    r.iteration(&world, args.pattern, s, verify)
                        .unwrap_or_else(|e| {
                            eprintln!("m2n_perf: {role} {rank}: raw verbs baseline: {e}");
                            world.abort(3)
                        })
                }
                #[cfg(feature = "cuda")]
                Contender::Nccl(r) => {
                    nccl_base::gpu_iteration(r.as_mut(), &world, args.pattern, s, verify)
                        .unwrap_or_else(|e| {
                            eprintln!("m2n_perf: {role} {rank}: {e}");
                            world.abort(3)
                        })
                }
                #[cfg(feature = "cuda")]
                Contender::CudaMemcpy(r) => {
                    nccl_base::gpu_iteration(r.as_mut(), &world, args.pattern, s, verify)
                        .unwrap_or_else(|e| {
                            eprintln!("m2n_perf: {role} {rank}: {e}");
                            world.abort(3)
                        })
                }
            });
            side(&args, m, n, s, &samples, wrong)
        });
        world.barrier();
        if me != 0 {
            continue;
        }
        let memcpy = limit::memcpy_gbps(s, depth);
        total_wrong += m2n_side.wrong + base_side.as_ref().map_or(0, |b| b.wrong);
        let mut line = format!(
            "{:>12} {:>12} {:>6} {:>9.2} {:>8.2} {:>8.2} {:>7} {:>9.2} {:>9.2}",
            s,
            s,
            "uint8",
            m2n_side.time_us,
            m2n_side.algbw_gbps,
            m2n_side.busbw_gbps,
            m2n_side.wrong,
            m2n_side.stats.p50_us,
            m2n_side.stats.p99_us
        );
        if args.iter_stats == 1 {
            line += &format!(
                " {:>9.2} {:>9.2} {:>6.1}",
                m2n_side.stats.min_us, m2n_side.stats.max_us, m2n_side.stats.cv_pct
            );
        }
        if let Some(b) = &base_side {
            line += &format!(
                " | {:>9.2} {:>8.2} {:>8.2} {:>7} {:>9.2} {:>9.2} | {:>6.2} {:>7.1} {:>7.1}",
                b.time_us,
                b.algbw_gbps,
                b.busbw_gbps,
                b.wrong,
                b.stats.p50_us,
                b.stats.p99_us,
                m2n_side.algbw_gbps / b.algbw_gbps,
                100.0 * (1.0 - m2n_side.stats.p50_us / b.stats.p50_us),
                100.0 * (1.0 - m2n_side.stats.p99_us / b.stats.p99_us),
            );
        }
        line += &format!(
            " | {:>8.2} {:>6.1}",
            memcpy,
            100.0 * m2n_side.busbw_gbps / memcpy
        );
        println!("{line}");
        let _ = std::io::stdout().flush();
        rows.push(Row {
            bytes: s,
            m2n: m2n_side,
            baseline: base_side,
            memcpy_gbps: memcpy,
            utilisation: 0.0,
        });
    }
    let per_round = work_per_round(
        &world,
        m,
        contender.comm.transport_counters().since(&work_before),
        contender.rounds() - rounds_before,
    );
    if me == 0 {
        let best = rows.iter().map(|r| r.m2n.busbw_gbps).fold(0.0, f64::max);
        for r in &mut rows {
            let peak = if transport == m2n::TransportKind::Shm {
                r.memcpy_gbps
            } else {
                best
            };
            r.utilisation = (r.m2n.busbw_gbps / peak).min(1.0);
        }
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
            println!("# Avg bus bandwidth ({base_name}): {avg_b:.4}");
        }
        if let Some(w) = &per_round {
            for (side, c) in [("attention", &w.attention), ("expert", &w.expert)] {
                println!(
                    "# m2n {transport} work per round, {side} rank (mean): {:.2} work requests ({:.2} inline, {:.2} signalled), {:.2} doorbells, {:.2} CQ polls returning {:.2} completions, {:.2} receive posts",
                    c[0], c[1], c[2], c[3], c[4], c[5], c[6]
                );
            }
        }
        println!("# M2N test concluded: {:?}", args.pattern);
        if let Some(path) = &args.json {
            let report = Report {
                tool: "m2n_perf",
                version: env!("CARGO_PKG_VERSION"),
                pattern: format!("{:?}", args.pattern).to_lowercase(),
                transport: transport.to_string(),
                baseline: format!("{:?}", args.baseline).to_lowercase(),
                baseline_path: &mpi_path.line,
                work_per_round: per_round.as_ref(),
                senders: m,
                receivers: n,
                iters: args.iters,
                warmup: args.warmup,
                wait: wait.to_string(),
                depth,
                timing: TIMING,
                peak_source,
                rows: &rows,
                utilisation_curve: rows.iter().map(|r| (r.bytes, r.utilisation)).collect(),
            };
            let text = serde_json::to_string_pretty(&report).expect("serialisable");
            if let Err(e) = std::fs::write(path, text) {
                eprintln!("m2n_perf: cannot write {}: {e}", path.display());
                std::process::exit(1);
            }
        }
        if total_wrong > 0 {
            std::process::exit(1);
        }
    }
    drop(baseline);
    drop(contender);
    if mpi_path.skip_finalize {
        // Every message of the run is complete once all ranks are here.
        world.barrier();
        let why = pmi::finalize_and_exit(0);
        eprintln!("m2n_perf: rank {me}: finalising MPI after all ({why}); over UCX's tcp this can hang (openucx/ucx#8738)");
    }
}
