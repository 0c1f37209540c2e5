//! Peer liveness: one TCP link per pair of ranks that talk, carrying
//! heartbeats. A killed process's links close at once (the kernel sends a
//! FIN or RST); a hung one stops sending heartbeats and is declared lost
//! after the peer timeout.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::group::{Peer, Shape};
use crate::secret::SECRET_BYTES;

const HEARTBEAT: u8 = 1;
const GOODBYE: u8 = 2;

/// How often the links are looked at: a killed peer is noticed within this
/// (its connection closes at once), a hung one after the peer timeout.
pub(crate) const POLL_EVERY: Duration = Duration::from_millis(2);

#[derive(Debug)]
struct Link {
    peer: Peer,
    stream: TcpStream,
    last_heard: Instant,
    last_sent: Instant,
    lost: Option<Lost>,
}

/// Why and when a link was lost.
#[derive(Debug, Clone)]
pub(crate) struct Lost {
    pub reason: String,
    pub at: Instant,
    /// The peer hung rather than left: nothing more will come from it.
    pub hung: bool,
    /// It left on purpose (it closed its communicator with a goodbye).
    pub clean: bool,
}

/// The liveness links of one rank.
#[derive(Debug)]
pub(crate) struct Liveness {
    links: Vec<Link>,
    timeout: Duration,
    interval: Duration,
    /// When `poll` next looks at the links (a comparison per call, no
    /// arithmetic: it runs in every pass of a polling loop).
    next_poll: Instant,
    /// Per link: the last `poll` found something to read on it.
    ready: Vec<bool>,
    /// The `poll(2)` table, kept between calls (no allocation per poll).
    fds: Vec<libc::pollfd>,
    /// Whether any link is lost (as of the last `poll` that looked):
    /// callers that ask every pass skip the search while none is.
    any_lost: bool,
}

impl Lost {
    fn left(at: Instant, reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            at,
            hung: false,
            clean: false,
        }
    }
}

/// Pre-handshake state: our listener.
#[derive(Debug)]
pub(crate) struct LivenessListener {
    listener: TcpListener,
    pub addr: SocketAddr,
}

impl LivenessListener {
    pub fn bind(ip: std::net::IpAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind((ip, 0))?;
        let addr = listener.local_addr()?;
        Ok(Self { listener, addr })
    }
}

fn hello(secret: &[u8; SECRET_BYTES], global: usize) -> Vec<u8> {
    let mut v = secret.to_vec();
    v.extend_from_slice(&(global as u32).to_le_bytes());
    v
}

/// Which links a rank makes, and how they are watched.
#[derive(Debug)]
pub(crate) struct LinkPlan<'a> {
    pub shape: Shape,
    /// Our global rank.
    pub me: usize,
    pub secret: &'a [u8; SECRET_BYTES],
    /// Peers we connect to: (global rank, liveness address).
    pub dial: &'a [(usize, SocketAddr)],
    /// Peers that connect to us (global ranks).
    pub accept: &'a [usize],
    pub timeout: Duration,
    pub interval: Duration,
}

impl Liveness {
    /// Builds the links: `me` (global rank) connects to every peer in
    /// `dial` and accepts one connection from every peer in `accept`.
    pub fn establish(
        listener: LivenessListener,
        plan: LinkPlan<'_>,
        deadline: Instant,
    ) -> Result<Self, String> {
        let LinkPlan {
            shape,
            me,
            secret,
            dial,
            accept,
            timeout,
            interval,
        } = plan;
        let now = Instant::now();
        let left = || {
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        };
        let mut links = Vec::new();
        let link = |global: usize, stream: TcpStream| -> Result<Link, String> {
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            stream.set_nonblocking(true).map_err(|e| e.to_string())?;
            let (role, rank) = shape.member(global);
            Ok(Link {
                peer: Peer { role, rank },
                stream,
                last_heard: now,
                last_sent: now,
                lost: None,
            })
        };
        for &(global, addr) in dial {
            let (role, rank) = shape.member(global);
            let mut s = TcpStream::connect_timeout(&addr, left())
                .map_err(|e| format!("liveness link to {} at {addr}: {e}", Peer { role, rank }))?;
            s.write_all(&hello(secret, me))
                .map_err(|e| format!("liveness hello to {}: {e}", Peer { role, rank }))?;
            links.push(link(global, s)?);
        }
        listener
            .listener
            .set_nonblocking(true)
            .map_err(|e| e.to_string())?;
        let mut pending: Vec<usize> = accept.to_vec();
        let mut gate: crate::bootstrap::gate::Gate<usize> = crate::bootstrap::gate::Gate::new();
        while !pending.is_empty() {
            if Instant::now() >= deadline {
                let names: Vec<String> = pending
                    .iter()
                    .map(|&g| {
                        let (role, rank) = shape.member(g);
                        Peer { role, rank }.to_string()
                    })
                    .collect();
                return Err(format!(
                    "liveness links never came from: {}",
                    names.join(", ")
                ));
            }
            // Handshakes are read concurrently with a short deadline each:
            // a stranger that connects and says nothing cannot stall us.
            let secret = *secret;
            gate.accept_all(&listener.listener, deadline, move |r| {
                let mut buf = [0u8; SECRET_BYTES + 4];
                r.read_exact(&mut buf)?;
                if !crate::secret::secrets_match(&buf[..SECRET_BYTES], &secret) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "wrong secret",
                    ));
                }
                Ok(u32::from_le_bytes(buf[SECRET_BYTES..].try_into().expect("4 bytes")) as usize)
            })
            .map_err(|e| format!("liveness accept: {e}"))?;
            let Some((s, global)) = gate.next(Duration::from_millis(1)) else {
                continue;
            };
            let Ok(global) = global else {
                continue; // a stranger: ignore it
            };
            let Some(i) = pending.iter().position(|&g| g == global) else {
                continue;
            };
            pending.swap_remove(i);
            links.push(link(global, s)?);
        }
        // The per-poll tables are sized here: the first poll may come
        // after a fast warm-up, in a caller's steady state.
        let n = links.len();
        Ok(Self {
            links,
            timeout,
            interval,
            next_poll: now + POLL_EVERY,
            ready: Vec::with_capacity(n),
            fds: Vec::with_capacity(n),
            any_lost: false,
        })
    }

    /// Reads heartbeats, sends ours, and marks links lost. Cheap to call
    /// often: does nothing more than once per [`POLL_EVERY`] unless
    /// `force`, and then asks the kernel once for the whole group (one
    /// `poll` over every link) and reads only the links with something to
    /// read: one system call per [`POLL_EVERY`] whatever M x N, plus a
    /// heartbeat per link per interval.
    pub fn poll(&mut self, now: Instant, force: bool) {
        if !force && now < self.next_poll {
            return;
        }
        self.next_poll = now + POLL_EVERY;
        self.ready.clear();
        self.ready.resize(self.links.len(), false);
        if self.poll_fds().is_err() {
            // The kernel could not be asked (no memory for the poll table):
            // read every link, as a read per link would.
            self.ready.iter_mut().for_each(|r| *r = true);
        }
        let mut buf = [0u8; 64];
        for (l, _) in self
            .links
            .iter_mut()
            .zip(&self.ready)
            .filter(|(l, ready)| **ready && l.lost.is_none())
        {
            loop {
                match l.stream.read(&mut buf) {
                    Ok(0) => {
                        l.lost = Some(Lost::left(
                            now,
                            "its connection closed (the process exited or was killed)",
                        ));
                        break;
                    }
                    Ok(n) => {
                        l.last_heard = now;
                        if buf[..n].contains(&GOODBYE) {
                            l.lost = Some(Lost {
                                clean: true,
                                ..Lost::left(now, "it closed its communicator")
                            });
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        l.lost = Some(Lost::left(now, format!("its connection failed: {e}")));
                        break;
                    }
                }
            }
        }
        for l in self.links.iter_mut().filter(|l| l.lost.is_none()) {
            if now.saturating_duration_since(l.last_heard) > self.timeout {
                l.lost = Some(Lost {
                    reason: format!("no heartbeat for {:?}", self.timeout),
                    at: now,
                    hung: true,
                    clean: false,
                });
                continue;
            }
            if now.saturating_duration_since(l.last_sent) >= self.interval {
                match send_byte(&l.stream, HEARTBEAT) {
                    Ok(()) => l.last_sent = now,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => l.lost = Some(Lost::left(now, format!("heartbeat failed: {e}"))),
                }
            }
        }
        self.any_lost = self.links.iter().any(|l| l.lost.is_some());
    }

    /// Whether any peer is lost (links are only marked lost by `poll`).
    pub fn any_lost(&self) -> bool {
        self.any_lost
    }

    /// One `poll(2)` without waiting over the links not yet lost; marks in
    /// `self.ready` those with data, a hang-up or an error.
    fn poll_fds(&mut self) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        self.fds.clear();
        self.fds.extend(self.links.iter().map(|l| libc::pollfd {
            // A negative fd is skipped by poll(2): lost links are not asked.
            fd: if l.lost.is_none() {
                l.stream.as_raw_fd()
            } else {
                -1
            },
            events: libc::POLLIN,
            revents: 0,
        }));
        loop {
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs
            // that lives across the call; a zero timeout does not block.
            let n = unsafe { libc::poll(self.fds.as_mut_ptr(), self.fds.len() as libc::nfds_t, 0) };
            if n >= 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        for (ready, fd) in self.ready.iter_mut().zip(&self.fds) {
            // POLLHUP and POLLERR come whatever was asked for; the read
            // that follows tells which (0 bytes, or the error).
            *ready = fd.revents != 0;
        }
        Ok(())
    }

    /// Why `peer` is lost, if it is.
    pub fn lost(&self, peer: Peer) -> Option<&Lost> {
        self.links
            .iter()
            .find(|l| l.peer == peer)
            .and_then(|l| l.lost.as_ref())
    }

    /// Tells peers we are leaving on purpose, then closes.
    pub fn goodbye(&mut self) {
        for l in &self.links {
            let _ = send_byte(&l.stream, GOODBYE);
        }
        self.links.clear();
    }

    /// Closes without a goodbye (abort): peers see the connection drop.
    pub fn close(&mut self) {
        for l in &self.links {
            let _ = l.stream.shutdown(std::net::Shutdown::Both);
        }
        self.links.clear();
    }
}

/// Sends one byte without raising SIGPIPE in a process that did not ignore it.
fn send_byte(stream: &TcpStream, b: u8) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    nix::sys::socket::send(
        stream.as_raw_fd(),
        &[b],
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
    )
    .map(|_| ())
    .map_err(std::io::Error::from)
}
