//! Rounds allocate nothing once warm: a counting global allocator around
//! a 1 x 1 group in this process (both ranks' threads count), round trips
//! over shm, tcp and fabric (libfabric's shm provider) with blocking and
//! non-blocking calls.

#[path = "../../tests/support/counting.rs"]
mod counting;

#[path = "support/inproc.rs"]
mod inproc;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use m2n::{Config, Msg, TransportKind, WaitPolicy};

/// Allocations during `measured` round trips after `warm` ones.
fn allocations(transport: TransportKind, nonblocking: bool) -> u64 {
    let (warm, measured) = (100u64, 400u64);
    let mut config = Config {
        transport,
        wait: WaitPolicy::Yield,
        ..Config::default()
    };
    // The fabric transport over the provider every host has.
    config.fabric.provider = Some("shm".into());
    let (mut a, mut e) = inproc::pair(config, || {});
    let t = Duration::from_secs(10);
    let marks = Arc::new(Barrier::new(2));
    let m2 = marks.clone();
    let expert = std::thread::spawn(move || {
        let mut out = e.alloc(4096).unwrap();
        for k in 0..warm + measured {
            if k == warm || k == warm + measured - 1 {
                m2.wait();
            }
            let r = e.dispatch().recv(t).unwrap();
            let n = e.message(&r, 0).len();
            out.as_mut_slice()[..n].copy_from_slice(e.message(&r, 0));
            e.dispatch().release(r).unwrap();
            let sent = e.combine().send(&[Msg::new(&out, 0, n)], t).unwrap();
            e.combine().wait_sent(sent, t).unwrap();
        }
        e
    });
    let buf = a.alloc(4096).unwrap();
    let mut before = 0;
    for k in 0..warm + measured {
        if k == warm {
            marks.wait();
            before = counting::allocations();
        }
        if k == warm + measured - 1 {
            marks.wait();
        }
        let msg = [Msg::new(&buf, 0, 1 + (k as usize * 37) % 4000)];
        let r = if nonblocking {
            loop {
                if let Some(r) = a.dispatch().try_send(&msg).unwrap() {
                    break r;
                }
            }
        } else {
            a.dispatch().send(&msg, t).unwrap()
        };
        assert_eq!(r, k);
        let back = if nonblocking {
            loop {
                if let Some(b) = a.combine().try_recv().unwrap() {
                    break b;
                }
                a.progress().unwrap();
            }
        } else {
            a.combine().recv(t).unwrap()
        };
        assert_eq!(back.round(), k);
        a.combine().release(back).unwrap();
    }
    let allocs = counting::allocations() - before;
    let e = expert.join().unwrap();
    drop((a, e));
    allocs
}

#[test]
fn round_trips_allocate_nothing_once_warm() {
    for transport in [
        TransportKind::Shm,
        TransportKind::Tcp,
        TransportKind::Fabric,
    ] {
        for nonblocking in [false, true] {
            let n = allocations(transport, nonblocking);
            assert_eq!(
                n, 0,
                "{n} allocations in 400 round trips over {transport} (nonblocking: {nonblocking})"
            );
        }
    }
}
