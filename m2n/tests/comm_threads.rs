//! The public API with every rank as a thread of this process (shm works
//! within one process too): argument errors, credit flow control, abort.

#[path = "support/inproc.rs"]
mod inproc;

use std::time::{Duration, Instant};

use m2n::{Communicator, Config, Error, Msg, Role, Shape};

fn config() -> Config {
    let ch = m2n::ChannelConfig {
        depth: 2,
        slot_bytes: 1024,
    };
    Config {
        transport: m2n::TransportKind::Shm,
        dispatch: ch,
        combine: ch,
        peer_timeout: Duration::from_secs(3),
        heartbeat_interval: Duration::from_millis(100),
        ..Config::default()
    }
}

/// Builds a 1 x 1 group: (attention, expert).
fn pair() -> (Communicator, Communicator) {
    inproc::pair(config(), || {})
}

#[test]
fn oversize_message_is_refused_before_anything_is_written() {
    let (mut a, mut e) = pair();
    let mut buf = a.alloc(2048).unwrap();
    buf.as_mut_slice().fill(0xee);
    let err = a
        .dispatch()
        .try_send(&[Msg::new(&buf, 0, 1025)])
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert!(
        err.to_string().contains("1025") && err.to_string().contains("1024"),
        "{err}"
    );
    let err = a
        .dispatch()
        .try_send(&[Msg::new(&buf, 2000, 100)])
        .unwrap_err();
    assert!(err.to_string().contains("outside its region"), "{err}");
    // Nothing arrived, and the next valid round is round 0.
    assert!(e.dispatch().try_recv().unwrap().is_none());
    buf.as_mut_slice()[..3].copy_from_slice(b"abc");
    assert_eq!(
        a.dispatch()
            .send(&[Msg::new(&buf, 0, 3)], Duration::from_secs(5))
            .unwrap(),
        0
    );
    let got = e.dispatch().recv(Duration::from_secs(5)).unwrap();
    assert_eq!((got.round(), e.message(&got, 0)), (0, &b"abc"[..]));
    e.dispatch().release(got).unwrap();
}

#[test]
fn wrong_direction_and_message_count_are_usage_errors() {
    let (mut a, mut e) = pair();
    assert!(matches!(a.dispatch().try_recv(), Err(Error::Usage(_))));
    assert!(matches!(
        e.dispatch().try_send(&[Msg::EMPTY]),
        Err(Error::Usage(_))
    ));
    assert!(matches!(
        a.combine().try_send(&[Msg::EMPTY]),
        Err(Error::Usage(_))
    ));
    let err = a
        .dispatch()
        .try_send(&[Msg::EMPTY, Msg::EMPTY])
        .unwrap_err();
    assert!(
        err.to_string().contains("one message per receiver"),
        "{err}"
    );
}

#[test]
fn sender_waits_for_credit_and_resumes_on_release() {
    let (mut a, mut e) = pair();
    let buf = a.alloc(8).unwrap();
    // depth 2: two rounds go out, the third needs the expert to release one.
    for round in 0..2 {
        assert_eq!(
            a.dispatch().try_send(&[Msg::new(&buf, 0, 8)]).unwrap(),
            Some(round)
        );
    }
    assert_eq!(
        a.dispatch().try_send(&[Msg::new(&buf, 0, 8)]).unwrap(),
        None
    );
    let err = a
        .dispatch()
        .send(&[Msg::new(&buf, 0, 8)], Duration::from_millis(200))
        .unwrap_err();
    assert!(
        matches!(err, Error::Timeout { .. }) && err.to_string().contains("credit from expert 0"),
        "{err}"
    );
    let r0 = e.dispatch().recv(Duration::from_secs(5)).unwrap();
    let r1 = e.dispatch().recv(Duration::from_secs(5)).unwrap();
    // Releasing round 1 first frees nothing: credit covers the released prefix.
    e.dispatch().release(r1).unwrap();
    assert_eq!(
        a.dispatch().try_send(&[Msg::new(&buf, 0, 8)]).unwrap(),
        None
    );
    e.dispatch().release(r0).unwrap();
    assert_eq!(
        a.dispatch()
            .send(&[Msg::new(&buf, 0, 8)], Duration::from_secs(5))
            .unwrap(),
        2
    );
}

#[test]
fn recv_timeout_names_the_missing_sender() {
    let (_a, mut e) = pair();
    let t = Instant::now();
    let err = e.dispatch().recv(Duration::from_millis(300)).unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(
        err.to_string().contains("round 0 from attention 0"),
        "{err}"
    );
}

#[test]
fn abort_turns_into_peer_lost_on_the_other_side() {
    let (mut a, mut e) = pair();
    e.abort();
    assert!(matches!(e.dispatch().try_recv(), Err(Error::Aborted)));
    let err = a.combine().recv(Duration::from_secs(10)).unwrap_err();
    match err {
        Error::PeerLost { peer, .. } => assert_eq!((peer.role, peer.rank), (Role::Expert, 0)),
        other => panic!("expected PeerLost, got {other}"),
    }
}

#[test]
fn bad_rank_and_shape_are_refused_up_front() {
    let uid: m2n::UniqueId = format!("m2n1@127.0.0.1:9#{}", "00".repeat(16))
        .parse()
        .unwrap();
    let err = Communicator::init(config(), Role::Expert, 3, Shape::new(1, 2), &uid).unwrap_err();
    assert!(err.to_string().contains("expert rank 3"), "{err}");
    let err = Communicator::init(config(), Role::Attention, 0, Shape::new(1, 0), &uid).unwrap_err();
    assert!(err.to_string().contains("1x0"), "{err}");
}

#[test]
fn registered_application_memory_is_a_zero_copy_source() {
    let (mut a, mut e) = pair();
    let mut tensor: Vec<u8> = (0..200u8).collect();
    // SAFETY: `tensor` outlives the region and is not modified until sent.
    let region = unsafe { a.register(tensor.as_mut_ptr(), tensor.len()) }.unwrap();
    assert!(
        region.descriptor().is_empty(),
        "application memory is not remotely writable"
    );
    let round = a
        .dispatch()
        .send(&[Msg::new(&region, 50, 100)], Duration::from_secs(5))
        .unwrap();
    a.dispatch()
        .wait_sent(round, Duration::from_secs(5))
        .unwrap();
    let got = e.dispatch().recv(Duration::from_secs(5)).unwrap();
    assert_eq!(e.message(&got, 0), &tensor[50..150]);
    e.dispatch().release(got).unwrap();
}

#[test]
fn a_region_of_another_communicator_is_refused() {
    let (mut a1, _e1) = pair();
    let (mut a2, _e2) = pair();
    let foreign = a2.alloc(16).unwrap();
    let _own = a1.alloc(16).unwrap();
    let err = a1
        .dispatch()
        .try_send(&[Msg::new(&foreign, 0, 8)])
        .unwrap_err();
    assert!(err.to_string().contains("another communicator"), "{err}");
}
