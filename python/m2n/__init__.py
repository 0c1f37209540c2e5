"""m2n: zero-copy M-to-N communication for disaggregated Mixture-of-Experts inference.

M attention ranks *dispatch* token activations to N expert ranks every
layer, and the experts *combine* their results back. Senders write straight
into pre-registered receive rings on the receivers; a received round hands
out zero-copy views (torch tensors, numpy arrays, memoryviews) of those
rings until it is released, which returns credit to the senders.

    import m2n, torch
    comm = m2n.init_from_torch(attention=2)        # under torchrun
    x = torch.zeros(2, 1024)
    comm.register(x)                               # zero-copy source
    if comm.role == m2n.ATTENTION:
        comm.dispatch.send([x[0], x[1]])           # one message per expert
        with comm.combine.recv() as rnd:
            y = rnd.tensor(0, torch.float32, (1024,))

Errors are exceptions under `m2n.Error`: `PeerLost` (naming the peer),
`Timeout`, `Aborted`, `ConfigError`, `InvalidArgument`, `UsageError`, ...
"""

from __future__ import annotations

import ctypes
import functools
import gc
import itertools
import os
import socket
import sys
import weakref
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Union

from . import _m2n
from ._m2n import (
    Aborted,
    BootstrapError,
    ConfigError,
    Error,
    InvalidArgument,
    Memory,
    PeerLost,
    ProtocolError,
    Root,
    StreamError,
    Timeout,
    TransportError,
    UsageError,
    __version__,
)

__all__ = [
    "ATTENTION",
    "EXPERT",
    "Aborted",
    "BootstrapError",
    "Channel",
    "Communicator",
    "ConfigError",
    "Error",
    "InvalidArgument",
    "Memory",
    "PeerLost",
    "ProtocolError",
    "Root",
    "Round",
    "STREAM_GRAPH_SAFE",
    "STREAM_SEQUENCE",
    "StreamError",
    "StreamRound",
    "Timeout",
    "TransportError",
    "UsageError",
    "__version__",
    "init_from_env",
    "init_from_torch",
    "unique_id",
]

ATTENTION = "attention"
"""The attention side (M ranks): sends on dispatch, receives on combine."""
EXPERT = "expert"
"""The expert side (N ranks): receives on dispatch, sends on combine."""

STREAM_SEQUENCE = "sequence"
"""Stream mode (the default): each stream-ordered operation waits for and
writes its own sequence number; a captured CUDA graph cannot be replayed."""
STREAM_GRAPH_SAFE = "graph-safe"
"""Stream mode: constant values on per-slot handshake flags, so a CUDA graph
that captured a whole ring cycle of a side's operations replays
(`Channel.set_stream_mode`)."""

Message = Any
"""One message of a round: None (empty), a registered tensor / array / buffer
or a view inside one, a `Memory`, or a `(Memory, offset, nbytes)` tuple."""


def unique_id(addr: str) -> str:
    """Make a fresh unique id for a root at `addr` ("ip:port") that nobody serves yet.

    A launcher prints it and hands it to every rank (`M2N_UNIQUE_ID`); the
    rank on that host serves it (`init_from_env` does so on rank 0).
    """
    return _m2n.make_unique_id(addr)


# ---------------------------------------------------------------------------
# Addresses of tensors, arrays and buffers
# ---------------------------------------------------------------------------


def _torch() -> Any:
    return sys.modules.get("torch")


def _is_tensor(obj: object) -> bool:
    torch = _torch()
    return torch is not None and isinstance(obj, torch.Tensor)


def _address(obj: object) -> tuple[int, int, bool]:
    """Where `obj`'s bytes are: (address, nbytes, on a GPU)."""
    if _is_tensor(obj):
        t: Any = obj
        if not t.is_contiguous():
            raise InvalidArgument(
                f"a tensor of shape {tuple(t.shape)} and strides {t.stride()} is not contiguous: "
                "m2n sends contiguous bytes (use .contiguous() on a registered copy)"
            )
        return t.data_ptr(), t.numel() * t.element_size(), t.device.type == "cuda"
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is not None:
        raise InvalidArgument(
            "CUDA arrays other than torch tensors are not supported: pass a torch tensor "
            "(torch.as_tensor(x, device='cuda') shares its memory)"
        )
    ai = getattr(obj, "__array_interface__", None)
    if ai is not None:
        arr: Any = obj
        if not (arr.flags["C_CONTIGUOUS"] or arr.flags["F_CONTIGUOUS"]):
            raise InvalidArgument(
                f"an array of shape {arr.shape} and strides {arr.strides} is not contiguous"
            )
        return int(ai["data"][0]), int(arr.nbytes), False
    try:
        mv = memoryview(obj)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgument(
            f"{type(obj).__name__} is not a tensor, an array or a buffer"
        ) from None
    if not mv.contiguous:
        raise InvalidArgument("the buffer is not contiguous")
    if mv.nbytes == 0:
        return 0, 0, False
    if mv.readonly:
        raise InvalidArgument(
            f"a {type(obj).__name__} is read-only: m2n registers writable memory "
            "(use a bytearray, a numpy array or a tensor)"
        )
    return ctypes.addressof(ctypes.c_char.from_buffer(mv)), mv.nbytes, False


@functools.lru_cache(maxsize=256)
def _slot_type(nbytes: int) -> type[ctypes.Array[ctypes.c_ubyte]]:
    # A subclass, so that an instance can hold a reference to its round:
    # every view of a message keeps the round (and its communicator, whose
    # rings it points into) alive.
    return type("_Slot", (ctypes.c_ubyte * nbytes,), {"__slots__": ("round",)})


def _itemsize(dtype: Any) -> int:
    torch = _torch()
    if torch is not None and isinstance(dtype, torch.dtype):
        return int(torch.empty((), dtype=dtype).element_size())
    import numpy as np

    return int(np.dtype(dtype).itemsize)


def _fit(sender: int, nbytes: int, dtype: Any, shape: Sequence[int] | None) -> tuple[int, ...]:
    """The shape of a message viewed as `dtype`, checked against its size."""
    size = _itemsize(dtype)
    if nbytes % size:
        raise InvalidArgument(
            f"sender {sender}'s message is {nbytes} bytes, not a whole number of "
            f"{dtype} elements ({size} bytes each)"
        )
    count = nbytes // size
    if shape is None:
        return (count,)
    dims = tuple(int(d) for d in shape)
    free = [i for i, d in enumerate(dims) if d == -1]
    known = 1
    for d in dims:
        if d != -1:
            if d < 0:
                raise InvalidArgument(f"shape {dims} has a negative dimension")
            known *= d
    if len(free) > 1:
        raise InvalidArgument(f"shape {dims} has more than one -1")
    if free:
        if known == 0 or count % known:
            raise InvalidArgument(
                f"sender {sender}'s message has {count} {dtype} elements: "
                f"not a whole number of shape {dims}"
            )
        dims = tuple(count // known if d == -1 else d for d in dims)
    elif known != count:
        raise InvalidArgument(
            f"sender {sender}'s message has {count} {dtype} elements "
            f"({nbytes} bytes), shape {dims} needs {known}"
        )
    return dims


def _refs(entry: list[Any]) -> int:
    """References to an export (entry[0]); views of a message add to them."""
    return sys.getrefcount(entry[0])


class _CudaBytes:
    """`__cuda_array_interface__` of device bytes, for torch.as_tensor."""

    def __init__(self, ptr: int, nbytes: int, owner: object) -> None:
        self.owner = owner
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }


def _cuda_tensor(ptr: int, nbytes: int, dtype: Any, dims: tuple[int, ...], owner: object) -> Any:
    torch = _torch()
    if torch is None:
        raise UsageError("the messages are in GPU memory: import torch to view them")
    if nbytes == 0:
        return torch.empty(dims, dtype=dtype, device="cuda")
    raw = torch.as_tensor(_CudaBytes(ptr, nbytes, owner), device="cuda")
    return raw.view(dtype).view(dims)


# ---------------------------------------------------------------------------
# Rounds
# ---------------------------------------------------------------------------


class Round:
    """A received round: every sender's message is in this rank's ring.

    Views (`tensor`, `numpy`, `memoryview`) are zero-copy and valid until
    `release()`, which returns the slots to the senders as credit. Release
    refuses while a view is still alive, so a view can never read a slot
    that a sender is already reusing: drop views (or copy them) first. Use
    it as a context manager to release on exit.
    """

    __slots__ = (
        "__weakref__",
        "_addrs",
        "_ch",
        "_comm",
        "_exports",
        "_key",
        "lens",
        "number",
    )

    def __init__(
        self, comm: Communicator, ch: int, info: tuple[int, int, list[int], list[int]]
    ) -> None:
        self._comm = comm
        self._ch = ch
        self._key, self.number, self._addrs, lens = info
        self.lens: list[int] | None = lens
        """Each sender's message length in bytes (None once released)."""
        self._exports: list[list[Any]] = []

    def __repr__(self) -> str:
        state = "released" if self.lens is None else f"lens={self.lens}"
        return f"m2n.Round({self.number}, {state})"

    def __len__(self) -> int:
        """The number of senders (one message each)."""
        return len(self._addrs)

    def _live(self) -> list[int]:
        if self.lens is None:
            raise UsageError(f"round {self.number} was released: its views are gone")
        return self.lens

    def _sender(self, sender: int) -> int:
        lens = self._live()
        if not isinstance(sender, int) or not 0 <= sender < len(lens):
            raise InvalidArgument(f"sender {sender!r} is outside 0..{len(lens) - 1}")
        return lens[sender]

    def nbytes(self, sender: int) -> int:
        """The length of `sender`'s message in bytes."""
        return self._sender(sender)

    def _export(self, sender: int) -> Any:
        n = self._sender(sender)
        if self._comm._c.rings_on_gpu:
            raise UsageError(
                "this rank's rings are GPU memory (cuda-ipc): view messages with tensor()"
            )
        slot: Any = _slot_type(n).from_address(self._addrs[sender])
        slot.round = self
        entry = [slot, sender, 0]
        del slot
        self._exports.append(entry)
        entry[2] = _refs(entry)  # the baseline: views add to it
        return entry[0]

    def memoryview(self, sender: int) -> memoryview:
        """A zero-copy byte view of `sender`'s message."""
        return memoryview(self._export(sender)).cast("B")

    def bytes(self, sender: int) -> bytes:
        """A copy of `sender`'s message."""
        if self._comm._c.rings_on_gpu:
            return bytes(self.tensor(sender).cpu().numpy().tobytes())
        n = self._sender(sender)
        return ctypes.string_at(self._addrs[sender], n)

    def numpy(self, sender: int, dtype: Any = "uint8", shape: Sequence[int] | None = None) -> Any:
        """`sender`'s message as a zero-copy numpy array of `dtype` and `shape`."""
        import numpy as np

        dims = _fit(sender, self._sender(sender), dtype, shape)
        return np.frombuffer(self._export(sender), dtype=dtype).reshape(dims)

    def tensor(self, sender: int, dtype: Any = None, shape: Sequence[int] | None = None) -> Any:
        """`sender`'s message as a zero-copy torch tensor of `dtype` (default uint8) and `shape`.

        A CUDA tensor where the rings are GPU memory (cuda-ipc).
        """
        import torch

        dtype = torch.uint8 if dtype is None else dtype
        n = self._sender(sender)
        dims = _fit(sender, n, dtype, shape)
        if self._comm._c.rings_on_gpu:
            return _cuda_tensor(self._addrs[sender], n, dtype, dims, self)
        if n == 0:
            return torch.empty(dims, dtype=dtype)
        raw = torch.frombuffer(self._export(sender), dtype=torch.uint8)
        return raw.view(dtype).view(dims)

    def tensors(self, dtype: Any = None, shape: Sequence[int] | None = None) -> list[Any]:
        """Every sender's message as a tensor (see `tensor`)."""
        return [self.tensor(s, dtype, shape) for s in range(len(self._live()))]

    def arrays(self, dtype: Any = "uint8", shape: Sequence[int] | None = None) -> list[Any]:
        """Every sender's message as a numpy array (see `numpy`)."""
        return [self.numpy(s, dtype, shape) for s in range(len(self._live()))]

    def _views_alive(self) -> list[int]:
        return sorted({e[1] for e in self._exports if _refs(e) > e[2]})

    def release(self) -> None:
        """Hand the round back; its slots return to the senders as credit.

        Raises `UsageError` if a view of it is still alive (drop it, or copy
        it first) or it was released already.
        """
        self._live()
        alive = self._views_alive()
        if alive:
            gc.collect()
            alive = self._views_alive()
        if alive:
            raise UsageError(
                f"round {self.number}: views of the messages of sender(s) {alive} are still "
                "alive; drop them (del) or copy them (.clone(), .copy(), bytes()) before release"
            )
        self._comm._c.release(self._ch, self._key)
        self.lens = None
        for entry in self._exports:
            entry[0].round = None
        self._exports.clear()

    def __enter__(self) -> Round:
        """Use the round; it is released on exit."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Release the round (on an exception, only if no view is alive)."""
        if self.lens is None:
            return
        if exc_type is not None and self._views_alive():
            return
        self.release()


class StreamRound:
    """A receive enqueued on a CUDA stream; its messages are there for work enqueued after it."""

    __slots__ = ("_addrs", "_ch", "_comm", "_key", "_released", "number", "slot_bytes")

    def __init__(self, comm: Communicator, ch: int, info: tuple[int, int, list[int], int]) -> None:
        self._comm = comm
        self._ch = ch
        self._key, self.number, self._addrs, self.slot_bytes = info
        self._released = False

    def __repr__(self) -> str:
        return f"m2n.StreamRound({self.number})"

    def _check(self, sender: int) -> None:
        if self._released:
            raise UsageError(f"stream round {self.number} was released")
        if not isinstance(sender, int) or not 0 <= sender < len(self._addrs):
            raise InvalidArgument(f"sender {sender!r} is outside 0..{len(self._addrs) - 1}")

    def data_ptr(self, sender: int) -> int:
        """Where `sender`'s message is, as work on the stream sees it."""
        self._check(sender)
        return self._addrs[sender]

    def lens(self) -> list[int] | None:
        """The messages' lengths once the host has seen the round arrive, else None."""
        if self._released:
            raise UsageError(f"stream round {self.number} was released")
        return self._comm._c.stream_round_lens(self._key)

    def tensor(self, sender: int, dtype: Any, shape: Sequence[int]) -> Any:
        """`sender`'s message as a CUDA tensor of `dtype` and `shape` (read it on the stream)."""
        self._check(sender)
        dims = tuple(int(d) for d in shape)
        n = _itemsize(dtype)
        for d in dims:
            n *= d
        if n > self.slot_bytes:
            raise InvalidArgument(
                f"shape {dims} of {dtype} is {n} bytes; a message is at most {self.slot_bytes}"
            )
        return _cuda_tensor(self._addrs[sender], n, dtype, dims, self)

    def release_on_stream(self, stream: Any = None) -> None:
        """Enqueue the release on `stream`: the slots return once work before it is done."""
        if self._released:
            raise UsageError(f"stream round {self.number} was released already")
        self._comm._c.release_on_stream(self._ch, self._key, _stream_handle(stream))
        self._released = True


def _stream_handle(stream: Any) -> int:
    """A CUstream from an int, a torch.cuda.Stream, or None (torch's current stream)."""
    if isinstance(stream, int):
        return stream
    if stream is None:
        torch = _torch()
        if torch is None or not torch.cuda.is_available():
            raise StreamError("no stream given and no CUDA device for torch's current stream")
        return int(torch.cuda.current_stream().cuda_stream)
    handle = getattr(stream, "cuda_stream", None)
    if handle is None:
        raise InvalidArgument(
            f"{type(stream).__name__} is not a CUDA stream (an int or a torch.cuda.Stream)"
        )
    return int(handle)


# ---------------------------------------------------------------------------
# Channels and the communicator
# ---------------------------------------------------------------------------


class Channel:
    """One channel of a communicator: dispatch (attention to experts) or combine (back).

    A rank sends on one channel and receives on the other; the wrong
    direction raises `UsageError`.
    """

    __slots__ = ("_c", "_comm", "_id", "name")

    def __init__(self, comm: Communicator, ch: int, name: str) -> None:
        self._comm = comm
        self._c = comm._c
        self._id = ch
        self.name = name

    def __repr__(self) -> str:
        return f"m2n.Channel({self.name})"

    def send(self, msgs: Sequence[Message], timeout: float | None = None) -> int:
        """Post the next round, one message per receiver; waits for credit. Returns its number.

        The bytes must stay unchanged until `is_sent` says so (`wait_sent`).
        """
        return self._c.send(self._id, self._comm._messages(msgs), timeout)

    def try_send(self, msgs: Sequence[Message]) -> int | None:
        """Post the next round if every receiver has credit; None otherwise."""
        return self._c.try_send(self._id, self._comm._messages(msgs))

    def is_sent(self, round: int) -> bool:
        """Whether every write of `round` has completed (its bytes may change)."""
        return self._c.is_sent(self._id, round)

    def wait_sent(self, round: int, timeout: float | None = None) -> None:
        """Wait until `round` is sent."""
        self._c.wait_sent(self._id, round, timeout)

    def recv(self, timeout: float | None = None) -> Round:
        """Wait for the next complete round (None: no limit; Ctrl-C interrupts)."""
        return self._comm._track(Round(self._comm, self._id, self._c.recv(self._id, timeout)))

    def try_recv(self) -> Round | None:
        """The next complete round if it is in, else None."""
        info = self._c.try_recv(self._id)
        return None if info is None else self._comm._track(Round(self._comm, self._id, info))

    def send_on_stream(self, msgs: Sequence[Message], stream: Any = None) -> int:
        """Enqueue the next round on a CUDA stream (a torch.cuda.Stream, a CUstream int, or None).

        Its writes are posted once work enqueued before is done; work
        enqueued after waits until the bytes have left. Needs progress
        (`Communicator.start_proxy`, or the blocking calls).
        """
        return self._c.send_on_stream(self._id, self._comm._messages(msgs), _stream_handle(stream))

    def recv_on_stream(self, stream: Any = None) -> StreamRound:
        """Enqueue a receive on a CUDA stream: work enqueued after it sees the round."""
        return StreamRound(
            self._comm, self._id, self._c.recv_on_stream(self._id, _stream_handle(stream))
        )

    @property
    def stream_mode(self) -> str:
        """The stream mode of this rank's side: `STREAM_SEQUENCE` or `STREAM_GRAPH_SAFE`."""
        return self._c.stream_mode(self._id)

    def set_stream_mode(self, mode: str, stream: Any = None) -> None:
        """Set how this rank's side of the channel runs its stream-ordered operations.

        `mode` is `STREAM_SEQUENCE` ("sequence", the default) or
        `STREAM_GRAPH_SAFE` ("graph-safe"); `stream` is the CUDA stream the
        operations will use (a torch.cuda.Stream, a CUstream int, or None:
        torch's current stream). In graph-safe mode `send_on_stream`,
        `recv_on_stream` and `StreamRound.release_on_stream` can be
        captured into a CUDA graph (torch.cuda.CUDAGraph) and the graph
        replayed: each replay is the next round, with the messages, offsets
        and lengths given at capture (a send carries what those bytes hold
        when the replay runs), and each receive reads the slot address it
        was captured with.

        Switch before the capture (it allocates; refused on a capturing
        stream, and while operations of the other mode are outstanding on
        this side). A recording must cover a whole ring cycle: a multiple
        of `depth` steps (or `depth` graphs replayed in rotation; with
        depth 1 one step replays alone); a slot signalled out of turn is a
        `UsageError` from progress (the proxy stops on it). On a graph-safe
        side the direct API (`send`, `try_send`, `recv`, `try_recv`) is
        refused with `UsageError`, every round goes to the streams, and the
        side's operations must run on one stream (or streams the caller
        orders). Progress must run (`Communicator.start_proxy`). An unknown
        mode is `InvalidArgument`; no CUDA driver or GPU is `StreamError`.
        """
        if mode not in (STREAM_SEQUENCE, STREAM_GRAPH_SAFE):
            raise InvalidArgument(
                f"stream mode {mode!r} is not {STREAM_SEQUENCE!r} or {STREAM_GRAPH_SAFE!r}"
            )
        self._c.set_stream_mode(self._id, mode, _stream_handle(stream))


_ConfigValue = Union[str, int, float, bool]


def _config_pairs(config: Mapping[str, _ConfigValue] | None) -> list[tuple[str, str]] | None:
    if config is None:
        return None
    pairs = []
    for k, v in config.items():
        if isinstance(v, bool):
            v = int(v)
        pairs.append((str(k), str(v)))
    return pairs


class Communicator:
    """One process's membership in an M x N group.

    `role` is `m2n.ATTENTION` or `m2n.EXPERT`, `rank` its index on that
    side, `shape` = (M, N), `unique_id` the root's id (a string or a
    `Root`). `config` maps settings to values, by the names of the README's
    configuration table with or without `M2N_` (`{"transport": "tcp",
    "depth": 8}`); `M2N_*` environment variables apply first. Blocks until
    every rank has joined.
    """

    def __init__(
        self,
        role: str,
        rank: int,
        shape: tuple[int, int],
        unique_id: str | Root,
        config: Mapping[str, _ConfigValue] | None = None,
    ) -> None:
        uid = unique_id.unique_id if isinstance(unique_id, Root) else unique_id
        m, n = shape
        self._c = _m2n.Comm(role, rank, (m, n), uid, _config_pairs(config))
        self._mems: list[Memory] = []
        self._rounds: weakref.WeakSet[Round] = weakref.WeakSet()
        self._root: Root | None = None
        self.dispatch = Channel(self, 0, "dispatch")
        """Attention ranks send here; expert ranks receive."""
        self.combine = Channel(self, 1, "combine")
        """Expert ranks send here; attention ranks receive."""

    def __repr__(self) -> str:
        state = " closed" if self._c.closed else ""
        return (
            f"m2n.Communicator({self.role} {self.rank} of {self.shape[0]}x{self.shape[1]} "
            f"over {self.transport}{state})"
        )

    @property
    def role(self) -> str:
        """`m2n.ATTENTION` or `m2n.EXPERT`."""
        return self._c.role

    @property
    def rank(self) -> int:
        """The index of this rank on its side."""
        return self._c.rank

    @property
    def shape(self) -> tuple[int, int]:
        """(M attention ranks, N expert ranks)."""
        return self._c.shape

    @property
    def peers(self) -> int:
        """The number of ranks on the other side (messages per round)."""
        m, n = self._c.shape
        return n if self._c.role == ATTENTION else m

    @property
    def transport(self) -> str:
        """The transport in use: shm, tcp, verbs, fabric or cuda-ipc."""
        return self._c.transport

    @property
    def transport_detail(self) -> str:
        """What the transport runs on (for verbs: device, port, GID, MTU)."""
        return self._c.transport_detail

    @property
    def sends_on(self) -> Channel:
        """The channel this rank sends on (dispatch for attention, combine for experts)."""
        return self.dispatch if self.role == ATTENTION else self.combine

    @property
    def receives_on(self) -> Channel:
        """The channel this rank receives on."""
        return self.combine if self.role == ATTENTION else self.dispatch

    # -- memory ------------------------------------------------------------

    def register(self, obj: Any) -> Memory:
        """Register a tensor, array or writable buffer as a source of messages (zero-copy).

        CPU tensors, numpy arrays and buffers by address; CUDA tensors by
        device pointer (`StreamError` without a CUDA driver). The object is
        kept alive until `deregister` or `close`. Views inside it (slices)
        can then be sent as messages.
        """
        ptr, nbytes, device = _address(obj)
        if nbytes == 0:
            raise InvalidArgument("cannot register an empty object")
        if device:
            mem = self._c.register_device(ptr, nbytes, obj)
        else:
            mem = self._c.register_host(ptr, nbytes, obj)
        self._mems.append(mem)
        return mem

    def alloc(self, nbytes: int) -> tuple[Memory, memoryview]:
        """Allocate registered host memory; returns it and a writable view of it."""
        mem = self._c.alloc(nbytes)
        self._mems.append(mem)
        view = memoryview((ctypes.c_ubyte * nbytes).from_address(mem.ptr)).cast("B")
        return mem, view

    def deregister(self, mem: Memory) -> None:
        """Deregister memory (refused while a round sent from it is in flight)."""
        self._c.deregister(mem)
        self._mems = [m for m in self._mems if m.key != mem.key]

    def _messages(self, msgs: Sequence[Message]) -> list[tuple[int, int, int] | None]:
        out: list[tuple[int, int, int] | None] = []
        for i, msg in enumerate(msgs):
            if msg is None:
                out.append(None)
            elif isinstance(msg, Memory):
                out.append((msg.key, 0, msg.nbytes))
            elif isinstance(msg, tuple):
                if len(msg) != 3 or not isinstance(msg[0], Memory):
                    raise InvalidArgument(f"message {i}: a tuple must be (Memory, offset, nbytes)")
                mem, off, n = msg
                out.append((mem.key, int(off), int(n)))
            else:
                out.append(self._resolve(i, msg))
        return out

    def _resolve(self, i: int, obj: object) -> tuple[int, int, int] | None:
        ptr, nbytes, device = _address(obj)
        if nbytes == 0:
            return None
        for mem in self._mems:
            if mem.device == device and mem.ptr <= ptr and ptr + nbytes <= mem.ptr + mem.nbytes:
                return (mem.key, ptr - mem.ptr, nbytes)
        where = "GPU" if device else "host"
        raise InvalidArgument(
            f"message {i}: {nbytes} bytes of {where} memory at {ptr:#x} are not inside memory "
            "registered with this communicator (register the tensor it is a view of)"
        )

    # -- rounds, progress ----------------------------------------------------

    def _track(self, rnd: Round) -> Round:
        self._rounds.add(rnd)
        return rnd

    def progress(self) -> bool:
        """Move whatever can move now (never blocks); whether anything did."""
        return self._c.progress()

    def start_proxy(self) -> None:
        """Start a thread that drives progress (stream-ordered calls need one)."""
        self._c.start_proxy()

    def stop_proxy(self) -> None:
        """Stop the proxy thread; raises the failure it stopped on, if any."""
        self._c.stop_proxy()

    def credit_writes(self) -> int:
        """Credit writes this rank has posted as a receiver."""
        return self._c.credit_writes()

    # -- lifetime ------------------------------------------------------------

    def abort(self) -> None:
        """Abort: peers see this rank as lost at once; later calls raise `Aborted`."""
        self._c.abort()

    def close(self) -> None:
        """Leave the group cleanly and free its memory. Idempotent.

        Raises `UsageError` while a view of a received round is alive (its
        memory would go with the communicator).
        """
        if self._c.closed:
            return
        for rnd in list(self._rounds):
            if rnd.lens is not None and rnd._views_alive():
                gc.collect()
                if rnd._views_alive():
                    raise UsageError(
                        f"round {rnd.number} still has live views: drop them before close()"
                    )
        self._c.close()
        self._mems.clear()

    @property
    def closed(self) -> bool:
        """Whether `close` was called."""
        return self._c.closed

    def __enter__(self) -> Communicator:
        """Use the communicator; it is closed on exit (aborted on an exception)."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close, or abort first when leaving on an exception so that peers fail fast."""
        if exc_type is not None:
            self.abort()
            try:
                self.close()
            except UsageError:
                pass
            return
        self.close()


# ---------------------------------------------------------------------------
# Launch: torchrun / torch.distributed, and mpiexec
# ---------------------------------------------------------------------------

_ids = itertools.count()


def _split(rank: int, world: int, attention: int | None) -> tuple[str, int, tuple[int, int]]:
    if attention is None:
        env = os.environ.get("M2N_ATTENTION")
        if env is not None:
            try:
                attention = int(env)
            except ValueError:
                raise ConfigError(f"M2N_ATTENTION={env!r}: expected a number of ranks") from None
        else:
            attention = max(1, world // 2)
    if not 1 <= attention < world:
        raise ConfigError(
            f"{attention} attention rank(s) out of a world of {world}: "
            "both sides need at least one rank"
        )
    shape = (attention, world - attention)
    if rank < attention:
        return ATTENTION, rank, shape
    return EXPERT, rank - attention, shape


def _env_int(*names: str) -> int | None:
    for name in names:
        value = os.environ.get(name)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                raise ConfigError(f"{name}={value!r}: expected an integer") from None
    return None


def _local_ip(toward: str) -> str:
    """The address of this host that reaches `toward` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((toward, 9))
            return str(s.getsockname()[0])
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def _root_addr(master: str | None, world: int) -> str:
    explicit = os.environ.get("M2N_BOOTSTRAP_ADDR")
    if explicit:
        return explicit
    local_world = _env_int("LOCAL_WORLD_SIZE")
    if master is None:
        host = "127.0.0.1" if local_world == world else _local_ip("8.8.8.8")
    else:
        host = _local_ip(master)
    return f"{host}:0"


def _torch_store(rank: int, world: int, timeout: float) -> Any:
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed import (  # type: ignore[attr-defined]  # re-exported from torch._C
        PrefixStore,
        Store,
        TCPStore,
    )

    if dist.is_initialized():
        return dist.distributed_c10d._get_default_store()
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} not set: run under torchrun, or initialise torch.distributed"
        )
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store: Store = TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=rank == 0 and not agent,
        timeout=timedelta(seconds=timeout),
    )
    if agent:
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = PrefixStore(f"/worker/attempt_{attempt}", store)
    return store


def init_from_torch(
    attention: int | None = None,
    *,
    config: Mapping[str, _ConfigValue] | None = None,
    timeout: float = 120.0,
) -> Communicator:
    """Form an M x N group from torchrun's environment or an initialised torch.distributed.

    Global ranks 0..M-1 are attention ranks, M.. the experts; M is
    `attention`, else `M2N_ATTENTION`, else half the world. Rank 0 hosts
    the rendezvous root and publishes its unique id through torch's store
    (torchrun's agent store, or the default group's), so `torchrun
    --nproc-per-node 4 app.py` (and `--nnodes` across hosts) needs no
    other launcher.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        r, w = _env_int("RANK"), _env_int("WORLD_SIZE")
        if r is None or w is None:
            raise ConfigError(
                "RANK and WORLD_SIZE are not set and torch.distributed is not initialised: "
                "run under torchrun"
            )
        rank, world = r, w
    role, side_rank, shape = _split(rank, world, attention)
    store = _torch_store(rank, world, timeout)
    key = f"m2n/unique_id/{next(_ids)}"
    root = None
    if rank == 0:
        root = Root(_root_addr(os.environ.get("MASTER_ADDR"), world), timeout)
        store.set(key, root.unique_id)
        uid = root.unique_id
    else:
        uid = store.get(key).decode()
    comm = Communicator(role, side_rank, shape, uid, config)
    comm._root = root
    return comm


def init_from_env(
    attention: int | None = None,
    *,
    config: Mapping[str, _ConfigValue] | None = None,
    timeout: float = 120.0,
) -> Communicator:
    r"""Form an M x N group under mpiexec (or any launcher that sets ranks in the environment).

    The rank and world come from PMI_RANK / PMI_SIZE (MPICH), OMPI_COMM_WORLD_RANK
    / _SIZE (Open MPI) or RANK / WORLD_SIZE; the unique id from
    `M2N_UNIQUE_ID`, made by `python -m m2n unique-id HOST:PORT`, which rank 0
    (on HOST) serves:

        M2N_UNIQUE_ID=$(python -m m2n unique-id 10.0.0.1:29600) \\
            mpiexec -n 4 -genv M2N_UNIQUE_ID python app.py
    """
    rank = _env_int("PMI_RANK", "OMPI_COMM_WORLD_RANK", "RANK")
    world = _env_int("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "WORLD_SIZE")
    if rank is None or world is None:
        raise ConfigError("no rank in the environment (PMI_RANK, OMPI_COMM_WORLD_RANK or RANK)")
    uid = os.environ.get("M2N_UNIQUE_ID")
    if not uid:
        raise ConfigError(
            "M2N_UNIQUE_ID is not set: make one with `python -m m2n unique-id HOST:PORT` "
            "and pass it to every rank"
        )
    role, side_rank, shape = _split(rank, world, attention)
    root = Root(unique_id=uid, timeout=timeout) if rank == 0 else None
    comm = Communicator(role, side_rank, shape, uid, config)
    comm._root = root
    return comm
