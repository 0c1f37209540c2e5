//! The naive GPU-to-GPU baseline for cuda-ipc (feature `cuda`): every rank
//! exports its receive buffer with a CUDA IPC handle (exchanged over MPI);
//! one round is a `cuMemcpyAsync` into each peer's opened buffer (what
//! `cudaMemcpyPeerAsync` does), a stream synchronisation, then a one-byte
//! MPI message per peer saying the data are there. The CPU waits for the
//! GPU every round: what m2n's stream-gated path avoids.

use std::sync::Arc;

use cudarc::driver::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use m2n::proto::ChannelId;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives as _};

use crate::mpi_base;
use crate::nccl_base::{fill_gpu, wrong_on_gpu, GpuRounds};
use crate::run::Place;

const HANDLE: usize = 64;

fn ck(call: &str, code: sys::CUresult) -> Result<(), String> {
    if code == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(format!("{call}: {code:?}"))
    }
}

pub struct IpcRank {
    stream: Arc<CudaStream>,
    place: Place,
    send: CudaSlice<u8>,
    recv: CudaSlice<u8>,
    /// Each peer's receive buffer, opened here.
    peers: Vec<u64>,
    k: u64,
    wait: m2n::WaitPolicy,
}

impl IpcRank {
    pub fn new(
        world: &SimpleCommunicator,
        stream: Arc<CudaStream>,
        place: Place,
        max_bytes: usize,
        wait: m2n::WaitPolicy,
    ) -> Result<Self, String> {
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| format!("{e:?}"))?;
        let n = place.peers();
        let alloc = |len: usize| {
            stream
                .alloc_zeros::<u8>(len.max(1))
                .map_err(|e| format!("cudaMalloc: {e:?}"))
        };
        let (send, recv) = (alloc(n * max_bytes)?, alloc(n * max_bytes)?);
        let dptr = {
            let (d, _sync) = recv.device_ptr(&stream);
            d
        };
        let mut handle = sys::CUipcMemHandle {
            reserved: [0; HANDLE],
        };
        // SAFETY: a cuMemAlloc allocation; valid out-parameter.
        ck("cuIpcGetMemHandle", unsafe {
            sys::cuIpcGetMemHandle(&mut handle, dptr)
        })?;
        let mine: Vec<u8> = handle.reserved.iter().map(|&c| c as u8).collect();
        let mut all = vec![0u8; HANDLE * world.size() as usize];
        world.all_gather_into(&mine[..], &mut all[..]);
        let mut peers = Vec::with_capacity(n);
        for p in 0..n {
            let at = place.mpi_rank(p) as usize * HANDLE;
            let mut h = sys::CUipcMemHandle {
                reserved: [0; HANDLE],
            };
            for (d, s) in h.reserved.iter_mut().zip(&all[at..at + HANDLE]) {
                *d = *s as std::ffi::c_char;
            }
            let mut opened = 0;
            // SAFETY: valid out-parameter; the driver checks the handle.
            ck("cuIpcOpenMemHandle", unsafe {
                sys::cuIpcOpenMemHandle_v2(
                    &mut opened,
                    h,
                    sys::CUipcMem_flags_enum::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
                )
            })?;
            peers.push(opened);
        }
        Ok(Self {
            stream,
            place,
            send,
            recv,
            peers,
            k: 0,
            wait,
        })
    }

    /// Copies one message into each peer's buffer, waits for the GPU, then
    /// tells each peer over MPI.
    fn send_round(
        &mut self,
        world: &SimpleCommunicator,
        size: usize,
        tag: i32,
    ) -> Result<(), String> {
        let src = {
            let (d, _sync) = self.send.device_ptr(&self.stream);
            d
        };
        for (p, &dst) in self.peers.iter().enumerate() {
            // SAFETY: both buffers hold `peers * max_bytes` bytes; offsets are below that (size <= max_bytes).
            ck("cuMemcpyAsync", unsafe {
                sys::cuMemcpyAsync(
                    dst + (self.place.rank * size) as u64,
                    src + (p * size) as u64,
                    size,
                    self.stream.cu_stream(),
                )
            })?;
        }
        self.stream.synchronize().map_err(|e| format!("{e:?}"))?;
        let note = [1u8];
        let sends: Vec<(i32, &[u8])> = (0..self.place.peers())
            .map(|p| (self.place.mpi_rank(p), &note[..]))
            .collect();
        mpi_base::exchange(world, &sends, tag, &mut [], 0, self.wait);
        Ok(())
    }

    /// Waits for every peer's note.
    fn recv_round(&mut self, world: &SimpleCommunicator, tag: i32) {
        let mut notes = vec![[0u8; 1]; self.place.peers()];
        let mut recvs: Vec<(i32, &mut [u8])> = notes
            .iter_mut()
            .enumerate()
            .map(|(p, b)| (self.place.mpi_rank(p), &mut b[..]))
            .collect();
        mpi_base::exchange(world, &[], 0, &mut recvs, tag, self.wait);
    }
}

/// MPI tags of the two channels' notes.
fn tag(channel: ChannelId) -> i32 {
    match channel {
        ChannelId::Dispatch => 11,
        ChannelId::Combine => 12,
    }
}

impl GpuRounds for IpcRank {
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
    fn send(
        &mut self,
        world: &SimpleCommunicator,
        size: usize,
        channel: ChannelId,
    ) -> Result<(), String> {
        self.send_round(world, size, tag(channel))
    }
    fn recv(
        &mut self,
        world: &SimpleCommunicator,
        _: usize,
        channel: ChannelId,
    ) -> Result<(), String> {
        self.recv_round(world, tag(channel));
        Ok(())
    }
    fn advance(&mut self) {
        self.k += 1;
    }
}

impl Drop for IpcRank {
    fn drop(&mut self) {
        let _ = self.stream.context().bind_to_thread();
        for &p in &self.peers {
            // SAFETY: opened by cuIpcOpenMemHandle, closed once.
            unsafe { sys::cuIpcCloseMemHandle(p) };
        }
    }
}
