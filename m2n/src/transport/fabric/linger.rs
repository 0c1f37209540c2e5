//! Peers in this process over shm. libfabric 1.17's shm provider reaches
//! an endpoint of its own process through that endpoint's own mapping of
//! its shared region (`smr_map_to_region` finds it by name in the
//! process's endpoint list), and closing the endpoint unmaps the region:
//! a peer in the same process that still writes to it, or answers a write
//! it made, then touches unmapped memory (SIGSEGV in `fi_writemsg`, seen
//! with ranks in threads of one Python process). Between processes each
//! keeps its own mapping, and a closed peer's region stays mapped for its
//! writers.
//!
//! So a transport that was linked to a peer in this process keeps its
//! endpoints (and the sources of writes still in flight, which a receiver
//! over shm may read after the post) open past its close, parked here,
//! until none of the transports it was linked to is open; then they close.
//! A process that exits with some parked leaves their files to the
//! provider's own clean-up at exit.

use std::sync::Mutex;

/// The transports of this process over shm, by the stem of their
/// endpoints' names (`m2n-PID-TOKEN`, unique to each transport).
struct Registry {
    /// Those not closed yet.
    open: Vec<String>,
    /// Pairs linked (one connected to the other), each once.
    links: Vec<(String, String)>,
    /// The endpoints of closed transports that are still linked to an
    /// open one.
    parked: Vec<(String, Box<dyn Send>)>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    open: Vec::new(),
    links: Vec::new(),
    parked: Vec::new(),
});

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    // Nothing here panics while holding the lock; a poisoned one is still
    // consistent.
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// Whether `stem` is linked to a transport still open.
    fn held(&self, stem: &str) -> bool {
        self.links.iter().any(|(a, b)| {
            (a == stem && self.open.contains(b)) || (b == stem && self.open.contains(a))
        })
    }
}

/// A transport over shm was opened.
pub(super) fn opened(stem: &str) {
    registry().open.push(stem.to_string());
}

/// Transport `stem` connected to `peer`, a transport of this process.
pub(super) fn linked(stem: &str, peer: &str) {
    let mut r = registry();
    let known = r
        .links
        .iter()
        .any(|(a, b)| (a == stem && b == peer) || (a == peer && b == stem));
    if !known {
        r.links.push((stem.to_string(), peer.to_string()));
    }
}

/// Transport `stem` closed, leaving `endpoints` (its libfabric endpoints
/// and whatever must outlive them): they are dropped now, or parked while
/// a transport it was linked to is open. Endpoints parked before that are
/// no longer held are dropped too (after the registry's lock is let go:
/// closing them calls into the provider).
pub(super) fn closed(stem: &str, endpoints: Box<dyn Send>) {
    let released = {
        let mut r = registry();
        r.open.retain(|s| s != stem);
        r.parked.push((stem.to_string(), endpoints));
        let (held, free): (Vec<_>, Vec<_>) = std::mem::take(&mut r.parked)
            .into_iter()
            .partition(|(s, _)| r.held(s));
        r.parked = held;
        // A released transport links nobody any more.
        r.links
            .retain(|(a, b)| !free.iter().any(|(s, _)| s == a || s == b));
        free
    };
    drop(released);
}

/// Whether transport `stem`'s endpoints are parked (for tests).
#[cfg(test)]
pub(super) fn parked(stem: &str) -> bool {
    registry().parked.iter().any(|(s, _)| s == stem)
}
