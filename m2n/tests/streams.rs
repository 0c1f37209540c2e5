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
