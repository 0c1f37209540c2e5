use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;

#[test]
fn flags_sit_on_their_own_lines_and_start_at_zero() {
    let f = FlagBlock::host();
    let addrs: Vec<u64> = FLAGS.iter().map(|&fl| f.device_addr(fl)).collect();
    for w in addrs.windows(2) {
        assert_eq!(w[1] - w[0], 64);
    }
    for fl in FLAGS {
        assert_eq!(f.load(fl), 0);
    }
    f.store(Flag::Sent, 7);
    assert_eq!((f.load(Flag::Sent), f.load(Flag::Ready)), (7, 0));
}

#[test]
fn a_host_stream_runs_work_in_order_and_waits_on_flags() {
    let s = HostStream::new();
    let flags = Arc::new(FlagBlock::host());
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    s.launch(move || l.lock().unwrap().push("before"));
    s.write_value(&flags, Flag::Ready, 1).unwrap();
    s.wait_value(&flags, Flag::Sent, 1).unwrap();
    let l = log.clone();
    s.launch(move || l.lock().unwrap().push("after"));
    // The write happens once "before" ran; "after" waits for Sent.
    let mut spins = 0;
    while flags.load(Flag::Ready) != 1 {
        spins += 1;
        assert!(spins < 10_000_000, "the stream never wrote Ready");
        std::thread::yield_now();
    }
    assert_eq!(*log.lock().unwrap(), vec!["before"]);
    let err = s.synchronize(Duration::from_millis(50)).unwrap_err();
    assert!(
        err.to_string().contains("Sent flag to reach 1"),
        "the timeout names the flag: {err}"
    );
    assert_eq!(*log.lock().unwrap(), vec!["before"], "held by the wait");
    flags.store(Flag::Sent, 1);
    s.synchronize(Duration::from_secs(10)).unwrap();
    assert_eq!(*log.lock().unwrap(), vec!["before", "after"]);
}

#[test]
fn a_host_stream_waits_wrap_aware() {
    let s = HostStream::new();
    let flags = Arc::new(FlagBlock::host());
    flags.store(Flag::Arrived, u32::MAX);
    let ran = Arc::new(AtomicU32::new(0));
    s.wait_value(&flags, Flag::Arrived, 2).unwrap();
    let r = ran.clone();
    s.launch(move || {
        r.store(1, Ordering::SeqCst);
    });
    assert!(
        s.synchronize(Duration::from_millis(30)).is_err(),
        "u32::MAX is before 2"
    );
    flags.store(Flag::Arrived, 2);
    s.synchronize(Duration::from_secs(10)).unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 1);
}

#[test]
fn a_panic_in_host_stream_work_is_reported_and_later_work_still_runs() {
    let s = HostStream::new();
    let ran = Arc::new(AtomicU32::new(0));
    s.launch(|| panic!("kernel fault"));
    let r = ran.clone();
    s.launch(move || {
        r.store(1, Ordering::SeqCst);
    });
    let err = s.synchronize(Duration::from_secs(10)).unwrap_err();
    assert!(err.to_string().contains("kernel fault"), "{err}");
    assert_eq!(ran.load(Ordering::SeqCst), 1);
}

#[test]
fn dropping_a_host_stream_stuck_on_a_flag_does_not_hang() {
    let s = HostStream::new();
    let flags = Arc::new(FlagBlock::host());
    s.wait_value(&flags, Flag::Released, 1).unwrap();
    drop(s);
}
