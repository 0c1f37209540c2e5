use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::*;

fn opts() -> TcpOptions {
    TcpOptions {
        bind_ip: IpAddr::from([127, 0, 0, 1]),
        data: LaneOptions {
            dscp: 10,
            priority: 0,
            congestion: None,
        },
        ack: LaneOptions {
            dscp: 46,
            priority: 6,
            congestion: None,
        },
        connect_timeout: Duration::from_secs(5),
        queue_frames: 64,
    }
}

/// Two connected transports: ranks 0 (dials) and 1 (accepts).
fn pair() -> (TcpTransport, TcpTransport) {
    let mut a = TcpTransport::new(0, 2, opts()).unwrap();
    let mut b = TcpTransport::new(1, 2, opts()).unwrap();
    let (ea, eb) = (a.endpoint(), b.endpoint());
    let acceptor = std::thread::spawn(move || {
        b.connect(0, &ea).unwrap();
        b
    });
    a.connect(1, &eb).unwrap();
    (a, acceptor.join().unwrap())
}

fn req(
    local: &Region,
    remote: RemoteRegion,
    off: usize,
    len: usize,
    imm: Option<u32>,
) -> WriteRequest {
    WriteRequest::test(local, remote, off, len, imm, 5)
}

/// Polls both until `b` has seen `want` arrivals; returns (a's, b's) completions.
fn drive(
    a: &mut TcpTransport,
    b: &mut TcpTransport,
    want: usize,
) -> (Vec<Completion>, Vec<Completion>) {
    let (mut ca, mut cb) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(10);
    while cb
        .iter()
        .filter(|c| matches!(c, Completion::Arrived { .. }))
        .count()
        < want
    {
        assert!(Instant::now() < deadline, "no progress: {ca:?} {cb:?}");
        a.poll(&mut ca).unwrap();
        b.poll(&mut cb).unwrap();
    }
    a.poll(&mut ca).unwrap();
    (ca, cb)
}

#[test]
fn large_write_with_imm_lands_in_place() {
    let (mut a, mut b) = pair();
    let mut src = a.alloc(3 << 20).unwrap();
    crate::pattern::fill(src.as_mut_slice(), 99);
    let dst = b.alloc((3 << 20) + 100).unwrap();
    let remote = a.import(1, dst.descriptor()).unwrap();
    // SAFETY: src is not modified until its completion.
    unsafe { a.post_write(1, Lane::Data, &req(&src, remote, 100, 3 << 20, Some(77))) }.unwrap();
    let (ca, cb) = drive(&mut a, &mut b, 1);
    assert!(ca.contains(&Completion::WriteDone { wr_id: 5 }));
    assert_eq!(
        cb,
        vec![Completion::Arrived {
            peer: 0,
            imm: 77,
            len: 3 << 20
        }]
    );
    assert_eq!(crate::pattern::count_wrong(&dst.as_slice()[100..], 99), 0);
    assert!(dst.as_slice()[..100].iter().all(|&x| x == 0));
}

#[test]
fn credit_words_on_the_ack_lane_and_lane_priorities() {
    let (mut a, mut b) = pair();
    let src = a.alloc(8).unwrap();
    src.store_u64(0, 0x1122_3344_5566_7788);
    let dst = b.alloc(64).unwrap();
    let remote = a.import(1, dst.descriptor()).unwrap();
    // SAFETY: as above.
    unsafe { a.post_write(1, Lane::Ack, &req(&src, remote, 16, 8, None)) }.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while dst.load_u64(16) != 0x1122_3344_5566_7788 {
        assert!(Instant::now() < deadline);
        b.poll(&mut Vec::new()).unwrap();
    }
    for t in [&a, &b] {
        let peer = 1 - t.me;
        let ack = t.socket(peer, Lane::Ack).unwrap();
        let data = t.socket(peer, Lane::Data).unwrap();
        assert_eq!(
            sock::getsockopt_int(ack, libc::IPPROTO_IP, libc::IP_TOS).unwrap(),
            46 << 2
        );
        assert_eq!(
            sock::getsockopt_int(ack, libc::SOL_SOCKET, libc::SO_PRIORITY).unwrap(),
            6
        );
        assert_eq!(
            sock::getsockopt_int(data, libc::IPPROTO_IP, libc::IP_TOS).unwrap(),
            10 << 2
        );
        assert_eq!(
            sock::getsockopt_int(data, libc::SOL_SOCKET, libc::SO_PRIORITY).unwrap(),
            0
        );
    }
}

#[test]
fn out_of_range_writes_are_refused_before_sending() {
    let (mut a, mut b) = pair();
    let src = a.alloc(64).unwrap();
    let dst = b.alloc(32).unwrap();
    let remote = a.import(1, dst.descriptor()).unwrap();
    // SAFETY: refused before any byte moves.
    let err = unsafe { a.post_write(1, Lane::Data, &req(&src, remote, 16, 17, None)) }.unwrap_err();
    assert!(
        matches!(err, TransportError::OutOfBounds { side: "remote", .. }),
        "{err}"
    );
}

/// Connects to `t` as if we were peer 0, with `t`'s token, returning the raw data socket.
fn impostor(t: &TcpTransport, token: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(t.addr).unwrap();
    let hello = Writer::new()
        .u32(HELLO_MAGIC)
        .raw(token)
        .u32(0)
        .u8(0)
        .finish();
    s.write_all(&hello).unwrap();
    s
}

#[test]
fn hostile_frames_close_the_peer_with_an_error_naming_it() {
    let mut b = TcpTransport::new(1, 2, opts()).unwrap();
    let dst = b.alloc(32).unwrap();
    let token = b.token;
    // Data lane: an impostor with the right token; ack lane likewise.
    let mut data = impostor(&b, &token);
    let mut ack = TcpStream::connect(b.addr).unwrap();
    ack.write_all(
        &Writer::new()
            .u32(HELLO_MAGIC)
            .raw(&token)
            .u32(0)
            .u8(1)
            .finish(),
    )
    .unwrap();
    let a_endpoint = Writer::new()
        .u32(ENDPOINT_MAGIC)
        .bytes(b"127.0.0.1:1")
        .raw(&[0; TOKEN_BYTES])
        .u32(0)
        .finish();
    b.connect(0, &a_endpoint).unwrap();
    // A frame that writes past the end of the region, then its payload.
    let h = Header {
        lane: Lane::Data,
        region: 0,
        offset: 30,
        len: 8,
        imm: Some(1),
    };
    data.write_all(&h.encode()).unwrap();
    data.write_all(&[0xEE; 8]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let err = loop {
        assert!(Instant::now() < deadline);
        if let Err(e) = b.poll(&mut Vec::new()) {
            break e;
        }
    };
    assert!(
        matches!(err, TransportError::Corrupt { peer: 0, .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("30+8") && err.to_string().contains("32 bytes"),
        "{err}"
    );
    assert!(
        dst.as_slice().iter().all(|&x| x == 0),
        "nothing may be written"
    );
}

#[test]
fn connections_without_the_token_are_ignored() {
    let mut b = TcpTransport::new(
        1,
        2,
        TcpOptions {
            connect_timeout: Duration::from_millis(500),
            ..opts()
        },
    )
    .unwrap();
    let _stranger = impostor(&b, &[0u8; TOKEN_BYTES]);
    let a_endpoint = Writer::new()
        .u32(ENDPOINT_MAGIC)
        .bytes(b"127.0.0.1:1")
        .raw(&[0; TOKEN_BYTES])
        .u32(0)
        .finish();
    let err = b.connect(0, &a_endpoint).unwrap_err();
    assert!(
        err.to_string().contains("never connected its Data lane"),
        "{err}"
    );
}

#[test]
fn writes_to_a_gone_peer_are_peer_closed() {
    let (mut a, mut b) = pair();
    let src = a.alloc(16).unwrap();
    let dst = b.alloc(16).unwrap();
    let remote = b.import(0, src.descriptor()).unwrap();
    // a dies: its sockets close.
    drop(a);
    std::thread::sleep(Duration::from_millis(50));
    let mut out = Vec::new();
    b.poll(&mut out).unwrap();
    let res = (0..50).find_map(|_| {
        // SAFETY: refused or queued; the test does not touch dst meanwhile.
        let r = unsafe { b.post_write(0, Lane::Data, &req(&dst, remote, 0, 16, Some(1))) };
        b.poll(&mut out).unwrap();
        std::thread::sleep(Duration::from_millis(10));
        r.err()
    });
    assert!(
        matches!(res, Some(TransportError::PeerClosed { peer: 0, .. })),
        "{res:?}"
    );
}
