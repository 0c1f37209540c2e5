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

#[cfg(test)]
mod tests {
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
