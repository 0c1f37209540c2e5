//! The shared-memory backend, for processes on one host.
//!
//! Every region is a memfd segment that peers map (see [`crate::transport::segment`]). A write
//! is one `memcpy` from the local region into the peer's mapping of the
//! remote region, followed, for writes with an immediate, by an entry in the
//! peer's completion ring for this process (see [`inbox`]). Local
//! completions are immediate: the copy is done when `post_write` returns.
//!
//! Lanes need no separate queues here: an ACK is a single atomic store.

mod inbox;

use std::sync::Arc;

use super::segment::Segment;
use inbox::{inbox_bytes, Ring};

use super::{
    Completion, Lane, LocalRegions, Region, RegionId, RemoteRegion, Transport, TransportError,
    TransportKind, WriteRequest,
};
use crate::codec::{DecodeError, Reader, Writer};

const ENDPOINT_MAGIC: u32 = 0x4d32_4e53; // "M2NS"
const REGION_MAGIC: u32 = 0x4d32_4e52; // "M2NR"
const MAX_NAME: usize = 256;

#[derive(Debug)]
struct PeerInbox {
    _seg: Segment,
    /// Our ring in the peer's inbox (we produce).
    ring: Ring,
}

#[derive(Debug)]
struct Imported {
    peer: usize,
    seg: Segment,
}

/// The shared-memory transport of one process.
#[derive(Debug)]
pub struct ShmTransport {
    me: usize,
    world: usize,
    cap: usize,
    pid: u32,
    token: u64,
    host: String,
    inbox: Segment,
    /// Our inbox's rings, one per producing peer (we consume).
    rings: Vec<Ring>,
    peers: Vec<Option<PeerInbox>>,
    locals: LocalRegions,
    imports: Vec<Imported>,
    done: Vec<Completion>,
}

impl ShmTransport {
    /// Creates the transport of transport rank `me` in a group of `world`,
    /// with completion rings of `queue_depth` entries per peer.
    pub fn new(me: usize, world: usize, queue_depth: usize) -> Result<Self, TransportError> {
        assert!(me < world && queue_depth > 0);
        let mut token = [0u8; 8];
        getrandom::getrandom(&mut token)
            .map_err(|e| TransportError::os("getrandom", std::io::Error::other(e.to_string())))?;
        let token = u64::from_le_bytes(token);
        let inbox = Segment::create(
            &format!("m2n-{token:016x}-inbox"),
            inbox_bytes(world, queue_depth),
        )?;
        let rings = (0..world)
            .map(|p| Ring::of(&inbox, world, queue_depth, p))
            .collect();
        Ok(Self {
            me,
            world,
            cap: queue_depth,
            pid: std::process::id(),
            token,
            host: super::host_identity(),
            inbox,
            rings,
            peers: (0..world).map(|_| None).collect(),
            locals: LocalRegions::default(),
            imports: Vec::new(),
            // Sized at start for what accumulates between polls (no more
            // writes than a completion ring holds), so that a new high in
            // the steady state allocates nothing.
            done: Vec::with_capacity(queue_depth),
        })
    }

    pub(crate) fn decode_endpoint(
        peer: usize,
        blob: &[u8],
    ) -> Result<(u32, i32, u32, u32, String, String), DecodeError> {
        let mut r = Reader::new(blob);
        r.magic(
            "shm endpoint magic",
            ENDPOINT_MAGIC,
            &format!("a shm endpoint (from peer {peer})"),
        )?;
        let pid = r.u32("pid")?;
        let fd = r.u32("inbox fd")? as i32;
        let world = r.u32("world")?;
        let cap = r.u32("queue depth")?;
        let name = String::from_utf8_lossy(r.bytes("inbox name", MAX_NAME)?).into_owned();
        let host = String::from_utf8_lossy(r.bytes("host id", MAX_NAME)?).into_owned();
        r.finish()?;
        Ok((pid, fd, world, cap, name, host))
    }
}

/// What the cuda-ipc transport builds on: the inbox rings and the
/// region table.
#[cfg(feature = "cuda")]
impl ShmTransport {
    pub(crate) fn locals(&self) -> &LocalRegions {
        &self.locals
    }
    pub(crate) fn locals_mut(&mut self) -> &mut LocalRegions {
        &mut self.locals
    }
    pub(crate) fn host(&self) -> &str {
        &self.host
    }
    fn ring_to(&self, peer: usize) -> Result<Ring, TransportError> {
        Ok(self
            .peers
            .get(peer)
            .and_then(|p| p.as_ref())
            .ok_or(TransportError::NotConnected(peer))?
            .ring)
    }
    /// Free entries in our ring in `peer`'s inbox.
    pub(crate) fn ring_free(&self, peer: usize) -> Result<u64, TransportError> {
        self.ring_to(peer)?.free(peer)
    }
    /// Tells `peer` a write with immediate `imm` of `len` bytes landed
    /// (the caller checked there is room).
    pub(crate) fn notify(&self, peer: usize, imm: u32, len: u32) -> Result<(), TransportError> {
        self.ring_to(peer)?.push(imm, len);
        Ok(())
    }
}

impl Transport for ShmTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Shm
    }

    fn endpoint(&self) -> Vec<u8> {
        Writer::new()
            .u32(ENDPOINT_MAGIC)
            .u32(self.pid)
            .u32(self.inbox.raw_fd() as u32)
            .u32(self.world as u32)
            .u32(self.cap as u32)
            .bytes(format!("m2n-{:016x}-inbox", self.token).as_bytes())
            .bytes(self.host.as_bytes())
            .finish()
    }

    fn alloc(&mut self, len: usize) -> Result<Region, TransportError> {
        let id = self.locals.next_id();
        let name = format!("m2n-{:016x}-r{}", self.token, id.index());
        let seg = Arc::new(Segment::create(&name, len)?);
        let descriptor = Writer::new()
            .u32(REGION_MAGIC)
            .u32(self.pid)
            .u32(seg.raw_fd() as u32)
            .u64(len as u64)
            .bytes(name.as_bytes())
            .finish();
        Ok(self.locals.add(seg, descriptor))
    }

    unsafe fn register(&mut self, ptr: *mut u8, len: usize) -> Result<Region, TransportError> {
        // SAFETY: forwarded contract.
        unsafe { self.locals.add_external(ptr, len) }
    }

    fn connect(&mut self, peer: usize, endpoint: &[u8]) -> Result<(), TransportError> {
        if peer >= self.world {
            return Err(TransportError::NotConnected(peer));
        }
        let (pid, fd, world, cap, name, host) = Self::decode_endpoint(peer, endpoint)
            .map_err(|source| TransportError::BadDescriptor { peer, source })?;
        if host != self.host {
            return Err(TransportError::Unavailable(
                TransportKind::Shm,
                format!(
                    "peer {peer} runs on another host or kernel (boot id {host:?}, ours {:?})",
                    self.host
                ),
            ));
        }
        if world as usize != self.world || cap == 0 {
            return Err(TransportError::BadDescriptor {
                peer,
                source: DecodeError::Invalid {
                    field: "world",
                    detail: format!(
                        "peer has world {world} and queue depth {cap}; ours is world {}",
                        self.world
                    ),
                },
            });
        }
        let seg = Segment::open(pid, fd, &name, inbox_bytes(self.world, cap as usize))?;
        let ring = Ring::of(&seg, self.world, cap as usize, self.me);
        self.peers[peer] = Some(PeerInbox { _seg: seg, ring });
        Ok(())
    }

    fn import(&mut self, peer: usize, descriptor: &[u8]) -> Result<RemoteRegion, TransportError> {
        let bad = |source| TransportError::BadDescriptor { peer, source };
        let mut r = Reader::new(descriptor);
        r.magic("shm region magic", REGION_MAGIC, "a shm region descriptor")
            .map_err(bad)?;
        let pid = r.u32("pid").map_err(bad)?;
        let fd = r.u32("region fd").map_err(bad)? as i32;
        let len = r.len("region length").map_err(bad)?;
        let name =
            String::from_utf8_lossy(r.bytes("region name", MAX_NAME).map_err(bad)?).into_owned();
        r.finish().map_err(bad)?;
        let seg = Segment::open(pid, fd, &name, len)?;
        let key = self.imports.len() as u32;
        self.imports.push(Imported { peer, seg });
        Ok(RemoteRegion { peer, key, len })
    }

    unsafe fn post_write(
        &mut self,
        peer: usize,
        _lane: Lane,
        req: &WriteRequest,
    ) -> Result<(), TransportError> {
        let Some(ring) = self
            .peers
            .get(peer)
            .and_then(|p| p.as_ref())
            .map(|p| p.ring)
        else {
            return Err(TransportError::NotConnected(peer));
        };
        let Some(remote) = self
            .imports
            .get(req.remote.key as usize)
            .filter(|r| r.peer == peer)
        else {
            return Err(TransportError::NotConnected(peer));
        };
        let local = self.locals.view(peer, req, remote.seg.len())?;
        if req.imm.is_some() && !ring.has_room(peer)? {
            return Err(TransportError::WouldBlock);
        }
        // SAFETY: both ranges were bounds-checked against live mappings; the
        // protocol guarantees the remote range is ours to write (credit) and
        // the caller guarantees the local range is stable (`# Safety`).
        unsafe {
            let src = local.base.add(req.local_offset);
            let dst = remote.seg.as_ptr().as_ptr().add(req.remote_offset);
            if req.len == 8 && (src as usize).is_multiple_of(8) && (dst as usize).is_multiple_of(8)
            {
                use std::sync::atomic::{AtomicU64, Ordering};
                let v = AtomicU64::from_ptr(src.cast()).load(Ordering::Acquire);
                AtomicU64::from_ptr(dst.cast()).store(v, Ordering::Release);
            } else {
                std::ptr::copy(src, dst, req.len);
            }
        }
        if let Some(imm) = req.imm {
            ring.push(imm, req.len as u32);
        }
        if req.signaled {
            self.done.push(Completion::WriteDone { wr_id: req.wr_id });
        }
        Ok(())
    }

    fn owns(&self, region: RegionId) -> bool {
        self.locals.owns(region)
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<(), TransportError> {
        out.append(&mut self.done);
        for (peer, ring) in self.rings.iter().enumerate() {
            ring.drain(peer, |imm, len| {
                out.push(Completion::Arrived {
                    peer,
                    imm,
                    len: len as usize,
                })
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (ShmTransport, ShmTransport) {
        let mut a = ShmTransport::new(0, 2, 4).unwrap();
        let mut b = ShmTransport::new(1, 2, 4).unwrap();
        let (ea, eb) = (a.endpoint(), b.endpoint());
        a.connect(1, &eb).unwrap();
        b.connect(0, &ea).unwrap();
        (a, b)
    }

    fn write(
        local: &Region,
        remote: RemoteRegion,
        off: usize,
        len: usize,
        imm: Option<u32>,
    ) -> WriteRequest {
        WriteRequest::test(local, remote, off, len, imm, 7)
    }

    #[test]
    fn write_with_imm_lands_and_completes() {
        let (mut a, mut b) = pair();
        let mut src = a.alloc(64).unwrap();
        src.as_mut_slice()
            .iter_mut()
            .enumerate()
            .for_each(|(i, x)| *x = i as u8);
        let dst = b.alloc(128).unwrap();
        let remote = a.import(1, dst.descriptor()).unwrap();
        // SAFETY: src is not modified while in flight (the copy is synchronous).
        unsafe { a.post_write(1, Lane::Data, &write(&src, remote, 32, 64, Some(0xabc))) }.unwrap();
        let mut out = Vec::new();
        a.poll(&mut out).unwrap();
        assert_eq!(out, vec![Completion::WriteDone { wr_id: 7 }]);
        out.clear();
        b.poll(&mut out).unwrap();
        assert_eq!(
            out,
            vec![Completion::Arrived {
                peer: 0,
                imm: 0xabc,
                len: 64
            }]
        );
        assert_eq!(&dst.as_slice()[32..96], src.as_slice());
        assert!(dst.as_slice()[..32].iter().all(|&x| x == 0));
    }

    #[test]
    fn full_ring_is_would_block_and_out_of_range_is_refused() {
        let (mut a, mut b) = pair();
        let src = a.alloc(8).unwrap();
        let dst = b.alloc(8).unwrap();
        let remote = a.import(1, dst.descriptor()).unwrap();
        for _ in 0..4 {
            // SAFETY: synchronous copy.
            unsafe { a.post_write(1, Lane::Data, &write(&src, remote, 0, 0, Some(1))) }.unwrap();
        }
        // SAFETY: as above.
        let err = unsafe { a.post_write(1, Lane::Data, &write(&src, remote, 0, 0, Some(1))) }
            .unwrap_err();
        assert!(matches!(err, TransportError::WouldBlock));
        let mut out = Vec::new();
        b.poll(&mut out).unwrap();
        assert_eq!(out.len(), 4);
        // SAFETY: as above; this one must be refused before copying.
        let err =
            unsafe { a.post_write(1, Lane::Data, &write(&src, remote, 1, 8, None)) }.unwrap_err();
        assert!(
            matches!(
                err,
                TransportError::OutOfBounds {
                    side: "remote",
                    peer: 1,
                    offset: 1,
                    len: 8,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn corrupt_descriptors_are_named() {
        let (mut a, b) = pair();
        let mut desc = b.endpoint();
        desc.truncate(desc.len() - 3);
        let err = a.connect(1, &desc).unwrap_err();
        assert!(err.to_string().contains("peer 1"), "{err}");
        let err = a.import(1, b"garbage").unwrap_err();
        assert!(err.to_string().contains("peer 1"), "{err}");
        // A region descriptor naming the wrong segment is refused.
        let dst = a.alloc(16).unwrap();
        let mut forged = dst.descriptor().to_vec();
        let n = forged.len();
        forged[n - 1] ^= 1;
        assert!(a.import(0, &forged).is_err());
    }
}
