use super::*;
use std::time::{Duration, Instant};

/// The providers that run on any Linux host.
const HOST_PROVIDERS: [&str; 3] = ["net", "tcp", "shm"];

fn opts(provider: &str) -> FabricOptions {
    FabricOptions {
        provider: Some(provider.into()),
        // The loopback domain exists everywhere (tcp); shm has one domain.
        domain: (provider != "shm").then(|| "lo".into()),
        ..FabricOptions::default()
    }
}

/// Two connected transports in this process over `provider`.
fn pair(provider: &str) -> (FabricTransport, FabricTransport) {
    pair_notified(provider, Notify::Auto)
}

/// Two connected transports over `provider` that notify writes by `notify`.
fn pair_notified(provider: &str, notify: Notify) -> (FabricTransport, FabricTransport) {
    pair_with(FabricOptions {
        notify,
        ..opts(provider)
    })
}

/// Two connected transports in this process with options `o`.
fn pair_with(o: FabricOptions) -> (FabricTransport, FabricTransport) {
    let mut a = FabricTransport::new(0, 2, o.clone()).unwrap();
    let mut b = FabricTransport::new(1, 2, o).unwrap();
    let (ea, eb) = (a.endpoint(), b.endpoint());
    a.connect(1, &eb).unwrap();
    b.connect(0, &ea).unwrap();
    (a, b)
}

/// Posts `req` from `a` to `b` on `lane`, polling both while the provider
/// cannot take it yet (the first writes wait while it connects).
///
/// # Safety
/// As [`Transport::post_write`]: the source stays unchanged until the
/// write completes.
unsafe fn post_retrying(
    a: &mut FabricTransport,
    b: &mut FabricTransport,
    lane: Lane,
    req: &WriteRequest,
) {
    loop {
        // SAFETY: forwarded contract.
        match unsafe { a.post_write(1, lane, req) } {
            Ok(()) => return,
            Err(TransportError::WouldBlock) => {
                a.poll(&mut Vec::new()).unwrap();
                b.poll(&mut Vec::new()).unwrap();
            }
            Err(e) => panic!("{}: {e}", a.provider()),
        }
    }
}

fn drive(
    a: &mut FabricTransport,
    b: &mut FabricTransport,
    until: impl Fn(&[Completion], &[Completion]) -> bool,
) -> (Vec<Completion>, Vec<Completion>) {
    let (mut ca, mut cb) = (Vec::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !until(&ca, &cb) {
        assert!(Instant::now() < deadline, "no completion: {ca:?} {cb:?}");
        a.poll(&mut ca).unwrap();
        b.poll(&mut cb).unwrap();
    }
    (ca, cb)
}

#[test]
fn writes_with_remote_cq_data_land_with_their_length() {
    writes_land_with_their_length(Notify::CqData);
}

/// The same writes, each announced by a message ordered after it (the
/// way to providers with less than 8 bytes of CQ data: rxm over verbs).
#[test]
fn writes_announced_by_messages_land_with_their_length() {
    writes_land_with_their_length(Notify::Message);
}

fn writes_land_with_their_length(notify: Notify) {
    for provider in HOST_PROVIDERS {
        let (mut a, mut b) = pair_notified(provider, notify);
        assert_eq!(b.notices.is_some(), notify == Notify::Message, "{provider}");
        let mut src = a.alloc(1 << 20).unwrap();
        crate::pattern::fill(src.as_mut_slice(), 5);
        let dst = b.alloc((1 << 20) + 64).unwrap();
        let remote = a.import(1, dst.descriptor()).unwrap();
        // Out of range: refused before anything is posted.
        // SAFETY: src is not modified until its completion.
        let err = unsafe {
            a.post_write(
                1,
                Lane::Data,
                &WriteRequest::test(&src, remote, 65, 1 << 20, None, 9),
            )
        }
        .unwrap_err();
        assert!(
            matches!(err, TransportError::OutOfBounds { side: "remote", .. }),
            "{provider}: {err}"
        );
        // Large (completion), empty, credit-sized (injected) and inject-sized
        // writes, on both lanes.
        for (off, len, imm, lane) in [
            (64, 1 << 20, 0xabcd_0123, Lane::Data),
            (0, 0, 7, Lane::Data),
            (8, 8, 8, Lane::Ack),
            (64, 4096, 0x8000_0001, Lane::Data),
        ] {
            let req = WriteRequest::test(&src, remote, off, len, Some(imm), 9);
            // SAFETY: as above.
            unsafe { a.post_write(1, lane, &req) }.unwrap();
            let (_, cb) = drive(&mut a, &mut b, |ca, cb| {
                !cb.is_empty() && ca.contains(&Completion::WriteDone { wr_id: 9 })
            });
            assert_eq!(
                cb,
                vec![Completion::Arrived {
                    peer: crate::transport::PEER_IN_IMMEDIATE,
                    imm,
                    len
                }],
                "{provider}: {len} bytes on {lane:?}"
            );
        }
        assert_eq!(
            crate::pattern::count_wrong(&dst.as_slice()[64..], 5),
            0,
            "{provider}"
        );
        let c = a.counters();
        assert!(
            c.work_requests >= 4 && c.doorbells >= 1,
            "{provider}: {c:?}"
        );
        assert!(
            c.inline >= 2,
            "{provider}: small writes are injected: {c:?}"
        );
    }
}

/// A small write the caller waits for is injected too: its `WriteDone`
/// comes from the post (the provider copied the bytes), no completion is
/// asked of the provider, and changing the source at once does not change
/// what lands.
#[test]
fn signalled_injected_writes_are_done_when_posted() {
    for provider in HOST_PROVIDERS {
        let (mut a, mut b) = pair(provider);
        let mut src = a.alloc(64).unwrap();
        let dst = b.alloc(64).unwrap();
        let remote = a.import(1, dst.descriptor()).unwrap();
        for k in 1..=20u8 {
            src.as_mut_slice()[..8].fill(k);
            let req = WriteRequest::test(&src, remote, 0, 8, Some(u32::from(k)), u64::from(k));
            let mut ca = Vec::new();
            // SAFETY: injected: the source is copied before the post returns.
            while let Err(e) = unsafe { a.post_write(1, Lane::Data, &req) } {
                assert!(matches!(e, TransportError::WouldBlock), "{provider}: {e}");
                a.poll(&mut ca).unwrap();
                b.poll(&mut Vec::new()).unwrap();
            }
            let wr_id = u64::from(k);
            let (_, mut arrived) = drive(&mut a, &mut b, |ca, _| {
                ca.contains(&Completion::WriteDone { wr_id })
            });
            // Reused at once: what lands is what was posted.
            src.as_mut_slice()[..8].fill(0xee);
            if arrived.is_empty() {
                arrived = drive(&mut a, &mut b, |_, cb| !cb.is_empty()).1;
            }
            assert_eq!(
                arrived,
                vec![Completion::Arrived {
                    peer: crate::transport::PEER_IN_IMMEDIATE,
                    imm: u32::from(k),
                    len: 8
                }],
                "{provider}"
            );
            assert_eq!(&dst.as_slice()[..8], &[k; 8], "{provider}: round {k}");
        }
        let c = a.counters();
        assert_eq!((c.inline, c.signaled), (20, 0), "{provider}: {c:?}");
    }
}

/// A credit queued behind a data write to the same peer rides in it: one
/// provider write names both ranges, and both land (an injected data write
/// and one that asks a completion alike). A credit to another peer, or one
/// on another lane, goes alone.
#[test]
fn credits_ride_in_the_data_write_before_them() {
    for provider in HOST_PROVIDERS {
        let (mut a, mut b) = pair(provider);
        let mut src = a.alloc(8192).unwrap();
        crate::pattern::fill(src.as_mut_slice(), 3);
        let word = a.alloc(64).unwrap();
        let ring = b.alloc(8192).unwrap();
        let credits = b.alloc(64).unwrap();
        let remote_ring = a.import(1, ring.descriptor()).unwrap();
        let remote_credits = a.import(1, credits.descriptor()).unwrap();
        for (k, len) in [(1u64, 8usize), (2, 4096), (3, 8000), (4, 8)] {
            word.store_u64(0, k);
            let data = WriteRequest::test(&src, remote_ring, 0, len, Some(k as u32), k);
            let credit = WriteRequest {
                signaled: false,
                ..WriteRequest::test(&word, remote_credits, 8, 8, None, 0)
            };
            let before = a.counters().work_requests;
            // SAFETY: sources unchanged until their completions below.
            unsafe { post_retrying(&mut a, &mut b, Lane::Data, &data) };
            // SAFETY: as above.
            unsafe { a.post_write(1, Lane::Data, &credit) }.unwrap();
            let (_, cb) = drive(&mut a, &mut b, |ca, cb| {
                !cb.is_empty() && ca.contains(&Completion::WriteDone { wr_id: k })
            });
            assert_eq!(
                cb,
                vec![Completion::Arrived {
                    peer: crate::transport::PEER_IN_IMMEDIATE,
                    imm: k as u32,
                    len
                }],
                "{provider}"
            );
            // Both ranges landed before the data's CQ data was read.
            assert_eq!(credits.load_u64(8), k, "{provider}: credit {k}");
            assert_eq!(
                crate::pattern::count_wrong(&ring.as_slice()[..len], 3),
                0,
                "{provider}: {len} bytes"
            );
            let writes = a.counters().work_requests - before;
            // An injected data write takes the credit only if the pair
            // is still injectable (no completion keeps a source alive).
            let fits = len > a.inject_size || len + 8 <= a.inject_size;
            let want = if a.two_ranges && fits { 1 } else { 2 };
            assert_eq!(writes, want, "{provider}: {len} B data and a credit");
        }
        assert!(a.two_ranges, "{provider} takes two ranges per write");
        // On the ACK lane, the credit goes alone.
        word.store_u64(0, 9);
        let data = WriteRequest::test(&src, remote_ring, 0, 8, Some(9), 9);
        let credit = WriteRequest {
            signaled: false,
            ..WriteRequest::test(&word, remote_credits, 8, 8, None, 0)
        };
        let before = a.counters().work_requests;
        // SAFETY: as above.
        unsafe { a.post_write(1, Lane::Data, &data) }.unwrap();
        // SAFETY: as above.
        unsafe { a.post_write(1, Lane::Ack, &credit) }.unwrap();
        drive(&mut a, &mut b, |ca, cb| {
            !cb.is_empty() && ca.contains(&Completion::WriteDone { wr_id: 9 })
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while credits.load_u64(8) != 9 {
            assert!(Instant::now() < deadline, "{provider}: the lone credit");
            a.poll(&mut Vec::new()).unwrap();
            b.poll(&mut Vec::new()).unwrap();
        }
        assert_eq!(a.counters().work_requests - before, 2, "{provider}");
    }
}

/// A credit rides only in the write queued last to its peer, and one
/// credit per write, so that a newer credit never lands before an older
/// one: two data writes each take the credit queued after them, and a
/// second credit behind a write that carries one goes alone, after it.
#[test]
fn a_credit_rides_only_in_the_last_write_to_its_peer() {
    for provider in HOST_PROVIDERS {
        let (mut a, mut b) = pair(provider);
        let src = a.alloc(64).unwrap();
        // Four credit values, one word each (their sources differ, as
        // the values of one word would not once queued).
        let words = a.alloc(64).unwrap();
        for (i, v) in [11u64, 12, 13, 14].into_iter().enumerate() {
            words.store_u64(8 * i, v);
        }
        let ring = b.alloc(64).unwrap();
        let credits = b.alloc(64).unwrap();
        let remote_ring = a.import(1, ring.descriptor()).unwrap();
        let remote_credits = a.import(1, credits.descriptor()).unwrap();
        let credit = |value: usize| WriteRequest {
            local_offset: 8 * value,
            signaled: false,
            ..WriteRequest::test(&words, remote_credits, 0, 8, None, 0)
        };
        let data = |k: u64| WriteRequest::test(&src, remote_ring, 0, 8, Some(k as u32), k);
        let run = |a: &mut FabricTransport, b: &mut FabricTransport, reqs: &[WriteRequest]| {
            let before = a.counters().work_requests;
            for req in reqs {
                // SAFETY: the sources stay unchanged until the transports drop.
                unsafe { a.post_write(1, Lane::Data, req) }.unwrap();
            }
            let last = reqs.iter().filter(|r| r.imm.is_some()).count();
            drive(a, b, |_, cb| cb.len() == last);
            let deadline = Instant::now() + Duration::from_secs(20);
            while a.batch.iter().any(|t| !t.is_empty()) {
                assert!(Instant::now() < deadline, "{provider}: writes still queued");
                a.poll(&mut Vec::new()).unwrap();
            }
            a.counters().work_requests - before
        };
        // Polls until the credit word holds `want`.
        let lands = |a: &mut FabricTransport, b: &mut FabricTransport, want: u64| {
            let deadline = Instant::now() + Duration::from_secs(20);
            while credits.load_u64(0) != want {
                assert!(
                    Instant::now() < deadline,
                    "{provider}: credit {want} never landed"
                );
                a.poll(&mut Vec::new()).unwrap();
                b.poll(&mut Vec::new()).unwrap();
            }
        };
        // Data, credit, data, credit: each credit in the write before it.
        let writes = run(&mut a, &mut b, &[data(1), credit(0), data(2), credit(1)]);
        assert_eq!(writes, 2, "{provider}");
        assert_eq!(credits.load_u64(0), 12, "{provider}: the newer credit");
        // Data, credit, credit: the second credit alone, after the first.
        let writes = run(&mut a, &mut b, &[data(3), credit(2), credit(3)]);
        assert_eq!(writes, 2, "{provider}");
        lands(&mut a, &mut b, 14);
        // Data, data, credit, credit: the first credit in the second data
        // write, the second alone after it (not in the first data write,
        // where it would land before the older credit).
        credits.store_u64(0, 0);
        let writes = run(&mut a, &mut b, &[data(4), data(5), credit(2), credit(3)]);
        assert_eq!(writes, 3, "{provider}");
        // (Had credit 14 ridden in the first data write, it would have
        // landed before credit 13, and the word would stay 13.)
        lands(&mut a, &mut b, 14);
    }
}

/// A credit may leave the ACK lane for a data write to the same peer
/// queued before it (`M2N_FI_CREDIT_RIDE`): by default over the host
/// providers (their traffic classes stay on the host), never with `0`;
/// only beside a data write to that peer with CQ data, and not behind
/// more than 16 KiB of writes to it in flight.
#[test]
fn credits_leave_the_ack_lane_only_to_ride() {
    for (provider, ride) in [
        ("net", CreditRide::Auto),
        ("shm", CreditRide::Auto),
        ("tcp", CreditRide::Auto),
        ("net", CreditRide::Never),
        ("shm", CreditRide::Never),
    ] {
        let (mut a, mut b) = pair_with(FabricOptions {
            credit_ride: ride,
            ..opts(provider)
        });
        let on = ride == CreditRide::Auto;
        assert_eq!(a.ride_acks, on, "{provider} {ride:?}");
        assert_eq!(
            a.describe().contains("credits ride"),
            on,
            "{provider}: {}",
            a.describe()
        );
        let src = a.alloc(1 << 20).unwrap();
        let ring = b.alloc(1 << 20).unwrap();
        let remote = a.import(1, ring.descriptor()).unwrap();
        // Nothing queued: nothing to ride in.
        assert!(!a.credit_rides(1, 8), "{provider}");
        // A peer out of range never rides.
        assert!(!a.credit_rides(7, 8), "{provider}");
        // SAFETY: src is not modified until the transports drop.
        let post = |a: &mut FabricTransport, b: &mut FabricTransport, req: &WriteRequest| unsafe {
            post_retrying(a, b, Lane::Data, req)
        };
        // A small data write with CQ data is queued: a credit rides in it.
        post(
            &mut a,
            &mut b,
            &WriteRequest::test(&src, remote, 0, 8, Some(1), 1),
        );
        assert_eq!(a.credit_rides(1, 8), on, "{provider} {ride:?}");
        // ... but not one to another peer.
        assert!(!a.credit_rides(0, 8), "{provider}");
        drive(&mut a, &mut b, |ca, cb| {
            !cb.is_empty() && ca.contains(&Completion::WriteDone { wr_id: 1 })
        });
        assert!(!a.credit_rides(1, 8), "{provider}: sent, nothing queued");
        // A write without CQ data (another credit) carries none.
        let bare = WriteRequest {
            signaled: false,
            ..WriteRequest::test(&src, remote, 64, 8, None, 0)
        };
        post(&mut a, &mut b, &bare);
        assert!(!a.credit_rides(1, 8), "{provider}: no data write queued");
        a.poll(&mut Vec::new()).unwrap();
        // Behind 1 MiB queued to the peer (its completion not read yet):
        // the credit keeps to the ACK lane.
        post(
            &mut a,
            &mut b,
            &WriteRequest::test(&src, remote, 0, 1 << 20, Some(2), 2),
        );
        assert!(!a.credit_rides(1, 8), "{provider}: behind 1 MiB");
        drive(&mut a, &mut b, |ca, cb| {
            !cb.is_empty() && ca.contains(&Completion::WriteDone { wr_id: 2 })
        });
        assert_eq!(a.contexts.bytes_to[1], 0, "{provider}: none in flight");
        // 8 KiB (past every inject size here: a completion asked, the
        // source kept alive until it): rides.
        post(
            &mut a,
            &mut b,
            &WriteRequest::test(&src, remote, 0, 8192, Some(3), 3),
        );
        assert_eq!(a.credit_rides(1, 8), on, "{provider}: behind 8 KiB");
        drive(&mut a, &mut b, |ca, cb| {
            !cb.is_empty() && ca.contains(&Completion::WriteDone { wr_id: 3 })
        });
    }
}

/// `post_data`: a credit offered rides in the data write where leaving
/// its lane costs nothing (piggybacked, or `M2N_FI_CREDIT_RIDE` lets an
/// ACK-lane credit ride), and lands with it; the last data write of a
/// pass goes at once, alone (no train, no poll needed), unless a
/// piggybacked credit that could not ride follows it (message mode: the
/// train waits for the credit, one doorbell for both); a write that is
/// not last waits for its train.
#[test]
fn a_last_data_write_goes_at_once_with_the_credit_offered() {
    for (provider, ride, notify) in [
        ("shm", CreditRide::Auto, Notify::Auto),
        ("net", CreditRide::Auto, Notify::Auto),
        ("tcp", CreditRide::Never, Notify::Auto),
        ("shm", CreditRide::Auto, Notify::Message),
    ] {
        let (mut a, mut b) = pair_with(FabricOptions {
            credit_ride: ride,
            notify,
            ..opts(provider)
        });
        let messages = notify == Notify::Message;
        let src = a.alloc(64).unwrap();
        let word = a.alloc(64).unwrap();
        let ring = b.alloc(64).unwrap();
        let credits = b.alloc(64).unwrap();
        let remote_ring = a.import(1, ring.descriptor()).unwrap();
        let remote_credits = a.import(1, credits.descriptor()).unwrap();
        let data = |k: u64| WriteRequest::test(&src, remote_ring, 0, 8, Some(k as u32), k);
        // The first writes wait while the provider connects.
        // SAFETY: the sources stay unchanged until the transports drop.
        unsafe { post_retrying(&mut a, &mut b, Lane::Data, &data(1)) };
        drive(&mut a, &mut b, |_, cb| cb.len() == 1);
        let mut k = 1;
        for (data_lane, last) in [(true, true), (false, true), (true, false), (false, false)] {
            k += 1;
            word.store_u64(0, k);
            let credit = WriteRequest {
                signaled: false,
                ..WriteRequest::test(&word, remote_credits, 8, 8, None, 0)
            };
            let rider = Rider {
                req: &credit,
                data_lane,
            };
            let (writes, doorbells) = (a.counters().work_requests, a.counters().doorbells);
            // SAFETY: as above.
            let rode = unsafe { a.post_data(1, Lane::Data, &data(k), Some(rider), last) }.unwrap();
            let want = !messages && (data_lane || ride == CreditRide::Auto);
            assert_eq!(
                rode, want,
                "{provider} {ride:?} {notify:?}: {data_lane} {last}"
            );
            let follows = data_lane && !rode;
            let alone = last && !follows;
            // Sent at once (alone, or as a train of the write and its
            // notice), or left for the poll.
            assert_eq!(
                a.batch[0].is_empty(),
                alone,
                "{provider} {notify:?}: {data_lane} {last}"
            );
            if follows {
                // SAFETY: as above.
                unsafe { a.post_write(1, Lane::Data, &credit) }.unwrap();
            }
            let (_, cb) = drive(&mut a, &mut b, |_, cb| !cb.is_empty());
            assert_eq!(cb.len(), 1, "{provider}: {cb:?}");
            if rode {
                // Landed with the data, before its CQ data was read.
                assert_eq!(credits.load_u64(8), k, "{provider}: credit {k}");
            }
            let c = a.counters();
            // The data write, its notice in message mode, and the credit
            // that followed it (one that neither rode nor followed is
            // left to the caller's ACK lane).
            let want = 1 + u64::from(messages) + u64::from(follows);
            assert_eq!(
                c.work_requests - writes,
                want,
                "{provider} {notify:?}: {data_lane} {last}"
            );
            assert_eq!(
                c.doorbells - doorbells,
                1,
                "{provider} {notify:?}: {data_lane} {last}"
            );
        }
    }
}

/// Unsignalled small writes (credits) are injected and ask for no
/// completion; a train of them goes out in one post sequence.
#[test]
fn unsignalled_credit_writes_need_no_completion() {
    for provider in HOST_PROVIDERS {
        let (mut a, mut b) = pair(provider);
        let word = a.alloc(64).unwrap();
        let dst = b.alloc(64).unwrap();
        let remote = a.import(1, dst.descriptor()).unwrap();
        for v in 1..=100u64 {
            word.store_u64(0, v);
            let req = WriteRequest {
                signaled: false,
                ..WriteRequest::test(&word, remote, 0, 8, None, v)
            };
            let mut out = Vec::new();
            // The first writes wait while the provider connects (rxm does
            // so on first use, and needs the peer to make progress too).
            // SAFETY: injected: the source is copied before the call returns.
            while let Err(e) = unsafe { a.post_write(1, Lane::Ack, &req) } {
                assert!(matches!(e, TransportError::WouldBlock), "{provider}: {e}");
                a.poll(&mut out).unwrap();
                b.poll(&mut Vec::new()).unwrap();
            }
            a.poll(&mut out).unwrap();
            assert!(out.is_empty(), "{provider}: {out:?}");
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while dst.load_u64(0) != 100 {
            assert!(
                Instant::now() < deadline,
                "{provider}: credit {}",
                dst.load_u64(0)
            );
            let mut out = Vec::new();
            a.poll(&mut out).unwrap();
            b.poll(&mut out).unwrap();
        }
        let c = a.counters();
        assert_eq!(
            (c.work_requests, c.inline, c.signaled),
            (100, 100, 0),
            "{provider}"
        );
    }
}

#[test]
fn lanes_share_an_endpoint_only_over_shm() {
    for provider in HOST_PROVIDERS {
        let (a, _b) = pair(provider);
        let [data, ack] = a.lane_ep;
        if provider == "shm" {
            assert_eq!((data, ack, a.eps.len()), (0, 0, 1), "{provider}");
        } else {
            assert_ne!(data, ack, "{provider}: the ACK lane has its own endpoint");
            assert!(a.eps.len() >= 2 && a.lane_ep.iter().all(|&e| e < a.eps.len()));
        }
        assert!(a.rx < a.eps.len(), "{provider}");
    }
}

#[test]
fn a_provider_that_does_not_exist_is_a_clear_unavailable_error() {
    let err = FabricTransport::new(0, 2, opts("nosuchprovider")).unwrap_err();
    assert!(
        matches!(err, TransportError::Unavailable(TransportKind::Fabric, _)),
        "{err}"
    );
    assert!(err.to_string().contains("nosuchprovider"), "{err}");
    assert!(probe(&opts("tcp")).unwrap().starts_with("tcp;ofi_rxm"));
}

/// Whether a CUDA driver library loads here: without one, libfabric's
/// CUDA support cannot initialise, however it was built.
fn cuda_driver_loadable() -> bool {
    // SAFETY: dlopen by name, closed at once; a driver's initialisers have no preconditions.
    unsafe {
        let handle = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        if handle.is_null() {
            return false;
        }
        libc::dlclose(handle);
        true
    }
}

#[test]
fn gpu_memory_libfabric_cannot_register_is_refused_by_name() {
    if cuda_driver_loadable() {
        println!(
            "skipped: a CUDA driver is present, so libfabric's CUDA support may initialise \
             (scripts/gpu-check runs GPU memory over fabric)"
        );
        return;
    }
    for provider in HOST_PROVIDERS {
        let mut t = FabricTransport::new(0, 2, opts(provider)).unwrap();
        let mut host = vec![0u8; 4096];
        // SAFETY: `host` outlives the attempt, which registers nothing.
        let err = unsafe { t.register_mr(host.as_mut_ptr(), host.len(), true, Some(0)) }
            .map(drop)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("memory of GPU 0")
                && err.contains("FI_ENOSYS")
                && err.contains("built --with-cuda"),
            "{provider}: {err}"
        );
        // Later registrations are refused at once, for the same reason.
        assert_eq!(t.no_hmem.as_deref(), Some(err.as_str()), "{provider}");
        assert!(!t.describe().contains("FI_HMEM"), "{}", t.describe());
    }
}

#[cfg(feature = "cuda")]
#[test]
fn gpu_memory_without_a_gpu_is_refused_naming_why() {
    if let Ok(n) = crate::gpu::init() {
        println!("skipped: this machine has {n} GPU(s)");
        return;
    }
    let mut t = FabricTransport::new(0, 2, opts("shm")).unwrap();
    assert!(!t.describe().contains("FI_HMEM"), "{}", t.describe());
    // SAFETY: refused before the address is used.
    let err = unsafe { t.register_device(0x1000, 4096) }
        .map(drop)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("GPU memory needs FI_HMEM") && err.contains("only where a GPU is present"),
        "{err}"
    );
}

#[test]
fn endpoints_of_another_provider_or_shape_are_refused_by_name() {
    let (mut a, b) = pair("tcp");
    let (_, shm) = pair("shm");
    let err = a.connect(1, &shm.endpoint()).unwrap_err().to_string();
    assert!(err.contains("provider") && err.contains("shm"), "{err}");
    let mut cut = b.endpoint();
    cut.truncate(cut.len() - 1);
    let err = a.connect(1, &cut).unwrap_err().to_string();
    assert!(err.contains("bad descriptor from peer 1"), "{err}");
    assert!(matches!(
        a.connect(0, &b.endpoint()),
        Err(TransportError::NotConnected(0))
    ));
}

#[test]
fn descriptors_round_trip_and_reject_garbage() {
    let ep = Endpoint {
        provider: "tcp;ofi_rxm".into(),
        address: vec![1; 16],
    };
    assert_eq!(Endpoint::decode(&ep.encode(), "tcp;ofi_rxm").unwrap(), ep);
    let empty = Endpoint {
        address: Vec::new(),
        ..ep.clone()
    };
    let err = Endpoint::decode(&empty.encode(), "tcp;ofi_rxm")
        .unwrap_err()
        .to_string();
    assert!(err.contains("address") && err.contains("empty"), "{err}");
    let err = Endpoint::decode(&ep.encode(), "shm")
        .unwrap_err()
        .to_string();
    assert!(err.contains("peer runs \"tcp;ofi_rxm\""), "{err}");
    let rd = RegionDescriptor {
        addr: 0x7f00_0000_1000,
        key: 0xabcd_0000_0001,
        len: 4096,
    };
    assert_eq!(RegionDescriptor::decode(&rd.encode()).unwrap(), rd);
    let err = RegionDescriptor::decode(&ep.encode())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a fabric region descriptor"), "{err}");
    let wrap = RegionDescriptor {
        addr: u64::MAX - 10,
        key: 1,
        len: 4096,
    };
    let err = RegionDescriptor::decode(&wrap.encode())
        .unwrap_err()
        .to_string();
    assert!(err.contains("wrap around"), "{err}");
}

#[test]
fn traffic_classes_parse_by_name() {
    use super::super::options::TrafficClass;
    for name in ["unspec", "low_latency", "bulk_data", "dscp:46"] {
        let c: TrafficClass = name.parse().unwrap();
        assert_eq!(c.name(), name);
    }
    assert!("dscp:64".parse::<TrafficClass>().is_err());
    let err = "fast".parse::<TrafficClass>().unwrap_err();
    assert!(err.contains("low_latency"), "{err}");
}

/// Loading libfabric leaves the process's signal handlers as they were
/// (Debian's pulls in libpsm-infinipath, whose initialiser installs its
/// own for SIGINT, SIGQUIT, SIGTERM, SIGSEGV and others). Neither this test
/// process nor the harness catches SIGINT, SIGQUIT or SIGTERM, whichever
/// test loads the library first.
///
/// Checked in a process of its own: other tests of this one open shm
/// endpoints, and libfabric's shm provider installs handlers of its own
/// when it does (to remove its files), which is not what is tested here.
#[test]
fn loading_libfabric_keeps_the_signal_handlers() {
    const CHILD: &str = "FABRIC_SIGNALS_TEST_CHILD";
    if std::env::var_os(CHILD).is_none() {
        let name = "transport::fabric::tests::loading_libfabric_keeps_the_signal_handlers";
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--test-threads", "1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
        return;
    }
    m2n_fabric_sys::library().unwrap();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let caught = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    for sig in [libc::SIGINT, libc::SIGQUIT, libc::SIGTERM] {
        assert_eq!(
            caught & (1 << (sig - 1)),
            0,
            "signal {sig} is caught: {caught:#x}"
        );
    }
}

/// A killed process leaves its shm provider files in /dev/shm. Once its
/// pid is reused, the provider's default names (`PID:UID:INDEX`) collide
/// with them, and since the stale header then names a live pid, libfabric
/// 1.17 fails `fi_enable` with EBUSY. m2n names its shm endpoints itself,
/// so stale files under the default names are no obstacle. They are faked
/// here with this process's pid and a real region's header.
#[test]
fn shm_endpoints_do_not_collide_with_files_a_dead_process_left() {
    let pid = std::process::id();
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let a = FabricTransport::new(0, 2, opts("shm")).unwrap();
    // Tests in this binary run in parallel, so another's region may go
    // away while it is read: any of this process's regions will do.
    let header = std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("m2n-{pid}-"))
        })
        .find_map(|e| {
            let mut buf = vec![0u8; 4096];
            let mut f = std::fs::File::open(e.path()).ok()?;
            std::io::Read::read_exact(&mut f, &mut buf).ok()?;
            Some(buf)
        })
        .expect("the shm regions are named m2n-PID-TOKEN");
    // Under every name not taken (never over a live region).
    let fakes: Vec<_> = (0..1024)
        .map(|i| std::path::PathBuf::from(format!("/dev/shm/{pid}:{uid}:{i}")))
        .filter(|f| {
            let new = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(f);
            new.and_then(|mut file| std::io::Write::write_all(&mut file, &header))
                .is_ok()
        })
        .collect();
    let b = FabricTransport::new(1, 2, opts("shm"));
    for f in &fakes {
        let _ = std::fs::remove_file(f);
    }
    let b = b.unwrap();
    drop((a, b));
}

#[test]
fn shm_files_are_known_only_by_names_m2n_gives() {
    let token = "0123456789abcdef";
    assert_eq!(
        ShmFiles::of(format!("fi_shm://m2n-42-{token}:0:2\0").as_bytes()),
        Some(ShmFiles {
            pid: 42,
            stem: format!("m2n-42-{token}")
        })
    );
    for bad in [
        "fi_shm://1234:0:2".to_string(),
        format!("fi_shm://m2n--{token}:0:2"),
        format!("fi_shm://m2n-1x-{token}:0:2"),
        "fi_shm://m2n-42-0123456789abcdeg:0:2".into(),
        "fi_shm://m2n-42-../../etc/passwd:0:2".into(),
        format!("fi_shm://m2n-42-{token}0:0:2"),
        format!("fi_shm://m2n-0-{token}:0:2"),
        format!("fi_shm://m2n-99999999999-{token}:0:2"),
    ] {
        assert_eq!(ShmFiles::of(bad.as_bytes()), None, "{bad}");
    }
    assert_eq!(ShmFiles::of(&[0xff, 0xfe]), None);
}

/// A dead peer's files go when a survivor closes; a live one's stay.
#[test]
fn a_dead_peers_shm_files_are_removed() {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    // Not reaped yet: a zombie counts as dead.
    while !std::fs::read_to_string(format!("/proc/{dead}/stat"))
        .unwrap()
        .contains(") Z")
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let token = format!("{:016x}", u64::from(dead) << 20 | 0xabc);
    let live = std::process::id();
    let path = |pid: u32, rest: &str| format!("/dev/shm/m2n-{pid}-{token}{rest}");
    let files = [
        (path(dead, ":0:0"), false),
        (path(dead, ":0:7"), false),
        (path(dead, "-other:0:0"), true),
        (path(live, ":0:0"), true),
    ];
    for (f, _) in &files {
        std::fs::write(f, b"stale").unwrap();
    }
    for pid in [dead, live] {
        let address = format!("fi_shm://m2n-{pid}-{token}:0:2");
        ShmFiles::of(address.as_bytes()).unwrap().remove_if_dead();
    }
    for (f, kept) in &files {
        assert_eq!(std::path::Path::new(f).exists(), *kept, "{f}");
        let _ = std::fs::remove_file(f);
    }
    child.wait().unwrap();
}

/// A write that reaches a process it was not meant for lands nowhere. Over
/// net and tcp an address is an IP and a port: when a peer dies, its port
/// may be taken by a new process of another job while the dead peer's
/// writers still write to it (the provider reconnects). Such a write names
/// the dead peer's region: its key must not name one of this process's (as
/// sequential keys would, for a process that registered its regions in the
/// same order), and a notice that follows it (message mode) is let go.
#[test]
fn a_write_meant_for_another_process_lands_nowhere() {
    for notify in [Notify::Auto, Notify::Message] {
        for provider in ["net", "tcp"] {
            let o = FabricOptions {
                notify,
                ..opts(provider)
            };
            // `dead` registers its ring as `b` does, then dies; `stray` had
            // it as peer 1, and now reaches `b` at its address.
            let mut dead = FabricTransport::new(1, 2, o.clone()).unwrap();
            let dead_ring = dead.alloc(4096).unwrap();
            let mut b = FabricTransport::new(1, 2, o.clone()).unwrap();
            let ring = b.alloc(4096).unwrap();
            let mut stray = FabricTransport::new(0, 2, o).unwrap();
            stray.connect(1, &b.endpoint()).unwrap();
            let remote = stray.import(1, dead_ring.descriptor()).unwrap();
            drop((dead_ring, dead));
            let mut src = stray.alloc(64).unwrap();
            src.as_mut_slice().fill(0xee);
            for k in 0..4 {
                let req = WriteRequest::test(&src, remote, 8 * k, 8, Some(k as u32), 1);
                // SAFETY: injected, or kept until the transport drops.
                unsafe { stray.post_write(1, Lane::Data, &req) }.unwrap();
            }
            let (mut cs, mut cb) = (Vec::new(), Vec::new());
            let until = Instant::now() + Duration::from_millis(500);
            while Instant::now() < until {
                // The writer may learn of the refusal, or not (injected).
                let _ = stray.poll(&mut cs);
                b.poll(&mut cb).unwrap();
            }
            assert!(cb.is_empty(), "{provider} {notify:?}: {cb:?}");
            assert!(
                ring.as_slice().iter().all(|&x| x == 0),
                "{provider} {notify:?}: a stray write landed"
            );
        }
    }
}

#[test]
fn peers_write_to_the_data_lane_except_over_rxm() {
    assert_eq!(Receiver::of("net"), Receiver::DataLane);
    assert_eq!(Receiver::of("shm"), Receiver::DataLane);
    assert_eq!(Receiver::of("efa"), Receiver::DataLane);
    assert_eq!(Receiver::of("tcp;ofi_rxm"), Receiver::Own);
    assert_eq!(Receiver::of("verbs;ofi_rxm"), Receiver::Own);
}

/// Over shm, a peer in this process reaches an endpoint through that
/// endpoint's own mapping of its region (see `linger`): a transport closed
/// while a peer of this process still writes to it keeps its endpoints
/// until that peer closes too. Without that, the writes below touch
/// unmapped memory (SIGSEGV, as ranks in threads of one Python process
/// did).
#[test]
fn a_peer_in_this_process_may_close_while_it_is_written_to() {
    let (mut a, mut b) = pair("shm");
    let src = a.alloc(4096).unwrap();
    let dst = b.alloc(4096).unwrap();
    let remote = a.import(1, dst.descriptor()).unwrap();
    let write = |a: &mut FabricTransport, len: usize| {
        let req = WriteRequest::test(&src, remote, 0, len, Some(1), 3);
        // SAFETY: src is not modified while the transports live.
        unsafe { a.post_write(1, Lane::Data, &req) }.unwrap();
        a.poll(&mut Vec::new()).unwrap();
    };
    write(&mut a, 64);
    let (_, cb) = drive(&mut a, &mut b, |_, cb| !cb.is_empty());
    assert_eq!(cb.len(), 1);
    let (a_stem, b_stem) = (a.shm_stem.clone().unwrap(), b.shm_stem.clone().unwrap());
    drop(dst);
    drop(b);
    assert!(linger::parked(&b_stem), "b's endpoints closed under a");
    // Injected and larger writes (the receiver reads those from the
    // sender's memory), into the closed peer's parked region.
    for len in [8, 64, 4096] {
        write(&mut a, len);
    }
    for _ in 0..100 {
        a.poll(&mut Vec::new()).unwrap();
    }
    drop(a);
    assert!(
        !linger::parked(&b_stem),
        "b's endpoints outlived every peer"
    );
    assert!(!linger::parked(&a_stem));
}
