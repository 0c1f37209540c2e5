//! One timed iteration of each contender, on one rank.
//!
//! How a sample is timed (the same for m2n and the baseline), with
//! `--timing barrier` (the default):
//! 1. every rank enters an MPI barrier (not timed; MPI_Ibarrier completed
//!    with the run's wait policy, so waiting ranks yield when asked to);
//! 2. each rank reads its clock when it leaves the barrier (t0) and again
//!    when its part of the round is complete (t1): for a sender, when its
//!    writes have completed locally (and, in `roundtrip`, when the combine
//!    round has arrived); for a receiver, when the whole round has arrived
//!    (and, in `roundtrip`, when its combine writes have completed);
//! 3. the iteration's sample is the maximum of `t1 - t0` over all ranks
//!    (one element-wise MPI all-reduce of every rank's samples after the
//!    size's last iteration): the time until the slowest rank finished,
//!    i.e. the time the M2N round took.
//!
//! With `--timing loop` there is one barrier before the warm-up, one before
//! the timed iterations and one before the check, and t0 is the end of the
//! rank's previous iteration: the iterations run back to back, as
//! nccl-tests and fabtests run theirs, and the mean is the loop's time over
//! its iterations.
//!
//! Data checks run in one extra iteration per size whose time is not
//! recorded: senders fill every byte with a pattern that depends on sender,
//! receiver, round and channel; receivers count wrong bytes.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use m2n::pattern;
use m2n::proto::ChannelId;
use m2n::{Communicator, Msg, Region, Role, WaitPolicy};
use mpi::topology::SimpleCommunicator;

use crate::cli::{Pattern, Timing};
use crate::mpi_base;

/// A point on this rank's timeline, in its [`Clock`]'s units.
#[derive(Debug, Clone, Copy)]
pub struct Stamp(u64);

/// The time from one stamp to a later one, in the clock's units
/// ([`Clock::secs_per_unit`] converts them).
#[derive(Debug, Clone, Copy)]
pub struct Span(u64);

impl Span {
    /// In seconds, at [`Clock::secs_per_unit`].
    pub fn secs(self, secs_per_unit: f64) -> f64 {
        self.0 as f64 * secs_per_unit
    }
}

impl std::ops::Add for Span {
    type Output = Span;
    fn add(self, other: Span) -> Span {
        Span(self.0 + other.0)
    }
}

impl std::ops::Sub for Stamp {
    type Output = Span;
    fn sub(self, earlier: Stamp) -> Span {
        Span(self.0.saturating_sub(earlier.0))
    }
}

/// Where this rank's iterations start and end (see the module's docs).
///
/// Stamps are the CPU's counter where it can be read (`m2n::clock::ticks`:
/// a few nanoseconds, no conversion), converted to seconds after the
/// timed loop at the rate measured against the OS clock since the clock
/// was made; elsewhere the OS clock's nanoseconds. fabtests' loops read
/// no clock per iteration, and reading the OS clock and converting its
/// difference per iteration cost m2n_perf's own loop about 100 cycles a
/// round trip.
pub struct Clock {
    timing: Timing,
    wait: WaitPolicy,
    /// When this rank's last iteration ended (or the clock was lined up).
    last: Stamp,
    /// When the clock was made, on the OS clock and in its own units.
    origin: Instant,
    origin_units: u64,
}

impl Clock {
    pub fn new(timing: Timing, wait: WaitPolicy) -> Self {
        let mut clock = Self {
            timing,
            wait,
            last: Stamp(0),
            origin: Instant::now(),
            origin_units: 0,
        };
        clock.origin_units = clock.read().0;
        clock.last = Stamp(clock.origin_units);
        clock
    }

    fn read(&self) -> Stamp {
        match m2n::clock::ticks() {
            Some(t) => Stamp(t),
            None => Stamp(self.origin.elapsed().as_nanos() as u64),
        }
    }

    /// Seconds per unit of [`Span`]: the counter's rate measured against
    /// the OS clock since the clock was made (over 10 ms at least: it
    /// waits out the rest the first time), or 1e-9.
    pub fn secs_per_unit(&self) -> f64 {
        if m2n::clock::ticks().is_none() {
            return 1e-9;
        }
        const MEASURE_OVER: Duration = Duration::from_millis(10);
        if let Some(rest) = MEASURE_OVER.checked_sub(self.origin.elapsed()) {
            std::thread::sleep(rest);
        }
        let units = self.read().0.saturating_sub(self.origin_units);
        self.origin.elapsed().as_secs_f64() / units.max(1) as f64
    }

    /// An iteration's start: when this rank leaves a barrier of all ranks
    /// (barrier timing), or when its previous iteration ended (loop).
    pub fn start(&mut self, world: &SimpleCommunicator) -> Stamp {
        match self.timing {
            Timing::Barrier => {
                mpi_base::barrier(world, self.wait);
                self.read()
            }
            Timing::Loop => self.last,
        }
    }

    /// Whether rounds run back to back (loop timing).
    pub fn back_to_back(&self) -> bool {
        self.timing == Timing::Loop
    }

    /// An iteration's end: now.
    pub fn stop(&mut self) -> Stamp {
        self.last = self.read();
        self.last
    }

    /// Moves the last iteration's end to now (it went on after
    /// [`stop`](Self::stop), waiting for its rounds): returns what that adds.
    pub fn extend(&mut self) -> Span {
        let end = self.last;
        self.stop() - end
    }

    /// Lines all ranks up before a run of back-to-back iterations (loop
    /// timing; barrier timing does so before every iteration anyway).
    pub fn line_up(&mut self, world: &SimpleCommunicator) {
        if self.timing == Timing::Loop {
            mpi_base::barrier(world, self.wait);
            self.last = self.read();
        }
    }
}

/// What one rank reports for one iteration.
pub struct Sample {
    pub span: Span,
    pub wrong: u64,
}

fn check(buf: &[u8], want_len: usize, seed: u64) -> u64 {
    if buf.len() != want_len {
        return want_len.max(buf.len()) as u64;
    }
    pattern::count_wrong(buf, seed) as u64
}

/// Where a rank sits in the group, and the check patterns of its messages.
#[derive(Debug, Clone, Copy)]
pub struct Place {
    pub role: Role,
    pub rank: usize,
    /// Attention ranks (M) and experts (N).
    pub m: usize,
    pub n: usize,
}

impl Place {
    /// The channel whose bytes this rank checks once an iteration of
    /// `pattern` is over (the last data it receives), if any.
    pub fn checked_at_end(&self, pattern: Pattern) -> Option<ChannelId> {
        match (self.role, pattern) {
            (Role::Expert, Pattern::Dispatch) => Some(ChannelId::Dispatch),
            (Role::Attention, Pattern::Roundtrip) => Some(ChannelId::Combine),
            _ => None,
        }
    }

    /// Ranks on the other side.
    pub fn peers(&self) -> usize {
        if self.role == Role::Attention {
            self.n
        } else {
            self.m
        }
    }

    /// MPI rank of peer `p` on the other side (attention ranks come first).
    pub fn mpi_rank(&self, p: usize) -> i32 {
        (if self.role == Role::Attention {
            self.m + p
        } else {
            p
        }) as i32
    }

    /// Fills `buf` (one `size`-byte message per peer) with this rank's
    /// pattern for round `k` on `channel`.
    pub fn fill(&self, buf: &mut [u8], channel: ChannelId, size: usize, k: u64) {
        for p in 0..self.peers() {
            pattern::fill(
                &mut buf[p * size..(p + 1) * size],
                pattern::seed(channel, self.rank, p, k),
            );
        }
    }

    /// Wrong bytes in `buf` (one message per peer) received in round `k`.
    pub fn count_wrong(&self, buf: &[u8], channel: ChannelId, size: usize, k: u64) -> u64 {
        (0..self.peers())
            .map(|p| {
                check(
                    &buf[p * size..(p + 1) * size],
                    size,
                    pattern::seed(channel, p, self.rank, k),
                )
            })
            .sum()
    }
}

/// A round's messages, one per peer, `size` bytes each from consecutive
/// slices of `send`, handed to `f`: on the stack for up to 16 peers, so
/// that a loop timing rounds of a microsecond or two does not time the
/// allocator too, and exactly as many as there are for one or two peers
/// (the round trip's cases).
fn with_msgs<R>(send: &Region, peers: usize, size: usize, f: impl FnOnce(&[Msg<'_>]) -> R) -> R {
    const ON_STACK: usize = 16;
    let msg = |p: usize| Msg::new(send, p * size, size);
    if peers == 1 {
        f(&[msg(0)])
    } else if peers == 2 {
        f(&[msg(0), msg(1)])
    } else if peers <= ON_STACK {
        let mut buf = [Msg::EMPTY; ON_STACK];
        for (p, m) in buf[..peers].iter_mut().enumerate() {
            *m = msg(p);
        }
        f(&buf[..peers])
    } else {
        f(&(0..peers).map(msg).collect::<Vec<_>>())
    }
}

/// A GPU send buffer registered with m2n (feature `cuda`).
#[cfg(feature = "cuda")]
struct GpuSend {
    stream: std::sync::Arc<cudarc::driver::CudaStream>,
    buf: cudarc::driver::CudaSlice<u8>,
}

/// m2n on one rank.
pub struct M2nRank {
    pub comm: Communicator,
    /// Host memory, or (with a GPU) the registration of `gpu`'s buffer.
    send: Region,
    #[cfg(feature = "cuda")]
    gpu: Option<GpuSend>,
    role: Role,
    rank: usize,
    peers: usize,
    /// Iterations so far: the round number of the next dispatch and combine.
    k: u64,
    timeout: Duration,
    /// One-way rounds posted back to back whose writes may not be done
    /// yet (loop timing: up to the dispatch depth), oldest first.
    in_flight: VecDeque<u64>,
}

impl M2nRank {
    /// Rounds (iterations) run so far.
    pub fn rounds(&self) -> u64 {
        self.k
    }

    pub fn new(mut comm: Communicator, max_bytes: usize) -> m2n::Result<Self> {
        let (role, rank) = (comm.role(), comm.rank());
        let shape = comm.shape();
        let peers = match role {
            Role::Attention => shape.experts,
            Role::Expert => shape.attention,
        };
        let send = comm.alloc(peers * max_bytes)?;
        Ok(Self {
            comm,
            send,
            #[cfg(feature = "cuda")]
            gpu: None,
            role,
            rank,
            peers,
            k: 0,
            timeout: Duration::from_secs(60),
            in_flight: VecDeque::new(),
        })
    }

    /// Waits until every round this rank sent is done (its source free).
    pub fn drain(&mut self) -> m2n::Result<()> {
        while let Some(round) = self.in_flight.pop_front() {
            self.comm.dispatch().wait_sent(round, self.timeout)?;
        }
        Ok(())
    }

    /// m2n sending from GPU memory: zero-copy over verbs (GPUDirect RDMA)
    /// and cuda-ipc, through a pinned host stage over shm and tcp.
    #[cfg(feature = "cuda")]
    pub fn with_gpu_buffers(
        mut self,
        stream: std::sync::Arc<cudarc::driver::CudaStream>,
        max_bytes: usize,
    ) -> Result<Self, String> {
        use cudarc::driver::DevicePtr;
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| format!("{e:?}"))?;
        let len = self.peers * max_bytes;
        let buf = stream
            .alloc_zeros::<u8>(len.max(1))
            .map_err(|e| format!("cudaMalloc: {e:?}"))?;
        let (dptr, _sync) = buf.device_ptr(&stream);
        // SAFETY: the device buffer lives in `self.gpu` as long as the region.
        self.send = unsafe { self.comm.register_gpu(dptr, len) }.map_err(|e| e.to_string())?;
        drop(_sync);
        self.gpu = Some(GpuSend { stream, buf });
        Ok(self)
    }

    fn fill(&mut self, channel: ChannelId, size: usize) {
        let (me, k) = (self.rank, self.k);
        #[cfg(feature = "cuda")]
        if let Some(g) = &mut self.gpu {
            let mut host = vec![0u8; self.peers * size];
            for p in 0..self.peers {
                pattern::fill(
                    &mut host[p * size..(p + 1) * size],
                    pattern::seed(channel, me, p, k),
                );
            }
            let mut dst = g.buf.slice_mut(0..host.len());
            g.stream
                .memcpy_htod(&host, &mut dst)
                .expect("copy the check pattern to the GPU");
            return;
        }
        for p in 0..self.peers {
            pattern::fill(
                &mut self.send.as_mut_slice()[p * size..(p + 1) * size],
                pattern::seed(channel, me, p, k),
            );
        }
    }

    /// Wrong bytes in sender `s`'s message of `r` (copied to the host
    /// first when the ring is GPU memory: cuda-ipc).
    fn wrong_in(&self, r: &m2n::RecvRound, s: usize, size: usize, seed: u64) -> u64 {
        if !self.comm.rings_on_gpu() {
            return check(self.comm.message(r, s), size, seed);
        }
        #[cfg(feature = "cuda")]
        {
            let (addr, len) = self.comm.message_addr(r, s);
            let mut host = vec![0u8; len];
            // SAFETY: the round's slot, `len` bytes, held until released; the context is current (with_gpu_buffers bound it).
            let rc = unsafe {
                cudarc::driver::sys::cuMemcpyDtoH_v2(host.as_mut_ptr().cast(), addr, len)
            };
            assert_eq!(
                rc,
                cudarc::driver::sys::CUresult::CUDA_SUCCESS,
                "copying a message off the GPU"
            );
            check(&host, size, seed)
        }
        #[cfg(not(feature = "cuda"))]
        unreachable!("GPU rings need the cuda feature")
    }

    fn received(&mut self, channel: ChannelId, size: usize, verify: bool) -> m2n::Result<u64> {
        let timeout = self.timeout;
        let r = match channel {
            ChannelId::Dispatch => self.comm.dispatch().recv(timeout)?,
            ChannelId::Combine => self.comm.combine().recv(timeout)?,
        };
        let mut wrong = 0;
        if verify {
            for s in 0..self.peers {
                wrong +=
                    self.wrong_in(&r, s, size, pattern::seed(channel, s, self.rank, r.round()));
            }
        }
        match channel {
            ChannelId::Dispatch => self.comm.dispatch().release(r)?,
            ChannelId::Combine => self.comm.combine().release(r)?,
        }
        Ok(wrong)
    }

    /// One iteration; `verify` fills and checks every byte.
    #[inline]
    pub fn iteration(
        &mut self,
        world: &SimpleCommunicator,
        clock: &mut Clock,
        pattern: Pattern,
        size: usize,
        verify: bool,
    ) -> m2n::Result<Sample> {
        let timeout = self.timeout;
        let mut wrong = 0;
        if verify && self.role == Role::Attention {
            self.drain()?;
            self.fill(ChannelId::Dispatch, size);
        }
        let t0 = clock.start(world);
        let t1 = match (self.role, pattern) {
            // Back to back, one-way rounds overlap as far as the depth
            // lets them (as fi_rma_bw's window and nccl-tests' loops do):
            // the oldest round is waited for once `depth` are in flight.
            (Role::Attention, Pattern::Dispatch) if clock.back_to_back() && !verify => {
                let round = with_msgs(&self.send, self.peers, size, |msgs| {
                    self.comm.dispatch().send(msgs, timeout)
                })?;
                self.in_flight.push_back(round);
                let depth = self.comm.config().dispatch.depth;
                while self.in_flight.len() >= depth {
                    let oldest = self.in_flight.pop_front().expect("not empty");
                    self.comm.dispatch().wait_sent(oldest, timeout)?;
                }
                clock.stop()
            }
            (Role::Attention, _) => {
                let round = with_msgs(&self.send, self.peers, size, |msgs| {
                    self.comm.dispatch().send(msgs, timeout)
                })?;
                self.comm.dispatch().wait_sent(round, timeout)?;
                if pattern == Pattern::Roundtrip {
                    // Released before t1 too: the expert side's release is timed as well.
                    wrong += self.received(ChannelId::Combine, size, verify)?;
                }
                clock.stop()
            }
            (Role::Expert, Pattern::Dispatch) => {
                let r = self.comm.dispatch().recv(timeout)?;
                let t1 = clock.stop();
                if verify {
                    for s in 0..self.peers {
                        let seed = pattern::seed(ChannelId::Dispatch, s, self.rank, r.round());
                        wrong += self.wrong_in(&r, s, size, seed);
                    }
                }
                self.comm.dispatch().release(r)?;
                t1
            }
            (Role::Expert, Pattern::Roundtrip) => {
                wrong += self.received(ChannelId::Dispatch, size, verify)?;
                if verify {
                    self.fill(ChannelId::Combine, size);
                }
                let round = with_msgs(&self.send, self.peers, size, |msgs| {
                    self.comm.combine().send(msgs, timeout)
                })?;
                self.comm.combine().wait_sent(round, timeout)?;
                clock.stop()
            }
        };
        self.k += 1;
        Ok(Sample {
            span: t1 - t0,
            wrong,
        })
    }
}

/// The MPI baseline on one rank.
pub struct MpiRank {
    place: Place,
    send: Vec<u8>,
    recv: Vec<u8>,
    k: u64,
    wait: WaitPolicy,
    /// Rounds a sender may have in flight back to back (m2n's depth).
    depth: usize,
    /// The send requests of one-way rounds posted back to back, per
    /// round, oldest first (loop timing).
    in_flight: VecDeque<Vec<mpi::ffi::MPI_Request>>,
}

impl MpiRank {
    pub fn new(place: Place, max_bytes: usize, wait: WaitPolicy, depth: usize) -> Self {
        Self {
            place,
            send: vec![0; place.peers() * max_bytes],
            recv: vec![0; place.peers() * max_bytes],
            k: 0,
            wait,
            depth: depth.max(1),
            in_flight: VecDeque::new(),
        }
    }

    /// Waits until every round this rank sent is done (its buffer free).
    pub fn drain(&mut self) {
        while let Some(mut reqs) = self.in_flight.pop_front() {
            mpi_base::wait_all(&mut reqs, self.wait);
        }
    }

    fn fill(&mut self, channel: ChannelId, size: usize) {
        self.place.fill(&mut self.send, channel, size, self.k);
    }

    fn count_wrong(&self, channel: ChannelId, size: usize) -> u64 {
        self.place.count_wrong(&self.recv, channel, size, self.k)
    }

    fn sends(&self, size: usize) -> Vec<(i32, &[u8])> {
        (0..self.place.peers())
            .map(|p| (self.place.mpi_rank(p), &self.send[p * size..(p + 1) * size]))
            .collect()
    }

    pub fn iteration(
        &mut self,
        world: &SimpleCommunicator,
        clock: &mut Clock,
        pattern: Pattern,
        size: usize,
        verify: bool,
    ) -> Sample {
        const DISPATCH: i32 = 1;
        const COMBINE: i32 = 2;
        let mut wrong = 0;
        let peers: Vec<i32> = (0..self.place.peers())
            .map(|p| self.place.mpi_rank(p))
            .collect();
        if verify && self.place.role == Role::Attention {
            self.drain();
            self.fill(ChannelId::Dispatch, size);
        }
        let t0 = clock.start(world);
        match (self.place.role, pattern) {
            // Back to back, up to `depth` rounds in flight, as m2n's.
            (Role::Attention, Pattern::Dispatch) if clock.back_to_back() && !verify => {
                let mut reqs = Vec::with_capacity(self.place.peers());
                // SAFETY: `self.send` is not changed while rounds are in
                // flight (only a check iteration fills it, after `drain`)
                // and lives as long as `self`, which drains before it goes.
                unsafe { mpi_base::post_sends(world, &self.sends(size), DISPATCH, &mut reqs) };
                self.in_flight.push_back(reqs);
                while self.in_flight.len() >= self.depth {
                    let mut oldest = self.in_flight.pop_front().expect("not empty");
                    mpi_base::wait_all(&mut oldest, self.wait);
                }
            }
            (Role::Attention, Pattern::Dispatch) => {
                mpi_base::exchange(world, &self.sends(size), DISPATCH, &mut [], 0, self.wait);
            }
            (Role::Attention, Pattern::Roundtrip) => {
                // Dispatch out and combine back in one Waitall, the combine
                // receives posted first, as MPI codes do.
                let sends: Vec<(i32, &[u8])> = peers
                    .iter()
                    .enumerate()
                    .map(|(p, &r)| (r, &self.send[p * size..(p + 1) * size]))
                    .collect();
                let mut recvs: Vec<(i32, &mut [u8])> = peers
                    .iter()
                    .copied()
                    .zip(self.recv.chunks_mut(size))
                    .collect();
                mpi_base::exchange(world, &sends, DISPATCH, &mut recvs, COMBINE, self.wait);
            }
            (Role::Expert, p) => {
                let mut recvs: Vec<(i32, &mut [u8])> = peers
                    .iter()
                    .copied()
                    .zip(self.recv.chunks_mut(size))
                    .collect();
                mpi_base::exchange(world, &[], 0, &mut recvs, DISPATCH, self.wait);
                if p == Pattern::Roundtrip {
                    if verify {
                        wrong += self.count_wrong(ChannelId::Dispatch, size);
                        self.fill(ChannelId::Combine, size);
                    }
                    mpi_base::exchange(world, &self.sends(size), COMBINE, &mut [], 0, self.wait);
                }
            }
        }
        let t1 = clock.stop();
        if let Some(ch) = self.place.checked_at_end(pattern).filter(|_| verify) {
            wrong += self.count_wrong(ch, size);
        }
        self.k += 1;
        Sample {
            span: t1 - t0,
            wrong,
        }
    }
}

impl Drop for MpiRank {
    fn drop(&mut self) {
        // Sends still in flight read `self.send`.
        self.drain();
    }
}
