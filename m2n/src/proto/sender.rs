use std::collections::VecDeque;

use super::{ChannelId, Geometry, Immediate, Lane, ProtoError};

/// A write the transport must perform: `len` bytes of round `round` to
/// `receiver`, at `remote_offset` in its ring, carrying `imm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOp {
    pub receiver: usize,
    pub round: u64,
    pub lane: Lane,
    pub remote_offset: usize,
    pub len: usize,
    pub imm: u32,
}

/// The sending side of one channel, for one sender.
#[derive(Debug)]
pub struct SendChannel {
    geo: Geometry,
    channel: ChannelId,
    me: usize,
    /// The next round the application will post.
    next_round: u64,
    /// Per receiver: rounds it has released (its last credit).
    credit: Vec<u64>,
    /// Per receiver: writes posted by the application, not yet handed out.
    queued: Vec<VecDeque<WriteOp>>,
    /// Per receiver: rounds handed to the transport.
    issued: Vec<u64>,
    /// Outstanding local completions of rounds `done_base..`.
    pending: VecDeque<usize>,
    done_base: u64,
    cursor: usize,
}

impl SendChannel {
    pub fn new(geo: Geometry, channel: ChannelId, me: usize) -> Result<Self, ProtoError> {
        geo.validate()?;
        if me >= geo.senders {
            return Err(ProtoError::InvalidGeometry(format!(
                "sender index {me} is outside 0..{}",
                geo.senders
            )));
        }
        Ok(Self {
            geo,
            channel,
            me,
            next_round: 0,
            credit: vec![0; geo.receivers],
            queued: vec![VecDeque::new(); geo.receivers],
            issued: vec![0; geo.receivers],
            pending: VecDeque::new(),
            done_base: 0,
            cursor: 0,
        })
    }

    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// The round the next [`post_round`](Self::post_round) will be.
    pub fn next_round(&self) -> u64 {
        self.next_round
    }

    /// Whether every receiver has a free slot for the next round.
    #[inline]
    pub fn can_post(&self) -> bool {
        self.blocking_receivers().next().is_none()
    }

    /// Receivers whose credit holds the next round back.
    pub fn blocking_receivers(&self) -> impl Iterator<Item = usize> + '_ {
        let round = self.next_round;
        let depth = self.geo.depth as u64;
        (0..self.geo.receivers).filter(move |&r| round >= self.credit[r] + depth)
    }

    /// Posts a round: one message length per receiver (0 for an empty message).
    ///
    /// Returns `Ok(None)` when some receiver has not released an old round yet
    /// (the window is full); nothing is queued then. Lengths over the slot
    /// size are rejected before anything is queued.
    pub fn post_round(&mut self, lens: &[usize]) -> Result<Option<u64>, ProtoError> {
        if lens.len() != self.geo.receivers {
            return Err(ProtoError::WrongMessageCount {
                got: lens.len(),
                receivers: self.geo.receivers,
            });
        }
        if let Some((receiver, &len)) = lens
            .iter()
            .enumerate()
            .find(|(_, &l)| l > self.geo.slot_bytes)
        {
            return Err(ProtoError::MessageTooLarge {
                receiver,
                len,
                slot_bytes: self.geo.slot_bytes,
            });
        }
        Ok(self.post_checked(lens))
    }

    /// [`post_round`](Self::post_round) for lengths already checked (one
    /// per receiver, none over the slot size), as the communicator's send
    /// checks them: `None` when the window is full.
    pub fn post_checked(&mut self, lens: &[usize]) -> Option<u64> {
        debug_assert!(lens.len() == self.geo.receivers);
        debug_assert!(lens.iter().all(|&l| l <= self.geo.slot_bytes));
        if !self.can_post() {
            return None;
        }
        let round = self.next_round;
        for (receiver, &len) in lens.iter().enumerate() {
            let op = self.write_of(receiver, round, len);
            self.queued[receiver].push_back(op);
        }
        self.pending.push_back(self.geo.receivers);
        self.next_round += 1;
        Some(round)
    }

    /// [`post_checked`](Self::post_checked) without the queue, where
    /// nothing is queued: the caller hands each receiver's write
    /// ([`write_of`](Self::write_of)) to the transport itself, and gives
    /// back with [`retry`](Self::retry) those it could not.
    pub fn post_direct(&mut self, lens: &[usize]) -> Option<u64> {
        debug_assert!(lens.len() == self.geo.receivers && !self.has_queued());
        debug_assert!(lens.iter().all(|&l| l <= self.geo.slot_bytes));
        if !self.can_post() {
            return None;
        }
        let round = self.next_round;
        // Handed out, as by `poll_transmit`.
        for issued in &mut self.issued {
            *issued = round + 1;
        }
        self.pending.push_back(self.geo.receivers);
        self.next_round += 1;
        Some(round)
    }

    /// The write of `len` bytes of `round` to `receiver`.
    pub fn write_of(&self, receiver: usize, round: u64, len: usize) -> WriteOp {
        let slot = self.geo.slot_of(round);
        WriteOp {
            receiver,
            round,
            lane: Lane::Data,
            remote_offset: self.geo.slot_offset(self.me, slot),
            len,
            imm: Immediate::new(self.channel, self.me, slot, round).encode(),
        }
    }

    /// The next write to hand to the transport, round-robin over receivers.
    /// A write the transport refused goes back with [`retry`](Self::retry).
    #[inline]
    pub fn poll_transmit(&mut self) -> Option<WriteOp> {
        let n = self.geo.receivers;
        debug_assert!(self.cursor < n);
        for i in 0..n {
            // cursor < n and i < n: a subtraction, not a division.
            let r = match self.cursor + i {
                r if r >= n => r - n,
                r => r,
            };
            if let Some(op) = self.queued[r].front() {
                // post_round already checked credit; this re-check guards the invariant.
                debug_assert!(op.round < self.credit[r] + self.geo.depth as u64);
                let op = *op;
                self.queued[r].pop_front();
                self.issued[r] = op.round + 1;
                self.cursor = if r + 1 == n { 0 } else { r + 1 };
                return Some(op);
            }
        }
        None
    }

    /// Puts back a write the transport could not take now (queue full).
    pub fn retry(&mut self, op: WriteOp) {
        self.issued[op.receiver] = op.round;
        self.queued[op.receiver].push_front(op);
    }

    /// Whether writes are waiting to be handed to the transport.
    pub fn has_queued(&self) -> bool {
        self.queued.iter().any(|q| !q.is_empty())
    }

    /// Whether writes to `receiver` are waiting to be handed to the
    /// transport.
    pub fn has_queued_to(&self, receiver: usize) -> bool {
        self.queued.get(receiver).is_some_and(|q| !q.is_empty())
    }

    /// Records a credit from `receiver`: it has released `released` rounds.
    /// Older credits than the one already seen are ignored.
    pub fn on_credit(&mut self, receiver: usize, released: u64) -> Result<(), ProtoError> {
        let Some(&sent) = self.issued.get(receiver) else {
            return Err(ProtoError::InvalidGeometry(format!(
                "credit from receiver {receiver}, channel has {}",
                self.geo.receivers
            )));
        };
        if released > sent {
            return Err(ProtoError::BogusCredit {
                peer: receiver,
                consumed: released,
                sent,
            });
        }
        if released > self.credit[receiver] {
            self.credit[receiver] = released;
        }
        Ok(())
    }

    /// Records the local completion of the write of `round` to one receiver.
    pub fn on_write_complete(&mut self, round: u64) {
        if round < self.done_base {
            return;
        }
        let idx = (round - self.done_base) as usize;
        if let Some(left) = self.pending.get_mut(idx) {
            *left = left.saturating_sub(1);
        }
        while self.pending.front() == Some(&0) {
            self.pending.pop_front();
            self.done_base += 1;
        }
    }

    /// Whether every write of `round` has completed locally, so its source
    /// buffers may be reused.
    pub fn round_sent(&self, round: u64) -> bool {
        if round < self.done_base {
            return true;
        }
        let idx = (round - self.done_base) as usize;
        matches!(self.pending.get(idx), Some(0))
    }

    /// Rounds whose writes have all completed, counting from 0.
    pub fn rounds_sent(&self) -> u64 {
        self.done_base
    }

    /// The last credit seen from `receiver`.
    pub fn credit(&self, receiver: usize) -> u64 {
        self.credit[receiver]
    }
}
