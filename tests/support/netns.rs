//! Two network namespaces joined by a veth pair: the closest stand-in for
//! two hosts on one machine (needs root and iproute2). Shared by m2n's and
//! moe-runtime's `tests/netns.rs` (included with `#[path]`).

use std::process::Command;

/// Runs `ip args...`; the error names the command and what it printed.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Namespaces `a` (10.231.<subnet>.1) and `b` (10.231.<subnet>.2) with a
/// veth pair between them; removed on drop.
pub struct Net {
    pub a: String,
    pub b: String,
    veth_b: String,
}

impl Net {
    /// Names start with `prefix` (at most 4 characters: interface names
    /// have 15) and end with this process's id.
    pub fn create(prefix: &str, subnet: u8) -> Result<Net, String> {
        let id = std::process::id() % 100_000;
        let net = Net {
            a: format!("{prefix}-a-{id}"),
            b: format!("{prefix}-b-{id}"),
            veth_b: format!("{prefix}b{id}"),
        };
        let veth_a = format!("{prefix}a{id}");
        ip(&["netns", "add", &net.a])?;
        ip(&["netns", "add", &net.b])?;
        ip(&[
            "link",
            "add",
            &veth_a,
            "type",
            "veth",
            "peer",
            "name",
            &net.veth_b,
        ])?;
        ip(&["link", "set", &veth_a, "netns", &net.a])?;
        ip(&["link", "set", &net.veth_b, "netns", &net.b])?;
        for (ns, dev, host) in [(&net.a, &veth_a, 1), (&net.b, &net.veth_b, 2)] {
            let addr = format!("10.231.{subnet}.{host}/24");
            ip(&["-n", ns, "addr", "add", &addr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    /// Bytes received by `b`'s end of the veth pair.
    #[allow(dead_code)] // not every test reads it
    pub fn rx_bytes_b(&self) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.b, "cat"])
            .arg(format!(
                "/sys/class/net/{}/statistics/rx_bytes",
                self.veth_b
            ))
            .output()
            .expect("read rx_bytes");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}
