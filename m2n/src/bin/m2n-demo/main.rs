//! m2n-demo: launches M attention and N expert processes on this host and
//! runs dispatch + combine rounds between them, checking every byte.
//!
//! ```text
//! cargo run --release -p m2n --bin m2n-demo -- --senders 2 --receivers 2 --rounds 1000 --bytes 65536
//! ```

mod launcher;
mod streams;
mod worker;

use clap::Parser;

/// Settings shared by the launcher and its workers.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Attention ranks (M): they send on dispatch and receive on combine.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub senders: u32,
    /// Expert ranks (N): they receive on dispatch and send on combine.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub receivers: u32,
    /// Rounds of dispatch followed by combine.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub rounds: u64,
    /// Bytes per sender-receiver pair and round (K/M/G suffixes allowed).
    #[arg(long, default_value = "65536", value_parser = parse_bytes)]
    pub bytes: usize,
    /// What each round is: `roundtrip` (dispatch, then the experts'
    /// combine back) or `dispatch` (a one-way stream: attention ranks post
    /// rounds as fast as credits allow, experts check and release them).
    #[arg(long, value_enum, default_value_t = Pattern::Roundtrip)]
    pub pattern: Pattern,
    /// Rounds an attention rank keeps in flight (at most the depth).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub window: u32,
    /// Seconds any single wait may take before the run fails.
    #[arg(long, default_value_t = 30)]
    pub timeout_s: u64,
    /// Drive the channels the way an event loop does: `try_send`,
    /// `try_recv`, `is_sent` and `progress` in a loop, never a blocking call.
    #[arg(long, conflicts_with = "streams")]
    pub nonblocking: bool,
    /// Enqueue every send, receive and release on a stream (a host stream:
    /// the flag protocol CUDA streams run, on a CPU thread) with a proxy
    /// thread driving m2n; the stream's own work fills and checks the bytes.
    #[arg(long)]
    pub streams: bool,
    /// Internal (fault campaigns): after `--hold-after` rounds, stop in this
    /// phase and stay there until a signal arrives (see `worker::Phase`).
    #[arg(long, hide = true, conflicts_with = "streams")]
    pub hold: Option<worker::Phase>,
    #[arg(long, hide = true, default_value_t = 20)]
    pub hold_after: u64,
}

/// The shape of a round (`--pattern`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pattern {
    Roundtrip,
    Dispatch,
}

impl Pattern {
    pub fn name(self) -> &'static str {
        match self {
            Pattern::Roundtrip => "roundtrip",
            Pattern::Dispatch => "dispatch",
        }
    }
}

fn parse_bytes(s: &str) -> Result<usize, String> {
    m2n::config::parse_bytes(s)
}

#[derive(Debug, Parser)]
#[command(
    name = "m2n-demo",
    about = "Run an M2N exchange between local processes and check every byte"
)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
    /// Internal: run as one worker (set by the launcher and tests).
    #[arg(long, hide = true, requires_all = ["role", "rank"])]
    worker: bool,
    #[arg(long, hide = true)]
    role: Option<m2n::Role>,
    #[arg(long, hide = true)]
    rank: Option<u32>,
    /// Internal: only host a bootstrap root at this address, print its
    /// unique id, and serve one rendezvous (for multi-host tests).
    #[arg(long, hide = true, conflicts_with = "worker")]
    serve_root: Option<std::net::SocketAddr>,
}

fn main() {
    let cli = Cli::parse();
    if cli.run.streams && cli.run.pattern != Pattern::Roundtrip {
        eprintln!("m2n-demo: --streams runs round trips only (--pattern roundtrip)");
        std::process::exit(2);
    }
    let code = if let Some(addr) = cli.serve_root {
        launcher::serve_root(addr, cli.run.timeout_s)
    } else if cli.worker {
        worker::main(
            &cli.run,
            cli.role.expect("required"),
            cli.rank.expect("required") as usize,
        )
    } else {
        launcher::main(&cli.run)
    };
    std::process::exit(code);
}
