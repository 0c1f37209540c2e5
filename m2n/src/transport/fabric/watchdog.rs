//! A guard against libfabric calls that never return.
//!
//! m2n's liveness turns a dead or stopped peer into `PeerLost`, but only
//! between calls into the provider: a call that spins inside the provider
//! on something the peer held is out of its reach. libfabric 1.17's shm
//! provider is such a case: a sender takes the spinlock of the receiver's
//! shared region around each write, so a sender killed (or stopped) inside
//! that section leaves the receiver spinning in `fi_cq_read` and every other
//! sender to it in `fi_writemsg`, for ever.
//!
//! The watchdog breaks such a call off after `limit`: it sends the calling
//! thread the escape signal ([`escape_signal`]), whose handler jumps back to
//! where the libfabric call began (`fabric-sys/src/escape.c`; each call is
//! made through `fi::guarded`). The call then fails as broken off, and the
//! transport, its provider's state abandoned mid-call, refuses every later
//! call, so m2n reports the dead peer as lost like any other. A call still
//! inside another `limit` later (the signal was taken by a handler someone
//! installed after m2n's, or the thread was outside a guarded call) is
//! ended the old way: `on_stuck` (the transport exits the process with a
//! message that says why).
//!
//! Cost on the calling thread: a load and a store of a counter it alone
//! writes, on entry and on exit, and a store of its thread id (no locked
//! instruction). The watchdog thread reads the counter a few
//! times per `limit`: the counter is odd while a call is inside, and a call
//! that is still inside with the same count `limit` later has not returned.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the watchdog does when a call is still inside `limit` after it
/// was sent the escape signal.
pub(super) type OnStuck = Box<dyn Fn(Duration) + Send>;

/// The signal that breaks a guarded libfabric call off (`SIGRTMAX - 4`),
/// its handler installed on first use; an error if it cannot be.
pub(super) fn escape_signal() -> Result<libc::c_int, String> {
    static SIGNAL: OnceLock<Result<libc::c_int, String>> = OnceLock::new();
    SIGNAL
        .get_or_init(|| {
            let signo = libc::SIGRTMAX() - 4;
            // SAFETY: installs a handler that only jumps back into a guarded
            // call on the thread it interrupts, or passes the signal on.
            match unsafe { m2n_fabric_sys::m2n_fi_escape_install(signo) } {
                0 => Ok(signo),
                errno => Err(format!(
                    "installing the handler of signal {signo}: {}",
                    std::io::Error::from_raw_os_error(errno)
                )),
            }
        })
        .clone()
}

#[derive(Debug, Default)]
struct Shared {
    /// Odd while the owner is inside a call; bumped on entry and exit.
    calls: AtomicU64,
    /// The `pthread_t` of the thread inside the call (set on entry).
    thread: AtomicU64,
    stop: Mutex<bool>,
    wake: Condvar,
}

/// The guard of one transport's libfabric calls (see the module docs).
#[derive(Debug)]
pub(super) struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A call in progress; the call is over when this drops. A borrow, not a
/// reference count: a locked increment and decrement per call cost a
/// busy-polling loop about a tenth of its time (the transport lends its
/// watchdog out for the call, see `FabricTransport::watched`).
pub(super) struct Inside<'a>(&'a Shared);

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        let c = self.0.calls.load(Ordering::Relaxed);
        self.0.calls.store(c + 1, Ordering::Release);
    }
}

/// A call the watchdog thread saw inside the provider.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// Its count (odd: inside).
    call: u64,
    /// Since it began, or since it was sent the escape signal.
    waited: Duration,
    /// Since it began.
    total: Duration,
}

impl Watchdog {
    /// Starts the watchdog thread, which breaks a call off (sends its
    /// thread `escape`, when given) once it has been inside for `limit`,
    /// and calls `on_stuck` if it is still inside `limit` later (checked
    /// every quarter of it).
    pub(super) fn start(
        limit: Duration,
        escape: Option<libc::c_int>,
        on_stuck: OnStuck,
    ) -> std::io::Result<Watchdog> {
        let shared = Arc::new(Shared::default());
        let watched = shared.clone();
        let tick = (limit / 4).max(Duration::from_millis(1));
        let thread = std::thread::Builder::new()
            .name("m2n-fi-watchdog".into())
            .spawn(move || {
                // The call seen inside (its odd count), for how long since
                // it began or was signalled, and in all.
                let mut inside: Option<Seen> = None;
                // The count of the call sent the escape signal.
                let mut signalled = None;
                let mut stop = watched.stop.lock().unwrap_or_else(|e| e.into_inner());
                while !*stop {
                    let c = watched.calls.load(Ordering::Acquire);
                    inside = match inside {
                        _ if c.is_multiple_of(2) => None,
                        Some(i) if i.call == c => Some(Seen {
                            waited: i.waited + tick,
                            total: i.total + tick,
                            ..i
                        }),
                        _ => Some(Seen {
                            call: c,
                            waited: Duration::ZERO,
                            total: Duration::ZERO,
                        }),
                    };
                    match (&mut inside, escape) {
                        (Some(i), Some(signo)) if i.waited >= limit && signalled != Some(c) => {
                            let thread = watched.thread.load(Ordering::Acquire) as libc::pthread_t;
                            if watched.calls.load(Ordering::Acquire) == c {
                                // SAFETY: the thread is still inside the same
                                // call, so it is alive; the handler of `signo`
                                // is m2n's (escape_signal).
                                unsafe { libc::pthread_kill(thread, signo) };
                            }
                            signalled = Some(c);
                            i.waited = Duration::ZERO;
                        }
                        (Some(i), _) if i.waited >= limit => {
                            on_stuck(i.total);
                            inside = None;
                        }
                        _ => {}
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
    pub(super) fn enter(&self) -> Inside<'_> {
        let c = self.shared.calls.load(Ordering::Relaxed);
        debug_assert!(c.is_multiple_of(2), "nested watchdog guards");
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.shared.thread.store(me as u64, Ordering::Relaxed);
        self.shared.calls.store(c + 1, Ordering::Release);
        Inside(&self.shared)
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
        (Watchdog::start(limit, None, on_stuck).unwrap(), fired)
    }

    /// Spins until the flag at `arg` is set (never, in these tests): a
    /// provider call that waits on a lock a dead peer held.
    unsafe extern "C" fn spin(arg: *mut libc::c_void) -> libc::c_long {
        // SAFETY: the test passes a live AtomicBool.
        let flag = unsafe { &*arg.cast::<std::sync::atomic::AtomicBool>() };
        while !flag.load(Ordering::Relaxed) {
            std::hint::spin_loop();
        }
        7
    }

    fn guarded_spin(flag: &std::sync::atomic::AtomicBool) -> Option<libc::c_long> {
        let mut escaped = 0;
        // SAFETY: `spin` owns nothing; the flag outlives the call.
        let ret = unsafe {
            m2n_fabric_sys::m2n_fi_guarded(
                spin,
                (flag as *const std::sync::atomic::AtomicBool)
                    .cast_mut()
                    .cast(),
                &mut escaped,
            )
        };
        (escaped == 0).then_some(ret)
    }

    #[test]
    fn a_call_that_never_returns_is_broken_off_before_the_last_resort() {
        let signo = escape_signal().unwrap();
        let fired = Arc::new(AtomicUsize::new(0));
        let f = fired.clone();
        let dog = Watchdog::start(
            Duration::from_millis(40),
            Some(signo),
            Box::new(move |_| {
                f.fetch_add(1, Ordering::SeqCst);
            }),
        )
        .unwrap();
        let never = std::sync::atomic::AtomicBool::new(false);
        for _ in 0..3 {
            let inside = dog.enter();
            assert_eq!(guarded_spin(&never), None, "the spin was broken off");
            drop(inside);
        }
        assert_eq!(fired.load(Ordering::SeqCst), 0, "no last resort needed");
        // A call that returns is not disturbed, and its result comes back.
        let set = std::sync::atomic::AtomicBool::new(true);
        let _inside = dog.enter();
        assert_eq!(guarded_spin(&set), Some(7));
    }

    #[test]
    fn an_escape_signal_outside_a_guarded_call_is_harmless() {
        let signo = escape_signal().unwrap();
        // The default action of a real-time signal ends the process: the
        // handler must swallow one that finds no guarded call.
        // SAFETY: signals this thread, which is alive.
        let sent = unsafe { libc::pthread_kill(libc::pthread_self(), signo) };
        assert_eq!(sent, 0);
        let set = std::sync::atomic::AtomicBool::new(true);
        assert_eq!(guarded_spin(&set), Some(7));
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
