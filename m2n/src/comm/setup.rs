//! What ranks exchange while a communicator is set up, and the choice of
//! transport that follows from it.

use std::net::{IpAddr, SocketAddr};

use super::{Error, Result};
use crate::codec::{DecodeError, Reader, Writer};
use crate::config::Config;
use crate::group::{Peer, Shape};
use crate::transport::shm::ShmTransport;
use crate::transport::tcp::{TcpOptions, TcpTransport};
use crate::transport::{Transport, TransportError, TransportKind};

pub(super) fn peer(shape: Shape, global: usize) -> Peer {
    let (role, rank) = shape.member(global);
    Peer { role, rank }
}

/// First all-gather: where a rank runs and where its liveness link listens.
#[derive(Debug)]
pub(super) struct Presence {
    pub host: String,
    pub liveness: SocketAddr,
    /// This rank has a usable RDMA device (built with verbs, device, active
    /// port, GID).
    pub verbs: bool,
    /// The settings every rank must share (see [`Settings`]).
    pub settings: Settings,
}

/// The configuration every rank of a group must agree on: the transport
/// asked for and both channels' geometry. A rank whose ring has another
/// depth or slot size than its senders think would see every write as a
/// protocol violation, so a mismatch fails the rendezvous instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Settings {
    pub transport: String,
    pub dispatch: (u64, u64),
    pub combine: (u64, u64),
}

impl Settings {
    pub fn of(config: &Config) -> Self {
        Settings {
            transport: config.transport.name().to_string(),
            dispatch: (
                config.dispatch.depth as u64,
                config.dispatch.slot_bytes as u64,
            ),
            combine: (
                config.combine.depth as u64,
                config.combine.slot_bytes as u64,
            ),
        }
    }
}

impl std::fmt::Display for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "transport {}, dispatch depth {} x {} B, combine depth {} x {} B",
            self.transport, self.dispatch.0, self.dispatch.1, self.combine.0, self.combine.1
        )
    }
}

/// Fails (the same way on every rank: all see the same all-gather) unless
/// every rank has the same [`Settings`].
pub(super) fn check_agreement(shape: Shape, everyone: &[Presence]) -> Result<()> {
    match everyone
        .iter()
        .position(|p| p.settings != everyone[0].settings)
    {
        None => Ok(()),
        Some(g) => Err(Error::Bootstrap(crate::bootstrap::BootstrapError::Group(
            format!(
                "ranks disagree on channel settings: {} has {}, {} has {} (give every rank the same M2N_TRANSPORT, M2N_DISPATCH_*, M2N_COMBINE_* values or config fields)",
                peer(shape, 0),
                everyone[0].settings,
                peer(shape, g),
                everyone[g].settings
            ),
        ))),
    }
}

fn parse_addr(field: &'static str, raw: &[u8]) -> std::result::Result<SocketAddr, DecodeError> {
    std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| DecodeError::Invalid {
            field,
            detail: String::from_utf8_lossy(raw).into_owned(),
        })
}

impl Presence {
    pub fn encode(&self) -> Vec<u8> {
        Writer::new()
            .bytes(self.host.as_bytes())
            .bytes(self.liveness.to_string().as_bytes())
            .u8(self.verbs as u8)
            .bytes(self.settings.transport.as_bytes())
            .u64(self.settings.dispatch.0)
            .u64(self.settings.dispatch.1)
            .u64(self.settings.combine.0)
            .u64(self.settings.combine.1)
            .finish()
    }

    pub fn decode(blob: &[u8]) -> std::result::Result<Self, DecodeError> {
        let mut r = Reader::new(blob);
        let host = String::from_utf8_lossy(r.bytes("host id", 256)?).into_owned();
        let liveness = parse_addr("liveness address", r.bytes("liveness address", 256)?)?;
        let verbs = r.u8("verbs flag")? != 0;
        let transport = String::from_utf8_lossy(r.bytes("transport", 16)?).into_owned();
        let settings = Settings {
            transport,
            dispatch: (r.u64("dispatch depth")?, r.u64("dispatch slot bytes")?),
            combine: (r.u64("combine depth")?, r.u64("combine slot bytes")?),
        };
        r.finish()?;
        Ok(Self {
            host,
            liveness,
            verbs,
            settings,
        })
    }
}

/// Second all-gather: the transport endpoint and the regions peers write.
#[derive(Debug)]
pub(super) struct Published {
    pub endpoint: Vec<u8>,
    /// The ring of the channel this rank receives on.
    pub ring: Vec<u8>,
    /// Where receivers write credits for the channel this rank sends on.
    pub credits: Vec<u8>,
}

impl Published {
    pub fn encode(&self) -> Vec<u8> {
        Writer::new()
            .bytes(&self.endpoint)
            .bytes(&self.ring)
            .bytes(&self.credits)
            .finish()
    }

    pub fn decode(blob: &[u8]) -> std::result::Result<Self, DecodeError> {
        let mut r = Reader::new(blob);
        let endpoint = r.bytes("endpoint", 64 << 10)?.to_vec();
        let ring = r.bytes("ring descriptor", 64 << 10)?.to_vec();
        let credits = r.bytes("credit descriptor", 64 << 10)?.to_vec();
        r.finish()?;
        Ok(Self {
            endpoint,
            ring,
            credits,
        })
    }
}

/// Whether this rank can use verbs, and if not, why.
pub(super) fn verbs_here(config: &Config) -> std::result::Result<(), String> {
    #[cfg(feature = "verbs")]
    {
        // Every listed device must work: which one this rank takes is
        // known only once the group says how many ranks share its host.
        let list = config.ib.devices();
        for local in 0..list.len().max(1) {
            let ib = config.ib.for_local_rank(local);
            crate::transport::verbs::probe(&ib).map_err(|e| match &ib.device {
                Some(d) => format!("{d}: {e}"),
                None => e.to_string(),
            })?;
        }
        Ok(())
    }
    #[cfg(not(feature = "verbs"))]
    {
        let _ = config;
        Err(VERBS_NOT_BUILT.into())
    }
}

#[cfg(not(feature = "verbs"))]
const VERBS_NOT_BUILT: &str = "this m2n was built without the `verbs` feature (build with default features; it needs libibverbs-dev, librdmacm-dev and libclang)";

/// The transport every rank will use. All ranks see the same all-gather,
/// so they all reach the same answer: `auto` takes verbs when every rank
/// has an RDMA device, else shm when all are on one host, else tcp.
pub(super) fn choose_transport(
    asked: TransportKind,
    shape: Shape,
    everyone: &[Presence],
) -> Result<TransportKind> {
    let elsewhere = everyone.iter().position(|p| p.host != everyone[0].host);
    let no_verbs = everyone.iter().position(|p| !p.verbs);
    match (asked, elsewhere) {
        (TransportKind::Shm | TransportKind::CudaIpc, Some(g)) => Err(Error::Transport {
            peer: Some(peer(shape, g)),
            source: TransportError::Unavailable(
                asked,
                format!(
                    "M2N_TRANSPORT={asked}, but {} runs on another host than {}",
                    peer(shape, g),
                    peer(shape, 0)
                ),
            ),
        }),
        (TransportKind::Verbs, _) => match no_verbs {
            None => Ok(TransportKind::Verbs),
            Some(g) => Err(Error::Transport {
                peer: Some(peer(shape, g)),
                source: TransportError::Unavailable(
                    TransportKind::Verbs,
                    format!(
                        "M2N_TRANSPORT=verbs, but {} has no usable RDMA device",
                        peer(shape, g)
                    ),
                ),
            }),
        },
        (TransportKind::Auto, _) if no_verbs.is_none() => Ok(TransportKind::Verbs),
        (TransportKind::Auto, None) => Ok(TransportKind::Shm),
        (TransportKind::Auto, Some(_)) => Ok(TransportKind::Tcp),
        (kind, _) => Ok(kind),
    }
}

/// The address this rank listens on: the configured interface's, or the
/// one its route to the bootstrap root leaves from.
pub(super) fn local_ip(config: &Config, root: SocketAddr) -> Result<IpAddr> {
    if let Some(spec) = &config.tcp.ifname {
        return crate::transport::tcp::sock::interface_address(spec)
            .map_err(|source| Error::Transport { peer: None, source });
    }
    Ok(std::net::UdpSocket::bind(if root.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .and_then(|s| {
        s.connect(root)?;
        s.local_addr()
    })
    .map(|a| a.ip())
    .unwrap_or(root.ip()))
}

pub(super) fn make_transport(
    kind: TransportKind,
    config: &Config,
    ip: IpAddr,
    me: usize,
    world: usize,
) -> Result<Box<dyn Transport>> {
    let t = |source| Error::Transport { peer: None, source };
    Ok(match kind {
        TransportKind::Shm => {
            Box::new(ShmTransport::new(me, world, config.shm_queue_depth).map_err(t)?)
        }
        TransportKind::Tcp => Box::new(
            TcpTransport::new(
                me,
                world,
                TcpOptions {
                    bind_ip: ip,
                    data: config.tcp.data,
                    ack: config.tcp.ack,
                    connect_timeout: config.bootstrap_timeout,
                    queue_frames: config.tcp.queue_frames,
                },
            )
            .map_err(t)?,
        ),
        #[cfg(feature = "verbs")]
        TransportKind::Verbs => Box::new(
            crate::transport::verbs::VerbsTransport::new(me, world, config.ib.clone())
                .map_err(t)?,
        ),
        #[cfg(not(feature = "verbs"))]
        TransportKind::Verbs => {
            return Err(t(TransportError::Unavailable(
                TransportKind::Verbs,
                VERBS_NOT_BUILT.into(),
            )))
        }
        #[cfg(feature = "fabric")]
        TransportKind::Fabric => Box::new(
            crate::transport::fabric::FabricTransport::new(
                me,
                world,
                crate::config::FabricConfig {
                    cuda_device: config.cuda_device,
                    ..config.fabric.clone()
                },
            )
            .map_err(t)?,
        ),
        #[cfg(not(feature = "fabric"))]
        TransportKind::Fabric => {
            return Err(t(TransportError::Unavailable(
                TransportKind::Fabric,
                "this m2n was built without the `fabric` feature (build with default features; it needs libfabric-dev and libclang)".into(),
            )))
        }
        #[cfg(feature = "cuda")]
        TransportKind::CudaIpc => Box::new(
            crate::transport::cuda_ipc::CudaIpcTransport::new(
                me,
                world,
                config.shm_queue_depth,
                config.cuda_device,
            )
            .map_err(t)?,
        ),
        #[cfg(not(feature = "cuda"))]
        TransportKind::CudaIpc => {
            return Err(t(TransportError::Unavailable(
                TransportKind::CudaIpc,
                "this m2n was built without the `cuda` feature".into(),
            )))
        }
        TransportKind::Auto => unreachable!("choose_transport resolves auto"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(hosts: &[&str]) -> Vec<Presence> {
        hosts
            .iter()
            .map(|h| Presence {
                host: h.trim_end_matches('+').to_string(),
                liveness: "127.0.0.1:1".parse().unwrap(),
                verbs: h.ends_with('+'),
                settings: Settings::of(&Config::default()),
            })
            .collect()
    }

    #[test]
    fn ranks_with_other_channel_settings_fail_the_rendezvous_naming_both() {
        let shape = Shape::new(1, 2);
        let mut all = at(&["a", "a", "a"]);
        check_agreement(shape, &all).unwrap();
        let blob = all[2].encode();
        assert_eq!(Presence::decode(&blob).unwrap().settings, all[2].settings);
        all[2].settings.dispatch.0 += 1;
        let err = check_agreement(shape, &all).unwrap_err().to_string();
        assert!(
            err.contains("attention 0")
                && err.contains("expert 1")
                && err.contains("dispatch depth"),
            "{err}"
        );
        all[2].settings = Settings::of(&Config::default());
        all[1].settings.transport = "tcp".into();
        let err = check_agreement(shape, &all).unwrap_err().to_string();
        assert!(
            err.contains("expert 0") && err.contains("transport tcp"),
            "{err}"
        );
    }

    #[test]
    fn auto_picks_shm_on_one_host_and_tcp_across_hosts() {
        let shape = Shape::new(1, 2);
        assert_eq!(
            choose_transport(TransportKind::Auto, shape, &at(&["a", "a", "a"])).unwrap(),
            TransportKind::Shm
        );
        assert_eq!(
            choose_transport(TransportKind::Auto, shape, &at(&["a", "b", "a"])).unwrap(),
            TransportKind::Tcp
        );
        assert_eq!(
            choose_transport(TransportKind::Tcp, shape, &at(&["a", "a", "a"])).unwrap(),
            TransportKind::Tcp
        );
        let err = choose_transport(TransportKind::Shm, shape, &at(&["a", "a", "b"])).unwrap_err();
        assert!(
            err.to_string().contains("expert 1 runs on another host"),
            "{err}"
        );
        let err =
            choose_transport(TransportKind::Verbs, shape, &at(&["a+", "a", "a+"])).unwrap_err();
        assert!(
            err.to_string()
                .contains("expert 0 has no usable RDMA device"),
            "{err}"
        );
        // `+`: that rank has an RDMA device. auto prefers verbs only when all do.
        assert_eq!(
            choose_transport(TransportKind::Auto, shape, &at(&["a+", "b+", "a+"])).unwrap(),
            TransportKind::Verbs
        );
        assert_eq!(
            choose_transport(TransportKind::Auto, shape, &at(&["a+", "a", "a+"])).unwrap(),
            TransportKind::Shm
        );
    }

    #[test]
    fn presence_round_trips_and_rejects_garbage() {
        let p = Presence {
            host: "boot".into(),
            liveness: "[::1]:80".parse().unwrap(),
            verbs: true,
            settings: Settings {
                transport: "verbs".into(),
                dispatch: (3, 4096),
                combine: (5, 128),
            },
        };
        let back = Presence::decode(&p.encode()).unwrap();
        assert_eq!(
            (back.host, back.liveness, back.verbs, back.settings),
            (p.host, p.liveness, true, p.settings)
        );
        assert!(Presence::decode(b"\x01\x00\x00\x00x\x03\x00\x00\x00bad").is_err());
    }
}
