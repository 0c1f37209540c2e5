//! GPU memory (feature `cuda`): the CUDA driver API through `cudarc`,
//! loaded at run time. Every entry point first checks that a driver and a
//! device are there, and says which is missing.

use cudarc::driver::sys;

/// Why GPU memory cannot be used here.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no CUDA driver found (libcuda.so could not be loaded): this machine has no NVIDIA GPU driver")]
    NoDriver,
    #[error("{call} failed: {code:?}")]
    Call {
        call: &'static str,
        code: sys::CUresult,
    },
    #[error("the CUDA driver reports no GPU")]
    NoDevice,
    #[error("{0:#x} is not device memory of this process")]
    NotDevice(u64),
    #[error("GPU {device} was asked for (M2N_CUDA_DEVICE), but this machine has {count}")]
    NoSuchDevice { device: usize, count: usize },
}

fn check(call: &'static str, code: sys::CUresult) -> Result<(), GpuError> {
    if code == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(GpuError::Call { call, code })
    }
}

/// Loads and initialises the driver; returns the number of GPUs.
pub fn init() -> Result<usize, GpuError> {
    // SAFETY: only tries to dlopen the driver library.
    if !unsafe { sys::is_culib_present() } {
        return Err(GpuError::NoDriver);
    }
    // SAFETY: the library is present; cuInit may be called any number of times.
    check("cuInit", unsafe { sys::cuInit(0) })?;
    let mut n = 0;
    // SAFETY: valid out-parameter.
    check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut n) })?;
    if n <= 0 {
        return Err(GpuError::NoDevice);
    }
    Ok(n as usize)
}

/// A dma-buf file descriptor for device memory `dptr..dptr+len`, for
/// `ibv_reg_dmabuf_mr`.
pub fn dmabuf_fd(dptr: u64, len: usize) -> Result<std::os::fd::OwnedFd, GpuError> {
    use std::os::fd::FromRawFd;
    init()?;
    let mut fd: std::ffi::c_int = -1;
    // SAFETY: valid out-parameter; the driver checks the range.
    check("cuMemGetHandleForAddressRange", unsafe {
        sys::cuMemGetHandleForAddressRange(
            (&mut fd as *mut std::ffi::c_int).cast(),
            dptr,
            len,
            sys::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
            0,
        )
    })?;
    // SAFETY: on success the driver hands us a new file descriptor.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// A context handle that may move between threads (the driver's handles
/// are thread-safe; the pointer is only ever passed back to it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx(pub(crate) sys::CUcontext);
// SAFETY: CUDA contexts may be made current on any thread.
unsafe impl Send for Ctx {}
// SAFETY: as above; the handle is never dereferenced here.
unsafe impl Sync for Ctx {}

impl Ctx {
    pub(crate) fn make_current(self) -> Result<(), GpuError> {
        // SAFETY: a context handle the driver gave us.
        check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.0) })
    }
}

/// The context that owns device memory at `dptr` (which checks that it is
/// device memory of this process at all).
pub(crate) fn pointer_context(dptr: u64) -> Result<Ctx, GpuError> {
    init()?;
    let mut ctx: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: valid out-parameter of the attribute's type; the driver checks the pointer.
    check("cuPointerGetAttribute(CONTEXT)", unsafe {
        sys::cuPointerGetAttribute(
            (&mut ctx as *mut sys::CUcontext).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_CONTEXT,
            dptr,
        )
    })?;
    if ctx.is_null() {
        return Err(GpuError::NotDevice(dptr));
    }
    Ok(Ctx(ctx))
}

/// Host memory registered with `cuMemHostRegister` (pinned, mapped) until
/// dropped.
pub(crate) struct Registered(*mut std::ffi::c_void, Ctx);
// SAFETY: host memory; unregistered once, from whichever thread drops it.
unsafe impl Send for Registered {}
// SAFETY: never accessed through this handle, only unregistered.
unsafe impl Sync for Registered {}

impl Drop for Registered {
    fn drop(&mut self) {
        let _ = self.1.make_current();
        // SAFETY: registered by cuMemHostRegister, unregistered once.
        unsafe { sys::cuMemHostUnregister(self.0) };
    }
}

impl Registered {
    /// The registered memory's device address.
    pub(crate) fn device_ptr(&self) -> Result<u64, GpuError> {
        let mut dev: sys::CUdeviceptr = 0;
        // SAFETY: registered memory; valid out-parameter.
        check("cuMemHostGetDevicePointer", unsafe {
            sys::cuMemHostGetDevicePointer_v2(&mut dev, self.0, 0)
        })?;
        Ok(dev)
    }
}

/// Pins and maps `len` bytes of host memory at `ptr` in `ctx`.
///
/// # Safety
/// The memory must stay mapped until the returned value is dropped.
pub(crate) unsafe fn register_host(
    ctx: Ctx,
    ptr: *mut u8,
    len: usize,
) -> Result<Registered, GpuError> {
    ctx.make_current()?;
    // SAFETY: the caller keeps the memory mapped while registered.
    check("cuMemHostRegister", unsafe {
        sys::cuMemHostRegister_v2(
            ptr.cast(),
            len,
            sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP,
        )
    })?;
    Ok(Registered(ptr.cast(), ctx))
}

/// GPU `device`'s primary context (retained: it stays while the process
/// runs) and the device handle.
pub(crate) fn primary_context(device: usize) -> Result<(Ctx, sys::CUdevice), GpuError> {
    let n = init()?;
    if device >= n {
        return Err(GpuError::NoSuchDevice { device, count: n });
    }
    let mut dev: sys::CUdevice = 0;
    // SAFETY: valid out-parameter; the ordinal was checked.
    check("cuDeviceGet", unsafe {
        sys::cuDeviceGet(&mut dev, device as i32)
    })?;
    let mut ctx: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: valid out-parameter and device.
    check("cuDevicePrimaryCtxRetain", unsafe {
        sys::cuDevicePrimaryCtxRetain(&mut ctx, dev)
    })?;
    Ok((Ctx(ctx), dev))
}

/// Device memory m2n allocated (receive rings), zeroed, freed on drop.
#[derive(Debug)]
pub(crate) struct DeviceBuffer {
    pub(crate) dptr: u64,
    pub(crate) len: usize,
    ctx: Ctx,
}

impl DeviceBuffer {
    /// `len` zeroed bytes on GPU `device` (in its primary context, which
    /// stays retained while the process runs).
    pub(crate) fn alloc(device: usize, len: usize) -> Result<Self, GpuError> {
        Self::alloc_in(primary_context(device)?.0, len)
    }

    /// `len` zeroed bytes in `ctx`.
    pub(crate) fn alloc_in(ctx: Ctx, len: usize) -> Result<Self, GpuError> {
        ctx.make_current()?;
        let mut dptr: sys::CUdeviceptr = 0;
        // SAFETY: valid out-parameter, current context.
        check("cuMemAlloc", unsafe {
            sys::cuMemAlloc_v2(&mut dptr, len.max(1))
        })?;
        let buf = DeviceBuffer { dptr, len, ctx };
        // SAFETY: the allocation just made.
        check("cuMemsetD8", unsafe {
            sys::cuMemsetD8_v2(dptr, 0, len.max(1))
        })?;
        Ok(buf)
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let _ = self.ctx.make_current();
        // SAFETY: allocated by cuMemAlloc in `ctx`, freed once.
        unsafe { sys::cuMemFree_v2(self.dptr) };
    }
}

/// Copies `len` bytes from device address `src` to host address `dst`,
/// blocking until done.
pub(crate) fn copy_to_host(ctx: Ctx, dst: usize, src: u64, len: usize) -> Result<(), GpuError> {
    ctx.make_current()?;
    // SAFETY: the caller names a host destination of `len` writable bytes and a device source of `len` bytes; the driver checks the latter.
    check("cuMemcpyDtoH", unsafe {
        sys::cuMemcpyDtoH_v2(dst as *mut std::ffi::c_void, src, len)
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn device_memory_exports_as_dma_buf_where_the_driver_can() {
        if let Err(e) = super::init() {
            println!("skipped: {e}");
            return;
        }
        let len = 2 << 20;
        let buf = super::DeviceBuffer::alloc(0, len).expect("cuMemAlloc on GPU 0");
        assert_eq!(
            super::pointer_context(buf.dptr)
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Ok(()),
            "a cuMemAlloc pointer is device memory"
        );
        let host = [0u8; 16];
        assert!(
            super::pointer_context(host.as_ptr() as u64).is_err(),
            "host memory is not device memory"
        );
        match super::dmabuf_fd(buf.dptr, len) {
            Ok(fd) => {
                use std::os::fd::AsRawFd;
                let st = nix::sys::stat::fstat(fd.as_raw_fd()).expect("fstat of the dma-buf");
                println!(
                    "dma-buf export of {len} B of device memory: fd {} (size {})",
                    fd.as_raw_fd(),
                    st.st_size
                );
            }
            Err(super::GpuError::Call {
                code: super::sys::CUresult::CUDA_ERROR_NOT_SUPPORTED,
                ..
            }) => {
                println!("dma-buf export: not supported by this driver or kernel (GPUDirect RDMA would take the peer-memory path)");
            }
            Err(e) => panic!("dma-buf export failed: {e}"),
        }
    }

    #[test]
    fn without_a_gpu_the_error_says_so() {
        match super::init() {
            Ok(n) => println!("skipped: {n} GPU(s) present"),
            Err(e) => {
                let text = e.to_string();
                assert!(
                    text.contains("CUDA driver") || text.contains("no GPU"),
                    "{text}"
                );
                let err = super::dmabuf_fd(0x1000, 4096).unwrap_err();
                assert!(
                    err.to_string().contains("CUDA") || err.to_string().contains("GPU"),
                    "{err}"
                );
            }
        }
    }
}
