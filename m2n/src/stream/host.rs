//! A stream run by a CPU thread: the same ordering as a CUDA stream, for
//! machines without a GPU and for testing the flag protocol end to end.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{reached, Flag, FlagBlock, FlagLayout, MappedRegion, Stream, StreamError, StreamKind};
use crate::transport::Region;
use crate::wait::Backoff;

enum Op {
    Wait(Arc<FlagBlock>, Flag, u32),
    Write(Arc<FlagBlock>, Flag, u32),
    Run(Box<dyn FnOnce() + Send>),
    Repeat(Arc<dyn Fn() + Send + Sync>),
}

/// An operation as a recording keeps it: values and addresses fixed.
#[derive(Clone)]
enum Rec {
    Wait(Arc<FlagBlock>, Flag, u32),
    Write(Arc<FlagBlock>, Flag, u32),
    Repeat(Arc<dyn Fn() + Send + Sync>),
}

impl Rec {
    fn op(&self) -> Op {
        match self {
            Rec::Wait(f, flag, v) => Op::Wait(f.clone(), *flag, *v),
            Rec::Write(f, flag, v) => Op::Write(f.clone(), *flag, *v),
            Rec::Repeat(w) => Op::Repeat(w.clone()),
        }
    }
}

/// A recording in progress: what was enqueued, or why it cannot be
/// replayed.
#[derive(Default)]
struct Capture {
    ops: Vec<Rec>,
    invalid: Option<String>,
}

#[derive(Default)]
struct Shared {
    enqueued: AtomicU64,
    done: AtomicU64,
    /// Set when the stream is dropped: waits give up, work is skipped.
    abandon: AtomicBool,
    /// The wait the thread is in, if any (for timeouts' messages).
    waiting: Mutex<Option<(Flag, u32)>>,
    /// Work that panicked, first one.
    failed: Mutex<Option<String>>,
}

/// An in-order queue of work run by its own thread: closures
/// ([`launch`](Self::launch)) and m2n's flag operations, one after the
/// other, as a CUDA stream runs kernels and memory operations.
pub struct HostStream {
    tx: Option<mpsc::Sender<Op>>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// Set between begin_capture and end_capture: enqueued operations are
    /// recorded instead of run.
    capture: Mutex<Option<Capture>>,
}

/// A recording of a host stream's operations
/// ([`HostStream::end_capture`]), as a CUDA graph is one: launched on a
/// stream, it enqueues them again with the values and addresses they had
/// when recorded, as many times as it is launched.
#[derive(Clone)]
pub struct HostGraph {
    ops: Arc<[Rec]>,
}

impl std::fmt::Debug for HostGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut l = f.debug_list();
        for op in self.ops.iter() {
            match op {
                Rec::Wait(_, flag, v) => l.entry(&format_args!("wait {flag:?} >= {v}")),
                Rec::Write(_, flag, v) => l.entry(&format_args!("write {flag:?} = {v}")),
                Rec::Repeat(_) => l.entry(&format_args!("work")),
            };
        }
        l.finish()
    }
}

impl HostGraph {
    /// How many operations the recording holds.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Enqueues the recorded operations on `stream`, in their order, after
    /// everything enqueued on it before (`cuGraphLaunch`). Only a host
    /// stream can run a host recording.
    pub fn launch(&self, stream: &dyn Stream) -> Result<(), StreamError> {
        let Some(host) = stream.as_host() else {
            return Err(StreamError::Capture(format!(
                "a host stream's recording runs only on a host stream, not on a {} stream",
                stream.kind().name()
            )));
        };
        for op in self.ops.iter() {
            host.push(op.op())?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for HostStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostStream")
            .field("enqueued", &self.shared.enqueued.load(Ordering::Relaxed))
            .field("done", &self.shared.done.load(Ordering::Relaxed))
            .finish()
    }
}

impl Default for HostStream {
    fn default() -> Self {
        Self::new()
    }
}

impl HostStream {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel::<Op>();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("m2n-host-stream".into())
            .spawn(move || run(rx, &s))
            .expect("spawning a host stream thread");
        HostStream {
            tx: Some(tx),
            shared,
            thread: Some(thread),
            capture: Mutex::new(None),
        }
    }

    fn capture(&self) -> std::sync::MutexGuard<'_, Option<Capture>> {
        self.capture.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, op: Op) -> Result<(), StreamError> {
        if let Some(c) = self.capture().as_mut() {
            match op {
                Op::Wait(f, flag, v) => c.ops.push(Rec::Wait(f, flag, v)),
                Op::Write(f, flag, v) => c.ops.push(Rec::Write(f, flag, v)),
                Op::Repeat(w) => c.ops.push(Rec::Repeat(w)),
                Op::Run(_) => {
                    c.invalid.get_or_insert_with(|| {
                        "work enqueued with launch() runs once (FnOnce) and cannot be recorded; use launch_repeatable()".into()
                    });
                }
            }
            return Ok(());
        }
        self.shared.enqueued.fetch_add(1, Ordering::AcqRel);
        self.tx
            .as_ref()
            .and_then(|tx| tx.send(op).ok())
            .ok_or_else(|| StreamError::Abandoned("the host stream's thread is gone".into()))
    }

    /// Enqueues `work`: it runs after everything enqueued before it, and
    /// work enqueued after it runs after it returns.
    pub fn launch(&self, work: impl FnOnce() + Send + 'static) {
        // A stream whose thread is gone reports it at synchronize().
        let _ = self.push(Op::Run(Box::new(work)));
    }

    /// Enqueues `work` as [`launch`](Self::launch) does; work that can run
    /// more than once can also be recorded ([`begin_capture`](Self::begin_capture))
    /// and then runs at each launch of the recording.
    pub fn launch_repeatable(&self, work: impl Fn() + Send + Sync + 'static) {
        // As in launch().
        let _ = self.push(Op::Repeat(Arc::new(work)));
    }

    /// Starts recording (`cuStreamBeginCapture`): until
    /// [`end_capture`](Self::end_capture), what is enqueued on this stream
    /// does not run but is recorded, with its values and addresses as they
    /// are now. Refused while recording already.
    pub fn begin_capture(&self) -> Result<(), StreamError> {
        let mut c = self.capture();
        if c.is_some() {
            return Err(StreamError::Capture(
                "begin_capture: the host stream is recording already".into(),
            ));
        }
        *c = Some(Capture::default());
        Ok(())
    }

    /// Ends the recording (`cuStreamEndCapture`) and returns it; fails if
    /// none was started, or if something enqueued meanwhile cannot be
    /// replayed (work given to [`launch`](Self::launch)).
    pub fn end_capture(&self) -> Result<HostGraph, StreamError> {
        let Some(c) = self.capture().take() else {
            return Err(StreamError::Capture(
                "end_capture: the host stream is not recording".into(),
            ));
        };
        match c.invalid {
            Some(why) => Err(StreamError::Capture(format!(
                "the recording was invalidated: {why}"
            ))),
            None => Ok(HostGraph { ops: c.ops.into() }),
        }
    }

    /// Waits until everything enqueued so far is done, up to `timeout`.
    /// Fails naming the flag the stream still waits for, or the work that
    /// panicked; refused while recording.
    pub fn synchronize(&self, timeout: Duration) -> Result<(), StreamError> {
        if self.capture().is_some() {
            return Err(StreamError::Capture(
                "synchronize: the host stream is recording (nothing it records runs until launched)".into(),
            ));
        }
        let target = self.shared.enqueued.load(Ordering::Acquire);
        let deadline = Instant::now() + timeout;
        let mut backoff = Backoff::background();
        while self.shared.done.load(Ordering::Acquire) < target {
            if Instant::now() >= deadline {
                let pending = target - self.shared.done.load(Ordering::Acquire);
                let waiting = match *self
                    .shared
                    .waiting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                {
                    Some((flag, value)) => {
                        format!("; it waits for the {flag:?} flag to reach {value}")
                    }
                    None => String::new(),
                };
                return Err(StreamError::Abandoned(format!(
                    "host stream: {pending} operation(s) still pending after {timeout:?}{waiting}"
                )));
            }
            backoff.wait(false);
        }
        match self
            .shared
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(why) => Err(StreamError::Abandoned(format!(
                "host stream: enqueued work panicked: {why}"
            ))),
            None => Ok(()),
        }
    }
}

fn run(rx: mpsc::Receiver<Op>, shared: &Shared) {
    for op in rx {
        if !shared.abandon.load(Ordering::Acquire) {
            match op {
                Op::Wait(flags, flag, value) => {
                    *shared.waiting.lock().unwrap_or_else(|p| p.into_inner()) = Some((flag, value));
                    let mut backoff = Backoff::background();
                    while !reached(flags.load(flag), value)
                        && !shared.abandon.load(Ordering::Acquire)
                    {
                        backoff.wait(false);
                    }
                    *shared.waiting.lock().unwrap_or_else(|p| p.into_inner()) = None;
                }
                Op::Write(flags, flag, value) => flags.store(flag, value),
                Op::Run(work) => catch(shared, work),
                Op::Repeat(work) => catch(shared, || work()),
            }
        }
        shared.done.fetch_add(1, Ordering::AcqRel);
    }
}

/// Runs stream work, keeping the first panic's message for synchronize().
fn catch(shared: &Shared, work: impl FnOnce()) {
    if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
        let why = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "a panic".into());
        shared
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(why);
    }
}

impl Drop for HostStream {
    fn drop(&mut self) {
        self.shared.abandon.store(true, Ordering::Release);
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Stream for HostStream {
    fn kind(&self) -> StreamKind {
        StreamKind::Host
    }

    fn write_value(
        &self,
        flags: &Arc<FlagBlock>,
        flag: Flag,
        value: u32,
    ) -> Result<(), StreamError> {
        self.push(Op::Write(flags.clone(), flag, value))
    }

    fn wait_value(
        &self,
        flags: &Arc<FlagBlock>,
        flag: Flag,
        value: u32,
    ) -> Result<(), StreamError> {
        self.push(Op::Wait(flags.clone(), flag, value))
    }

    /// Host streams copy only simulated device memory (host memory posing
    /// as a device's, [`crate::Communicator::register_simulated_device`]);
    /// the communicator refuses real device memory before this.
    fn copy_to_host(&self, dst: usize, src: u64, len: usize) -> Result<(), StreamError> {
        self.push(Op::Repeat(Arc::new(move || {
            // SAFETY: both ranges are live host memory of `len` bytes (a simulated device region and its stage) while the round is out (for a recording: while it may be launched, which its maker vouches for).
            unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len) }
        })))
    }

    fn alloc_flags(&self, layout: FlagLayout) -> Result<FlagBlock, StreamError> {
        Ok(FlagBlock::host_with(layout))
    }

    fn is_capturing(&self) -> Result<bool, StreamError> {
        Ok(self.capture().is_some())
    }

    fn as_host(&self) -> Option<&HostStream> {
        Some(self)
    }

    fn map_region(&self, region: &Region, _rdma: bool) -> Result<MappedRegion, StreamError> {
        if !region.is_host() {
            return Err(StreamError::Unsupported(
                "a host stream cannot read GPU memory; use a CUDA stream".into(),
            ));
        }
        Ok(MappedRegion {
            addr: region.as_ptr() as u64,
            fence: None,
            owner: None,
        })
    }
}
