//! A tiny, bounds-checked binary codec for descriptors and bootstrap frames.
//!
//! Everything a peer sends is read through [`Reader`], which never panics and
//! names the field that was short or malformed.

use thiserror::Error;

/// A malformed blob received from a peer or a launcher.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("truncated while reading {field}: needed {needed} bytes, {left} left")]
    Truncated {
        field: &'static str,
        needed: usize,
        left: usize,
    },
    #[error("{field} is invalid: {detail}")]
    Invalid { field: &'static str, detail: String },
    #[error("{left} trailing bytes after the last field")]
    Trailing { left: usize },
}

/// Appends little-endian fields to a byte vector.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A length-prefixed (u32) byte string.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        let len = u32::try_from(v.len()).expect("blob over 4 GiB");
        self.u32(len);
        self.buf.extend_from_slice(v);
        self
    }
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }
}

/// Reads little-endian fields from a byte slice, checking every length.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    pub fn raw(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                field,
                needed: n,
                left: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.raw(N, field)?);
        Ok(out)
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }
    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    /// A u32 that must equal `magic`; `what` names the expected blob.
    pub fn magic(
        &mut self,
        field: &'static str,
        magic: u32,
        what: &str,
    ) -> Result<(), DecodeError> {
        if self.u32(field)? != magic {
            return Err(DecodeError::Invalid {
                field,
                detail: format!("not {what}"),
            });
        }
        Ok(())
    }

    /// A u64 length that must fit in memory.
    pub fn len(&mut self, field: &'static str) -> Result<usize, DecodeError> {
        let v = self.u64(field)?;
        usize::try_from(v).map_err(|_| DecodeError::Invalid {
            field,
            detail: format!("{v} does not fit in memory"),
        })
    }

    /// The u64 length of a range that starts at `start`: it must fit in
    /// memory, and the range must not wrap around the address space.
    pub fn len_from(&mut self, field: &'static str, start: u64) -> Result<usize, DecodeError> {
        let len = self.len(field)?;
        if start.checked_add(len as u64).is_none() {
            return Err(DecodeError::Invalid {
                field,
                detail: format!("{len} bytes from {start:#x} wrap around"),
            });
        }
        Ok(len)
    }

    /// A length-prefixed byte string of at most `max` bytes.
    pub fn bytes(&mut self, field: &'static str, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = self.u32(field)? as usize;
        if len > max {
            return Err(DecodeError::Invalid {
                field,
                detail: format!("length {len} exceeds the limit of {max}"),
            });
        }
        self.raw(len, field)
    }
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing {
                left: self.buf.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let blob = Writer::new()
            .u8(7)
            .u16(513)
            .u32(70000)
            .u64(u64::MAX)
            .bytes(b"abc")
            .finish();
        let mut r = Reader::new(&blob);
        assert_eq!(r.u8("a").unwrap(), 7);
        assert_eq!(r.u16("b").unwrap(), 513);
        assert_eq!(r.u32("c").unwrap(), 70000);
        assert_eq!(r.u64("d").unwrap(), u64::MAX);
        assert_eq!(r.bytes("e", 16).unwrap(), b"abc");
        r.finish().unwrap();
    }

    #[test]
    fn limits_and_truncation_are_named() {
        let blob = Writer::new().bytes(&[0; 32]).finish();
        let err = Reader::new(&blob).bytes("payload", 8).unwrap_err();
        assert!(err.to_string().contains("payload"), "{err}");
        let err = Reader::new(&blob[..10]).bytes("payload", 64).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::Truncated {
                field: "payload",
                needed: 32,
                left: 6
            }
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_input_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut r = Reader::new(&data);
            let _ = r.u16("x").and_then(|_| r.bytes("y", 1 << 20)).and_then(|_| r.u64("z"));
        }
    }
}
