//! Entry points for the fuzz targets in `m2n/fuzz` (cargo-fuzz): every
//! decoder of bytes that come from the network, fed arbitrary input. Not
//! part of the API.

use crate::proto::Lane;
use crate::transport::tcp::frame::{Decoder, RegionRef, RegionTable};

/// Bootstrap frames: decoding never panics, and a decoded frame encodes to
/// bytes that decode to the same frame.
pub fn bootstrap_frame(data: &[u8]) {
    if let Ok(f) = crate::bootstrap::fuzz_decode(data) {
        crate::bootstrap::fuzz_round_trip(&f);
    }
}

/// Transport descriptors (shm endpoints, tcp regions, verbs and fabric
/// endpoints and regions): decoding never panics.
pub fn descriptors(data: &[u8]) {
    let _ = crate::transport::shm::ShmTransport::decode_endpoint(0, data);
    let _ = crate::transport::tcp::parse_region_descriptor(data);
    #[cfg(feature = "fabric")]
    {
        let _ = crate::transport::fabric::Endpoint::decode(data, "tcp;ofi_rxm");
        let _ = crate::transport::fabric::RegionDescriptor::decode(data);
    }
    #[cfg(feature = "verbs")]
    {
        let _ = crate::transport::verbs::Endpoint::decode(data, 4);
        let _ = crate::transport::verbs::RegionDescriptor::decode(data);
    }
}

struct Table(Vec<(u32, RegionRef)>);

impl RegionTable for Table {
    fn lookup(&self, id: u32) -> Option<RegionRef> {
        self.0
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, r)| r.clone())
    }
}

/// A tcp connection's byte stream: the first byte picks the lane and read
/// sizes, the rest arrives in pieces. Frames are checked against two
/// registered regions (ids 1 and 2, of 64 and 4096 bytes): whatever the
/// bytes, nothing is written outside them (the address sanitizer checks).
pub fn tcp_stream(data: &[u8]) {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let mut small = vec![0u8; 64];
    let mut big = vec![0u8; 4096];
    let table = Table(vec![
        (
            1,
            RegionRef {
                base: small.as_mut_ptr(),
                len: small.len(),
                keep: None,
            },
        ),
        (
            2,
            RegionRef {
                base: big.as_mut_ptr(),
                len: big.len(),
                keep: None,
            },
        ),
    ]);
    let lane = if mode & 1 == 0 { Lane::Data } else { Lane::Ack };
    let step = 1 + usize::from(mode >> 1);
    let mut dec = Decoder::new(lane);
    while !rest.is_empty() {
        // SAFETY: the regions outlive the decoder; nothing else touches them.
        let buf = unsafe { dec.read_buf() };
        let n = buf.len().min(step).min(rest.len());
        buf[..n].copy_from_slice(&rest[..n]);
        rest = &rest[n..];
        if dec.advance(n, &table).is_err() {
            return; // a bad frame closes the connection
        }
    }
}

/// Seed inputs: one valid example of everything each target decodes.
#[cfg(test)]
fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    use crate::codec::Writer;
    use crate::group::{Role, Shape};
    use crate::transport::tcp::frame::Header;
    let mut out = Vec::new();
    for (name, frame) in crate::bootstrap::fuzz_examples(Role::Expert, Shape::new(2, 3)) {
        out.push(("bootstrap_frame", name, frame));
    }
    let data = Header {
        lane: Lane::Data,
        region: 2,
        offset: 100,
        len: 16,
        imm: Some(0x1234),
    };
    let mut w = vec![0u8];
    w.extend_from_slice(&data.encode());
    w.extend_from_slice(&[7u8; 16]);
    out.push(("tcp_stream", "data-write-imm", w));
    let credit = Header {
        lane: Lane::Ack,
        region: 1,
        offset: 8,
        len: 8,
        imm: None,
    };
    let mut w = vec![3u8];
    w.extend_from_slice(&credit.encode());
    w.extend_from_slice(&5u64.to_le_bytes());
    out.push(("tcp_stream", "ack-credit-word", w));
    let shm = Writer::new()
        .u32(0x4d32_4e53)
        .u32(1234)
        .u32(7)
        .u32(4)
        .u32(1024)
        .bytes(b"m2n-0123456789abcdef-inbox")
        .bytes(b"host-id")
        .finish();
    out.push(("descriptors", "shm-endpoint", shm));
    let tcp = Writer::new().u32(0x4d32_4e47).u32(3).u64(1 << 20).finish();
    out.push(("descriptors", "tcp-region", tcp));
    #[cfg(feature = "verbs")]
    {
        let ep = crate::transport::verbs::Endpoint {
            lid: 0,
            gid: [9; 16],
            mtu: 1024,
            qpns: vec![(10, 11), (12, 13), (14, 15), (16, 17)],
        };
        out.push(("descriptors", "verbs-endpoint", ep.encode()));
        let rd = crate::transport::verbs::RegionDescriptor {
            addr: 0x1000,
            rkey: 42,
            len: 4096,
        };
        out.push(("descriptors", "verbs-region", rd.encode()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed corpus in `m2n/fuzz/corpus` is what `seeds()` makes (write
    /// it with `M2N_BLESS=1`), and every seed is accepted by its decoder, so
    /// fuzzing starts from inputs that reach deep into the code.
    #[test]
    fn the_seed_corpus_is_current_and_valid() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
        for (target, name, bytes) in seeds() {
            let path = dir.join(target).join(name);
            if std::env::var_os("M2N_BLESS").is_some() {
                std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            }
            let on_disk = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (M2N_BLESS=1 writes it)", path.display()));
            assert_eq!(
                on_disk,
                bytes,
                "{} is stale (M2N_BLESS=1 rewrites it)",
                path.display()
            );
            match target {
                "bootstrap_frame" => {
                    assert!(crate::bootstrap::fuzz_decode(&bytes).is_ok(), "{name}")
                }
                "descriptors" => {
                    let ok = crate::transport::shm::ShmTransport::decode_endpoint(0, &bytes)
                        .is_ok()
                        || crate::transport::tcp::parse_region_descriptor(&bytes).is_ok()
                        || cfg!(feature = "verbs") && name.starts_with("verbs");
                    assert!(ok, "{name} decodes");
                }
                _ => {}
            }
            // The targets themselves run cleanly on every seed.
            match target {
                "bootstrap_frame" => bootstrap_frame(&bytes),
                "tcp_stream" => tcp_stream(&bytes),
                _ => descriptors(&bytes),
            }
        }
    }

    #[test]
    fn the_tcp_target_delivers_a_valid_frame() {
        // A valid write lands; it is no no-op target.
        let data = Header {
            lane: Lane::Data,
            region: 2,
            offset: 0,
            len: 4,
            imm: Some(1),
        };
        let mut small = vec![0u8; 64];
        let table = Table(vec![(
            2,
            RegionRef {
                base: small.as_mut_ptr(),
                len: small.len(),
                keep: None,
            },
        )]);
        let mut bytes = data.encode().to_vec();
        bytes.extend_from_slice(&[1, 2, 3, 4]);
        let mut dec = Decoder::new(Lane::Data);
        let mut rest = &bytes[..];
        let mut arrived = None;
        while !rest.is_empty() {
            // SAFETY: `small` outlives the decoder.
            let buf = unsafe { dec.read_buf() };
            let n = buf.len().min(rest.len());
            buf[..n].copy_from_slice(&rest[..n]);
            rest = &rest[n..];
            arrived = dec.advance(n, &table).unwrap().or(arrived);
        }
        assert!(arrived.is_some());
        assert_eq!(&small[..4], &[1, 2, 3, 4]);
    }

    use crate::transport::tcp::frame::Header;
}
