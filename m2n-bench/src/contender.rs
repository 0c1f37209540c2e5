//! The baseline a run compares m2n with, started and driven on one rank.

use mpi::topology::SimpleCommunicator;

use crate::cli::{Args, Baseline, Pattern};
use crate::run::{Clock, MpiRank, Place, Sample};
use crate::Resolved;
#[cfg(feature = "verbs")]
use crate::{fail, verbs_base};
#[cfg(feature = "cuda")]
use crate::{ipc_base, nccl_base};

/// The baseline a run compares with.
pub enum Contender {
    Mpi(MpiRank),
    #[cfg(feature = "verbs")]
    Verbs(Box<verbs_base::VerbsRank>),
    #[cfg(feature = "cuda")]
    Nccl(Box<nccl_base::NcclRank>),
    #[cfg(feature = "cuda")]
    CudaMemcpy(Box<ipc_base::IpcRank>),
}

/// Starts the baseline `args` asks for on this rank, waiting the way m2n
/// resolved to wait (and, for raw verbs, on m2n's device and port); `None`
/// for `--baseline none`.
// Without `verbs`, no baseline that is left needs `world` to start.
#[cfg_attr(not(feature = "verbs"), allow(unused_variables))]
pub fn start_baseline(
    world: &SimpleCommunicator,
    args: &Args,
    place: Place,
    resolved: &Resolved,
) -> Option<Contender> {
    let wait = resolved.wait;
    match args.baseline {
        Baseline::Mpi => Some(Contender::Mpi(MpiRank::new(
            place,
            args.max_bytes,
            wait,
            resolved.config.dispatch.depth,
        ))),
        #[cfg(feature = "verbs")]
        Baseline::Verbs => {
            let transport = resolved.transport;
            if transport != m2n::TransportKind::Verbs {
                fail(
                    world,
                    &format!("--baseline verbs compares with m2n over verbs; this run's transport is {transport} (use --transport verbs)"),
                );
            }
            let r = verbs_base::VerbsRank::new(world, place, &resolved.ib, args.max_bytes, wait)
                .unwrap_or_else(|e| crate::abort(world, place, format!("raw verbs baseline: {e}")));
            Some(Contender::Verbs(Box::new(r)))
        }
        #[cfg(feature = "cuda")]
        Baseline::Nccl => {
            let stream = resolved.gpu.clone().expect("opened above");
            let r = nccl_base::NcclRank::new(world, stream, place, args.max_bytes)
                .unwrap_or_else(|e| crate::abort(world, place, e));
            Some(Contender::Nccl(Box::new(r)))
        }
        #[cfg(feature = "cuda")]
        Baseline::CudaMemcpy => {
            let stream = resolved.gpu.clone().expect("opened above");
            let r = ipc_base::IpcRank::new(world, stream, place, args.max_bytes, wait)
                .unwrap_or_else(|e| {
                    crate::abort(world, place, format!("cuda-memcpy baseline: {e}"))
                });
            Some(Contender::CudaMemcpy(Box::new(r)))
        }
        _ => None,
    }
}

impl Contender {
    /// Waits until every round this rank sent is done (loop timing keeps
    /// one-way rounds in flight; the other baselines complete each round).
    pub fn drain(&mut self) {
        if let Contender::Mpi(r) = self {
            r.drain();
        }
    }

    /// One iteration on this rank (see `run`); a failure aborts the job.
    // Without `verbs`, no baseline that is left can fail (`place` names
    // the rank that did).
    #[cfg_attr(not(feature = "verbs"), allow(unused_variables))]
    pub fn iteration(
        &mut self,
        world: &SimpleCommunicator,
        clock: &mut Clock,
        place: Place,
        pattern: Pattern,
        size: usize,
        verify: bool,
    ) -> Sample {
        match self {
            Contender::Mpi(r) => r.iteration(world, clock, pattern, size, verify),
            #[cfg(feature = "verbs")]
            Contender::Verbs(r) => r
                .iteration(world, clock, pattern, size, verify)
                .unwrap_or_else(|e| crate::abort(world, place, format!("raw verbs baseline: {e}"))),
            #[cfg(feature = "cuda")]
            Contender::Nccl(r) => {
                nccl_base::gpu_iteration(r.as_mut(), world, clock, pattern, size, verify)
                    .unwrap_or_else(|e| crate::abort(world, place, e))
            }
            #[cfg(feature = "cuda")]
            Contender::CudaMemcpy(r) => {
                nccl_base::gpu_iteration(r.as_mut(), world, clock, pattern, size, verify)
                    .unwrap_or_else(|e| crate::abort(world, place, e))
            }
        }
    }
}
