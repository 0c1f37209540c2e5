pub mod codec;
pub mod proto;
