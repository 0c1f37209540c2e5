//! A stream run by a CPU thread: the same ordering as a CUDA stream, for
//! machines without a GPU and for testing the flag protocol end to end.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{reached, Flag, FlagBlock, MappedRegion, Stream, StreamError, StreamKind};
use crate::transport::Region;
use crate::wait::Backoff;

enum Op {
    Wait(Arc<FlagBlock>, Flag, u32),
    Write(Arc<FlagBlock>, Flag, u32),
    Run(Box<dyn FnOnce() + Send>),
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
        }
    }

    fn push(&self, op: Op) -> Result<(), StreamError> {
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

    /// Waits until everything enqueued so far is done, up to `timeout`.
    /// Fails naming the flag the stream still waits for, or the work that
    /// panicked.
    pub fn synchronize(&self, timeout: Duration) -> Result<(), StreamError> {
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
                Op::Run(work) => {
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
            }
        }
        shared.done.fetch_add(1, Ordering::AcqRel);
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
        self.push(Op::Run(Box::new(move || {
            // SAFETY: both ranges are live host memory of `len` bytes (a simulated device region and its stage) while the round is out.
            unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len) }
        })))
    }

    fn alloc_flags(&self) -> Result<FlagBlock, StreamError> {
        Ok(FlagBlock::host())
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
