use std::time::{Duration, Instant};

use super::{ChannelId, Geometry, Immediate, ProtoError};

/// A round whose messages from every sender have all arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveredRound {
    pub round: u64,
    /// Length of each sender's message; its bytes are at
    /// `Geometry::slot_offset(sender, slot)` in the ring.
    pub lens: Vec<u32>,
    pub slot: usize,
}

/// A credit to write to every sender: "I have released `released` rounds".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditOp {
    pub released: u64,
}

/// The receiving side of one channel, for one receiver.
#[derive(Debug)]
pub struct RecvChannel {
    geo: Geometry,
    channel: ChannelId,
    /// Per sender: rounds that have arrived.
    arrived: Vec<u64>,
    /// Message length per (sender, slot).
    lens: Vec<u32>,
    /// The next round to deliver to the application.
    delivered: u64,
    /// Rounds released, counted from 0; `release_flags` covers rounds
    /// `released..delivered`.
    released: u64,
    release_flags: Vec<bool>,
    /// The `released` value of the last credit emitted.
    published: u64,
    /// Most rounds that have arrived from any one sender.
    max_arrived: u64,
    /// Releases that may wait unpublished (see [`with_credit_batch`](Self::with_credit_batch)).
    batch: u64,
    /// When the current credit is due again (`refresh` after the last one
    /// was published; None before the first).
    refresh_at: Option<Instant>,
    refresh: Duration,
    /// Length vectors of released rounds, reused by later deliveries so
    /// that receiving allocates nothing once warm.
    spare_lens: Vec<Vec<u32>>,
}

impl RecvChannel {
    /// `refresh` is how often the current credit is re-sent even without
    /// news, so that a lost credit write cannot stall a sender forever.
    pub fn new(geo: Geometry, channel: ChannelId, refresh: Duration) -> Result<Self, ProtoError> {
        geo.validate()?;
        Ok(Self {
            geo,
            channel,
            arrived: vec![0; geo.senders],
            lens: vec![0; geo.senders * geo.depth],
            delivered: 0,
            released: 0,
            release_flags: vec![false; geo.depth],
            published: 0,
            max_arrived: 0,
            batch: 1,
            refresh_at: None,
            refresh,
            spare_lens: Vec::new(),
        })
    }

    /// Coalesces credits: a release is published once `batch` releases are
    /// unpublished, or at once when some sender may be waiting for it (it
    /// has used its whole window: `depth` rounds past the last credit), or
    /// at the next refresh. 1 (the default) publishes every release; 0
    /// picks `depth / 2` (at least 1), which halves the credit writes of a
    /// ping-pong with depth 4 and keeps a streaming sender at least half a
    /// window ahead. A sender never waits on an unpublished release, so no
    /// setting can stall a channel.
    pub fn with_credit_batch(mut self, batch: usize) -> Self {
        let batch = if batch == 0 {
            self.geo.depth / 2
        } else {
            batch
        };
        self.batch = batch.clamp(1, self.geo.depth) as u64;
        self
    }

    /// The credit batch in force (see [`with_credit_batch`](Self::with_credit_batch)).
    pub fn credit_batch(&self) -> usize {
        self.batch as usize
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// Validates and records a write that arrived from transport peer
    /// `peer` (its sender index) carrying `imm` and `len` bytes.
    ///
    /// Every check happens before any state changes; a failed check is a
    /// protocol error naming the peer.
    #[inline]
    pub fn on_arrival(&mut self, peer: usize, imm: u32, len: usize) -> Result<(), ProtoError> {
        let imm = Immediate::decode(imm);
        let claimed = usize::from(imm.sender);
        if claimed >= self.geo.senders {
            return Err(ProtoError::UnknownSender {
                peer,
                claimed,
                senders: self.geo.senders,
            });
        }
        if claimed != peer {
            return Err(ProtoError::Misrouted { peer, claimed });
        }
        if imm.channel != self.channel {
            return Err(ProtoError::WrongChannel {
                peer,
                got: imm.channel,
                expected: self.channel,
            });
        }
        let expected = self.arrived[peer];
        match imm.round_distance(expected) {
            0 => {}
            d if d < 0 => {
                return Err(ProtoError::StaleRound {
                    peer,
                    round_bits: imm.round_bits,
                    expected,
                })
            }
            _ => {
                return Err(ProtoError::FutureRound {
                    peer,
                    round_bits: imm.round_bits,
                    expected,
                })
            }
        }
        let slot = self.geo.slot_of(expected);
        if usize::from(imm.slot) != slot {
            return Err(ProtoError::WrongSlot {
                peer,
                slot: usize::from(imm.slot),
                expected: slot,
                round: expected,
            });
        }
        if len > self.geo.slot_bytes {
            return Err(ProtoError::TooLong {
                peer,
                len,
                slot_bytes: self.geo.slot_bytes,
            });
        }
        if expected >= self.released + self.geo.depth as u64 {
            return Err(ProtoError::CreditOverrun {
                peer,
                round: expected,
                consumed: self.released,
                depth: self.geo.depth,
            });
        }
        self.lens[peer * self.geo.depth + slot] = len as u32;
        self.arrived[peer] = expected + 1;
        self.max_arrived = self.max_arrived.max(expected + 1);
        Ok(())
    }

    /// The next complete round, in order, if every sender's message is in.
    pub fn poll_round(&mut self) -> Option<DeliveredRound> {
        let round = self.delivered;
        if self.arrived.iter().any(|&a| a <= round) {
            return None;
        }
        let slot = self.geo.slot_of(round);
        let mut lens = self.spare_lens.pop().unwrap_or_default();
        lens.clear();
        lens.extend((0..self.geo.senders).map(|s| self.lens[s * self.geo.depth + slot]));
        self.delivered += 1;
        Some(DeliveredRound { round, lens, slot })
    }

    /// Senders whose message for the next undelivered round is missing.
    pub fn missing_senders(&self) -> impl Iterator<Item = usize> + '_ {
        let round = self.delivered;
        (0..self.geo.senders).filter(move |&s| self.arrived[s] <= round)
    }

    /// The next round [`poll_round`](Self::poll_round) will deliver.
    pub fn next_round(&self) -> u64 {
        self.delivered
    }

    /// Rounds released so far.
    pub fn released(&self) -> u64 {
        self.released
    }

    /// Takes back a delivered round's length vector for reuse (at most
    /// one per slot is kept).
    pub fn recycle_lens(&mut self, lens: Vec<u32>) {
        if self.spare_lens.len() < self.geo.depth {
            self.spare_lens.push(lens);
        }
    }

    /// Releases a delivered round; its slots become free for the senders.
    /// Rounds may be released in any order; credit covers the released prefix.
    pub fn release(&mut self, round: u64) -> Result<(), ProtoError> {
        if round >= self.delivered {
            return Err(ProtoError::BadRelease {
                round,
                why: "it has not been delivered",
            });
        }
        if round < self.released {
            return Err(ProtoError::BadRelease {
                round,
                why: "it was already released",
            });
        }
        let flag = &mut self.release_flags[self.geo.slot_of(round)];
        if *flag {
            return Err(ProtoError::BadRelease {
                round,
                why: "it was already released",
            });
        }
        *flag = true;
        while self.released < self.delivered && self.release_flags[self.geo.slot_of(self.released)]
        {
            self.release_flags[self.geo.slot_of(self.released)] = false;
            self.released += 1;
        }
        Ok(())
    }

    /// Whether a release is unpublished that some sender may be waiting
    /// for: it has used its whole window past the last credit published.
    #[inline]
    pub fn sender_may_wait(&self) -> bool {
        self.released > self.published && self.max_arrived >= self.published + self.geo.depth as u64
    }

    /// The credit to write to every sender now, if any: after `batch`
    /// releases, after any release a sender may be waiting for, and every
    /// `refresh` interval (which also repairs a lost credit). With
    /// `hold_batch` a full batch alone is not due yet (the caller will post
    /// it with its next data write: piggybacked credits); a sender that may
    /// be waiting and the refresh still are.
    pub fn poll_credit(&mut self, now: Instant, hold_batch: bool) -> Option<CreditOp> {
        let unpublished = self.released - self.published;
        let refresh_due = self.refresh_at.is_some_and(|at| now >= at);
        let due = if unpublished > 0 {
            (unpublished >= self.batch && !hold_batch) || self.sender_may_wait() || refresh_due
        } else {
            self.released > 0 && refresh_due
        };
        if !due {
            return None;
        }
        self.published = self.released;
        // (A deadline, not the last credit's time: a comparison per poll
        // instead of a subtraction. None past the clock's range: never.)
        self.refresh_at = now.checked_add(self.refresh);
        Some(CreditOp {
            released: self.released,
        })
    }
}
