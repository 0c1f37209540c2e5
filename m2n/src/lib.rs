pub mod bootstrap;
pub mod codec;
pub mod group;
pub mod proto;
pub mod transport;
