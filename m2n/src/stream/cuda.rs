//! CUDA streams (feature `cuda`): the flag operations are stream memory
//! operations (`cuStreamWriteValue32` / `cuStreamWaitValue32`), executed
//! by the GPU's front end, on flags in pinned host memory mapped into the
//! device's address space. No kernel is launched and no SM waits.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys;

use super::{Flag, FlagBlock, FlagLayout, MappedRegion, Stream, StreamError, StreamKind};
use crate::gpu::Ctx;
use crate::transport::Region;

fn check(call: &'static str, code: sys::CUresult) -> Result<(), StreamError> {
    if code == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(StreamError::Call {
            call,
            code: format!("{code:?}"),
        })
    }
}

/// A CUDA stream (`cudaStream_t` / `CUstream`) borrowed from the caller.
#[derive(Debug)]
pub struct CudaStream {
    raw: sys::CUstream,
    ctx: Ctx,
}

// SAFETY: CUDA streams may be used from any thread.
unsafe impl Send for CudaStream {}
// SAFETY: the driver serialises operations on a stream.
unsafe impl Sync for CudaStream {}

impl CudaStream {
    /// Wraps a stream created by the caller (a `cudaStream_t` from the
    /// runtime API is the same handle; NULL is the legacy default stream
    /// of the calling thread's current context). Fails naming what is
    /// missing on a machine without a driver or GPU.
    ///
    /// # Safety
    /// `raw` must be a live stream handle (or NULL with a current context)
    /// that outlives this value and every operation enqueued through it.
    pub unsafe fn from_raw(raw: *mut c_void) -> Result<Self, StreamError> {
        crate::gpu::init().map_err(|e| StreamError::Unsupported(e.to_string()))?;
        let raw: sys::CUstream = raw.cast();
        let mut ctx: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: valid out-parameter; the caller vouches for the stream.
        check("cuStreamGetCtx", unsafe {
            sys::cuStreamGetCtx(raw, &mut ctx)
        })?;
        if ctx.is_null() {
            return Err(StreamError::Unsupported(
                "the stream has no CUDA context (NULL stream without a current context)".into(),
            ));
        }
        Ok(CudaStream { raw, ctx: Ctx(ctx) })
    }

    /// The raw handle.
    pub fn as_raw(&self) -> *mut c_void {
        self.raw.cast()
    }
}

/// Pinned host memory from `cuMemHostAlloc`.
struct Pinned(*mut c_void, Ctx);
// SAFETY: host memory; freed once, from whichever thread drops it.
unsafe impl Send for Pinned {}
// SAFETY: never accessed through this handle, only freed.
unsafe impl Sync for Pinned {}
impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = self.1.make_current();
        // SAFETY: allocated by cuMemHostAlloc, freed once.
        unsafe { sys::cuMemFreeHost(self.0) };
    }
}

impl Stream for CudaStream {
    fn kind(&self) -> StreamKind {
        StreamKind::Cuda
    }

    fn write_value(
        &self,
        flags: &Arc<FlagBlock>,
        flag: Flag,
        value: u32,
    ) -> Result<(), StreamError> {
        self.ctx.make_current().map_err(gpu_err)?;
        // The default flags order the write after all prior work on the
        // stream, with that work's memory writes visible before it.
        // SAFETY: the flag is mapped pinned memory that outlives the stream operation (the communicator keeps it while operations are out).
        check("cuStreamWriteValue32", unsafe {
            sys::cuStreamWriteValue32_v2(
                self.raw,
                flags.device_addr(flag),
                value,
                sys::CUstreamWriteValue_flags::CU_STREAM_WRITE_VALUE_DEFAULT as u32,
            )
        })
    }

    fn wait_value(
        &self,
        flags: &Arc<FlagBlock>,
        flag: Flag,
        value: u32,
    ) -> Result<(), StreamError> {
        self.ctx.make_current().map_err(gpu_err)?;
        // GEQ compares wrap-aware, as `reached` does.
        // SAFETY: as in write_value.
        check("cuStreamWaitValue32", unsafe {
            sys::cuStreamWaitValue32_v2(
                self.raw,
                flags.device_addr(flag),
                value,
                sys::CUstreamWaitValue_flags::CU_STREAM_WAIT_VALUE_GEQ as u32,
            )
        })
    }

    fn alloc_flags(&self, layout: FlagLayout) -> Result<FlagBlock, StreamError> {
        self.ctx.make_current().map_err(gpu_err)?;
        let bytes = layout.bytes();
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: valid out-parameter.
        check("cuMemHostAlloc", unsafe {
            sys::cuMemHostAlloc(
                &mut p,
                bytes,
                sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP,
            )
        })?;
        let owner = Pinned(p, self.ctx);
        // SAFETY: `bytes` bytes were just allocated at p.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, bytes) };
        let mut dev: sys::CUdeviceptr = 0;
        // SAFETY: p is mapped pinned memory; valid out-parameter.
        check("cuMemHostGetDevicePointer", unsafe {
            sys::cuMemHostGetDevicePointer_v2(&mut dev, p, 0)
        })?;
        // SAFETY: zeroed, page-aligned, layout.bytes() long, freed only when `owner` drops with the block; `dev` is its device address.
        Ok(
            unsafe {
                FlagBlock::from_raw(p.cast(), dev, StreamKind::Cuda, layout, Box::new(owner))
            },
        )
    }

    /// `cuStreamIsCapturing`: inside `cuStreamBeginCapture` /
    /// `cuStreamEndCapture` the memory operations m2n enqueues become
    /// graph nodes (batch memory-operation nodes) with their values and
    /// addresses baked in.
    fn is_capturing(&self) -> Result<bool, StreamError> {
        self.ctx.make_current().map_err(gpu_err)?;
        let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        // SAFETY: a live stream (see from_raw) and a valid out-parameter.
        check("cuStreamIsCapturing", unsafe {
            sys::cuStreamIsCapturing(self.raw, &mut status)
        })?;
        match status {
            sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE => Ok(false),
            sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE => Ok(true),
            _ => Err(StreamError::Capture(
                "the CUDA stream's capture was invalidated".into(),
            )),
        }
    }

    fn map_region(&self, region: &Region, rdma: bool) -> Result<MappedRegion, StreamError> {
        self.ctx.make_current().map_err(gpu_err)?;
        if !region.is_host() && !rdma {
            // Device memory written by copies on the device (cuda-ipc):
            // complete before the arrival is told, nothing to flush.
            return Ok(MappedRegion {
                addr: region.as_ptr() as u64,
                fence: None,
                owner: None,
            });
        }
        if !region.is_host() {
            // Device memory written by the NIC (GPUDirect RDMA): flushed
            // before each arrival is told.
            let ctx = self.ctx;
            let fence: super::Fence = Box::new(move || {
                ctx.make_current().map_err(gpu_err)?;
                // SAFETY: a plain driver call on the current context.
                check("cuFlushGPUDirectRDMAWrites", unsafe {
                    sys::cuFlushGPUDirectRDMAWrites(
                        sys::CUflushGPUDirectRDMAWritesTarget::CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TARGET_CURRENT_CTX,
                        sys::CUflushGPUDirectRDMAWritesScope::CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TO_OWNER,
                    )
                })
            });
            return Ok(MappedRegion {
                addr: region.as_ptr() as u64,
                fence: Some(fence),
                owner: None,
            });
        }
        // Host memory (shm and tcp rings): pinned and mapped, so kernels
        // read it in place over the bus.
        // SAFETY: the ring stays mapped while the communicator lives, and the registration (owner below) goes with it.
        let reg = unsafe { crate::gpu::register_host(self.ctx, region.as_ptr(), region.len()) }
            .map_err(gpu_err)?;
        let addr = reg.device_ptr().map_err(gpu_err)?;
        Ok(MappedRegion {
            addr,
            fence: None,
            owner: Some(Box::new(reg)),
        })
    }

    fn copy_to_host(&self, dst: usize, src: u64, len: usize) -> Result<(), StreamError> {
        self.ctx.make_current().map_err(gpu_err)?;
        // SAFETY: m2n passes a staged region's pinned host stage and the device bytes it stages, both `len` long and live while the round is outstanding.
        check("cuMemcpyDtoHAsync", unsafe {
            sys::cuMemcpyDtoHAsync_v2(dst as *mut c_void, src, len, self.raw)
        })
    }
}

fn gpu_err(e: crate::gpu::GpuError) -> StreamError {
    match e {
        crate::gpu::GpuError::Call { call, code } => StreamError::Call {
            call,
            code: format!("{code:?}"),
        },
        other => StreamError::Unsupported(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn without_a_gpu_wrapping_a_stream_says_what_is_missing() {
        // SAFETY: NULL is the legacy default stream; without a driver the call fails before using it.
        match unsafe { super::CudaStream::from_raw(std::ptr::null_mut()) } {
            Ok(_) => println!("skipped: a CUDA driver and context are present"),
            Err(e) => {
                let text = e.to_string();
                assert!(
                    text.contains("CUDA") || text.contains("GPU") || text.contains("context"),
                    "{text}"
                );
            }
        }
    }
}
