//! The C-visible types.

#![allow(non_camel_case_types)]

use std::ffi::c_char;

/// Result of every m2n call.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum m2n_result_t {
    M2N_SUCCESS = 0,
    /// Not now: the window is full (send) or nothing is ready; try again.
    M2N_AGAIN = 1,
    /// A NULL pointer, a bad size, an out-of-range rank or offset.
    M2N_ERR_INVALID_ARGUMENT = 2,
    /// An unknown, freed or foreign handle, or a call in the wrong order.
    M2N_ERR_INVALID_USAGE = 3,
    M2N_ERR_TIMEOUT = 4,
    /// A peer died, hung or left; the last error names it.
    M2N_ERR_PEER_LOST = 5,
    /// A peer broke the protocol (misrouted or stale write, bad credit).
    M2N_ERR_PROTOCOL = 6,
    M2N_ERR_TRANSPORT = 7,
    M2N_ERR_BOOTSTRAP = 8,
    /// A bad configuration value (struct field or M2N_* variable).
    M2N_ERR_CONFIG = 9,
    /// The communicator was aborted.
    M2N_ERR_ABORTED = 10,
    /// A bug in m2n (a caught panic); the last error has the detail.
    M2N_ERR_INTERNAL = 11,
    /// A GPU call (stream-ordered calls, GPU memory) failed: no CUDA driver
    /// or GPU, a CUDA call failed, or this library was built without CUDA.
    M2N_ERR_STREAM = 12,
}

/// Which side of the group a rank is on.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum m2n_role_t {
    /// Sends dispatch, receives combine.
    M2N_ROLE_ATTENTION = 0,
    /// Receives dispatch, sends combine.
    M2N_ROLE_EXPERT = 1,
}

/// Values of m2n_config_t.transport.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum m2n_transport_t {
    M2N_TRANSPORT_AUTO = 0,
    M2N_TRANSPORT_SHM = 1,
    M2N_TRANSPORT_TCP = 2,
    M2N_TRANSPORT_VERBS = 3,
    /// Processes on one host, receive rings in GPU memory (CUDA IPC).
    M2N_TRANSPORT_CUDA_IPC = 4,
    /// libfabric (provider from M2N_FI_PROVIDER; EFA, tcp, shm, verbs).
    M2N_TRANSPORT_FABRIC = 5,
}

/// Which of a communicator's two sides a stream mode applies to: the side
/// it sends on (m2n_send_stream) or the side it receives on
/// (m2n_recv_stream, m2n_round_release_stream). An attention rank sends
/// dispatch and receives combine; an expert the other way round.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum m2n_side_t {
    M2N_SIDE_SEND = 0,
    M2N_SIDE_RECV = 1,
}

/// How a side's stream-ordered operations use their flags
/// (m2n_set_stream_mode).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum m2n_stream_mode_t {
    /// The default: each operation waits for and writes its own sequence
    /// number (a captured CUDA graph cannot be replayed).
    M2N_STREAM_SEQUENCE = 0,
    /// Constant values on per-slot handshake flags: a CUDA graph that
    /// captured a whole ring cycle of this side's operations replays.
    M2N_STREAM_GRAPH_SAFE = 1,
}

/// The version of m2n_config_t this library speaks.
pub const M2N_CONFIG_VERSION: u32 = 1;
/// Bytes of an m2n_unique_id_t.
pub const M2N_UNIQUE_ID_BYTES: usize = 128;

/// Communicator settings. Fill with m2n_config_init(), change fields, pass to
/// m2n_comm_init(). `size` and `version` let the struct grow compatibly.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct m2n_config_t {
    /// sizeof(m2n_config_t), set by m2n_config_init().
    pub size: usize,
    /// M2N_CONFIG_VERSION, set by m2n_config_init().
    pub version: u32,
    /// An m2n_transport_t value.
    pub transport: u32,
    /// Slots per sender on each receiver (1..=256), per channel.
    pub dispatch_depth: u32,
    pub combine_depth: u32,
    /// Largest message per sender-receiver pair and round, per channel.
    pub dispatch_slot_bytes: u64,
    pub combine_slot_bytes: u64,
    /// Silence after which a peer is lost.
    pub peer_timeout_ms: u32,
    /// Deadline of m2n_comm_init's rendezvous.
    pub bootstrap_timeout_ms: u32,
    /// Non-zero: apply M2N_* environment overrides on top of these fields.
    pub apply_env: u32,
}

/// The rendezvous id: a NUL-terminated string a launcher can pass around.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct m2n_unique_id_t {
    pub internal: [c_char; M2N_UNIQUE_ID_BYTES],
}

/// One message of a round: `len` bytes at `offset` of a registered buffer.
/// `mem` may be NULL when `len` is 0 (an empty message).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct m2n_msg_t {
    pub mem: *const m2n_mem_t,
    pub offset: usize,
    pub len: usize,
}

/// An opaque communicator.
#[derive(Debug)]
pub struct m2n_comm_t {
    _private: [u8; 0],
}

/// An opaque registered buffer.
#[derive(Debug)]
pub struct m2n_mem_t {
    _private: [u8; 0],
}

/// An opaque received round: valid until released.
#[derive(Debug)]
pub struct m2n_round_t {
    _private: [u8; 0],
}
