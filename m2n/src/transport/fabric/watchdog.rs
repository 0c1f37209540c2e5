//! A guard against libfabric calls that never return.
//!
//! m2n's liveness turns a dead or stopped peer into `PeerLost`, but only
//! between calls into the provider: a call that spins inside the provider
//! on something the peer held is out of its reach. libfabric 1.17's shm
//! provider is such a case: a sender takes the spinlock of the receiver's
//! shared region around each write, so a sender killed (or stopped) inside
//! that section leaves the receiver spinning in `fi_cq_read` and every other
//! sender to it in `fi_writemsg`, for ever. The watchdog turns that hang into
//! an exit with a message that says why, after `limit`.
//!
//! Cost on the calling thread: a load and a store of a counter it alone
//! writes, on entry and on exit, and a reference count taken and dropped.
//! The watchdog thread reads it a few times
//! per `limit`: the counter is odd while a call is inside, and a call that
//! is still inside with the same count `limit` later has not returned.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the watchdog does when a call has been inside for `limit`.
pub(super) type OnStuck = Box<dyn Fn(Duration) + Send>;

#[derive(Debug, Default)]
struct Shared {
    /// Odd while the owner is inside a call; bumped on entry and exit.
    calls: AtomicU64,
    stop: Mutex<bool>,
    wake: Condvar,
}

/// The guard of one transport's libfabric calls (see the module docs).
#[derive(Debug)]
pub(super) struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A call in progress; the call is over when this drops. It holds its own
/// reference, so the transport stays free to borrow itself mutably.
pub(super) struct Inside(Arc<Shared>);

impl Drop for Inside {
    fn drop(&mut self) {
        let c = self.0.calls.load(Ordering::Relaxed);
        self.0.calls.store(c + 1, Ordering::Release);
    }
}

impl Watchdog {
    /// Starts the watchdog thread, which calls `on_stuck` once a call has
    /// been inside for `limit` (checked every quarter of it).
    pub(super) fn start(limit: Duration, on_stuck: OnStuck) -> std::io::Result<Watchdog> {
        let shared = Arc::new(Shared::default());
        let watched = shared.clone();
        let tick = (limit / 4).max(Duration::from_millis(1));
        let thread = std::thread::Builder::new()
            .name("m2n-fi-watchdog".into())
            .spawn(move || {
                // The odd count seen inside, and for how long.
                let mut inside: Option<(u64, Duration)> = None;
                let mut stop = watched.stop.lock().unwrap_or_else(|e| e.into_inner());
                while !*stop {
                    let c = watched.calls.load(Ordering::Acquire);
                    inside = match inside {
                        _ if c.is_multiple_of(2) => None,
                        Some((seen, for_)) if seen == c => Some((c, for_ + tick)),
                        _ => Some((c, Duration::ZERO)),
                    };
                    if let Some((_, for_)) = inside {
                        if for_ >= limit {
                            on_stuck(for_);
                            inside = None;
                        }
                    }
                    stop = watched
                        .wake
                        .wait_timeout(stop, tick)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            })?;
        Ok(Watchdog {
            shared,
            thread: Some(thread),
        })
    }

    /// Marks a call into the provider as begun; it ends when the guard
    /// drops. Calls must not nest (the owner holds `&mut` to its transport,
    /// so only its entry points take a guard).
    #[inline]
    pub(super) fn enter(&self) -> Inside {
        let c = self.shared.calls.load(Ordering::Relaxed);
        debug_assert!(c.is_multiple_of(2), "nested watchdog guards");
        self.shared.calls.store(c + 1, Ordering::Release);
        Inside(self.shared.clone())
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        *self.shared.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn counting(limit: Duration) -> (Watchdog, Arc<AtomicUsize>) {
        let fired = Arc::new(AtomicUsize::new(0));
        let f = fired.clone();
        let on_stuck: OnStuck = Box::new(move |for_| {
            assert!(for_ >= limit);
            f.fetch_add(1, Ordering::SeqCst);
        });
        (Watchdog::start(limit, on_stuck).unwrap(), fired)
    }

    #[test]
    fn a_call_inside_past_the_limit_fires() {
        let (dog, fired) = counting(Duration::from_millis(40));
        let inside = dog.enter();
        std::thread::sleep(Duration::from_millis(300));
        assert!(fired.load(Ordering::SeqCst) >= 1);
        drop(inside);
    }

    #[test]
    fn calls_that_return_never_fire_however_long_the_run() {
        let (dog, fired) = counting(Duration::from_millis(200));
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(600) {
            let _inside = dog.enter();
            std::thread::sleep(Duration::from_millis(2));
        }
        // Idle (outside any call) for longer than the limit: no fire either.
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(fired.load(Ordering::SeqCst), 0);
    }
}
