//! One rank of the demo. Prints `M2N-RESULT ...` on success, or
//! `M2N-ERROR <kind>: <message>` and exits non-zero.

use std::time::{Duration, Instant};

use m2n::pattern;
use m2n::proto::ChannelId;
use m2n::{Communicator, Config, Error, Msg, Role, Shape};

use crate::{Pattern, RunArgs};

/// The transport's work since `from`, as its counters comma-separated in
/// the order of `TransportCounters::FIELDS`, then `credits=` the credit
/// writes since `credits_from`.
pub(crate) fn work(
    comm: &Communicator,
    from: m2n::transport::TransportCounters,
    credits_from: u64,
) -> String {
    let c = comm.transport_counters().since(&from).values();
    let c: Vec<String> = c.iter().map(u64::to_string).collect();
    format!(
        "{} credits={}",
        c.join(","),
        comm.credit_writes() - credits_from
    )
}

/// Where a worker stops when the fault campaign (`scripts/fault-matrix`)
/// asks it to, so that a signal lands in a known phase. The worker prints
/// `M2N-PHASE <phase>` and then stays put (sleeping, no m2n calls).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    /// Before joining: the other ranks wait in the rendezvous.
    Bootstrap,
    /// Attention: a dispatch round posted, its combine not yet received.
    /// Expert: a dispatch round received and released, its combine not sent.
    Dispatch,
    /// Attention: a combine round received and released, the next dispatch
    /// not posted. Expert: a combine round posted.
    Combine,
    /// A received round held, not released.
    Holding,
    /// At the end of the run, as the communicator is destroyed (no stop:
    /// the signal lands during or just after the teardown).
    Destroy,
}

fn hold_here(args: &RunArgs, phase: Phase, round: u64) {
    if args.hold == Some(phase) && round == args.hold_after {
        park(phase);
    }
}

fn park(phase: Phase) -> ! {
    use std::io::Write;
    println!("M2N-PHASE {}", phase_name(phase));
    let _ = std::io::stdout().flush();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Bootstrap => "bootstrap",
        Phase::Dispatch => "dispatch",
        Phase::Combine => "combine",
        Phase::Holding => "holding",
        Phase::Destroy => "destroy",
    }
}

/// Wrong bytes seen so far, for the error report of a run that fails.
pub(crate) static WRONG_SEEN: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

/// Exit status of a worker whose data check failed.
pub const EXIT_WRONG: i32 = 2;
/// Exit status of a worker that hit an error.
pub const EXIT_ERROR: i32 = 3;

pub fn main(args: &RunArgs, role: Role, rank: usize) -> i32 {
    match run(args, role, rank) {
        Ok(0) => 0,
        Ok(_) => EXIT_WRONG,
        Err(e) => {
            let kind = match &e {
                Error::PeerLost { .. } => "peer-lost",
                Error::Timeout { .. } => "timeout",
                Error::Bootstrap(_) => "bootstrap",
                Error::Config(_) => "config",
                Error::Protocol { .. } => "protocol",
                _ => "other",
            };
            println!("M2N-ERROR {kind}: {role} {rank}: {e}");
            // Data delivered before the failure was checked too.
            println!(
                "M2N-WRONG {}",
                WRONG_SEEN.load(std::sync::atomic::Ordering::Relaxed)
            );
            EXIT_ERROR
        }
    }
}

fn run(args: &RunArgs, role: Role, rank: usize) -> m2n::Result<usize> {
    let uid_text = std::env::var("M2N_UNIQUE_ID").map_err(|_| {
        Error::InvalidArgument("M2N_UNIQUE_ID is not set (the launcher sets it)".into())
    })?;
    let uid = uid_text.parse().map_err(Error::InvalidArgument)?;
    let mut config = Config::default();
    // Slots fit the messages and twice the window (so that receivers can
    // coalesce credits without a sender ever waiting), unless the
    // environment says otherwise.
    let depth = (2 * args.window as usize).clamp(4, m2n::proto::imm::MAX_DEPTH);
    config.dispatch.slot_bytes = args.bytes;
    config.combine.slot_bytes = args.bytes;
    config.dispatch.depth = depth;
    config.combine.depth = depth;
    config.apply_env(std::env::vars())?;
    let shape = Shape::new(args.senders as usize, args.receivers as usize);
    if args.hold == Some(Phase::Bootstrap) {
        park(Phase::Bootstrap);
    }
    let mut comm = Communicator::init(config, role, rank, shape, &uid)?;
    println!(
        "M2N-READY {role} {rank} pid={} on {}",
        std::process::id(),
        comm.transport_detail()
    );
    if args.streams {
        return match role {
            Role::Attention => crate::streams::attention(comm, args),
            Role::Expert => crate::streams::expert(comm, args),
        };
    }
    let wrong = match (role, args.pattern) {
        (Role::Attention, Pattern::Roundtrip) => attention(&mut comm, args),
        (Role::Attention, Pattern::Dispatch) => stream_sender(&mut comm, args),
        (Role::Expert, _) => expert(&mut comm, args),
    }?;
    if args.hold == Some(Phase::Destroy) {
        use std::io::Write;
        println!("M2N-PHASE destroy");
        let _ = std::io::stdout().flush();
    }
    drop(comm);
    Ok(wrong)
}

fn fill_round(
    buf: &mut m2n::Region,
    base: usize,
    channel: ChannelId,
    me: usize,
    peers: usize,
    round: u64,
    bytes: usize,
) {
    for p in 0..peers {
        let off = base + p * bytes;
        pattern::fill(
            &mut buf.as_mut_slice()[off..off + bytes],
            pattern::seed(channel, me, p, round),
        );
    }
}

pub(crate) fn msgs(buf: &m2n::Region, base: usize, peers: usize, bytes: usize) -> Vec<Msg<'_>> {
    (0..peers)
        .map(|p| Msg::new(buf, base + p * bytes, bytes))
        .collect()
}

/// Which channel a helper drives.
#[derive(Clone, Copy)]
enum Ch {
    Dispatch,
    Combine,
}

fn channel(comm: &mut Communicator, ch: Ch) -> m2n::Channel<'_> {
    match ch {
        Ch::Dispatch => comm.dispatch(),
        Ch::Combine => comm.combine(),
    }
}

/// Polls `f` (a non-blocking call) with `progress` in between until it
/// yields, as an event loop would; `Timeout` after `timeout`.
fn poll_until<T>(
    comm: &mut Communicator,
    timeout: Duration,
    what: &str,
    mut f: impl FnMut(&mut Communicator) -> m2n::Result<Option<T>>,
) -> m2n::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f(comm)? {
            return Ok(v);
        }
        comm.progress()?;
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: what.to_string(),
                waited: timeout,
            });
        }
        std::thread::yield_now();
    }
}

fn send(comm: &mut Communicator, ch: Ch, msgs: &[Msg<'_>], args: &RunArgs) -> m2n::Result<u64> {
    let timeout = Duration::from_secs(args.timeout_s);
    if args.nonblocking {
        poll_until(comm, timeout, "credit", |c| channel(c, ch).try_send(msgs))
    } else {
        channel(comm, ch).send(msgs, timeout)
    }
}

fn recv(comm: &mut Communicator, ch: Ch, args: &RunArgs) -> m2n::Result<m2n::RecvRound> {
    let timeout = Duration::from_secs(args.timeout_s);
    if args.nonblocking {
        poll_until(comm, timeout, "a round", |c| channel(c, ch).try_recv())
    } else {
        channel(comm, ch).recv(timeout)
    }
}

fn wait_sent(comm: &mut Communicator, ch: Ch, round: u64, args: &RunArgs) -> m2n::Result<()> {
    let timeout = Duration::from_secs(args.timeout_s);
    if args.nonblocking {
        poll_until(comm, timeout, "local completion", |c| {
            Ok(channel(c, ch).is_sent(round)?.then_some(()))
        })
    } else {
        channel(comm, ch).wait_sent(round, timeout)
    }
}

/// An attention rank's dispatch side: `window` rounds of registered send
/// buffers, round `k` in buffer `k % window`, each with one message of
/// `bytes` per expert.
struct Sending {
    me: usize,
    n: usize,
    bytes: usize,
    window: u64,
    buf: m2n::Region,
}

impl Sending {
    fn new(comm: &mut Communicator, args: &RunArgs) -> m2n::Result<Self> {
        let (n, window) = (comm.shape().experts, args.window as u64);
        Ok(Sending {
            me: comm.rank(),
            n,
            bytes: args.bytes,
            window,
            buf: comm.alloc(n * args.bytes * window as usize)?,
        })
    }

    fn base(&self, round: u64) -> usize {
        (round % self.window) as usize * self.n * self.bytes
    }

    /// Writes round `round`'s pattern into its buffer.
    fn fill(&mut self, round: u64) {
        let base = self.base(round);
        fill_round(
            &mut self.buf,
            base,
            ChannelId::Dispatch,
            self.me,
            self.n,
            round,
            self.bytes,
        );
    }

    /// Sends round `round` from its buffer; returns the round number m2n gave it.
    fn send(&self, comm: &mut Communicator, args: &RunArgs, round: u64) -> m2n::Result<u64> {
        let msgs = msgs(&self.buf, self.base(round), self.n, self.bytes);
        send(comm, Ch::Dispatch, &msgs, args)
    }
}

fn attention(comm: &mut Communicator, args: &RunArgs) -> m2n::Result<usize> {
    let mut sending = Sending::new(comm, args)?;
    let (me, n, bytes, window) = (sending.me, sending.n, sending.bytes, sending.window);
    // Round trips are timed with m2n's counter clock: no system call per
    // sample where the OS clock would need one (VMs), so a system-call
    // count of a run is m2n's own.
    let mut clock = m2n::clock::Clock::new();
    let mut sent_at = vec![clock.now(); window as usize];
    let mut latencies_ns = Vec::with_capacity(args.rounds as usize);
    let mut wrong = 0usize;
    let (mut next_send, mut next_recv) = (0u64, 0u64);
    let start_work = comm.transport_counters();
    let start_credits = comm.credit_writes();
    let start = Instant::now();
    while next_recv < args.rounds {
        while next_send < args.rounds && next_send - next_recv < window {
            sending.fill(next_send);
            sent_at[(next_send % window) as usize] = clock.now();
            let round = sending.send(comm, args, next_send)?;
            debug_assert_eq!(round, next_send);
            hold_here(args, Phase::Dispatch, round);
            next_send += 1;
        }
        let got = recv(comm, Ch::Combine, args)?;
        let done = clock.now();
        let round = got.round();
        for e in 0..n {
            let m = comm.message(&got, e);
            wrong += (m.len() != bytes) as usize * bytes.max(1);
            wrong += pattern::count_wrong(m, pattern::seed(ChannelId::Combine, e, me, round));
        }
        WRONG_SEEN.store(wrong, std::sync::atomic::Ordering::Relaxed);
        hold_here(args, Phase::Holding, round);
        comm.combine().release(got)?;
        hold_here(args, Phase::Combine, round);
        latencies_ns.push(
            done.duration_since(sent_at[(round % window) as usize])
                .as_nanos() as u64,
        );
        next_recv += 1;
    }
    let elapsed = start.elapsed();
    let lat: Vec<String> = latencies_ns.iter().map(u64::to_string).collect();
    println!(
        "M2N-RESULT attention {me} transport={} elapsed_ns={} wrong={wrong} work={} lat_ns={}",
        comm.transport_kind(),
        elapsed.as_nanos(),
        work(comm, start_work, start_credits),
        lat.join(",")
    );
    Ok(wrong)
}

/// `--pattern dispatch`, attention side: posts rounds as fast as credits
/// allow, reusing `window` buffers (each refilled once its round is sent).
/// A sample is the time from one post to the next.
fn stream_sender(comm: &mut Communicator, args: &RunArgs) -> m2n::Result<usize> {
    let mut sending = Sending::new(comm, args)?;
    let window = sending.window;
    let mut intervals_ns = Vec::with_capacity(args.rounds as usize);
    let start_work = comm.transport_counters();
    let start_credits = comm.credit_writes();
    let start = Instant::now();
    let mut last_post = start;
    for round in 0..args.rounds {
        if round >= window {
            wait_sent(comm, Ch::Dispatch, round - window, args)?;
        }
        sending.fill(round);
        let posted = sending.send(comm, args, round)?;
        debug_assert_eq!(posted, round);
        let now = Instant::now();
        if round > 0 {
            intervals_ns.push(now.duration_since(last_post).as_nanos() as u64);
        }
        last_post = now;
        hold_here(args, Phase::Dispatch, round);
    }
    for round in args.rounds.saturating_sub(window)..args.rounds {
        wait_sent(comm, Ch::Dispatch, round, args)?;
    }
    let lat: Vec<String> = intervals_ns.iter().map(u64::to_string).collect();
    println!(
        "M2N-RESULT attention {} transport={} elapsed_ns={} wrong=0 work={} lat_ns={}",
        sending.me,
        comm.transport_kind(),
        start.elapsed().as_nanos(),
        work(comm, start_work, start_credits),
        lat.join(",")
    );
    Ok(0)
}

fn expert(comm: &mut Communicator, args: &RunArgs) -> m2n::Result<usize> {
    let (me, m, bytes) = (comm.rank(), comm.shape().attention, args.bytes);
    let stride = m * bytes;
    let mut buf = comm.alloc(stride)?;
    let mut wrong = 0usize;
    let start_work = comm.transport_counters();
    let start_credits = comm.credit_writes();
    let start = Instant::now();
    for round in 0..args.rounds {
        let got = recv(comm, Ch::Dispatch, args)?;
        debug_assert_eq!(got.round(), round);
        for a in 0..m {
            let msg = comm.message(&got, a);
            wrong += (msg.len() != bytes) as usize * bytes.max(1);
            wrong += pattern::count_wrong(msg, pattern::seed(ChannelId::Dispatch, a, me, round));
        }
        WRONG_SEEN.store(wrong, std::sync::atomic::Ordering::Relaxed);
        hold_here(args, Phase::Holding, round);
        comm.dispatch().release(got)?;
        if args.pattern == Pattern::Dispatch {
            continue; // a one-way stream: nothing to answer
        }
        hold_here(args, Phase::Dispatch, round);
        fill_round(&mut buf, 0, ChannelId::Combine, me, m, round, bytes);
        let sent = send(comm, Ch::Combine, &msgs(&buf, 0, m, bytes), args)?;
        hold_here(args, Phase::Combine, round);
        wait_sent(comm, Ch::Combine, sent, args)?;
    }
    println!(
        "M2N-RESULT expert {me} transport={} elapsed_ns={} wrong={wrong} work={} lat_ns=",
        comm.transport_kind(),
        start.elapsed().as_nanos(),
        work(comm, start_work, start_credits)
    );
    Ok(wrong)
}
