use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

pub use crate::secret::SECRET_BYTES;

/// An NCCL-style unique id: the root's address plus a random secret.
///
/// It prints as `m2n1@<ip>:<port>#<32 hex digits>`, which a launcher passes
/// to every rank (e.g. in `M2N_UNIQUE_ID`).
#[derive(Clone, PartialEq, Eq)]
pub struct UniqueId {
    pub root: SocketAddr,
    pub secret: [u8; SECRET_BYTES],
}

impl fmt::Debug for UniqueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret in debug output.
        f.debug_struct("UniqueId")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for UniqueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "m2n1@{}#", self.root)?;
        self.secret.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl FromStr for UniqueId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let rest = s
            .strip_prefix("m2n1@")
            .ok_or_else(|| format!("unique id {s:?} does not start with \"m2n1@\""))?;
        let (addr, hex) = rest
            .rsplit_once('#')
            .ok_or_else(|| format!("unique id {s:?} has no '#' before its secret"))?;
        let root = addr
            .parse()
            .map_err(|e| format!("unique id root address {addr:?}: {e}"))?;
        if hex.len() != SECRET_BYTES * 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "unique id secret must be {} hex digits",
                SECRET_BYTES * 2
            ));
        }
        let mut secret = [0u8; SECRET_BYTES];
        for (i, byte) in secret.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("checked hex");
        }
        Ok(Self { root, secret })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_and_parses() {
        let uid = UniqueId {
            root: "127.0.0.1:4242".parse().unwrap(),
            secret: [0xab; SECRET_BYTES],
        };
        let text = uid.to_string();
        assert_eq!(text, format!("m2n1@127.0.0.1:4242#{}", "ab".repeat(16)));
        assert_eq!(text.parse::<UniqueId>().unwrap(), uid);
        let v6: UniqueId = format!("m2n1@[::1]:9#{}", "00".repeat(16)).parse().unwrap();
        assert_eq!(v6.root.port(), 9);
        assert!(
            !format!("{uid:?}").contains("abab"),
            "debug output leaks the secret"
        );
    }

    #[test]
    fn bad_ids_say_what_is_wrong() {
        for (text, needle) in [
            ("nccl@1.2.3.4:5#00", "m2n1@"),
            ("m2n1@1.2.3.4:5", "'#'"),
            ("m2n1@nohost#00", "root address"),
            ("m2n1@1.2.3.4:5#zz", "hex digits"),
        ] {
            let err = text.parse::<UniqueId>().unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }
}
