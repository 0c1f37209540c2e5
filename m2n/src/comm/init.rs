//! Forming a communicator: checking the arguments, the two channels'
//! protocol state, meeting every rank at the rendezvous (phase 1), and
//! wiring up the transport, the rings and the liveness links (phase 2).

use std::collections::VecDeque;
use std::time::Instant;

use super::liveness::{LinkPlan, Liveness, LivenessListener};
use super::{setup, staging, streams, Clock, Communicator, Error, RecvSide, Result, SendSide};
use crate::bootstrap::{self, Rendezvous, UniqueId};
use crate::config::Config;
use crate::group::{Peer, Role, Shape};
use crate::proto::{ChannelId, Geometry, RecvChannel, SendChannel};
use crate::transport::{Region, RemoteRegion, Transport, TransportError, TransportKind};

/// Who this rank is.
#[derive(Clone, Copy)]
struct Me {
    role: Role,
    rank: usize,
    shape: Shape,
}

impl Me {
    fn global(self) -> usize {
        self.shape.global(self.role, self.rank)
    }
    fn other(self) -> Role {
        match self.role {
            Role::Attention => Role::Expert,
            Role::Expert => Role::Attention,
        }
    }
    /// Ranks on the other side (messages per round, each way).
    fn theirs(self) -> usize {
        self.shape.side(self.other())
    }
}

/// Phase 1's outcome: everyone's presence, the transport chosen, and the
/// configuration as this rank resolves it.
struct Met {
    rv: Rendezvous,
    everyone: Vec<setup::Presence>,
    /// Taken by phase 2 when it establishes the links.
    listener: Option<LivenessListener>,
    ip: std::net::IpAddr,
    kind: TransportKind,
    config: Config,
    /// This rank's index among the group's ranks on its host.
    local_rank: usize,
    /// `M2N_IB_DEVICE` as given (before this rank picked its entry).
    device_list: Option<String>,
}

/// Phase 2's outcome: the transport with every peer connected.
struct Wired {
    transport: Box<dyn Transport>,
    ring: Region,
    credits: Region,
    credit_src: Region,
    rings: Vec<RemoteRegion>,
    credit_dst: Vec<RemoteRegion>,
    liveness: Liveness,
}

impl Communicator {
    /// Joins the group identified by `uid` as `role` `rank` of `shape`:
    /// allocates the rings, rendezvous, connects and barriers. Blocks until
    /// every rank has done the same, or `config.bootstrap_timeout`.
    pub fn init(
        config: Config,
        role: Role,
        rank: usize,
        shape: Shape,
        uid: &UniqueId,
    ) -> Result<Self> {
        let me = Me { role, rank, shape };
        check(&config, me)?;
        let deadline = Instant::now() + config.bootstrap_timeout;
        let ((send_id, send_proto), (recv_id, recv_proto)) = protocols(&config, me)?;
        let recv_geo = *recv_proto.geometry();
        let mut met = meet(config, me, uid, deadline)?;
        let wired = wire_up(&mut met, me, uid, recv_geo, deadline)?;
        let Met {
            rv,
            kind,
            config,
            local_rank,
            device_list,
            ..
        } = met;
        rv.barrier(deadline.saturating_duration_since(Instant::now()))?;
        // What one poll can return: every write of the rounds in flight on
        // both channels (their completions and arrivals) and the credits.
        // Sized now, so that a poll that returns more than any before does
        // not allocate in a warm run.
        let completions = Vec::with_capacity(
            2 * (config.dispatch.depth + config.combine.depth) * shape.world() + 64,
        );
        let mut detail = wired.transport.describe();
        if kind == TransportKind::Verbs && device_list.as_deref().is_some_and(|l| l.contains(',')) {
            detail += &format!(
                " (local rank {local_rank}, from M2N_IB_DEVICE={})",
                device_list.as_deref().unwrap_or_default()
            );
        }
        Ok(Self {
            detail,
            clock: Clock::new(),
            role,
            rank,
            shape,
            config,
            transport: wired.transport,
            send: SendSide {
                id: send_id,
                proto: send_proto,
                rings: wired.rings,
                credits: wired.credits,
                sources: VecDeque::new(),
                sources_base: 0,
                spare_sources: Vec::new(),
                lens_scratch: Vec::new(),
                stalled: None,
            },
            recv: RecvSide {
                id: recv_id,
                proto: recv_proto,
                ring: wired.ring,
                credit_src: wired.credit_src,
                credit_dst: wired.credit_dst,
                credit_owed: Vec::new(),
                credit_writes: 0,
            },
            liveness: wired.liveness,
            completions,
            fatal: None,
            streams: streams::Streams::default(),
            stages: staging::Stages::default(),
        })
    }
}

/// The arguments, before anything is allocated or sent.
fn check(config: &Config, me: Me) -> Result<()> {
    config.validate()?;
    let Me { role, rank, shape } = me;
    if shape.attention == 0 || shape.experts == 0 {
        return Err(Error::InvalidArgument(format!(
            "shape {shape} needs at least one rank per side"
        )));
    }
    if rank >= shape.side(role) {
        return Err(Error::InvalidArgument(format!(
            "{role} rank {rank} is outside 0..{}",
            shape.side(role)
        )));
    }
    Ok(())
}

/// The protocol state of the channel this rank sends on and of the one it
/// receives on.
#[allow(clippy::type_complexity)]
fn protocols(
    config: &Config,
    me: Me,
) -> Result<((ChannelId, SendChannel), (ChannelId, RecvChannel))> {
    let (send_id, recv_id, send_cfg, recv_cfg) = match me.role {
        Role::Attention => (
            ChannelId::Dispatch,
            ChannelId::Combine,
            config.dispatch,
            config.combine,
        ),
        Role::Expert => (
            ChannelId::Combine,
            ChannelId::Dispatch,
            config.combine,
            config.dispatch,
        ),
    };
    let mine = me.shape.side(me.role);
    let theirs = me.theirs();
    let send_geo = Geometry {
        senders: mine,
        receivers: theirs,
        depth: send_cfg.depth,
        slot_bytes: send_cfg.slot_bytes,
    };
    let recv_geo = Geometry {
        senders: theirs,
        receivers: mine,
        depth: recv_cfg.depth,
        slot_bytes: recv_cfg.slot_bytes,
    };
    let proto = |source| Error::Protocol {
        peer: Peer {
            role: me.role,
            rank: me.rank,
        },
        source,
    };
    let send = SendChannel::new(send_geo, send_id, me.rank).map_err(proto)?;
    let recv = RecvChannel::new(recv_geo, recv_id, config.credit_refresh)
        .map_err(proto)?
        .with_credit_batch(config.credit_batch);
    Ok(((send_id, send), (recv_id, recv)))
}

/// Phase 1: where everyone is. Liveness links listen on the address the
/// transport will use; the ranks agree on the settings and the transport,
/// and this rank resolves its wait policy and its device.
fn meet(config: Config, me: Me, uid: &UniqueId, deadline: Instant) -> Result<Met> {
    let shape = me.shape;
    let ip = setup::local_ip(&config, uid.root)?;
    let listener = LivenessListener::bind(ip).map_err(|e| {
        Error::Bootstrap(bootstrap::BootstrapError::Io {
            op: format!("liveness listener on {ip}"),
            source: e,
        })
    })?;
    // Probing for an RDMA device is only worth it when verbs may be chosen.
    let verbs = matches!(config.transport, TransportKind::Verbs | TransportKind::Auto)
        && setup::verbs_here(&config).is_ok();
    let presence = setup::Presence {
        host: crate::transport::host_identity(),
        liveness: listener.addr,
        verbs,
        settings: setup::Settings::of(&config),
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let rv = bootstrap::join(uid, me.role, me.rank, shape, presence.encode(), left)?;
    let everyone = rv
        .payloads
        .iter()
        .enumerate()
        .map(|(g, blob)| {
            setup::Presence::decode(blob).map_err(|source| Error::Transport {
                peer: Some(setup::peer(shape, g)),
                source: TransportError::BadDescriptor { peer: g, source },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    setup::check_agreement(shape, &everyone)?;
    let kind = setup::choose_transport(config.transport, shape, &everyone)?;
    let g = me.global();
    let on_my_host = |p: &&setup::Presence| p.host == everyone[g].host;
    let local_ranks = everyone.iter().filter(on_my_host).count();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut config = config;
    config.wait = config.wait.resolve(local_ranks, cores);
    // This rank's index among the ranks on its host picks its device from
    // an M2N_IB_DEVICE list.
    let local_rank = everyone[..g].iter().filter(on_my_host).count();
    let device_list = config.ib.device.clone();
    config.ib = config.ib.for_local_rank(local_rank);
    Ok(Met {
        rv,
        everyone,
        listener: Some(listener),
        ip,
        kind,
        config,
        local_rank,
        device_list,
    })
}

/// Phase 2: the transport, its rings and their descriptors, every peer
/// connected and imported, and the liveness links (attention ranks dial,
/// experts accept).
fn wire_up(
    met: &mut Met,
    me: Me,
    uid: &UniqueId,
    recv_geo: Geometry,
    deadline: Instant,
) -> Result<Wired> {
    let Me { role, shape, .. } = me;
    let theirs = me.theirs();
    let config = &met.config;
    let mut transport =
        setup::make_transport(met.kind, config, met.ip, me.global(), shape.world())?;
    let t = |source| Error::Transport { peer: None, source };
    let ring_bytes = recv_geo.ring_bytes().expect("validated");
    let ring = if config.gpu_rings {
        transport.alloc_gpu_ring(ring_bytes, config.cuda_device)
    } else {
        transport.alloc_ring(ring_bytes)
    }
    .map_err(t)?;
    let credits = transport.alloc(super::CREDIT_BYTES * theirs).map_err(t)?;
    let credit_src = transport.alloc(8).map_err(t)?;
    let published = setup::Published {
        endpoint: transport.endpoint(),
        ring: ring.descriptor().to_vec(),
        credits: credits.descriptor().to_vec(),
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let payloads = met.rv.all_gather(published.encode(), left)?;

    let other = me.other();
    let mut rings = Vec::with_capacity(theirs);
    let mut credit_dst = Vec::with_capacity(theirs);
    let mut dial = Vec::new();
    let mut accept = Vec::new();
    for i in 0..theirs {
        let g = shape.global(other, i);
        let peer = Peer {
            role: other,
            rank: i,
        };
        let tp = |source| Error::Transport {
            peer: Some(peer),
            source,
        };
        let p = setup::Published::decode(&payloads[g])
            .map_err(|source| tp(TransportError::BadDescriptor { peer: g, source }))?;
        transport.connect(g, &p.endpoint).map_err(tp)?;
        rings.push(transport.import(g, &p.ring).map_err(tp)?);
        credit_dst.push(transport.import(g, &p.credits).map_err(tp)?);
        match role {
            Role::Attention => dial.push((g, met.everyone[g].liveness)),
            Role::Expert => accept.push(g),
        }
    }
    let plan = LinkPlan {
        shape,
        me: me.global(),
        secret: &uid.secret,
        dial: &dial,
        accept: &accept,
        timeout: config.peer_timeout,
        interval: config.heartbeat_interval,
    };
    let listener = met.listener.take().expect("phase 2 runs once");
    let liveness = Liveness::establish(listener, plan, deadline)
        .map_err(|e| Error::Bootstrap(bootstrap::BootstrapError::Group(e)))?;
    Ok(Wired {
        transport,
        ring,
        credits,
        credit_src,
        rings,
        credit_dst,
        liveness,
    })
}
