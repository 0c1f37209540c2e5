//! Rendezvous: every rank meets at a root, proves the secret, all-gathers
//! transport descriptors, and passes a barrier.
//!
//! ```text
//! rank -> root   Hello { secret, role, rank, shape, payload }
//! root -> rank   AllGather [payload of every global rank]   (or Reject)
//! rank -> root   Contribute payload                          (any number of
//! root -> rank   AllGather [payload of every global rank]     further rounds)
//! rank -> root   Ready
//! root -> rank   Go                                          (or Reject)
//! ```
//!
//! The root is any process holding a [`Root`] (a launcher, or rank 0 in a
//! thread, as NCCL does). Wrong secrets are turned away without disturbing
//! the group; a duplicate rank, a rank out of range or a mismatched shape
//! fails the whole group with a message naming both sides; every wait has a
//! deadline.

#[cfg(feature = "mpi")]
pub mod mpi;
mod uid;
mod wire;

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use thiserror::Error;

pub use uid::{UniqueId, SECRET_BYTES};

pub(crate) mod gate;

/// For the fuzz targets: decode a frame body.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn fuzz_decode(body: &[u8]) -> Result<wire::Frame, crate::codec::DecodeError> {
    wire::Frame::decode(body)
}

/// Seed frames for the fuzz corpus: (name, frame body).
#[cfg(test)]
pub(crate) fn fuzz_examples(role: Role, shape: Shape) -> Vec<(&'static str, Vec<u8>)> {
    let body = |f: wire::Frame| f.encode()[4..].to_vec();
    vec![
        (
            "hello",
            body(wire::Frame::Hello {
                version: wire::VERSION,
                secret: [7; SECRET_BYTES],
                role,
                rank: 1,
                shape,
                payload: vec![1, 2, 3, 4],
            }),
        ),
        ("reject", body(wire::Frame::Reject("wrong secret".into()))),
        (
            "all-gather",
            body(wire::Frame::AllGather(vec![
                vec![1, 2],
                vec![],
                vec![3; 20],
            ])),
        ),
        ("ready", body(wire::Frame::Ready)),
        ("go", body(wire::Frame::Go)),
        ("contribute", body(wire::Frame::Contribute(vec![5; 9]))),
    ]
}

/// For the fuzz targets: a frame survives encoding and decoding unchanged.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn fuzz_round_trip(f: &wire::Frame) {
    let bytes = f.encode();
    let back = wire::recv(&mut &bytes[..]).expect("an encoded frame decodes");
    assert_eq!(&back, f, "a frame changed through encode and decode");
}
use wire::Frame;

use crate::group::{Peer, Role, Shape};

/// Errors of the rendezvous.
#[derive(Debug, Error)]
pub enum BootstrapError {
    #[error("bootstrap {op}: {source}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("bootstrap root rejected this rank: {0}")]
    Rejected(String),
    #[error("bootstrap timed out: {0}")]
    Timeout(String),
    #[error("bootstrap group is invalid: {0}")]
    Group(String),
}

fn io_err(op: impl Into<String>) -> impl FnOnce(io::Error) -> BootstrapError {
    let op = op.into();
    move |source| BootstrapError::Io { op, source }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

pub use crate::secret::random_secret;

/// The rendezvous point of one group.
#[derive(Debug)]
pub struct Root {
    listener: TcpListener,
    uid: UniqueId,
}

struct Joined {
    stream: TcpStream,
    peer: Peer,
    payload: Vec<u8>,
}

impl Root {
    /// Listens on `addr` (port 0 picks one) with a fresh secret.
    pub fn bind(addr: SocketAddr) -> Result<Self, BootstrapError> {
        let listener = TcpListener::bind(addr).map_err(io_err(format!("bind {addr}")))?;
        let root = listener.local_addr().map_err(io_err("local_addr"))?;
        let secret = random_secret().map_err(io_err("random secret"))?;
        Ok(Self {
            listener,
            uid: UniqueId { root, secret },
        })
    }

    /// Listens at the address of an id made beforehand, keeping its secret:
    /// a launcher can print an id (address and a fresh secret), hand it to
    /// every rank, and let the rank on that host serve it.
    pub fn bind_id(uid: &UniqueId) -> Result<Self, BootstrapError> {
        let listener = TcpListener::bind(uid.root).map_err(io_err(format!("bind {}", uid.root)))?;
        let root = listener.local_addr().map_err(io_err("local_addr"))?;
        Ok(Self {
            listener,
            uid: UniqueId {
                root,
                secret: uid.secret,
            },
        })
    }

    pub fn unique_id(&self) -> &UniqueId {
        &self.uid
    }

    /// Serves the rendezvous in a background thread.
    pub fn spawn(self, timeout: Duration) -> JoinHandle<Result<(), BootstrapError>> {
        std::thread::Builder::new()
            .name("m2n-bootstrap-root".into())
            .spawn(move || self.serve(timeout))
            .expect("spawn bootstrap root thread")
    }

    /// Runs one rendezvous to completion (everyone passed the barrier) or
    /// failure (everyone connected is told why).
    pub fn serve(self, timeout: Duration) -> Result<(), BootstrapError> {
        let deadline = Instant::now() + timeout;
        let mut joined: Vec<Joined> = Vec::new();
        let result = self.gather(deadline, &mut joined).and_then(|shape| {
            joined.sort_by_key(|j| shape.global(j.peer.role, j.peer.rank));
            let mut payloads: Vec<Vec<u8>> = joined
                .iter_mut()
                .map(|j| std::mem::take(&mut j.payload))
                .collect();
            // Any number of all-gathers, then the barrier; every rank must
            // take the same steps.
            loop {
                let all = Frame::AllGather(payloads);
                for j in &mut joined {
                    wire::send(&mut j.stream, &all)
                        .map_err(io_err(format!("all-gather to {}", j.peer)))?;
                }
                let mut next = Vec::with_capacity(joined.len());
                let mut ready = 0;
                for j in &mut joined {
                    let late = || {
                        BootstrapError::Timeout(format!(
                            "{} did not take its next bootstrap step in time",
                            j.peer
                        ))
                    };
                    let left = remaining(deadline).ok_or_else(late)?;
                    j.stream
                        .set_read_timeout(Some(left))
                        .map_err(io_err("set_read_timeout"))?;
                    match wire::recv(&mut j.stream) {
                        Ok(Frame::Ready) => ready += 1,
                        Ok(Frame::Contribute(p)) => next.push(p),
                        Ok(other) => {
                            return Err(BootstrapError::Group(format!("{} sent {other:?}", j.peer)))
                        }
                        Err(e) if is_timeout(&e) => return Err(late()),
                        Err(e) => {
                            return Err(BootstrapError::Group(format!(
                                "{} left during the bootstrap: {e}",
                                j.peer
                            )))
                        }
                    }
                }
                if ready == joined.len() {
                    break;
                }
                if ready > 0 {
                    return Err(BootstrapError::Group(format!(
                        "{ready} ranks reached the barrier while {} started another all-gather",
                        next.len()
                    )));
                }
                payloads = next;
            }
            for j in &mut joined {
                // A rank that exits right after Go is not our problem.
                let _ = wire::send(&mut j.stream, &Frame::Go);
            }
            Ok(())
        });
        if let Err(e) = &result {
            let why = Frame::Reject(e.to_string());
            for j in &mut joined {
                let _ = wire::send(&mut j.stream, &why);
            }
        }
        result
    }

    /// Accepts hellos until the whole group is in; returns its shape.
    fn gather(&self, deadline: Instant, joined: &mut Vec<Joined>) -> Result<Shape, BootstrapError> {
        self.listener
            .set_nonblocking(true)
            .map_err(io_err("set_nonblocking"))?;
        let mut shape: Option<(Shape, Peer)> = None;
        let mut gate: gate::Gate<Frame> = gate::Gate::new();
        loop {
            if let Some((s, _)) = shape {
                if joined.len() == s.world() {
                    return Ok(s);
                }
            }
            let Some(left) = remaining(deadline) else {
                let missing = match shape {
                    Some((s, _)) => (0..s.world())
                        .map(|g| s.member(g))
                        .filter(|(role, rank)| {
                            !joined
                                .iter()
                                .any(|j| j.peer.role == *role && j.peer.rank == *rank)
                        })
                        .map(|(role, rank)| Peer { role, rank }.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    None => "every rank".into(),
                };
                return Err(BootstrapError::Timeout(format!(
                    "{} ranks joined at {}; missing: {missing}",
                    joined.len(),
                    self.uid.root
                )));
            };
            // Hellos are read concurrently, each against a short deadline:
            // silent, junk or half-sent connections never hold the group up.
            gate.accept_all(&self.listener, deadline, |r| {
                wire::recv_limited(r, wire::MAX_HELLO)
            })
            .map_err(io_err("accept"))?;
            let Some((mut stream, hello)) = gate.next(left.min(Duration::from_millis(2))) else {
                continue;
            };
            stream
                .set_read_timeout(None)
                .map_err(io_err("set_read_timeout"))?;
            let hello = match hello {
                Ok(f) => f,
                Err(e) => {
                    let _ = wire::send(
                        &mut stream,
                        &Frame::Reject(format!("unreadable hello: {e}")),
                    );
                    continue;
                }
            };
            let Frame::Hello {
                version,
                secret,
                role,
                rank,
                shape: theirs,
                payload,
            } = hello
            else {
                let _ = wire::send(&mut stream, &Frame::Reject("expected a hello".into()));
                continue;
            };
            if !crate::secret::secrets_match(&secret, &self.uid.secret) {
                let _ = wire::send(
                    &mut stream,
                    &Frame::Reject("wrong secret in unique id".into()),
                );
                continue;
            }
            if version != wire::VERSION {
                let _ = wire::send(
                    &mut stream,
                    &Frame::Reject(format!(
                        "protocol version {version}, root speaks {}",
                        wire::VERSION
                    )),
                );
                continue;
            }
            let peer = Peer {
                role,
                rank: rank as usize,
            };
            let refuse = |mut stream: TcpStream, why: String| {
                let _ = wire::send(&mut stream, &Frame::Reject(why.clone()));
                BootstrapError::Group(why)
            };
            match shape {
                None => shape = Some((theirs, peer)),
                Some((s, first)) if s != theirs => {
                    return Err(refuse(
                        stream,
                        format!("group shape mismatch: {peer} says {theirs}, {first} said {s}"),
                    ))
                }
                Some(_) => {}
            }
            let (s, _) = shape.expect("set above");
            if s.attention == 0 || s.experts == 0 {
                return Err(refuse(
                    stream,
                    format!("shape {s} needs at least one rank per side"),
                ));
            }
            if peer.rank >= s.side(role) {
                return Err(refuse(
                    stream,
                    format!(
                        "{peer} is out of range: the group has {} {role} ranks",
                        s.side(role)
                    ),
                ));
            }
            if joined.iter().any(|j| j.peer == peer) {
                return Err(refuse(
                    stream,
                    format!("duplicate rank: {peer} joined twice"),
                ));
            }
            joined.push(Joined {
                stream,
                peer,
                payload,
            });
        }
    }
}

/// A rank's view of a finished all-gather; pass the barrier to finish.
#[derive(Debug)]
pub struct Rendezvous {
    stream: TcpStream,
    /// Every rank's payload, by global rank (attention ranks first).
    pub payloads: Vec<Vec<u8>>,
    /// The local address this rank used to reach the root: an address peers
    /// can reach it at.
    pub local_ip: std::net::IpAddr,
}

/// Joins the group at `uid` as `role` `rank`, publishing `payload`.
pub fn join(
    uid: &UniqueId,
    role: Role,
    rank: usize,
    shape: Shape,
    payload: Vec<u8>,
    timeout: Duration,
) -> Result<Rendezvous, BootstrapError> {
    let deadline = Instant::now() + timeout;
    let root = uid.root;
    let mut last_err: Option<io::Error> = None;
    let mut stream = loop {
        let Some(left) = remaining(deadline) else {
            return Err(BootstrapError::Timeout(format!(
                "could not reach the root at {root} within {timeout:?}: {}",
                last_err.map_or("no answer".into(), |e| e.to_string())
            )));
        };
        match TcpStream::connect_timeout(&root, left.min(Duration::from_secs(1))) {
            Ok(s) => break s,
            Err(e) => {
                // The root may not be listening yet: launchers start everyone at once.
                last_err = Some(e);
                std::thread::sleep(Duration::from_millis(20).min(left));
            }
        }
    };
    stream.set_nodelay(true).map_err(io_err("set_nodelay"))?;
    let local_ip = stream.local_addr().map_err(io_err("local_addr"))?.ip();
    let hello = Frame::Hello {
        version: wire::VERSION,
        secret: uid.secret,
        role,
        rank: rank as u32,
        shape,
        payload,
    };
    wire::send(&mut stream, &hello).map_err(io_err(format!("hello to root {root}")))?;
    match recv_before(&mut stream, deadline, "the all-gather")? {
        Frame::AllGather(payloads) if payloads.len() == shape.world() => Ok(Rendezvous {
            stream,
            payloads,
            local_ip,
        }),
        Frame::AllGather(p) => Err(BootstrapError::Group(format!(
            "root sent {} payloads for a group of {}",
            p.len(),
            shape.world()
        ))),
        other => Err(BootstrapError::Group(format!(
            "root sent {other:?} instead of the all-gather"
        ))),
    }
}

fn recv_before(
    stream: &mut TcpStream,
    deadline: Instant,
    what: &str,
) -> Result<Frame, BootstrapError> {
    let timeout = || BootstrapError::Timeout(format!("the root did not send {what} in time"));
    let left = remaining(deadline).ok_or_else(timeout)?;
    stream
        .set_read_timeout(Some(left))
        .map_err(io_err("set_read_timeout"))?;
    match wire::recv(stream) {
        Ok(Frame::Reject(why)) => Err(BootstrapError::Rejected(why)),
        Ok(f) => Ok(f),
        Err(e) if is_timeout(&e) => Err(timeout()),
        Err(e) => Err(BootstrapError::Io {
            op: format!("waiting for {what} (did the root fail?)"),
            source: e,
        }),
    }
}

impl Rendezvous {
    /// Another all-gather: every rank's `payload`, by global rank. Every
    /// rank must call it the same number of times before the barrier.
    pub fn all_gather(
        &mut self,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>, BootstrapError> {
        let deadline = Instant::now() + timeout;
        let world = self.payloads.len();
        wire::send(&mut self.stream, &Frame::Contribute(payload)).map_err(io_err("all-gather"))?;
        match recv_before(&mut self.stream, deadline, "the all-gather")? {
            Frame::AllGather(p) if p.len() == world => Ok(p),
            other => Err(BootstrapError::Group(format!(
                "root sent {other:?} instead of the all-gather"
            ))),
        }
    }

    /// Waits until every rank has called `barrier`.
    pub fn barrier(mut self, timeout: Duration) -> Result<(), BootstrapError> {
        let deadline = Instant::now() + timeout;
        wire::send(&mut self.stream, &Frame::Ready).map_err(io_err("barrier"))?;
        match recv_before(&mut self.stream, deadline, "the barrier release")? {
            Frame::Go => Ok(()),
            other => Err(BootstrapError::Group(format!(
                "root sent {other:?} at the barrier"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local_root() -> Root {
        Root::bind("127.0.0.1:0".parse().unwrap()).unwrap()
    }

    fn spawn_join(
        uid: &UniqueId,
        role: Role,
        rank: usize,
        shape: Shape,
    ) -> std::thread::JoinHandle<Result<Vec<Vec<u8>>, BootstrapError>> {
        let uid = uid.clone();
        std::thread::spawn(move || {
            let rv = join(
                &uid,
                role,
                rank,
                shape,
                vec![rank as u8, role as u8],
                Duration::from_secs(5),
            )?;
            let p = rv.payloads.clone();
            rv.barrier(Duration::from_secs(5))?;
            Ok(p)
        })
    }

    /// Forms a 2 x 3 group (5 ranks, join timeout 5 s) at a root that
    /// already has `hostile` connections open; returns how long it took.
    fn form_with_hostile_connections(hostile: usize) -> Duration {
        use std::io::Write;
        let root = local_root();
        let uid = root.unique_id().clone();
        let served = root.spawn(Duration::from_secs(10));
        let mut bad = uid.clone();
        bad.secret[0] ^= 1;
        // Silent, junk, half a frame, and a wrong secret: kept open throughout.
        let strangers: Vec<TcpStream> = (0..hostile)
            .map(|i| {
                let mut s = TcpStream::connect(uid.root).unwrap();
                match i % 4 {
                    0 => {}
                    1 => {
                        let _ = s.write_all(&[0xA5; 4096]);
                    }
                    2 => {
                        let _ = s.write_all(&[40, 0, 0]);
                    }
                    _ => {
                        let hello = Frame::Hello {
                            version: wire::VERSION,
                            secret: bad.secret,
                            role: Role::Attention,
                            rank: 0,
                            shape: Shape::new(2, 3),
                            payload: vec![],
                        };
                        let _ = wire::send(&mut s, &hello);
                    }
                }
                s
            })
            .collect();
        let t0 = Instant::now();
        let shape = Shape::new(2, 3);
        let hs: Vec<_> = (0..2)
            .map(|r| spawn_join(&uid, Role::Attention, r, shape))
            .chain((0..3).map(|r| spawn_join(&uid, Role::Expert, r, shape)))
            .collect();
        for h in hs {
            h.join()
                .unwrap()
                .expect("the group forms despite the strangers");
        }
        let took = t0.elapsed();
        served.join().unwrap().unwrap();
        drop(strangers);
        took
    }

    #[test]
    fn strangers_cannot_stall_the_rendezvous() {
        // Each stranger used to hold the root for up to 5 s, one at a time:
        // 100 of them exceeded the joins' 5 s timeout. Now hellos are read
        // concurrently with a short deadline each, so the group forms.
        let clean = form_with_hostile_connections(0);
        let hostile = form_with_hostile_connections(100);
        println!("a 5-rank group formed in {clean:?} clean, {hostile:?} with 100 hostile connections open");
    }

    #[test]
    fn all_gather_orders_payloads_by_global_rank() {
        let root = local_root();
        let uid = root.unique_id().clone();
        let served = root.spawn(Duration::from_secs(5));
        let shape = Shape::new(1, 2);
        let hs = [
            spawn_join(&uid, Role::Expert, 1, shape),
            spawn_join(&uid, Role::Attention, 0, shape),
            spawn_join(&uid, Role::Expert, 0, shape),
        ];
        for h in hs {
            assert_eq!(
                h.join().unwrap().unwrap(),
                vec![vec![0, 0], vec![0, 1], vec![1, 1]]
            );
        }
        served.join().unwrap().unwrap();
    }

    #[test]
    fn wrong_secret_is_rejected_and_the_group_goes_on() {
        let root = local_root();
        let uid = root.unique_id().clone();
        let served = root.spawn(Duration::from_secs(5));
        let mut bad = uid.clone();
        bad.secret[0] ^= 1;
        let err = join(
            &bad,
            Role::Attention,
            0,
            Shape::new(1, 1),
            vec![],
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(err.to_string().contains("wrong secret"), "{err}");
        let a = spawn_join(&uid, Role::Attention, 0, Shape::new(1, 1));
        let e = spawn_join(&uid, Role::Expert, 0, Shape::new(1, 1));
        a.join().unwrap().unwrap();
        e.join().unwrap().unwrap();
        served.join().unwrap().unwrap();
    }

    #[test]
    fn duplicate_rank_and_shape_mismatch_fail_the_group() {
        for (second, shape2, needle) in [
            (Role::Attention, Shape::new(2, 1), "duplicate rank"),
            (Role::Expert, Shape::new(2, 2), "shape mismatch"),
        ] {
            let root = local_root();
            let uid = root.unique_id().clone();
            let served = root.spawn(Duration::from_secs(5));
            let first = spawn_join(&uid, Role::Attention, 0, Shape::new(2, 1));
            std::thread::sleep(Duration::from_millis(200));
            let err = spawn_join(&uid, second, 0, shape2)
                .join()
                .unwrap()
                .unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
            let err = first.join().unwrap().unwrap_err();
            assert!(
                err.to_string().contains(needle),
                "first rank is told too: {err}"
            );
            assert!(served.join().unwrap().is_err());
        }
    }

    #[test]
    fn silent_root_and_absent_root_time_out() {
        // A listener that never answers.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let uid = UniqueId {
            root: silent.local_addr().unwrap(),
            secret: [0; SECRET_BYTES],
        };
        let t = Instant::now();
        let err = join(
            &uid,
            Role::Attention,
            0,
            Shape::new(1, 1),
            vec![],
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(matches!(err, BootstrapError::Timeout(_)), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
        // Nobody listening at all.
        let addr = silent.local_addr().unwrap();
        drop(silent);
        let uid = UniqueId { root: addr, ..uid };
        let err = join(
            &uid,
            Role::Attention,
            0,
            Shape::new(1, 1),
            vec![],
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("could not reach the root"),
            "{err}"
        );
    }

    #[test]
    fn root_times_out_naming_missing_ranks() {
        let root = local_root();
        let uid = root.unique_id().clone();
        let served = root.spawn(Duration::from_millis(500));
        let err = spawn_join(&uid, Role::Attention, 0, Shape::new(1, 2))
            .join()
            .unwrap()
            .unwrap_err();
        assert!(err.to_string().contains("expert 0, expert 1"), "{err}");
        assert!(served.join().unwrap().is_err());
    }
}
