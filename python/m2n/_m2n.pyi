"""Type stubs of the extension module `m2n._m2n` (the Rust half of the package)."""

from __future__ import annotations

__version__: str

class Error(Exception):
    """Base class of every m2n failure."""

class ConfigError(Error):
    """A bad configuration value (the message names the setting and why)."""

class BootstrapError(Error):
    """The rendezvous failed: the root was unreachable, rejected this rank, or timed out."""

class PeerLost(Error):
    """A peer on the other side died, hung past the peer timeout, or left."""

    peer_role: str
    """'attention' or 'expert'."""
    peer_rank: int
    """The peer's rank on its side."""
    reason: str
    """Why it counts as lost (killed, closed, silent past the peer timeout)."""

class Timeout(Error):
    """A blocking call's timeout passed (nothing was lost: the call can be repeated)."""

class Aborted(Error):
    """The communicator was aborted; every later call fails with this."""

class InvalidArgument(Error):
    """An argument is wrong: a message outside its memory, a dtype or shape that does not fit."""

class UsageError(Error):
    """A call that does not fit the communicator's role or state (a released round, ...)."""

class ProtocolError(Error):
    """A peer broke the M2N protocol (the group cannot go on)."""

class TransportError(Error):
    """The transport failed (registration, a write, a corrupt descriptor)."""

class StreamError(Error):
    """A stream-ordered call could not be enqueued (no CUDA driver or GPU, a CUDA call failed)."""

class Root:
    """The rendezvous root of one group, served from a thread of this process."""

    def __init__(
        self, addr: str = "127.0.0.1:0", timeout: float = 60.0, unique_id: str | None = None
    ) -> None:
        """Bind `addr` (or the address of `unique_id`, keeping its secret) and serve."""
    @property
    def unique_id(self) -> str:
        """The id every rank passes to `Communicator` (address and secret)."""
    def wait(self) -> None:
        """Wait until the rendezvous is over; raise `BootstrapError` if it failed."""

class Memory:
    """Registered memory: a source of messages; keeps its owner alive while registered."""

    @property
    def key(self) -> int:
        """The handle of this registration within its communicator."""
    @property
    def comm_id(self) -> int:
        """The `id` of the communicator it was registered with."""
    @property
    def ptr(self) -> int:
        """The address of the first byte (a device address for GPU memory)."""
    @property
    def nbytes(self) -> int:
        """The size in bytes."""
    @property
    def device(self) -> bool:
        """Whether this is GPU memory."""
    @property
    def owner(self) -> object | None:
        """The object it was registered from (None for `Communicator.alloc`)."""
    def __len__(self) -> int: ...

def make_unique_id(addr: str) -> str:
    """A fresh unique id for a root at `addr` that is not yet bound."""

_Msgs = list[tuple[int, int, int] | None]
_RoundInfo = tuple[int, int, list[int], list[int]]

class Comm:
    """The communicator that `m2n.Communicator` wraps (channels: 0 dispatch, 1 combine)."""

    def __init__(
        self,
        role: str,
        rank: int,
        shape: tuple[int, int],
        unique_id: str,
        config: list[tuple[str, str]] | None = None,
    ) -> None:
        """Join the group (blocks, GIL released, until every rank has)."""
    @property
    def id(self) -> int:
        """A number unique to this communicator in this process."""
    @property
    def role(self) -> str:
        """'attention' or 'expert'."""
    @property
    def rank(self) -> int:
        """The index of this rank on its side."""
    @property
    def shape(self) -> tuple[int, int]:
        """(M, N)."""
    @property
    def transport(self) -> str:
        """shm, tcp, verbs, fabric or cuda-ipc."""
    @property
    def transport_detail(self) -> str:
        """What the transport runs on."""
    @property
    def rings_on_gpu(self) -> bool:
        """Whether this rank's receive ring is GPU memory."""
    @property
    def closed(self) -> bool:
        """Whether `close` was called."""
    def register_host(self, ptr: int, nbytes: int, owner: object) -> Memory:
        """Register host memory at `ptr`, keeping `owner` alive."""
    def register_device(self, dptr: int, nbytes: int, owner: object) -> Memory:
        """Register CUDA device memory at `dptr`, keeping `owner` alive."""
    def alloc(self, nbytes: int) -> Memory:
        """Allocate registered host memory from the transport."""
    def deregister(self, mem: Memory) -> None:
        """Deregister `mem` (refused while a round sent from it is in flight)."""
    def send(self, ch: int, msgs: _Msgs, timeout: float | None = None) -> int:
        """Post the next round, waiting for credit."""
    def try_send(self, ch: int, msgs: _Msgs) -> int | None:
        """Post the next round if credit allows."""
    def is_sent(self, ch: int, round: int) -> bool:
        """Whether every write of `round` has completed."""
    def wait_sent(self, ch: int, round: int, timeout: float | None = None) -> None:
        """Wait until `round` is sent."""
    def recv(self, ch: int, timeout: float | None = None) -> _RoundInfo:
        """Wait for the next round: (key, number, addresses, lengths)."""
    def try_recv(self, ch: int) -> _RoundInfo | None:
        """The next round if it is in."""
    def release(self, ch: int, key: int) -> None:
        """Hand a received round back."""
    def progress(self) -> bool:
        """Move whatever can move now."""
    def send_on_stream(self, ch: int, msgs: _Msgs, stream: int) -> int:
        """Enqueue the next round on a CUDA stream."""
    def recv_on_stream(self, ch: int, stream: int) -> tuple[int, int, list[int], int]:
        """Enqueue a receive on a CUDA stream: (key, number, addresses, slot bytes)."""
    def stream_round_lens(self, key: int) -> list[int] | None:
        """A stream round's lengths once the host has seen it arrive."""
    def release_on_stream(self, ch: int, key: int, stream: int) -> None:
        """Enqueue the release of a stream round on a CUDA stream."""
    def set_stream_mode(self, ch: int, mode: str, stream: int) -> None:
        """Set the stream mode ('sequence' or 'graph-safe') of this rank's side of `ch`."""
    def stream_mode(self, ch: int) -> str:
        """The stream mode of this rank's side of `ch`."""
    def start_proxy(self) -> None:
        """Start a thread that drives progress."""
    def stop_proxy(self) -> None:
        """Stop the proxy thread; raise the failure it stopped on, if any."""
    def abort(self) -> None:
        """Abort: peers see this rank as lost at once."""
    def close(self) -> None:
        """Leave the group cleanly and free everything registered."""
    def credit_writes(self) -> int:
        """Credit writes this rank has posted as a receiver."""
