//! A channel as seen from one rank: posting rounds (blocking and not),
//! their completion, receiving and releasing rounds.

use std::time::Duration;

use super::{staging, Communicator, Error, Msg, RecvRound, Result};
use crate::group::Peer;
use crate::proto::ChannelId;
use crate::transport::RegionId;
use crate::wait::Backoff;

/// Reads of the transport alone between two full passes of a spinning
/// [`Channel::recv`] (see [`Channel::quick_recv`]).
const QUICK_POLLS: usize = 16;

/// A round's messages, checked: each receiver's source, the lengths, and
/// the device-to-stage copies to make first.
#[derive(Debug)]
pub(super) struct Prepared {
    pub(super) sources: Vec<(RegionId, usize)>,
    pub(super) lens: Vec<usize>,
    pub(super) copies: Vec<staging::StageCopy>,
}

/// One channel of a communicator, as seen from this rank: it either sends
/// on it or receives on it, depending on the role.
#[derive(Debug)]
pub struct Channel<'a> {
    pub(super) comm: &'a mut Communicator,
    pub(super) id: ChannelId,
}

impl Channel<'_> {
    pub(super) fn sending(&self) -> Result<()> {
        if self.comm.send.id == self.id {
            Ok(())
        } else {
            Err(Error::Usage(format!(
                "{} ranks receive on the {:?} channel; they cannot send on it",
                self.comm.role, self.id
            )))
        }
    }

    pub(super) fn receiving(&self) -> Result<()> {
        if self.comm.recv.id == self.id {
            Ok(())
        } else {
            Err(Error::Usage(format!(
                "{} ranks send on the {:?} channel; they cannot receive on it",
                self.comm.role, self.id
            )))
        }
    }

    /// Posts the next round without blocking: `msgs[r]` goes to receiver
    /// `r` (one per receiver; [`Msg::EMPTY`] for nothing). Returns the round
    /// number, or `None` when some receiver still holds `depth` rounds
    /// (`PeerLost` if such a receiver is gone: its credit will never come).
    ///
    /// The bytes named by `msgs` must stay unchanged until
    /// [`is_sent`](Self::is_sent) says the round is sent.
    pub fn try_send(&mut self, msgs: &[Msg<'_>]) -> Result<Option<u64>> {
        self.sending()?;
        self.comm.check_no_stream_sends()?;
        // Credits first, unless the round can go already (the pass after
        // posting reads the transport anyway). A round that can go waits
        // on no peer, so no peer's loss is judged for it (the pass reads
        // liveness): the snapshot is taken only where credit is missing,
        // before the pass that may bring it.
        let lost = if self.comm.send.proto.can_post() {
            Vec::new()
        } else {
            let lost = self.comm.lost_snapshot(false);
            self.comm.progress_inner()?;
            lost
        };
        let Prepared {
            sources,
            lens,
            copies,
        } = self.validate(msgs)?;
        // Device memory through a host stage: copied in just before the
        // round is posted, once the round can be posted and the stage's
        // previous round has left it.
        if !copies.is_empty() {
            let stage_busy = copies.iter().any(|c| {
                self.comm
                    .stages
                    .last_round(c.region)
                    .is_some_and(|r| !self.comm.send.proto.round_sent(r))
            });
            if stage_busy || !self.comm.send.proto.can_post() {
                if !lost.is_empty() {
                    let blocking: Vec<usize> = self.comm.send.proto.blocking_receivers().collect();
                    self.comm.check_lost(&lost, &blocking)?;
                }
                return Ok(None);
            }
            for c in &copies {
                c.run()?;
            }
        }
        // A round that is all there is to write goes to the transport
        // straight from its lengths (see `progress_fresh`).
        let fresh = self.comm.send.stalled.is_none()
            && !self.comm.send.proto.has_queued()
            && !self.comm.streams_active();
        // (`validate` checked the count and the lengths.)
        let posted = if fresh {
            self.comm.send.proto.post_direct(&lens)
        } else {
            self.comm.send.proto.post_checked(&lens)
        };
        let Some(round) = posted else {
            self.comm.send.lens_scratch = lens;
            // Blocked on credit: a receiver that is gone will never give it.
            if !lost.is_empty() {
                let blocking: Vec<usize> = self.comm.send.proto.blocking_receivers().collect();
                self.comm.check_lost(&lost, &blocking)?;
            }
            return Ok(None);
        };
        debug_assert_eq!(
            round,
            self.comm.send.sources_base + self.comm.send.sources.len() as u64
        );
        self.comm.send.sources.push_back(sources);
        for c in &copies {
            self.comm.stages.sent_from(c.region, round);
        }
        let r = if fresh {
            self.comm.progress_fresh(round, &lens)
        } else {
            self.comm.progress_inner().map(drop)
        };
        self.comm.send.lens_scratch = lens;
        r?;
        Ok(Some(round))
    }

    /// Checks a round's messages: one per receiver, each inside its
    /// region (of this communicator) and its slot.
    pub(super) fn validate(&mut self, msgs: &[Msg<'_>]) -> Result<Prepared> {
        let geo = *self.comm.send.proto.geometry();
        if msgs.len() != geo.receivers {
            return Err(Error::InvalidArgument(format!(
                "a round needs one message per receiver: got {}, there are {}",
                msgs.len(),
                geo.receivers
            )));
        }
        // Vectors of rounds that left are reused: posting allocates nothing once warm.
        let mut sources = self.comm.send.spare_sources.pop().unwrap_or_default();
        sources.clear();
        let mut lens = std::mem::take(&mut self.comm.send.lens_scratch);
        lens.clear();
        lens.extend(msgs.iter().map(|m| m.len));
        let mut copies = Vec::new();
        for (r, m) in msgs.iter().enumerate() {
            let src = match m.region {
                Some(region) if !self.comm.transport.owns(region.id()) => {
                    return Err(Error::InvalidArgument(format!(
                        "message for receiver {r}: its region was registered with another communicator"
                    )));
                }
                Some(region) => {
                    let ok = m
                        .offset
                        .checked_add(m.len)
                        .is_some_and(|end| end <= region.len());
                    if !ok {
                        return Err(Error::InvalidArgument(format!(
                            "message for receiver {r}: {}+{} is outside its region of {} bytes",
                            m.offset,
                            m.len,
                            region.len()
                        )));
                    }
                    if let Some(staging) = region.staging().filter(|_| m.len > 0) {
                        copies.push(staging::StageCopy {
                            region: region.id(),
                            staging: staging.clone(),
                            offset: m.offset,
                            len: m.len,
                        });
                    }
                    (region.id(), m.offset)
                }
                None => (self.comm.recv.credit_src.id(), 0),
            };
            if m.len > geo.slot_bytes {
                let source = crate::proto::ProtoError::MessageTooLarge {
                    receiver: r,
                    len: m.len,
                    slot_bytes: geo.slot_bytes,
                };
                return Err(Error::InvalidArgument(source.to_string()));
            }
            sources.push(src);
        }
        Ok(Prepared {
            sources,
            lens,
            copies,
        })
    }

    /// Posts the next round, waiting up to `timeout` for credit.
    pub fn send(&mut self, msgs: &[Msg<'_>], timeout: Duration) -> Result<u64> {
        // A round with credit goes at once, before the clock and the
        // deadline are read: on a round trip's path (see `recv`).
        if let Some(round) = self.try_send(msgs)? {
            return Ok(round);
        }
        let deadline = self.comm.now() + timeout;
        let mut backoff = Backoff::new(self.comm.config.wait);
        loop {
            let late = self.comm.now() >= deadline;
            let lost = self.comm.lost_at_deadline(late);
            if let Some(round) = self.try_send(msgs)? {
                return Ok(round);
            }
            if !lost.is_empty() {
                let blocking: Vec<usize> = self.comm.send.proto.blocking_receivers().collect();
                self.comm.check_lost(&lost, &blocking)?;
            }
            if late {
                let blocking: Vec<usize> = self.comm.send.proto.blocking_receivers().collect();
                return Err(Error::Timeout {
                    what: format!(
                        "credit from {}",
                        blocking
                            .iter()
                            .map(|&r| self.comm.other_side(r).to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    waited: timeout,
                });
            }
            backoff.wait(false);
        }
    }

    /// Whether every write of `round` has completed, so its source bytes
    /// may change; `PeerLost` while it has not and a receiver is gone.
    pub fn is_sent(&mut self, round: u64) -> Result<bool> {
        self.sending()?;
        let next = self.comm.send.proto.next_round();
        if round >= next {
            return Err(Error::InvalidArgument(format!(
                "round {round} was never posted (the next round is {next})"
            )));
        }
        let lost = self.comm.lost_snapshot(false);
        self.comm.progress_inner()?;
        if self.comm.send.proto.round_sent(round) {
            return Ok(true);
        }
        if !lost.is_empty() {
            let all: Vec<usize> = (0..self.comm.send.rings.len()).collect();
            self.comm.check_lost(&lost, &all)?;
        }
        Ok(false)
    }

    /// Waits until `round` is sent (see [`is_sent`](Self::is_sent)).
    pub fn wait_sent(&mut self, round: u64, timeout: Duration) -> Result<()> {
        let deadline = self.comm.now() + timeout;
        let mut backoff = Backoff::new(self.comm.config.wait);
        loop {
            let late = self.comm.now() >= deadline;
            let lost = self.comm.lost_at_deadline(late);
            if self.is_sent(round)? {
                return Ok(());
            }
            if !lost.is_empty() {
                let all: Vec<usize> = (0..self.comm.send.rings.len()).collect();
                self.comm.check_lost(&lost, &all)?;
            }
            if late {
                return Err(Error::Timeout {
                    what: format!("local completion of round {round}"),
                    waited: timeout,
                });
            }
            backoff.wait(false);
        }
    }

    /// The next complete round, if it is in; `PeerLost` if a sender whose
    /// message is missing is gone (it will never come).
    pub fn try_recv(&mut self) -> Result<Option<RecvRound>> {
        self.receiving()?;
        self.comm.check_no_stream_recvs()?;
        let lost = self.comm.lost_snapshot(false);
        self.comm.progress_inner()?;
        if let Some(d) = self.comm.recv.proto.poll_round() {
            return Ok(Some(RecvRound {
                round: d.round,
                slot: d.slot,
                lens: d.lens,
            }));
        }
        // Not in yet: a sender that is gone will never complete it.
        if !lost.is_empty() {
            let missing: Vec<usize> = self.comm.recv.proto.missing_senders().collect();
            self.comm.check_lost(&lost, &missing)?;
        }
        Ok(None)
    }

    /// Waits up to `timeout` for the next complete round. A sender that is
    /// lost while its message is missing fails the wait with `PeerLost`.
    pub fn recv(&mut self, timeout: Duration) -> Result<RecvRound> {
        // A round already in goes at once, before the clock and the
        // deadline are read: the time from a round's arrival to the next
        // send is the round trip's, and each read of the clock, the
        // deadline's sum and the wait's set-up counted in it.
        if let Some(r) = self.try_recv()? {
            return Ok(r);
        }
        let deadline = self.comm.now() + timeout;
        let mut backoff = Backoff::new(self.comm.config.wait);
        loop {
            // Quick reads first: a round trip's answer often lands while
            // a full pass runs, and is then seen only at the next pass's
            // read of the transport, a full pass later.
            if backoff.spinning() {
                if let Some(r) = self.quick_recv()? {
                    return Ok(r);
                }
            }
            let late = self.comm.now() >= deadline;
            let lost = self.comm.lost_at_deadline(late);
            if let Some(r) = self.try_recv()? {
                return Ok(r);
            }
            if !lost.is_empty() {
                let missing: Vec<usize> = self.comm.recv.proto.missing_senders().collect();
                self.comm.check_lost(&lost, &missing)?;
            }
            if late {
                let missing: Vec<usize> = self.comm.recv.proto.missing_senders().collect();
                return Err(Error::Timeout {
                    what: format!(
                        "round {} from {}",
                        self.comm.recv.proto.next_round(),
                        missing
                            .iter()
                            .map(|&s| self.comm.other_side(s).to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    waited: timeout,
                });
            }
            backoff.wait(false);
        }
    }

    /// Between two full passes of a spinning [`recv`](Self::recv): polls
    /// the transport alone, up to [`QUICK_POLLS`] times, and returns the
    /// round as soon as it is complete. A full pass (liveness, deadline,
    /// writes and credits to post) costs several times one read of the
    /// transport; the time between two reads is how late an arrival is
    /// seen, and on a round trip over a fast transport it was most of
    /// m2n's own share (over libfabric's shm, 8% of the round trip).
    /// Nothing is judged here: a lost peer and the deadline wait for the
    /// next full pass, at most `QUICK_POLLS` reads away.
    fn quick_recv(&mut self) -> Result<Option<RecvRound>> {
        for _ in 0..QUICK_POLLS {
            if !self.comm.poll_transport_alone()? {
                continue;
            }
            if let Some(d) = self.comm.recv.proto.poll_round() {
                return Ok(Some(RecvRound {
                    round: d.round,
                    slot: d.slot,
                    lens: d.lens,
                }));
            }
        }
        Ok(None)
    }

    /// Hands a round back: its slots return to the senders as credit (at
    /// once where a sender may be waiting for it, its window full; else a
    /// batch of releases, and the periodic refresh, with the next call's
    /// pass, after that pass's data writes, see
    /// [`Config::credit_batch`](crate::Config::credit_batch)).
    pub fn release(&mut self, round: RecvRound) -> Result<()> {
        self.receiving()?;
        let peer = Peer {
            role: self.comm.role,
            rank: self.comm.rank,
        };
        self.comm
            .recv
            .proto
            .release(round.round)
            .map_err(|source| Error::Protocol { peer, source })?;
        self.comm.recv.proto.recycle_lens(round.lens);
        // Only a sender that may be waiting needs the credit before the
        // next pass: on a round trip's path, the release is followed by
        // the reply's send, whose pass decides the rest.
        if self.comm.recv.proto.sender_may_wait() {
            self.comm.credit_after_release()
        } else {
            let r = self.comm.check_fatal();
            self.comm.let_streams_go_on_error(r)
        }
    }
}
