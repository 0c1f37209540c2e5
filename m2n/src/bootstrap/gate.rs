//! Serving handshakes from strangers without letting them stall anyone:
//! every accepted connection gets its own thread that must read a
//! handshake before a short deadline (a total one, not per read, so a
//! trickle of bytes cannot stretch it); at most [`MAX_UNAUTHENTICATED`]
//! are in progress at once, further connections are closed at once. The
//! caller's loop takes finished handshakes from a channel, so a silent,
//! junk or half-sent connection never delays a real member.

use std::io::{self, Read};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Most handshakes in progress at once.
pub const MAX_UNAUTHENTICATED: usize = 256;
/// How long a connection may take to send its whole handshake.
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(2);

/// A stream whose reads fail with `TimedOut` once `deadline` has passed.
#[derive(Debug)]
pub struct DeadlineReader<'a> {
    pub stream: &'a mut TcpStream,
    pub deadline: Instant,
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake deadline passed",
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

/// A finished handshake: the stream and what its reader made of it.
pub type Handshake<T> = (TcpStream, io::Result<T>);

/// Accepts connections on a non-blocking listener and reads handshakes
/// concurrently.
#[derive(Debug)]
pub struct Gate<T> {
    tx: Sender<Handshake<T>>,
    rx: Receiver<Handshake<T>>,
    active: Arc<AtomicUsize>,
    /// Connections closed because too many handshakes were in progress.
    pub refused: usize,
}

impl<T: Send + 'static> Gate<T> {
    pub fn new() -> Self {
        let (tx, rx) = channel();
        Self {
            tx,
            rx,
            active: Arc::new(AtomicUsize::new(0)),
            refused: 0,
        }
    }

    /// Accepts every pending connection, each with a thread running `read`
    /// on it before `min(deadline, now + HANDSHAKE_DEADLINE)`.
    pub fn accept_all<F>(
        &mut self,
        listener: &TcpListener,
        deadline: Instant,
        read: F,
    ) -> io::Result<()>
    where
        F: Fn(&mut DeadlineReader<'_>) -> io::Result<T> + Clone + Send + 'static,
    {
        loop {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // A connection reset before we took it: not our problem.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => return Err(e),
            };
            if self.active.load(Ordering::Relaxed) >= MAX_UNAUTHENTICATED {
                self.refused += 1;
                drop(stream);
                continue;
            }
            self.active.fetch_add(1, Ordering::Relaxed);
            let (tx, active, read) = (self.tx.clone(), self.active.clone(), read.clone());
            let until = deadline.min(Instant::now() + HANDSHAKE_DEADLINE);
            std::thread::spawn(move || {
                let mut stream = stream;
                let result = stream
                    .set_nonblocking(false)
                    .and_then(|()| stream.set_nodelay(true))
                    .and_then(|()| {
                        read(&mut DeadlineReader {
                            stream: &mut stream,
                            deadline: until,
                        })
                    });
                active.fetch_sub(1, Ordering::Relaxed);
                let _ = tx.send((stream, result));
            });
        }
    }

    /// The next finished handshake, waiting at most `wait`.
    pub fn next(&self, wait: Duration) -> Option<Handshake<T>> {
        self.rx.recv_timeout(wait).ok()
    }
}

impl<T: Send + 'static> Default for Gate<T> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn silent_and_trickling_strangers_do_not_delay_a_member() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let read4 = |r: &mut DeadlineReader<'_>| {
            let mut b = [0u8; 4];
            r.read_exact(&mut b)?;
            Ok(u32::from_le_bytes(b))
        };
        let mut gate: Gate<u32> = Gate::new();
        // Silent connections, and one that trickles bytes now and then but
        // never a whole handshake (3 of 4 bytes).
        let silent: Vec<TcpStream> = (0..20).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let mut trickle = TcpStream::connect(addr).unwrap();
        trickle.write_all(&[1]).unwrap();
        let mut member = TcpStream::connect(addr).unwrap();
        member.write_all(&7u32.to_le_bytes()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let t0 = Instant::now();
        let got = loop {
            gate.accept_all(&listener, deadline, read4).unwrap();
            if let Some((_, Ok(v))) = gate.next(Duration::from_millis(5)) {
                break v;
            }
            assert!(
                t0.elapsed() < HANDSHAKE_DEADLINE,
                "the member waited behind strangers"
            );
        };
        assert_eq!(got, 7);
        // The strangers end with a timeout at the handshake deadline.
        let mut timed_out = 0;
        let mut trickled = 1;
        while timed_out < silent.len() + 1 {
            gate.accept_all(&listener, deadline, read4).unwrap();
            match gate.next(Duration::from_secs(5)) {
                Some((_, Err(e))) => {
                    assert!(
                        matches!(
                            e.kind(),
                            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                        ),
                        "{e}"
                    );
                    timed_out += 1;
                }
                other => panic!("expected a timed-out stranger, got {other:?}"),
            }
            if trickled < 3 {
                let _ = trickle.write_all(&[1]);
                trickled += 1;
            }
        }
        drop(silent);
    }
}
