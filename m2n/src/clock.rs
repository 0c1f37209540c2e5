//! Time for the polling paths without a system call.
//!
//! Every blocking call of a communicator reads the time (its deadline, the
//! liveness interval). Where the kernel's clock has a user-space fast path
//! (the vDSO over a stable TSC) that read is cheap; where it does not (a
//! guest whose clocksource is not the TSC, as Soft-RoCE VMs under TCG), each
//! `clock_gettime` is a system call, and reading it a few times per round
//! was most of the system calls of a verbs round trip.
//!
//! [`Clock`] reads the CPU's counter instead (the TSC on x86-64, the
//! virtual counter on aarch64: user-space instructions), converts ticks to
//! time with a rate measured against the OS clock, and re-anchors to the OS
//! clock once per [`Clock::ANCHOR`] of estimated time, re-measuring the
//! rate over that span. So it costs O(1) system calls per
//! [`Clock::ANCHOR`] whatever the call rate, its error is bounded by one
//! span even if the counter's rate changes, and it never goes backwards.
//! Where no counter can be read, every call reads the OS clock.
//!
//! A communicator uses it for deadlines, liveness and credit pacing;
//! `m2n-demo` times its round trips with it, so that what a system-call
//! count of a run shows is m2n's own work. Its resolution is the counter's
//! (nanoseconds); between anchors it is as accurate as the last span's rate
//! (the OS clock's and the counter's reads around an anchor are a few tens
//! of nanoseconds apart, over a 20 ms span).

use std::time::{Duration, Instant};

/// A per-owner clock (not shared: no atomics on the polling path). Times
/// from it are [`Instant`]s, comparable with the OS clock's.
#[derive(Debug)]
pub struct Clock {
    /// The OS time and counter value at the last anchor.
    anchor: Instant,
    anchor_ticks: u64,
    /// Nanoseconds per tick, once measured over a span of at least
    /// [`Clock::CALIBRATE`].
    ns_per_tick: Option<f64>,
    /// The last time returned (it never goes backwards).
    last: Instant,
    /// Reads of the OS clock (for tests and counters).
    os_reads: u64,
    /// Calls of [`Clock::coarse`], for [`Clock::READ_EVERY`].
    calls: u32,
}

impl Clock {
    /// Estimated time between reads of the OS clock once calibrated.
    pub const ANCHOR: Duration = Duration::from_millis(20);
    /// The shortest span the first rate is measured over; until then every
    /// call reads the OS clock.
    pub const CALIBRATE: Duration = Duration::from_millis(1);
    /// [`Clock::coarse`] reads the counter once in this many calls: a
    /// polling loop asks
    /// for the time several times per pass, and where reading the counter
    /// is slow (emulated, as under TCG, where it was 8% of a round trip's
    /// profile) every read counts. Calls come microseconds apart, so the
    /// time returned is that much stale at most.
    pub const READ_EVERY: u32 = 8;

    pub fn new() -> Self {
        let now = Instant::now();
        Self {
            anchor: now,
            anchor_ticks: ticks().unwrap_or(0),
            ns_per_tick: None,
            last: now,
            os_reads: 1,
            calls: 0,
        }
    }

    /// The time for a polling loop: the counter is read once in
    /// [`Clock::READ_EVERY`] calls, the last time returned in between.
    pub fn coarse(&mut self) -> Instant {
        self.calls = self.calls.wrapping_add(1);
        if !self.calls.is_multiple_of(Self::READ_EVERY) && self.ns_per_tick.is_some() {
            return self.last;
        }
        self.now()
    }

    /// The time now.
    pub fn now(&mut self) -> Instant {
        let Some(t) = ticks() else {
            return self.os_now();
        };
        let elapsed = t.checked_sub(self.anchor_ticks);
        if let (Some(rate), Some(dt)) = (self.ns_per_tick, elapsed) {
            let est = Duration::from_nanos((dt as f64 * rate) as u64);
            if est < Self::ANCHOR {
                self.last = self.last.max(self.anchor + est);
                return self.last;
            }
        }
        // Not calibrated yet, the span is over, or the counter went back
        // (another core's counter, a migrated guest): read the OS clock and
        // measure the rate over the span since the anchor.
        let now = self.os_now();
        let span = now.saturating_duration_since(self.anchor);
        match elapsed {
            Some(dt) if dt > 0 && span >= Self::CALIBRATE => {
                self.ns_per_tick = Some(span.as_nanos() as f64 / dt as f64);
                self.anchor = now;
                self.anchor_ticks = t;
            }
            Some(_) => {} // too short a span to measure: keep the anchor
            None => {
                self.anchor = now;
                self.anchor_ticks = t;
            }
        }
        now
    }

    fn os_now(&mut self) -> Instant {
        self.os_reads += 1;
        self.last = self.last.max(Instant::now());
        self.last
    }

    /// Reads of the OS clock so far.
    pub fn os_reads(&self) -> u64 {
        self.os_reads
    }

    /// Whether the CPU's counter stands in for the OS clock (after the
    /// first millisecond, where the CPU has a counter m2n can read).
    pub fn counter_based(&self) -> bool {
        self.ns_per_tick.is_some()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// The CPU's free-running counter, read in user space; `None` where this
/// build has no way to read one. Its rate is the CPU's (measure it against
/// the OS clock, as [`Clock`] does).
#[inline]
pub fn ticks() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: RDTSC has no preconditions; every x86-64 CPU has it (a
        // kernel could forbid it with CR4.TSD, which Linux does not do for
        // ordinary processes).
        Some(unsafe { core::arch::x86_64::_rdtsc() })
    }
    #[cfg(target_arch = "aarch64")]
    {
        let v: u64;
        // SAFETY: CNTVCT_EL0 is readable at EL0 on Linux (the kernel sets
        // CNTKCTL_EL1.EL0VCTEN for the vDSO's own use); reading it has no
        // side effects.
        unsafe { core::arch::asm!("mrs {}, cntvct_el0", out(reg) v, options(nomem, nostack)) };
        Some(v)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_the_os_clock_with_few_os_reads() {
        let mut c = Clock::new();
        let start = Instant::now();
        let mut calls = 0u64;
        let mut prev = c.now();
        while start.elapsed() < Duration::from_millis(120) {
            let t = c.now();
            assert!(t >= prev, "the clock went back");
            prev = t;
            calls += 1;
        }
        let os = Instant::now();
        let ours = c.now();
        // Within one anchor span (plus scheduling noise) of the OS clock.
        let off = if ours > os { ours - os } else { os - ours };
        assert!(
            off <= Clock::ANCHOR + Duration::from_millis(30),
            "off by {off:?}"
        );
        if ticks().is_some() {
            assert!(c.counter_based(), "never calibrated");
            // 120 ms: a millisecond of calibration reads, then one read per
            // 20 ms span (the reads until calibration are bounded by the
            // calls made in the first millisecond).
            let after_calibration = c.os_reads();
            assert!(
                after_calibration < calls / 4,
                "{after_calibration} OS reads for {calls} calls"
            );
            let before = c.os_reads();
            let t0 = Instant::now();
            let mut n = 0u64;
            while t0.elapsed() < Duration::from_millis(100) {
                c.now();
                n += 1;
            }
            let reads = c.os_reads() - before;
            // 100 ms at one read per 20 ms span: about 5; never per call.
            assert!(reads <= 12, "{reads} OS reads in 100 ms ({n} calls)");
        }
    }

    #[test]
    fn coarse_time_moves_once_in_read_every_calls() {
        let mut c = Clock::new();
        std::thread::sleep(Duration::from_millis(2));
        c.now(); // calibrated (where there is a counter)
        if !c.counter_based() {
            eprintln!("skipped: no CPU counter on this architecture");
            return;
        }
        let mut changes = 0;
        let mut prev = c.coarse();
        for _ in 0..(Clock::READ_EVERY * 100) {
            std::hint::spin_loop();
            let t = c.coarse();
            assert!(t >= prev);
            changes += (t != prev) as u32;
            prev = t;
        }
        assert!(
            (90..=101).contains(&changes),
            "{changes} changes in 100 counter reads"
        );
    }

    #[test]
    fn a_counter_that_goes_back_reanchors_instead_of_jumping() {
        if ticks().is_none() {
            eprintln!("skipped: no CPU counter on this architecture");
            return;
        }
        let mut c = Clock::new();
        std::thread::sleep(Duration::from_millis(2));
        let t1 = c.now();
        // Pretend the anchor lies in the counter's future (as after a
        // move to a core whose counter is behind).
        c.anchor_ticks = u64::MAX;
        let before = c.os_reads();
        let t2 = c.now();
        assert!(t2 >= t1);
        assert_eq!(c.os_reads(), before + 1, "the OS clock was not read");
        assert!(c.anchor_ticks != u64::MAX, "not re-anchored");
    }
}
