//! Forming a group under `mpiexec` (feature `mpi`): MPI rank 0 hosts the
//! rendezvous root and broadcasts its unique id, as NCCL programs do with
//! `ncclGetUniqueId` + `MPI_Bcast`. Used by `m2n_perf` and `moe-run`.

use std::time::Duration;

use mpi::traits::{Communicator, Root as _};

use super::{Root, UniqueId};

/// Room for a unique id's text in the broadcast.
const ID_BYTES: usize = 160;

/// On MPI rank 0: binds a root at `M2N_BOOTSTRAP_ADDR` (default
/// `127.0.0.1:0`) that serves for up to `timeout`, and broadcasts its id;
/// on every rank: the id. Collective: every rank of `world` must call it.
/// A failure on rank 0 is an error on every rank (rank 0's names why).
pub fn share_unique_id(world: &impl Communicator, timeout: Duration) -> Result<UniqueId, String> {
    let mut buf = [0u8; ID_BYTES];
    let mut failed = 0u8;
    let mut why = String::new();
    if world.rank() == 0 {
        let text = std::env::var("M2N_BOOTSTRAP_ADDR").unwrap_or_else(|_| "127.0.0.1:0".into());
        let bound = text
            .parse()
            .map_err(|e| format!("M2N_BOOTSTRAP_ADDR={text:?}: {e}"))
            .and_then(|addr| Root::bind(addr).map_err(|e| format!("rendezvous root: {e}")));
        match bound {
            Ok(root) => {
                let id = root.unique_id().to_string();
                buf[..id.len()].copy_from_slice(id.as_bytes());
                drop(root.spawn(timeout));
            }
            Err(e) => {
                why = e;
                failed = 1;
            }
        }
    }
    let root = world.process_at_rank(0);
    root.broadcast_into(&mut failed);
    root.broadcast_into(&mut buf[..]);
    if failed != 0 {
        return Err(if why.is_empty() {
            "rank 0 could not start the rendezvous root (its own message says why)".into()
        } else {
            why
        });
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..len])
        .parse()
        .map_err(|e| format!("the broadcast unique id: {e}"))
}
