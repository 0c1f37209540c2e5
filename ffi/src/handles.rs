//! Handles: opaque pointers that are keys into registries, so a NULL,
//! freed or foreign pointer is an error code, never a dereference.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use m2n_rs::stream::StreamRound;
use m2n_rs::Proxy;
use m2n_rs::{Communicator, RecvRound, Region};

use crate::types::{m2n_comm_t, m2n_mem_t, m2n_result_t, m2n_round_t};

/// Everything behind one m2n_comm_t.
pub(crate) struct CommState {
    pub comm: Communicator,
    pub mems: HashMap<usize, Region>,
    pub rounds: HashMap<usize, RecvRound>,
    /// Rounds handed out by stream-ordered receives, until released on a stream.
    pub stream_rounds: HashMap<usize, StreamRound>,
    /// The proxy thread driving this communicator, if started.
    pub proxy: Option<Proxy<CommState>>,
    pub last_error: CString,
    pub aborted: bool,
}

impl CommState {
    /// A fresh buffer or round handle value: never 0, never repeated, and
    /// unique across communicators, so another communicator's handle is
    /// refused rather than taken for one of this communicator's.
    pub fn key(&mut self) -> usize {
        // Keys look like aligned pointers.
        NEXT_KEY.fetch_add(1, std::sync::atomic::Ordering::Relaxed) << 4
    }
}

pub(crate) type Comm = Arc<Mutex<CommState>>;

fn registry() -> MutexGuard<'static, HashMap<usize, Comm>> {
    static COMMS: OnceLock<Mutex<HashMap<usize, Comm>>> = OnceLock::new();
    COMMS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// One counter for every handle (communicators, buffers, rounds), so no
/// handle of one kind or communicator ever equals another's.
static NEXT_KEY: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

pub(crate) fn insert_comm(state: CommState) -> *mut m2n_comm_t {
    let key = NEXT_KEY.fetch_add(1, std::sync::atomic::Ordering::Relaxed) << 4;
    registry().insert(key, Arc::new(Mutex::new(state)));
    key as *mut m2n_comm_t
}

pub(crate) fn lookup_comm(handle: *const m2n_comm_t) -> Result<Comm, (m2n_result_t, String)> {
    if handle.is_null() {
        return Err((
            m2n_result_t::M2N_ERR_INVALID_ARGUMENT,
            "communicator is NULL".into(),
        ));
    }
    registry().get(&(handle as usize)).cloned().ok_or_else(|| {
        (
            m2n_result_t::M2N_ERR_INVALID_USAGE,
            format!("{handle:p} is not a live communicator (destroyed, or never created)"),
        )
    })
}

pub(crate) fn remove_comm(handle: *const m2n_comm_t) -> Option<Comm> {
    registry().remove(&(handle as usize))
}

pub(crate) fn mem_key(mem: *const m2n_mem_t) -> usize {
    mem as usize
}

pub(crate) fn round_key(round: *const m2n_round_t) -> usize {
    round as usize
}
