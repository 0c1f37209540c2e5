//! Shared-memory segments: anonymous memfds mapped `MAP_SHARED`.
//!
//! A segment has no name in any file system, so nothing is left behind when
//! its processes exit, crash included. A peer maps it by opening
//! `/proc/<pid>/fd/<fd>` of the owner (same user, while the owner lives) and
//! verifies it by the memfd's name, which carries a random token.

use std::ffi::CString;
use std::fs::File;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::ptr::NonNull;

use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::mman::{madvise, mmap, mmap_anonymous, munmap, MapFlags, MmapAdvise, ProtFlags};

use crate::transport::TransportError;

/// A mapped shared segment; unmapped on drop.
#[derive(Debug)]
pub struct Segment {
    ptr: NonNull<u8>,
    len: usize,
    map_len: usize,
    /// Kept open so peers can find the memfd under /proc; `None` for imports.
    fd: Option<OwnedFd>,
}

// SAFETY: the mapping is plain shared memory; access discipline is the protocol's.
unsafe impl Send for Segment {}
// SAFETY: as above.
unsafe impl Sync for Segment {}

impl Segment {
    /// Creates a segment of `len` bytes (zero-filled) named `name`.
    pub fn create(name: &str, len: usize) -> Result<Self, TransportError> {
        let cname = CString::new(name).expect("segment names have no NUL");
        let fd = memfd_create(&cname, MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(|e| TransportError::os(format!("memfd_create({name})"), e))?;
        let file = File::from(fd);
        file.set_len(len.max(1) as u64)
            .map_err(|e| TransportError::os(format!("ftruncate({name}, {len})"), e))?;
        let fd = OwnedFd::from(file);
        let mut seg = Self::map(fd.as_fd(), len)?;
        seg.fd = Some(fd);
        Ok(seg)
    }

    /// Maps `owner_pid`'s memfd `fd`, checking that it is named `name` and
    /// holds at least `len` bytes.
    pub fn open(owner_pid: u32, fd: i32, name: &str, len: usize) -> Result<Self, TransportError> {
        let path = format!("/proc/{owner_pid}/fd/{fd}");
        let target = std::fs::read_link(&path).map_err(|e| {
            TransportError::os(
                format!("readlink {path} (is the owner alive and the same user?)"),
                e,
            )
        })?;
        let want = format!("/memfd:{name} (deleted)");
        if target.to_string_lossy() != want {
            return Err(TransportError::os(
                format!("{path} is {target:?}, not the segment {want:?}"),
                std::io::Error::from(std::io::ErrorKind::InvalidData),
            ));
        }
        let file = File::options()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| TransportError::os(format!("open {path}"), e))?;
        let size = file
            .metadata()
            .map_err(|e| TransportError::os(format!("fstat {path}"), e))?
            .len();
        if size < len as u64 {
            return Err(TransportError::os(
                format!("{path} holds {size} bytes, the descriptor says {len}"),
                std::io::Error::from(std::io::ErrorKind::InvalidData),
            ));
        }
        // The mapping stays valid after the file closes.
        Self::map(file.as_fd(), len)
    }

    fn map(fd: std::os::fd::BorrowedFd<'_>, len: usize) -> Result<Self, TransportError> {
        let map_len = NonZeroUsize::new(len.max(1)).expect("non-zero");
        // SAFETY: a fresh shared mapping of a file we hold; no existing memory is affected.
        let ptr = unsafe {
            mmap(
                None,
                map_len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }
        .map_err(|e| TransportError::os(format!("mmap of {len} bytes"), e))?;
        Ok(Self {
            ptr: ptr.cast(),
            len,
            map_len: map_len.get(),
            fd: None,
        })
    }

    pub fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn raw_fd(&self) -> i32 {
        self.fd.as_ref().map_or(-1, |fd| fd.as_raw_fd())
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: we own this mapping; all borrows of it are tied to `self`.
        let _ = unsafe { munmap(self.ptr.cast(), self.map_len) };
    }
}

/// Zero-filled memory of this process alone (an anonymous private
/// mapping), for transports whose peers never map it (the fabric
/// transport's rings and sources: the provider moves the bytes). Asked for
/// in huge pages (`MADV_HUGEPAGE`, which Linux's default transparent huge
/// page setting, `madvise`, heeds for such memory and never for memfds):
/// a 1 MiB write copied between processes (libfabric's shm provider)
/// touches one page instead of 256. Where the kernel has no huge pages
/// the advice fails and the memory is ordinary pages.
#[derive(Debug)]
#[cfg_attr(not(feature = "fabric"), allow(dead_code))]
pub struct PrivateMemory {
    /// The mapping (`map_len` bytes) and, inside it, the memory (from
    /// `ptr`, aligned to a huge page where it is one or more).
    map: NonNull<u8>,
    map_len: usize,
    ptr: NonNull<u8>,
}

// SAFETY: plain memory; access discipline is the protocol's.
unsafe impl Send for PrivateMemory {}
// SAFETY: as above.
unsafe impl Sync for PrivateMemory {}

#[cfg_attr(not(feature = "fabric"), allow(dead_code))]
impl PrivateMemory {
    /// x86-64's and aarch64's (4 KiB granule) huge page.
    const HUGE: usize = 2 << 20;

    /// `len` bytes (at least one page is mapped).
    pub fn new(len: usize) -> Result<Self, TransportError> {
        // Memory of a huge page or more starts on one, so that all of its
        // whole huge pages can be: a mapping is only page aligned.
        let pad = if len >= Self::HUGE { Self::HUGE } else { 0 };
        let map_len = NonZeroUsize::new(len.max(1) + pad).expect("non-zero");
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let map = unsafe {
            mmap_anonymous(
                None,
                map_len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }
        .map_err(|e| TransportError::os(format!("mmap of {len} bytes"), e))?
        .cast::<u8>();
        let skip = (map.as_ptr() as usize).next_multiple_of(pad.max(1)) - map.as_ptr() as usize;
        // SAFETY: `skip < pad`, so `ptr..ptr + len` lies in the mapping.
        let ptr = unsafe { map.add(skip) };
        if pad > 0 {
            // Advice only: ordinary pages where it is not taken.
            // SAFETY: advises on our own fresh mapping; no data changes.
            let _ = unsafe { madvise(map.cast(), map_len.get(), MmapAdvise::MADV_HUGEPAGE) };
        }
        Ok(Self {
            map,
            map_len: map_len.get(),
            ptr,
        })
    }

    pub fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }
}

impl Drop for PrivateMemory {
    fn drop(&mut self) {
        // SAFETY: we own this mapping; all borrows of it are tied to `self`.
        let _ = unsafe { munmap(self.map.cast(), self.map_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_memory_is_zeroed_writable_and_huge_page_aligned_from_one_huge_page() {
        for len in [0, 1, 4096, 1 << 20, PrivateMemory::HUGE, 5 << 20] {
            let mem = PrivateMemory::new(len).unwrap();
            let p = mem.as_ptr().as_ptr();
            let want = if len >= PrivateMemory::HUGE {
                PrivateMemory::HUGE
            } else {
                4096
            };
            assert_eq!(p as usize % want, 0, "{len} bytes at {p:?}");
            // SAFETY: `len` bytes from `p` are this mapping's.
            let bytes = unsafe { std::slice::from_raw_parts_mut(p, len) };
            assert!(bytes.iter().all(|&b| b == 0), "{len} bytes not zeroed");
            bytes.iter_mut().for_each(|b| *b = 0xa5);
            // The last byte is inside the mapping (the padding comes before).
            assert!(bytes.last().is_none_or(|&b| b == 0xa5));
        }
    }
}
