//! Who is who in an M2N group.

use std::fmt;

/// Which side of the group a process is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Sends on dispatch, receives on combine (the M side).
    Attention,
    /// Receives on dispatch, sends on combine (the N side).
    Expert,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Attention => "attention",
            Role::Expert => "expert",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "attention" | "sender" | "a" => Ok(Role::Attention),
            "expert" | "receiver" | "e" => Ok(Role::Expert),
            other => Err(format!(
                "unknown role {other:?}: expected attention or expert"
            )),
        }
    }
}

/// The group shape: M attention ranks and N expert ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub attention: usize,
    pub experts: usize,
}

impl Shape {
    pub fn new(attention: usize, experts: usize) -> Self {
        Self { attention, experts }
    }
    pub fn world(&self) -> usize {
        self.attention + self.experts
    }
    /// Ranks on `role`'s side.
    pub fn side(&self, role: Role) -> usize {
        match role {
            Role::Attention => self.attention,
            Role::Expert => self.experts,
        }
    }
    /// Global rank: attention ranks first, then experts.
    pub fn global(&self, role: Role, rank: usize) -> usize {
        match role {
            Role::Attention => rank,
            Role::Expert => self.attention + rank,
        }
    }
    /// The (role, rank) of a global rank.
    pub fn member(&self, global: usize) -> (Role, usize) {
        if global < self.attention {
            (Role::Attention, global)
        } else {
            (Role::Expert, global - self.attention)
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.attention, self.experts)
    }
}

/// A member of the group, for messages: "expert 2".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub role: Role,
    pub rank: usize,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.rank)
    }
}
