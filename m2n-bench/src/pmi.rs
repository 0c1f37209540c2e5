//! Leaving an MPI job without `MPI_Finalize`, when finalising would hang.
//!
//! MPICH 4.0 with UCX 1.13 (Debian 12) over UCX's tcp transport hangs in
//! `MPI_Finalize` in about a third of 4-rank runs, with no m2n involved (a
//! C program that only exchanges messages, barriers and finalises does it
//! too): each rank closes its UCX endpoints, the ranks done first wait in
//! the launcher's barrier, and the last one waits forever for those peers
//! to progress its endpoint flushes (openucx/ucx#8738, open). The MPI
//! baseline over TCP, which `--transport tcp` compares against, would then
//! never exit.
//!
//! A rank that simply exits without finalising is taken by hydra (MPICH's
//! `mpiexec`) for a crash, and it kills the others. So after a final
//! `MPI_Barrier`, when every message of the run is complete, such a rank
//! tells its hydra proxy it has finalised, the way MPICH's own PMI-1 client
//! does (`cmd=finalize` on the socket named by `PMI_FD`, answered by
//! `cmd=finalize_ack`), then exits.

use std::io::{Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::{FromRawFd, RawFd};
use std::time::Duration;

/// How long the launcher may take to acknowledge.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Says "finalised" to the PMI-1 launcher (hydra) and exits with `code`.
/// Returns the reason when this job is not under a PMI-1 launcher or the
/// launcher did not acknowledge; the caller should then finalise MPI.
pub fn finalize_and_exit(code: i32) -> String {
    let fd: RawFd = match std::env::var("PMI_FD").ok().and_then(|v| v.parse().ok()) {
        Some(fd) => fd,
        None => return "PMI_FD is not set (not under hydra's PMI-1)".into(),
    };
    // PMI_FD names the socket the launcher gave this process; MPICH keeps
    // it open until finalising, and ManuallyDrop never closes it here.
    // SAFETY: an open descriptor owned by MPICH, borrowed and never closed.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut sock = ManuallyDrop::new(file);
    if let Err(e) = sock.write_all(b"cmd=finalize\n") {
        return format!("PMI_FD {fd}: cannot send finalize: {e}");
    }
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\n") {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut pfd, 1, ACK_TIMEOUT.as_millis() as libc::c_int) };
        if ready <= 0 {
            return format!("PMI_FD {fd}: no finalize_ack within {ACK_TIMEOUT:?}");
        }
        match sock.read(&mut byte) {
            Ok(1) => reply.push(byte[0]),
            Ok(_) => return format!("PMI_FD {fd}: the launcher closed the socket"),
            Err(e) => return format!("PMI_FD {fd}: {e}"),
        }
    }
    let reply = String::from_utf8_lossy(&reply);
    if reply.trim() != "cmd=finalize_ack" {
        return format!(
            "PMI_FD {fd}: expected cmd=finalize_ack, got {:?}",
            reply.trim()
        );
    }
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    std::process::exit(code);
}
