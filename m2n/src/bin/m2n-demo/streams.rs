//! `--streams`: the demo's round trips with every send, receive and release
//! enqueued on a stream (a host stream: the flag protocol a CUDA stream
//! runs, on a CPU thread) and a proxy thread driving the host's half. The
//! stream's own work produces and checks the bytes, so a round posted
//! before its producer ran, or read before it arrived, shows as wrong bytes.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use m2n::pattern;
use m2n::proto::ChannelId;
use m2n::stream::{HostStream, StreamRound};
use m2n::Proxy;
use m2n::{Communicator, Error};

use crate::worker::{msgs, work, WRONG_SEEN};
use crate::RunArgs;

/// What the stream's work shares with the host thread.
#[derive(Default)]
struct Tally {
    wrong: AtomicUsize,
    /// Rounds whose check ran on the stream.
    done: AtomicU64,
}

impl Tally {
    fn add_wrong(&self, n: usize) {
        let total = self.wrong.fetch_add(n, Ordering::AcqRel) + n;
        WRONG_SEEN.store(total, Ordering::Relaxed);
    }
}

/// Stream work: writes `round`'s pattern for each of `peers` into
/// `bytes`-byte slices from host address `at`.
fn produce(at: usize, me: usize, peers: usize, bytes: usize, channel: ChannelId, round: u64) {
    for p in 0..peers {
        // SAFETY: inside a registered region the rank keeps alive until the stream is drained, written only by this stream, and only after the round that used it last has left (the stream waited for it).
        let s = unsafe { std::slice::from_raw_parts_mut((at + p * bytes) as *mut u8, bytes) };
        pattern::fill(s, pattern::seed(channel, me, p, round));
    }
}

/// Stream work: wrong bytes in each sender's message of `r`.
fn check(r: &StreamRound, me: usize, senders: usize, bytes: usize, channel: ChannelId) -> usize {
    (0..senders)
        .map(|s| {
            // SAFETY: the round's slot in the live ring: the stream waited until the round arrived and releases it only after this work.
            let m = unsafe { std::slice::from_raw_parts(r.message_addr(s) as *const u8, bytes) };
            pattern::count_wrong(m, pattern::seed(channel, s, me, r.round()))
        })
        .sum()
}

/// Keeps the host at most `window` rounds ahead of the stream's checks.
fn throttle(
    tally: &Tally,
    round: u64,
    window: u64,
    proxy: &Proxy<Communicator>,
    timeout: Duration,
) -> m2n::Result<()> {
    let Some(need) = (round + 1).checked_sub(window) else {
        return Ok(());
    };
    let deadline = Instant::now() + timeout;
    while tally.done.load(Ordering::Acquire) < need && proxy.is_running() {
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!("the stream to check round {}", need - 1),
                waited: timeout,
            });
        }
        std::thread::sleep(Duration::from_micros(20));
    }
    Ok(())
}

/// Runs `enqueue_rounds` with a proxy driving `comm`, then drains the
/// stream and prints the result line. A failure the proxy stopped on wins
/// over the error it caused on this side.
fn run(
    who: &str,
    comm: Communicator,
    args: &RunArgs,
    lat: impl FnOnce() -> String,
    enqueue_rounds: impl FnOnce(&Proxy<Communicator>, &HostStream, &Arc<Tally>) -> m2n::Result<()>,
) -> m2n::Result<usize> {
    let timeout = Duration::from_secs(args.timeout_s);
    let (work_from, credits_from) = (comm.transport_counters(), comm.credit_writes());
    let start = Instant::now();
    let proxy = comm.start_proxy();
    let stream = HostStream::new();
    let tally = Arc::new(Tally::default());
    let mut result = enqueue_rounds(&proxy, &stream, &tally);
    let deadline = Instant::now() + timeout;
    while result.is_ok() && stream.synchronize(Duration::from_millis(100)).is_err() {
        if !proxy.is_running() {
            break;
        }
        if Instant::now() >= deadline {
            result = Err(Error::Timeout {
                what: "the stream to drain".into(),
                waited: timeout,
            });
        }
    }
    // The stream's work reads the rings and writes the buffers: it must be
    // over before the communicator goes (after a failure its waits were
    // let go, so it drains quickly; dropping it skips whatever is left).
    let _ = stream.synchronize(Duration::from_secs(10));
    drop(stream);
    let line = {
        let comm = proxy.lock();
        format!(
            "M2N-RESULT {who} transport={} elapsed_ns={} wrong={} work={} lat_ns={}",
            comm.transport_kind(),
            start.elapsed().as_nanos(),
            tally.wrong.load(Ordering::Acquire),
            work(&comm, work_from, credits_from),
            lat()
        )
    };
    match (proxy.stop(), result) {
        (Err(e), _) | (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(())) => {
            println!("{line}");
            Ok(tally.wrong.load(Ordering::Acquire))
        }
    }
}

/// Attention: per round, on the stream: produce the dispatch bytes, send,
/// receive the combine, check it, release it.
pub fn attention(mut comm: Communicator, args: &RunArgs) -> m2n::Result<usize> {
    let (me, n, bytes) = (comm.rank(), comm.shape().experts, args.bytes);
    let window = args.window as u64;
    let buf = comm.alloc((n * bytes * window as usize).max(1))?;
    let at = buf.as_ptr() as usize;
    let sent_at = Arc::new(Mutex::new(vec![Instant::now(); window as usize]));
    let lat_ns = Arc::new(Mutex::new(Vec::with_capacity(args.rounds as usize)));
    let timeout = Duration::from_secs(args.timeout_s);
    let lat = lat_ns.clone();
    let wrong = run(
        &format!("attention {me}"),
        comm,
        args,
        move || {
            let l = lat.lock().unwrap_or_else(|p| p.into_inner());
            l.iter().map(u64::to_string).collect::<Vec<_>>().join(",")
        },
        |proxy, stream, tally| {
            for round in 0..args.rounds {
                throttle(tally, round, window, proxy, timeout)?;
                let base = ((round % window) as usize) * n * bytes;
                let slot = sent_at.clone();
                stream.launch(move || {
                    produce(at + base, me, n, bytes, ChannelId::Dispatch, round);
                    slot.lock().unwrap_or_else(|p| p.into_inner())[(round % window) as usize] =
                        Instant::now();
                });
                proxy
                    .lock()
                    .dispatch()
                    .send_on_stream(&msgs(&buf, base, n, bytes), stream)?;
                let r = proxy.lock().combine().recv_on_stream(stream)?;
                let (t, slot, lat) = (tally.clone(), sent_at.clone(), lat_ns.clone());
                let checked = r.clone();
                stream.launch(move || {
                    t.add_wrong(check(&checked, me, n, bytes, ChannelId::Combine));
                    let from =
                        slot.lock().unwrap_or_else(|p| p.into_inner())[(round % window) as usize];
                    lat.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(from.elapsed().as_nanos() as u64);
                    t.done.fetch_add(1, Ordering::AcqRel);
                });
                proxy.lock().combine().release_on_stream(r, stream)?;
            }
            Ok(())
        },
    )?;
    drop(buf);
    Ok(wrong)
}

/// Expert: per round, on the stream: receive the dispatch, check it,
/// release it, produce the combine bytes, send them back.
pub fn expert(mut comm: Communicator, args: &RunArgs) -> m2n::Result<usize> {
    let (me, m, bytes) = (comm.rank(), comm.shape().attention, args.bytes);
    // Two answer buffers: the next round's producer waits (on the stream)
    // until the round that used its buffer last has left.
    let buf = comm.alloc((2 * m * bytes).max(1))?;
    let at = buf.as_ptr() as usize;
    let timeout = Duration::from_secs(args.timeout_s);
    let wrong = run(
        &format!("expert {me}"),
        comm,
        args,
        String::new,
        |proxy, stream, tally| {
            for round in 0..args.rounds {
                throttle(tally, round, 2, proxy, timeout)?;
                let r = proxy.lock().dispatch().recv_on_stream(stream)?;
                let base = ((round % 2) as usize) * m * bytes;
                let (t, checked) = (tally.clone(), r.clone());
                stream.launch(move || {
                    t.add_wrong(check(&checked, me, m, bytes, ChannelId::Dispatch));
                    produce(at + base, me, m, bytes, ChannelId::Combine, round);
                    t.done.fetch_add(1, Ordering::AcqRel);
                });
                proxy.lock().dispatch().release_on_stream(r, stream)?;
                proxy
                    .lock()
                    .combine()
                    .send_on_stream(&msgs(&buf, base, m, bytes), stream)?;
            }
            Ok(())
        },
    )?;
    drop(buf);
    Ok(wrong)
}
