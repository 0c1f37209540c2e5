//! The dispatch and combine message layout: what crosses m2n every layer
//! and micro-batch. Self-describing, little-endian, checked on arrival.
//!
//! A **dispatch** message goes from attention rank `a` to expert rank `r`:
//!
//! ```text
//! offset size
//!  0      4   magic "M2ND"
//!  4      2   version (1)
//!  6      2   flags: bit 0 ACTIVE (rank a has sequences this step)
//!  8      4   step (low 32 bits of the iteration number)
//! 12      2   layer
//! 14      2   micro-batch
//! 16      4   rows
//! 20      4   hidden
//! 24      2   micro-batches per layer
//! 26      2   layers
//! 28      4   reserved (0)
//! 32   8*rows entries: { expert u32, gate weight f32 }, by expert, tokens
//!             in order within an expert (the dispatch layout)
//!  pad to a multiple of 64
//!       2*rows*hidden  the rows (bf16), in entry order
//! ```
//!
//! A **combine** message goes back from `r` to `a`, with one output row per
//! dispatched row, in the same order:
//!
//! ```text
//!  0      4   magic "M2NC"
//!  4      2   version (1)
//!  6      2   flags: bit 0 GROUP_ACTIVE (some attention rank had
//!             sequences this step: the step is not the group's last);
//!             bit 1 WAITED (the expert was idle, waiting for this round,
//!             so it did not queue behind another micro-batch)
//!  8      4   step
//! 12      2   layer
//! 14      2   micro-batch
//! 16      4   rows
//! 20      4   hidden
//! 24      4   expert residence ns (round received to combine posted)
//! 28      4   expert compute ns
//! 32 2*rows*hidden  the expert outputs (bf16)
//! ```
//!
//! Weights travel so a message is complete on its own (the expert checks
//! each entry names one of its experts and a finite weight); the attention
//! side applies them in its combine, so that the sum runs in one fixed
//! order whatever the split of experts over ranks.

use half::bf16;
use kernels::cpu::layout::Entry;

pub const DISPATCH_MAGIC: [u8; 4] = *b"M2ND";
pub const COMBINE_MAGIC: [u8; 4] = *b"M2NC";
pub const VERSION: u16 = 1;
pub const HEADER: usize = 32;
pub const FLAG_ACTIVE: u16 = 1;
/// Combine: the expert was waiting when this round came in.
pub const FLAG_WAITED: u16 = 2;
/// A blocking wait shorter than this found its round already in.
pub const WAIT_THRESHOLD_NS: u64 = 5_000;

/// Where the rows of a dispatch message with `rows` entries start.
pub fn dispatch_rows_offset(rows: usize) -> usize {
    (HEADER + 8 * rows).div_ceil(64) * 64
}

/// Bytes of a dispatch message.
pub fn dispatch_len(rows: usize, hidden: usize) -> usize {
    dispatch_rows_offset(rows) + 2 * rows * hidden
}

/// Bytes of a combine message.
pub fn combine_len(rows: usize, hidden: usize) -> usize {
    HEADER + 2 * rows * hidden
}

/// The header fields both messages share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub flags: u16,
    pub step: u32,
    pub layer: u16,
    pub microbatch: u16,
    pub rows: u32,
    pub hidden: u32,
    /// Dispatch: micro-batches and layers; combine: residence and compute ns.
    pub extra: [u32; 2],
}

impl Header {
    fn write(&self, magic: [u8; 4], out: &mut [u8], extra_u16: bool) {
        out[0..4].copy_from_slice(&magic);
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&self.flags.to_le_bytes());
        out[8..12].copy_from_slice(&self.step.to_le_bytes());
        out[12..14].copy_from_slice(&self.layer.to_le_bytes());
        out[14..16].copy_from_slice(&self.microbatch.to_le_bytes());
        out[16..20].copy_from_slice(&self.rows.to_le_bytes());
        out[20..24].copy_from_slice(&self.hidden.to_le_bytes());
        if extra_u16 {
            out[24..26].copy_from_slice(&(self.extra[0] as u16).to_le_bytes());
            out[26..28].copy_from_slice(&(self.extra[1] as u16).to_le_bytes());
            out[28..32].fill(0);
        } else {
            out[24..28].copy_from_slice(&self.extra[0].to_le_bytes());
            out[28..32].copy_from_slice(&self.extra[1].to_le_bytes());
        }
    }

    fn read(magic: [u8; 4], m: &[u8], extra_u16: bool) -> Result<Self, String> {
        if m.len() < HEADER {
            return Err(format!(
                "{} bytes, shorter than the {HEADER}-byte header",
                m.len()
            ));
        }
        if m[0..4] != magic {
            return Err(format!(
                "magic {:?}, expected {:?}",
                String::from_utf8_lossy(&m[0..4]),
                String::from_utf8_lossy(&magic)
            ));
        }
        let u16_at = |o: usize| u16::from_le_bytes([m[o], m[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([m[o], m[o + 1], m[o + 2], m[o + 3]]);
        let version = u16_at(4);
        if version != VERSION {
            return Err(format!("version {version}, this build speaks {VERSION}"));
        }
        Ok(Self {
            flags: u16_at(6),
            step: u32_at(8),
            layer: u16_at(12),
            microbatch: u16_at(14),
            rows: u32_at(16),
            hidden: u32_at(20),
            extra: if extra_u16 {
                [u32::from(u16_at(24)), u32::from(u16_at(26))]
            } else {
                [u32_at(24), u32_at(28)]
            },
        })
    }
}

/// Writes a dispatch message into `out` (which must hold
/// [`dispatch_len`] bytes): the header, `entries` (experts as global ids),
/// and each entry's row of `y` (`tokens x hidden`). Returns its length.
pub fn write_dispatch(
    out: &mut [u8],
    head: &Header,
    entries: &[Entry],
    y: &[bf16],
    hidden: usize,
) -> usize {
    let len = dispatch_len(entries.len(), hidden);
    let out = &mut out[..len];
    head.write(DISPATCH_MAGIC, out, true);
    for (i, e) in entries.iter().enumerate() {
        let o = HEADER + 8 * i;
        out[o..o + 4].copy_from_slice(&(e.expert as u32).to_le_bytes());
        out[o + 4..o + 8].copy_from_slice(&e.weight.to_le_bytes());
    }
    let start = dispatch_rows_offset(entries.len());
    out[HEADER + 8 * entries.len()..start].fill(0);
    let rows: &mut [bf16] = bytemuck::cast_slice_mut(&mut out[start..]);
    for (row, e) in rows.chunks_exact_mut(hidden).zip(entries) {
        row.copy_from_slice(&y[e.token * hidden..][..hidden]);
    }
    len
}

/// A received dispatch message, checked: its header, entries and rows,
/// read in place from the message (nothing is copied or allocated).
#[derive(Debug)]
pub struct Dispatch<'a> {
    pub head: Header,
    /// The entries, `{ expert u32, weight f32 }` per row.
    entries: &'a [u8],
    /// The rows (`rows x hidden`), in entry order.
    pub data: &'a [bf16],
}

impl Dispatch<'_> {
    /// Rows (entries) in the message.
    pub fn rows(&self) -> usize {
        self.entries.len() / 8
    }

    /// Row `i`'s expert (a global id).
    pub fn expert(&self, i: usize) -> u32 {
        entry_at(self.entries, i).0
    }

    /// Row `i`'s gate weight.
    pub fn weight(&self, i: usize) -> f32 {
        entry_at(self.entries, i).1
    }

    /// `(expert, weight)` of every row, in order.
    pub fn entries(&self) -> impl Iterator<Item = (u32, f32)> + '_ {
        (0..self.rows()).map(|i| entry_at(self.entries, i))
    }
}

/// Entry `i` of a dispatch message's entry table.
fn entry_at(table: &[u8], i: usize) -> (u32, f32) {
    let o = 8 * i;
    let e = u32::from_le_bytes([table[o], table[o + 1], table[o + 2], table[o + 3]]);
    let w = f32::from_le_bytes([table[o + 4], table[o + 5], table[o + 6], table[o + 7]]);
    (e, w)
}

/// Parses and checks a dispatch message for an expert rank holding
/// experts `experts` of a model with `hidden`.
pub fn read_dispatch(
    m: &[u8],
    hidden: usize,
    experts: std::ops::Range<u32>,
) -> Result<Dispatch<'_>, String> {
    let head = Header::read(DISPATCH_MAGIC, m, true)?;
    if head.hidden as usize != hidden {
        return Err(format!(
            "hidden size {}, the model's is {hidden}",
            head.hidden
        ));
    }
    let rows = head.rows as usize;
    let need = dispatch_len(rows, hidden);
    if m.len() != need {
        return Err(format!(
            "{} bytes, but {rows} rows of {hidden} need {need}",
            m.len()
        ));
    }
    let table = &m[HEADER..HEADER + 8 * rows];
    let mut last = experts.start;
    for i in 0..rows {
        let (e, w) = entry_at(table, i);
        if !experts.contains(&e) {
            return Err(format!(
                "row {i} is for expert {e}, this rank holds experts {}..{}",
                experts.start, experts.end
            ));
        }
        if e < last {
            return Err(format!(
                "row {i}: expert {e} after expert {last} (rows must be grouped by expert)"
            ));
        }
        if !w.is_finite() {
            return Err(format!("row {i}: gate weight {w}"));
        }
        last = e;
    }
    let start = dispatch_rows_offset(rows);
    let data: &[bf16] = bytemuck::try_cast_slice(&m[start..])
        .map_err(|e| format!("rows are not bf16-aligned: {e}"))?;
    Ok(Dispatch {
        head,
        entries: table,
        data,
    })
}

/// Writes a combine header into `out[..HEADER]`; the rows follow it.
pub fn write_combine_header(out: &mut [u8], head: &Header) {
    head.write(COMBINE_MAGIC, out, false);
}

/// The output rows area of a combine message in `out`.
pub fn combine_rows_mut(out: &mut [u8], rows: usize, hidden: usize) -> &mut [bf16] {
    bytemuck::cast_slice_mut(&mut out[HEADER..combine_len(rows, hidden)])
}

/// Parses and checks a combine message against what was dispatched.
pub fn read_combine(
    m: &[u8],
    hidden: usize,
    step: u32,
    layer: u16,
    microbatch: u16,
    rows: usize,
) -> Result<(Header, &[bf16]), String> {
    let head = Header::read(COMBINE_MAGIC, m, false)?;
    let want = (step, layer, microbatch, rows as u32, hidden as u32);
    let got = (
        head.step,
        head.layer,
        head.microbatch,
        head.rows,
        head.hidden,
    );
    if got != want {
        return Err(format!(
            "(step, layer, micro-batch, rows, hidden) = {got:?}, expected {want:?}"
        ));
    }
    if m.len() != combine_len(rows, hidden) {
        return Err(format!(
            "{} bytes, {rows} rows of {hidden} need {}",
            m.len(),
            combine_len(rows, hidden)
        ));
    }
    let out: &[bf16] = bytemuck::try_cast_slice(&m[HEADER..])
        .map_err(|e| format!("rows are not bf16-aligned: {e}"))?;
    Ok((head, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(rows: u32) -> Header {
        Header {
            flags: FLAG_ACTIVE,
            step: 7,
            layer: 3,
            microbatch: 1,
            rows,
            hidden: 4,
            extra: [2, 8],
        }
    }

    #[test]
    fn dispatch_round_trips_and_is_checked() {
        let y: Vec<bf16> = (0..12).map(|i| bf16::from_f32(i as f32)).collect();
        let entries = [
            Entry {
                token: 2,
                expert: 4,
                weight: 0.75,
            },
            Entry {
                token: 0,
                expert: 5,
                weight: 0.25,
            },
        ];
        let mut buf = vec![0u8; 4096];
        let len = write_dispatch(&mut buf, &head(2), &entries, &y, 4);
        assert_eq!(len, dispatch_len(2, 4));
        let d = read_dispatch(&buf[..len], 4, 4..6).unwrap();
        assert_eq!(d.head, head(2));
        assert_eq!(d.entries().collect::<Vec<_>>(), vec![(4, 0.75), (5, 0.25)]);
        assert_eq!((d.rows(), d.expert(1), d.weight(0)), (2, 5, 0.75));
        assert_eq!(d.data[..4], y[8..12]);
        assert_eq!(d.data[4..], y[0..4]);
        // Each defect is named.
        let err = read_dispatch(&buf[..len], 4, 0..4).unwrap_err();
        assert!(err.contains("expert 4") && err.contains("0..4"), "{err}");
        let err = read_dispatch(&buf[..len], 8, 4..6).unwrap_err();
        assert!(err.contains("hidden size 4"), "{err}");
        let err = read_dispatch(&buf[..len - 2], 4, 4..6).unwrap_err();
        assert!(err.contains("bytes"), "{err}");
        let mut bad = buf.clone();
        bad[0] = b'X';
        assert!(read_dispatch(&bad[..len], 4, 4..6)
            .unwrap_err()
            .contains("magic"));
        let mut bad = buf.clone();
        bad[HEADER + 8..HEADER + 12].copy_from_slice(&3u32.to_le_bytes());
        bad[HEADER..HEADER + 4].copy_from_slice(&5u32.to_le_bytes());
        assert!(read_dispatch(&bad[..len], 4, 3..6)
            .unwrap_err()
            .contains("grouped"));
    }

    #[test]
    fn combine_is_checked_against_the_dispatch() {
        let mut buf = vec![0u8; combine_len(2, 4)];
        write_combine_header(&mut buf, &head(2));
        combine_rows_mut(&mut buf, 2, 4).fill(bf16::ONE);
        let (h, rows) = read_combine(&buf, 4, 7, 3, 1, 2).unwrap();
        assert_eq!(h.extra, [2, 8]);
        assert!(rows.iter().all(|&v| v == bf16::ONE));
        let err = read_combine(&buf, 4, 7, 2, 1, 2).unwrap_err();
        assert!(err.contains("expected"), "{err}");
        assert!(read_combine(&buf[..40], 4, 7, 3, 1, 2).is_err());
    }
}
