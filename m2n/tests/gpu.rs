//! The GPU path on a real GPU (feature `cuda`; each test prints why it
//! skips on a machine without one; `scripts/gpu-check` runs them on the
//! GPU machine): stream-gated sends from GPU memory (staged over shm),
//! stream-gated receives read by copy engines, cuda-ipc rounds between two
//! processes on one GPU with every byte checked, the stream-gated round
//! against the CPU-synchronised one, and rounds from GPU memory over
//! libfabric's shm with FI_HMEM.
#![cfg(feature = "cuda")]

#[path = "support/inproc.rs"]
mod inproc;

use std::ffi::c_void;
use std::time::{Duration, Instant};

use cudarc::driver::sys;
use m2n::stream::CudaStream;
use m2n::{Communicator, Config, Msg, Role, Root, Shape, TransportKind, UniqueId};

fn ck(call: &str, code: sys::CUresult) {
    assert_eq!(code, sys::CUresult::CUDA_SUCCESS, "{call}");
}

/// The primary context of GPU 0, current on this thread; `None` (and a
/// printed reason) without a GPU.
fn gpu() -> Option<()> {
    if let Err(e) = m2n::gpu::init() {
        println!("skipped: {e}");
        return None;
    }
    bind();
    Some(())
}

fn bind() {
    // SAFETY: plain driver calls with valid out-parameters.
    unsafe {
        let mut dev = 0;
        ck("cuDeviceGet", sys::cuDeviceGet(&mut dev, 0));
        let mut ctx = std::ptr::null_mut();
        ck(
            "cuDevicePrimaryCtxRetain",
            sys::cuDevicePrimaryCtxRetain(&mut ctx, dev),
        );
        ck("cuCtxSetCurrent", sys::cuCtxSetCurrent(ctx));
    }
}

fn stream() -> sys::CUstream {
    let mut s = std::ptr::null_mut();
    // SAFETY: valid out-parameter, current context.
    ck("cuStreamCreate", unsafe {
        sys::cuStreamCreate(
            &mut s,
            sys::CUstream_flags_enum::CU_STREAM_NON_BLOCKING as u32,
        )
    });
    s
}

fn alloc(len: usize) -> u64 {
    let mut d = 0;
    // SAFETY: valid out-parameter, current context.
    ck("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut d, len) });
    d
}

fn sync(s: sys::CUstream) {
    // SAFETY: a live stream.
    ck("cuStreamSynchronize", unsafe {
        sys::cuStreamSynchronize(s)
    });
}

fn memset(d: u64, v: u8, len: usize, s: sys::CUstream) {
    // SAFETY: `d` is a live allocation of at least `len` bytes.
    ck("cuMemsetD8Async", unsafe {
        sys::cuMemsetD8Async(d, v, len, s)
    });
}

fn copy(dst: u64, src: u64, len: usize, s: sys::CUstream) {
    // SAFETY: live ranges of `len` bytes (unified addressing).
    ck("cuMemcpyAsync", unsafe {
        sys::cuMemcpyAsync(dst, src, len, s)
    });
}

unsafe extern "C" fn nap(_: *mut c_void) {
    std::thread::sleep(Duration::from_millis(2));
}

/// Holds the stream 2 ms (a slow producer): work after it starts late.
fn slow(s: sys::CUstream) {
    // SAFETY: a host function with no data.
    ck("cuLaunchHostFunc", unsafe {
        sys::cuLaunchHostFunc(s, Some(nap), std::ptr::null_mut())
    });
}

fn config(t: TransportKind) -> Config {
    let ch = m2n::ChannelConfig {
        depth: 2,
        slot_bytes: 1 << 16,
    };
    Config {
        transport: t,
        dispatch: ch,
        combine: ch,
        peer_timeout: Duration::from_secs(5),
        heartbeat_interval: Duration::from_millis(100),
        ..Config::default()
    }
}

fn pair(t: TransportKind) -> (Communicator, Communicator) {
    inproc::pair(config(t), bind)
}

#[test]
fn stream_gated_sends_from_gpu_memory_over_shm() {
    let Some(()) = gpu() else { return };
    let (a, mut e) = pair(TransportKind::Shm);
    let (len, rounds) = (40_000, 30u8);
    let expert = std::thread::spawn(move || {
        for k in 0..rounds {
            let r = e.dispatch().recv(Duration::from_secs(20)).unwrap();
            let got = e.message(&r, 0);
            assert!(
                got.len() == len && got.iter().all(|&b| b == k + 1),
                "round {k}: the send left before its producer finished, or after the next one began"
            );
            e.dispatch().release(r).unwrap();
        }
    });
    let d = alloc(len);
    let s = stream();
    // SAFETY: `s` lives until the end of the test, after synchronisation.
    let cs = unsafe { CudaStream::from_raw(s.cast()) }.unwrap();
    let proxy = a.start_proxy();
    // SAFETY: `d` stays allocated for the whole test.
    let region = unsafe { proxy.lock().register_gpu(d, len) }.unwrap();
    assert!(
        region.is_staged(),
        "shm sends GPU memory through a host stage"
    );
    for k in 0..rounds {
        slow(s);
        memset(d, k + 1, len, s);
        proxy
            .lock()
            .dispatch()
            .send_on_stream(&[Msg::new(&region, 0, len)], &cs)
            .unwrap();
        // The next writer: must wait until the round has left.
        memset(d, 0xEE, len, s);
    }
    sync(s);
    expert.join().unwrap();
}

#[test]
fn stream_gated_receives_are_read_by_the_copy_engine_only_once_in() {
    let Some(()) = gpu() else { return };
    let (mut a, e) = pair(TransportKind::Shm);
    let (len, rounds) = (30_000usize, 20u8);
    let attention = std::thread::spawn(move || {
        let mut buf = a.alloc(len).unwrap();
        for k in 0..rounds {
            std::thread::sleep(Duration::from_millis(2));
            buf.as_mut_slice().fill(k + 1);
            let r = a
                .dispatch()
                .send(&[Msg::new(&buf, 0, len)], Duration::from_secs(20))
                .unwrap();
            a.dispatch().wait_sent(r, Duration::from_secs(20)).unwrap();
        }
        a
    });
    let s = stream();
    // SAFETY: `s` outlives its use here.
    let cs = unsafe { CudaStream::from_raw(s.cast()) }.unwrap();
    let proxy = e.start_proxy();
    let staging = alloc(len);
    let mut out = vec![0u8; len * rounds as usize];
    for k in 0..rounds as usize {
        let r = proxy.lock().dispatch().recv_on_stream(&cs).unwrap();
        // Ring (host memory mapped for the GPU) to device, then to the host.
        copy(staging, r.message_addr(0), len, s);
        copy(out[k * len..].as_mut_ptr() as u64, staging, len, s);
        proxy.lock().dispatch().release_on_stream(r, &cs).unwrap();
    }
    sync(s);
    drop(attention.join().unwrap());
    for k in 0..rounds as usize {
        assert!(
            out[k * len..(k + 1) * len]
                .iter()
                .all(|&b| b == k as u8 + 1),
            "round {k} was read before it was in"
        );
    }
}

/// The expert side of the cuda-ipc test, in a child process (the same
/// test binary, run with M2N_GPU_CHILD set).
#[test]
fn cuda_ipc_child() {
    let Ok(uid) = std::env::var("M2N_GPU_CHILD") else {
        println!("skipped: runs only as the child of cuda_ipc_rounds_between_processes");
        return;
    };
    bind();
    let uid: UniqueId = uid.parse().unwrap();
    let e = Communicator::init(
        config(TransportKind::CudaIpc),
        Role::Expert,
        0,
        Shape::new(1, 1),
        &uid,
    )
    .unwrap();
    // Both of the parent's phases: stream-gated, then CPU-synchronised.
    let rounds: usize = 2 * std::env::var("M2N_GPU_ROUNDS")
        .unwrap()
        .parse::<usize>()
        .unwrap();
    let len: usize = std::env::var("M2N_GPU_LEN").unwrap().parse().unwrap();
    let s = stream();
    // SAFETY: `s` outlives its use here.
    let cs = unsafe { CudaStream::from_raw(s.cast()) }.unwrap();
    let out = alloc(len);
    let proxy = e.start_proxy();
    // SAFETY: `out` stays allocated.
    let region = unsafe { proxy.lock().register_gpu(out, len) }.unwrap();
    assert!(!region.is_staged(), "cuda-ipc sends GPU memory as it is");
    for _ in 0..rounds {
        // Echo each dispatch round back, GPU to GPU, all on the stream.
        let r = proxy.lock().dispatch().recv_on_stream(&cs).unwrap();
        copy(out, r.message_addr(0), len, s);
        proxy.lock().dispatch().release_on_stream(r, &cs).unwrap();
        proxy
            .lock()
            .combine()
            .send_on_stream(&[Msg::new(&region, 0, len)], &cs)
            .unwrap();
    }
    sync(s);
    std::thread::sleep(Duration::from_millis(200));
    proxy.stop().unwrap();
}

fn check_rounds(out: &[u8], len: usize, phase: &str) {
    for (k, round) in out.chunks(len).enumerate() {
        assert!(
            round.iter().all(|&b| b == (k % 251) as u8 + 1),
            "{phase}: round {k} came back wrong"
        );
    }
}

#[test]
fn cuda_ipc_rounds_between_processes() {
    let Some(()) = gpu() else { return };
    if std::env::var("M2N_GPU_CHILD").is_ok() {
        return;
    }
    let (len, rounds) = (1usize << 16, 200usize);
    let root = Root::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let uid = root.unique_id().clone();
    let served = root.spawn(Duration::from_secs(30));
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["cuda_ipc_child", "--exact", "--nocapture"])
        .env("M2N_GPU_CHILD", uid.to_string())
        .env("M2N_GPU_ROUNDS", rounds.to_string())
        .env("M2N_GPU_LEN", len.to_string())
        .spawn()
        .unwrap();
    let a = Communicator::init(
        config(TransportKind::CudaIpc),
        Role::Attention,
        0,
        Shape::new(1, 1),
        &uid,
    )
    .unwrap();
    served.join().unwrap().unwrap();
    assert!(a.rings_on_gpu());
    let s = stream();
    // SAFETY: `s` outlives its use here.
    let cs = unsafe { CudaStream::from_raw(s.cast()) }.unwrap();
    let src = alloc(len);
    let mut out = vec![0u8; len * rounds];
    let proxy = a.start_proxy();
    // SAFETY: `src` stays allocated.
    let region = unsafe { proxy.lock().register_gpu(src, len) }.unwrap();
    let start = Instant::now();
    for k in 0..rounds {
        memset(src, (k % 251) as u8 + 1, len, s);
        proxy
            .lock()
            .dispatch()
            .send_on_stream(&[Msg::new(&region, 0, len)], &cs)
            .unwrap();
        let r = proxy.lock().combine().recv_on_stream(&cs).unwrap();
        copy(
            out[k * len..].as_mut_ptr() as u64,
            r.message_addr(0),
            len,
            s,
        );
        proxy.lock().combine().release_on_stream(r, &cs).unwrap();
    }
    sync(s);
    let gated = start.elapsed();
    check_rounds(&out, len, "stream-gated");
    out.fill(0);
    // The same rounds the way a caller without stream ordering does them:
    // wait for the GPU, send, wait for the answer, copy it out, release.
    let start = Instant::now();
    for k in 0..rounds {
        memset(src, (k % 251) as u8 + 1, len, s);
        sync(s);
        let mut a = proxy.lock();
        let sent = a
            .dispatch()
            .send(&[Msg::new(&region, 0, len)], Duration::from_secs(20))
            .unwrap();
        a.dispatch()
            .wait_sent(sent, Duration::from_secs(20))
            .unwrap();
        drop(a);
        let r = loop {
            if let Some(r) = proxy.lock().combine().try_recv().unwrap() {
                break r;
            }
        };
        let (addr, n) = proxy.lock().message_addr(&r, 0);
        assert_eq!(n, len);
        copy(out[k * len..].as_mut_ptr() as u64, addr, len, s);
        sync(s);
        proxy.lock().combine().release(r).unwrap();
    }
    let synced = start.elapsed();
    let status = child.wait().unwrap();
    assert!(status.success(), "the expert process failed");
    check_rounds(&out, len, "CPU-synchronised");
    let us = |d: Duration| d.as_secs_f64() * 1e6 / rounds as f64;
    println!(
        "cuda-ipc, {rounds} round trips of {len} B GPU to GPU, every byte checked: stream-gated {:.1} us per round trip, CPU-synchronised {:.1} us; synchronised / gated = {:.2}",
        us(gated),
        us(synced),
        synced.as_secs_f64() / gated.as_secs_f64()
    );
    drop(proxy);
}

/// Pinned host memory (`cuMemHostAlloc`), zeroed; freed at exit.
fn pinned(len: usize) -> *mut u8 {
    let mut p = std::ptr::null_mut();
    // SAFETY: valid out-parameter, current context.
    ck("cuMemHostAlloc", unsafe {
        sys::cuMemHostAlloc(&mut p, len, sys::CU_MEMHOSTALLOC_PORTABLE)
    });
    // SAFETY: just allocated, `len` bytes.
    unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, len) };
    p.cast()
}

/// The bytes of step `k` (the producer's and, echoed, the consumer's).
fn step_bytes(k: u64, len: usize) -> impl Iterator<Item = u8> {
    (0..len).map(move |i| (k as usize * 31 + i * 7 + 1) as u8)
}

/// What a host-function node of the graph reads and writes: a step
/// counter kept across launches, a pinned buffer, and the checks' counts.
struct StepState {
    step: std::sync::atomic::AtomicU64,
    buf: *mut u8,
    len: usize,
    checked: std::sync::atomic::AtomicUsize,
    wrong: std::sync::atomic::AtomicUsize,
}

use std::sync::atomic::Ordering::SeqCst;

/// Host node: fill the producer's pinned buffer with this step's bytes.
unsafe extern "C" fn produce(data: *mut c_void) {
    // SAFETY: `data` is a StepState that outlives every launch (the test synchronises first).
    let st = unsafe { &*(data as *const StepState) };
    let k = st.step.load(SeqCst);
    for (i, b) in step_bytes(k, st.len).enumerate() {
        // SAFETY: `buf` is `len` pinned bytes, only this node writes it.
        unsafe { *st.buf.add(i) = b };
    }
}

/// Host node: check every byte of the consumer's pinned buffer against
/// this step's, then count the step.
unsafe extern "C" fn consume(data: *mut c_void) {
    // SAFETY: as in produce.
    let st = unsafe { &*(data as *const StepState) };
    let k = st.step.fetch_add(1, SeqCst);
    // SAFETY: `buf` is `len` pinned bytes written by the copy before this node.
    let got = unsafe { std::slice::from_raw_parts(st.buf, st.len) };
    st.checked.fetch_add(1, SeqCst);
    if !got.iter().copied().eq(step_bytes(k, st.len)) {
        st.wrong.fetch_add(1, SeqCst);
    }
}

/// Host node: the producer's next step.
unsafe extern "C" fn next(data: *mut c_void) {
    // SAFETY: as in produce.
    unsafe { &*(data as *const StepState) }
        .step
        .fetch_add(1, SeqCst);
}

fn host_node(s: sys::CUstream, f: unsafe extern "C" fn(*mut c_void), st: &StepState) {
    // SAFETY: `st` outlives the graph's launches (synchronised before it goes).
    ck("cuLaunchHostFunc", unsafe {
        sys::cuLaunchHostFunc(s, Some(f), st as *const StepState as *mut c_void)
    });
}

fn begin_capture(s: sys::CUstream) {
    // Relaxed: the proxy threads keep making driver calls meanwhile.
    // SAFETY: a live stream.
    ck("cuStreamBeginCapture", unsafe {
        sys::cuStreamBeginCapture_v2(s, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
    });
}

fn end_capture(s: sys::CUstream) -> sys::CUgraphExec {
    let mut g = std::ptr::null_mut();
    let mut exec = std::ptr::null_mut();
    // SAFETY: a stream in capture, valid out-parameters.
    unsafe {
        ck("cuStreamEndCapture", sys::cuStreamEndCapture(s, &mut g));
        ck(
            "cuGraphInstantiateWithFlags",
            sys::cuGraphInstantiateWithFlags(&mut exec, g, 0),
        );
        ck("cuGraphDestroy", sys::cuGraphDestroy(g));
    }
    exec
}

/// Graph-safe stream calls captured into real CUDA graphs (two steps:
/// a cycle of the depth-2 ring) and each graph launched 100 times: the
/// attention rank's producer (a host node filling pinned memory, then a
/// copy to the GPU buffer), its stream-ordered send (staged over shm),
/// its stream-ordered receive read by the copy engine into pinned memory
/// and checked byte by byte by a host node, its release; the expert
/// receives, copies the round to its GPU buffer, releases and sends it
/// back, all on its stream.
#[test]
fn graph_safe_calls_captured_into_cuda_graphs_replay_with_every_byte_checked() {
    let Some(()) = gpu() else { return };
    let (a, e) = pair(TransportKind::Shm);
    let (len, launches, steps) = (20_000usize, 100usize, 2usize);
    let (sa, se) = (stream(), stream());
    // SAFETY: both streams outlive their use here (synchronised below).
    let (ca, ce) = unsafe {
        (
            CudaStream::from_raw(sa.cast()),
            CudaStream::from_raw(se.cast()),
        )
    };
    let (ca, ce) = (ca.unwrap(), ce.unwrap());
    let (pa, pe) = (a.start_proxy(), e.start_proxy());
    for (p, c) in [(&pa, &ca), (&pe, &ce)] {
        let mut p = p.lock();
        p.dispatch()
            .set_stream_mode(m2n::stream::StreamMode::GraphSafe, c)
            .unwrap();
        p.combine()
            .set_stream_mode(m2n::stream::StreamMode::GraphSafe, c)
            .unwrap();
    }
    let (d_src, d_back) = (alloc(len), alloc(len));
    // SAFETY: both stay allocated for the whole test.
    let src = unsafe { pa.lock().register_gpu(d_src, len) }.unwrap();
    // SAFETY: as above.
    let back = unsafe { pe.lock().register_gpu(d_back, len) }.unwrap();
    let producer = StepState {
        step: 0.into(),
        buf: pinned(len),
        len,
        checked: 0.into(),
        wrong: 0.into(),
    };
    let consumer = StepState {
        step: 0.into(),
        buf: pinned(len),
        len,
        checked: 0.into(),
        wrong: 0.into(),
    };
    // The attention rank's cycle.
    begin_capture(sa);
    for _ in 0..steps {
        host_node(sa, produce, &producer);
        copy(d_src, producer.buf as u64, len, sa);
        host_node(sa, next, &producer);
        pa.lock()
            .dispatch()
            .send_on_stream(&[Msg::new(&src, 0, len)], &ca)
            .unwrap();
        let r = pa.lock().combine().recv_on_stream(&ca).unwrap();
        copy(consumer.buf as u64, r.message_addr(0), len, sa);
        host_node(sa, consume, &consumer);
        pa.lock().combine().release_on_stream(r, &ca).unwrap();
    }
    let ga = end_capture(sa);
    // The expert's cycle.
    begin_capture(se);
    for _ in 0..steps {
        let r = pe.lock().dispatch().recv_on_stream(&ce).unwrap();
        copy(d_back, r.message_addr(0), len, se);
        pe.lock().dispatch().release_on_stream(r, &ce).unwrap();
        pe.lock()
            .combine()
            .send_on_stream(&[Msg::new(&back, 0, len)], &ce)
            .unwrap();
    }
    let ge = end_capture(se);
    for _ in 0..launches {
        // SAFETY: instantiated graphs on live streams.
        unsafe {
            ck("cuGraphLaunch", sys::cuGraphLaunch(ga, sa));
            ck("cuGraphLaunch", sys::cuGraphLaunch(ge, se));
        }
    }
    sync(sa);
    sync(se);
    let (checked, wrong) = (consumer.checked.load(SeqCst), consumer.wrong.load(SeqCst));
    println!("CUDA graphs: {launches} launches of {steps} steps each side, {checked} rounds of {len} B checked, {wrong} wrong");
    assert_eq!(wrong, 0, "rounds that came back wrong");
    assert_eq!(checked, launches * steps);
    assert!(pa.is_running() && pe.is_running(), "a proxy stopped");
    // SAFETY: the streams are idle; the graphs go.
    unsafe {
        sys::cuGraphExecDestroy(ga);
        sys::cuGraphExecDestroy(ge);
    }
    drop((src, back));
}

/// GPU memory over libfabric's shm, every byte checked: read by the
/// provider itself (FI_HMEM, no host stage) where libfabric can register
/// CUDA memory, else through a host stage, saying why (Debian's libfabric1
/// is built without CUDA). Skips where libfabric is missing.
#[test]
fn rounds_from_gpu_memory_over_fabric_with_fi_hmem() {
    let Some(()) = gpu() else { return };
    let mut cfg = config(TransportKind::Fabric);
    cfg.fabric.provider = Some("shm".into());
    let (a, e) = inproc::init_pair(cfg, bind);
    let (mut a, mut e) = match (a, e) {
        (Ok(a), Ok(e)) => (a, e),
        (Err(err), _) | (_, Err(err)) if err.to_string().contains("libfabric.so") => {
            println!("skipped: {err}");
            return;
        }
        (a, e) => panic!("a fabric pair over shm: {:?} {:?}", a.err(), e.err()),
    };
    let (len, rounds) = (40_000, 20u8);
    let d = alloc(len);
    let offered = a.transport_detail().contains("FI_HMEM");
    // SAFETY: `d` stays allocated for the whole test.
    let region = unsafe { a.register_gpu(d, len) }.unwrap();
    // A provider that offers FI_HMEM from a libfabric without CUDA refuses
    // the registration (the transport then no longer offers it), and the
    // communicator stages instead.
    let zero_copy = a.transport_detail().contains("FI_HMEM");
    assert_eq!(region.is_staged(), !zero_copy, "{}", a.transport_detail());
    if !zero_copy {
        println!(
            "skipped: zero copy over fabric (FI_HMEM {}); the rounds go through a host stage",
            if offered {
                "offered, but libfabric could not register CUDA memory: see the stderr line above"
            } else {
                "not offered"
            }
        );
    }
    let expert = std::thread::spawn(move || {
        // shm's receiver may copy out of the sender's GPU memory.
        bind();
        for k in 0..rounds {
            let r = e.dispatch().recv(Duration::from_secs(20)).unwrap();
            let got = e.message(&r, 0);
            let wrong = got.iter().filter(|&&b| b != k + 1).count();
            assert!(
                got.len() == len && wrong == 0,
                "round {k}: {} bytes, {wrong} of them wrong",
                got.len()
            );
            e.dispatch().release(r).unwrap();
        }
    });
    let s = stream();
    for k in 0..rounds {
        memset(d, k + 1, len, s);
        sync(s);
        let round = a
            .dispatch()
            .send(&[Msg::new(&region, 0, len)], Duration::from_secs(20))
            .unwrap();
        a.dispatch()
            .wait_sent(round, Duration::from_secs(20))
            .unwrap();
    }
    expert.join().unwrap();
}

#[test]
fn cuda_ipc_without_a_gpu_is_refused_naming_what_is_missing() {
    if m2n::gpu::init().is_ok() {
        println!(
            "skipped: this machine has a GPU (cuda_ipc_rounds_between_processes runs instead)"
        );
        return;
    }
    let mut cfg = config(TransportKind::CudaIpc);
    cfg.bootstrap_timeout = Duration::from_secs(5);
    let (a, e) = inproc::init_pair(cfg, || {});
    let text = a.unwrap_err().to_string();
    assert!(
        text.contains("cuda-ipc") && text.contains("CUDA driver"),
        "the error names the transport and what is missing: {text}"
    );
    assert!(e.is_err());
}
