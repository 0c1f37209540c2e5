use thiserror::Error;

/// A protocol violation or misuse, always naming the peer or argument involved.
///
/// Peers are named by their index on the channel's sending side (`sender`) or
/// receiving side (`receiver`); the communicator maps them to ranks.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtoError {
    #[error("invalid channel geometry: {0}")]
    InvalidGeometry(String),
    #[error(
        "immediate from peer {peer} names sender {claimed}, but the channel has {senders} senders"
    )]
    UnknownSender {
        peer: usize,
        claimed: usize,
        senders: usize,
    },
    #[error("immediate from peer {peer} claims to come from sender {claimed} (misrouted write)")]
    Misrouted { peer: usize, claimed: usize },
    #[error("immediate from sender {peer} is for the {got:?} channel, expected {expected:?}")]
    WrongChannel {
        peer: usize,
        got: super::ChannelId,
        expected: super::ChannelId,
    },
    #[error(
        "stale write from sender {peer}: round bits {round_bits:#x}, expected round {expected}"
    )]
    StaleRound {
        peer: usize,
        round_bits: u16,
        expected: u64,
    },
    #[error(
        "future write from sender {peer}: round bits {round_bits:#x}, expected round {expected}"
    )]
    FutureRound {
        peer: usize,
        round_bits: u16,
        expected: u64,
    },
    #[error(
        "write from sender {peer} names slot {slot}, expected slot {expected} for round {round}"
    )]
    WrongSlot {
        peer: usize,
        slot: usize,
        expected: usize,
        round: u64,
    },
    #[error("write from sender {peer} is {len} bytes, over the slot size of {slot_bytes}")]
    TooLong {
        peer: usize,
        len: usize,
        slot_bytes: usize,
    },
    #[error("sender {peer} wrote round {round} without credit (receiver released up to round {consumed}, depth {depth})")]
    CreditOverrun {
        peer: usize,
        round: u64,
        consumed: u64,
        depth: usize,
    },
    #[error(
        "receiver {peer} returned credit for {consumed} rounds, but only {sent} were sent to it"
    )]
    BogusCredit {
        peer: usize,
        consumed: u64,
        sent: u64,
    },
    #[error("message for receiver {receiver} is {len} bytes, over the slot size of {slot_bytes}")]
    MessageTooLarge {
        receiver: usize,
        len: usize,
        slot_bytes: usize,
    },
    #[error(
        "a round needs exactly one message per receiver: got {got}, the channel has {receivers}"
    )]
    WrongMessageCount { got: usize, receivers: usize },
    #[error("round {round} cannot be released: {why}")]
    BadRelease { round: u64, why: &'static str },
}
