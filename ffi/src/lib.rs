//! The C ABI of m2n: `libm2n.so` / `libm2n.a` with `include/m2n.h`.
//!
//! Every function returns an [`m2n_result_t`] (except the two that return
//! strings), checks every pointer and handle before use, and catches panics
//! so none crosses into C. See the header for the contract of each call.

#![allow(non_camel_case_types)]
// C callers pass raw pointers; each function checks them before any use.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

/// The `c_api` fuzz target's entry point (`m2n/fuzz`): only with the
/// `fuzzing` feature (and in this crate's tests).
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzz_api;
mod handles;
mod types;

use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

use m2n_rs::{Communicator, Config, Error, Msg, Role, Root, Shape, TransportKind, UniqueId};

use handles::{insert_comm, lookup_comm, mem_key, remove_comm, round_key, CommState};
pub use types::*;

type Failure = (m2n_result_t, String);

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_thread_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `f`, turning failures and panics into a code plus the thread's last error.
fn guard(f: impl FnOnce() -> Result<m2n_result_t, Failure>) -> m2n_result_t {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(code)) => code,
        Ok(Err((code, msg))) => {
            set_thread_error(&msg);
            code
        }
        Err(p) => {
            set_thread_error(&format!("internal error (panic): {}", panic_message(&*p)));
            m2n_result_t::M2N_ERR_INTERNAL
        }
    }
}

/// Runs `f` on a live communicator; failures are also kept as its last error.
fn with_comm(
    handle: *const m2n_comm_t,
    f: impl FnOnce(&mut CommState) -> Result<m2n_result_t, Failure>,
) -> m2n_result_t {
    guard(|| {
        let comm = lookup_comm(handle)?;
        let mut st = comm.lock().unwrap_or_else(|p| p.into_inner());
        let result = catch_unwind(AssertUnwindSafe(|| f(&mut st))).unwrap_or_else(|p| {
            Err((
                m2n_result_t::M2N_ERR_INTERNAL,
                format!("internal error (panic): {}", panic_message(&*p)),
            ))
        });
        if let Err((_, msg)) = &result {
            st.last_error = CString::new(msg.replace('\0', " ")).unwrap_or_default();
        }
        result
    })
}

fn map_err(e: Error) -> Failure {
    let code = match &e {
        Error::Config(_) => m2n_result_t::M2N_ERR_CONFIG,
        Error::Bootstrap(_) => m2n_result_t::M2N_ERR_BOOTSTRAP,
        Error::Transport { .. } => m2n_result_t::M2N_ERR_TRANSPORT,
        Error::Protocol { .. } => m2n_result_t::M2N_ERR_PROTOCOL,
        Error::PeerLost { .. } => m2n_result_t::M2N_ERR_PEER_LOST,
        Error::Timeout { .. } => m2n_result_t::M2N_ERR_TIMEOUT,
        Error::Usage(_) => m2n_result_t::M2N_ERR_INVALID_USAGE,
        Error::InvalidArgument(_) => m2n_result_t::M2N_ERR_INVALID_ARGUMENT,
        Error::Aborted => m2n_result_t::M2N_ERR_ABORTED,
        Error::Stream(_) => m2n_result_t::M2N_ERR_STREAM,
    };
    (code, e.to_string())
}

fn invalid(msg: impl Into<String>) -> Failure {
    (m2n_result_t::M2N_ERR_INVALID_ARGUMENT, msg.into())
}

fn usage(msg: impl Into<String>) -> Failure {
    (m2n_result_t::M2N_ERR_INVALID_USAGE, msg.into())
}

/// Writes `value` through `out`, or fails naming the NULL argument.
fn put<T>(out: *mut T, name: &str, value: T) -> Result<(), Failure> {
    if out.is_null() {
        return Err(invalid(format!("{name} is NULL")));
    }
    // SAFETY: non-null; the caller provides a writable T (the API contract).
    unsafe { out.write(value) };
    Ok(())
}

/// A timeout in milliseconds: negative waits without limit (a lost peer
/// still ends the wait), 0 tries once.
fn timeout(ms: c_int) -> Duration {
    if ms < 0 {
        Duration::from_secs(100 * 365 * 24 * 3600)
    } else {
        Duration::from_millis(ms as u64)
    }
}

fn not_aborted(st: &CommState) -> Result<(), Failure> {
    if st.aborted {
        Err((
            m2n_result_t::M2N_ERR_ABORTED,
            "the communicator was aborted".into(),
        ))
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Library-wide calls
// ---------------------------------------------------------------------------

/// The library version.
#[no_mangle]
pub extern "C" fn m2n_get_version(
    major: *mut c_int,
    minor: *mut c_int,
    patch: *mut c_int,
) -> m2n_result_t {
    guard(|| {
        let v = |s: &str| s.parse::<c_int>().unwrap_or(0);
        put(major, "major", v(env!("CARGO_PKG_VERSION_MAJOR")))?;
        put(minor, "minor", v(env!("CARGO_PKG_VERSION_MINOR")))?;
        put(patch, "patch", v(env!("CARGO_PKG_VERSION_PATCH")))?;
        Ok(m2n_result_t::M2N_SUCCESS)
    })
}

/// A static description of a result code (never NULL).
#[no_mangle]
pub extern "C" fn m2n_get_error_string(result: c_int) -> *const c_char {
    let s: &'static CStr = match result {
        0 => c"success",
        1 => c"not now: try again",
        2 => c"invalid argument",
        3 => c"invalid usage (bad handle or call order)",
        4 => c"timed out",
        5 => c"peer lost",
        6 => c"protocol violation by a peer",
        7 => c"transport error",
        8 => c"bootstrap error",
        9 => c"configuration error",
        10 => c"communicator aborted",
        11 => c"internal error",
        12 => c"GPU or stream operation failed (CUDA missing or a CUDA call failed)",
        _ => c"unknown m2n result code",
    };
    s.as_ptr()
}

/// Fills `config` (of `size` bytes, i.e. sizeof(m2n_config_t)) with the
/// defaults, `apply_env` on.
#[no_mangle]
pub extern "C" fn m2n_config_init(config: *mut m2n_config_t, size: usize) -> m2n_result_t {
    guard(|| {
        if size != std::mem::size_of::<m2n_config_t>() {
            return Err(invalid(format!(
                "m2n_config_t of {size} bytes; this library's is {} bytes (header and library differ?)",
                std::mem::size_of::<m2n_config_t>()
            )));
        }
        let d = Config::default();
        put(
            config,
            "config",
            m2n_config_t {
                size,
                version: M2N_CONFIG_VERSION,
                transport: m2n_transport_t::M2N_TRANSPORT_AUTO as u32,
                dispatch_depth: d.dispatch.depth as u32,
                combine_depth: d.combine.depth as u32,
                dispatch_slot_bytes: d.dispatch.slot_bytes as u64,
                combine_slot_bytes: d.combine.slot_bytes as u64,
                peer_timeout_ms: d.peer_timeout.as_millis() as u32,
                bootstrap_timeout_ms: d.bootstrap_timeout.as_millis() as u32,
                apply_env: 1,
            },
        )?;
        Ok(m2n_result_t::M2N_SUCCESS)
    })
}

fn write_uid(out: *mut m2n_unique_id_t, uid: &UniqueId) -> Result<(), Failure> {
    let text = uid.to_string();
    let mut id = m2n_unique_id_t {
        internal: [0; M2N_UNIQUE_ID_BYTES],
    };
    if text.len() >= M2N_UNIQUE_ID_BYTES {
        return Err(invalid(format!(
            "unique id {text:?} does not fit in {M2N_UNIQUE_ID_BYTES} bytes"
        )));
    }
    for (d, s) in id.internal.iter_mut().zip(text.bytes()) {
        *d = s as c_char;
    }
    put(out, "unique id", id)
}

fn read_uid(id: *const m2n_unique_id_t) -> Result<UniqueId, Failure> {
    if id.is_null() {
        return Err(invalid("unique id is NULL"));
    }
    // SAFETY: non-null and points to an m2n_unique_id_t (API contract).
    let raw = unsafe { &(*id).internal };
    let bytes: Vec<u8> = raw
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    if bytes.len() == M2N_UNIQUE_ID_BYTES {
        return Err(invalid("unique id is not NUL-terminated"));
    }
    String::from_utf8_lossy(&bytes).parse().map_err(invalid)
}

/// Creates a unique id and serves its rendezvous from a background thread
/// of this process (as ncclGetUniqueId does). The root listens on
/// M2N_BOOTSTRAP_ADDR (ip:port), by default 127.0.0.1 on a free port.
#[no_mangle]
pub extern "C" fn m2n_get_unique_id(id: *mut m2n_unique_id_t) -> m2n_result_t {
    guard(|| {
        if id.is_null() {
            return Err(invalid("unique id is NULL"));
        }
        let cfg = Config::from_env().map_err(|e| map_err(e.into()))?;
        let addr_text =
            std::env::var("M2N_BOOTSTRAP_ADDR").unwrap_or_else(|_| "127.0.0.1:0".into());
        let addr = addr_text.parse().map_err(|e| {
            (
                m2n_result_t::M2N_ERR_CONFIG,
                format!("M2N_BOOTSTRAP_ADDR={addr_text:?}: {e}"),
            )
        })?;
        let root = Root::bind(addr).map_err(|e| map_err(e.into()))?;
        write_uid(id, root.unique_id())?;
        // The root thread ends when the group has formed or timed out.
        drop(root.spawn(cfg.bootstrap_timeout));
        Ok(m2n_result_t::M2N_SUCCESS)
    })
}

/// Parses a unique id from its text form (as printed by a launcher).
#[no_mangle]
pub extern "C" fn m2n_unique_id_from_string(
    text: *const c_char,
    id: *mut m2n_unique_id_t,
) -> m2n_result_t {
    guard(|| {
        if text.is_null() {
            return Err(invalid("text is NULL"));
        }
        // SAFETY: non-null NUL-terminated string (API contract).
        let s = unsafe { CStr::from_ptr(text) }.to_string_lossy();
        let uid: UniqueId = s.parse().map_err(invalid)?;
        write_uid(id, &uid)?;
        Ok(m2n_result_t::M2N_SUCCESS)
    })
}

/// The detail of the last failure on `comm`, or of the calling thread's
/// last failure when `comm` is NULL (e.g. after m2n_comm_init failed).
/// Valid until the next call on the same communicator or thread.
#[no_mangle]
pub extern "C" fn m2n_comm_get_last_error(comm: *const m2n_comm_t) -> *const c_char {
    let from_comm = catch_unwind(|| {
        if comm.is_null() {
            return None;
        }
        let c = lookup_comm(comm).ok()?;
        let st = c.lock().unwrap_or_else(|p| p.into_inner());
        Some(st.last_error.as_ptr())
    });
    match from_comm {
        Ok(Some(p)) => p,
        _ => LAST_ERROR.with(|e| e.borrow().as_ptr()),
    }
}

// ---------------------------------------------------------------------------
// Communicators
// ---------------------------------------------------------------------------

fn config_from(cfg: *const m2n_config_t) -> Result<Config, Failure> {
    if cfg.is_null() {
        return Config::from_env().map_err(|e| map_err(e.into()));
    }
    // Read the leading size and version before trusting the rest.
    // SAFETY: non-null; every config starts with size_t size, uint32_t version.
    let (size, version) = unsafe { ((*cfg).size, (*cfg).version) };
    if size != std::mem::size_of::<m2n_config_t>() || version != M2N_CONFIG_VERSION {
        return Err(invalid(format!(
            "config of {size} bytes, version {version}; this library takes {} bytes, version {M2N_CONFIG_VERSION} (use m2n_config_init)",
            std::mem::size_of::<m2n_config_t>()
        )));
    }
    // SAFETY: size and version match this library's layout.
    let c = unsafe { *cfg };
    let transport = match c.transport {
        0 => TransportKind::Auto,
        1 => TransportKind::Shm,
        2 => TransportKind::Tcp,
        3 => TransportKind::Verbs,
        4 => TransportKind::CudaIpc,
        5 => TransportKind::Fabric,
        t => {
            return Err((
                m2n_result_t::M2N_ERR_CONFIG,
                format!("config.transport {t} is not an m2n_transport_t"),
            ))
        }
    };
    let bytes = |v: u64, name: &str| {
        usize::try_from(v).map_err(|_| invalid(format!("{name} {v} too large")))
    };
    let mut out = Config {
        transport,
        dispatch: m2n_rs::ChannelConfig {
            depth: c.dispatch_depth as usize,
            slot_bytes: bytes(c.dispatch_slot_bytes, "dispatch_slot_bytes")?,
        },
        combine: m2n_rs::ChannelConfig {
            depth: c.combine_depth as usize,
            slot_bytes: bytes(c.combine_slot_bytes, "combine_slot_bytes")?,
        },
        peer_timeout: Duration::from_millis(u64::from(c.peer_timeout_ms)),
        bootstrap_timeout: Duration::from_millis(u64::from(c.bootstrap_timeout_ms)),
        ..Config::default()
    };
    if out.heartbeat_interval >= out.peer_timeout {
        out.heartbeat_interval = out.peer_timeout / 5;
    }
    if c.apply_env != 0 {
        out.apply_env(std::env::vars())
            .map_err(|e| map_err(e.into()))?;
    }
    out.validate().map_err(|e| map_err(e.into()))?;
    Ok(out)
}

/// Joins the group of `id` as `role` (an m2n_role_t) `rank` of
/// `n_attention` x `n_experts`; blocks until every rank has joined or the
/// bootstrap timeout. `config` may be NULL (defaults plus M2N_* variables).
#[no_mangle]
pub extern "C" fn m2n_comm_init(
    comm: *mut *mut m2n_comm_t,
    role: c_int,
    rank: c_int,
    n_attention: c_int,
    n_experts: c_int,
    id: *const m2n_unique_id_t,
    config: *const m2n_config_t,
) -> m2n_result_t {
    guard(|| {
        if comm.is_null() {
            return Err(invalid("comm (the output handle) is NULL"));
        }
        let role = match role {
            0 => Role::Attention,
            1 => Role::Expert,
            r => {
                return Err(invalid(format!(
                    "role {r} is not M2N_ROLE_ATTENTION (0) or M2N_ROLE_EXPERT (1)"
                )))
            }
        };
        let count = |v: c_int, what: &str| {
            usize::try_from(v).map_err(|_| invalid(format!("{what} {v} is negative")))
        };
        let (rank, m, n) = (
            count(rank, "rank")?,
            count(n_attention, "n_attention")?,
            count(n_experts, "n_experts")?,
        );
        let uid = read_uid(id)?;
        let cfg = config_from(config)?;
        let c = Communicator::init(cfg, role, rank, Shape::new(m, n), &uid).map_err(map_err)?;
        let handle = insert_comm(CommState {
            comm: c,
            mems: Default::default(),
            rounds: Default::default(),
            stream_rounds: Default::default(),
            proxy: None,
            last_error: CString::default(),
            aborted: false,
        });
        put(comm, "comm", handle)?;
        Ok(m2n_result_t::M2N_SUCCESS)
    })
}

/// Aborts: peers see this rank as lost at once; every later call on `comm`
/// except m2n_comm_destroy (and m2n_comm_abort again, which is harmless)
/// returns M2N_ERR_ABORTED.
#[no_mangle]
pub extern "C" fn m2n_comm_abort(comm: *mut m2n_comm_t) -> m2n_result_t {
    with_comm(comm, |st| {
        st.comm.abort();
        st.aborted = true;
        st.rounds.clear();
        st.stream_rounds.clear();
        Ok(m2n_result_t::M2N_SUCCESS)
    })
}

/// Frees the communicator and everything registered with it. Received
/// rounds' data pointers become invalid.
#[no_mangle]
pub extern "C" fn m2n_comm_destroy(comm: *mut m2n_comm_t) -> m2n_result_t {
    guard(|| {
        lookup_comm(comm)?;
        if let Some(c) = remove_comm(comm) {
            // The proxy thread holds the communicator too: stop it first
            // (without holding the lock it needs to finish).
            let proxy = c.lock().unwrap_or_else(|p| p.into_inner()).proxy.take();
            drop(proxy);
        }
        Ok(m2n_result_t::M2N_SUCCESS)
    })
}

/// Moves whatever can move now (sends, credits, arrivals). Never blocks.
#[no_mangle]
pub extern "C" fn m2n_progress(comm: *mut m2n_comm_t) -> m2n_result_t {
    with_comm(comm, |st| {
        st.comm.progress().map_err(map_err)?;
        Ok(m2n_result_t::M2N_SUCCESS)
    })
}

// ---------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------

/// Allocates `size` bytes of registered memory; `*ptr` is where to write.
#[no_mangle]
pub extern "C" fn m2n_mem_alloc(
    comm: *mut m2n_comm_t,
    size: usize,
    mem: *mut *mut m2n_mem_t,
    ptr: *mut *mut c_void,
) -> m2n_result_t {
    with_comm(comm, |st| {
        not_aborted(st)?;
        if mem.is_null() || ptr.is_null() {
            return Err(invalid("mem or ptr is NULL"));
        }
        let region = st.comm.alloc(size).map_err(map_err)?;
        let key = st.key();
        put(ptr, "ptr", region.as_ptr().cast::<c_void>())?;
        put(mem, "mem", key as *mut m2n_mem_t)?;
        st.mems.insert(key, region);
        Ok(m2n_result_t::M2N_SUCCESS)
    })
}

/// Gives a registered region a buffer handle.
fn hand_out_mem(
    st: &mut CommState,
    region: m2n_rs::Region,
    mem: *mut *mut m2n_mem_t,
) -> Result<m2n_result_t, Failure> {
    let key = st.key();
    put(mem, "mem", key as *mut m2n_mem_t)?;
    st.mems.insert(key, region);
    Ok(m2n_result_t::M2N_SUCCESS)
}

/// Registers application memory (e.g. a tensor) as a zero-copy source of
/// messages. It must stay valid until m2n_dereg_mem and until every round
/// sent from it is sent (m2n_test_send / m2n_wait_send).
#[no_mangle]
pub extern "C" fn m2n_reg_mem(
    comm: *mut m2n_comm_t,
    ptr: *mut c_void,
    size: usize,
    mem: *mut *mut m2n_mem_t,
) -> m2n_result_t {
    with_comm(comm, |st| {
        not_aborted(st)?;
        if mem.is_null() {
            return Err(invalid("mem is NULL"));
        }
        if ptr.is_null() && size > 0 {
            return Err(invalid("ptr is NULL"));
        }
        // SAFETY: the caller keeps the memory valid while registered (documented).
        let region = unsafe { st.comm.register(ptr.cast(), size) }.map_err(map_err)?;
        hand_out_mem(st, region, mem)
    })
}

/// Registers GPU memory (a CUDA device pointer of this process) as a
/// source of messages: zero-copy over verbs (GPUDirect RDMA through
/// dma-buf, the peer-memory module as fallback) and cuda-ipc; over shm and
/// tcp through a pinned host stage that each send copies into first. Same
/// lifetime rules as m2n_reg_mem.
#[no_mangle]
pub extern "C" fn m2n_reg_mem_device(
    comm: *mut m2n_comm_t,
    dptr: *mut c_void,
    size: usize,
    mem: *mut *mut m2n_mem_t,
) -> m2n_result_t {
    with_comm(comm, |st| {
        not_aborted(st)?;
        if mem.is_null() {
            return Err(invalid("mem is NULL"));
        }
        if dptr.is_null() {
            return Err(invalid("dptr is NULL"));
        }
        #[cfg(feature = "cuda")]
        {
            // SAFETY: the caller keeps the memory valid while registered.
            let region = unsafe { st.comm.register_gpu(dptr as u64, size) }.map_err(map_err)?;
            hand_out_mem(st, region, mem)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = size;
            Err((
                m2n_result_t::M2N_ERR_TRANSPORT,
                "this libm2n was built without CUDA support (cargo feature `cuda` of m2n-ffi)"
                    .into(),
            ))
        }
    })
}

/// Deregisters (and, if allocated by m2n_mem_alloc, frees) a buffer.
#[no_mangle]
pub extern "C" fn m2n_dereg_mem(comm: *mut m2n_comm_t, mem: *mut m2n_mem_t) -> m2n_result_t {
    with_comm(comm, |st| {
        not_aborted(st)?;
        st.mems
            .remove(&mem_key(mem))
            .ok_or_else(|| usage(format!("{mem:p} is not a live buffer of this communicator")))?;
        Ok(m2n_result_t::M2N_SUCCESS)
    })
}

// ---------------------------------------------------------------------------
// Rounds
// ---------------------------------------------------------------------------

fn send_channel(c: &mut Communicator) -> m2n_rs::Channel<'_> {
    match c.role() {
        Role::Attention => c.dispatch(),
        Role::Expert => c.combine(),
    }
}

fn recv_channel(c: &mut Communicator) -> m2n_rs::Channel<'_> {
    match c.role() {
        Role::Attention => c.combine(),
        Role::Expert => c.dispatch(),
    }
}

/// The messages of a round, checked against this communicator's buffers.
fn messages<'a>(
    raw: &[m2n_msg_t],
    mems: &'a std::collections::HashMap<usize, m2n_rs::Region>,
) -> Result<Vec<Msg<'a>>, Failure> {
    let mut list = Vec::with_capacity(raw.len());
    for (i, m) in raw.iter().enumerate() {
        if m.mem.is_null() {
            if m.len != 0 {
                return Err(invalid(format!(
                    "msgs[{i}] has no buffer but {} bytes",
                    m.len
                )));
            }
            list.push(Msg::EMPTY);
            continue;
        }
        let region = mems.get(&mem_key(m.mem)).ok_or_else(|| {
            usage(format!(
                "msgs[{i}].mem {:p} is not a live buffer of this communicator",
                m.mem
            ))
        })?;
        list.push(Msg::new(region, m.offset, m.len));
    }
    Ok(list)
}

/// `count` messages at `msgs` (NULL allowed when there are none).
fn msg_array<'a>(msgs: *const m2n_msg_t, count: c_int) -> Result<&'a [m2n_msg_t], Failure> {
    if msgs.is_null() && count != 0 {
        return Err(invalid("msgs is NULL"));
    }
    let count =
        usize::try_from(count).map_err(|_| invalid(format!("count {count} is negative")))?;
    Ok(if count == 0 {
        &[][..]
    } else {
        // SAFETY: non-null array of `count` messages (API contract).
        unsafe { std::slice::from_raw_parts(msgs, count) }
    })
}

/// Posts this rank's next round on the channel it sends on (dispatch for
/// attention, combine for experts): `msgs[r]` goes to receiver `r`, and
/// `count` must equal the number of receivers. Waits up to `timeout_ms`
/// for credit (0: not at all, M2N_AGAIN if the window is full). Returns
/// without waiting for the data to leave; the buffers must not change until
/// m2n_test_send / m2n_wait_send say the round is sent.
#[no_mangle]
pub extern "C" fn m2n_send(
    comm: *mut m2n_comm_t,
    msgs: *const m2n_msg_t,
    count: c_int,
    timeout_ms: c_int,
    round: *mut u64,
) -> m2n_result_t {
    with_comm(comm, |st| {
        not_aborted(st)?;
        let raw = msg_array(msgs, count)?;
        if round.is_null() {
            return Err(invalid("round is NULL"));
        }
        let CommState { comm, mems, .. } = st;
        let list = messages(raw, mems)?;
        let mut ch = send_channel(comm);
        let posted = if timeout_ms == 0 {
            ch.try_send(&list).map_err(map_err)?
        } else {
            Some(ch.send(&list, timeout(timeout_ms)).map_err(map_err)?)
        };
        match posted {
            Some(r) => {
                put(round, "round", r)?;
                Ok(m2n_result_t::M2N_SUCCESS)
            }
            None => Ok(m2n_result_t::M2N_AGAIN),
        }
    })
}

/// Sets `*done` to 1 when every write of `round` has left its buffers.
#[no_mangle]
pub extern "C" fn m2n_test_send(
    comm: *mut m2n_comm_t,
    round: u64,
    done: *mut c_int,
) -> m2n_result_t {
    with_comm(comm, |st| {
        not_aborted(st)?;
        let sent = send_channel(&mut st.comm).is_sent(round).map_err(map_err)?;
        put(done, "done", c_int::from(sent))?;
        Ok(m2n_result_t::M2N_SUCCESS)
    })
}

/// Waits up to `timeout_ms` (negative: no limit) until `round` is sent.
#[no_mangle]
pub extern "C" fn m2n_wait_send(
    comm: *mut m2n_comm_t,
    round: u64,
    timeout_ms: c_int,
) -> m2n_result_t {
    with_comm(comm, |st| {
        not_aborted(st)?;
        send_channel(&mut st.comm)
            .wait_sent(round, timeout(timeout_ms))
            .map_err(map_err)?;
        Ok(m2n_result_t::M2N_SUCCESS)
    })
}

fn hand_out(
    st: &mut CommState,
    r: m2n_rs::RecvRound,
    out: *mut *mut m2n_round_t,
) -> Result<(), Failure> {
    let key = st.key();
    st.rounds.insert(key, r);
    put(out, "round", key as *mut m2n_round_t)
}

/// The next complete round on the channel this rank receives on, or
/// `*round = NULL` (and M2N_AGAIN) when none is complete yet.
#[no_mangle]
pub extern "C" fn m2n_test_recv(
    comm: *mut m2n_comm_t,
    round: *mut *mut m2n_round_t,
) -> m2n_result_t {
    with_comm(comm, |st| {
        not_aborted(st)?;
        if round.is_null() {
            return Err(invalid("round is NULL"));
        }
        match recv_channel(&mut st.comm).try_recv().map_err(map_err)? {
            Some(r) => {
                hand_out(st, r, round)?;
                Ok(m2n_result_t::M2N_SUCCESS)
            }
            None => {
                put(round, "round", std::ptr::null_mut())?;
                Ok(m2n_result_t::M2N_AGAIN)
            }
        }
    })
}

/// Waits up to `timeout_ms` (negative: no limit) for the next complete round.
#[no_mangle]
pub extern "C" fn m2n_wait_recv(
    comm: *mut m2n_comm_t,
    timeout_ms: c_int,
    round: *mut *mut m2n_round_t,
) -> m2n_result_t {
    with_comm(comm, |st| {
        not_aborted(st)?;
        if round.is_null() {
            return Err(invalid("round is NULL"));
        }
        let r = recv_channel(&mut st.comm)
            .recv(timeout(timeout_ms))
            .map_err(map_err)?;
        hand_out(st, r, round)?;
        Ok(m2n_result_t::M2N_SUCCESS)
    })
}

/// The number of a received round (0, 1, 2, ... per channel).
#[no_mangle]
pub extern "C" fn m2n_round_number(
    comm: *mut m2n_comm_t,
    round: *const m2n_round_t,
    number: *mut u64,
) -> m2n_result_t {
    with_comm(comm, |st| {
        not_aborted(st)?;
        let key = round_key(round);
        let n = match (st.rounds.get(&key), st.stream_rounds.get(&key)) {
            (Some(r), _) => r.round(),
            (None, Some(r)) => r.round(),
            (None, None) => {
                return Err(usage(format!(
                    "{round:p} is not a live round of this communicator"
                )))
            }
        };
        put(number, "number", n)?;
        Ok(m2n_result_t::M2N_SUCCESS)
    })
}

/// Zero-copy access to `sender`'s message in a received round: `*data`
/// points into m2n's receive ring and stays valid until the round is
/// released (a device address when the ring is GPU memory: cuda-ipc).
/// For a round from m2n_recv_stream, `*data` is the address work on the
/// stream reads, and `*len` the message's length once the round is in
/// (before: M2N_AGAIN, and `*len` is the slot size, the most it can be).
#[no_mangle]
pub extern "C" fn m2n_round_data(
    comm: *mut m2n_comm_t,
    round: *const m2n_round_t,
    sender: c_int,
    data: *mut *const c_void,
    len: *mut usize,
) -> m2n_result_t {
    with_comm(comm, |st| {
        not_aborted(st)?;
        if let Some(r) = st.stream_rounds.get(&round_key(round)) {
            return stream_round_data(&st.comm, r, sender, data, len);
        }
        let r = st.rounds.get(&round_key(round)).ok_or_else(|| {
            usage(format!(
                "{round:p} is not a live round of this communicator"
            ))
        })?;
        let senders = r.lens().len();
        let s = usize::try_from(sender)
            .ok()
            .filter(|&s| s < senders)
            .ok_or_else(|| invalid(format!("sender {sender} is outside 0..{senders}")))?;
        // A device address when the ring is GPU memory (cuda-ipc).
        let (addr, n) = st.comm.message_addr(r, s);
        put(data, "data", addr as *const c_void)?;
        put(len, "len", n)?;
        Ok(m2n_result_t::M2N_SUCCESS)
    })
}

/// Hands a round back: its slots return to the senders as credit, and the
/// round handle and its data pointers become invalid.
#[no_mangle]
pub extern "C" fn m2n_round_release(
    comm: *mut m2n_comm_t,
    round: *mut m2n_round_t,
) -> m2n_result_t {
    with_comm(comm, |st| {
        not_aborted(st)?;
        if st.stream_rounds.contains_key(&round_key(round)) {
            return Err(usage(format!(
                "{round:p} came from m2n_recv_stream: release it with m2n_round_release_stream"
            )));
        }
        let r = st.rounds.remove(&round_key(round)).ok_or_else(|| {
            usage(format!(
                "{round:p} is not a live round of this communicator (released twice?)"
            ))
        })?;
        recv_channel(&mut st.comm).release(r).map_err(map_err)?;
        Ok(m2n_result_t::M2N_SUCCESS)
    })
}

// ---------------------------------------------------------------------------
// Stream-ordered calls (CUDA streams)
// ---------------------------------------------------------------------------

/// The caller's `cudaStream_t` (a `CUstream`; NULL: the legacy default
/// stream of the calling thread's current context).
#[cfg(feature = "cuda")]
fn cuda_stream(stream: *mut c_void) -> Result<m2n_rs::stream::CudaStream, Failure> {
    // SAFETY: the API contract: a live stream that outlives the operations.
    unsafe { m2n_rs::stream::CudaStream::from_raw(stream) }.map_err(|e| map_err(e.into()))
}

/// Without CUDA there is no stream to wrap (the type only fills the slot).
#[cfg(not(feature = "cuda"))]
fn cuda_stream(_stream: *mut c_void) -> Result<m2n_rs::stream::HostStream, Failure> {
    Err((
        m2n_result_t::M2N_ERR_STREAM,
        "this libm2n was built without CUDA support (cargo feature `cuda` of m2n-ffi)".into(),
    ))
}

/// Enqueues this rank's next round on `stream` (a `cudaStream_t`): its
/// writes are posted once the work enqueued on `stream` before this call
/// is done, and work enqueued after it waits until the data have left the
/// buffers. No kernel is launched: the stream waits on a flag in pinned
/// host memory (cuStreamWaitValue32) that m2n_progress, a blocking call on
/// `comm` or the proxy thread (m2n_comm_start_proxy) sets. `*round` is the
/// round's number. Operations of one side must be enqueued on one stream
/// (or on streams the caller orders).
#[no_mangle]
pub extern "C" fn m2n_send_stream(
    comm: *mut m2n_comm_t,
    msgs: *const m2n_msg_t,
    count: c_int,
    stream: *mut c_void,
    round: *mut u64,
) -> m2n_result_t {
    with_comm(comm, |st| {
        not_aborted(st)?;
        let raw = msg_array(msgs, count)?;
        if round.is_null() {
            return Err(invalid("round is NULL"));
        }
        let s = cuda_stream(stream)?;
        let CommState { comm, mems, .. } = st;
        let list = messages(raw, mems)?;
        let r = send_channel(comm)
            .send_on_stream(&list, &s)
            .map_err(map_err)?;
        put(round, "round", r)?;
        Ok(m2n_result_t::M2N_SUCCESS)
    })
}

/// Enqueues a receive of the next round on `stream`: work enqueued after
/// it waits until every sender's message is in and visible to the GPU.
/// `*round` is a handle at once: m2n_round_data gives each message's
/// device address (and its length once the round is in; M2N_AGAIN
/// before). Release it with m2n_round_release_stream.
#[no_mangle]
pub extern "C" fn m2n_recv_stream(
    comm: *mut m2n_comm_t,
    stream: *mut c_void,
    round: *mut *mut m2n_round_t,
) -> m2n_result_t {
    with_comm(comm, |st| {
        not_aborted(st)?;
        if round.is_null() {
            return Err(invalid("round is NULL"));
        }
        let s = cuda_stream(stream)?;
        let r = recv_channel(&mut st.comm)
            .recv_on_stream(&s)
            .map_err(map_err)?;
        let key = st.key();
        st.stream_rounds.insert(key, r);
        put(round, "round", key as *mut m2n_round_t)?;
        Ok(m2n_result_t::M2N_SUCCESS)
    })
}

/// Enqueues the release of a round from m2n_recv_stream on `stream`: once
/// the work enqueued before it is done, its slots return to the senders.
/// The handle is invalid after this call.
#[no_mangle]
pub extern "C" fn m2n_round_release_stream(
    comm: *mut m2n_comm_t,
    round: *mut m2n_round_t,
    stream: *mut c_void,
) -> m2n_result_t {
    with_comm(comm, |st| {
        not_aborted(st)?;
        let key = round_key(round);
        if !st.stream_rounds.contains_key(&key) {
            return Err(usage(format!(
                "{round:p} is not a live round from m2n_recv_stream of this communicator"
            )));
        }
        let s = cuda_stream(stream)?;
        let r = st.stream_rounds.remove(&key).expect("checked");
        recv_channel(&mut st.comm)
            .release_on_stream(r, &s)
            .map_err(map_err)?;
        Ok(m2n_result_t::M2N_SUCCESS)
    })
}

/// The channel of `side` (an m2n_side_t) of this communicator.
fn side_channel(c: &mut Communicator, side: c_int) -> Result<m2n_rs::Channel<'_>, Failure> {
    match side {
        0 => Ok(send_channel(c)),
        1 => Ok(recv_channel(c)),
        s => Err(invalid(format!(
            "side {s} is not M2N_SIDE_SEND (0) or M2N_SIDE_RECV (1)"
        ))),
    }
}

/// Sets how `side`'s (an m2n_side_t) stream-ordered operations use their
/// flags: `mode` is an m2n_stream_mode_t. M2N_STREAM_GRAPH_SAFE makes
/// them replayable from a CUDA graph: capture them (cudaStreamBeginCapture
/// .. cudaStreamEndCapture) and launch the graph again and again; each
/// launch is the next round, with the messages, offsets and lengths given
/// at capture (a send carries what those bytes hold at launch). A capture
/// must cover a whole cycle of the ring: a multiple of the side's depth
/// steps (or depth recordings launched in rotation; at depth 1 one step
/// replays alone); a slot signalled out of turn is an error
/// (M2N_ERR_INVALID_USAGE from m2n_progress or the proxy thread).
/// In graph-safe mode the direct calls of that side (m2n_send,
/// m2n_test_recv, ...) are refused with M2N_ERR_INVALID_USAGE, and its
/// operations must run on one stream (or streams the caller orders).
/// Call it before the capture, with the stream the operations will use
/// (it allocates the flags and maps the receive ring): refused on a
/// stream that is capturing, and while operations of the other mode are
/// outstanding on this side. Setting the current mode again succeeds.
#[no_mangle]
pub extern "C" fn m2n_set_stream_mode(
    comm: *mut m2n_comm_t,
    side: c_int,
    mode: c_int,
    stream: *mut c_void,
) -> m2n_result_t {
    with_comm(comm, |st| {
        not_aborted(st)?;
        let mode = match mode {
            0 => m2n_rs::stream::StreamMode::Sequence,
            1 => m2n_rs::stream::StreamMode::GraphSafe,
            m => {
                return Err(invalid(format!(
                    "stream mode {m} is not M2N_STREAM_SEQUENCE (0) or M2N_STREAM_GRAPH_SAFE (1)"
                )))
            }
        };
        side_channel(&mut st.comm, side)?;
        let s = cuda_stream(stream)?;
        side_channel(&mut st.comm, side)?
            .set_stream_mode(mode, &s)
            .map_err(map_err)?;
        Ok(m2n_result_t::M2N_SUCCESS)
    })
}

/// `*mode` is `side`'s (an m2n_side_t) stream mode, an m2n_stream_mode_t
/// (M2N_STREAM_SEQUENCE until m2n_set_stream_mode changes it).
#[no_mangle]
pub extern "C" fn m2n_get_stream_mode(
    comm: *mut m2n_comm_t,
    side: c_int,
    mode: *mut c_int,
) -> m2n_result_t {
    with_comm(comm, |st| {
        not_aborted(st)?;
        let m = side_channel(&mut st.comm, side)?.stream_mode();
        let v = match m {
            m2n_rs::stream::StreamMode::Sequence => m2n_stream_mode_t::M2N_STREAM_SEQUENCE,
            m2n_rs::stream::StreamMode::GraphSafe => m2n_stream_mode_t::M2N_STREAM_GRAPH_SAFE,
        };
        put(mode, "mode", v as c_int)?;
        Ok(m2n_result_t::M2N_SUCCESS)
    })
}

fn stream_round_data(
    comm: &Communicator,
    r: &m2n_rs::stream::StreamRound,
    sender: c_int,
    data: *mut *const c_void,
    len: *mut usize,
) -> Result<m2n_result_t, Failure> {
    let lens = comm.stream_round_lens(r);
    let senders = comm.shape().side(match comm.role() {
        Role::Attention => Role::Expert,
        Role::Expert => Role::Attention,
    });
    let s = usize::try_from(sender)
        .ok()
        .filter(|&s| s < senders)
        .ok_or_else(|| invalid(format!("sender {sender} is outside 0..{senders}")))?;
    put(data, "data", r.message_addr(s) as *const c_void)?;
    match lens {
        Some(l) => {
            put(len, "len", l[s] as usize)?;
            Ok(m2n_result_t::M2N_SUCCESS)
        }
        None => {
            put(len, "len", r.slot_bytes())?;
            Ok(m2n_result_t::M2N_AGAIN)
        }
    }
}

fn drive(st: &mut CommState) -> m2n_rs::Result<bool> {
    st.comm.progress()
}

/// Starts a thread that drives `comm`'s progress engine (stream-ordered
/// calls need it when the application does not call m2n_progress). It
/// stops at m2n_comm_stop_proxy, m2n_comm_destroy, or the first failure
/// (which releases every waiting stream and is then reported by every call).
#[no_mangle]
pub extern "C" fn m2n_comm_start_proxy(comm: *mut m2n_comm_t) -> m2n_result_t {
    guard(|| {
        let c = lookup_comm(comm)?;
        let mut st = c.lock().unwrap_or_else(|p| p.into_inner());
        let started = (|| {
            not_aborted(&st)?;
            if st.proxy.as_ref().is_some_and(|p| p.is_running()) {
                return Err(usage("the proxy thread is already running"));
            }
            Ok(())
        })();
        if let Err(f) = started {
            st.last_error = CString::new(f.1.replace('\0', " ")).unwrap_or_default();
            return Err(f);
        }
        st.proxy = Some(m2n_rs::Proxy::spawn(c.clone(), drive));
        Ok(m2n_result_t::M2N_SUCCESS)
    })
}

/// Stops the proxy thread; returns the failure it stopped on, if any.
#[no_mangle]
pub extern "C" fn m2n_comm_stop_proxy(comm: *mut m2n_comm_t) -> m2n_result_t {
    guard(|| {
        let c = lookup_comm(comm)?;
        let proxy = c.lock().unwrap_or_else(|p| p.into_inner()).proxy.take();
        // Joined without the lock, which the thread needs to finish.
        let stopped = match proxy {
            Some(p) => p.stop().map_err(map_err),
            None => Err(usage("no proxy thread was started on this communicator")),
        };
        if let Err(f) = &stopped {
            let mut st = c.lock().unwrap_or_else(|p| p.into_inner());
            st.last_error = CString::new(f.1.replace('\0', " ")).unwrap_or_default();
        }
        stopped.map(|()| m2n_result_t::M2N_SUCCESS)
    })
}
