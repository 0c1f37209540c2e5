use thiserror::Error;

use crate::bootstrap::BootstrapError;
use crate::config::ConfigError;
use crate::group::Peer;
use crate::proto::ProtoError;
use crate::transport::TransportError;

/// Everything the public API can fail with.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Bootstrap(#[from] BootstrapError),
    #[error("transport error{}: {source}", peer.map(|p| format!(" with {p}")).unwrap_or_default())]
    Transport {
        peer: Option<Peer>,
        #[source]
        source: TransportError,
    },
    #[error("protocol violation by {peer}: {source}")]
    Protocol {
        peer: Peer,
        #[source]
        source: ProtoError,
    },
    /// A peer died, hung, or left; raised on every operation that needs it.
    #[error("peer lost: {peer}: {reason}")]
    PeerLost { peer: Peer, reason: String },
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout {
        what: String,
        waited: std::time::Duration,
    },
    /// The call does not fit the communicator's role or state.
    #[error("invalid use: {0}")]
    Usage(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("the communicator was aborted")]
    Aborted,
    /// A stream-ordered operation could not be enqueued (no CUDA driver,
    /// a CUDA call failed, streams of different kinds mixed).
    #[error("stream: {0}")]
    Stream(#[from] crate::stream::StreamError),
}

impl Error {
    /// The peer a failure is about, if any.
    pub fn peer(&self) -> Option<Peer> {
        match self {
            Error::Protocol { peer, .. } | Error::PeerLost { peer, .. } => Some(*peer),
            Error::Transport { peer, .. } => *peer,
            _ => None,
        }
    }
}

/// A shorthand for results of the public API.
pub type Result<T, E = Error> = std::result::Result<T, E>;
