pub mod codec;
pub mod proto;
pub mod transport;
