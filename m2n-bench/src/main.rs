//! m2n_perf: an nccl-tests-style benchmark of M2N rounds, m2n against MPI
//! (and NCCL on GPUs), measured in the same run with the same timing. See
//! `run` for exactly how a sample is timed.
//!
//! `main` is the outline: parse and check the arguments, start m2n and the
//! baseline on every rank, print the header (`report`), run the size sweep
//! (`sweep`), and conclude on rank 0 with the footer and the JSON report.

mod cli;
mod contender;
#[cfg(feature = "cuda")]
mod ipc_base;
mod limit;
mod mpi_base;
#[cfg(feature = "cuda")]
mod nccl_base;
mod pmi;
mod report;
mod run;
mod stats;
mod sweep;
#[cfg(feature = "verbs")]
mod verbs_base;

use std::fmt::Display;
use std::time::Duration;

use clap::Parser;
use mpi::topology::SimpleCommunicator;
use mpi::traits::Communicator as _;
use mpi::traits::*;

use cli::Args;
use m2n::{Communicator, Config, Role, Shape, TransportKind, WaitPolicy};
use mpi_base::MpiPath;
use report::Run;
use run::{M2nRank, Place};

fn main() {
    let parsed = Args::try_parse();
    let mpi_path = mpi_base::choose_path(&parsed);
    let universe = mpi::initialize().expect("MPI_Init");
    let world = universe.world();
    let args = args_or_exit(&world, parsed);
    check_args(&world, &args);
    let place = place(&world, &args);
    let (mut contender, resolved) = start_m2n(&world, &args, place);
    let mut baseline = contender::start_baseline(&world, &args, place, &resolved);
    #[cfg(feature = "cuda")]
    {
        contender = on_gpu_buffers(&world, &args, place, contender, &resolved);
    }
    let run = Run {
        args: &args,
        place,
        transport: resolved.transport,
        depth: resolved.config.dispatch.depth,
        wait: resolved.wait,
        peer_timeout: resolved.config.peer_timeout,
        baseline_path: &mpi_path.line,
    };
    let hosts = report::host_lines(&world, place, &resolved.detail);
    if world.rank() == 0 {
        report::print_header(&run, &hosts, baseline.is_some());
    }
    let sweep = sweep::sweep(&world, &run, &mut contender, baseline.as_mut());
    if world.rank() == 0 {
        report::conclude(&run, sweep);
    }
    drop(baseline);
    drop(contender);
    leave(&world, &mpi_path);
}

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

/// A failure of this rank alone (m2n's or a baseline's): says which rank
/// failed and why, and aborts the job.
fn abort(world: &SimpleCommunicator, place: Place, why: impl Display) -> ! {
    eprintln!("m2n_perf: {} {}: {why}", place.role, place.rank);
    world.abort(3)
}

/// The parsed arguments, or (rank 0 printing clap's message) exit 2.
fn args_or_exit(world: &SimpleCommunicator, parsed: Result<Args, clap::Error>) -> Args {
    match parsed {
        Ok(a) => a,
        Err(e) => {
            if world.rank() == 0 {
                let _ = e.print();
            }
            std::process::exit(2);
        }
    }
}

/// The checks every rank makes alike: the group's shape, the size range,
/// and what this build's features allow.
fn check_args(world: &SimpleCommunicator, args: &Args) {
    let size = world.size() as usize;
    if args.senders == 0 || args.senders >= size {
        fail_all(
            world,
            &format!(
                "--senders {} needs 1..{} with {size} MPI ranks (the rest are receivers)",
                args.senders, size
            ),
        );
    }
    if args.min_bytes > args.max_bytes {
        fail_all(
            world,
            &format!("-b {} is larger than -e {}", args.min_bytes, args.max_bytes),
        );
    }
    if args.timing == cli::Timing::Loop
        && args.baseline == cli::Baseline::Verbs
        && args.pattern == cli::Pattern::Dispatch
    {
        fail_all(world, "--timing loop with --baseline verbs needs --pattern roundtrip: the raw-verbs baseline has no credits, so back-to-back one-way rounds could overwrite messages not yet read");
    }
    #[cfg(not(feature = "verbs"))]
    if args.baseline == cli::Baseline::Verbs {
        fail_all(world, "the raw-verbs baseline needs an m2n-bench built with the `verbs` feature (the default)");
    }
    #[cfg(not(feature = "cuda"))]
    if args.gpu_buffers() {
        fail_all(world, "GPU buffers (--device-buffers, --baseline nccl or cuda-memcpy) need an m2n-bench built with `--features cuda` and a GPU; use --baseline mpi or none");
    }
}

/// This rank's place: MPI ranks 0..M are attention ranks, the rest experts.
fn place(world: &SimpleCommunicator, args: &Args) -> Place {
    let me = world.rank() as usize;
    let (m, n) = (args.senders, world.size() as usize - args.senders);
    let (role, rank) = if me < m {
        (Role::Attention, me)
    } else {
        (Role::Expert, me - m)
    };
    Place { role, rank, m, n }
}

/// What starting m2n on this rank settled, that the baseline copies and
/// the header states.
struct Resolved {
    /// m2n's configuration as asked for (the variables, then the flags).
    config: Config,
    /// The transport `auto` (or the one asked for) resolved to.
    transport: TransportKind,
    /// The transport's own description of its path, for the host lines.
    detail: String,
    /// The policy `auto` resolved to; the MPI baseline waits the same way.
    wait: WaitPolicy,
    /// The device, port and GID m2n resolved on this rank: the raw-verbs
    /// baseline uses the same.
    #[cfg(feature = "verbs")]
    ib: m2n::config::IbConfig,
    /// The GPU's stream, when the run uses GPU buffers.
    #[cfg(feature = "cuda")]
    gpu: Option<std::sync::Arc<cudarc::driver::CudaStream>>,
}

/// Opens the GPU when the run needs it, shares the unique id, and starts
/// m2n on this rank.
fn start_m2n(world: &SimpleCommunicator, args: &Args, place: Place) -> (M2nRank, Resolved) {
    // On GPU buffers: open the GPU first, so a machine without one is told
    // so before anything else starts.
    #[cfg(feature = "cuda")]
    let gpu = args
        .gpu_buffers()
        .then(|| nccl_base::open_gpu(world).unwrap_or_else(|e| fail(world, &e)));
    let uid = m2n::bootstrap::mpi::share_unique_id(world, Duration::from_secs(120))
        .unwrap_or_else(|e| fail(world, &e));
    let env = Config::from_env().unwrap_or_else(|e| fail(world, &e.to_string()));
    let config = args.m2n_config(&env);
    let shape = Shape::new(place.m, place.n);
    let comm = Communicator::init(config.clone(), place.role, place.rank, shape, &uid)
        .unwrap_or_else(|e| abort(world, place, e));
    let resolved = Resolved {
        config,
        transport: comm.transport_kind(),
        detail: comm.transport_detail().to_string(),
        wait: comm.config().wait,
        #[cfg(feature = "verbs")]
        ib: comm.config().ib.clone(),
        #[cfg(feature = "cuda")]
        gpu,
    };
    let contender = M2nRank::new(comm, args.max_bytes).unwrap_or_else(|e| abort(world, place, e));
    (contender, resolved)
}

/// With a GPU baseline (or when asked), m2n sends from GPU memory too.
#[cfg(feature = "cuda")]
fn on_gpu_buffers(
    world: &SimpleCommunicator,
    args: &Args,
    place: Place,
    contender: M2nRank,
    resolved: &Resolved,
) -> M2nRank {
    let Some(stream) = resolved.gpu.clone() else {
        return contender;
    };
    contender
        .with_gpu_buffers(stream, args.max_bytes)
        .unwrap_or_else(|e| abort(world, place, format!("m2n on GPU buffers: {e}")))
}

/// Leaves the job; over UCX's tcp transport without `MPI_Finalize`, which
/// can hang there (see `pmi`). Otherwise MPI is finalised when `main`'s
/// universe goes.
fn leave(world: &SimpleCommunicator, mpi_path: &MpiPath) {
    if mpi_path.skip_finalize {
        // Every message of the run is complete once all ranks are here.
        world.barrier();
        let why = pmi::finalize_and_exit(0);
        eprintln!(
            "m2n_perf: rank {}: finalising MPI after all ({why}); over UCX's tcp this can hang (openucx/ucx#8738)",
            world.rank()
        );
    }
}
