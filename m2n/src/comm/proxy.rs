//! A proxy thread: drives a communicator's progress engine for users who
//! do not call `progress` themselves (stream-ordered operations need the
//! host's half driven while the CPU does other things).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use super::{Error, Result};

/// A thread that calls a progress function on shared state until stopped
/// or until it fails; the state stays usable through [`lock`](Self::lock).
#[derive(Debug)]
pub struct Proxy<T: Send + 'static> {
    shared: Arc<Mutex<T>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Option<Error>>>,
}

impl<T: Send + 'static> Proxy<T> {
    /// Starts calling `drive` on `shared` (locking it for each call) until
    /// [`stop`](Self::stop), or until `drive` fails. Between calls that
    /// moved nothing it spins briefly, then yields, then sleeps 50 us.
    pub fn spawn(shared: Arc<Mutex<T>>, drive: fn(&mut T) -> Result<bool>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (shared.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("m2n-proxy".into())
            .spawn(move || {
                let mut backoff = crate::wait::Backoff::background();
                while !st.load(Ordering::Acquire) {
                    let moved = {
                        let mut guard = s.lock().unwrap_or_else(|p| p.into_inner());
                        drive(&mut guard)
                    };
                    match moved {
                        Ok(moved) => backoff.wait(moved),
                        Err(e) => return Some(e),
                    }
                }
                None
            })
            .expect("spawning the m2n proxy thread");
        Proxy {
            shared,
            stop,
            thread: Some(thread),
        }
    }

    /// The state, locked against the proxy thread for as long as the guard
    /// lives (keep it short: the proxy waits meanwhile).
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the thread still runs (it ends when `drive` fails).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops the thread; returns the error it stopped on, if it did.
    pub fn stop(mut self) -> Result<()> {
        self.halt()
    }

    /// Stops the thread and hands the state back (the error it stopped on,
    /// if any, is dropped: the state's own calls report it again).
    pub fn into_inner(mut self) -> Arc<Mutex<T>> {
        let _ = self.halt();
        self.shared.clone()
    }

    fn halt(&mut self) -> Result<()> {
        self.stop.store(true, Ordering::Release);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(Some(e))) => Err(e),
            Some(Err(_)) => Err(Error::Usage("the proxy thread panicked".into())),
            _ => Ok(()),
        }
    }
}

impl<T: Send + 'static> Drop for Proxy<T> {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}
