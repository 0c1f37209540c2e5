//! How a thread waits for something another thread or process does: the
//! one place that spins, yields or sleeps between polls. On machines with
//! fewer cores than ranks a spinning waiter starves the rank it waits for,
//! so every blocking loop in m2n (and its benchmarks) waits through here.

use std::time::Duration;

/// How blocking helpers wait between progress calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitPolicy {
    /// Busy-poll: lowest latency, needs a core per rank.
    Spin,
    /// Yield the CPU after every empty poll: for oversubscribed hosts.
    Yield,
    /// Spin this many empty polls, then yield on each further one.
    SpinThenYield(u32),
    /// Decided when the communicator forms: [`WaitPolicy::Yield`] when
    /// this host runs more ranks of the group than it has cores (spinning
    /// would starve the peers that share them), else `SpinThenYield(256)`.
    Auto,
}

impl WaitPolicy {
    /// The concrete policy for `local_ranks` ranks on a host with `cores`.
    pub fn resolve(self, local_ranks: usize, cores: usize) -> WaitPolicy {
        match self {
            WaitPolicy::Auto if local_ranks > cores => WaitPolicy::Yield,
            WaitPolicy::Auto => WaitPolicy::SpinThenYield(256),
            other => other,
        }
    }
}

impl std::fmt::Display for WaitPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaitPolicy::Spin => f.write_str("spin"),
            WaitPolicy::Yield => f.write_str("yield"),
            WaitPolicy::SpinThenYield(n) => write!(f, "spin-yield:{n}"),
            WaitPolicy::Auto => f.write_str("auto"),
        }
    }
}

impl std::str::FromStr for WaitPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "spin" => Ok(Self::Spin),
            "yield" => Ok(Self::Yield),
            "auto" => Ok(Self::Auto),
            "spin-yield" => Ok(Self::SpinThenYield(256)),
            _ => match s.strip_prefix("spin-yield:") {
                Some(n) => n
                    .parse()
                    .map(Self::SpinThenYield)
                    .map_err(|_| format!("{n:?} is not a spin count")),
                None => Err("expected spin, yield, spin-yield[:N] or auto".into()),
            },
        }
    }
}

/// Paces a polling loop: call [`wait`](Self::wait) after each poll with
/// whether it moved anything.
#[derive(Debug, Clone)]
pub struct Backoff {
    mode: Mode,
    idle: u32,
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    Policy(WaitPolicy),
    Background,
}

impl Backoff {
    /// Paces a caller's blocking call by its policy: `Spin` spins, `Yield`
    /// yields after every empty poll, `SpinThenYield(n)` spins `n` empty
    /// polls and then yields (`Auto`, unresolved, yields).
    pub fn new(policy: WaitPolicy) -> Self {
        Self {
            mode: Mode::Policy(policy),
            idle: 0,
        }
    }

    /// Paces a helper thread that waits on others' work for long stretches
    /// (the proxy thread, host streams): spins 64 empty polls, yields until
    /// 1024, then sleeps 50 us between polls.
    pub fn background() -> Self {
        Self {
            mode: Mode::Background,
            idle: 0,
        }
    }

    /// After a poll: resets when it `moved` anything, else waits as the
    /// policy says for this many empty polls in a row.
    pub fn wait(&mut self, moved: bool) {
        if moved {
            self.idle = 0;
            return;
        }
        self.idle = self.idle.saturating_add(1);
        match self.pause() {
            Pause::Spin => std::hint::spin_loop(),
            Pause::Yield => std::thread::yield_now(),
            Pause::Sleep => std::thread::sleep(Duration::from_micros(50)),
        }
    }

    /// Whether the next empty poll would spin (rather than yield or
    /// sleep): a caller may poll more cheaply in between while it does.
    pub fn spinning(&self) -> bool {
        self.pause_at(self.idle.saturating_add(1)) == Pause::Spin
    }

    fn pause(&self) -> Pause {
        self.pause_at(self.idle)
    }

    /// The pause after `idle` empty polls in a row.
    fn pause_at(&self, idle: u32) -> Pause {
        match self.mode {
            Mode::Policy(WaitPolicy::Spin) => Pause::Spin,
            Mode::Policy(WaitPolicy::SpinThenYield(n)) if idle <= n => Pause::Spin,
            Mode::Policy(_) => Pause::Yield,
            Mode::Background if idle < 64 => Pause::Spin,
            Mode::Background if idle < 1024 => Pause::Yield,
            Mode::Background => Pause::Sleep,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Pause {
    Spin,
    Yield,
    Sleep,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn after(mut b: Backoff, empty: u32) -> Pause {
        b.idle = empty;
        b.pause()
    }

    #[test]
    fn each_policy_pauses_as_documented() {
        assert_eq!(
            after(Backoff::new(WaitPolicy::Spin), 1_000_000),
            Pause::Spin
        );
        assert_eq!(after(Backoff::new(WaitPolicy::Yield), 1), Pause::Yield);
        let st = Backoff::new(WaitPolicy::SpinThenYield(3));
        assert_eq!(after(st.clone(), 3), Pause::Spin);
        assert_eq!(after(st, 4), Pause::Yield);
        assert_eq!(after(Backoff::new(WaitPolicy::Auto), 1), Pause::Yield);
        assert_eq!(after(Backoff::background(), 63), Pause::Spin);
        assert_eq!(after(Backoff::background(), 64), Pause::Yield);
        assert_eq!(after(Backoff::background(), 1024), Pause::Sleep);
    }

    #[test]
    fn spinning_says_whether_the_next_empty_poll_spins() {
        let mut b = Backoff::new(WaitPolicy::SpinThenYield(2));
        assert!(b.spinning());
        b.wait(false);
        assert!(b.spinning());
        b.wait(false);
        assert!(!b.spinning(), "a third empty poll yields");
        b.wait(true);
        assert!(b.spinning());
        assert!(!Backoff::new(WaitPolicy::Yield).spinning());
        assert!(Backoff::new(WaitPolicy::Spin).spinning());
    }

    #[test]
    fn progress_resets_the_count() {
        let mut b = Backoff::new(WaitPolicy::SpinThenYield(2));
        for _ in 0..5 {
            b.wait(false);
        }
        assert_eq!(b.pause(), Pause::Yield);
        b.wait(true);
        assert_eq!(b.idle, 0);
        assert_eq!(b.pause(), Pause::Spin);
    }
}
