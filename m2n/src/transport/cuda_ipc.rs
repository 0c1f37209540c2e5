//! The cuda-ipc backend (feature `cuda`): processes on one host, receive
//! rings in GPU memory.
//!
//! Rings are `cuMemAlloc`ed and exported with CUDA IPC handles; peers open
//! them (`cuIpcOpenMemHandle`) and a write is an asynchronous copy
//! (`cuMemcpyAsync`, device to device for GPU sources: copy engines move
//! the bytes, no SM does) on the transport's own stream, followed by an
//! event. When the event has completed, the write's immediate goes into
//! the peer's shared-memory inbox, exactly as the shm transport delivers
//! it, so an arrival is only ever reported once its bytes are in. Host
//! regions (credits) and writes between them are the shm transport's.

use std::collections::VecDeque;
use std::sync::Arc;

use cudarc::driver::sys;

use super::shm::ShmTransport;
use super::{
    check_range, Completion, Lane, LocalMemory, Region, RegionId, RemoteRegion, Transport,
    TransportError, TransportKind, WriteRequest,
};
use crate::codec::{Reader, Writer};
use crate::gpu::Ctx;

const REGION_MAGIC: u32 = 0x4d32_4e43; // "M2NC"
/// Remote keys of device regions carry this bit (shm's keys count from 0).
const DEVICE_KEY: u32 = 1 << 31;
const HANDLE_BYTES: usize = 64;

fn check(call: &'static str, code: sys::CUresult) -> Result<(), TransportError> {
    if code == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(unavailable(format!("{call} failed: {code:?}")))
    }
}

fn unavailable(why: String) -> TransportError {
    TransportError::Unavailable(TransportKind::CudaIpc, why)
}

/// Device memory the transport allocated (a ring).
#[derive(Debug)]
struct DeviceAlloc(crate::gpu::DeviceBuffer);

impl LocalMemory for DeviceAlloc {
    fn base(&self) -> *mut u8 {
        self.0.dptr as *mut u8
    }
    fn len(&self) -> usize {
        self.0.len
    }
    fn is_device(&self) -> bool {
        true
    }
}

/// Device memory the application registered as a source.
#[derive(Debug)]
struct DeviceExternal {
    dptr: u64,
    len: usize,
}

impl LocalMemory for DeviceExternal {
    fn base(&self) -> *mut u8 {
        self.dptr as *mut u8
    }
    fn len(&self) -> usize {
        self.len
    }
    fn is_device(&self) -> bool {
        true
    }
}

/// A peer's ring, opened through its IPC handle.
#[derive(Debug)]
struct Opened {
    peer: usize,
    dptr: u64,
    len: usize,
}

/// A copy in flight: what to report when its event completes.
#[derive(Debug)]
struct Pending {
    event: sys::CUevent,
    peer: usize,
    imm: Option<u32>,
    len: u32,
    signaled: bool,
    wr_id: u64,
}

/// The cuda-ipc transport of one process (see the module docs).
#[derive(Debug)]
pub struct CudaIpcTransport {
    shm: ShmTransport,
    ctx: Ctx,
    device: i32,
    stream: sys::CUstream,
    opened: Vec<Opened>,
    pending: VecDeque<Pending>,
    /// Immediates per peer whose copies are in flight (they need room in
    /// the peer's inbox when they complete).
    in_flight: Vec<u64>,
    spare_events: Vec<sys::CUevent>,
}

// SAFETY: the stream and event handles are the driver's, usable from any thread; the transport is used by one thread at a time (&mut self).
unsafe impl Send for CudaIpcTransport {}

impl CudaIpcTransport {
    /// The transport of rank `me` of `world` on GPU `device` (its primary
    /// context), with inbox rings of `queue_depth` entries.
    pub fn new(
        me: usize,
        world: usize,
        queue_depth: usize,
        device: usize,
    ) -> Result<Self, TransportError> {
        let (ctx, dev) =
            crate::gpu::primary_context(device).map_err(|e| unavailable(e.to_string()))?;
        ctx.make_current().map_err(|e| unavailable(e.to_string()))?;
        let mut stream: sys::CUstream = std::ptr::null_mut();
        // SAFETY: valid out-parameter, current context.
        check("cuStreamCreate", unsafe {
            sys::cuStreamCreate(
                &mut stream,
                sys::CUstream_flags_enum::CU_STREAM_NON_BLOCKING as u32,
            )
        })?;
        Ok(Self {
            shm: ShmTransport::new(me, world, queue_depth)?,
            ctx,
            device: dev,
            stream,
            opened: Vec::new(),
            pending: VecDeque::new(),
            in_flight: vec![0; world],
            spare_events: Vec::new(),
        })
    }

    fn current(&self) -> Result<(), TransportError> {
        self.ctx
            .make_current()
            .map_err(|e| unavailable(e.to_string()))
    }

    fn event(&mut self) -> Result<sys::CUevent, TransportError> {
        if let Some(e) = self.spare_events.pop() {
            return Ok(e);
        }
        let mut e: sys::CUevent = std::ptr::null_mut();
        // SAFETY: valid out-parameter, current context.
        check("cuEventCreate", unsafe {
            sys::cuEventCreate(
                &mut e,
                sys::CUevent_flags_enum::CU_EVENT_DISABLE_TIMING as u32,
            )
        })?;
        Ok(e)
    }

    fn opened(&self, peer: usize, key: u32) -> Result<&Opened, TransportError> {
        self.opened
            .get((key & !DEVICE_KEY) as usize)
            .filter(|o| o.peer == peer)
            .ok_or(TransportError::NotConnected(peer))
    }
}

impl Drop for CudaIpcTransport {
    fn drop(&mut self) {
        let _ = self.ctx.make_current();
        // SAFETY: handles created here, released once; copies in flight finish first so no event or mapping is freed under them.
        unsafe {
            sys::cuStreamSynchronize(self.stream);
            for p in self.pending.drain(..) {
                sys::cuEventDestroy_v2(p.event);
            }
            for e in self.spare_events.drain(..) {
                sys::cuEventDestroy_v2(e);
            }
            for o in &self.opened {
                sys::cuIpcCloseMemHandle(o.dptr);
            }
            sys::cuStreamDestroy_v2(self.stream);
            sys::cuDevicePrimaryCtxRelease_v2(self.device);
        }
    }
}

impl Transport for CudaIpcTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::CudaIpc
    }

    fn describe(&self) -> String {
        format!("cuda-ipc (GPU {})", self.device)
    }

    fn endpoint(&self) -> Vec<u8> {
        self.shm.endpoint()
    }

    fn alloc(&mut self, len: usize) -> Result<Region, TransportError> {
        self.shm.alloc(len)
    }

    fn alloc_gpu_ring(&mut self, len: usize, _device: usize) -> Result<Region, TransportError> {
        self.alloc_ring(len)
    }

    fn alloc_ring(&mut self, len: usize) -> Result<Region, TransportError> {
        let buf = crate::gpu::DeviceBuffer::alloc_in(self.ctx, len)
            .map_err(|e| unavailable(e.to_string()))?;
        let dptr = buf.dptr;
        let mem = Arc::new(DeviceAlloc(buf));
        let mut handle = sys::CUipcMemHandle {
            reserved: [0; HANDLE_BYTES],
        };
        // SAFETY: valid out-parameter; dptr is a cuMemAlloc allocation.
        check("cuIpcGetMemHandle", unsafe {
            sys::cuIpcGetMemHandle(&mut handle, dptr)
        })?;
        let bytes: Vec<u8> = handle.reserved.iter().map(|&c| c as u8).collect();
        let descriptor = Writer::new()
            .u32(REGION_MAGIC)
            .bytes(self.shm.host().as_bytes())
            .bytes(&bytes)
            .u64(len as u64)
            .finish();
        let mut region = self.shm.locals_mut().add_device(mem);
        region.descriptor = descriptor;
        Ok(region)
    }

    unsafe fn register(&mut self, ptr: *mut u8, len: usize) -> Result<Region, TransportError> {
        // SAFETY: forwarded contract.
        unsafe { self.shm.register(ptr, len) }
    }

    unsafe fn register_device(&mut self, dptr: u64, len: usize) -> Result<Region, TransportError> {
        Ok(self
            .shm
            .locals_mut()
            .add_device(Arc::new(DeviceExternal { dptr, len })))
    }

    fn connect(&mut self, peer: usize, endpoint: &[u8]) -> Result<(), TransportError> {
        self.shm.connect(peer, endpoint).map_err(|e| match e {
            TransportError::Unavailable(TransportKind::Shm, why) => {
                unavailable(format!("needs every rank on one host: {why}"))
            }
            other => other,
        })
    }

    fn import(&mut self, peer: usize, descriptor: &[u8]) -> Result<RemoteRegion, TransportError> {
        if descriptor.len() < 4 || descriptor[..4] != REGION_MAGIC.to_le_bytes() {
            return self.shm.import(peer, descriptor);
        }
        let bad = |source| TransportError::BadDescriptor { peer, source };
        let mut r = Reader::new(descriptor);
        r.magic(
            "cuda-ipc region magic",
            REGION_MAGIC,
            "a cuda-ipc region descriptor",
        )
        .map_err(bad)?;
        let host = r.bytes("host id", 256).map_err(bad)?;
        let raw = r.bytes("IPC handle", HANDLE_BYTES).map_err(bad)?.to_vec();
        let len = r.len("region length").map_err(bad)?;
        r.finish().map_err(bad)?;
        if host != self.shm.host().as_bytes() {
            return Err(unavailable(format!(
                "peer {peer}'s ring is on another host or kernel"
            )));
        }
        if raw.len() != HANDLE_BYTES {
            return Err(bad(crate::codec::DecodeError::Invalid {
                field: "IPC handle",
                detail: format!("{} bytes, not {HANDLE_BYTES}", raw.len()),
            }));
        }
        let mut handle = sys::CUipcMemHandle {
            reserved: [0; HANDLE_BYTES],
        };
        for (d, s) in handle.reserved.iter_mut().zip(&raw) {
            *d = *s as std::ffi::c_char;
        }
        self.current()?;
        let mut dptr: sys::CUdeviceptr = 0;
        // SAFETY: valid out-parameter; the driver validates the handle.
        check("cuIpcOpenMemHandle", unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut dptr,
                handle,
                sys::CUipcMem_flags_enum::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
        })?;
        let key = DEVICE_KEY | self.opened.len() as u32;
        self.opened.push(Opened { peer, dptr, len });
        Ok(RemoteRegion { peer, key, len })
    }

    unsafe fn post_write(
        &mut self,
        peer: usize,
        lane: Lane,
        req: &WriteRequest,
    ) -> Result<(), TransportError> {
        let (dst_base, remote_len) = if req.remote.key & DEVICE_KEY != 0 {
            let o = self.opened(peer, req.remote.key)?;
            (o.dptr, o.len)
        } else {
            let local = self.shm.locals().get(req.local)?;
            if !local.is_device() {
                // Host to host (credits): the shm transport's store.
                // SAFETY: forwarded contract.
                return unsafe { self.shm.post_write(peer, lane, req) };
            }
            return Err(unavailable(
                "a write from GPU memory into a peer's host region (only rings are GPU memory)"
                    .into(),
            ));
        };
        check_range("remote", peer, req.remote_offset, req.len, remote_len)?;
        let local = self.shm.locals().source(peer, req, remote_len)?;
        if req.imm.is_some() && self.shm.ring_free(peer)? <= self.in_flight[peer] {
            return Err(TransportError::WouldBlock);
        }
        self.current()?;
        let event = self.event()?;
        let src = local.base() as u64 + req.local_offset as u64;
        let dst = dst_base + req.remote_offset as u64;
        // SAFETY: both ranges were bounds-checked against live memory (a registered or allocated source; the peer's opened ring, ours to write by credit); unified addressing tells the driver which side is host and which device.
        let copied = check("cuMemcpyAsync", unsafe {
            sys::cuMemcpyAsync(dst, src, req.len, self.stream)
        });
        let recorded = copied.and_then(|()| {
            // SAFETY: an event of this context, recorded on our stream.
            let code = unsafe { sys::cuEventRecord(event, self.stream) };
            check("cuEventRecord", code)
        });
        if let Err(e) = recorded {
            self.spare_events.push(event);
            return Err(e);
        }
        if req.imm.is_some() {
            self.in_flight[peer] += 1;
        }
        self.pending.push_back(Pending {
            event,
            peer,
            imm: req.imm,
            len: req.len as u32,
            signaled: req.signaled,
            wr_id: req.wr_id,
        });
        Ok(())
    }

    fn owns(&self, region: RegionId) -> bool {
        self.shm.owns(region)
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<(), TransportError> {
        // The poll may run on another thread than the posts (a proxy).
        if !self.pending.is_empty() {
            self.current()?;
        }
        // Copies complete in order on the one stream: report them in order.
        while let Some(p) = self.pending.front() {
            // SAFETY: an event recorded on our stream.
            let state = unsafe { sys::cuEventQuery(p.event) };
            if state == sys::CUresult::CUDA_ERROR_NOT_READY {
                break;
            }
            check("cuEventQuery", state)?;
            let p = self.pending.pop_front().expect("front exists");
            if let Some(imm) = p.imm {
                self.in_flight[p.peer] -= 1;
                self.shm.notify(p.peer, imm, p.len)?;
            }
            if p.signaled {
                out.push(Completion::WriteDone { wr_id: p.wr_id });
            }
            self.spare_events.push(p.event);
        }
        self.shm.poll(out)
    }
}
