//! Bootstrap frames: a u32 length, then a type byte and fields.

use std::io::{self, Read, Write};

use crate::codec::{DecodeError, Reader, Writer};
use crate::group::{Role, Shape};

use super::uid::SECRET_BYTES;

pub const MAGIC: u32 = 0x4d32_4e42; // "M2NB"
pub const VERSION: u16 = 1;
/// Largest transport payload one rank may publish.
pub const MAX_PAYLOAD: usize = 1 << 20;
const MAX_FRAME: usize = 64 << 20;
/// Largest hello a stranger may send before it is authenticated.
pub const MAX_HELLO: usize = MAX_PAYLOAD + 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello {
        version: u16,
        secret: [u8; SECRET_BYTES],
        role: Role,
        rank: u32,
        shape: Shape,
        payload: Vec<u8>,
    },
    Reject(String),
    AllGather(Vec<Vec<u8>>),
    Ready,
    Go,
    /// A rank's payload for a further all-gather.
    Contribute(Vec<u8>),
}

impl Frame {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u32(0); // length, patched below
        match self {
            Frame::Hello {
                version,
                secret,
                role,
                rank,
                shape,
                payload,
            } => {
                w.u8(1).u32(MAGIC).u16(*version).raw(secret);
                w.u8(matches!(role, Role::Expert) as u8).u32(*rank);
                w.u32(shape.attention as u32)
                    .u32(shape.experts as u32)
                    .bytes(payload);
            }
            Frame::Reject(why) => {
                w.u8(2).bytes(why.as_bytes());
            }
            Frame::AllGather(payloads) => {
                w.u8(3).u32(payloads.len() as u32);
                payloads.iter().for_each(|p| {
                    w.bytes(p);
                });
            }
            Frame::Ready => {
                w.u8(4);
            }
            Frame::Go => {
                w.u8(5);
            }
            Frame::Contribute(p) => {
                w.u8(6).bytes(p);
            }
        }
        let mut buf = w.finish();
        let len = (buf.len() - 4) as u32;
        buf[..4].copy_from_slice(&len.to_le_bytes());
        buf
    }

    pub fn decode(body: &[u8]) -> Result<Frame, DecodeError> {
        let mut r = Reader::new(body);
        let frame = match r.u8("frame type")? {
            1 => {
                if r.u32("magic")? != MAGIC {
                    return Err(DecodeError::Invalid {
                        field: "magic",
                        detail: "not an m2n bootstrap hello".into(),
                    });
                }
                let version = r.u16("version")?;
                let mut secret = [0u8; SECRET_BYTES];
                secret.copy_from_slice(r.raw(SECRET_BYTES, "secret")?);
                let role = match r.u8("role")? {
                    0 => Role::Attention,
                    1 => Role::Expert,
                    other => {
                        return Err(DecodeError::Invalid {
                            field: "role",
                            detail: format!("{other}"),
                        })
                    }
                };
                let rank = r.u32("rank")?;
                let shape = Shape::new(
                    r.u32("attention ranks")? as usize,
                    r.u32("expert ranks")? as usize,
                );
                let payload = r.bytes("payload", MAX_PAYLOAD)?.to_vec();
                Frame::Hello {
                    version,
                    secret,
                    role,
                    rank,
                    shape,
                    payload,
                }
            }
            2 => Frame::Reject(String::from_utf8_lossy(r.bytes("reason", 4096)?).into_owned()),
            3 => {
                let n = r.u32("count")? as usize;
                let mut payloads = Vec::with_capacity(n.min(4096));
                for _ in 0..n {
                    payloads.push(r.bytes("payload", MAX_PAYLOAD)?.to_vec());
                }
                Frame::AllGather(payloads)
            }
            4 => Frame::Ready,
            5 => Frame::Go,
            6 => Frame::Contribute(r.bytes("payload", MAX_PAYLOAD)?.to_vec()),
            other => {
                return Err(DecodeError::Invalid {
                    field: "frame type",
                    detail: format!("{other}"),
                })
            }
        };
        r.finish()?;
        Ok(frame)
    }
}

pub fn send(stream: &mut impl Write, frame: &Frame) -> io::Result<()> {
    stream.write_all(&frame.encode())?;
    stream.flush()
}

/// Reads one frame. Malformed frames are `InvalidData` errors.
pub fn recv(stream: &mut impl Read) -> io::Result<Frame> {
    recv_limited(stream, MAX_FRAME)
}

/// Reads one frame of at most `max` bytes.
pub fn recv_limited(stream: &mut impl Read, max: usize) -> io::Result<Frame> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bootstrap frame of {len} bytes exceeds {max}"),
        ));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    Frame::decode(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip() {
        for f in [
            Frame::Hello {
                version: VERSION,
                secret: [3; SECRET_BYTES],
                role: Role::Expert,
                rank: 2,
                shape: Shape::new(2, 3),
                payload: vec![1, 2, 3],
            },
            Frame::Reject("nope".into()),
            Frame::AllGather(vec![vec![], vec![9; 10]]),
            Frame::Ready,
            Frame::Go,
            Frame::Contribute(vec![4, 5]),
        ] {
            let bytes = f.encode();
            assert_eq!(recv(&mut &bytes[..]).unwrap(), f);
        }
    }

    proptest! {
        #[test]
        fn arbitrary_frames_never_panic(body in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = Frame::decode(&body);
        }
    }
}
