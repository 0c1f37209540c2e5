//! GPU memory on transports that cannot read it (shm, tcp): each such
//! region has a host stage the transport sends from, and every send first
//! copies the message's bytes from the device to the stage, blocking (the
//! direct API) or on the caller's stream (stream-ordered sends). These
//! transports therefore copy; verbs (GPUDirect RDMA) and cuda-ipc do not.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Communicator, Error, Result};
use crate::stream::{Stream, StreamError, StreamKind};
use crate::transport::{Region, RegionId, Staging};

/// One message's device-to-stage copy.
#[derive(Debug, Clone)]
pub(super) struct StageCopy {
    pub region: RegionId,
    pub staging: Arc<Staging>,
    pub offset: usize,
    pub len: usize,
}

impl StageCopy {
    fn dst(&self) -> usize {
        self.staging.host + self.offset
    }
    fn src(&self) -> u64 {
        self.staging.device + self.offset as u64
    }

    /// Copies now, blocking.
    pub fn run(&self) -> Result<()> {
        (self.staging.copy)(self.dst(), self.src(), self.len).map_err(|e| {
            Error::Stream(StreamError::Call {
                call: "staging copy (device to host)",
                code: e,
            })
        })
    }

    /// Enqueues the copy on `stream`.
    pub fn enqueue(&self, stream: &dyn Stream) -> Result<()> {
        if self.staging.kind != stream.kind() {
            return Err(StreamError::Mixed {
                have: self.staging.kind.name(),
                got: stream.kind().name(),
            }
            .into());
        }
        stream
            .copy_to_host(self.dst(), self.src(), self.len)
            .map_err(Error::from)
    }
}

/// The last round sent from each stage: a stage is overwritten only once
/// that round has left it.
#[derive(Debug, Default)]
pub(super) struct Stages {
    last_round: HashMap<RegionId, u64>,
}

impl Stages {
    pub fn last_round(&self, region: RegionId) -> Option<u64> {
        self.last_round.get(&region).copied()
    }
    pub fn sent_from(&mut self, region: RegionId, round: u64) {
        self.last_round.insert(region, round);
    }
}

impl Communicator {
    /// A host stage for `len` bytes of device memory at `device`.
    pub(super) fn stage(
        &mut self,
        device: u64,
        len: usize,
        kind: StreamKind,
        copy: crate::transport::StagingCopy,
        pin: impl FnOnce(&Region) -> Result<Option<Box<dyn Send + Sync>>>,
    ) -> Result<Region> {
        let stage = self.alloc(len.max(1))?;
        let pin = pin(&stage)?;
        let host = stage.as_ptr() as usize;
        Ok(stage.into_staged(Staging {
            device,
            host,
            kind,
            copy,
            _pin: pin,
        }))
    }

    /// Host memory posing as a GPU's, staged as device memory is on shm
    /// and tcp: for testing the staging path (and stream-ordered sends
    /// from it on a [`crate::stream::HostStream`]) on machines without a
    /// GPU. Sends copy from `ptr` into a stage, as they would from a GPU.
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay valid and readable while the region lives.
    #[doc(hidden)]
    pub unsafe fn register_simulated_device(&mut self, ptr: *mut u8, len: usize) -> Result<Region> {
        let copy: crate::transport::StagingCopy = Box::new(|dst, src, n| {
            // SAFETY: `src` is in the simulated device range the caller vouched for, `dst` in the stage; both `n` long.
            unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, n) };
            Ok(())
        });
        self.stage(ptr as u64, len, StreamKind::Host, copy, |_| Ok(None))
    }
}
