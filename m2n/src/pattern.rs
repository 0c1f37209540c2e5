//! Deterministic message contents for data checks: every byte depends on
//! the sender, the receiver, the round and the channel, so a misrouted,
//! stale or torn message is caught.

use crate::proto::ChannelId;

/// The seed of one message.
pub fn seed(channel: ChannelId, sender: usize, receiver: usize, round: u64) -> u64 {
    let ch = matches!(channel, ChannelId::Combine) as u64;
    let mut x = ch
        ^ (sender as u64) << 1
        ^ (receiver as u64) << 22
        ^ round.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn word(seed: u64, i: usize) -> u64 {
    seed ^ (i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)
}

/// Fills `buf` with the pattern of `seed`.
pub fn fill(buf: &mut [u8], seed: u64) {
    let mut chunks = buf.chunks_exact_mut(8);
    for (i, c) in (&mut chunks).enumerate() {
        c.copy_from_slice(&word(seed, i).to_le_bytes());
    }
    let tail_index = buf.len() / 8;
    let rem = buf.len() % 8;
    if rem > 0 {
        let w = word(seed, tail_index).to_le_bytes();
        let start = buf.len() - rem;
        buf[start..].copy_from_slice(&w[..rem]);
    }
}

/// Counts the bytes of `buf` that differ from the pattern of `seed`.
pub fn count_wrong(buf: &[u8], seed: u64) -> usize {
    let mut wrong = 0;
    let mut chunks = buf.chunks_exact(8);
    for (i, c) in (&mut chunks).enumerate() {
        let want = word(seed, i).to_le_bytes();
        if c != want {
            wrong += c.iter().zip(want).filter(|(a, b)| **a != *b).count();
        }
    }
    let rem = chunks.remainder();
    let want = word(seed, buf.len() / 8).to_le_bytes();
    wrong + rem.iter().zip(want).filter(|(a, b)| **a != *b).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_then_check_and_detect_flips() {
        for len in [0, 1, 7, 8, 9, 4097] {
            let s = seed(ChannelId::Dispatch, 1, 2, 3);
            let mut b = vec![0u8; len];
            fill(&mut b, s);
            assert_eq!(count_wrong(&b, s), 0);
            if len > 0 {
                b[len - 1] ^= 0x10;
                assert_eq!(count_wrong(&b, s), 1);
            }
        }
        assert_ne!(
            seed(ChannelId::Dispatch, 0, 1, 0),
            seed(ChannelId::Dispatch, 1, 0, 0)
        );
        assert_ne!(
            seed(ChannelId::Dispatch, 0, 0, 0),
            seed(ChannelId::Combine, 0, 0, 0)
        );
        assert_ne!(
            seed(ChannelId::Dispatch, 0, 0, 0),
            seed(ChannelId::Dispatch, 0, 0, 1)
        );
    }
}
