//! The protocol on a simulated fabric: random interleavings of senders,
//! reordered and lost credits, slow receivers, with every byte checked and
//! every slot watched for overwrite-before-release.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;

/// xorshift64*: the simulation's deterministic choices.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn payload_byte(sender: usize, receiver: usize, round: u64, i: usize) -> u8 {
    (sender as u64 * 131 + receiver as u64 * 31 + round * 7 + i as u64) as u8
}

fn payload_len(sender: usize, receiver: usize, round: u64, slot_bytes: usize) -> usize {
    // Includes zero-length messages and full slots.
    ((sender * 7 + receiver * 3) as u64 + round * 5) as usize % (slot_bytes + 1)
}

struct InFlight {
    op: WriteOp,
    bytes: Vec<u8>,
}

struct SimReceiver {
    proto: RecvChannel,
    ring: Vec<u8>,
    /// Round occupying each (sender, slot), if any.
    occupied: Vec<Option<u64>>,
    held: VecDeque<DeliveredRound>,
    done: u64,
}

/// Runs `rounds` rounds over an `m` x `n` channel; panics on any violation.
#[allow(clippy::too_many_arguments)]
fn simulate(
    seed: u64,
    m: usize,
    n: usize,
    depth: usize,
    slot_bytes: usize,
    rounds: u64,
    credit_loss: u64,
    credit_batch: usize,
) {
    let geo = Geometry {
        senders: m,
        receivers: n,
        depth,
        slot_bytes,
    };
    let mut rng = Rng(seed | 1);
    let t0 = Instant::now();
    // Without loss nothing may depend on the refresh timer: coalesced
    // credits must still reach every sender that waits for them.
    let refresh = if credit_loss == 0 {
        Duration::from_secs(3600)
    } else {
        Duration::from_millis(5)
    };
    let mut senders: Vec<SendChannel> = (0..m)
        .map(|s| SendChannel::new(geo, ChannelId::Dispatch, s).unwrap())
        .collect();
    let mut receivers: Vec<SimReceiver> = (0..n)
        .map(|_| SimReceiver {
            proto: RecvChannel::new(geo, ChannelId::Dispatch, refresh)
                .unwrap()
                .with_credit_batch(credit_batch),
            ring: vec![0; geo.ring_bytes().unwrap()],
            occupied: vec![None; m * depth],
            held: VecDeque::new(),
            done: 0,
        })
        .collect();
    // Per (sender, receiver) FIFO: writes on one connection stay in order.
    let mut data: Vec<VecDeque<InFlight>> = (0..m * n).map(|_| VecDeque::new()).collect();
    // Credits may be reordered and lost.
    let mut credits: Vec<(usize, usize, u64)> = Vec::new();

    for step in 0..2_000_000u64 {
        let now = t0 + Duration::from_millis(step);
        if receivers.iter().all(|r| r.done == rounds) {
            return;
        }
        match rng.below(4) {
            0 => {
                // A random sender posts a round if it can, and hands out writes.
                let s = rng.below(m);
                let snd = &mut senders[s];
                if snd.next_round() < rounds {
                    let round = snd.next_round();
                    let lens: Vec<usize> = (0..n)
                        .map(|r| payload_len(s, r, round, slot_bytes))
                        .collect();
                    let can = snd.can_post();
                    let got = snd.post_round(&lens).unwrap();
                    assert_eq!(got.is_some(), can);
                    if got.is_some() {
                        for (r, rx) in receivers.iter().enumerate() {
                            assert!(
                                round < rx.proto.released() + depth as u64,
                                "sender {s} ran more than depth ahead of receiver {r}"
                            );
                        }
                    }
                }
                while let Some(op) = snd.poll_transmit() {
                    if rng.chance(10) {
                        // The transport's queue is full: try again later.
                        snd.retry(op);
                        break;
                    }
                    let bytes = (0..op.len)
                        .map(|i| payload_byte(s, op.receiver, op.round, i))
                        .collect();
                    snd.on_write_complete(op.round);
                    data[s * n + op.receiver].push_back(InFlight { op, bytes });
                }
            }
            1 => {
                // One write lands: a random connection, its oldest write.
                let busy: Vec<usize> = (0..m * n).filter(|&i| !data[i].is_empty()).collect();
                if busy.is_empty() {
                    continue;
                }
                let conn = busy[rng.below(busy.len())];
                let (s, r) = (conn / n, conn % n);
                let w = data[conn].pop_front().unwrap();
                let rx = &mut receivers[r];
                let slot = geo.slot_of(w.op.round);
                assert_eq!(w.op.remote_offset, geo.slot_offset(s, slot));
                let held = &mut rx.occupied[s * depth + slot];
                assert!(held.is_none(), "slot {slot} of sender {s} on receiver {r} overwritten before release (held by round {held:?})");
                *held = Some(w.op.round);
                rx.ring[w.op.remote_offset..w.op.remote_offset + w.bytes.len()]
                    .copy_from_slice(&w.bytes);
                rx.proto.on_arrival(s, w.op.imm, w.bytes.len()).unwrap();
            }
            2 => {
                // A receiver delivers what is complete, checks it, maybe releases.
                let r = rng.below(n);
                let rx = &mut receivers[r];
                while let Some(d) = rx.proto.poll_round() {
                    for s in 0..m {
                        let len = d.lens[s] as usize;
                        assert_eq!(len, payload_len(s, r, d.round, slot_bytes));
                        let off = geo.slot_offset(s, d.slot);
                        for i in 0..len {
                            assert_eq!(
                                rx.ring[off + i],
                                payload_byte(s, r, d.round, i),
                                "byte {i} of round {} from {s} at {r}",
                                d.round
                            );
                        }
                    }
                    rx.held.push_back(d);
                }
                // Slow receivers hold rounds; release in random order.
                if !rx.held.is_empty() && rng.chance(40) {
                    let i = rng.below(rx.held.len());
                    let d = rx.held.remove(i).unwrap();
                    for s in 0..m {
                        rx.occupied[s * depth + d.slot] = None;
                    }
                    rx.proto.release(d.round).unwrap();
                    assert!(
                        rx.proto.release(d.round).is_err(),
                        "double release accepted"
                    );
                    rx.done += 1;
                }
                if let Some(c) = rx.proto.poll_credit(now, false) {
                    for s in 0..m {
                        if !rng.chance(credit_loss) {
                            credits.push((r, s, c.released));
                        }
                    }
                }
            }
            _ => {
                // A random credit lands (credits reorder freely).
                if credits.is_empty() {
                    continue;
                }
                let (r, s, released) = credits.swap_remove(rng.below(credits.len()));
                senders[s].on_credit(r, released).unwrap();
            }
        }
    }
    panic!("simulation did not finish: stalled");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn random_fabric_delivers_every_byte_in_order(
        seed in any::<u64>(), m in 1usize..4, n in 1usize..4,
        depth in 1usize..5, slot_bytes in 0usize..24, loss in prop_oneof![Just(0u64), Just(30u64)],
        batch in 0usize..6,
    ) {
        simulate(seed, m, n, depth, slot_bytes, 40, loss, batch);
    }
}

#[test]
fn lossy_credits_recover_by_refresh() {
    simulate(7, 2, 3, 2, 16, 200, 60, 1);
    simulate(7, 2, 3, 4, 16, 200, 60, 0);
}

/// Coalescing: with depth 4 and batch 2 a ping-pong publishes every second
/// release; a sender that has used its whole window gets the credit at once.
#[test]
fn credits_coalesce_without_making_a_sender_wait() {
    let geo = Geometry {
        senders: 1,
        receivers: 1,
        depth: 4,
        slot_bytes: 8,
    };
    let t = Instant::now();
    let mut tx = SendChannel::new(geo, ChannelId::Dispatch, 0).unwrap();
    let mut rx = RecvChannel::new(geo, ChannelId::Dispatch, Duration::from_secs(3600))
        .unwrap()
        .with_credit_batch(0);
    assert_eq!(rx.credit_batch(), 2);
    let one_round = |tx: &mut SendChannel, rx: &mut RecvChannel| {
        let round = tx.post_round(&[8]).unwrap().expect("window open");
        let op = tx.poll_transmit().unwrap();
        tx.on_write_complete(round);
        rx.on_arrival(0, op.imm, op.len).unwrap();
        let d = rx.poll_round().unwrap();
        rx.release(d.round).unwrap();
        let published = rx.poll_credit(t, false).map(|c| c.released);
        if let Some(v) = published {
            tx.on_credit(0, v).unwrap();
        }
        published
    };
    // Ping-pong: one round in flight at a time.
    let published: Vec<Option<u64>> = (0..6).map(|_| one_round(&mut tx, &mut rx)).collect();
    assert_eq!(published, vec![None, Some(2), None, Some(4), None, Some(6)]);
    // A full window: four rounds arrive, one is released; the sender has
    // used its window, so the single release is published at once.
    for _ in 0..4 {
        tx.post_round(&[8]).unwrap().expect("window open");
        let op = tx.poll_transmit().unwrap();
        rx.on_arrival(0, op.imm, op.len).unwrap();
    }
    assert_eq!(tx.post_round(&[8]).unwrap(), None, "the window is full");
    let d = rx.poll_round().unwrap();
    rx.release(d.round).unwrap();
    assert_eq!(rx.poll_credit(t, false).map(|c| c.released), Some(7));
    // Batch 1 publishes every release, the old behaviour.
    let mut eager = RecvChannel::new(geo, ChannelId::Dispatch, Duration::from_secs(3600))
        .unwrap()
        .with_credit_batch(1);
    let mut tx = SendChannel::new(geo, ChannelId::Dispatch, 0).unwrap();
    for want in 1..=3 {
        assert_eq!(one_round(&mut tx, &mut eager), Some(want));
    }
}

fn pair(depth: usize) -> (SendChannel, RecvChannel, Geometry) {
    let geo = Geometry {
        senders: 2,
        receivers: 1,
        depth,
        slot_bytes: 64,
    };
    (
        SendChannel::new(geo, ChannelId::Dispatch, 1).unwrap(),
        RecvChannel::new(geo, ChannelId::Dispatch, Duration::from_millis(1)).unwrap(),
        geo,
    )
}

#[test]
fn sender_stops_at_depth_and_resumes_on_credit() {
    let (mut tx, mut rx, _) = pair(2);
    for round in 0..2 {
        assert_eq!(tx.post_round(&[8]).unwrap(), Some(round));
        let op = tx.poll_transmit().unwrap();
        rx.on_arrival(1, op.imm, op.len).unwrap();
    }
    assert_eq!(
        tx.post_round(&[8]).unwrap(),
        None,
        "third round must wait for credit"
    );
    assert_eq!(tx.blocking_receivers().collect::<Vec<_>>(), vec![0]);
    tx.on_credit(0, 1).unwrap();
    assert_eq!(tx.post_round(&[8]).unwrap(), Some(2));
    // Credit beyond what was sent is a peer bug, named.
    let err = tx.on_credit(0, 9).unwrap_err();
    assert!(matches!(
        err,
        ProtoError::BogusCredit {
            peer: 0,
            consumed: 9,
            ..
        }
    ));
}

#[test]
fn zero_length_messages_complete_rounds() {
    let geo = Geometry {
        senders: 2,
        receivers: 1,
        depth: 1,
        slot_bytes: 0,
    };
    let mut rx = RecvChannel::new(geo, ChannelId::Combine, Duration::from_secs(1)).unwrap();
    for s in 0..2 {
        assert!(rx.poll_round().is_none());
        let imm = Immediate::new(ChannelId::Combine, s, 0, 0).encode();
        rx.on_arrival(s, imm, 0).unwrap();
    }
    let d = rx.poll_round().unwrap();
    assert_eq!((d.round, d.lens), (0, vec![0, 0]));
}

#[test]
fn bad_immediates_are_rejected_naming_the_peer() {
    let (_, mut rx, _) = pair(4);
    let ok = |round| Immediate::new(ChannelId::Dispatch, 1, round as usize % 4, round).encode();
    let cases: Vec<(usize, u32, usize, &str)> = vec![
        (
            1,
            Immediate::new(ChannelId::Dispatch, 5, 0, 0).encode(),
            1,
            "UnknownSender",
        ),
        (0, ok(0), 1, "Misrouted"),
        (
            1,
            Immediate::new(ChannelId::Combine, 1, 0, 0).encode(),
            1,
            "WrongChannel",
        ),
        (
            1,
            Immediate::new(ChannelId::Dispatch, 1, 3, 0).encode(),
            1,
            "WrongSlot",
        ),
        (
            1,
            Immediate::new(ChannelId::Dispatch, 1, 1, 1).encode(),
            1,
            "FutureRound",
        ),
        (1, ok(0), 65, "TooLong"),
    ];
    for (peer, imm, len, want) in cases {
        let err = rx.on_arrival(peer, imm, len).unwrap_err();
        assert!(
            format!("{err:?}").starts_with(want),
            "wanted {want}, got {err:?}"
        );
        assert!(err.to_string().contains(&peer.to_string()));
    }
    // None of the rejected writes changed state: round 0 is still expected.
    rx.on_arrival(1, ok(0), 1).unwrap();
    let err = rx.on_arrival(1, ok(0), 1).unwrap_err();
    assert!(
        matches!(
            err,
            ProtoError::StaleRound {
                peer: 1,
                expected: 1,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn writes_beyond_credit_are_detected() {
    let (_, mut rx, _) = pair(1);
    let imm = |round| Immediate::new(ChannelId::Dispatch, 1, 0, round).encode();
    rx.on_arrival(1, imm(0), 1).unwrap();
    let err = rx.on_arrival(1, imm(1), 1).unwrap_err();
    assert!(
        matches!(
            err,
            ProtoError::CreditOverrun {
                peer: 1,
                round: 1,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn oversize_and_miscounted_rounds_are_refused_before_queueing() {
    let (mut tx, _, _) = pair(2);
    assert!(matches!(
        tx.post_round(&[65]),
        Err(ProtoError::MessageTooLarge {
            receiver: 0,
            len: 65,
            ..
        })
    ));
    assert!(matches!(
        tx.post_round(&[1, 2]),
        Err(ProtoError::WrongMessageCount {
            got: 2,
            receivers: 1
        })
    ));
    assert!(tx.poll_transmit().is_none());
    assert_eq!(tx.next_round(), 0);
}

#[test]
fn release_rules() {
    let geo = Geometry {
        senders: 1,
        receivers: 1,
        depth: 3,
        slot_bytes: 8,
    };
    let mut rx = RecvChannel::new(geo, ChannelId::Dispatch, Duration::from_secs(60)).unwrap();
    let t = Instant::now();
    assert!(rx.release(0).is_err(), "release before delivery");
    for round in 0..3 {
        rx.on_arrival(
            0,
            Immediate::new(ChannelId::Dispatch, 0, round as usize, round).encode(),
            0,
        )
        .unwrap();
        rx.poll_round().unwrap();
    }
    rx.release(1).unwrap();
    assert_eq!(
        rx.poll_credit(t, false),
        None,
        "round 0 still held: no new credit"
    );
    rx.release(0).unwrap();
    assert_eq!(rx.poll_credit(t, false), Some(CreditOp { released: 2 }));
    assert_eq!(rx.poll_credit(t, false), None);
    assert!(
        rx.poll_credit(t + Duration::from_secs(61), false).is_some(),
        "refresh re-sends the credit"
    );
}

/// Piggybacked credits: a full batch waits for the caller's next data
/// write, but a sender that may be waiting (its window full) and the
/// refresh are credited at once.
#[test]
fn held_credits_wait_for_data_unless_a_sender_may_wait() {
    let geo = Geometry {
        senders: 1,
        receivers: 1,
        depth: 4,
        slot_bytes: 8,
    };
    let mut rx = RecvChannel::new(geo, ChannelId::Dispatch, Duration::from_secs(60))
        .unwrap()
        .with_credit_batch(2);
    let t = Instant::now();
    let arrive = |rx: &mut RecvChannel, round: u64| {
        rx.on_arrival(
            0,
            Immediate::new(ChannelId::Dispatch, 0, geo.slot_of(round), round).encode(),
            0,
        )
        .unwrap();
        rx.poll_round().unwrap();
    };
    arrive(&mut rx, 0);
    arrive(&mut rx, 1);
    rx.release(0).unwrap();
    rx.release(1).unwrap();
    assert_eq!(rx.poll_credit(t, true), None, "a batch of 2 is held");
    assert_eq!(
        rx.poll_credit(t, false),
        Some(CreditOp { released: 2 }),
        "and goes with the next data write"
    );
    // The sender's window fills (rounds 2..=5 in flight, credit at 2):
    // the next release is credited at once even when held.
    for round in 2..6 {
        arrive(&mut rx, round);
    }
    rx.release(2).unwrap();
    assert_eq!(
        rx.poll_credit(t, true),
        Some(CreditOp { released: 3 }),
        "a sender that may be waiting is not held"
    );
    rx.release(3).unwrap();
    rx.release(4).unwrap();
    assert!(
        rx.poll_credit(t + Duration::from_secs(61), true).is_some(),
        "the refresh is not held"
    );
}
