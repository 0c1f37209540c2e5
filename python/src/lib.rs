//! `m2n._m2n`: the extension module under the `m2n` Python package.
//!
//! It binds the m2n crate directly (not the C ABI). The package's Python
//! layer (`python/m2n/__init__.py`) turns tensors, arrays and buffers into
//! the addresses and handles used here, and hands received messages back
//! as zero-copy tensors and arrays; everything that touches the
//! communicator happens in this module.
//!
//! Blocking calls release the GIL and wait in slices of [`SLICE`], checking
//! for signals between slices, so Ctrl-C interrupts a blocking receive.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use m2n::stream::StreamRound;
use m2n::Proxy;
use m2n::{Config, Msg, RecvRound, Region, Role, Root as RsRoot, Shape, UniqueId};
use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

create_exception!(m2n, Error, PyException, "Base class of every m2n failure.");
create_exception!(
    m2n,
    ConfigError,
    Error,
    "A bad configuration value (the message names the setting and why)."
);
create_exception!(
    m2n,
    BootstrapError,
    Error,
    "The rendezvous failed: the root was unreachable, rejected this rank, or timed out."
);
create_exception!(
    m2n,
    PeerLost,
    Error,
    "A peer on the other side died, hung past the peer timeout, or left. \
     Attributes: `peer_role` ('attention' or 'expert'), `peer_rank`, `reason`."
);
create_exception!(
    m2n,
    Timeout,
    Error,
    "A blocking call's timeout passed (nothing was lost: the call can be repeated)."
);
create_exception!(
    m2n,
    Aborted,
    Error,
    "The communicator was aborted; every later call fails with this."
);
create_exception!(
    m2n,
    InvalidArgument,
    Error,
    "An argument is wrong: a message outside its memory, a dtype or shape that does \
     not fit, an unregistered tensor."
);
create_exception!(
    m2n,
    UsageError,
    Error,
    "A call that does not fit the communicator's role or state: sending on the \
     receiving side, a released round, a closed communicator, a foreign handle."
);
create_exception!(
    m2n,
    ProtocolError,
    Error,
    "A peer broke the M2N protocol (the group cannot go on)."
);
create_exception!(
    m2n,
    TransportError,
    Error,
    "The transport failed (registration, a write, a corrupt descriptor)."
);
create_exception!(
    m2n,
    StreamError,
    Error,
    "A stream-ordered call could not be enqueued (no CUDA driver or GPU, a CUDA call failed)."
);

/// How long a blocking call waits with the GIL released before it checks
/// for signals (Ctrl-C) and waits again.
const SLICE: Duration = Duration::from_millis(50);

/// Handles (memory, rounds) are numbered from one counter for the whole
/// process, so a handle of one communicator is never taken for one of
/// another.
static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

fn next_key() -> u64 {
    NEXT_KEY.fetch_add(1, Ordering::Relaxed)
}

/// An m2n error as the Python exception of its kind.
fn to_py(e: m2n::Error) -> PyErr {
    let msg = e.to_string();
    match e {
        m2n::Error::Config(_) => ConfigError::new_err(msg),
        m2n::Error::Bootstrap(_) => BootstrapError::new_err(msg),
        m2n::Error::PeerLost { peer, reason } => Python::attach(|py| {
            let err = PeerLost::new_err(msg);
            let v = err.value(py);
            let set = || -> PyResult<()> {
                v.setattr("peer_role", peer.role.name())?;
                v.setattr("peer_rank", peer.rank)?;
                v.setattr("reason", reason)
            };
            match set() {
                Ok(()) => err,
                Err(e) => e,
            }
        }),
        m2n::Error::Timeout { .. } => Timeout::new_err(msg),
        m2n::Error::Aborted => Aborted::new_err(msg),
        m2n::Error::InvalidArgument(_) => InvalidArgument::new_err(msg),
        m2n::Error::Usage(_) => UsageError::new_err(msg),
        m2n::Error::Protocol { .. } => ProtocolError::new_err(msg),
        m2n::Error::Transport { .. } => TransportError::new_err(msg),
        m2n::Error::Stream(_) => StreamError::new_err(msg),
    }
}

fn usage(msg: impl Into<String>) -> PyErr {
    UsageError::new_err(msg.into())
}

fn invalid(msg: impl Into<String>) -> PyErr {
    InvalidArgument::new_err(msg.into())
}

/// A timeout in seconds from Python: `None` waits without limit.
fn deadline(timeout: Option<f64>) -> PyResult<Option<Instant>> {
    match timeout {
        None => Ok(None),
        Some(t) if t.is_finite() && t >= 0.0 => {
            Ok(Some(Instant::now() + Duration::from_secs_f64(t)))
        }
        Some(t) => Err(invalid(format!(
            "timeout {t} is not a number of seconds >= 0 (None waits without limit)"
        ))),
    }
}

fn parse_uid(text: &str) -> PyResult<UniqueId> {
    text.parse::<UniqueId>()
        .map_err(|e| invalid(format!("unique id: {e}")))
}

/// The rendezvous root of one group, served from a thread of this process
/// until every rank has joined (or the timeout passes).
#[pyclass(module = "m2n._m2n", name = "Root", frozen)]
#[derive(Debug)]
struct PyRoot {
    uid: String,
    thread: Mutex<Option<std::thread::JoinHandle<Result<(), m2n::bootstrap::BootstrapError>>>>,
}

#[pymethods]
impl PyRoot {
    /// Binds `addr` (port 0 picks a free port), or the address of
    /// `unique_id` with its secret, and serves the rendezvous for up to
    /// `timeout` seconds in a background thread.
    #[new]
    #[pyo3(signature = (addr = "127.0.0.1:0", timeout = 60.0, unique_id = None))]
    fn new(addr: &str, timeout: f64, unique_id: Option<&str>) -> PyResult<Self> {
        let Some(until) = deadline(Some(timeout))? else {
            unreachable!("a timeout was given")
        };
        let root = match unique_id {
            Some(text) => RsRoot::bind_id(&parse_uid(text)?),
            None => {
                let sock = addr.parse().map_err(|e| {
                    invalid(format!("root address {addr:?}: {e} (expected ip:port)"))
                })?;
                RsRoot::bind(sock)
            }
        }
        .map_err(|e| to_py(e.into()))?;
        let uid = root.unique_id().to_string();
        let thread = root.spawn(until.saturating_duration_since(Instant::now()));
        Ok(Self {
            uid,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The id every rank passes to `Communicator` (address and secret).
    #[getter]
    fn unique_id(&self) -> &str {
        &self.uid
    }

    /// Waits (GIL released) until the rendezvous is over; raises
    /// `BootstrapError` if it failed. A second call returns at once.
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(thread) = thread else { return Ok(()) };
        match py.detach(|| thread.join()) {
            Ok(r) => r.map_err(|e| to_py(e.into())),
            Err(_) => Err(BootstrapError::new_err("the rendezvous thread panicked")),
        }
    }

    fn __repr__(&self) -> String {
        let at = self.uid.split('#').next().unwrap_or_default();
        format!("m2n.Root({at})")
    }
}

/// A fresh unique id for a root at `addr` that is not yet bound (a
/// launcher prints it; the rank on that host serves it with
/// `Root(unique_id=...)`).
#[pyfunction]
fn make_unique_id(addr: &str) -> PyResult<String> {
    let root = addr
        .parse()
        .map_err(|e| invalid(format!("root address {addr:?}: {e} (expected ip:port)")))?;
    let secret = m2n::bootstrap::random_secret()
        .map_err(|e| BootstrapError::new_err(format!("random secret: {e}")))?;
    Ok(UniqueId { root, secret }.to_string())
}

/// Registered memory: a source of messages. It keeps the object it was
/// registered from alive until it is deregistered.
#[pyclass(module = "m2n._m2n", name = "Memory", frozen)]
#[derive(Debug)]
struct Memory {
    comm: u64,
    key: u64,
    ptr: u64,
    nbytes: usize,
    device: bool,
    owner: Option<Py<PyAny>>,
}

#[pymethods]
impl Memory {
    /// This registration's handle within its communicator.
    #[getter]
    fn key(&self) -> u64 {
        self.key
    }
    /// The communicator it was registered with (its `id`).
    #[getter]
    fn comm_id(&self) -> u64 {
        self.comm
    }
    /// The address of the first byte (a device address for GPU memory).
    #[getter]
    fn ptr(&self) -> u64 {
        self.ptr
    }
    /// The size in bytes.
    #[getter]
    fn nbytes(&self) -> usize {
        self.nbytes
    }
    /// Whether this is GPU memory.
    #[getter]
    fn device(&self) -> bool {
        self.device
    }
    /// The object it was registered from (None for `Communicator.alloc`).
    #[getter]
    fn owner(&self, py: Python<'_>) -> Option<Py<PyAny>> {
        self.owner.as_ref().map(|o| o.clone_ref(py))
    }
    fn __len__(&self) -> usize {
        self.nbytes
    }
    fn __repr__(&self) -> String {
        let kind = if self.device { "device" } else { "host" };
        format!(
            "m2n.Memory({} bytes of {kind} memory at {:#x})",
            self.nbytes, self.ptr
        )
    }
}

/// A received round, as the extension knows it: its number, each sender's
/// message address and length.
type RoundInfo = (u64, u64, Vec<u64>, Vec<u32>);

/// A communicator's state, shared with its proxy thread.
#[derive(Debug)]
struct State {
    /// `None` once closed.
    comm: Option<m2n::Communicator>,
    mems: HashMap<u64, Region>,
    /// The last round sent from each memory (it must be sent before the
    /// memory may be deregistered).
    last_sent_from: HashMap<u64, u64>,
    rounds: HashMap<u64, RecvRound>,
    stream_rounds: HashMap<u64, StreamRound>,
    proxy: Option<Proxy<State>>,
}

/// The communicator of a state's `comm` field, unless it was closed.
fn open(comm: &mut Option<m2n::Communicator>) -> m2n::Result<&mut m2n::Communicator> {
    comm.as_mut()
        .ok_or_else(|| m2n::Error::Usage("the communicator is closed".into()))
}

impl State {
    fn comm(&mut self) -> m2n::Result<&mut m2n::Communicator> {
        open(&mut self.comm)
    }

    /// Runs `op` on the channel with the round's messages resolved from
    /// (memory key, offset, length) triples (`None`: an empty message),
    /// and notes which memory the posted round was sent from.
    fn with_messages(
        &mut self,
        ch: u8,
        raw: &[Option<(u64, usize, usize)>],
        op: impl FnOnce(m2n::Channel<'_>, &[Msg<'_>]) -> m2n::Result<Option<u64>>,
    ) -> m2n::Result<Option<u64>> {
        let State { comm, mems, .. } = self;
        let comm = open(comm)?;
        let list = raw
            .iter()
            .enumerate()
            .map(|(i, m)| match m {
                None => Ok(Msg::EMPTY),
                Some((key, off, len)) => mems.get(key).map(|r| Msg::new(r, *off, *len)).ok_or_else(|| {
                    m2n::Error::Usage(format!(
                        "message {i}: its memory is not registered with this communicator (deregistered, or another communicator's)"
                    ))
                }),
            })
            .collect::<m2n::Result<Vec<_>>>()?;
        let round = op(channel(comm, ch)?, &list)?;
        if let Some(round) = round {
            for (key, _, _) in raw.iter().flatten() {
                self.last_sent_from.insert(*key, round);
            }
        }
        Ok(round)
    }
}

fn drive(st: &mut State) -> m2n::Result<bool> {
    st.comm()?.progress()
}

/// Which channel a call is on: 0 dispatch, 1 combine.
fn channel(comm: &mut m2n::Communicator, which: u8) -> m2n::Result<m2n::Channel<'_>> {
    match which {
        0 => Ok(comm.dispatch()),
        1 => Ok(comm.combine()),
        w => Err(m2n::Error::InvalidArgument(format!(
            "channel {w} is not 0 (dispatch) or 1 (combine)"
        ))),
    }
}

/// The low-level communicator; `m2n.Communicator` wraps it.
#[pyclass(module = "m2n._m2n", name = "Comm", frozen)]
#[derive(Debug)]
struct Comm {
    id: u64,
    role: Role,
    rank: usize,
    shape: Shape,
    transport: String,
    detail: String,
    rings_on_gpu: bool,
    shared: Arc<Mutex<State>>,
}

impl Comm {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `op` on the communicator with the GIL released.
    fn call<T: Send>(
        &self,
        py: Python<'_>,
        op: impl FnOnce(&mut State) -> m2n::Result<T> + Send,
    ) -> PyResult<T> {
        py.detach(|| op(&mut self.lock())).map_err(to_py)
    }

    /// Runs a blocking `op` (given how long it may wait) in slices with
    /// the GIL released, checking for signals between slices, until it
    /// succeeds, fails other than by timing out, or `timeout` passes.
    fn blocking<T: Send>(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
        op: impl Fn(&mut State, Duration) -> m2n::Result<T> + Send + Sync,
    ) -> PyResult<T> {
        let until = deadline(timeout)?;
        loop {
            let slice = until.map_or(SLICE, |d| {
                d.saturating_duration_since(Instant::now()).min(SLICE)
            });
            match py.detach(|| op(&mut self.lock(), slice)) {
                Err(m2n::Error::Timeout { what, .. })
                    if until.is_none_or(|d| Instant::now() < d) =>
                {
                    let _ = what;
                    py.check_signals()?;
                }
                Err(m2n::Error::Timeout { what, .. }) => {
                    let waited = Duration::from_secs_f64(timeout.unwrap_or_default());
                    return Err(Timeout::new_err(format!(
                        "timed out after {waited:?} waiting for {what}"
                    )));
                }
                r => return r.map_err(to_py),
            }
        }
    }

    /// Keeps the region `make` registers (or allocates) under a new key
    /// and describes it to Python; `ptr` is where it starts (the region's
    /// own address when `owner` is None: allocated memory).
    fn add_memory(
        &self,
        py: Python<'_>,
        ptr: u64,
        nbytes: usize,
        device: bool,
        owner: Option<Py<PyAny>>,
        make: impl FnOnce(&mut m2n::Communicator) -> m2n::Result<Region> + Send,
    ) -> PyResult<Memory> {
        if ptr == 0 || nbytes == 0 {
            return Err(invalid(format!(
                "cannot register {nbytes} bytes at {ptr:#x}: memory must be non-empty"
            )));
        }
        let key = next_key();
        let start = self.call(py, |st| {
            let region = make(st.comm()?)?;
            let start = region.as_ptr() as u64;
            st.mems.insert(key, region);
            Ok(start)
        })?;
        Ok(Memory {
            comm: self.id,
            key,
            ptr: if owner.is_some() { ptr } else { start },
            nbytes,
            device,
            owner,
        })
    }

    fn check_mem(&self, mem: &Memory) -> PyResult<()> {
        if mem.comm != self.id {
            return Err(usage(format!(
                "{} was registered with another communicator",
                mem.__repr__()
            )));
        }
        Ok(())
    }
}

fn round_info(comm: &m2n::Communicator, r: &RecvRound, key: u64) -> RoundInfo {
    let addrs = (0..r.lens().len())
        .map(|s| comm.message_addr(r, s).0)
        .collect();
    (key, r.round(), addrs, r.lens().to_vec())
}

#[pymethods]
impl Comm {
    /// Joins the group (blocks, GIL released, until every rank has).
    #[new]
    #[pyo3(signature = (role, rank, shape, unique_id, config = None))]
    fn new(
        py: Python<'_>,
        role: &str,
        rank: usize,
        shape: (usize, usize),
        unique_id: &str,
        config: Option<Vec<(String, String)>>,
    ) -> PyResult<Self> {
        let role: Role = role
            .parse()
            .map_err(|e: String| invalid(format!("role: {e}")))?;
        let uid = parse_uid(unique_id)?;
        let mut cfg = Config::from_env().map_err(|e| to_py(e.into()))?;
        if let Some(pairs) = config {
            let vars = pairs.into_iter().map(|(k, v)| {
                let k = k.to_ascii_uppercase().replace('-', "_");
                let name = if k.starts_with("M2N_") {
                    k
                } else {
                    format!("M2N_{k}")
                };
                (name, v)
            });
            cfg.apply_env(vars).map_err(|e| to_py(e.into()))?;
        }
        let shape = Shape::new(shape.0, shape.1);
        let comm = py
            .detach(|| m2n::Communicator::init(cfg, role, rank, shape, &uid))
            .map_err(to_py)?;
        Ok(Self {
            id: next_key(),
            role,
            rank,
            shape,
            transport: comm.transport_kind().name().to_string(),
            detail: comm.transport_detail().to_string(),
            rings_on_gpu: comm.rings_on_gpu(),
            shared: Arc::new(Mutex::new(State {
                comm: Some(comm),
                mems: HashMap::new(),
                last_sent_from: HashMap::new(),
                rounds: HashMap::new(),
                stream_rounds: HashMap::new(),
                proxy: None,
            })),
        })
    }

    #[getter]
    fn id(&self) -> u64 {
        self.id
    }
    #[getter]
    fn role(&self) -> &'static str {
        self.role.name()
    }
    #[getter]
    fn rank(&self) -> usize {
        self.rank
    }
    #[getter]
    fn shape(&self) -> (usize, usize) {
        (self.shape.attention, self.shape.experts)
    }
    #[getter]
    fn transport(&self) -> &str {
        &self.transport
    }
    #[getter]
    fn transport_detail(&self) -> &str {
        &self.detail
    }
    #[getter]
    fn rings_on_gpu(&self) -> bool {
        self.rings_on_gpu
    }

    /// Registers `nbytes` of host memory at `ptr`, keeping `owner` alive.
    fn register_host(
        &self,
        py: Python<'_>,
        ptr: u64,
        nbytes: usize,
        owner: Py<PyAny>,
    ) -> PyResult<Memory> {
        self.add_memory(py, ptr, nbytes, false, Some(owner), |comm| {
            // The Memory keeps `owner` (which owns ptr..ptr+nbytes) alive and
            // the package keeps the Memory while it is registered.
            // SAFETY: the memory outlives its registration, and deregister waits until no round from it is in flight.
            unsafe { comm.register(ptr as *mut u8, nbytes) }
        })
    }

    /// Registers `nbytes` of CUDA device memory at `dptr`, keeping `owner`
    /// alive. Without a CUDA driver this is a `StreamError` saying so.
    fn register_device(
        &self,
        py: Python<'_>,
        dptr: u64,
        nbytes: usize,
        owner: Py<PyAny>,
    ) -> PyResult<Memory> {
        self.add_memory(py, dptr, nbytes, true, Some(owner), |comm| {
            // SAFETY: as register_host, for device memory.
            unsafe { comm.register_gpu(dptr, nbytes) }
        })
    }

    /// Allocates `nbytes` of registered host memory from the transport.
    fn alloc(&self, py: Python<'_>, nbytes: usize) -> PyResult<Memory> {
        // The transport picks the address: a non-zero stand-in passes the check.
        self.add_memory(py, u64::MAX, nbytes, false, None, |comm| comm.alloc(nbytes))
    }

    /// Deregisters `mem`; refused while a round sent from it is in flight.
    fn deregister(&self, py: Python<'_>, mem: &Memory) -> PyResult<()> {
        self.check_mem(mem)?;
        let key = mem.key;
        self.call(py, move |st| {
            if !st.mems.contains_key(&key) {
                return Err(m2n::Error::Usage(
                    "this memory is not registered (deregistered already?)".into(),
                ));
            }
            if let Some(&round) = st.last_sent_from.get(&key) {
                let sending = match st.comm()?.role() {
                    Role::Attention => 0,
                    Role::Expert => 1,
                };
                if !channel(st.comm()?, sending)?.is_sent(round)? {
                    return Err(m2n::Error::Usage(format!(
                        "round {round} sent from this memory is still in flight: wait_sent first"
                    )));
                }
            }
            st.last_sent_from.remove(&key);
            st.mems.remove(&key);
            Ok(())
        })
    }

    /// Posts the next round on `ch`, waiting for credit; returns its number.
    #[pyo3(signature = (ch, msgs, timeout = None))]
    fn send(
        &self,
        py: Python<'_>,
        ch: u8,
        msgs: Vec<Option<(u64, usize, usize)>>,
        timeout: Option<f64>,
    ) -> PyResult<u64> {
        self.blocking(py, timeout, |st, t| {
            let sent = st.with_messages(ch, &msgs, |mut c, list| c.send(list, t).map(Some))?;
            Ok(sent.expect("a blocking send posts or fails"))
        })
    }

    /// Posts the next round if credit allows; `None` otherwise.
    fn try_send(
        &self,
        py: Python<'_>,
        ch: u8,
        msgs: Vec<Option<(u64, usize, usize)>>,
    ) -> PyResult<Option<u64>> {
        self.call(py, |st| {
            st.with_messages(ch, &msgs, |mut c, list| c.try_send(list))
        })
    }

    /// Whether every write of `round` has completed.
    fn is_sent(&self, py: Python<'_>, ch: u8, round: u64) -> PyResult<bool> {
        self.call(py, |st| channel(st.comm()?, ch)?.is_sent(round))
    }

    /// Waits until `round` is sent.
    #[pyo3(signature = (ch, round, timeout = None))]
    fn wait_sent(&self, py: Python<'_>, ch: u8, round: u64, timeout: Option<f64>) -> PyResult<()> {
        self.blocking(py, timeout, |st, t| {
            channel(st.comm()?, ch)?.wait_sent(round, t)
        })
    }

    /// Waits for the next round on `ch`: (key, number, addresses, lengths).
    #[pyo3(signature = (ch, timeout = None))]
    fn recv(&self, py: Python<'_>, ch: u8, timeout: Option<f64>) -> PyResult<RoundInfo> {
        self.blocking(py, timeout, |st, t| {
            let comm = st.comm()?;
            let r = channel(comm, ch)?.recv(t)?;
            let key = next_key();
            let info = round_info(comm, &r, key);
            st.rounds.insert(key, r);
            Ok(info)
        })
    }

    /// The next round on `ch` if it is in, else `None`.
    fn try_recv(&self, py: Python<'_>, ch: u8) -> PyResult<Option<RoundInfo>> {
        self.call(py, |st| {
            let comm = st.comm()?;
            let Some(r) = channel(comm, ch)?.try_recv()? else {
                return Ok(None);
            };
            let key = next_key();
            let info = round_info(comm, &r, key);
            st.rounds.insert(key, r);
            Ok(Some(info))
        })
    }

    /// Hands a received round back (its slots return to the senders).
    fn release(&self, py: Python<'_>, ch: u8, key: u64) -> PyResult<()> {
        self.call(py, |st| {
            let State { comm, rounds, .. } = st;
            let comm = open(comm)?;
            let r = rounds.remove(&key).ok_or_else(|| {
                m2n::Error::Usage(
                    "not a live round of this communicator (released already, or another's)".into(),
                )
            })?;
            channel(comm, ch)?.release(r)
        })
    }

    /// Moves whatever can move now; whether anything did.
    fn progress(&self, py: Python<'_>) -> PyResult<bool> {
        self.call(py, drive)
    }

    /// Enqueues the next round on a CUDA stream (`stream`: a CUstream).
    fn send_on_stream(
        &self,
        py: Python<'_>,
        ch: u8,
        msgs: Vec<Option<(u64, usize, usize)>>,
        stream: u64,
    ) -> PyResult<u64> {
        self.call(py, |st| {
            let s = cuda_stream(stream)?;
            let sent = st.with_messages(ch, &msgs, |mut c, list| {
                c.send_on_stream(list, &s).map(Some)
            })?;
            Ok(sent.expect("a stream send is enqueued or fails"))
        })
    }

    /// Enqueues a receive on a CUDA stream: (key, number, addresses, slot bytes).
    fn recv_on_stream(
        &self,
        py: Python<'_>,
        ch: u8,
        stream: u64,
    ) -> PyResult<(u64, u64, Vec<u64>, usize)> {
        self.call(py, |st| {
            let s = cuda_stream(stream)?;
            let comm = st.comm()?;
            let senders = comm.shape().side(match comm.role() {
                Role::Attention => Role::Expert,
                Role::Expert => Role::Attention,
            });
            let r = channel(comm, ch)?.recv_on_stream(&s)?;
            let key = next_key();
            let addrs = (0..senders).map(|i| r.message_addr(i)).collect();
            let info = (key, r.round(), addrs, r.slot_bytes());
            st.stream_rounds.insert(key, r);
            Ok(info)
        })
    }

    /// The lengths of a stream round's messages once the host has seen it
    /// arrive, else `None`.
    fn stream_round_lens(&self, py: Python<'_>, key: u64) -> PyResult<Option<Vec<u32>>> {
        self.call(py, |st| {
            let r = st.stream_rounds.get(&key).ok_or_else(|| {
                m2n::Error::Usage("not a live stream round of this communicator".into())
            })?;
            let comm = st
                .comm
                .as_ref()
                .ok_or_else(|| m2n::Error::Usage("the communicator is closed".into()))?;
            Ok(comm.stream_round_lens(r).map(<[u32]>::to_vec))
        })
    }

    /// Enqueues the release of a stream round on a CUDA stream.
    fn release_on_stream(&self, py: Python<'_>, ch: u8, key: u64, stream: u64) -> PyResult<()> {
        self.call(py, |st| {
            let s = cuda_stream(stream)?;
            if !st.stream_rounds.contains_key(&key) {
                return Err(m2n::Error::Usage(
                    "not a live stream round of this communicator (released already, or another's)"
                        .into(),
                ));
            }
            let State {
                comm,
                stream_rounds,
                ..
            } = st;
            let comm = open(comm)?;
            let r = stream_rounds.remove(&key).expect("checked");
            channel(comm, ch)?.release_on_stream(r, &s)
        })
    }

    /// Sets the stream mode ("sequence" or "graph-safe") of this rank's
    /// side of channel `ch`, with the CUDA stream its operations will use.
    fn set_stream_mode(&self, py: Python<'_>, ch: u8, mode: &str, stream: u64) -> PyResult<()> {
        self.call(py, |st| {
            let mode = stream_mode(mode)?;
            channel(st.comm()?, ch)?;
            let s = cuda_stream(stream)?;
            channel(st.comm()?, ch)?.set_stream_mode(mode, &s)
        })
    }

    /// The stream mode of this rank's side of channel `ch`.
    fn stream_mode(&self, py: Python<'_>, ch: u8) -> PyResult<&'static str> {
        self.call(py, |st| Ok(channel(st.comm()?, ch)?.stream_mode().name()))
    }

    /// Starts a thread that drives progress (for stream-ordered calls).
    fn start_proxy(&self) -> PyResult<()> {
        let mut st = self.lock();
        st.comm().map_err(to_py)?;
        if st.proxy.as_ref().is_some_and(|p| p.is_running()) {
            return Err(usage("the proxy thread is already running"));
        }
        st.proxy = Some(Proxy::spawn(self.shared.clone(), drive));
        Ok(())
    }

    /// Stops the proxy thread; raises the failure it stopped on, if any.
    fn stop_proxy(&self, py: Python<'_>) -> PyResult<()> {
        let proxy = self.lock().proxy.take();
        let Some(proxy) = proxy else {
            return Err(usage("no proxy thread was started on this communicator"));
        };
        // Joined without the lock, which the thread needs to finish.
        py.detach(|| proxy.stop()).map_err(to_py)
    }

    /// Aborts: peers see this rank as lost at once; later calls raise `Aborted`.
    fn abort(&self, py: Python<'_>) -> PyResult<()> {
        let proxy = self.lock().proxy.take();
        py.detach(|| drop(proxy));
        let mut st = self.lock();
        if let Some(c) = st.comm.as_mut() {
            c.abort();
        }
        st.rounds.clear();
        st.stream_rounds.clear();
        Ok(())
    }

    /// Leaves the group (peers see a clean goodbye) and frees everything
    /// registered. Idempotent.
    fn close(&self, py: Python<'_>) {
        let proxy = self.lock().proxy.take();
        py.detach(|| {
            drop(proxy);
            let mut st = self.lock();
            st.rounds.clear();
            st.stream_rounds.clear();
            st.mems.clear();
            st.comm = None;
        });
    }

    /// Whether `close` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.lock().comm.is_none()
    }

    /// Credit writes this rank has posted as a receiver.
    fn credit_writes(&self, py: Python<'_>) -> PyResult<u64> {
        self.call(py, |st| Ok(st.comm()?.credit_writes()))
    }
}

/// A stream mode by its name.
fn stream_mode(name: &str) -> m2n::Result<m2n::stream::StreamMode> {
    use m2n::stream::StreamMode;
    [StreamMode::Sequence, StreamMode::GraphSafe]
        .into_iter()
        .find(|m| m.name() == name)
        .ok_or_else(|| {
            m2n::Error::InvalidArgument(format!(
                "stream mode {name:?} is not \"sequence\" or \"graph-safe\""
            ))
        })
}

/// The caller's CUDA stream (a `CUstream` as an integer; 0: the legacy
/// default stream of the current context).
fn cuda_stream(raw: u64) -> m2n::Result<m2n::stream::CudaStream> {
    // SAFETY: the API contract (documented on the Python calls): a live stream that outlives the operations enqueued on it.
    Ok(unsafe { m2n::stream::CudaStream::from_raw(raw as *mut std::ffi::c_void) }?)
}

/// The extension module.
#[pymodule]
fn _m2n(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<PyRoot>()?;
    m.add_class::<Comm>()?;
    m.add_class::<Memory>()?;
    m.add_function(wrap_pyfunction!(make_unique_id, m)?)?;
    m.add("Error", py.get_type::<Error>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("BootstrapError", py.get_type::<BootstrapError>())?;
    m.add("PeerLost", py.get_type::<PeerLost>())?;
    m.add("Timeout", py.get_type::<Timeout>())?;
    m.add("Aborted", py.get_type::<Aborted>())?;
    m.add("InvalidArgument", py.get_type::<InvalidArgument>())?;
    m.add("UsageError", py.get_type::<UsageError>())?;
    m.add("ProtocolError", py.get_type::<ProtocolError>())?;
    m.add("TransportError", py.get_type::<TransportError>())?;
    m.add("StreamError", py.get_type::<StreamError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
