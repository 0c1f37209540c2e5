//! What a round costs the kernel: in the steady state m2n makes no system
//! call per round over shm (the verbs equivalent, where the provider's
//! doorbell is the only one, runs in the Soft-RoCE VM: scripts/rxe-vm).
//! Time-driven work stays: the liveness `poll` every 2 ms, a clock anchor
//! every 20 ms, a heartbeat per link per interval.

#[path = "support/inproc.rs"]
mod inproc;
mod support;

use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use m2n::{Config, Msg};

/// The two tests time their rounds: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const T: Duration = Duration::from_secs(20);

/// Round trips of 8 B on a 1 x 1 group in this process, then the OS clock
/// reads of both ranks over `rounds` more: bounded by the time the rounds
/// took (an anchor per 20 ms span), not by their number.
#[test]
fn the_os_clock_is_read_per_span_not_per_call() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let ch = m2n::ChannelConfig {
        depth: 2,
        slot_bytes: 64,
    };
    let config = Config {
        transport: m2n::TransportKind::Shm,
        dispatch: ch,
        combine: ch,
        wait: m2n::WaitPolicy::SpinThenYield(64),
        ..Config::default()
    };
    let (mut a, mut e) = inproc::pair(config, || {});
    let warm = 300u64;
    let rounds = 20_000u64;
    let expert = std::thread::spawn(move || {
        let mut reads_at_warm = 0;
        let mut out = e.alloc(8).unwrap();
        for r in 0..warm + rounds {
            if r == warm {
                reads_at_warm = e.clock_reads();
            }
            let got = e.dispatch().recv(T).unwrap();
            let v = e.message(&got, 0).to_vec();
            e.dispatch().release(got).unwrap();
            out.as_mut_slice().copy_from_slice(&v);
            let round = e.combine().send(&[Msg::new(&out, 0, 8)], T).unwrap();
            e.combine().wait_sent(round, T).unwrap();
        }
        e.clock_reads() - reads_at_warm
    });
    let mut buf = a.alloc(8).unwrap();
    let (mut reads_at_warm, mut start) = (0, Instant::now());
    for r in 0..warm + rounds {
        if r == warm {
            reads_at_warm = a.clock_reads();
            start = Instant::now();
        }
        buf.as_mut_slice().copy_from_slice(&r.to_le_bytes());
        let round = a.dispatch().send(&[Msg::new(&buf, 0, 8)], T).unwrap();
        a.dispatch().wait_sent(round, T).unwrap();
        let got = a.combine().recv(T).unwrap();
        assert_eq!(a.message(&got, 0), &r.to_le_bytes(), "round {r}");
        a.combine().release(got).unwrap();
    }
    let took = start.elapsed();
    let reads = a.clock_reads() - reads_at_warm + expert.join().unwrap();
    // Per rank: one read per 20 ms anchor span (twice that, and a few, as
    // slack for spans cut short by a counter that moved back); a read per
    // call would be tens of thousands.
    let spans = took.as_millis() as u64 / m2n::clock::Clock::ANCHOR.as_millis() as u64;
    let bound = 2 * (2 * spans + 5);
    println!(
        "{rounds} round trips in {took:?}: {reads} OS clock reads (both ranks), bound {bound}"
    );
    assert!(
        reads <= bound,
        "{reads} OS clock reads in {rounds} round trips ({took:?}; at most {bound}): \
         the polling paths read the OS clock per call"
    );
}

/// `strace -c`'s call counts of `m2n-demo` over shm (launcher and both
/// ranks), for two run lengths: the difference over the extra rounds is
/// what a round costs, set-up and tear-down cancel out.
#[test]
fn shm_round_trips_make_no_system_calls() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if Command::new("strace").arg("-V").output().is_err() {
        println!("skipped: strace is not installed (scripts/setup installs it)");
        return;
    }
    let dir = tempdir();
    let run = |rounds: u64| -> (u64, Duration) {
        let out = dir.join(format!("strace.{rounds}"));
        let start = Instant::now();
        let status = Command::new("strace")
            .args(["-f", "-c", "-o"])
            .arg(&out)
            .arg(support::DEMO)
            .args(["--senders", "1", "--receivers", "1", "--bytes", "8"])
            .args(["--rounds", &rounds.to_string(), "--timeout-s", "60"])
            .env("M2N_TRANSPORT", "shm")
            .env("M2N_WAIT", "spin")
            .stdout(std::process::Stdio::null())
            .status()
            .expect("run strace");
        let took = start.elapsed();
        assert!(status.success(), "m2n-demo under strace: {status}");
        let text = std::fs::read_to_string(&out).expect("strace's summary");
        (total_calls(&text), took)
    };
    let (short, long) = (2_000u64, 42_000u64);
    let (c1, t1) = run(short);
    let (c2, t2) = run(long);
    println!("short: {c1} calls in {t1:?}; long: {c2} calls in {t2:?}");
    let extra = long - short;
    let calls = c2.saturating_sub(c1);
    let ms = t2.as_millis() as u64;
    // Time-driven calls: per rank a liveness poll per 2 ms (a heartbeat
    // per 500 ms and a clock anchor per 20 ms besides), so about 1 per
    // millisecond of the long run for the two ranks; allow 4, and set-up's
    // own variation between runs (retries, a slow first start).
    let bound = 4 * ms + 300;
    println!(
        "{extra} extra round trips: {calls} more system calls ({:.4} per round; \
         at most {bound}: 4 per ms of the {ms} ms run and set-up's variation)",
        calls as f64 / extra as f64
    );
    assert!(
        calls <= bound,
        "{calls} system calls for {extra} more round trips over shm (at most {bound}, \
         the time-driven ones of a {ms} ms run): a system call per round crept in"
    );
}

/// The `total` line of `strace -c` ("100.00 secs usecs/call calls [errors]
/// total").
fn total_calls(text: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.last() == Some(&"total"))
                .then(|| f[3].parse().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("no total in strace's summary:\n{text}"))
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("m2n-syscalls-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}
