//! Communicator configuration: a struct with defaults, and environment
//! overrides read in one place.
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `M2N_TRANSPORT` | `shm`, `tcp`, `verbs`, `fabric` (libfabric), `cuda-ipc` or `auto` | `auto` |
//! | `M2N_DEPTH` | slots per sender on each receiver, both channels (1..=256) | 4 |
//! | `M2N_DISPATCH_DEPTH`, `M2N_COMBINE_DEPTH` | the same, per channel | 4 |
//! | `M2N_SLOT_BYTES` | largest message per sender-receiver pair and round, both channels (K/M/G suffixes) | 1M |
//! | `M2N_DISPATCH_SLOT_BYTES`, `M2N_COMBINE_SLOT_BYTES` | the same, per channel | 1M |
//! | `M2N_PEER_TIMEOUT_MS` | silence after which a peer is declared lost | 5000 |
//! | `M2N_HEARTBEAT_MS` | interval of liveness heartbeats | 500 |
//! | `M2N_BOOTSTRAP_TIMEOUT_MS` | deadline for the rendezvous | 30000 |
//! | `M2N_CREDIT_REFRESH_MS` | re-send of the current credit, repairing a lost one | 100 |
//! | `M2N_CREDIT_BATCH` | releases a receiver coalesces into one credit write (0: half the depth; a sender whose window is full is credited at once) | 0 |
//! | `M2N_CREDIT_PIGGYBACK` | `1`: credits ride the data lane with this rank's next data write (one doorbell for both; over fabric, inside that write where the provider takes two ranges per write), instead of going on the ACK lane with the next call's pass (after its data writes); for links without congestion, where a credit queued behind data costs nothing | 0 |
//! | `M2N_SHM_QUEUE_DEPTH` | completion ring entries per peer (shm) | 1024 |
//! | `M2N_SOCKET_IFNAME` | tcp: interfaces to use, NCCL style (`eth,ens` prefixes, `=eth0` exact, `^docker,lo` to exclude) | the route to the root |
//! | `M2N_TCP_DATA_DSCP`, `M2N_TCP_ACK_DSCP` | tcp: DiffServ code point per lane (0..=63) | 0, 46 (EF) |
//! | `M2N_TCP_DATA_PRIORITY`, `M2N_TCP_ACK_PRIORITY` | tcp: `SO_PRIORITY` per lane (0..=6 unprivileged) | 0, 6 |
//! | `M2N_TCP_CONGESTION` | tcp: `TCP_CONGESTION`, `NAME` for both lanes or `data:NAME,ack:NAME` | the system's |
//! | `M2N_TCP_QUEUE_FRAMES` | tcp: frames queued per connection before back-pressure | 256 |
//! | `M2N_IB_DEVICE`, `M2N_IB_PORT`, `M2N_IB_GID_INDEX` | verbs: device (or a comma list, picked by local rank), port, GID index | first device, first active port, first RoCE v2 IPv4 GID |
//! | `M2N_IB_DATA_TC`, `M2N_IB_ACK_TC` | verbs: GRH traffic class per lane | 0, 184 (DSCP 46) |
//! | `M2N_IB_DATA_SL`, `M2N_IB_ACK_SL` | verbs: service level per lane | 0, 6 |
//! | `M2N_IB_TIMEOUT`, `M2N_IB_RETRY_CNT`, `M2N_IB_RNR_RETRY` | verbs: QP ACK timeout exponent, retries, RNR retries | 14, 7, 7 |
//! | `M2N_IB_MTU`, `M2N_IB_MAX_INLINE` | verbs: path MTU bytes, inline payload limit | 4096, 64 |
//! | `M2N_FI_PROVIDER`, `M2N_FI_DOMAIN` | fabric: libfabric provider (`tcp`, `shm`, `verbs`, `efa`, or a stack like `tcp;ofi_rxm`) and domain (`lo`, `rxe0`) | the first `fi_getinfo` offers with RMA writes carrying remote CQ data |
//! | `M2N_FI_DATA_TCLASS`, `M2N_FI_ACK_TCLASS` | fabric: `FI_TC_*` class per lane's endpoint (`unspec`, `low_latency`, `bulk_data`, ..., `dscp:N`); over shm, whose lanes share one endpoint, the data lane's | `unspec`, `low_latency` |
//! | `M2N_FI_NOTIFY` | fabric: how a receiver learns of a write and its length: `cq-data` (8 bytes of remote CQ data on the write), `message` (a 16-byte message after it, ordered by `FI_ORDER_SAW`: for rxm over verbs, with 4), or `auto` (`cq-data` where the provider has 8 bytes) | `auto` |
//! | `M2N_FI_CREDIT_RIDE` | fabric: a credit due on the ACK lane rides in a data write to the same peer queued in the same pass (one provider write naming both ranges) when at most 16 KiB of writes to that peer are in flight ahead of it, instead of going as a write of its own on the ACK lane's endpoint: `auto` (where the provider's traffic classes do not reach the wire, so that endpoint buys credits no priority: `net`, `tcp`, `shm`, `sockets`, `udp`), `0` (never), `1` (wherever the provider takes two ranges per write). Unlike `M2N_CREDIT_PIGGYBACK` it never holds a credit back | `auto` |
//! | `M2N_FI_STUCK_MS` | fabric: how long one libfabric call may run before the watchdog breaks it off (signal `SIGRTMAX-4`) and the caller gets `PeerLost` (a peer that died inside the provider, e.g. holding shm's lock, leaves it spinning there); still inside as long again, the process exits with status 70; 0: never | 10000 |
//! | `M2N_CUDA_DEVICE` | the GPU whose memory holds the receive rings (cuda-ipc, `M2N_GPU_RINGS`) | 0 |
//! | `M2N_GPU_RINGS` | `1`: verbs receive rings in GPU memory (GPUDirect RDMA); cuda-ipc's always are; shm and tcp refuse | 0 |
//! | `M2N_WAIT` | how blocking calls wait: `spin`, `yield`, `spin-yield[:N]` (N empty polls, then yield), or `auto` (`yield` when this host runs more ranks than it has cores, else `spin-yield:256`) | `auto` |
//!
//! `M2N_UNIQUE_ID` carries the unique id from a launcher to its ranks, and
//! `M2N_BOOTSTRAP_ADDR` says where `m2n_get_unique_id` (C) hosts its root;
//! launchers read them, not [`Config`] (nor does it read `M2N_ATTENTION`,
//! the Python launchers' number of attention ranks). Any other
//! `M2N_*` variable is an error, so a typo never passes silently.

use std::time::Duration;

use thiserror::Error;

pub use crate::transport::options::{FabricConfig, IbConfig, LaneClass, TcpConfig, TrafficClass};
use crate::transport::TransportKind;
pub use crate::wait::WaitPolicy;

/// A bad configuration value, naming the variable or field.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("configuration {name}={value:?}: {why}")]
pub struct ConfigError {
    pub name: String,
    pub value: String,
    pub why: String,
}

/// Memory and window of one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelConfig {
    /// Rounds a sender may run ahead of a receiver (slots per sender).
    pub depth: usize,
    /// Largest message per sender-receiver pair and round.
    pub slot_bytes: usize,
}

/// Everything a communicator can be tuned with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub transport: TransportKind,
    pub dispatch: ChannelConfig,
    pub combine: ChannelConfig,
    pub peer_timeout: Duration,
    pub heartbeat_interval: Duration,
    pub bootstrap_timeout: Duration,
    pub credit_refresh: Duration,
    /// Releases a receiver may leave unpublished before it writes a credit
    /// (0: half the depth); see [`RecvChannel::with_credit_batch`](crate::proto::RecvChannel::with_credit_batch).
    pub credit_batch: usize,
    /// Credits on the data lane, posted with the rank's next data write
    /// (one doorbell for both) rather than on the ACK lane with the next
    /// call's pass (after its data writes). Off by default: the ACK lane keeps credits out of congested
    /// data queues (the paper's high-priority ACKs); on a quiet link
    /// piggybacking saves a doorbell per credit. A credit a sender may be
    /// waiting for (its window full) and the refresh still go at once, and
    /// a rank that has never sent data (a one-way receiver) holds nothing.
    pub credit_piggyback: bool,
    pub shm_queue_depth: usize,
    pub tcp: TcpConfig,
    pub ib: IbConfig,
    pub fabric: FabricConfig,
    pub wait: WaitPolicy,
    /// The GPU receive rings live on (cuda-ipc always; verbs with `gpu_rings`).
    pub cuda_device: usize,
    /// Receive rings in GPU memory, written by the NIC (verbs, GPUDirect
    /// RDMA); cuda-ipc rings are GPU memory anyway; shm and tcp refuse it.
    pub gpu_rings: bool,
}

impl Default for Config {
    fn default() -> Self {
        let ch = ChannelConfig {
            depth: 4,
            slot_bytes: 1 << 20,
        };
        Self {
            transport: TransportKind::Auto,
            dispatch: ch,
            combine: ch,
            peer_timeout: Duration::from_secs(5),
            heartbeat_interval: Duration::from_millis(500),
            bootstrap_timeout: Duration::from_secs(30),
            credit_refresh: Duration::from_millis(100),
            credit_batch: 0,
            credit_piggyback: false,
            shm_queue_depth: 1024,
            tcp: TcpConfig::default(),
            ib: IbConfig::default(),
            fabric: FabricConfig::default(),
            wait: WaitPolicy::Auto,
            cuda_device: 0,
            gpu_rings: false,
        }
    }
}

/// Parses a byte count with an optional K/M/G (binary) suffix.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1usize << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a byte count (e.g. 4096, 64K, 1M)"))
}

/// Variables with an `M2N_` prefix that are not configuration.
/// (The project's scripts and tests use a few too; they must not make a
/// rank that inherits them fail.)
const NOT_CONFIG: &[&str] = &[
    "M2N_UNIQUE_ID",
    "M2N_BOOTSTRAP_ADDR",
    "M2N_SKIP_VM",
    "M2N_REQUIRE_NVRTC",
    "M2N_BLESS",
    // The Python package's launchers: how many ranks are attention ranks.
    "M2N_ATTENTION",
];

impl Config {
    /// The defaults with the process environment's `M2N_*` overrides.
    pub fn from_env() -> Result<Self, ConfigError> {
        let mut cfg = Self::default();
        cfg.apply_env(std::env::vars())?;
        Ok(cfg)
    }

    /// Applies `M2N_*` overrides from `vars`; other names are ignored.
    pub fn apply_env(
        &mut self,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<(), ConfigError> {
        for (name, value) in vars {
            if !name.starts_with("M2N_") || NOT_CONFIG.contains(&name.as_str()) {
                continue;
            }
            let var = EnvVar {
                name: &name,
                value: &value,
            };
            let known = self.apply_general(var)?
                || self.apply_channel(var)?
                || self.apply_timing(var)?
                || self.apply_tcp(var)?
                || self.apply_ib(var)?
                || self.apply_fabric(var)?;
            if !known {
                return Err(var.err(
                    "unknown M2N_ variable (see the configuration table in the README)".into(),
                ));
            }
        }
        self.validate()
    }

    /// The transport, how waits pace, shm's queue, the GPU; `false` when
    /// `var` is none of these.
    fn apply_general(&mut self, var: EnvVar) -> Result<bool, ConfigError> {
        let value = var.value;
        match var.name {
            "M2N_TRANSPORT" => self.transport = value.parse().map_err(|e| var.err(e))?,
            "M2N_WAIT" => self.wait = value.parse().map_err(|e| var.err(e))?,
            "M2N_SHM_QUEUE_DEPTH" => match value.parse::<usize>() {
                Ok(n) if n > 0 => self.shm_queue_depth = n,
                _ => return Err(var.err("expected a positive entry count".into())),
            },
            "M2N_GPU_RINGS" => match value {
                "0" => self.gpu_rings = false,
                "1" => self.gpu_rings = true,
                _ => return Err(var.err("expected 0 or 1".into())),
            },
            "M2N_CUDA_DEVICE" => match value.parse::<usize>() {
                Ok(d) if d < 1024 => self.cuda_device = d,
                _ => return Err(var.err("a GPU ordinal (0, 1, ...)".into())),
            },
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The channels' depths and slot sizes (both, or one channel's);
    /// `false` when `var` is none of these.
    fn apply_channel(&mut self, var: EnvVar) -> Result<bool, ConfigError> {
        match var.name {
            "M2N_DEPTH" => {
                let d = var.depth()?;
                self.dispatch.depth = d;
                self.combine.depth = d;
            }
            "M2N_DISPATCH_DEPTH" => self.dispatch.depth = var.depth()?,
            "M2N_COMBINE_DEPTH" => self.combine.depth = var.depth()?,
            "M2N_SLOT_BYTES" => {
                let b = var.bytes()?;
                self.dispatch.slot_bytes = b;
                self.combine.slot_bytes = b;
            }
            "M2N_DISPATCH_SLOT_BYTES" => self.dispatch.slot_bytes = var.bytes()?,
            "M2N_COMBINE_SLOT_BYTES" => self.combine.slot_bytes = var.bytes()?,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Liveness, rendezvous and credit timing; `false` when `var` is none
    /// of these.
    fn apply_timing(&mut self, var: EnvVar) -> Result<bool, ConfigError> {
        match var.name {
            "M2N_PEER_TIMEOUT_MS" => self.peer_timeout = var.ms()?,
            "M2N_HEARTBEAT_MS" => self.heartbeat_interval = var.ms()?,
            "M2N_BOOTSTRAP_TIMEOUT_MS" => self.bootstrap_timeout = var.ms()?,
            "M2N_CREDIT_REFRESH_MS" => self.credit_refresh = var.ms()?,
            "M2N_CREDIT_PIGGYBACK" => match var.value {
                "0" => self.credit_piggyback = false,
                "1" => self.credit_piggyback = true,
                _ => return Err(var.err("expected 0 or 1".into())),
            },
            "M2N_CREDIT_BATCH" => match var.value.parse::<usize>() {
                Ok(n) if n <= crate::proto::imm::MAX_DEPTH => self.credit_batch = n,
                _ => {
                    return Err(var.err(format!(
                        "expected a release count 0..={} (0: half the depth)",
                        crate::proto::imm::MAX_DEPTH
                    )))
                }
            },
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The tcp transport's variables; `false` when `var` is none
    /// of them.
    fn apply_tcp(&mut self, var: EnvVar) -> Result<bool, ConfigError> {
        match var.name {
            "M2N_SOCKET_IFNAME" => {
                self.tcp.ifname = Some(var.value.to_string()).filter(|v| !v.trim().is_empty())
            }
            "M2N_TCP_DATA_DSCP" => self.tcp.data.dscp = var.dscp()?,
            "M2N_TCP_ACK_DSCP" => self.tcp.ack.dscp = var.dscp()?,
            "M2N_TCP_DATA_PRIORITY" => self.tcp.data.priority = var.priority()?,
            "M2N_TCP_ACK_PRIORITY" => self.tcp.ack.priority = var.priority()?,
            "M2N_TCP_CONGESTION" => self.apply_congestion(var)?,
            "M2N_TCP_QUEUE_FRAMES" => match var.value.parse::<usize>() {
                Ok(n) if n > 0 => self.tcp.queue_frames = n,
                _ => return Err(var.err("expected a positive frame count".into())),
            },
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// `M2N_TCP_CONGESTION`: `NAME` for both lanes, or `data:NAME,ack:NAME`.
    fn apply_congestion(&mut self, var: EnvVar) -> Result<(), ConfigError> {
        let cc = |v: &str| {
            crate::transport::tcp::sock::Congestion::new(v.trim()).map_err(|e| var.err(e))
        };
        if var.value.contains(':') {
            for part in var.value.split(',') {
                match part.trim().split_once(':') {
                    Some(("data", v)) => self.tcp.data.congestion = Some(cc(v)?),
                    Some(("ack", v)) => self.tcp.ack.congestion = Some(cc(v)?),
                    _ => {
                        return Err(
                            var.err(format!("{part:?}: expected NAME or data:NAME,ack:NAME"))
                        )
                    }
                }
            }
        } else {
            let c = cc(var.value)?;
            self.tcp.data.congestion = Some(c);
            self.tcp.ack.congestion = Some(c);
        }
        Ok(())
    }

    /// The verbs transport's variables; `false` when `var` is none
    /// of them.
    fn apply_ib(&mut self, var: EnvVar) -> Result<bool, ConfigError> {
        match var.name {
            "M2N_IB_DEVICE" => {
                self.ib.device = Some(var.value.to_string()).filter(|v| !v.trim().is_empty())
            }
            "M2N_IB_PORT" => match var.small(255, "a port number")? {
                0 => return Err(var.err("ports count from 1".into())),
                p => self.ib.port = Some(p),
            },
            "M2N_IB_GID_INDEX" => self.ib.gid_index = Some(var.small(255, "a GID index")?),
            "M2N_IB_DATA_TC" => self.ib.data.traffic_class = var.small(255, "a traffic class")?,
            "M2N_IB_ACK_TC" => self.ib.ack.traffic_class = var.small(255, "a traffic class")?,
            "M2N_IB_DATA_SL" => self.ib.data.service_level = var.small(15, "a service level")?,
            "M2N_IB_ACK_SL" => self.ib.ack.service_level = var.small(15, "a service level")?,
            "M2N_IB_TIMEOUT" => self.ib.timeout = var.small(31, "a timeout exponent")?,
            "M2N_IB_RETRY_CNT" => self.ib.retry_cnt = var.small(7, "a retry count")?,
            "M2N_IB_RNR_RETRY" => self.ib.rnr_retry = var.small(7, "an RNR retry count")?,
            "M2N_IB_MTU" => match var.value.parse::<u32>() {
                Ok(m @ (256 | 512 | 1024 | 2048 | 4096)) => self.ib.mtu = m,
                _ => return Err(var.err("expected 256, 512, 1024, 2048 or 4096".into())),
            },
            "M2N_IB_MAX_INLINE" => self.ib.max_inline = var.bytes()? as u32,
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The fabric transport's variables; `false` when `var` is none of them.
    fn apply_fabric(&mut self, var: EnvVar) -> Result<bool, ConfigError> {
        let name = |v: &str| Some(v.trim().to_string()).filter(|v| !v.is_empty());
        match var.name {
            "M2N_FI_PROVIDER" => self.fabric.provider = name(var.value),
            "M2N_FI_DOMAIN" => self.fabric.domain = name(var.value),
            "M2N_FI_DATA_TCLASS" => self.fabric.data = var.value.parse().map_err(|e| var.err(e))?,
            "M2N_FI_ACK_TCLASS" => self.fabric.ack = var.value.parse().map_err(|e| var.err(e))?,
            "M2N_FI_NOTIFY" => self.fabric.notify = var.value.parse().map_err(|e| var.err(e))?,
            "M2N_FI_CREDIT_RIDE" => {
                self.fabric.credit_ride = var.value.parse().map_err(|e| var.err(e))?
            }
            "M2N_FI_STUCK_MS" => self.fabric.stuck_after = Some(var.ms()?).filter(|d| !d.is_zero()),
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Checks relations between fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |name: &str, value: String, why: &str| {
            Err(ConfigError {
                name: name.into(),
                value,
                why: why.into(),
            })
        };
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval >= self.peer_timeout {
            return bad(
                "heartbeat_interval",
                format!("{:?}", self.heartbeat_interval),
                "must be positive and shorter than peer_timeout",
            );
        }
        for (name, ch) in [("dispatch", self.dispatch), ("combine", self.combine)] {
            if ch.depth == 0 || ch.depth > crate::proto::imm::MAX_DEPTH {
                return bad(
                    name,
                    format!("depth {}", ch.depth),
                    "depth must be in 1..=256",
                );
            }
        }
        Ok(())
    }
}

/// One `M2N_*` variable being applied, and how its value is read; every
/// error names the variable and its value.
#[derive(Debug, Clone, Copy)]
struct EnvVar<'a> {
    name: &'a str,
    value: &'a str,
}

impl EnvVar<'_> {
    fn err(self, why: String) -> ConfigError {
        ConfigError {
            name: self.name.to_string(),
            value: self.value.to_string(),
            why,
        }
    }

    fn ms(self) -> Result<Duration, ConfigError> {
        self.value
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| self.err("expected milliseconds".into()))
    }

    fn depth(self) -> Result<usize, ConfigError> {
        match self.value.parse::<usize>() {
            Ok(d) if (1..=crate::proto::imm::MAX_DEPTH).contains(&d) => Ok(d),
            _ => Err(self.err(format!(
                "expected a depth in 1..={}",
                crate::proto::imm::MAX_DEPTH
            ))),
        }
    }

    fn bytes(self) -> Result<usize, ConfigError> {
        parse_bytes(self.value).map_err(|e| self.err(e))
    }

    fn dscp(self) -> Result<u8, ConfigError> {
        match self.value.parse::<u8>() {
            Ok(d) if d < 64 => Ok(d),
            _ => Err(self.err("expected a DSCP value in 0..=63".into())),
        }
    }

    /// A byte-sized number up to `max`; `what` names it in the error.
    fn small(self, max: u8, what: &str) -> Result<u8, ConfigError> {
        match self.value.parse::<u8>() {
            Ok(x) if x <= max => Ok(x),
            _ => Err(self.err(format!("expected {what} in 0..={max}"))),
        }
    }

    fn priority(self) -> Result<u32, ConfigError> {
        match self.value.parse::<u32>() {
            Ok(p) if p <= 15 => Ok(p),
            _ => Err(self
                .err("expected a socket priority in 0..=15 (above 6 needs CAP_NET_ADMIN)".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_device_list_is_picked_by_local_rank() {
        let ib = IbConfig {
            device: Some("mlx5_0, mlx5_1,".into()),
            ..IbConfig::default()
        };
        assert_eq!(ib.devices(), ["mlx5_0", "mlx5_1"]);
        let pick = |local| ib.for_local_rank(local).device;
        assert_eq!(pick(0).as_deref(), Some("mlx5_0"));
        assert_eq!(pick(1).as_deref(), Some("mlx5_1"));
        assert_eq!(pick(2).as_deref(), Some("mlx5_0"));
        assert_eq!(IbConfig::default().for_local_rank(3).device, None);
        let one = IbConfig {
            device: Some("rxe0".into()),
            ..IbConfig::default()
        };
        assert_eq!(one.for_local_rank(5).device.as_deref(), Some("rxe0"));
    }

    use super::*;
    use crate::transport::tcp::LaneOptions;

    fn env(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        c.apply_env(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())))?;
        Ok(c)
    }

    #[test]
    fn overrides_apply() {
        let c = env(&[
            ("M2N_TRANSPORT", "shm"),
            ("M2N_DEPTH", "8"),
            ("M2N_COMBINE_SLOT_BYTES", "64K"),
            ("M2N_PEER_TIMEOUT_MS", "1500"),
            ("M2N_WAIT", "spin-yield:10"),
            ("M2N_UNIQUE_ID", "ignored"),
            ("M2N_SKIP_VM", "1"),
            ("PATH", "/bin"),
        ])
        .unwrap();
        assert_eq!(c.transport, TransportKind::Shm);
        assert_eq!((c.dispatch.depth, c.combine.depth), (8, 8));
        assert_eq!(c.combine.slot_bytes, 65536);
        assert_eq!(c.dispatch.slot_bytes, 1 << 20);
        assert_eq!(c.peer_timeout, Duration::from_millis(1500));
        assert_eq!(c.wait, WaitPolicy::SpinThenYield(10));
        let c = env(&[
            ("M2N_IB_DEVICE", "rxe0"),
            ("M2N_IB_GID_INDEX", "1"),
            ("M2N_IB_ACK_TC", "104"),
            ("M2N_IB_MTU", "1024"),
        ])
        .unwrap();
        assert_eq!(
            (
                c.ib.device.as_deref(),
                c.ib.gid_index,
                c.ib.ack.traffic_class,
                c.ib.mtu
            ),
            (Some("rxe0"), Some(1), 104, 1024)
        );
        let stuck = |v: &str| env(&[("M2N_FI_STUCK_MS", v)]).unwrap().fabric.stuck_after;
        assert_eq!(stuck("2500"), Some(Duration::from_millis(2500)));
        assert_eq!(stuck("0"), None);
        let ride = |v: &str| {
            env(&[("M2N_FI_CREDIT_RIDE", v)])
                .unwrap()
                .fabric
                .credit_ride
        };
        use crate::transport::options::CreditRide;
        assert_eq!(
            [ride("auto"), ride("0"), ride("1")],
            [CreditRide::Auto, CreditRide::Never, CreditRide::Always]
        );
        assert_eq!(Config::default().fabric.credit_ride, CreditRide::Auto);
        let notify = |v: &str| env(&[("M2N_FI_NOTIFY", v)]).unwrap().fabric.notify;
        use crate::transport::options::Notify;
        assert_eq!(
            [notify("auto"), notify("cq-data"), notify("message")],
            [Notify::Auto, Notify::CqData, Notify::Message]
        );
        assert_eq!(
            Config::default().fabric.stuck_after,
            Some(Duration::from_secs(10))
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (k, v) in [
            ("M2N_TRANSPORT", "carrier-pigeon"),
            ("M2N_DEPTH", "0"),
            ("M2N_DEPTH", "257"),
            ("M2N_SLOT_BYTES", "lots"),
            ("M2N_PEER_TIMEOUT_MS", "-1"),
            ("M2N_FI_STUCK_MS", "soon"),
            ("M2N_FI_NOTIFY", "pigeon"),
            ("M2N_FI_CREDIT_RIDE", "yes"),
            ("M2N_WAIT", "nap"),
            ("M2N_DEPHT", "4"),
            ("M2N_TCP_ACK_DSCP", "64"),
            ("M2N_TCP_DATA_PRIORITY", "high"),
            ("M2N_TCP_CONGESTION", "bad name"),
            ("M2N_TCP_CONGESTION", "data:bbr,acks:reno"),
            ("M2N_IB_MTU", "1500"),
            ("M2N_CREDIT_BATCH", "257"),
            ("M2N_CREDIT_BATCH", "half"),
            ("M2N_IB_RETRY_CNT", "8"),
            ("M2N_IB_PORT", "0"),
            ("M2N_GPU_RINGS", "yes"),
            ("M2N_CUDA_DEVICE", "first"),
        ] {
            let err = env(&[(k, v)]).unwrap_err();
            assert_eq!(err.name, k, "{err}");
            assert!(err.to_string().contains(v), "{err}");
        }
        assert!(
            env(&[("M2N_HEARTBEAT_MS", "9000")]).is_err(),
            "heartbeat longer than the peer timeout"
        );
    }

    #[test]
    fn congestion_control_for_both_lanes_or_each() {
        let c = env(&[("M2N_TCP_CONGESTION", "bbr")]).unwrap();
        let name = |l: &LaneOptions| l.congestion.map(|c| c.as_str().to_string());
        assert_eq!(name(&c.tcp.data).as_deref(), Some("bbr"));
        assert_eq!(name(&c.tcp.ack).as_deref(), Some("bbr"));
        let c = env(&[("M2N_TCP_CONGESTION", "data:dctcp, ack:cubic")]).unwrap();
        assert_eq!(name(&c.tcp.data).as_deref(), Some("dctcp"));
        assert_eq!(name(&c.tcp.ack).as_deref(), Some("cubic"));
        assert_eq!(name(&Config::default().tcp.data), None);
    }

    #[test]
    fn auto_wait_yields_only_when_oversubscribed() {
        assert_eq!(WaitPolicy::Auto.resolve(4, 2), WaitPolicy::Yield);
        assert_eq!(
            WaitPolicy::Auto.resolve(2, 2),
            WaitPolicy::SpinThenYield(256)
        );
        assert_eq!(WaitPolicy::Spin.resolve(64, 2), WaitPolicy::Spin);
        assert_eq!("auto".parse::<WaitPolicy>(), Ok(WaitPolicy::Auto));
    }

    #[test]
    fn byte_suffixes() {
        assert_eq!(parse_bytes("4097"), Ok(4097));
        assert_eq!(parse_bytes("2k"), Ok(2048));
        assert_eq!(parse_bytes("8M"), Ok(8 << 20));
        assert!(parse_bytes("1T").is_err());
        assert!(parse_bytes("99999999999999999999G").is_err());
    }
}

#[cfg(test)]
mod docs {
    /// Every variable the parser knows is in the README's table.
    #[test]
    fn readme_lists_every_variable() {
        let readme = include_str!("../../README.md");
        // The parser, not the tests (which hold deliberate typos).
        let source = include_str!("config.rs")
            .split("#[cfg(test)]")
            .next()
            .unwrap();
        let mut names: Vec<&str> = source
            .split('"')
            .filter(|s| {
                s.starts_with("M2N_")
                    && s.len() > 4
                    && s.chars()
                        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
            })
            .collect();
        names.sort();
        names.dedup();
        assert!(names.len() >= 12, "{names:?}");
        for n in names {
            assert!(
                readme.contains(&format!("`{n}`")),
                "README's configuration table lacks {n}"
            );
        }
    }
}
