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

#[test]
fn a_host_recording_replays_its_operations_with_the_values_they_had() {
    let s = HostStream::new();
    let flags = Arc::new(FlagBlock::host());
    let runs = Arc::new(AtomicU32::new(0));
    s.begin_capture().unwrap();
    assert!(s.is_capturing().unwrap());
    s.wait_value(&flags, Flag::Ready, 1).unwrap();
    s.write_value(&flags, Flag::Ready, 0).unwrap();
    let r = runs.clone();
    s.launch_repeatable(move || {
        r.fetch_add(1, Ordering::SeqCst);
    });
    s.write_value(&flags, Flag::Sent, 7).unwrap();
    let g = s.end_capture().unwrap();
    assert!(!s.is_capturing().unwrap());
    assert_eq!(g.len(), 4);
    // Nothing ran while recording.
    s.synchronize(Duration::from_secs(5)).unwrap();
    assert_eq!(
        (runs.load(Ordering::SeqCst), flags.load(Flag::Sent)),
        (0, 0)
    );
    for k in 1..=5 {
        g.launch(&s).unwrap();
        assert!(
            s.synchronize(Duration::from_millis(20)).is_err(),
            "launch {k} waits for Ready as recorded"
        );
        flags.store(Flag::Ready, 1);
        s.synchronize(Duration::from_secs(5)).unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), k);
        assert_eq!(flags.load(Flag::Ready), 0, "reset by the recording");
        assert_eq!(flags.load(Flag::Sent), 7);
    }
}

#[test]
fn recording_misuse_is_refused_naming_it() {
    let s = HostStream::new();
    assert!(s
        .end_capture()
        .unwrap_err()
        .to_string()
        .contains("not recording"));
    s.begin_capture().unwrap();
    assert!(s
        .begin_capture()
        .unwrap_err()
        .to_string()
        .contains("recording already"));
    let err = s.synchronize(Duration::from_secs(1)).unwrap_err();
    assert!(err.to_string().contains("recording"), "{err}");
    s.launch(|| {});
    let err = s.end_capture().unwrap_err();
    assert!(err.to_string().contains("launch_repeatable"), "{err}");
    // The stream records no more and runs work again.
    let ran = Arc::new(AtomicU32::new(0));
    let r = ran.clone();
    s.launch(move || {
        r.store(1, Ordering::SeqCst);
    });
    s.synchronize(Duration::from_secs(5)).unwrap();
    assert_eq!(ran.load(Ordering::SeqCst), 1);
}

#[test]
fn slot_flags_sit_after_the_sequence_flags_each_on_its_line() {
    let layout = FlagLayout {
        send_slots: 2,
        recv_slots: 3,
    };
    let f = FlagBlock::host_with(layout);
    let all = [
        Flag::Ready,
        Flag::Sent,
        Flag::Arrived,
        Flag::Released,
        Flag::SlotReady(0),
        Flag::SlotReady(1),
        Flag::SlotSent(0),
        Flag::SlotSent(1),
        Flag::SlotArrived(0),
        Flag::SlotArrived(2),
        Flag::SlotReleased(0),
        Flag::SlotReleased(2),
    ];
    let mut addrs: Vec<u64> = all.iter().map(|&fl| f.device_addr(fl)).collect();
    addrs.sort();
    addrs.dedup();
    assert_eq!(addrs.len(), all.len(), "no two flags share a line");
    assert_eq!(layout.bytes(), (4 + 4 + 6) * 64);
    assert!(addrs
        .iter()
        .all(|a| a - f.device_addr(Flag::Ready) < layout.bytes() as u64));
    f.store(Flag::SlotArrived(2), 1);
    assert_eq!(
        (f.load(Flag::SlotArrived(2)), f.load(Flag::SlotReleased(0))),
        (1, 0)
    );
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        f.device_addr(Flag::SlotSent(2))
    }));
    assert!(r.is_err(), "a slot the layout lacks");
}

/// A stream of the other kind, for refusals only (nothing is enqueued).
struct OtherKind;

impl Stream for OtherKind {
    fn kind(&self) -> StreamKind {
        StreamKind::Cuda
    }
    fn write_value(&self, _: &Arc<FlagBlock>, _: Flag, _: u32) -> Result<(), StreamError> {
        unreachable!("refused before")
    }
    fn wait_value(&self, _: &Arc<FlagBlock>, _: Flag, _: u32) -> Result<(), StreamError> {
        unreachable!("refused before")
    }
    fn alloc_flags(&self, _: FlagLayout) -> Result<FlagBlock, StreamError> {
        unreachable!("refused before")
    }
    fn is_capturing(&self) -> Result<bool, StreamError> {
        Ok(false)
    }
    fn map_region(&self, _: &Region, _: bool) -> Result<MappedRegion, StreamError> {
        unreachable!("refused before")
    }
    fn copy_to_host(&self, _: usize, _: u64, _: usize) -> Result<(), StreamError> {
        unreachable!("refused before")
    }
}

#[test]
fn a_host_recording_launched_on_a_stream_of_another_kind_is_refused() {
    let s = HostStream::new();
    s.begin_capture().unwrap();
    s.launch_repeatable(|| {});
    let g = s.end_capture().unwrap();
    let err = g.launch(&OtherKind).unwrap_err();
    assert!(
        err.to_string()
            .contains("only on a host stream, not on a CUDA stream"),
        "{err}"
    );
}
