//! The transports' own settings, as the configuration fills them in
//! (`M2N_SOCKET_IFNAME`, `M2N_TCP_*`, `M2N_IB_*`). Compiled whatever the
//! features, so a configuration names them even where a transport is left
//! out of the build. [`crate::config`] re-exports them.

use super::tcp::LaneOptions;

/// Settings of the tcp transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConfig {
    /// Interface selection (`M2N_SOCKET_IFNAME`); `None`: the address the
    /// route to the bootstrap root leaves from.
    pub ifname: Option<String>,
    pub data: LaneOptions,
    /// The ACK lane: by default DSCP 46 (expedited forwarding) and the
    /// highest unprivileged socket priority, so credits overtake data.
    pub ack: LaneOptions,
    pub queue_frames: usize,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            ifname: None,
            data: LaneOptions {
                dscp: 0,
                priority: 0,
                congestion: None,
            },
            ack: LaneOptions {
                dscp: 46,
                priority: 6,
                congestion: None,
            },
            queue_frames: 256,
        }
    }
}

/// Per-lane priority on RDMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneClass {
    /// GRH traffic class (DSCP << 2 on RoCE).
    pub traffic_class: u8,
    /// Service level (the priority the fabric maps it to).
    pub service_level: u8,
}

/// Settings of the verbs transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IbConfig {
    /// Device name (`M2N_IB_DEVICE`); `None`: the first device. A comma
    /// list (`mlx5_0,mlx5_1`) is for hosts with one NIC per GPU: each rank
    /// takes the entry of its local rank (its index among the group's ranks
    /// on its host), modulo the list's length.
    pub device: Option<String>,
    /// Port (`M2N_IB_PORT`); `None`: the first active port.
    pub port: Option<u8>,
    /// GID index (`M2N_IB_GID_INDEX`); `None`: the first RoCE v2 GID with
    /// an IPv4 address (index 0 on InfiniBand).
    pub gid_index: Option<u8>,
    pub data: LaneClass,
    /// The ACK lane: DSCP 46 (expedited forwarding) and service level 6 by
    /// default, so credits overtake data in the fabric's queues.
    pub ack: LaneClass,
    /// Local ACK timeout exponent: 4.096 us * 2^timeout (0..=31).
    pub timeout: u8,
    /// Transport retries (0..=7).
    pub retry_cnt: u8,
    /// Receiver-not-ready retries (0..=7; 7 retries forever).
    pub rnr_retry: u8,
    /// Path MTU in bytes (256..=4096, capped by the port's active MTU).
    pub mtu: u32,
    /// Largest payload sent inline with its work request.
    pub max_inline: u32,
    /// Send queue depth per queue pair.
    pub sq_depth: u32,
    /// Receives kept posted on the shared receive queue.
    pub srq_depth: u32,
}

impl IbConfig {
    /// The devices `device` lists (empty: the first device).
    pub fn devices(&self) -> Vec<String> {
        self.device
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .map(String::from)
            .collect()
    }

    /// These settings with the one device a rank of local rank `local`
    /// uses (see [`device`](Self::device)).
    pub fn for_local_rank(&self, local: usize) -> IbConfig {
        let list = self.devices();
        IbConfig {
            device: (!list.is_empty()).then(|| list[local % list.len()].clone()),
            ..self.clone()
        }
    }
}

impl Default for IbConfig {
    fn default() -> Self {
        Self {
            device: None,
            port: None,
            gid_index: None,
            data: LaneClass {
                traffic_class: 0,
                service_level: 0,
            },
            ack: LaneClass {
                traffic_class: 46 << 2,
                service_level: 6,
            },
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            mtu: 4096,
            max_inline: 64,
            sq_depth: 512,
            srq_depth: 4096,
        }
    }
}

/// A libfabric traffic class (`FI_TC_*`), by the name `M2N_FI_*_TCLASS`
/// takes: `unspec`, `best_effort`, `low_latency`, `dedicated_access`,
/// `bulk_data`, `scavenger`, `network_ctrl`, or `dscp:N` (0..=63).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrafficClass(pub u32);

impl TrafficClass {
    const NAMED: [(&'static str, u32); 7] = [
        ("unspec", 0),
        ("best_effort", 0x200),
        ("low_latency", 0x201),
        ("dedicated_access", 0x202),
        ("bulk_data", 0x203),
        ("scavenger", 0x204),
        ("network_ctrl", 0x205),
    ];
    /// `FI_TC_DSCP`: the class carries a DiffServ code point in its low bits.
    const DSCP: u32 = 0x100;

    pub const UNSPEC: TrafficClass = TrafficClass(0);
    pub const LOW_LATENCY: TrafficClass = TrafficClass(0x201);

    pub fn name(self) -> String {
        match Self::NAMED.iter().find(|(_, v)| *v == self.0) {
            Some((n, _)) => (*n).to_string(),
            None if self.0 & !0x3f == Self::DSCP => format!("dscp:{}", self.0 & 0x3f),
            None => format!("{:#x}", self.0),
        }
    }
}

impl std::str::FromStr for TrafficClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        if let Some(n) = s.strip_prefix("dscp:") {
            return match n.parse::<u32>() {
                Ok(d) if d <= 63 => Ok(TrafficClass(Self::DSCP | d)),
                _ => Err(format!("{n:?} is not a DSCP (0..=63)")),
            };
        }
        Self::NAMED
            .iter()
            .find(|(n, _)| *n == s)
            .map(|&(_, v)| TrafficClass(v))
            .ok_or_else(|| {
                format!(
                    "unknown traffic class {s:?}: expected {}, or dscp:N",
                    Self::NAMED.map(|(n, _)| n).join(", ")
                )
            })
    }
}

/// How a fabric receiver learns that a write landed, and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Notify {
    /// `cq-data` where the provider carries 8 bytes of remote CQ data,
    /// else `message`.
    #[default]
    Auto,
    /// The write carries the immediate and the length as 8 bytes of
    /// remote CQ data (one operation per message).
    CqData,
    /// The write carries none; a 16-byte message with the immediate, the
    /// length and the written region's key follows it on the same
    /// endpoint, ordered after it (`FI_ORDER_SAW`): for providers with less
    /// CQ data (rxm over verbs).
    Message,
}

impl Notify {
    pub fn name(self) -> &'static str {
        match self {
            Notify::Auto => "auto",
            Notify::CqData => "cq-data",
            Notify::Message => "message",
        }
    }
}

impl std::str::FromStr for Notify {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" | "auto" => Ok(Notify::Auto),
            "cq-data" => Ok(Notify::CqData),
            "message" => Ok(Notify::Message),
            other => Err(format!(
                "unknown notification {other:?}: expected auto, cq-data or message"
            )),
        }
    }
}

/// Whether a credit on the ACK lane may ride in a data write to the same
/// peer (`M2N_FI_CREDIT_RIDE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreditRide {
    /// Where the provider's traffic classes do not reach the wire (`net`,
    /// `tcp`, `shm`, `sockets`, `udp`: there the ACK lane's own endpoint
    /// buys credits no priority), and never elsewhere (`verbs;ofi_rxm`
    /// maps them onto the GRH traffic class; `efa`).
    Auto,
    /// Never: a credit is always a write of its own on the ACK lane.
    Never,
    /// Over any provider that takes two ranges per write.
    Always,
}

impl std::str::FromStr for CreditRide {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "" | "auto" => Ok(CreditRide::Auto),
            "0" => Ok(CreditRide::Never),
            "1" => Ok(CreditRide::Always),
            other => Err(format!("expected auto, 0 or 1, not {other:?}")),
        }
    }
}

/// Settings of the fabric (libfabric) transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FabricConfig {
    /// Provider (`M2N_FI_PROVIDER`, e.g. `tcp`, `shm`, `verbs`, `efa`, or
    /// a full stack `tcp;ofi_rxm`); `None`: the first `fi_getinfo` offers
    /// with what m2n needs.
    pub provider: Option<String>,
    /// Domain (`M2N_FI_DOMAIN`, e.g. `lo`, `rxe0`); `None`: the provider's first.
    pub domain: Option<String>,
    /// Traffic class of the data lane's endpoint (`M2N_FI_DATA_TCLASS`).
    pub data: TrafficClass,
    /// Traffic class of the ACK lane's endpoint (`M2N_FI_ACK_TCLASS`),
    /// `low_latency` by default; unused where the lanes share one
    /// endpoint (shm), which has the data lane's.
    pub ack: TrafficClass,
    /// Writes in flight per process that wait for a completion.
    pub tx_depth: usize,
    /// The GPU whose memory `FI_HMEM` registrations name (`M2N_CUDA_DEVICE`).
    pub cuda_device: usize,
    /// How long one call into libfabric may take before the watchdog
    /// breaks it off (`M2N_FI_STUCK_MS`; `None`: never). A peer that dies
    /// or stops inside a provider's critical section (shm: the spinlock of
    /// a shared region) leaves its peers spinning in the provider, where
    /// m2n's peer timeout cannot reach them; broken off, the call fails,
    /// the transport makes no more calls and the caller gets `PeerLost`.
    /// A call still inside as long again (the escape signal, `SIGRTMAX-4`,
    /// taken by another handler) ends the process with status 70.
    pub stuck_after: Option<std::time::Duration>,
    /// How receivers learn of writes (`M2N_FI_NOTIFY`).
    pub notify: Notify,
    /// Whether ACK-lane credits ride in data writes (`M2N_FI_CREDIT_RIDE`).
    pub credit_ride: CreditRide,
}

impl Default for FabricConfig {
    fn default() -> Self {
        Self {
            provider: None,
            domain: None,
            data: TrafficClass::UNSPEC,
            ack: TrafficClass::LOW_LATENCY,
            tx_depth: 1024,
            cuda_device: 0,
            stuck_after: Some(std::time::Duration::from_secs(10)),
            notify: Notify::Auto,
            credit_ride: CreditRide::Auto,
        }
    }
}
