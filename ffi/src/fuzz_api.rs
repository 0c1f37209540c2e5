//! Entry point of the `c_api` fuzz target (`m2n/fuzz`): sequences of C ABI
//! calls with random arguments and handles on a live 1 x 1 group (both
//! ranks in this process, over shm). Not part of the API.
//!
//! A model of what each call must return is checked after every call:
//! NULL handles are `INVALID_ARGUMENT`, forged, foreign, freed and
//! destroyed handles `INVALID_USAGE`, every call on an aborted communicator
//! `ABORTED`, no call ever `INTERNAL` (a caught panic), every failure has a
//! message, rounds are numbered 0, 1, 2, ... per channel, and every round
//! that arrives carries exactly the bytes that were sent. At the end of each
//! input both ranks drain: every round posted must arrive.

use std::collections::HashMap;
use std::ffi::{c_int, c_void, CStr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::*;

const SLOT: usize = 256;
const R: m2n_result_t = m2n_result_t::M2N_SUCCESS;
use m2n_result_t::*;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Life {
    Live,
    Aborted,
    Destroyed,
}

struct Buf {
    comm: usize,
    mem: *mut m2n_mem_t,
    /// A copy of the bytes (the fuzzer never changes them after filling).
    bytes: Vec<u8>,
}

struct Group {
    comms: [*mut m2n_comm_t; 2],
    life: [Life; 2],
    bufs: Vec<Buf>,
    /// Handles that were valid once: deregistered buffers, released rounds,
    /// destroyed communicators. Calls with them must be refused.
    freed_mems: Vec<(usize, *mut m2n_mem_t)>,
    held: Vec<(usize, *mut m2n_round_t, u64)>,
    freed_rounds: Vec<(usize, *mut m2n_round_t)>,
    dead_comms: Vec<*mut m2n_comm_t>,
    /// Posted rounds not yet received, per sending communicator.
    in_flight: [HashMap<u64, Vec<u8>>; 2],
    next_send: [u64; 2],
    next_recv: [u64; 2],
    /// Application memory registered with m2n_reg_mem: kept alive for the
    /// group's life (the contract: valid until every round from it is sent).
    owned: Vec<Box<[u8]>>,
    /// Proxy threads started (and not stopped by a call here; a proxy may
    /// have stopped itself on a failure).
    proxy: [bool; 2],
}

// SAFETY: the raw pointers are handle values (integers to the library) or
// point into `owned`, which moves with the group.
unsafe impl Send for Group {}

fn ok_code(r: m2n_result_t) -> bool {
    (r as i32) >= 0 && (r as i32) <= M2N_ERR_STREAM as i32
}

/// Checks a result against the set a call may return, and that failures
/// carry a message.
fn expect(what: &str, comm: *const m2n_comm_t, got: m2n_result_t, allowed: &[m2n_result_t]) {
    assert!(
        ok_code(got),
        "{what}: code {} is no m2n_result_t",
        got as i32
    );
    assert_ne!(
        got,
        M2N_ERR_INTERNAL,
        "{what}: internal error: {}",
        last_error(comm)
    );
    assert!(
        allowed.contains(&got),
        "{what}: got {got:?} ({}), allowed {allowed:?}",
        last_error(comm)
    );
    if got != R && got != M2N_AGAIN {
        assert!(
            !last_error(comm).is_empty(),
            "{what}: {got:?} without a message"
        );
    }
}

fn last_error(comm: *const m2n_comm_t) -> String {
    let p = m2n_comm_get_last_error(comm);
    assert!(!p.is_null(), "m2n_comm_get_last_error returned NULL");
    // SAFETY: the library returns a NUL-terminated string that stays valid
    // until the next call on this thread or communicator.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

impl Group {
    fn new() -> Group {
        // SAFETY: plain C structs; zero is a valid bit pattern for both.
        let mut id: m2n_unique_id_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut cfg: m2n_config_t = unsafe { std::mem::zeroed() };
        assert_eq!(
            m2n_get_unique_id(&mut id),
            R,
            "{}",
            last_error(std::ptr::null())
        );
        assert_eq!(
            m2n_config_init(&mut cfg, std::mem::size_of::<m2n_config_t>()),
            R
        );
        cfg.transport = m2n_transport_t::M2N_TRANSPORT_SHM as u32;
        cfg.dispatch_slot_bytes = SLOT as u64;
        cfg.combine_slot_bytes = SLOT as u64;
        cfg.dispatch_depth = 2;
        cfg.combine_depth = 2;
        cfg.peer_timeout_ms = 2000;
        cfg.bootstrap_timeout_ms = 20_000;
        cfg.apply_env = 0;
        let expert = std::thread::spawn(move || {
            let mut c = std::ptr::null_mut();
            let r = m2n_comm_init(&mut c, 1, 0, 1, 1, &id, &cfg);
            (r, c as usize, last_error(std::ptr::null()))
        });
        GROUPS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut a = std::ptr::null_mut();
        let r = m2n_comm_init(&mut a, 0, 0, 1, 1, &id, &cfg);
        assert_eq!(r, R, "attention init: {}", last_error(std::ptr::null()));
        let (r, e, msg) = expert.join().expect("expert init thread");
        assert_eq!(r, R, "expert init: {msg}");
        Group {
            comms: [a, e as *mut m2n_comm_t],
            life: [Life::Live; 2],
            bufs: Vec::new(),
            freed_mems: Vec::new(),
            held: Vec::new(),
            freed_rounds: Vec::new(),
            dead_comms: Vec::new(),
            in_flight: Default::default(),
            next_send: [0; 2],
            next_recv: [0; 2],
            owned: Vec::new(),
            proxy: [false; 2],
        }
    }

    fn healthy(&self) -> bool {
        self.life == [Life::Live; 2]
    }

    /// What a call on communicator `c` must return before any other check.
    fn gate(&self, c: usize) -> Option<m2n_result_t> {
        match self.life[c] {
            Life::Live => None,
            Life::Aborted => Some(M2N_ERR_ABORTED),
            Life::Destroyed => Some(M2N_ERR_INVALID_USAGE),
        }
    }

    /// The failures a live communicator may see from its peer's state.
    fn peer_failures(&self, c: usize) -> &'static [m2n_result_t] {
        if self.life[1 - c] == Life::Live {
            &[]
        } else {
            &[M2N_ERR_PEER_LOST]
        }
    }

    fn allowed(&self, c: usize, normal: &[m2n_result_t]) -> Vec<m2n_result_t> {
        match self.gate(c) {
            Some(code) => vec![code],
            None => normal
                .iter()
                .chain(self.peer_failures(c))
                .copied()
                .collect(),
        }
    }

    /// Checks one round handed out on `c` and records it as held.
    fn took(&mut self, c: usize, round: *mut m2n_round_t) {
        assert!(!round.is_null(), "a round handed out as NULL");
        let comm = self.comms[c];
        let mut number = u64::MAX;
        expect(
            "round_number",
            comm,
            m2n_round_number(comm, round, &mut number),
            &[R],
        );
        assert_eq!(number, self.next_recv[c], "rounds arrive in order");
        self.next_recv[c] += 1;
        let want = self.in_flight[1 - c]
            .remove(&number)
            .unwrap_or_else(|| panic!("round {number} arrived but was never posted"));
        let mut data: *const c_void = std::ptr::null();
        let mut len = usize::MAX;
        expect(
            "round_data",
            comm,
            m2n_round_data(comm, round, 0, &mut data, &mut len),
            &[R],
        );
        assert_eq!(len, want.len(), "round {number}: length");
        if len > 0 {
            // SAFETY: valid for `len` bytes until the round is released.
            let got = unsafe { std::slice::from_raw_parts(data.cast::<u8>(), len) };
            assert_eq!(got, &want[..], "round {number}: bytes");
        }
        self.held.push((c, round, number));
        DELIVERED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Ends an input: releases every held round and, while both ranks
    /// live, polls until every posted round has arrived.
    fn drain(&mut self) {
        for (c, round, _) in std::mem::take(&mut self.held) {
            if self.life[c] == Life::Live {
                let r = m2n_round_release(self.comms[c], round);
                let allowed = self.allowed(c, &[R]);
                expect("release (drain)", self.comms[c], r, &allowed);
            }
        }
        if !self.healthy() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.in_flight.iter().any(|m| !m.is_empty()) {
            assert!(
                Instant::now() < deadline,
                "posted rounds never arrived: {:?} / {:?}",
                self.in_flight[0].keys().collect::<Vec<_>>(),
                self.in_flight[1].keys().collect::<Vec<_>>()
            );
            for c in 0..2 {
                let comm = self.comms[c];
                expect("progress (drain)", comm, m2n_progress(comm), &[R]);
                let mut round = std::ptr::null_mut();
                let r = m2n_test_recv(comm, &mut round);
                expect("test_recv (drain)", comm, r, &[R, M2N_AGAIN]);
                if r == R {
                    self.took(c, round);
                    let (_, round, _) = self.held.pop().unwrap();
                    expect(
                        "release (drain)",
                        comm,
                        m2n_round_release(comm, round),
                        &[R],
                    );
                }
            }
            std::thread::yield_now();
        }
        // Bounded state across inputs.
        while self.bufs.len() > 32 {
            let b = self.bufs.remove(0);
            let comm = self.comms[b.comm];
            expect("dereg (trim)", comm, m2n_dereg_mem(comm, b.mem), &[R]);
        }
        self.freed_mems.truncate(16);
        self.freed_rounds.truncate(16);
    }

    fn teardown(&mut self) {
        for c in 0..2 {
            if self.life[c] != Life::Destroyed {
                expect(
                    "destroy",
                    self.comms[c],
                    m2n_comm_destroy(self.comms[c]),
                    &[R],
                );
            }
        }
    }
}

/// Reads the input a byte at a time (zeros once it runs out).
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from(self.byte()) | u16::from(self.byte()) << 8
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> Option<T> {
        if from.is_empty() {
            None
        } else {
            Some(from[self.byte() as usize % from.len()])
        }
    }
}

static GROUP: Mutex<Option<Group>> = Mutex::new(None);
/// Rounds checked on arrival and groups built, over the process's life.
static DELIVERED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static GROUPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One fuzz input: a sequence of calls.
pub fn c_api(data: &[u8]) {
    let mut slot = GROUP.lock().unwrap_or_else(|p| p.into_inner());
    let g = slot.get_or_insert_with(Group::new);
    let mut inp = Input(data);
    let mut steps = 0;
    while !inp.0.is_empty() && steps < 64 {
        steps += 1;
        step(g, &mut inp);
    }
    g.drain();
    if !g.healthy() {
        g.teardown();
        *slot = None;
    }
}

/// A communicator argument: one of the two (mostly), NULL, forged or
/// destroyed. Forged handles (0x...8) are never 16-aligned, so they can
/// never equal a real one (the library's handles are).
enum Who {
    Comm(usize),
    Null,
    Bogus(*mut m2n_comm_t),
}

fn who(g: &Group, inp: &mut Input) -> Who {
    match inp.byte() % 8 {
        0..=2 => Who::Comm(0),
        3..=5 => Who::Comm(1),
        6 => Who::Null,
        _ => Who::Bogus(inp.pick(&g.dead_comms).unwrap_or(0x7778 as *mut m2n_comm_t)),
    }
}

fn step(g: &mut Group, inp: &mut Input) {
    let op = inp.byte() % 16;
    let target = who(g, inp);
    let (c, comm) = match target {
        Who::Comm(c) => (Some(c), g.comms[c]),
        Who::Null => (None, std::ptr::null_mut()),
        Who::Bogus(h) => (None, h),
    };
    // Calls on a NULL or bogus communicator fail the same way whatever the call.
    let bad_handle = if comm.is_null() {
        Some(M2N_ERR_INVALID_ARGUMENT)
    } else if c.is_none() {
        Some(M2N_ERR_INVALID_USAGE)
    } else {
        None
    };
    let allowed = |g: &Group, normal: &[m2n_result_t]| -> Vec<m2n_result_t> {
        match (bad_handle, c) {
            (Some(code), _) => vec![code],
            (None, Some(c)) => g.allowed(c, normal),
            (None, None) => unreachable!(),
        }
    };
    match op {
        0 => match inp.byte() % 4 {
            0 => {
                let r = m2n_progress(comm);
                expect("progress", comm, r, &allowed(g, &[R]));
            }
            1 => {
                // A proxy thread driving progress while the calls go on.
                let r = m2n_comm_start_proxy(comm);
                let normal: &[m2n_result_t] = match c {
                    Some(c) if g.proxy[c] => &[R, M2N_ERR_INVALID_USAGE],
                    _ => &[R],
                };
                expect("start_proxy", comm, r, &allowed(g, normal));
                if let (R, Some(c)) = (r, c) {
                    g.proxy[c] = true;
                }
            }
            2 => {
                let r = m2n_comm_stop_proxy(comm);
                let want: Vec<m2n_result_t> = match (bad_handle, c) {
                    (Some(code), _) => vec![code],
                    (None, Some(c)) if g.life[c] == Life::Destroyed => vec![M2N_ERR_INVALID_USAGE],
                    // It returns what it stopped on, if it stopped itself.
                    (None, Some(c)) if g.proxy[c] => [R, M2N_ERR_ABORTED]
                        .iter()
                        .chain(g.peer_failures(c))
                        .copied()
                        .collect(),
                    _ => vec![M2N_ERR_INVALID_USAGE],
                };
                expect("stop_proxy", comm, r, &want);
                if let Some(c) = c {
                    g.proxy[c] = false;
                }
            }
            _ => {
                // Stream-ordered calls: no CUDA stream can exist here, so
                // they are refused after the handle and argument checks.
                let mut out = std::ptr::null_mut();
                let r = m2n_recv_stream(comm, std::ptr::null_mut(), &mut out);
                expect("recv_stream", comm, r, &allowed(g, &[M2N_ERR_STREAM]));
                assert!(out.is_null(), "a refused recv_stream handed out a round");
                let mut round = 0;
                let r =
                    m2n_send_stream(comm, std::ptr::null(), 0, std::ptr::null_mut(), &mut round);
                expect("send_stream", comm, r, &allowed(g, &[M2N_ERR_STREAM]));
                // Stream modes: a bad side or mode is named before the
                // stream is touched; good ones need a stream; the mode
                // stays sequence.
                for side in -1..3 {
                    for mode in -1..3 {
                        let r = m2n_set_stream_mode(comm, side, mode, std::ptr::null_mut());
                        let want = if (0..2).contains(&side) && (0..2).contains(&mode) {
                            M2N_ERR_STREAM
                        } else {
                            M2N_ERR_INVALID_ARGUMENT
                        };
                        expect("set_stream_mode", comm, r, &allowed(g, &[want]));
                    }
                    let mut mode = -1;
                    let r = m2n_get_stream_mode(comm, side, &mut mode);
                    let want = if (0..2).contains(&side) {
                        R
                    } else {
                        M2N_ERR_INVALID_ARGUMENT
                    };
                    expect("get_stream_mode", comm, r, &allowed(g, &[want]));
                    if r == R {
                        assert_eq!(mode, m2n_stream_mode_t::M2N_STREAM_SEQUENCE as c_int);
                    }
                }
            }
        },
        1 | 2 => {
            // Registered memory: m2n's own (1) or the application's (2).
            let size = inp.u16() as usize % 1024;
            let fill = inp.byte();
            let mut mem = std::ptr::null_mut();
            let r = if op == 1 {
                let mut ptr = std::ptr::null_mut();
                let r = m2n_mem_alloc(comm, size, &mut mem, &mut ptr);
                if r == R {
                    // SAFETY: m2n_mem_alloc handed out `size` writable bytes.
                    let s = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u8>(), size) };
                    pattern(s, fill);
                }
                r
            } else {
                let mut owned = vec![0u8; size].into_boxed_slice();
                pattern(&mut owned, fill);
                let ptr = if inp.byte() == 0 && size > 0 {
                    std::ptr::null_mut()
                } else {
                    owned.as_mut_ptr().cast()
                };
                let r = m2n_reg_mem(comm, ptr, size, &mut mem);
                g.owned.push(owned);
                if ptr.is_null() && bad_handle.is_none() && c.is_some_and(|c| g.gate(c).is_none()) {
                    expect("reg_mem NULL", comm, r, &[M2N_ERR_INVALID_ARGUMENT]);
                    return;
                }
                r
            };
            expect("mem alloc/reg", comm, r, &allowed(g, &[R]));
            if r == R {
                let c = c.unwrap();
                let bytes = if op == 1 {
                    let mut v = vec![0; size];
                    pattern(&mut v, fill);
                    v
                } else {
                    g.owned.last().unwrap().to_vec()
                };
                g.bufs.push(Buf {
                    comm: c,
                    mem,
                    bytes,
                });
            }
        }
        3 => {
            // Deregister a live buffer, a freed one, or another rank's.
            let choice = inp.byte() % 4;
            let (mem, valid) = match (choice, c) {
                (0 | 1, Some(c)) if g.bufs.iter().any(|b| b.comm == c) => {
                    let mine: Vec<usize> =
                        (0..g.bufs.len()).filter(|&i| g.bufs[i].comm == c).collect();
                    let i = inp.pick(&mine).unwrap();
                    (g.bufs[i].mem, Some(i))
                }
                (2, _) if !g.bufs.is_empty() => {
                    let i = inp.byte() as usize % g.bufs.len();
                    let mine = Some(g.bufs[i].comm) == c;
                    (g.bufs[i].mem, mine.then_some(i))
                }
                _ => (
                    inp.pick(&g.freed_mems)
                        .map(|m| m.1)
                        .unwrap_or(0x1238 as *mut m2n_mem_t),
                    None,
                ),
            };
            let r = m2n_dereg_mem(comm, mem);
            let normal = if valid.is_some() {
                R
            } else {
                M2N_ERR_INVALID_USAGE
            };
            expect("dereg_mem", comm, r, &allowed(g, &[normal]));
            if r == R {
                let b = g.bufs.remove(valid.unwrap());
                g.freed_mems.push((b.comm, b.mem));
            }
        }
        4 | 5 => send(g, inp, c, comm, bad_handle),
        6 | 7 => {
            // test_send / wait_send of a posted, unposted or absurd round.
            let round = match inp.byte() % 3 {
                0 => u64::from(inp.byte()),
                1 => c.map_or(0, |c| g.next_send[c].saturating_sub(1)),
                _ => u64::MAX - u64::from(inp.byte()),
            };
            let posted = c.is_some_and(|c| round < g.next_send[c]);
            let (r, normal): (_, &[m2n_result_t]) = if op == 6 {
                let mut done = -1;
                let r = m2n_test_send(comm, round, &mut done);
                if r == R {
                    assert!(done == 0 || done == 1, "test_send done = {done}");
                }
                (
                    r,
                    if posted {
                        &[R]
                    } else {
                        &[M2N_ERR_INVALID_ARGUMENT]
                    },
                )
            } else {
                let ms = c_int::from(inp.byte() % 3);
                let r = m2n_wait_send(comm, round, ms);
                (
                    r,
                    if posted {
                        &[R, M2N_ERR_TIMEOUT]
                    } else {
                        &[M2N_ERR_INVALID_ARGUMENT]
                    },
                )
            };
            expect("test/wait_send", comm, r, &allowed(g, normal));
        }
        8 | 9 => {
            let mut round = 0x9990 as *mut m2n_round_t;
            let r = if op == 8 {
                m2n_test_recv(comm, &mut round)
            } else {
                m2n_wait_recv(comm, c_int::from(inp.byte() % 3), &mut round)
            };
            let normal: &[m2n_result_t] = if op == 8 {
                &[R, M2N_AGAIN]
            } else {
                &[R, M2N_ERR_TIMEOUT]
            };
            expect("test/wait_recv", comm, r, &allowed(g, normal));
            if r == M2N_AGAIN {
                assert!(round.is_null(), "M2N_AGAIN with a round");
            }
            if r == R {
                g.took(c.unwrap(), round);
            }
        }
        10..=12 => {
            // round_number / round_data / release of a held, released,
            // foreign or forged round.
            let pick = inp.byte() % 4;
            let (round, mine) = match pick {
                0 | 1 if !g.held.is_empty() => {
                    let i = inp.byte() as usize % g.held.len();
                    (g.held[i].1, (Some(g.held[i].0) == c).then_some(i))
                }
                2 => (
                    inp.pick(&g.freed_rounds)
                        .map(|r| r.1)
                        .unwrap_or(0x5558 as *mut m2n_round_t),
                    None,
                ),
                _ => (0x5558 as *mut m2n_round_t, None),
            };
            let usage = if mine.is_some() {
                R
            } else {
                M2N_ERR_INVALID_USAGE
            };
            match op {
                10 => {
                    let mut n = 0;
                    let r = m2n_round_number(comm, round, &mut n);
                    expect("round_number", comm, r, &allowed(g, &[usage]));
                    if r == R {
                        assert_eq!(n, g.held[mine.unwrap()].2, "round_number");
                    }
                }
                11 => {
                    let sender = c_int::from(inp.byte() as i8) % 3;
                    let mut data = std::ptr::null();
                    let mut len = 0;
                    let r = m2n_round_data(comm, round, sender, &mut data, &mut len);
                    let normal = if usage == R && sender != 0 {
                        M2N_ERR_INVALID_ARGUMENT
                    } else {
                        usage
                    };
                    expect("round_data", comm, r, &allowed(g, &[normal]));
                }
                _ => {
                    let r = m2n_round_release(comm, round);
                    expect("round_release", comm, r, &allowed(g, &[usage]));
                    if r == R {
                        let (cc, round, _) = g.held.remove(mine.unwrap());
                        g.freed_rounds.push((cc, round));
                    }
                }
            }
        }
        13 => {
            let p = m2n_comm_get_last_error(comm);
            assert!(!p.is_null());
            let text = last_error(comm);
            assert!(text.len() < 1 << 16);
        }
        14 => {
            // Library-wide calls with random arguments.
            let mut text: Vec<u8> = (0..inp.byte() % 48).map(|_| inp.byte()).collect();
            text.retain(|&b| b != 0);
            text.push(0);
            // SAFETY: plain C struct.
            let mut id: m2n_unique_id_t = unsafe { std::mem::zeroed() };
            let r = m2n_unique_id_from_string(text.as_ptr().cast(), &mut id);
            expect(
                "unique_id_from_string",
                std::ptr::null(),
                r,
                &[R, M2N_ERR_INVALID_ARGUMENT],
            );
            let size = inp.byte() as usize;
            // SAFETY: plain C struct.
            let mut cfg: m2n_config_t = unsafe { std::mem::zeroed() };
            let r = m2n_config_init(&mut cfg, size);
            let want = if size == std::mem::size_of::<m2n_config_t>() {
                R
            } else {
                M2N_ERR_INVALID_ARGUMENT
            };
            expect("config_init", std::ptr::null(), r, &[want]);
            // comm_init with arguments that can never join (it would block
            // on the rendezvous otherwise).
            let role = c_int::from(inp.byte() as i8);
            let rank = c_int::from(inp.byte() as i8);
            if !(0..=1).contains(&role) || !(0..1).contains(&rank) {
                let mut out = std::ptr::null_mut();
                let r = m2n_comm_init(&mut out, role, rank, 1, 1, &id, std::ptr::null());
                expect(
                    "comm_init",
                    std::ptr::null(),
                    r,
                    &[M2N_ERR_INVALID_ARGUMENT, M2N_ERR_CONFIG],
                );
                assert!(out.is_null(), "comm_init failed but set a handle");
            }
            let mut s = 0;
            let r = m2n_get_version(&mut s, std::ptr::null_mut(), &mut s);
            expect(
                "get_version",
                std::ptr::null(),
                r,
                &[M2N_ERR_INVALID_ARGUMENT, R],
            );
            let text = m2n_get_error_string(c_int::from(inp.byte() as i8));
            assert!(!text.is_null());
        }
        _ => {
            // Abort or destroy (rare: the group is rebuilt afterwards).
            if !inp.byte().is_multiple_of(4) {
                return;
            }
            let destroy = inp.byte().is_multiple_of(2);
            let r = if destroy {
                m2n_comm_destroy(comm)
            } else {
                m2n_comm_abort(comm)
            };
            let normal = match (bad_handle, c) {
                (Some(code), _) => code,
                (None, Some(c)) if destroy => {
                    if g.life[c] == Life::Destroyed {
                        M2N_ERR_INVALID_USAGE
                    } else {
                        R
                    }
                }
                // Aborting again is harmless (it succeeds).
                (None, Some(c)) if g.life[c] == Life::Aborted => R,
                (None, Some(c)) => g.gate(c).unwrap_or(R),
                _ => unreachable!(),
            };
            expect("abort/destroy", comm, r, &[normal]);
            if let (R, Some(c)) = (r, c) {
                if destroy {
                    g.life[c] = Life::Destroyed;
                    g.proxy[c] = false;
                    g.dead_comms.push(comm);
                    g.bufs.retain(|b| b.comm != c);
                } else {
                    g.life[c] = Life::Aborted;
                }
                g.held.retain(|h| h.0 != c);
            }
        }
    }
}

/// Posts a round from a random message: a valid one, one outside its
/// buffer or over the slot size, another rank's buffer, a freed or forged
/// one, NULL, or the wrong count.
fn send(
    g: &mut Group,
    inp: &mut Input,
    c: Option<usize>,
    comm: *mut m2n_comm_t,
    bad_handle: Option<m2n_result_t>,
) {
    let kind = inp.byte() % 8;
    let mine: Vec<usize> = (0..g.bufs.len())
        .filter(|&i| Some(g.bufs[i].comm) == c)
        .collect();
    let mut buf = None;
    let mut normal = M2N_ERR_INVALID_USAGE;
    let msg = match kind {
        0..=3 if !mine.is_empty() => {
            let i = inp.pick(&mine).unwrap();
            let b = &g.bufs[i];
            let len_cap = b.bytes.len() + 8;
            let offset = inp.byte() as usize % len_cap;
            let len = inp.u16() as usize % (len_cap.min(SLOT + 8) + 1);
            if offset + len <= b.bytes.len() && len <= SLOT {
                buf = Some(b.bytes[offset..offset + len].to_vec());
                normal = R;
            } else {
                normal = M2N_ERR_INVALID_ARGUMENT;
            }
            m2n_msg_t {
                mem: b.mem,
                offset,
                len,
            }
        }
        4 if !g.bufs.is_empty() => {
            let i = inp.byte() as usize % g.bufs.len();
            if Some(g.bufs[i].comm) == c {
                return;
            }
            m2n_msg_t {
                mem: g.bufs[i].mem,
                offset: 0,
                len: 1,
            }
        }
        5 => {
            let len = usize::from(inp.byte() % 2);
            if len == 0 {
                buf = Some(Vec::new());
                normal = R;
            } else {
                normal = M2N_ERR_INVALID_ARGUMENT;
            }
            m2n_msg_t {
                mem: std::ptr::null(),
                offset: 0,
                len,
            }
        }
        _ => m2n_msg_t {
            mem: inp
                .pick(&g.freed_mems)
                .map_or(0x1238 as *const m2n_mem_t, |m| m.1),
            offset: 0,
            len: 1,
        },
    };
    let msgs = [msg, msg];
    // A wrong count is refused; with two messages, a bad buffer in the
    // first may be named first.
    let mut also = None;
    let count = match inp.byte() % 16 {
        0 => {
            also = (normal != R).then_some(normal);
            normal = M2N_ERR_INVALID_ARGUMENT;
            buf = None;
            2
        }
        1 => {
            normal = M2N_ERR_INVALID_ARGUMENT;
            buf = None;
            0
        }
        _ => 1,
    };
    let ms = c_int::from(inp.byte() % 3);
    let mut round = u64::MAX;
    let r = m2n_send(comm, msgs.as_ptr(), count, ms, &mut round);
    let gate = bad_handle.or_else(|| c.and_then(|c| g.gate(c)));
    let allowed: Vec<m2n_result_t> = if let Some(code) = gate {
        vec![code]
    } else {
        let c = c.expect("a live communicator");
        let mut v = vec![normal];
        v.extend(also);
        if normal == R {
            v.push(if ms == 0 { M2N_AGAIN } else { M2N_ERR_TIMEOUT });
        }
        v.extend_from_slice(g.peer_failures(c));
        v
    };
    expect("send", comm, r, &allowed);
    if r == R {
        let c = c.unwrap();
        assert_eq!(round, g.next_send[c], "rounds are numbered in order");
        g.next_send[c] += 1;
        g.in_flight[c].insert(round, buf.expect("a posted round has its bytes"));
    }
}

fn pattern(s: &mut [u8], fill: u8) {
    for (i, b) in s.iter_mut().enumerate() {
        *b = fill.wrapping_add((i as u8).wrapping_mul(31)) ^ (i >> 8) as u8;
    }
}

/// Seed inputs for `m2n/fuzz/corpus/c_api`: a clean exchange both ways,
/// misuse, and an abort.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        // alloc on attention (op 1, comm 0, 64 bytes, fill 9), alloc on
        // expert, send attention->expert and back, receive both, release.
        (
            "exchange",
            vec![
                1, 0, 64, 0, 9, //
                1, 3, 32, 0, 7, //
                4, 0, 0, 0, 0, 16, 0, 2, 1, //
                4, 3, 0, 0, 4, 8, 0, 2, 1, //
                9, 3, 2, //
                9, 0, 2, //
                12, 0, 0, 0, //
                12, 3, 0, 0, //
            ],
        ),
        (
            "misuse",
            vec![
                2, 0, 16, 0, 3, 1, //
                4, 0, 0, 0, 200, 0, 1, 2, 0, //
                4, 3, 4, 0, 2, 1, //
                3, 0, 0, 0, 3, 0, 0, 0, //
                4, 0, 6, 0, 2, 0, //
                12, 6, 2, 10, 0, 3, 0, 11, 0, 2, 0, 7, //
                6, 0, 2, 1, 7, 3, 0, 0, 1, //
                14, 7, 10, b'm', b'2', b'n', b'1', b'@', b'x', b'#', b'1', b'2', b'3', 200, 5, 3,
                4, 9,
            ],
        ),
        (
            // A proxy thread drives the expert (op 0 sub 1) while the
            // exchange above runs; stream calls refused (sub 3); stop (sub 2).
            "proxy",
            vec![
                0, 3, 1, //
                1, 0, 64, 0, 9, //
                1, 3, 32, 0, 7, //
                4, 0, 0, 0, 0, 16, 0, 2, 1, //
                4, 3, 0, 0, 4, 8, 0, 2, 1, //
                0, 3, 3, //
                0, 0, 3, //
                9, 3, 2, //
                9, 0, 2, //
                0, 3, 2, //
                0, 3, 2, //
            ],
        ),
        (
            "abort",
            vec![
                1, 0, 8, 0, 1, //
                4, 0, 0, 0, 0, 8, 0, 2, 1, //
                15, 3, 0, 1, //
                8, 3, 9, 0, 2, 0, 0, 1, //
                15, 0, 0, 0,
            ],
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed corpus in `m2n/fuzz/corpus/c_api` is what `seeds()` makes
    /// (M2N_BLESS=1 rewrites it), and the driver runs cleanly on each seed
    /// and on a stream of pseudo-random inputs.
    #[test]
    fn the_c_api_driver_runs_its_seeds_and_random_inputs() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../m2n/fuzz/corpus/c_api");
        for (name, bytes) in seeds() {
            let before = GROUP.lock().unwrap().as_ref().map(|g| g.next_recv);
            let path = dir.join(name);
            if std::env::var_os("M2N_BLESS").is_some() {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            }
            let on_disk = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (M2N_BLESS=1 writes it)", path.display()));
            assert_eq!(on_disk, bytes, "{} is stale (M2N_BLESS=1)", path.display());
            c_api(&bytes);
            if name == "exchange" {
                // The driver is no no-op: each side received a round.
                let slot = GROUP.lock().unwrap();
                let after = slot.as_ref().expect("a healthy group").next_recv;
                let before = before.unwrap_or([0, 0]);
                assert!(after[0] > before[0] && after[1] > before[1], "{after:?}");
            }
        }
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..300 {
            let input: Vec<u8> = (0..96)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            c_api(&input);
        }
        // The random inputs reach deep: rounds arrive and are checked, and
        // some inputs abort or destroy a rank (the group is rebuilt).
        let delivered = DELIVERED.load(std::sync::atomic::Ordering::Relaxed);
        let groups = GROUPS.load(std::sync::atomic::Ordering::Relaxed);
        let count = |dir: &str| std::fs::read_dir(dir).map_or(0, |d| d.count());
        let (threads, fds) = (count("/proc/self/task"), count("/proc/self/fd"));
        eprintln!(
            "c_api driver: {delivered} rounds checked, {groups} groups; {threads} threads, {fds} descriptors left"
        );
        assert!(
            delivered > 50 && groups > 2,
            "{delivered} rounds, {groups} groups"
        );
        // Destroyed groups leave nothing behind (one group is alive).
        assert!(
            threads < 10 && fds < 64,
            "{threads} threads, {fds} descriptors"
        );
    }
}
