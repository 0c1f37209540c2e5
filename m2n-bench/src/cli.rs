use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pattern {
    /// One-way M -> N rounds.
    Dispatch,
    /// Dispatch, then a combine of the same size back (a MoE layer).
    Roundtrip,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Baseline {
    /// MPI_Isend / MPI_Irecv / MPI_Waitall per round.
    Mpi,
    /// NCCL grouped ncclSend/ncclRecv on GPU buffers (needs GPUs).
    Nccl,
    /// Raw RDMA WRITE WITH IMMEDIATE into a registered region, SRQ and CQ
    /// polling, no protocol: the floor for m2n's verbs transport.
    Verbs,
    /// GPU to GPU the naive way: a copy into each peer's CUDA-IPC-opened
    /// buffer, a stream sync, a one-byte MPI note (needs a GPU; implies
    /// --device-buffers).
    CudaMemcpy,
    None,
}

impl Baseline {
    /// The name the header's columns and footer use (as on the command line).
    pub fn name(self) -> &'static str {
        match self {
            Baseline::Mpi => "mpi",
            Baseline::Verbs => "verbs",
            Baseline::Nccl => "nccl",
            Baseline::CudaMemcpy => "cuda-memcpy",
            Baseline::None => "none",
        }
    }
}

/// Where each iteration's time starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Timing {
    /// An MPI barrier before every iteration; each rank times from leaving
    /// it, so p50/p99 are those of single, isolated rounds.
    Barrier,
    /// Iterations back to back after one barrier per size; each rank times
    /// an iteration from the end of its previous one, as nccl-tests and
    /// fabtests time their loops (the mean is total time / iterations).
    /// One-way rounds overlap up to the depth (a sender waits for its
    /// oldest round once `depth` are in flight; m2n and the MPI baseline,
    /// like fi_rma_bw's window); in `roundtrip` each round is complete
    /// before the next starts.
    Loop,
}

impl Timing {
    /// How a sample is taken, as the header and the JSON report say it.
    pub fn describe(self) -> &'static str {
        match self {
            Timing::Barrier => "per iteration: MPI barrier, then each rank times from leaving the barrier to its part of the round being complete; the sample is the maximum over ranks",
            Timing::Loop => "iterations back to back after one MPI barrier per size; each rank times an iteration from the end of its previous one to its part of the round being complete (one-way senders: posted, with up to depth rounds in flight); the time is the slowest rank's elapsed time over the iterations divided by their number (as nccl-tests -a 3 and fabtests report a loop), the percentiles those of the per-iteration maxima over ranks",
        }
    }
}

fn bytes(s: &str) -> Result<usize, String> {
    m2n::config::parse_bytes(s)
}

/// nccl-tests-style M2N benchmark. Launch with `mpiexec -n <M+N> m2n_perf
/// --senders M ...`: MPI ranks 0..M are attention ranks (senders), the rest
/// experts (receivers).
#[derive(Debug, Clone, Parser)]
#[command(name = "m2n_perf")]
pub struct Args {
    /// Minimum bytes per sender-receiver pair (K/M/G suffixes).
    #[arg(short = 'b', long = "minbytes", default_value = "2K", value_parser = bytes)]
    pub min_bytes: usize,
    /// Maximum bytes per sender-receiver pair.
    #[arg(short = 'e', long = "maxbytes", default_value = "8M", value_parser = bytes)]
    pub max_bytes: usize,
    /// Multiplicative step between sizes.
    #[arg(short = 'f', long = "stepfactor", default_value_t = 2, value_parser = clap::value_parser!(u32).range(2..))]
    pub factor: u32,
    /// Timed iterations per size.
    #[arg(short = 'n', long = "iters", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub iters: u32,
    /// Warm-up iterations per size (not timed).
    #[arg(short = 'w', long = "warmup_iters", default_value_t = 10)]
    pub warmup: u32,
    /// Check data (1) in an extra iteration per size, or not (0).
    #[arg(short = 'c', long = "check", default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub check: u8,
    /// Per-iteration statistics columns (min, max, cv%) besides p50/p99.
    #[arg(short = 'I', long = "iter-stats", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub iter_stats: u8,
    /// Attention ranks (M); the other ranks are experts.
    #[arg(long)]
    pub senders: usize,
    /// Transport for m2n: shm, tcp, verbs or auto [default: M2N_TRANSPORT, else auto].
    #[arg(long)]
    pub transport: Option<m2n::TransportKind>,
    #[arg(long, value_enum, default_value_t = Pattern::Dispatch)]
    pub pattern: Pattern,
    #[arg(long, value_enum, default_value_t = Baseline::Mpi)]
    pub baseline: Baseline,
    /// Where each iteration's time starts: after a barrier, or where the
    /// rank's previous iteration ended (back to back).
    #[arg(long, value_enum, default_value_t = Timing::Barrier)]
    pub timing: Timing,
    /// How m2n's (and the MPI baseline's) blocking calls wait: spin, yield,
    /// spin-yield[:N], or auto (yield when ranks outnumber cores)
    /// [default: M2N_WAIT, else auto].
    #[arg(long)]
    pub wait: Option<m2n::WaitPolicy>,
    /// Rounds a sender may run ahead (slots per sender) [default:
    /// M2N_DEPTH (or M2N_DISPATCH_DEPTH / M2N_COMBINE_DEPTH), else 4].
    #[arg(long)]
    pub depth: Option<usize>,
    /// m2n sends from GPU memory (feature `cuda`): zero-copy over verbs
    /// and cuda-ipc, through a pinned host stage over shm and tcp.
    #[arg(long)]
    pub device_buffers: bool,
    /// Write rows, sample summaries and the utilisation curve here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

impl Args {
    /// m2n's configuration for this run: `env` (the defaults with the
    /// `M2N_*` variables applied) with the flags that were given on top,
    /// and slots sized for the largest message.
    pub fn m2n_config(&self, env: &m2n::Config) -> m2n::Config {
        let mut config = env.clone();
        if let Some(t) = self.transport {
            config.transport = t;
        }
        if let Some(w) = self.wait {
            config.wait = w;
        }
        for ch in [&mut config.dispatch, &mut config.combine] {
            if let Some(d) = self.depth {
                ch.depth = d;
            }
            ch.slot_bytes = self.max_bytes;
        }
        config
    }

    /// Whether the run uses GPU buffers: asked for, or implied by a GPU
    /// baseline.
    pub fn gpu_buffers(&self) -> bool {
        self.device_buffers || matches!(self.baseline, Baseline::Nccl | Baseline::CudaMemcpy)
    }

    pub fn sizes(&self) -> Vec<usize> {
        let mut v = Vec::new();
        let mut s = self.min_bytes.max(1);
        while s <= self.max_bytes {
            v.push(s);
            s = s.saturating_mul(self.factor as usize);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn env(vars: &[(&str, &str)]) -> m2n::Config {
        let mut c = m2n::Config::default();
        c.apply_env(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .unwrap();
        c
    }

    #[test]
    fn m2n_variables_apply_when_no_flag_is_given() {
        let args = Args::parse_from(["m2n_perf", "--senders", "1", "-e", "64K"]);
        let c = args.m2n_config(&env(&[
            ("M2N_TRANSPORT", "tcp"),
            ("M2N_DEPTH", "8"),
            ("M2N_WAIT", "yield"),
        ]));
        assert_eq!(c.transport, m2n::TransportKind::Tcp);
        assert_eq!((c.dispatch.depth, c.combine.depth), (8, 8));
        assert_eq!(c.wait, m2n::WaitPolicy::Yield);
        assert_eq!(c.dispatch.slot_bytes, 64 << 10);
    }

    #[test]
    fn flags_win_over_m2n_variables() {
        let args = Args::parse_from([
            "m2n_perf",
            "--senders",
            "1",
            "--transport",
            "shm",
            "--depth",
            "2",
            "--wait",
            "spin",
        ]);
        let c = args.m2n_config(&env(&[("M2N_TRANSPORT", "tcp"), ("M2N_DEPTH", "8")]));
        assert_eq!(c.transport, m2n::TransportKind::Shm);
        assert_eq!((c.dispatch.depth, c.combine.depth), (2, 2));
        assert_eq!(c.wait, m2n::WaitPolicy::Spin);
    }

    #[test]
    fn timing_is_barrier_unless_loop_is_asked_for() {
        let args = Args::parse_from(["m2n_perf", "--senders", "1"]);
        assert_eq!(args.timing, Timing::Barrier);
        let args = Args::parse_from(["m2n_perf", "--senders", "1", "--timing", "loop"]);
        assert_eq!(args.timing, Timing::Loop);
        assert_ne!(Timing::Loop.describe(), Timing::Barrier.describe());
        assert!(Args::try_parse_from(["m2n_perf", "--senders", "1", "--timing", "often"]).is_err());
    }

    #[test]
    fn without_either_the_defaults_hold() {
        let args = Args::parse_from(["m2n_perf", "--senders", "1"]);
        let c = args.m2n_config(&m2n::Config::default());
        assert_eq!(c.transport, m2n::TransportKind::Auto);
        assert_eq!(c.dispatch.depth, 4);
        assert_eq!(c.wait, m2n::WaitPolicy::Auto);
    }
}
