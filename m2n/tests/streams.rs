//! Stream-ordered sends, receives and releases (issue 16) on host streams:
//! the same flag protocol a CUDA stream runs, driven by a CPU thread, so
//! the ordering is checked here without a GPU. Every test would fail if a
//! round were posted before its producer finished, if a consumer read a
//! round before it arrived, or if a release were lost.

#[path = "support/inproc.rs"]
mod inproc;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use m2n::stream::{HostStream, Stream};
use m2n::{Communicator, Config, Error, Msg, Region};

const SLOT: usize = 4096;

fn config_on(transport: m2n::TransportKind) -> Config {
    let ch = m2n::ChannelConfig {
        depth: 2,
        slot_bytes: SLOT,
    };
    Config {
        transport,
        dispatch: ch,
        combine: ch,
        peer_timeout: Duration::from_secs(3),
        heartbeat_interval: Duration::from_millis(100),
        ..Config::default()
    }
}

/// A 1 x 1 group over shm: (attention, expert).
fn pair() -> (Communicator, Communicator) {
    pair_on(m2n::TransportKind::Shm)
}

fn pair_on(t: m2n::TransportKind) -> (Communicator, Communicator) {
    inproc::pair(config_on(t), || {})
}

/// Waits until the proxy's host side has seen every stream operation done
/// (the last release flag is written by the stream after it synchronises).
fn wait_idle(proxy: &m2n::Proxy<Communicator>) {
    for _ in 0..10_000 {
        if proxy.lock().streams_idle() {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    panic!("stream operations still outstanding on the host side");
}

/// The bytes of round `k`.
fn pattern(k: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (k as usize * 31 + i * 7 + 1) as u8)
        .collect()
}

/// A region's address, for work on a host stream (the tests keep the
/// region alive until the stream is synchronised).
fn addr(r: &Region) -> usize {
    r.as_ptr() as usize
}

/// Writes `bytes` at `at` from stream work, after a pause that makes a
/// round posted too early (before the producer finished) carry old bytes.
fn produce(stream: &HostStream, at: usize, bytes: Vec<u8>) {
    stream.launch(move || {
        std::thread::sleep(Duration::from_millis(3));
        // SAFETY: `at` is a live registered region of at least `bytes.len()` bytes, written only by this stream (see `addr`).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), at as *mut u8, bytes.len()) };
    });
}

#[test]
fn stream_sends_wait_for_their_producer_and_hold_the_next_writer_until_sent() {
    let (a, mut e) = pair();
    let rounds = 40u64;
    let len = 3000;
    let expert = std::thread::spawn(move || {
        for k in 0..rounds {
            let r = e.dispatch().recv(Duration::from_secs(20)).unwrap();
            assert_eq!(r.round(), k);
            assert_eq!(
                e.message(&r, 0),
                &pattern(k, len)[..],
                "round {k} carries its producer's bytes"
            );
            e.dispatch().release(r).unwrap();
        }
    });
    let proxy = a.start_proxy();
    let stream = HostStream::new();
    let buf = proxy.lock().alloc(len).unwrap();
    for k in 0..rounds {
        // The producer fills the one buffer; the send must wait for it,
        // and the next round's producer must wait until this one left.
        produce(&stream, addr(&buf), pattern(k, len));
        let round = proxy
            .lock()
            .dispatch()
            .send_on_stream(&[Msg::new(&buf, 0, len)], &stream)
            .unwrap();
        assert_eq!(round, k, "stream sends are numbered in order");
    }
    stream.synchronize(Duration::from_secs(30)).unwrap();
    expert.join().unwrap();
    wait_idle(&proxy);
}

#[test]
fn stream_receives_hold_the_consumer_until_the_round_is_in_and_release_on_the_stream() {
    let (mut a, e) = pair();
    let rounds = 30u64;
    let attention = std::thread::spawn(move || {
        let buf = a.alloc(SLOT).unwrap();
        let mut buf = buf;
        for k in 0..rounds {
            // Late senders: a consumer not held by its stream reads early.
            std::thread::sleep(Duration::from_millis(2));
            let len = 100 + (k as usize * 97) % 3000;
            buf.as_mut_slice()[..len].copy_from_slice(&pattern(k, len));
            let round = a
                .dispatch()
                .send(&[Msg::new(&buf, 0, len)], Duration::from_secs(20))
                .unwrap();
            a.dispatch()
                .wait_sent(round, Duration::from_secs(20))
                .unwrap();
        }
        a
    });
    let proxy = e.start_proxy();
    let stream = HostStream::new();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut handed = Vec::new();
    for k in 0..rounds {
        // Depth 2: enqueuing every receive up front works because each
        // release is enqueued behind its consumer on the same stream.
        let r = proxy.lock().dispatch().recv_on_stream(&stream).unwrap();
        assert_eq!(r.round(), k);
        let at = r.message_addr(0) as usize;
        let len = 100 + (k as usize * 97) % 3000;
        let s = seen.clone();
        stream.launch(move || {
            // SAFETY: the round's slot in the live ring; the stream waited until the round arrived and releases it only after this.
            let got = unsafe { std::slice::from_raw_parts(at as *const u8, len) }.to_vec();
            s.lock().unwrap().push((k, got == pattern(k, len)));
        });
        handed.push(r.round());
        proxy
            .lock()
            .dispatch()
            .release_on_stream(r, &stream)
            .unwrap();
    }
    stream.synchronize(Duration::from_secs(30)).unwrap();
    let a = attention.join().unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), rounds as usize);
    for (k, ok) in seen {
        assert!(
            ok,
            "the consumer of round {k} read it before it was complete"
        );
    }
    // Every release reached the senders: 30 rounds through depth 2.
    wait_idle(&proxy);
    drop(a);
}

#[test]
fn a_pipeline_on_streams_both_ways_delivers_every_byte() {
    let (a, e) = pair();
    let rounds = 60u64;
    let pa = a.start_proxy();
    let pe = e.start_proxy();
    let (sa, se) = (HostStream::new(), HostStream::new());
    let len = 2048;
    let out_a = pa.lock().alloc(len).unwrap();
    let out_e = pe.lock().alloc(len).unwrap();
    let wrong = Arc::new(AtomicUsize::new(0));
    // The expert echoes each dispatch round back, transformed, all on its stream.
    let (pe2, wrong2, at_e) = (&pe, wrong.clone(), addr(&out_e));
    std::thread::scope(|scope| {
        scope.spawn(move || {
            for k in 0..rounds {
                let r = pe2.lock().dispatch().recv_on_stream(&se).unwrap();
                let at = r.message_addr(0) as usize;
                let w = wrong2.clone();
                se.launch(move || {
                    // SAFETY: the arrived round's slot and our own buffer.
                    let got = unsafe { std::slice::from_raw_parts(at as *const u8, len) };
                    if got != &pattern(k, len)[..] {
                        w.fetch_add(1, Ordering::SeqCst);
                    }
                    let echo: Vec<u8> = got.iter().map(|b| b.wrapping_add(1)).collect();
                    // SAFETY: out_e is len bytes and written only here.
                    unsafe { std::ptr::copy_nonoverlapping(echo.as_ptr(), at_e as *mut u8, len) };
                });
                pe2.lock().dispatch().release_on_stream(r, &se).unwrap();
                pe2.lock()
                    .combine()
                    .send_on_stream(&[Msg::new(&out_e, 0, len)], &se)
                    .unwrap();
            }
            se.synchronize(Duration::from_secs(60)).unwrap();
        });
        for k in 0..rounds {
            produce(&sa, addr(&out_a), pattern(k, len));
            pa.lock()
                .dispatch()
                .send_on_stream(&[Msg::new(&out_a, 0, len)], &sa)
                .unwrap();
            let r = pa.lock().combine().recv_on_stream(&sa).unwrap();
            let at = r.message_addr(0) as usize;
            let w = wrong.clone();
            sa.launch(move || {
                // SAFETY: the arrived round's slot.
                let got = unsafe { std::slice::from_raw_parts(at as *const u8, len) };
                let want: Vec<u8> = pattern(k, len).iter().map(|b| b.wrapping_add(1)).collect();
                if got != &want[..] {
                    w.fetch_add(1, Ordering::SeqCst);
                }
            });
            pa.lock().combine().release_on_stream(r, &sa).unwrap();
        }
        sa.synchronize(Duration::from_secs(60)).unwrap();
    });
    assert_eq!(wrong.load(Ordering::SeqCst), 0, "rounds with wrong bytes");
    wait_idle(&pa);
    wait_idle(&pe);
}

#[test]
fn lengths_are_known_once_the_round_is_in() {
    let (mut a, mut e) = pair();
    let stream = HostStream::new();
    let r = e.dispatch().recv_on_stream(&stream).unwrap();
    assert_eq!(e.stream_round_lens(&r), None, "nothing arrived yet");
    let buf = a.alloc(64).unwrap();
    let round = a
        .dispatch()
        .send(&[Msg::new(&buf, 0, 40)], Duration::from_secs(5))
        .unwrap();
    a.dispatch()
        .wait_sent(round, Duration::from_secs(5))
        .unwrap();
    let mut spins = 0;
    while e.stream_round_lens(&r).is_none() {
        e.progress().unwrap();
        spins += 1;
        assert!(spins < 10_000_000, "the round never arrived");
    }
    assert_eq!(e.stream_round_lens(&r), Some(&[40u32][..]));
    stream.synchronize(Duration::from_secs(5)).unwrap();
}

#[test]
fn misuse_of_stream_operations_is_refused_naming_why() {
    let (mut a, mut e) = pair();
    let stream = HostStream::new();
    let buf = a.alloc(SLOT + 8).unwrap();
    // Wrong direction.
    let err = e
        .dispatch()
        .send_on_stream(&[Msg::new(&buf, 0, 8)], &stream)
        .unwrap_err();
    assert!(matches!(err, Error::Usage(_)), "{err}");
    // Over the slot size, before anything is enqueued.
    let err = a
        .dispatch()
        .send_on_stream(&[Msg::new(&buf, 0, SLOT + 1)], &stream)
        .unwrap_err();
    assert!(err.to_string().contains("over the slot size"), "{err}");
    // A direct send would take the round of a stream send still waiting.
    let gate = Arc::new(m2n::stream::FlagBlock::host());
    stream
        .wait_value(&gate, m2n::stream::Flag::Ready, 1)
        .unwrap();
    a.dispatch()
        .send_on_stream(&[Msg::new(&buf, 0, 8)], &stream)
        .unwrap();
    let err = a.dispatch().try_send(&[Msg::new(&buf, 0, 8)]).unwrap_err();
    assert!(err.to_string().contains("stream-ordered send"), "{err}");
    // The next round is promised to a stream receive.
    let r = e.dispatch().recv_on_stream(&stream).unwrap();
    let err = e.dispatch().try_recv().unwrap_err();
    assert!(err.to_string().contains("promised"), "{err}");
    // Released twice.
    let copy = r.clone();
    e.dispatch().release_on_stream(r, &stream).unwrap();
    let err = e.dispatch().release_on_stream(copy, &stream).unwrap_err();
    assert!(err.to_string().contains("not a stream round"), "{err}");
    // Let the stream go: the send is posted and arrives, the receive is
    // satisfied and released, once both ranks drive progress.
    gate.store(m2n::stream::Flag::Ready, 1);
    let mut tries = 0;
    while stream.synchronize(Duration::from_millis(1)).is_err() {
        a.progress().unwrap();
        e.progress().unwrap();
        tries += 1;
        assert!(tries < 20_000, "the stream never drained");
    }
    // The release the stream wrote last is seen at the next progress.
    e.progress().unwrap();
    assert!(a.streams_idle() && e.streams_idle());
}

#[test]
fn a_lost_peer_lets_every_stream_wait_go_and_is_reported() {
    let (mut a, mut e) = pair();
    let stream = HostStream::new();
    let r = e.dispatch().recv_on_stream(&stream).unwrap();
    let ran = Arc::new(AtomicUsize::new(0));
    let flag = ran.clone();
    stream.launch(move || {
        flag.store(1, Ordering::SeqCst);
    });
    e.dispatch().release_on_stream(r, &stream).unwrap();
    assert!(
        stream.synchronize(Duration::from_millis(50)).is_err(),
        "held while nothing arrived"
    );
    a.abort();
    // The expert's progress engine learns the attention rank is gone and
    // lets its stream go instead of leaving it waiting for ever.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let err = loop {
        match e.progress() {
            Ok(_) => std::thread::yield_now(),
            Err(err) => break err,
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the abort was never reported"
        );
    };
    assert!(matches!(err, Error::PeerLost { .. }), "{err}");
    stream.synchronize(Duration::from_secs(10)).unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 1);
    let err = e.dispatch().recv_on_stream(&stream).unwrap_err();
    assert!(
        err.to_string().contains("stopped when the group failed"),
        "{err}"
    );
}

#[test]
fn a_peer_that_leaves_cleanly_while_a_stream_waits_for_it_lets_the_stream_go() {
    let (a, mut e) = pair();
    let stream = HostStream::new();
    let r = e.dispatch().recv_on_stream(&stream).unwrap();
    e.dispatch().release_on_stream(r, &stream).unwrap();
    // A clean goodbye: progress() alone would not report it, but the
    // stream waits for this peer's message.
    drop(a);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let err = loop {
        match e.progress() {
            Ok(_) => std::thread::sleep(Duration::from_millis(1)),
            Err(err) => break err,
        }
        assert!(
            std::time::Instant::now() < deadline,
            "progress never reported the peer the stream waits for"
        );
    };
    assert!(matches!(err, Error::PeerLost { .. }), "{err}");
    stream.synchronize(Duration::from_secs(10)).unwrap();
}

#[test]
fn a_proxy_stops_on_the_first_error_and_returns_it() {
    let (mut a, e) = pair();
    let proxy = e.start_proxy();
    a.abort();
    let mut waited = 0;
    while proxy.is_running() {
        std::thread::sleep(Duration::from_millis(10));
        waited += 1;
        assert!(waited < 1000, "the proxy did not stop on the lost peer");
    }
    let err = proxy.stop().unwrap_err();
    assert!(matches!(err, Error::PeerLost { .. }), "{err}");
}

#[test]
fn a_stream_of_another_kind_cannot_share_the_flags() {
    // Only a CUDA stream is another kind; without a GPU it cannot be made.
    #[cfg(feature = "cuda")]
    {
        // SAFETY: NULL is the default stream; without a driver it fails first.
        match unsafe { m2n::stream::CudaStream::from_raw(std::ptr::null_mut()) } {
            Err(e) => println!("skipped: no CUDA stream here ({e})"),
            Ok(cuda) => {
                let (_a, mut e) = pair();
                let host = HostStream::new();
                let _r = e.dispatch().recv_on_stream(&host).unwrap();
                let err = e.dispatch().recv_on_stream(&cuda).unwrap_err();
                assert!(err.to_string().contains("cannot share"), "{err}");
            }
        }
    }
    #[cfg(not(feature = "cuda"))]
    println!("skipped: built without the cuda feature");
}

/// Device memory on shm and tcp goes through a host stage: a send copies
/// the bytes at send time (so the device buffer may change right after),
/// and the stage is reused only once its round has left. Simulated device
/// memory (host memory staged as a GPU's) runs the same path here.
fn staged_sends_copy_at_send_time(t: m2n::TransportKind) {
    let (mut a, mut e) = pair_on(t);
    let len = 1500;
    let mut device = vec![0u8; len];
    // SAFETY: `device` outlives the region (dropped at the end of the test).
    let region = unsafe { a.register_simulated_device(device.as_mut_ptr(), len) }.unwrap();
    assert!(region.is_staged() && !region.is_host());
    assert_eq!(
        region.as_ptr(),
        device.as_mut_ptr(),
        "the region names the device bytes"
    );
    for k in 0..20u64 {
        device.copy_from_slice(&pattern(k, len));
        a.dispatch()
            .send(&[Msg::new(&region, 0, len)], Duration::from_secs(10))
            .unwrap();
        // The device buffer may change at once: the round was copied out.
        device.fill(0xEE);
        let r = e.dispatch().recv(Duration::from_secs(10)).unwrap();
        assert_eq!(e.message(&r, 0), &pattern(k, len)[..], "round {k} over {t}");
        e.dispatch().release(r).unwrap();
    }
    drop(region);
}

#[test]
fn staged_sends_copy_at_send_time_over_shm() {
    staged_sends_copy_at_send_time(m2n::TransportKind::Shm);
}

#[test]
fn staged_sends_copy_at_send_time_over_tcp() {
    staged_sends_copy_at_send_time(m2n::TransportKind::Tcp);
}

#[test]
fn stream_sends_from_device_memory_copy_to_the_stage_on_the_stream() {
    let (a, mut e) = pair_on(m2n::TransportKind::Tcp);
    let rounds = 30u64;
    let len = 2500;
    let expert = std::thread::spawn(move || {
        for k in 0..rounds {
            let r = e.dispatch().recv(Duration::from_secs(20)).unwrap();
            assert_eq!(e.message(&r, 0), &pattern(k, len)[..], "round {k}");
            e.dispatch().release(r).unwrap();
        }
    });
    let mut device = vec![0u8; len];
    let dev = device.as_mut_ptr() as usize;
    let proxy = a.start_proxy();
    // SAFETY: `device` outlives the region and the stream's work.
    let region = unsafe { proxy.lock().register_simulated_device(dev as *mut u8, len) }.unwrap();
    let stream = HostStream::new();
    for k in 0..rounds {
        // The producer writes the device buffer late; the stream copies it
        // to the stage after, and the next producer waits for `sent`.
        produce(&stream, dev, pattern(k, len));
        proxy
            .lock()
            .dispatch()
            .send_on_stream(&[Msg::new(&region, 0, len)], &stream)
            .unwrap();
    }
    stream.synchronize(Duration::from_secs(30)).unwrap();
    expert.join().unwrap();
    wait_idle(&proxy);
    drop(region);
    drop(device);
}

#[test]
fn gpu_rings_on_a_host_memory_transport_are_refused_naming_why() {
    for t in [m2n::TransportKind::Shm, m2n::TransportKind::Tcp] {
        let mut cfg = config_on(t);
        cfg.gpu_rings = true;
        cfg.bootstrap_timeout = Duration::from_secs(5);
        let (a, e) = inproc::init_pair(cfg, || {});
        let err = a.unwrap_err();
        assert!(err.to_string().contains("M2N_GPU_RINGS"), "{t}: {err}");
        assert!(e.is_err());
    }
}

#[test]
fn a_release_that_overtakes_its_receive_is_applied_when_the_round_arrives() {
    // The release is enqueued on another stream that nothing holds, so its
    // flag passes before the round is in: the host must keep it and
    // release the round on arrival (and not before).
    let (mut a, mut e) = pair();
    let (s_recv, s_release) = (HostStream::new(), HostStream::new());
    let r = e.dispatch().recv_on_stream(&s_recv).unwrap();
    e.dispatch().release_on_stream(r, &s_release).unwrap();
    s_release.synchronize(Duration::from_secs(10)).unwrap();
    for _ in 0..100 {
        e.progress().unwrap();
    }
    assert!(
        !e.streams_idle(),
        "the round has not arrived: it cannot be released yet"
    );
    let buf = a.alloc(8).unwrap();
    // Depth 2: a third round needs the first one's release.
    for k in 0..3 {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if a.dispatch()
                .try_send(&[Msg::new(&buf, 0, 8)])
                .unwrap()
                .is_some()
            {
                break;
            }
            e.progress().unwrap();
            assert!(
                std::time::Instant::now() < deadline,
                "round {k} never got credit: the early release was lost"
            );
        }
    }
    s_recv.synchronize(Duration::from_secs(10)).unwrap();
    assert!(e.streams_idle());
}

// ---------------------------------------------------------------------
// Graph-safe mode (issue 26): a recording of stream-ordered calls,
// launched again and again, as a CUDA graph is.

use m2n::stream::{HostGraph, StreamMode};
use m2n::{Role, Root, Shape};
use std::sync::atomic::AtomicU64;

/// An `att` x `exp` group over shm with ring depth `depth`, each rank on
/// its own thread: (attention ranks, expert ranks).
fn group(att: usize, exp: usize, depth: usize) -> (Vec<Communicator>, Vec<Communicator>) {
    let mut cfg = config_on(m2n::TransportKind::Shm);
    cfg.dispatch.depth = depth;
    cfg.combine.depth = depth;
    let root = Root::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let uid = root.unique_id().clone();
    let served = root.spawn(Duration::from_secs(30));
    let ranks: Vec<_> = (0..att)
        .map(|r| (Role::Attention, r))
        .chain((0..exp).map(|r| (Role::Expert, r)))
        .map(|(role, rank)| {
            let (cfg, uid) = (cfg.clone(), uid.clone());
            std::thread::spawn(move || {
                Communicator::init(cfg, role, rank, Shape::new(att, exp), &uid).unwrap()
            })
        })
        .collect();
    let mut comms: Vec<Communicator> = ranks.into_iter().map(|t| t.join().unwrap()).collect();
    served.join().unwrap().unwrap();
    let experts = comms.split_off(att);
    (comms, experts)
}

/// The bytes attention rank `a` sends expert `e` at step `k`.
fn step_bytes(k: u64, a: usize, e: usize, len: usize) -> Vec<u8> {
    pattern(k * 7 + a as u64 * 3 + e as u64, len)
}

/// What the expert sends back for them.
fn echo(bytes: &[u8], e: usize) -> Vec<u8> {
    bytes
        .iter()
        .map(|b| b.wrapping_mul(3).wrapping_add(e as u8 + 1))
        .collect()
}

/// Counts of a rank's checks: messages checked, and wrong ones (with the
/// first wrong step).
#[derive(Default)]
struct Checks {
    checked: AtomicUsize,
    wrong: AtomicUsize,
    first_wrong: Mutex<Option<String>>,
}

impl Checks {
    fn check(&self, what: impl FnOnce() -> String, got: &[u8], want: &[u8]) {
        self.checked.fetch_add(1, Ordering::SeqCst);
        if got != want {
            self.wrong.fetch_add(1, Ordering::SeqCst);
            self.first_wrong.lock().unwrap().get_or_insert_with(what);
        }
    }
}

/// What a rank records: its rank, the other side's size, the message
/// length, how many steps.
#[derive(Clone, Copy)]
struct Steps {
    me: usize,
    peers: usize,
    len: usize,
    steps: usize,
}

/// Records `steps` steps of an attention rank: the producer fills the
/// stable source buffer from the step counter (kept with the stream's
/// work, as a GPU keeps it in device memory), the dispatch send, the
/// combine receive, the consumer checking every byte, the release.
fn record_attention(
    proxy: &m2n::Proxy<Communicator>,
    stream: &HostStream,
    out: &Region,
    shape: Steps,
    checks: &Arc<Checks>,
) -> HostGraph {
    let Steps {
        me,
        peers: experts,
        len,
        steps,
    } = shape;
    let step = Arc::new(AtomicU64::new(0));
    let at = addr(out);
    stream.begin_capture().unwrap();
    for _ in 0..steps {
        let s = step.clone();
        stream.launch_repeatable(move || {
            let k = s.load(Ordering::SeqCst);
            std::thread::sleep(Duration::from_micros(200));
            for e in 0..experts {
                let b = step_bytes(k, me, e, len);
                // SAFETY: `out` holds experts * len bytes, lives until the streams are synchronised, and only this stream writes it.
                unsafe {
                    std::ptr::copy_nonoverlapping(b.as_ptr(), (at + e * len) as *mut u8, len)
                };
            }
        });
        let msgs: Vec<Msg> = (0..experts).map(|e| Msg::new(out, e * len, len)).collect();
        proxy
            .lock()
            .dispatch()
            .send_on_stream(&msgs, stream)
            .unwrap();
        let r = proxy.lock().combine().recv_on_stream(stream).unwrap();
        let addrs: Vec<usize> = (0..experts).map(|e| r.message_addr(e) as usize).collect();
        let (s, c) = (step.clone(), checks.clone());
        stream.launch_repeatable(move || {
            let k = s.load(Ordering::SeqCst);
            for (e, &at) in addrs.iter().enumerate() {
                // SAFETY: the arrived round's slot in the live ring; the stream waited until it arrived and releases it after this.
                let got = unsafe { std::slice::from_raw_parts(at as *const u8, len) };
                let want = echo(&step_bytes(k, me, e, len), e);
                c.check(
                    || format!("attention {me}: step {k}, expert {e}"),
                    got,
                    &want,
                );
            }
            s.fetch_add(1, Ordering::SeqCst);
        });
        proxy.lock().combine().release_on_stream(r, stream).unwrap();
    }
    stream.end_capture().unwrap()
}

/// Records `steps` steps of an expert rank: receive the dispatch round,
/// check every byte and write the echo into the stable return buffer,
/// release, send the echo back.
fn record_expert(
    proxy: &m2n::Proxy<Communicator>,
    stream: &HostStream,
    back: &Region,
    shape: Steps,
    checks: &Arc<Checks>,
) -> HostGraph {
    let Steps {
        me,
        peers: attention,
        len,
        steps,
    } = shape;
    let step = Arc::new(AtomicU64::new(0));
    let at_back = addr(back);
    stream.begin_capture().unwrap();
    for _ in 0..steps {
        let r = proxy.lock().dispatch().recv_on_stream(stream).unwrap();
        let addrs: Vec<usize> = (0..attention).map(|a| r.message_addr(a) as usize).collect();
        let (s, c) = (step.clone(), checks.clone());
        stream.launch_repeatable(move || {
            let k = s.fetch_add(1, Ordering::SeqCst);
            for (a, &at) in addrs.iter().enumerate() {
                // SAFETY: the arrived round's slot, released after this.
                let got = unsafe { std::slice::from_raw_parts(at as *const u8, len) };
                c.check(
                    || format!("expert {me}: step {k}, attention {a}"),
                    got,
                    &step_bytes(k, a, me, len),
                );
                let e = echo(got, me);
                // SAFETY: `back` holds attention * len bytes, written only here (the stream waits until its last send left).
                unsafe {
                    std::ptr::copy_nonoverlapping(e.as_ptr(), (at_back + a * len) as *mut u8, len)
                };
            }
        });
        proxy
            .lock()
            .dispatch()
            .release_on_stream(r, stream)
            .unwrap();
        let msgs: Vec<Msg> = (0..attention)
            .map(|a| Msg::new(back, a * len, len))
            .collect();
        proxy
            .lock()
            .combine()
            .send_on_stream(&msgs, stream)
            .unwrap();
    }
    stream.end_capture().unwrap()
}

/// A 2 x 2 group whose every rank records `depth` steps once (one cycle
/// of the ring) and launches the recording `launches` times; every byte
/// of every step is checked on both sides.
fn recorded_steps_replay(depth: usize, launches: usize) {
    let (att, exp, len) = (2, 2, 1500);
    let (attention, experts) = group(att, exp, depth);
    let steps = depth;
    let total = steps * launches;
    let mut ranks = Vec::new();
    for (i, c) in attention.into_iter().enumerate() {
        ranks.push((Role::Attention, i, c));
    }
    for (i, c) in experts.into_iter().enumerate() {
        ranks.push((Role::Expert, i, c));
    }
    let results: Vec<(Role, usize, Arc<Checks>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|(role, me, comm)| {
                scope.spawn(move || {
                    let proxy = comm.start_proxy();
                    let stream = HostStream::new();
                    let checks = Arc::new(Checks::default());
                    {
                        let mut c = proxy.lock();
                        c.dispatch()
                            .set_stream_mode(StreamMode::GraphSafe, &stream)
                            .unwrap();
                        c.combine()
                            .set_stream_mode(StreamMode::GraphSafe, &stream)
                            .unwrap();
                    }
                    let buf = proxy.lock().alloc(2 * len).unwrap();
                    let graph = match role {
                        Role::Attention => record_attention(
                            &proxy,
                            &stream,
                            &buf,
                            Steps {
                                me,
                                peers: exp,
                                len,
                                steps,
                            },
                            &checks,
                        ),
                        Role::Expert => record_expert(
                            &proxy,
                            &stream,
                            &buf,
                            Steps {
                                me,
                                peers: att,
                                len,
                                steps,
                            },
                            &checks,
                        ),
                    };
                    for _ in 0..launches {
                        graph.launch(&stream).unwrap();
                    }
                    if let Err(e) = stream.synchronize(Duration::from_secs(120)) {
                        let host = proxy.lock().progress().err();
                        panic!(
                            "{role:?} {me}: {e}; the host says {host:?}; {} checked",
                            checks.checked.load(Ordering::SeqCst)
                        );
                    }
                    wait_idle(&proxy);
                    assert!(proxy.is_running(), "the proxy stopped");
                    // Every launched round went through the host: the next
                    // direct graph-safe round is the one after them all.
                    drop(buf);
                    proxy.stop().unwrap();
                    (role, me, checks)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (role, me, c) in results {
        let first = c.first_wrong.lock().unwrap().clone();
        assert_eq!(
            c.wrong.load(Ordering::SeqCst),
            0,
            "{role:?} {me}: wrong bytes, first at {first:?}"
        );
        assert_eq!(
            c.checked.load(Ordering::SeqCst),
            total * 2,
            "{role:?} {me}: every step's two messages checked"
        );
    }
}

#[test]
fn a_recorded_step_replays_200_times_with_every_byte_checked_depth_1() {
    // Depth 1: one step is a whole cycle of the ring.
    recorded_steps_replay(1, 200);
}

#[test]
fn a_recorded_cycle_of_two_steps_replays_100_times_with_every_byte_checked_depth_2() {
    recorded_steps_replay(2, 100);
}

#[test]
fn a_replayed_step_with_a_peer_aborted_ends_in_an_error_not_a_hang() {
    let (a, e) = pair();
    let len = 512;
    let (pa, pe) = (a.start_proxy(), e.start_proxy());
    let (sa, se) = (HostStream::new(), HostStream::new());
    for (p, s) in [(&pa, &sa), (&pe, &se)] {
        let mut c = p.lock();
        c.dispatch()
            .set_stream_mode(StreamMode::GraphSafe, s)
            .unwrap();
        c.combine()
            .set_stream_mode(StreamMode::GraphSafe, s)
            .unwrap();
    }
    let (out, back) = (pa.lock().alloc(len).unwrap(), pe.lock().alloc(len).unwrap());
    let (ca, ce) = (Arc::new(Checks::default()), Arc::new(Checks::default()));
    // Depth 2: two steps are a cycle.
    let ga = record_attention(
        &pa,
        &sa,
        &out,
        Steps {
            me: 0,
            peers: 1,
            len,
            steps: 2,
        },
        &ca,
    );
    let ge = record_expert(
        &pe,
        &se,
        &back,
        Steps {
            me: 0,
            peers: 1,
            len,
            steps: 2,
        },
        &ce,
    );
    for _ in 0..10 {
        ga.launch(&sa).unwrap();
        ge.launch(&se).unwrap();
    }
    sa.synchronize(Duration::from_secs(30)).unwrap();
    se.synchronize(Duration::from_secs(30)).unwrap();
    assert_eq!(
        (
            ca.checked.load(Ordering::SeqCst),
            ca.wrong.load(Ordering::SeqCst)
        ),
        (20, 0)
    );
    // The expert's stream runs ahead into launches whose rounds never
    // come: the attention rank aborts.
    for _ in 0..20 {
        ge.launch(&se).unwrap();
    }
    pa.lock().abort();
    let mut waited = 0;
    while pe.is_running() {
        std::thread::sleep(Duration::from_millis(10));
        waited += 1;
        assert!(waited < 2000, "the expert's proxy never saw the abort");
    }
    // Every launch lets go, including ones launched after the failure.
    se.synchronize(Duration::from_secs(20))
        .expect("the expert's replays are let go");
    for _ in 0..5 {
        ge.launch(&se).unwrap();
    }
    se.synchronize(Duration::from_secs(20))
        .expect("launches after the failure are let go too");
    let err = pe.stop().unwrap_err();
    assert!(matches!(err, Error::PeerLost { .. }), "{err}");
    // The aborted side's own launches are let go as well.
    ga.launch(&sa).unwrap();
    sa.synchronize(Duration::from_secs(20))
        .expect("the aborted rank's replay is let go");
    drop(pa);
}

#[test]
fn graph_safe_misuse_is_refused_naming_it() {
    let (mut a, mut e) = pair();
    let stream = HostStream::new();
    let buf = a.alloc(64).unwrap();
    // Sequence mode cannot be recorded: its numbers would be baked in.
    stream.begin_capture().unwrap();
    let err = a
        .dispatch()
        .send_on_stream(&[Msg::new(&buf, 0, 8)], &stream)
        .unwrap_err();
    assert!(err.to_string().contains("sequence mode"), "{err}");
    let err = e.dispatch().recv_on_stream(&stream).unwrap_err();
    assert!(err.to_string().contains("GraphSafe"), "{err}");
    let err = a
        .dispatch()
        .set_stream_mode(StreamMode::GraphSafe, &stream)
        .unwrap_err();
    assert!(err.to_string().contains("before the capture"), "{err}");
    drop(stream.end_capture().unwrap());
    // A sequence-mode receive outstanding: no switch.
    let r = e.dispatch().recv_on_stream(&stream).unwrap();
    let err = e
        .dispatch()
        .set_stream_mode(StreamMode::GraphSafe, &stream)
        .unwrap_err();
    assert!(
        err.to_string().contains("sequence stream operations"),
        "{err}"
    );
    // Graph-safe sends: the direct API is refused.
    a.dispatch()
        .set_stream_mode(StreamMode::GraphSafe, &stream)
        .unwrap();
    assert_eq!(a.dispatch().stream_mode(), StreamMode::GraphSafe);
    let err = a.dispatch().try_send(&[Msg::new(&buf, 0, 8)]).unwrap_err();
    assert!(err.to_string().contains("graph-safe"), "{err}");
    // Let the sequence receive through (the send on a stream of its own:
    // this one waits for the round), then switch the receiving side.
    let sender = HostStream::new();
    a.dispatch()
        .send_on_stream(&[Msg::new(&buf, 0, 8)], &sender)
        .unwrap();
    e.dispatch().release_on_stream(r, &stream).unwrap();
    let mut tries = 0;
    while stream.synchronize(Duration::from_millis(1)).is_err()
        || sender.synchronize(Duration::from_millis(1)).is_err()
        || !e.streams_idle()
        || !a.streams_idle()
    {
        a.progress().unwrap();
        e.progress().unwrap();
        tries += 1;
        assert!(tries < 20_000, "the stream never drained");
    }
    e.dispatch()
        .set_stream_mode(StreamMode::GraphSafe, &stream)
        .unwrap();
    let err = e.dispatch().try_recv().unwrap_err();
    assert!(err.to_string().contains("graph-safe"), "{err}");
    // More receives than the ring has slots (depth 2), none released.
    let r1 = e.dispatch().recv_on_stream(&stream).unwrap();
    let r2 = e.dispatch().recv_on_stream(&stream).unwrap();
    let err = e.dispatch().recv_on_stream(&stream).unwrap_err();
    assert!(
        err.to_string().contains("as many as the ring has slots"),
        "{err}"
    );
    // A recording launched on a stream of another kind: only a CUDA
    // stream is one, and none can be made here; a host recording on a
    // host stream is fine (checked in the tests above).
    drop((r1, r2));
}

#[test]
fn a_recording_of_part_of_a_cycle_is_refused_when_replayed() {
    // Depth 2, one step recorded: the second launch signals slot 0 again
    // while round 1 (slot 1) is next.
    let (a, mut e) = pair();
    let pa = a.start_proxy();
    let stream = HostStream::new();
    pa.lock()
        .dispatch()
        .set_stream_mode(StreamMode::GraphSafe, &stream)
        .unwrap();
    let buf = pa.lock().alloc(64).unwrap();
    stream.begin_capture().unwrap();
    pa.lock()
        .dispatch()
        .send_on_stream(&[Msg::new(&buf, 0, 8)], &stream)
        .unwrap();
    let g = stream.end_capture().unwrap();
    let expert = std::thread::spawn(move || {
        // Receives and releases whatever comes, so credit never blocks.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(r)) = e.dispatch().try_recv() {
                let _ = e.dispatch().release(r);
            }
        }
    });
    g.launch(&stream).unwrap();
    g.launch(&stream).unwrap();
    let mut waited = 0;
    while pa.is_running() {
        std::thread::sleep(Duration::from_millis(10));
        waited += 1;
        assert!(waited < 2000, "the out-of-turn send was never refused");
    }
    let err = pa.stop().unwrap_err();
    assert!(err.to_string().contains("whole cycles"), "{err}");
    stream
        .synchronize(Duration::from_secs(10))
        .expect("let go after the error");
    expert.join().unwrap();
}
