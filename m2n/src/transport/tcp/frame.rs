//! The tcp transport's wire format and its receive-side decoder.
//!
//! Each write is a 24-byte header followed by its payload:
//!
//! ```text
//! magic u16 "M2" | kind u8 (1 write, 2 write+imm) | lane u8 (0 data, 1 ack)
//! region u32 | offset u64 | len u32 | imm u32          (little-endian)
//! ```
//!
//! The decoder is sans-IO and zero-copy: it tells the caller where the next
//! bytes must go ([`Decoder::read_buf`]): into its header buffer, or straight
//! into the registered region the frame names, once the header has been
//! checked against that region. Nothing outside a region is ever written.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::proto::Lane;

pub const HEADER_BYTES: usize = 24;
const MAGIC: u16 = 0x324d; // "M2" little-endian
const KIND_WRITE: u8 = 1;
const KIND_WRITE_IMM: u8 = 2;

/// One write on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub lane: Lane,
    pub region: u32,
    pub offset: u64,
    pub len: u32,
    pub imm: Option<u32>,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        b[2] = if self.imm.is_some() {
            KIND_WRITE_IMM
        } else {
            KIND_WRITE
        };
        b[3] = match self.lane {
            Lane::Data => 0,
            Lane::Ack => 1,
        };
        b[4..8].copy_from_slice(&self.region.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..20].copy_from_slice(&self.len.to_le_bytes());
        b[20..24].copy_from_slice(&self.imm.unwrap_or(0).to_le_bytes());
        b
    }

    fn decode(b: &[u8; HEADER_BYTES]) -> Result<Self, FrameError> {
        let magic = u16::from_le_bytes([b[0], b[1]]);
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        let imm = u32::from_le_bytes(b[20..24].try_into().expect("4 bytes"));
        let imm = match b[2] {
            KIND_WRITE => None,
            KIND_WRITE_IMM => Some(imm),
            k => return Err(FrameError::BadKind(k)),
        };
        let lane = match b[3] {
            0 => Lane::Data,
            1 => Lane::Ack,
            l => return Err(FrameError::BadLane(l)),
        };
        Ok(Self {
            lane,
            region: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            offset: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            len: u32::from_le_bytes(b[16..20].try_into().expect("4 bytes")),
            imm,
        })
    }
}

/// Why a frame was refused. The connection is closed after any of these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    BadMagic(u16),
    BadKind(u8),
    BadLane(u8),
    WrongLane {
        got: Lane,
        connection: Lane,
    },
    UnknownRegion(u32),
    OutOfBounds {
        region: u32,
        offset: u64,
        len: u32,
        region_len: usize,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::BadMagic(m) => write!(f, "bad frame magic {m:#06x}"),
            FrameError::BadKind(k) => write!(f, "unknown frame kind {k}"),
            FrameError::BadLane(l) => write!(f, "unknown lane {l}"),
            FrameError::WrongLane { got, connection } => {
                write!(
                    f,
                    "frame for the {got:?} lane on the {connection:?} lane's connection"
                )
            }
            FrameError::UnknownRegion(r) => write!(f, "frame names unknown region {r}"),
            FrameError::OutOfBounds {
                region,
                offset,
                len,
                region_len,
            } => write!(
                f,
                "frame writes {offset}+{len} into region {region} of {region_len} bytes"
            ),
        }
    }
}

/// A registered region as the decoder sees it.
#[derive(Clone)]
pub struct RegionRef {
    pub base: *mut u8,
    pub len: usize,
    /// Keeps the memory alive while a frame is being written into it.
    pub keep: Option<std::sync::Arc<dyn std::any::Any + Send + Sync>>,
}

impl fmt::Debug for RegionRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionRef").field("len", &self.len).finish()
    }
}

/// Where registered regions live, for bounds checks.
pub trait RegionTable {
    /// Local region `id`, if it is registered.
    fn lookup(&self, id: u32) -> Option<RegionRef>;
}

/// A frame fully received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrived {
    pub header: Header,
}

#[derive(Debug)]
enum State {
    Header {
        buf: [u8; HEADER_BYTES],
        have: usize,
    },
    /// Payload bytes go straight into `dst`.
    Payload {
        header: Header,
        dst: *mut u8,
        left: usize,
        _keep: RegionRef,
    },
    /// An 8-byte aligned word: staged, then stored atomically (credits).
    Word {
        header: Header,
        dst: *mut u8,
        buf: [u8; 8],
        have: usize,
        _keep: RegionRef,
    },
}

/// The receive side of one connection. See the module docs.
#[derive(Debug)]
pub struct Decoder {
    lane: Lane,
    state: State,
}

// SAFETY: the raw pointers point into registered regions that the transport
// keeps alive while the decoder exists; the decoder is used by one thread.
unsafe impl Send for Decoder {}

impl Decoder {
    pub fn new(lane: Lane) -> Self {
        Self {
            lane,
            state: State::Header {
                buf: [0; HEADER_BYTES],
                have: 0,
            },
        }
    }

    /// Whether the decoder is between frames.
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Header { have: 0, .. })
    }

    /// Where the next received bytes must be written: never empty.
    ///
    /// # Safety
    /// The regions `table` named for the frame in progress must still be
    /// alive, and nothing else may write the frame's range meanwhile (the
    /// protocol's credits guarantee that for rings).
    pub unsafe fn read_buf(&mut self) -> &mut [u8] {
        match &mut self.state {
            State::Header { buf, have } => &mut buf[*have..],
            // SAFETY: `dst..dst+left` was bounds-checked against a live
            // region when the header was accepted (caller's contract).
            State::Payload { dst, left, .. } => unsafe {
                std::slice::from_raw_parts_mut(*dst, *left)
            },
            State::Word { buf, have, .. } => &mut buf[*have..],
        }
    }

    /// Accounts for `n` bytes written into [`read_buf`](Self::read_buf).
    /// Returns a frame when one completes.
    pub fn advance(
        &mut self,
        n: usize,
        table: &impl RegionTable,
    ) -> Result<Option<Arrived>, FrameError> {
        match &mut self.state {
            State::Header { buf, have } => {
                *have += n;
                if *have < HEADER_BYTES {
                    return Ok(None);
                }
                let header = Header::decode(buf)?;
                if header.lane != self.lane {
                    return Err(FrameError::WrongLane {
                        got: header.lane,
                        connection: self.lane,
                    });
                }
                let region = table
                    .lookup(header.region)
                    .ok_or(FrameError::UnknownRegion(header.region))?;
                let (base, region_len) = (region.base, region.len);
                let end = header.offset.checked_add(u64::from(header.len));
                if end.is_none_or(|e| e > region_len as u64) {
                    return Err(FrameError::OutOfBounds {
                        region: header.region,
                        offset: header.offset,
                        len: header.len,
                        region_len,
                    });
                }
                // SAFETY: offset + len <= region_len, checked just above.
                let dst = unsafe { base.add(header.offset as usize) };
                if header.len == 0 {
                    self.reset();
                    return Ok(Some(Arrived { header }));
                }
                self.state = if header.len == 8 && (dst as usize).is_multiple_of(8) {
                    State::Word {
                        header,
                        dst,
                        buf: [0; 8],
                        have: 0,
                        _keep: region,
                    }
                } else {
                    State::Payload {
                        header,
                        dst,
                        left: header.len as usize,
                        _keep: region,
                    }
                };
                Ok(None)
            }
            State::Payload {
                header, dst, left, ..
            } => {
                *left -= n;
                // SAFETY: n bytes of the range were just filled; stays in range.
                *dst = unsafe { dst.add(n) };
                if *left > 0 {
                    return Ok(None);
                }
                let header = *header;
                self.reset();
                Ok(Some(Arrived { header }))
            }
            State::Word {
                header,
                dst,
                buf,
                have,
                ..
            } => {
                *have += n;
                if *have < 8 {
                    return Ok(None);
                }
                // SAFETY: dst is 8-aligned and its 8 bytes are inside the region.
                unsafe { AtomicU64::from_ptr(dst.cast()) }
                    .store(u64::from_le_bytes(*buf), Ordering::Release);
                let header = *header;
                self.reset();
                Ok(Some(Arrived { header }))
            }
        }
    }

    fn reset(&mut self) {
        self.state = State::Header {
            buf: [0; HEADER_BYTES],
            have: 0,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::RefCell;

    /// Regions as vectors with guard bytes on both sides.
    struct Table(RefCell<Vec<Vec<u8>>>);
    const GUARD: usize = 64;
    impl Table {
        fn new(lens: &[usize]) -> Self {
            Self(RefCell::new(
                lens.iter().map(|&l| vec![0xAA; l + 2 * GUARD]).collect(),
            ))
        }
        fn guards_intact(&self) -> bool {
            self.0.borrow().iter().all(|r| {
                let n = r.len();
                r[..GUARD].iter().chain(&r[n - GUARD..]).all(|&b| b == 0xAA)
            })
        }
    }
    impl RegionTable for Table {
        fn lookup(&self, id: u32) -> Option<RegionRef> {
            let mut t = self.0.borrow_mut();
            let r = t.get_mut(id as usize)?;
            let len = r.len() - 2 * GUARD;
            // SAFETY: GUARD < r.len().
            let base = unsafe { r.as_mut_ptr().add(GUARD) };
            Some(RegionRef {
                base,
                len,
                keep: None,
            })
        }
    }

    /// Feeds `stream` in chunks of `chunk` bytes; returns frames and the first error.
    fn feed(
        dec: &mut Decoder,
        table: &Table,
        stream: &[u8],
        chunk: usize,
    ) -> (Vec<Arrived>, Option<FrameError>) {
        let mut out = Vec::new();
        let mut at = 0;
        while at < stream.len() {
            // SAFETY: the table's vectors outlive this call and are not resized.
            let buf = unsafe { dec.read_buf() };
            let n = buf.len().min(chunk).min(stream.len() - at);
            buf[..n].copy_from_slice(&stream[at..at + n]);
            at += n;
            match dec.advance(n, table) {
                Ok(Some(a)) => out.push(a),
                Ok(None) => {}
                Err(e) => return (out, Some(e)),
            }
        }
        (out, None)
    }

    fn frame(h: Header, payload: &[u8]) -> Vec<u8> {
        [&h.encode()[..], payload].concat()
    }

    #[test]
    fn frames_land_in_place_across_partial_reads() {
        let table = Table::new(&[100, 16]);
        let h1 = Header {
            lane: Lane::Data,
            region: 0,
            offset: 10,
            len: 5,
            imm: Some(0xfeed),
        };
        let h2 = Header {
            lane: Lane::Data,
            region: 1,
            offset: 8,
            len: 8,
            imm: None,
        };
        let h3 = Header {
            lane: Lane::Data,
            region: 0,
            offset: 100,
            len: 0,
            imm: Some(1),
        };
        let stream = [
            frame(h1, b"hello"),
            frame(h2, &42u64.to_le_bytes()),
            frame(h3, b""),
        ]
        .concat();
        for chunk in [1, 3, 7, 1000] {
            let mut dec = Decoder::new(Lane::Data);
            let (got, err) = feed(&mut dec, &table, &stream, chunk);
            assert_eq!(err, None);
            assert_eq!(
                got.iter().map(|a| a.header).collect::<Vec<_>>(),
                vec![h1, h2, h3]
            );
            assert!(dec.at_boundary());
            let t = table.0.borrow();
            assert_eq!(&t[0][GUARD + 10..GUARD + 15], b"hello");
            assert_eq!(&t[1][GUARD + 8..GUARD + 16], &42u64.to_le_bytes());
        }
        assert!(table.guards_intact());
    }

    #[test]
    fn hostile_headers_are_refused_before_any_payload_byte() {
        let table = Table::new(&[32]);
        let ok = Header {
            lane: Lane::Data,
            region: 0,
            offset: 0,
            len: 4,
            imm: None,
        };
        let cases: Vec<(Vec<u8>, FrameError)> = vec![
            (
                frame(Header { region: 7, ..ok }, b"xxxx"),
                FrameError::UnknownRegion(7),
            ),
            (
                frame(Header { offset: 30, ..ok }, b"xxxx"),
                FrameError::OutOfBounds {
                    region: 0,
                    offset: 30,
                    len: 4,
                    region_len: 32,
                },
            ),
            (
                frame(
                    Header {
                        offset: u64::MAX - 1,
                        ..ok
                    },
                    b"xxxx",
                ),
                FrameError::OutOfBounds {
                    region: 0,
                    offset: u64::MAX - 1,
                    len: 4,
                    region_len: 32,
                },
            ),
            (
                frame(
                    Header {
                        lane: Lane::Ack,
                        ..ok
                    },
                    b"xxxx",
                ),
                FrameError::WrongLane {
                    got: Lane::Ack,
                    connection: Lane::Data,
                },
            ),
            (
                [&b"XX"[..], &ok.encode()[2..]].concat(),
                FrameError::BadMagic(0x5858),
            ),
        ];
        for (bytes, want) in cases {
            let mut dec = Decoder::new(Lane::Data);
            let (got, err) = feed(&mut dec, &table, &bytes, 5);
            assert!(got.is_empty());
            assert_eq!(err, Some(want));
            assert!(
                table.0.borrow()[0].iter().all(|&b| b == 0xAA),
                "a refused frame wrote bytes"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn arbitrary_streams_never_write_outside_regions(
            stream in proptest::collection::vec(any::<u8>(), 0..400),
            valid_prefix in any::<bool>(),
            chunk in 1usize..64,
        ) {
            let table = Table::new(&[48, 8]);
            let mut bytes = Vec::new();
            if valid_prefix {
                // A valid header followed by arbitrary bytes exercises payload paths too.
                bytes.extend(Header { lane: Lane::Data, region: 0, offset: 3, len: 40, imm: Some(9) }.encode());
            }
            bytes.extend(stream);
            let mut dec = Decoder::new(Lane::Data);
            let (_got, _err) = feed(&mut dec, &table, &bytes, chunk);
            prop_assert!(table.guards_intact());
        }

        #[test]
        fn arbitrary_headers_decode_or_fail_cleanly(raw in proptest::array::uniform24(any::<u8>())) {
            let table = Table::new(&[16]);
            let mut dec = Decoder::new(Lane::Ack);
            let _ = feed(&mut dec, &table, &raw, 24);
            prop_assert!(table.guards_intact());
        }
    }
}
