//! The MPI baseline: one round is MPI_Isend / MPI_Irecv to and from every
//! peer, then MPI_Waitall, timed exactly like m2n's rounds.

use std::ffi::c_int;

use m2n::WaitPolicy;
use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::topology::SimpleCommunicator;

use crate::cli::{Args, Baseline};

/// Completes `reqs` as the wait policy says: `spin` is MPI_Waitall (MPI's
/// own busy wait); the yielding policies poll MPI_Testall and yield the CPU
/// between polls, so oversubscribed ranks do not starve each other.
pub fn wait_all(reqs: &mut [ffi::MPI_Request], policy: WaitPolicy) {
    // SAFETY: RSMPI_STATUSES_IGNORE is a constant set up by MPI_Init.
    let ignore = unsafe { ffi::RSMPI_STATUSES_IGNORE };
    if policy == WaitPolicy::Spin {
        // SAFETY: every request is live or null; statuses are ignored.
        let rc = unsafe { ffi::MPI_Waitall(reqs.len() as c_int, reqs.as_mut_ptr(), ignore) };
        assert_eq!(rc, 0, "MPI_Waitall failed");
        return;
    }
    let mut backoff = m2n::wait::Backoff::new(policy);
    loop {
        let mut done: c_int = 0;
        // SAFETY: as above.
        let rc =
            unsafe { ffi::MPI_Testall(reqs.len() as c_int, reqs.as_mut_ptr(), &mut done, ignore) };
        assert_eq!(rc, 0, "MPI_Testall failed");
        if done != 0 {
            return;
        }
        backoff.wait(false);
    }
}

/// A barrier that waits by `policy` (MPI_Ibarrier + [`wait_all`]).
pub fn barrier(world: &SimpleCommunicator, policy: WaitPolicy) {
    // SAFETY: RSMPI_REQUEST_NULL is a constant; the request is completed below.
    let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
    // SAFETY: a valid communicator and an out-parameter.
    let rc = unsafe { ffi::MPI_Ibarrier(world.as_raw(), &mut req) };
    assert_eq!(rc, 0, "MPI_Ibarrier failed");
    wait_all(std::slice::from_mut(&mut req), policy);
}

/// Posts all `recvs` (source rank, buffer) with `recv_tag` and all `sends`
/// (destination rank, bytes) with `send_tag`, then waits for all of them.
pub fn exchange(
    world: &SimpleCommunicator,
    sends: &[(i32, &[u8])],
    send_tag: i32,
    recvs: &mut [(i32, &mut [u8])],
    recv_tag: i32,
    policy: WaitPolicy,
) {
    let mut reqs: Vec<ffi::MPI_Request> = Vec::with_capacity(sends.len() + recvs.len());
    let comm = world.as_raw();
    // SAFETY: RSMPI_UINT8_T is a constant MPI initialised before main's
    // first MPI call.
    let u8_type = unsafe { ffi::RSMPI_UINT8_T };
    for (src, buf) in recvs.iter_mut() {
        // SAFETY: the request is a fresh out-parameter; `buf` outlives the
        // MPI_Waitall below, which completes the request.
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: as above; count fits (checked by the caller's size limit).
        let rc = unsafe {
            ffi::MPI_Irecv(
                buf.as_mut_ptr().cast(),
                buf.len() as c_int,
                u8_type,
                *src,
                recv_tag,
                comm,
                &mut req,
            )
        };
        assert_eq!(rc, 0, "MPI_Irecv failed");
        reqs.push(req);
    }
    // SAFETY: every buffer outlives the MPI_Waitall below.
    unsafe { post_sends(world, sends, send_tag, &mut reqs) };
    wait_all(&mut reqs, policy);
}

/// Posts all `sends` (destination rank, bytes) with `tag`, adding their
/// requests to `reqs`.
///
/// # Safety
/// Each buffer stays alive and unchanged until its request completes.
pub unsafe fn post_sends(
    world: &SimpleCommunicator,
    sends: &[(i32, &[u8])],
    tag: i32,
    reqs: &mut Vec<ffi::MPI_Request>,
) {
    // SAFETY: RSMPI_UINT8_T is a constant MPI initialised before main's
    // first MPI call.
    let u8_type = unsafe { ffi::RSMPI_UINT8_T };
    for (dst, buf) in sends {
        // SAFETY: a fresh out-parameter.
        let mut req = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: `buf` lives until the request completes (the caller's
        // contract); count fits (checked by the caller's size limit).
        let rc = unsafe {
            ffi::MPI_Isend(
                buf.as_ptr().cast(),
                buf.len() as c_int,
                u8_type,
                *dst,
                tag,
                world.as_raw(),
                &mut req,
            )
        };
        assert_eq!(rc, 0, "MPI_Isend failed");
        reqs.push(req);
    }
}

/// Which path the MPI baseline's messages take. Against m2n over tcp it
/// must be MPI over TCP too (like for like): MPICH is kept off shared
/// memory and, with UCX, on its tcp transport, through the variables MPI
/// reads in MPI_Init, unless the user set them.
pub struct MpiPath {
    /// The header line.
    pub line: String,
    /// MPI over UCX's tcp transport can hang in MPI_Finalize (see `pmi`):
    /// ranks then leave through `pmi::finalize_and_exit` instead.
    pub skip_finalize: bool,
}

/// Chooses the MPI baseline's path (see [`MpiPath`]); call before MPI_Init,
/// which reads the variables this sets.
pub fn choose_path(args: &Result<Args, clap::Error>) -> MpiPath {
    let plain = |line: &str| MpiPath {
        line: line.into(),
        skip_finalize: false,
    };
    let Ok(args) = args else {
        return plain("");
    };
    if args.baseline != Baseline::Mpi {
        return plain("n/a");
    }
    let env = m2n::Config::from_env().unwrap_or_default();
    if args.m2n_config(&env).transport != m2n::TransportKind::Tcp {
        return plain("MPI's default (shared memory between ranks on one host)");
    }
    // MPI_Get_library_version may be called before MPI_Init.
    let version = mpi::environment::library_version().unwrap_or_default();
    let mut wanted = vec![("MPIR_CVAR_NOLOCAL", "1")];
    let ucx = version.contains("ch4:ucx");
    if ucx {
        wanted.push(("UCX_TLS", "tcp,self"));
    } else if version.contains("ch4:ofi") {
        wanted.push(("FI_PROVIDER", "tcp"));
    }
    let mut set = Vec::new();
    for (k, v) in wanted {
        match std::env::var(k) {
            Ok(have) => set.push(format!("{k}={have} (from the environment)")),
            Err(_) => {
                // Single-threaded still: MPI is not initialised yet.
                std::env::set_var(k, v);
                set.push(format!("{k}={v}"));
            }
        }
    }
    let device = version
        .lines()
        .find_map(|l| l.trim().strip_prefix("MPICH Device:"))
        .map(|d| d.trim().to_string())
        .unwrap_or_else(|| "unknown device".into());
    MpiPath {
        line: format!("TCP like m2n's ({device}: {})", set.join(" ")),
        skip_finalize: ucx,
    }
}
