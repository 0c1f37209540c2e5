//! Socket options and interface selection for the tcp transport.

use std::net::{IpAddr, TcpStream};
use std::os::fd::AsRawFd;

use crate::transport::TransportError;

/// Per-lane socket settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneOptions {
    /// DiffServ code point (0..=63), written as `IP_TOS = dscp << 2`
    /// (`IPV6_TCLASS` on IPv6).
    pub dscp: u8,
    /// `SO_PRIORITY`: the kernel's queueing priority (0..=6 without
    /// CAP_NET_ADMIN).
    pub priority: u32,
    /// `TCP_CONGESTION`: the congestion control of this lane's
    /// connections; `None` keeps the system default.
    pub congestion: Option<Congestion>,
}

/// The name of a TCP congestion-control algorithm (`cubic`, `bbr`,
/// `dctcp`, ...), as `TCP_CONGESTION` takes it: at most 15 characters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Congestion {
    name: [u8; 16],
    len: u8,
}

impl Congestion {
    pub fn new(name: &str) -> Result<Self, String> {
        let ok = !name.is_empty()
            && name.len() < 16
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !ok {
            return Err(format!(
                "{name:?} is not a congestion-control name (1 to 15 of a-z, 0-9, _ and -; this kernel offers: {})",
                available_congestion()
            ));
        }
        let mut out = Congestion {
            name: [0; 16],
            len: name.len() as u8,
        };
        out.name[..name.len()].copy_from_slice(name.as_bytes());
        Ok(out)
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.name[..self.len as usize]).unwrap_or("?")
    }
}

impl std::fmt::Debug for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the kernel offers, and what unprivileged processes may choose.
pub fn available_congestion() -> String {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into())
    };
    format!(
        "{} (unprivileged: {})",
        read("/proc/sys/net/ipv4/tcp_available_congestion_control"),
        read("/proc/sys/net/ipv4/tcp_allowed_congestion_control")
    )
}

/// The congestion control a connection uses (for tests and diagnostics).
pub fn congestion_of(stream: &TcpStream) -> std::io::Result<String> {
    let mut buf = [0u8; 16];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: buf and len are live; the kernel writes at most len bytes.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(len as usize);
    Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
}

fn setsockopt_int(
    fd: i32,
    level: i32,
    name: i32,
    value: i32,
    what: &str,
) -> Result<(), TransportError> {
    // SAFETY: passes a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(TransportError::os(
            format!("setsockopt({what}={value})"),
            std::io::Error::last_os_error(),
        ))
    }
}

/// Reads an integer socket option (for tests and diagnostics).
pub fn getsockopt_int(stream: &TcpStream, level: i32, name: i32) -> std::io::Result<i32> {
    let mut value: i32 = 0;
    let mut len = std::mem::size_of::<i32>() as libc::socklen_t;
    // SAFETY: value and len are live and sized for a c_int.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            level,
            name,
            (&mut value as *mut i32).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Applies TCP_NODELAY, the lane's DSCP and SO_PRIORITY (and congestion
/// control) to an accepted connection. Its first packets (the handshake,
/// and the acknowledgement of the lane hello that says which lane it is)
/// have left with the listener's class by then.
pub fn apply(stream: &TcpStream, lane: LaneOptions) -> Result<(), TransportError> {
    let v6 = stream
        .local_addr()
        .map_err(|e| TransportError::os("local_addr", e))?
        .is_ipv6();
    apply_fd(stream, v6, lane)
}

/// Connects to `addr` with the lane's options set before the SYN, so that
/// every packet this side sends carries the lane's class. The outer error
/// is an option the kernel refused; the inner one a failed connection
/// attempt (worth retrying).
pub fn connect(
    addr: std::net::SocketAddr,
    lane: LaneOptions,
    timeout: std::time::Duration,
) -> Result<std::io::Result<TcpStream>, TransportError> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(|e| TransportError::os("socket", e))?;
    apply_fd(&sock, addr.is_ipv6(), lane)?;
    Ok(sock
        .connect_timeout(&addr.into(), timeout)
        .map(|()| sock.into()))
}

fn apply_fd(sock: &impl AsRawFd, v6: bool, lane: LaneOptions) -> Result<(), TransportError> {
    let fd = sock.as_raw_fd();
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1, "TCP_NODELAY")?;
    let tos = i32::from(lane.dscp) << 2;
    if v6 {
        setsockopt_int(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_TCLASS,
            tos,
            "IPV6_TCLASS",
        )?;
    } else {
        setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_TOS, tos, "IP_TOS")?;
    }
    setsockopt_int(
        fd,
        libc::SOL_SOCKET,
        libc::SO_PRIORITY,
        lane.priority as i32,
        "SO_PRIORITY",
    )?;
    if let Some(cc) = lane.congestion {
        let name = cc.as_str();
        // SAFETY: passes a live buffer of the name's length.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_CONGESTION,
                name.as_ptr().cast(),
                name.len() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(TransportError::os(
                format!(
                    "setsockopt(TCP_CONGESTION={name}); this kernel offers {}",
                    available_congestion()
                ),
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// The address of the first usable interface matching `spec`, NCCL style:
/// a comma-separated list of name prefixes (`eth,ens`), `=name` for an
/// exact name, and a leading `^` to exclude instead (`^docker,lo`).
/// IPv4 addresses are preferred over IPv6 ones.
pub fn interface_address(spec: &str) -> Result<IpAddr, TransportError> {
    let (exclude, list) = match spec.strip_prefix('^') {
        Some(rest) => (true, rest),
        None => (false, spec),
    };
    let pats: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let matches = |name: &str| {
        let hit = pats.iter().any(|p| match p.strip_prefix('=') {
            Some(exact) => name == exact,
            None => name.starts_with(p),
        });
        hit != exclude
    };
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| TransportError::os("getifaddrs", e))?;
    let mut seen = Vec::new();
    let mut best: Option<IpAddr> = None;
    for ifa in addrs {
        let Some(ip) = ifa.address.as_ref().and_then(|a| {
            a.as_sockaddr_in()
                .map(|s| IpAddr::V4(s.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
        }) else {
            continue;
        };
        seen.push(format!("{}={ip}", ifa.interface_name));
        let up = ifa.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP);
        if !up || !matches(&ifa.interface_name) {
            continue;
        }
        if let IpAddr::V6(v6) = ip {
            if v6.segments()[0] & 0xffc0 == 0xfe80 {
                continue; // link-local needs a scope id; not usable as a plain address
            }
        }
        if best.is_none_or(|b| b.is_ipv6() && ip.is_ipv4()) {
            best = Some(ip);
        }
    }
    best.ok_or_else(|| {
        TransportError::Unavailable(
            crate::transport::TransportKind::Tcp,
            format!(
                "no usable (up, non-link-local) interface matches M2N_SOCKET_IFNAME={spec:?}; interfaces: {}",
                seen.join(", ")
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_found_by_prefix_and_exact_name() {
        assert_eq!(
            interface_address("lo").unwrap(),
            IpAddr::from([127, 0, 0, 1])
        );
        assert_eq!(
            interface_address("=lo").unwrap(),
            IpAddr::from([127, 0, 0, 1])
        );
    }

    #[test]
    fn no_match_lists_the_interfaces() {
        let err = interface_address("nosuchif0").unwrap_err().to_string();
        assert!(err.contains("nosuchif0") && err.contains("lo="), "{err}");
        // Excluding loopback never yields a loopback address.
        if let Ok(ip) = interface_address("^lo") {
            assert!(!ip.is_loopback(), "{ip}");
        }
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    #[test]
    fn a_lane_gets_its_congestion_control_and_a_missing_one_is_named() {
        let (a, _b) = pair();
        let lane = |cc: Option<&str>| LaneOptions {
            dscp: 46,
            priority: 6,
            congestion: cc.map(|c| Congestion::new(c).unwrap()),
        };
        // reno is built into every Linux kernel and always allowed.
        apply(&a, lane(Some("reno"))).unwrap();
        assert_eq!(congestion_of(&a).unwrap(), "reno");
        assert_eq!(
            getsockopt_int(&a, libc::IPPROTO_IP, libc::IP_TOS).unwrap(),
            46 << 2
        );
        assert_eq!(
            getsockopt_int(&a, libc::SOL_SOCKET, libc::SO_PRIORITY).unwrap(),
            6
        );
        let err = apply(&a, lane(Some("nosuchcc"))).unwrap_err().to_string();
        assert!(err.contains("nosuchcc") && err.contains("offers"), "{err}");
        assert_eq!(
            congestion_of(&a).unwrap(),
            "reno",
            "unchanged after a refusal"
        );
        assert!(Congestion::new("bad name").is_err());
        assert!(Congestion::new("averyveryverylongname").is_err());
    }
}
