//! The M2N protocol as a sans-IO state machine.
//!
//! Nothing in here touches memory, sockets, threads or clocks. A
//! [`SendChannel`] turns "send round k with these lengths" into [`WriteOp`]s
//! and enforces credits; a [`RecvChannel`] validates arrivals (immediate plus
//! length), assembles rounds, and turns releases into [`CreditOp`]s. The
//! communicator feeds both from a transport; the tests feed them from a
//! simulated fabric.
//!
//! Memory layout on each receiver: for every sender `s`, a ring of `depth`
//! slots of `slot_bytes`; round `k` of sender `s` lands at
//! [`Geometry::slot_offset`]`(s, k % depth)`.
//!
//! Credits: a receiver publishes, per sender, the number of rounds it has
//! released (an absolute counter, so a lost or reordered credit is superseded
//! by the next one). A sender may issue round `k` to a receiver only while
//! `k < released + depth`, so no slot is ever overwritten before release.

mod error;
pub mod gate;
pub mod imm;
mod receiver;
mod sender;

pub use error::ProtoError;
pub use imm::Immediate;
pub use receiver::{CreditOp, DeliveredRound, RecvChannel};
pub use sender::{SendChannel, WriteOp};

/// The two channels of a communicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelId {
    /// Attention (M) to experts (N).
    Dispatch,
    /// Experts (N) back to attention (M).
    Combine,
}

/// Which queue a write travels on. Transports may map [`Lane::Ack`] to a
/// higher-priority traffic class, as MegaScale-Infer does for its ACKs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    Data,
    Ack,
}

/// Shape and memory of one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Ranks on the sending side.
    pub senders: usize,
    /// Ranks on the receiving side.
    pub receivers: usize,
    /// Slots per sender on each receiver: how many rounds a sender may run ahead.
    pub depth: usize,
    /// Largest message one sender sends one receiver per round.
    pub slot_bytes: usize,
}

impl Geometry {
    /// Checks the limits the immediate encoding and the memory layout impose.
    pub fn validate(&self) -> Result<(), ProtoError> {
        let bad = |m: String| Err(ProtoError::InvalidGeometry(m));
        if self.senders == 0 || self.receivers == 0 {
            return bad(format!(
                "{} senders and {} receivers: both sides need at least one rank",
                self.senders, self.receivers
            ));
        }
        if self.senders > imm::MAX_SENDERS || self.receivers > imm::MAX_SENDERS {
            return bad(format!("at most {} ranks per side", imm::MAX_SENDERS));
        }
        if self.depth == 0 || self.depth > imm::MAX_DEPTH {
            return bad(format!(
                "depth {} is outside 1..={}",
                self.depth,
                imm::MAX_DEPTH
            ));
        }
        if self.slot_bytes > u32::MAX as usize {
            return bad(format!(
                "slot_bytes {} does not fit in 32 bits",
                self.slot_bytes
            ));
        }
        if self.ring_bytes().is_none() {
            return bad("senders * depth * slot_bytes overflows".into());
        }
        Ok(())
    }

    /// Bytes of the receive ring each receiver registers.
    pub fn ring_bytes(&self) -> Option<usize> {
        self.senders
            .checked_mul(self.depth)?
            .checked_mul(self.slot_bytes)
    }

    /// Offset of `slot` of `sender` in a receiver's ring.
    pub fn slot_offset(&self, sender: usize, slot: usize) -> usize {
        (sender * self.depth + slot) * self.slot_bytes
    }

    /// The slot round `round` lands in.
    pub fn slot_of(&self, round: u64) -> usize {
        // A mask where the depth is a power of two (the default 4 is): a
        // round's slot is looked up several times per message, on the path
        // a round trip waits on. With poll_transmit's divisions gone too,
        // each side's work from a round's arrival to its reply's post fell
        // by about 40 cycles (of 450) over libfabric's shm.
        let depth = self.depth as u64;
        if depth.is_power_of_two() {
            (round & (depth - 1)) as usize
        } else {
            (round % depth) as usize
        }
    }
}

#[cfg(test)]
mod sim;

#[cfg(test)]
mod geometry_tests {
    use super::Geometry;

    #[test]
    fn slot_of_is_the_round_modulo_the_depth_for_every_depth() {
        for depth in 1..=9 {
            let geo = Geometry {
                senders: 1,
                receivers: 1,
                depth,
                slot_bytes: 8,
            };
            for round in (0..100).chain([u64::MAX - 3, u64::MAX]) {
                assert_eq!(
                    geo.slot_of(round),
                    (round % depth as u64) as usize,
                    "depth {depth}, round {round}"
                );
            }
        }
    }
}
