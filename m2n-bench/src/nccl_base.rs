//! The NCCL baseline (feature `cuda`): one round is a grouped
//! `ncclSend`/`ncclRecv` to and from every peer on GPU buffers, then a
//! stream synchronisation, timed exactly like m2n's rounds.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use cudarc::nccl::{group_end, group_start, Comm, Id};
use m2n::proto::ChannelId;
use m2n::Role;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, Root as _};

use crate::cli::Pattern;
use crate::run::{Clock, Place, Sample};

/// The GPU this rank uses: ranks are spread over the devices round-robin.
pub fn open_gpu(world: &SimpleCommunicator) -> Result<Arc<CudaStream>, String> {
    let count =
        m2n::gpu::init().map_err(|e| format!("GPU buffers (--device-buffers, --baseline nccl or cuda-memcpy) need an NVIDIA GPU: {e}"))?;
    let ctx = CudaContext::new(world.rank() as usize % count)
        .map_err(|e| format!("CUDA context: {e:?}"))?;
    Ok(ctx.default_stream())
}

/// Fills `dst` (one `size`-byte message per peer) with `place`'s check
/// pattern of round `k`, through a host copy.
pub fn fill_gpu(
    stream: &Arc<CudaStream>,
    dst: &mut CudaSlice<u8>,
    place: Place,
    channel: ChannelId,
    size: usize,
    k: u64,
) -> Result<(), String> {
    let mut host = vec![0u8; place.peers() * size];
    place.fill(&mut host, channel, size, k);
    let mut dst = dst.slice_mut(0..host.len());
    stream
        .memcpy_htod(&host, &mut dst)
        .map_err(|e| format!("{e:?}"))
}

/// Wrong bytes in `src` (one message per peer) received in round `k`.
pub fn wrong_on_gpu(
    stream: &Arc<CudaStream>,
    src: &CudaSlice<u8>,
    place: Place,
    channel: ChannelId,
    size: usize,
    k: u64,
) -> Result<u64, String> {
    let host = stream
        .memcpy_dtov(&src.slice(0..place.peers() * size))
        .map_err(|e| format!("{e:?}"))?;
    Ok(place.count_wrong(&host, channel, size, k))
}

/// A GPU baseline's half-rounds, timed by [`gpu_iteration`] exactly like
/// m2n's rounds (see `run.rs`).
pub trait GpuRounds {
    fn place(&self) -> Place;
    /// Fills this rank's send buffer with its pattern of the current round.
    fn fill(&mut self, channel: ChannelId, size: usize) -> Result<(), String>;
    /// Wrong bytes in the receive buffer for the current round.
    fn count_wrong(&self, channel: ChannelId, size: usize) -> Result<u64, String>;
    /// Sends this rank's messages on `channel` to every peer.
    fn send(
        &mut self,
        world: &SimpleCommunicator,
        size: usize,
        channel: ChannelId,
    ) -> Result<(), String>;
    /// Waits until every peer's message on `channel` is in.
    fn recv(
        &mut self,
        world: &SimpleCommunicator,
        size: usize,
        channel: ChannelId,
    ) -> Result<(), String>;
    /// On to the next round.
    fn advance(&mut self);
}

/// One timed iteration of a GPU baseline (the same phases as m2n's).
pub fn gpu_iteration(
    r: &mut impl GpuRounds,
    world: &SimpleCommunicator,
    clock: &mut Clock,
    pattern: Pattern,
    size: usize,
    verify: bool,
) -> Result<Sample, String> {
    let place = r.place();
    let mut wrong = 0;
    if verify && place.role == Role::Attention {
        r.fill(ChannelId::Dispatch, size)?;
    }
    let t0 = clock.start(world);
    match (place.role, pattern) {
        (Role::Attention, Pattern::Dispatch) => r.send(world, size, ChannelId::Dispatch)?,
        (Role::Expert, Pattern::Dispatch) => r.recv(world, size, ChannelId::Dispatch)?,
        (Role::Attention, Pattern::Roundtrip) => {
            r.send(world, size, ChannelId::Dispatch)?;
            r.recv(world, size, ChannelId::Combine)?;
        }
        (Role::Expert, Pattern::Roundtrip) => {
            r.recv(world, size, ChannelId::Dispatch)?;
            if verify {
                wrong += r.count_wrong(ChannelId::Dispatch, size)?;
                r.fill(ChannelId::Combine, size)?;
            }
            r.send(world, size, ChannelId::Combine)?;
        }
    }
    let t1 = clock.stop();
    if let Some(ch) = place.checked_at_end(pattern).filter(|_| verify) {
        wrong += r.count_wrong(ch, size)?;
    }
    r.advance();
    Ok(Sample {
        span: t1 - t0,
        wrong,
    })
}

pub struct NcclRank {
    comm: Comm,
    stream: Arc<CudaStream>,
    place: Place,
    send: CudaSlice<u8>,
    recv: CudaSlice<u8>,
    k: u64,
}

impl NcclRank {
    pub fn new(
        world: &SimpleCommunicator,
        stream: Arc<CudaStream>,
        place: Place,
        max_bytes: usize,
    ) -> Result<Self, String> {
        // Rank 0 makes the NCCL unique id; MPI carries it to everyone.
        let mut internal = [0 as std::ffi::c_char; 128];
        if world.rank() == 0 {
            internal = *Id::new()
                .map_err(|e| format!("ncclGetUniqueId: {e:?}"))?
                .internal();
        }
        world.process_at_rank(0).broadcast_into(&mut internal[..]);
        let comm = Comm::from_rank(
            stream.clone(),
            world.rank() as usize,
            world.size() as usize,
            Id::uninit(internal),
        )
        .map_err(|e| format!("ncclCommInitRank: {e:?}"))?;
        let peers = place.peers();
        let alloc = |len: usize| {
            stream
                .alloc_zeros::<u8>(len.max(1))
                .map_err(|e| format!("cudaMalloc: {e:?}"))
        };
        Ok(Self {
            send: alloc(peers * max_bytes)?,
            recv: alloc(peers * max_bytes)?,
            comm,
            stream,
            place,
            k: 0,
        })
    }

    /// One grouped exchange: sends to `send_to`, receives from `recv_from`.
    fn exchange(&mut self, size: usize, send: bool, recv: bool) -> Result<(), String> {
        let e = |x: cudarc::nccl::result::NcclError| format!("NCCL: {x:?}");
        group_start().map_err(e)?;
        for p in 0..self.place.peers() {
            let peer = self.place.mpi_rank(p);
            if send {
                self.comm
                    .send(&self.send.slice(p * size..(p + 1) * size), peer)
                    .map_err(e)?;
            }
            if recv {
                self.comm
                    .recv(&mut self.recv.slice_mut(p * size..(p + 1) * size), peer)
                    .map_err(e)?;
            }
        }
        group_end().map_err(e)?;
        self.stream.synchronize().map_err(|x| format!("{x:?}"))
    }
}

impl GpuRounds for NcclRank {
    fn place(&self) -> Place {
        self.place
    }
    fn fill(&mut self, channel: ChannelId, size: usize) -> Result<(), String> {
        fill_gpu(
            &self.stream,
            &mut self.send,
            self.place,
            channel,
            size,
            self.k,
        )
    }
    fn count_wrong(&self, channel: ChannelId, size: usize) -> Result<u64, String> {
        wrong_on_gpu(&self.stream, &self.recv, self.place, channel, size, self.k)
    }
    fn send(&mut self, _: &SimpleCommunicator, size: usize, _: ChannelId) -> Result<(), String> {
        self.exchange(size, true, false)
    }
    fn recv(&mut self, _: &SimpleCommunicator, size: usize, _: ChannelId) -> Result<(), String> {
        self.exchange(size, false, true)
    }
    fn advance(&mut self) {
        self.k += 1;
    }
}
