//! The 32-bit immediate carried by every data write.
//!
//! ```text
//!  31      30 ........ 20  19 ..... 12  11 ........ 0
//! +-------+--------------+------------+--------------+
//! |channel| sender (11)  |  slot (8)  | round (12)   |
//! +-------+--------------+------------+--------------+
//! ```
//!
//! The receiver knows which round it expects next from each sender (writes
//! from one sender to one receiver arrive in order), so the low 12 bits of the
//! round are enough to tell a current write from a stale or a future one: a
//! sender is never more than `depth <= 256` rounds ahead.

use super::ChannelId;

pub const SENDER_BITS: u32 = 11;
pub const SLOT_BITS: u32 = 8;
pub const ROUND_BITS: u32 = 12;

/// Most senders one channel can have.
pub const MAX_SENDERS: usize = 1 << SENDER_BITS;
/// Deepest slot ring a channel can have.
pub const MAX_DEPTH: usize = 1 << SLOT_BITS;
pub const ROUND_MASK: u32 = (1 << ROUND_BITS) - 1;

/// A decoded immediate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Immediate {
    pub channel: ChannelId,
    pub sender: u16,
    pub slot: u8,
    pub round_bits: u16,
}

impl Immediate {
    /// Builds the immediate of `round` from `sender` on `channel` into `slot`.
    pub fn new(channel: ChannelId, sender: usize, slot: usize, round: u64) -> Self {
        debug_assert!(sender < MAX_SENDERS && slot < MAX_DEPTH);
        Self {
            channel,
            sender: sender as u16,
            slot: slot as u8,
            round_bits: (round & u64::from(ROUND_MASK)) as u16,
        }
    }

    pub fn encode(self) -> u32 {
        let ch = match self.channel {
            ChannelId::Dispatch => 0,
            ChannelId::Combine => 1,
        };
        (ch << 31)
            | (u32::from(self.sender) << (SLOT_BITS + ROUND_BITS))
            | (u32::from(self.slot) << ROUND_BITS)
            | u32::from(self.round_bits)
    }

    pub fn decode(imm: u32) -> Self {
        let channel = if imm >> 31 == 0 {
            ChannelId::Dispatch
        } else {
            ChannelId::Combine
        };
        Self {
            channel,
            sender: ((imm >> (SLOT_BITS + ROUND_BITS)) & ((1 << SENDER_BITS) - 1)) as u16,
            slot: ((imm >> ROUND_BITS) & ((1 << SLOT_BITS) - 1)) as u8,
            round_bits: (imm & ROUND_MASK) as u16,
        }
    }

    /// Where `self.round_bits` lies relative to the round `expected`:
    /// 0 if it is that round, positive if ahead, negative if behind
    /// (modulo 2^12, split at half the space).
    pub fn round_distance(self, expected: u64) -> i32 {
        let exp = (expected & u64::from(ROUND_MASK)) as i32;
        let diff = (i32::from(self.round_bits) - exp).rem_euclid(1 << ROUND_BITS);
        if diff >= 1 << (ROUND_BITS - 1) {
            diff - (1 << ROUND_BITS)
        } else {
            diff
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn encode_decode_round_trip(ch in any::<bool>(), sender in 0usize..MAX_SENDERS,
                                    slot in 0usize..MAX_DEPTH, round in any::<u64>()) {
            let channel = if ch { ChannelId::Combine } else { ChannelId::Dispatch };
            let imm = Immediate::new(channel, sender, slot, round);
            let back = Immediate::decode(imm.encode());
            prop_assert_eq!(back, imm);
            prop_assert_eq!(back.round_distance(round), 0);
        }

        #[test]
        fn distance_is_signed_within_window(round in 300u64..1_000_000, delta in -255i32..=255) {
            let imm = Immediate::new(ChannelId::Dispatch, 0, 0, (round as i64 + i64::from(delta)) as u64);
            prop_assert_eq!(imm.round_distance(round), delta);
        }
    }
}
