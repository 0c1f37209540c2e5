//! m2n: zero-copy M-to-N communication for disaggregated Mixture-of-Experts
//! inference.
//!
//! Layers, top to bottom: [`comm`] (the public API), [`proto`] (the M2N
//! protocol, sans-IO), [`transport`] (one-sided writes: `shm`), and
//! [`bootstrap`] (rendezvous). See the README for the configuration table.

pub mod bootstrap;
pub mod clock;
pub mod codec;
pub mod comm;
pub mod config;
/// The fuzz targets' entry points (`m2n/fuzz`): only with the `fuzzing`
/// feature (and in this crate's tests, which check the seed corpus).
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzz_api;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod group;
pub mod pattern;
pub mod proto;
pub mod secret;
pub mod stream;
pub mod transport;
pub mod wait;

pub use bootstrap::{Root, UniqueId};
pub use comm::{Channel, Communicator, Error, Msg, Proxy, RecvRound, Result};
pub use config::{ChannelConfig, Config, WaitPolicy};
pub use group::{Peer, Role, Shape};
pub use transport::{Region, TransportKind};

/// The README's example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
