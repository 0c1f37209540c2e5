//! The tcp backend: one-sided writes over TCP, for hosts without RDMA.
//!
//! Every pair of processes has one connection per lane (the lower rank
//! dials), so ACKs never queue behind data, and each lane's socket carries
//! its own DSCP and `SO_PRIORITY`. A write is a [`frame`] header followed by
//! the payload, sent with vectored I/O straight from the registered region;
//! the receiver reads the payload straight into the registered region the
//! header names, after checking the range. Sockets are non-blocking and
//! driven by [`Transport::poll`]: no threads.

pub mod frame;
pub mod sock;

use std::collections::VecDeque;
use std::io::{IoSlice, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use frame::{Decoder, FrameError, Header, RegionRef, RegionTable, HEADER_BYTES};
pub use sock::LaneOptions;

use super::segment::Segment;
use super::{
    Completion, Lane, LocalMemory, LocalRegions, Region, RegionId, RemoteRegion, Transport,
    TransportError, TransportKind, WriteRequest,
};
use crate::codec::{DecodeError, Reader, Writer};

const ENDPOINT_MAGIC: u32 = 0x4d32_4e54; // "M2NT"
const REGION_MAGIC: u32 = 0x4d32_4e47; // "M2NG"
const HELLO_MAGIC: u32 = 0x4d32_4e48; // "M2NH"
const TOKEN_BYTES: usize = 16;
/// Bytes read from one connection per poll, so one busy peer cannot starve the others.
const READ_BUDGET: usize = 8 << 20;
/// Frames gathered into one `writev`.
const IOV_FRAMES: usize = 32;

/// Settings of the tcp transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpOptions {
    /// Address to listen on (and that peers dial).
    pub bind_ip: IpAddr,
    pub data: LaneOptions,
    pub ack: LaneOptions,
    /// Deadline for establishing each peer's connections.
    pub connect_timeout: Duration,
    /// Frames queued per connection before `post_write` says `WouldBlock`.
    pub queue_frames: usize,
}

/// A write waiting to go out, sent straight from its registered region.
struct OutFrame {
    header: [u8; HEADER_BYTES],
    src: *const u8,
    len: usize,
    /// Bytes of header + payload already written.
    sent: usize,
    wr_id: u64,
    signaled: bool,
    _keep: Arc<dyn LocalMemory>,
}

impl OutFrame {
    fn slices(&self) -> (&[u8], &[u8]) {
        // SAFETY: src..src+len was bounds-checked at post time and `_keep`
        // keeps the region alive; the poster promised not to modify it.
        let payload = unsafe { std::slice::from_raw_parts(self.src, self.len) };
        if self.sent < HEADER_BYTES {
            (&self.header[self.sent..], payload)
        } else {
            (&[], &payload[self.sent - HEADER_BYTES..])
        }
    }
}

struct Conn {
    lane: Lane,
    stream: TcpStream,
    decoder: Decoder,
    out: VecDeque<OutFrame>,
    closed: Option<String>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("lane", &self.lane)
            .field("queued", &self.out.len())
            .field("closed", &self.closed)
            .finish()
    }
}

// SAFETY: the raw pointers in queued frames point into regions kept alive by
// their Arcs; a Conn is used by one thread at a time.
unsafe impl Send for Conn {}

impl Conn {
    fn new(lane: Lane, stream: TcpStream) -> Result<Self, TransportError> {
        stream
            .set_nonblocking(true)
            .map_err(|e| TransportError::os("set_nonblocking", e))?;
        Ok(Self {
            lane,
            stream,
            decoder: Decoder::new(lane),
            out: VecDeque::new(),
            closed: None,
        })
    }

    /// Writes as much queued data as the socket takes.
    fn flush(&mut self, done: &mut Vec<Completion>) {
        while !self.out.is_empty() && self.closed.is_none() {
            // On the stack: a flush allocates nothing.
            let mut iov = [IoSlice::new(&[]); 2 * IOV_FRAMES];
            let mut used = 0;
            for f in self.out.iter().take(IOV_FRAMES) {
                let (h, p) = f.slices();
                for part in [h, p] {
                    if !part.is_empty() {
                        iov[used] = IoSlice::new(part);
                        used += 1;
                    }
                }
            }
            let mut n = if used == 0 {
                0
            } else {
                match self.stream.write_vectored(&iov[..used]) {
                    Ok(0) => {
                        self.closed = Some("the connection accepts no more data".into());
                        return;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.closed = Some(format!("send failed: {e}"));
                        return;
                    }
                }
            };
            // Retire what was fully written.
            while let Some(f) = self.out.front_mut() {
                let total = HEADER_BYTES + f.len;
                let take = n.min(total - f.sent);
                f.sent += take;
                n -= take;
                if f.sent < total {
                    break;
                }
                let f = self.out.pop_front().expect("front exists");
                if f.signaled {
                    done.push(Completion::WriteDone { wr_id: f.wr_id });
                }
            }
        }
    }
}

#[derive(Debug)]
struct Peer {
    data: Conn,
    ack: Conn,
}

/// Regions peers may write into (those m2n allocated), by region id.
#[derive(Debug, Default)]
struct Regions(Vec<Option<Arc<Segment>>>);

impl RegionTable for Regions {
    fn lookup(&self, id: u32) -> Option<RegionRef> {
        let seg = self.0.get(id as usize)?.as_ref()?;
        Some(RegionRef {
            base: seg.as_ptr().as_ptr(),
            len: seg.len(),
            keep: Some(seg.clone()),
        })
    }
}

/// The tcp transport of one process.
#[derive(Debug)]
pub struct TcpTransport {
    me: usize,
    world: usize,
    opts: TcpOptions,
    listener: TcpListener,
    addr: SocketAddr,
    token: [u8; TOKEN_BYTES],
    /// Writable by peers.
    regions: Regions,
    /// Sources of our writes: every region, allocated or registered.
    locals: LocalRegions,
    peers: Vec<Option<Peer>>,
    /// Connections accepted before their peer's `connect` asked for them.
    stash: Vec<(usize, Lane, TcpStream)>,
    imports: Vec<RemoteRegion>,
    done: Vec<Completion>,
}

fn lane_byte(l: Lane) -> u8 {
    match l {
        Lane::Data => 0,
        Lane::Ack => 1,
    }
}

impl TcpTransport {
    pub fn new(me: usize, world: usize, opts: TcpOptions) -> Result<Self, TransportError> {
        assert!(me < world);
        let listener = TcpListener::bind((opts.bind_ip, 0))
            .map_err(|e| TransportError::os(format!("listen on {}", opts.bind_ip), e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| TransportError::os("local_addr", e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| TransportError::os("set_nonblocking", e))?;
        let mut token = [0u8; TOKEN_BYTES];
        getrandom::getrandom(&mut token)
            .map_err(|e| TransportError::os("getrandom", std::io::Error::other(e.to_string())))?;
        let done_capacity = 2 * opts.queue_frames;
        Ok(Self {
            me,
            world,
            opts,
            listener,
            addr,
            token,
            regions: Regions::default(),
            locals: LocalRegions::default(),
            peers: (0..world).map(|_| None).collect(),
            stash: Vec::new(),
            imports: Vec::new(),
            // Completions of writes flushed between two polls, sized now
            // for two full send queues' worth, so that a warm run does not
            // allocate when more pile up between two polls than before.
            done: Vec::with_capacity(done_capacity),
        })
    }

    /// The socket of `peer`'s `lane` connection (for diagnostics and tests).
    pub fn socket(&self, peer: usize, lane: Lane) -> Option<&TcpStream> {
        let p = self.peers.get(peer)?.as_ref()?;
        Some(match lane {
            Lane::Data => &p.data.stream,
            Lane::Ack => &p.ack.stream,
        })
    }

    fn lane_opts(&self, lane: Lane) -> LaneOptions {
        match lane {
            Lane::Data => self.opts.data,
            Lane::Ack => self.opts.ack,
        }
    }

    fn dial(
        &self,
        peer: usize,
        addr: SocketAddr,
        token: &[u8],
        lane: Lane,
        deadline: Instant,
    ) -> Result<TcpStream, TransportError> {
        let mut last = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(TransportError::os(
                    format!("tcp: connecting the {lane:?} lane to peer {peer} at {addr}"),
                    last.unwrap_or_else(|| std::io::Error::from(std::io::ErrorKind::TimedOut)),
                ));
            }
            match sock::connect(addr, self.lane_opts(lane), left)? {
                Ok(mut s) => {
                    let hello = Writer::new()
                        .u32(HELLO_MAGIC)
                        .raw(token)
                        .u32(self.me as u32)
                        .u8(lane_byte(lane))
                        .finish();
                    s.write_all(&hello)
                        .map_err(|e| TransportError::os(format!("tcp: hello to peer {peer}"), e))?;
                    return Ok(s);
                }
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// Accepts connections until `peer`'s `lane` has arrived.
    fn accept_from(
        &mut self,
        peer: usize,
        lane: Lane,
        deadline: Instant,
    ) -> Result<TcpStream, TransportError> {
        loop {
            if let Some(i) = self
                .stash
                .iter()
                .position(|(p, l, _)| *p == peer && *l == lane)
            {
                return Ok(self.stash.swap_remove(i).2);
            }
            if Instant::now() >= deadline {
                return Err(TransportError::os(
                    format!(
                        "tcp: peer {peer} never connected its {lane:?} lane to {}",
                        self.addr
                    ),
                    std::io::Error::from(std::io::ErrorKind::TimedOut),
                ));
            }
            let mut s = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                Err(e) => return Err(TransportError::os("tcp: accept", e)),
            };
            // A connector must present our token at once; anything else is dropped.
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut hello = [0u8; 4 + TOKEN_BYTES + 4 + 1];
            if s.read_exact(&mut hello).is_err() {
                continue;
            }
            let mut r = Reader::new(&hello);
            let ok = r.u32("magic").ok() == Some(HELLO_MAGIC)
                && r.raw(TOKEN_BYTES, "token")
                    .is_ok_and(|t| crate::secret::secrets_match(t, &self.token));
            let from = r.u32("rank").unwrap_or(u32::MAX) as usize;
            let l = match r.u8("lane") {
                Ok(0) => Lane::Data,
                Ok(1) => Lane::Ack,
                _ => continue,
            };
            if !ok || from >= self.world {
                continue;
            }
            sock::apply(&s, self.lane_opts(l))?;
            self.stash.push((from, l, s));
        }
    }

    /// Queues a frame on `peer`'s `lane` connection and starts sending it.
    fn enqueue(
        &mut self,
        peer: usize,
        lane: Lane,
        frame: OutFrame,
        done: &mut Vec<Completion>,
    ) -> Result<(), TransportError> {
        let queue_frames = self.opts.queue_frames;
        let p = self.peer_mut(peer)?;
        let conn = match lane {
            Lane::Data => &mut p.data,
            Lane::Ack => &mut p.ack,
        };
        if let Some(why) = &conn.closed {
            return Err(TransportError::PeerClosed {
                peer,
                reason: why.clone(),
            });
        }
        if conn.out.len() >= queue_frames {
            conn.flush(done);
            if conn.out.len() >= queue_frames {
                return Err(TransportError::WouldBlock);
            }
        }
        conn.out.push_back(frame);
        conn.flush(done);
        Ok(())
    }

    fn peer_mut(&mut self, peer: usize) -> Result<&mut Peer, TransportError> {
        self.peers
            .get_mut(peer)
            .and_then(|p| p.as_mut())
            .ok_or(TransportError::NotConnected(peer))
    }
}

impl Transport for TcpTransport {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }

    fn endpoint(&self) -> Vec<u8> {
        Writer::new()
            .u32(ENDPOINT_MAGIC)
            .bytes(self.addr.to_string().as_bytes())
            .raw(&self.token)
            .u32(self.me as u32)
            .finish()
    }

    fn alloc(&mut self, len: usize) -> Result<Region, TransportError> {
        let id = self.locals.next_id();
        let seg = Arc::new(Segment::create(&format!("m2n-tcp-r{}", id.index()), len)?);
        let descriptor = Writer::new()
            .u32(REGION_MAGIC)
            .u32(id.index())
            .u64(len as u64)
            .finish();
        self.regions.0.resize(id.index() as usize + 1, None);
        self.regions.0[id.index() as usize] = Some(seg.clone());
        Ok(self.locals.add(seg, descriptor))
    }

    unsafe fn register(&mut self, ptr: *mut u8, len: usize) -> Result<Region, TransportError> {
        // SAFETY: forwarded contract.
        unsafe { self.locals.add_external(ptr, len) }
    }

    fn connect(&mut self, peer: usize, endpoint: &[u8]) -> Result<(), TransportError> {
        if peer >= self.world || peer == self.me {
            return Err(TransportError::NotConnected(peer));
        }
        let bad = |source| TransportError::BadDescriptor { peer, source };
        let mut r = Reader::new(endpoint);
        r.magic("tcp endpoint magic", ENDPOINT_MAGIC, "a tcp endpoint")
            .map_err(bad)?;
        let addr_text = r.bytes("address", 128).map_err(bad)?;
        let addr: SocketAddr = std::str::from_utf8(addr_text)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                bad(DecodeError::Invalid {
                    field: "address",
                    detail: String::from_utf8_lossy(addr_text).into_owned(),
                })
            })?;
        let token = r.raw(TOKEN_BYTES, "token").map_err(bad)?.to_vec();
        let rank = r.u32("rank").map_err(bad)? as usize;
        r.finish().map_err(bad)?;
        if rank != peer {
            return Err(bad(DecodeError::Invalid {
                field: "rank",
                detail: format!("endpoint of rank {rank} offered as rank {peer}"),
            }));
        }
        let deadline = Instant::now() + self.opts.connect_timeout;
        let (data, ack) = if self.me < peer {
            (
                self.dial(peer, addr, &token, Lane::Data, deadline)?,
                self.dial(peer, addr, &token, Lane::Ack, deadline)?,
            )
        } else {
            (
                self.accept_from(peer, Lane::Data, deadline)?,
                self.accept_from(peer, Lane::Ack, deadline)?,
            )
        };
        self.peers[peer] = Some(Peer {
            data: Conn::new(Lane::Data, data)?,
            ack: Conn::new(Lane::Ack, ack)?,
        });
        Ok(())
    }

    fn import(&mut self, peer: usize, descriptor: &[u8]) -> Result<RemoteRegion, TransportError> {
        let (key, len) = parse_region_descriptor(descriptor)
            .map_err(|source| TransportError::BadDescriptor { peer, source })?;
        let remote = RemoteRegion { peer, key, len };
        self.imports.push(remote);
        Ok(remote)
    }

    unsafe fn post_write(
        &mut self,
        peer: usize,
        lane: Lane,
        req: &WriteRequest,
    ) -> Result<(), TransportError> {
        if req.remote.peer != peer {
            return Err(TransportError::NotConnected(peer));
        }
        let seg = self.locals.source(peer, req, req.remote.len)?;
        // `source` checked that the length fits in 32 bits.
        let len32 = req.len as u32;
        let header = Header {
            lane,
            region: req.remote.key,
            offset: req.remote_offset as u64,
            len: len32,
            imm: req.imm,
        };
        let frame = OutFrame {
            header: header.encode(),
            // SAFETY: in range, checked above.
            src: unsafe { seg.base().add(req.local_offset) },
            len: req.len,
            sent: 0,
            wr_id: req.wr_id,
            signaled: req.signaled,
            _keep: seg,
        };
        let mut done = std::mem::take(&mut self.done);
        let result = self.enqueue(peer, lane, frame, &mut done);
        self.done = done;
        result
    }

    fn owns(&self, region: RegionId) -> bool {
        self.locals.owns(region)
    }

    fn poll(&mut self, out: &mut Vec<Completion>) -> Result<(), TransportError> {
        for (peer, slot) in self.peers.iter_mut().enumerate() {
            let Some(p) = slot.as_mut() else { continue };
            for conn in [&mut p.data, &mut p.ack] {
                conn.flush(&mut self.done);
                if conn.closed.is_some() {
                    continue;
                }
                let mut budget = READ_BUDGET;
                while budget > 0 {
                    // SAFETY: regions live in `self.regions` (and the decoder
                    // holds an Arc to the one in progress); the protocol
                    // guarantees nobody else writes the frame's range.
                    let buf = unsafe { conn.decoder.read_buf() };
                    let want = buf.len().min(budget);
                    match conn.stream.read(&mut buf[..want]) {
                        Ok(0) => {
                            conn.closed = Some(if conn.decoder.at_boundary() {
                                "the peer closed the connection".into()
                            } else {
                                "the peer closed the connection in the middle of a frame".into()
                            });
                            break;
                        }
                        Ok(n) => {
                            budget -= n;
                            match conn.decoder.advance(n, &self.regions) {
                                Ok(Some(a)) => {
                                    if let Some(imm) = a.header.imm {
                                        out.push(Completion::Arrived {
                                            peer,
                                            imm,
                                            len: a.header.len as usize,
                                        });
                                    }
                                }
                                Ok(None) => {}
                                Err(e) => {
                                    let detail = frame_error(&e, conn.lane);
                                    conn.closed = Some(detail.clone());
                                    let _ = conn.stream.shutdown(std::net::Shutdown::Both);
                                    return Err(TransportError::Corrupt { peer, detail });
                                }
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            conn.closed = Some(format!("receive failed: {e}"));
                            break;
                        }
                    }
                }
            }
        }
        out.append(&mut self.done);
        Ok(())
    }

    fn peer_drained(&self, peer: usize) -> bool {
        match self.peers.get(peer).and_then(|p| p.as_ref()) {
            Some(p) => p.data.closed.is_some() && p.ack.closed.is_some(),
            None => true,
        }
    }
}

fn frame_error(e: &FrameError, lane: Lane) -> String {
    format!("bad frame on its {lane:?} lane: {e}")
}

/// A peer's region descriptor: (region id, length).
pub(crate) fn parse_region_descriptor(
    descriptor: &[u8],
) -> Result<(u32, usize), crate::codec::DecodeError> {
    let mut r = Reader::new(descriptor);
    r.magic("tcp region magic", REGION_MAGIC, "a tcp region descriptor")?;
    let key = r.u32("region id")?;
    let len = r.len("region length")?;
    r.finish()?;
    Ok((key, len))
}

#[cfg(test)]
mod tests;
