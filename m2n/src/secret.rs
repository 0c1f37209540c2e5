//! Shared secrets: the random one a group's ranks prove to the root and to
//! each other, and a comparison whose time does not depend on where two
//! secrets differ. At the bottom: the rendezvous, the transports' links
//! and the liveness links all use it.

use std::io;

/// The secret every rank must present (the unique id carries it).
pub const SECRET_BYTES: usize = 16;

/// A fresh random secret.
pub fn random_secret() -> io::Result<[u8; SECRET_BYTES]> {
    let mut s = [0u8; SECRET_BYTES];
    getrandom::getrandom(&mut s).map_err(|e| io::Error::other(e.to_string()))?;
    Ok(s)
}

/// Compares secrets in time independent of where they differ.
pub fn secrets_match(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_secrets_match_and_others_do_not() {
        let s = random_secret().unwrap();
        assert!(secrets_match(&s, &s));
        let mut t = s;
        t[SECRET_BYTES - 1] ^= 1;
        assert!(!secrets_match(&s, &t));
        assert!(!secrets_match(&s, &s[..SECRET_BYTES - 1]));
        assert_ne!(random_secret().unwrap(), s);
    }
}
