//! The completion queues of a process, in shared memory.
//!
//! One single-producer, single-consumer ring per peer: peer `p` is the only
//! writer of ring `p` (its `tail`), this process the only reader (its
//! `head`). An entry is the immediate and length of one write; the writer
//! publishes it with a release store of `tail` after copying the payload,
//! so the payload is visible once the entry is.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::transport::segment::Segment;
use crate::transport::TransportError;

const HEADER: usize = 128;
const ENTRY: usize = 8;

/// Bytes of an inbox for `world` peers with `cap` entries each.
pub fn inbox_bytes(world: usize, cap: usize) -> usize {
    HEADER * (world + 1) + world * cap * ENTRY
}

/// A view of one ring in a (local or peer's) inbox segment.
#[derive(Debug, Clone, Copy)]
pub struct Ring {
    head: NonNull<AtomicU64>,
    tail: NonNull<AtomicU64>,
    entries: NonNull<u8>,
    cap: u64,
}

// SAFETY: the ring points into a shared mapping kept alive by its owner; all
// shared words are accessed atomically.
unsafe impl Send for Ring {}

impl Ring {
    /// Ring `index` of an inbox laid out for `world` peers of `cap` entries.
    pub fn of(seg: &Segment, world: usize, cap: usize, index: usize) -> Self {
        assert!(index < world && seg.len() >= inbox_bytes(world, cap));
        let base = seg.as_ptr().as_ptr();
        // SAFETY: offsets are inside the segment (asserted above); the header
        // words are 64-byte aligned within a page-aligned mapping.
        unsafe {
            let hdr = base.add(HEADER * (index + 1));
            Self {
                head: NonNull::new_unchecked(hdr.cast()),
                tail: NonNull::new_unchecked(hdr.add(64).cast()),
                entries: NonNull::new_unchecked(
                    base.add(HEADER * (world + 1) + index * cap * ENTRY),
                ),
                cap: cap as u64,
            }
        }
    }

    fn head(&self) -> &AtomicU64 {
        // SAFETY: aligned, in the mapping, and only ever accessed atomically.
        unsafe { self.head.as_ref() }
    }
    fn tail(&self) -> &AtomicU64 {
        // SAFETY: as for `head`.
        unsafe { self.tail.as_ref() }
    }

    /// Producer side: whether one more entry fits. `peer` names the ring's
    /// owner for errors.
    pub fn has_room(&self, peer: usize) -> Result<bool, TransportError> {
        let head = self.head().load(Ordering::Acquire);
        let tail = self.tail().load(Ordering::Relaxed);
        match tail.checked_sub(head) {
            Some(used) if used <= self.cap => Ok(used < self.cap),
            _ => Err(TransportError::Corrupt {
                peer,
                detail: format!("its completion ring reads head {head}, our tail {tail}"),
            }),
        }
    }

    /// Producer side: how many more entries fit. `peer` names the ring's
    /// owner for errors.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn free(&self, peer: usize) -> Result<u64, TransportError> {
        let head = self.head().load(Ordering::Acquire);
        let tail = self.tail().load(Ordering::Relaxed);
        match tail.checked_sub(head) {
            Some(used) if used <= self.cap => Ok(self.cap - used),
            _ => Err(TransportError::Corrupt {
                peer,
                detail: format!("its completion ring reads head {head}, our tail {tail}"),
            }),
        }
    }

    /// Producer side: appends an entry. The caller checked `has_room`.
    pub fn push(&self, imm: u32, len: u32) {
        let tail = self.tail().load(Ordering::Relaxed);
        let at = (tail % self.cap) as usize * ENTRY;
        let word = (u64::from(len) << 32) | u64::from(imm);
        // SAFETY: `at` is inside the ring's entry array; the slot is free
        // (has_room) so the consumer does not read it now.
        unsafe {
            self.entries
                .as_ptr()
                .add(at)
                .cast::<u64>()
                .write_volatile(word)
        };
        self.tail().store(tail + 1, Ordering::Release);
    }

    /// Consumer side: drains entries into `f(imm, len)`. `peer` names the
    /// producer for errors.
    pub fn drain(&self, peer: usize, mut f: impl FnMut(u32, u32)) -> Result<(), TransportError> {
        let head = self.head().load(Ordering::Relaxed);
        let tail = self.tail().load(Ordering::Acquire);
        if tail == head {
            return Ok(());
        }
        if tail < head || tail - head > self.cap {
            return Err(TransportError::Corrupt {
                peer,
                detail: format!(
                    "it moved our completion ring's tail to {tail} (head {head}, capacity {})",
                    self.cap
                ),
            });
        }
        for i in head..tail {
            let at = (i % self.cap) as usize * ENTRY;
            // SAFETY: inside the entry array; published by the release store of `tail`.
            let word = unsafe { self.entries.as_ptr().add(at).cast::<u64>().read_volatile() };
            f(word as u32, (word >> 32) as u32);
        }
        self.head().store(tail, Ordering::Release);
        Ok(())
    }
}
