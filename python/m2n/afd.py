"""An m2n connector for vLLM's attention-FFN disaggregation plugin (`afd_plugin`).

`M2NAFDConnector` implements the plugin's `AFDConnectorBase` contract
(`afd_plugin/connectors/base.py`) over an m2n group: the attention ranks are
m2n ATTENTION ranks (M = `num_attention_ranks`), the FFN ranks m2n EXPERT
ranks (N = `num_ffn_ranks`). It is duck-typed: it imports without vLLM or
the plugin, with local dataclasses that have the plugin's field names and
meaning (`AFDTransferMetadata`, `AFDTransferContext`, `AFDA2FTransferPayload`,
`AFDF2ATransferPayload`, `AFDControlPayload`, `AFDDPMetadata`); where the
plugin is importable those names are the plugin's own types and the
connector subclasses its `AFDConnectorBase`, so its factory accepts it.

With the plugin installed, one call registers it (in every process that
creates connectors: vLLM's API server, engine cores and workers, e.g. from a
`vllm.general_plugins` entry point of your own package):

    import m2n.afd
    m2n.afd.register()          # name "M2NAFDConnector"

then `--additional-config '{"afd": {"connector": "M2NAFDConnector", "role":
"attention", "host": "10.0.0.1", "port": 29600, "num_attention_ranks": 2,
"num_ffn_ranks": 1, "connector_extra_config": {"slot_bytes": "8M"}}}'`.

Group formation. Every rank knows only `host`, `port`, the rank counts,
its role and its role rank. FFN rank 0 serves m2n's rendezvous root at
`host:port` (the address must be this host's: like the plugin's P2P
connector, whose TCP store is served by world rank 0 = FFN rank 0), and
every rank, FFN rank 0 included, joins it with the unique id
`m2n1@<ip of host>:<port>#<secret>`. The secret is
`connector_extra_config["secret"]` (32 hex digits), else the
`M2N_AFD_SECRET` environment variable, else derived from host, port and the
rank counts: a derived secret only keeps two deployments that share an
address apart, it does not authenticate peers (set one where that matters).
`init_afd_connector` is collective and blocks until all M + N ranks joined
(`bootstrap_timeout`).

Token placement follows the plugin's P2P connector: M must be a multiple of
N (and at least N); FFN rank f serves attention ranks f*R .. f*R+R-1 (R =
M / N, the ratio). Attention rank a sends its tokens to FFN rank a // R. The
FFN rank concatenates its R peers' tokens in rank order (`seq_lens` of the
metadata it returns are the per-peer token counts, as in P2P), and splits
its output by those counts on the way back. Every round is an m2n round of
the whole group: an attention rank posts one message per FFN rank, empty
for the ones it does not feed, so all attention ranks take part in every
step (as vLLM's data-parallel ranks do, with dummy batches when idle), and
an attention rank's result of a round is in once every FFN rank answered it.

Wire layout (one m2n message per sender-receiver pair and round; little
endian): a 44-byte header (`M2NA`, version, kind, section count, layer_idx,
stage_idx, rows, number of seq_lens, control-blob length, total length),
four 8-byte section descriptors (section id, dtype code, columns), the
sender's `seq_lens` as int64 (and a control-plane blob), then each section's
rows x columns at a 64-byte aligned offset. Attention to FFN (dispatch):
hidden_states, and optionally router_logits and topk_ids + topk_weights. FFN
to attention (combine): routed_output and optionally shared_output. The
DP-metadata control plane sends the plugin's compact JSON on the dispatch
channel ahead of a step (from each FFN rank's first attention peer; its
other peers send an empty marker). The receiver checks every header (kind,
layer, micro-batch, rows, sizes) against what it expects.

Buffers: each rank registers one host staging buffer with m2n at
`init_afd_connector` (pinned when CUDA is present): one slot per
micro-batch (and one for the control plane), `slot_bytes` each (R slots per
micro-batch on an FFN rank). A send copies the tensors into the slot of its
micro-batch and posts it (zero-copy from there); the slot is reused once
m2n reports that round sent. Receives copy out of m2n's ring and release
the round at once: `recv_ffn_output` into `ref_tensor` (routed + shared
output), `recv_attn_output` into new tensors on the connector's device.

Micro-batches: `stage_idx` / `ubatch_idx` in 0..num_ubatches-1 (default 2).
An attention rank may have one send in flight per micro-batch and receives
results in the order it sent them (the plugin's DBO order: send 0, send 1,
recv 0, send 0, recv 1, ...); the FFN side receives micro-batches in the
order the attention side sent them and answers them in that order.

Not covered: CUDA-graph capture and stream ordering (the copies and m2n
calls are host calls: run vLLM with `enforce_eager`; CUDA tensors are
staged through host memory), and the async (`async_dp`) mode.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import importlib
import json
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

import m2n

__all__ = [
    "AFDA2FTransferPayload",
    "AFDControlPayload",
    "AFDDPMetadata",
    "AFDExpertRoutingSpec",
    "AFDF2ATransferPayload",
    "AFDTransferContext",
    "AFDTransferMetadata",
    "AFDTransferState",
    "AFDUsageError",
    "AFDValueError",
    "CONNECTOR_NAME",
    "M2NAFDConnector",
    "M2NAFDControlPlane",
    "M2NConnectorConfig",
    "M2NTransferState",
    "PLUGIN_AVAILABLE",
    "register",
]

CONNECTOR_NAME = "M2NAFDConnector"
"""The name `register()` gives the connector in the plugin's factory."""


class AFDUsageError(m2n.UsageError, RuntimeError):
    """A call that does not fit the connector's state (not initialised, wrong micro-batch, ...).

    Both an `m2n.UsageError` and a `RuntimeError` (what the plugin's base documents).
    """


class AFDValueError(m2n.InvalidArgument, ValueError):
    """A payload of the wrong shape, dtype or size, or a bad configuration value.

    Both an `m2n.InvalidArgument` and a `ValueError` (what the plugin's base documents).
    """


# ---------------------------------------------------------------------------
# The plugin's types, or local equivalents
# ---------------------------------------------------------------------------


@dataclass
class _LocalTransferMetadata:
    """Metadata of one exchange: layer, stage (micro-batch) and token split."""

    layer_idx: int
    stage_idx: int
    seq_lens: list[int]

    def __post_init__(self) -> None:
        if not self.seq_lens:
            raise ValueError("seq_lens cannot be empty")
        if any(length <= 0 for length in self.seq_lens):
            raise ValueError("all sequence lengths must be positive")

    @property
    def total_tokens(self) -> int:
        """The sum of `seq_lens`: the leading dimension of the tensors."""
        return sum(self.seq_lens)

    @classmethod
    def create_attention_metadata(
        cls, *, layer_idx: int, stage_idx: int, seq_len: int
    ) -> _LocalTransferMetadata:
        """Metadata of one attention rank's send (one split)."""
        return cls(layer_idx=layer_idx, stage_idx=stage_idx, seq_lens=[seq_len])

    @classmethod
    def create_ffn_metadata(
        cls, *, layer_idx: int, stage_idx: int, seq_lens: list[int]
    ) -> _LocalTransferMetadata:
        """Metadata of an FFN rank's receive (one split per attention peer)."""
        return cls(layer_idx=layer_idx, stage_idx=stage_idx, seq_lens=list(seq_lens))

    def validate_tensor_shape(self, tensor_shape: tuple[int, ...]) -> bool:
        """Whether a tensor of `tensor_shape` has `total_tokens` rows."""
        return len(tensor_shape) > 0 and tensor_shape[0] == self.total_tokens


@dataclass
class _LocalTransferState:
    """Base of connector-specific state carried by a transfer context."""


@dataclass
class _LocalTransferContext:
    """Metadata plus connector state of one exchange."""

    metadata: _LocalTransferMetadata
    states: _LocalTransferState | None = None


@dataclass
class _LocalA2FPayload:
    """What `recv_attn_output` returns on an FFN rank."""

    hidden_states: torch.Tensor
    context: _LocalTransferContext
    router_logits: torch.Tensor | None = None


@dataclass
class _LocalF2APayload:
    """An FFN output with its routed and optional shared-expert parts."""

    routed_output: torch.Tensor
    shared_output: torch.Tensor | None = None


@dataclass
class _LocalDPMetadata:
    """Per-DP-rank token counts of one stage."""

    num_tokens_across_dp_cpu: torch.Tensor
    max_tokens_across_dp_cpu: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.num_tokens_across_dp_cpu = torch.as_tensor(
            self.num_tokens_across_dp_cpu, dtype=torch.int32, device="cpu"
        )
        if self.max_tokens_across_dp_cpu is None:
            self.max_tokens_across_dp_cpu = self.num_tokens_across_dp_cpu.max()
        else:
            self.max_tokens_across_dp_cpu = torch.as_tensor(
                self.max_tokens_across_dp_cpu, dtype=torch.int32, device="cpu"
            )


@dataclass
class _LocalControlPayload:
    """The DP-metadata control-plane payload of one step."""

    dp_metadata_list: dict[int, _LocalDPMetadata]
    is_graph_capturing: bool
    is_warmup: bool


class _LocalRoutingSpec(NamedTuple):
    """Width and dtype of the router logits an FFN layer expects."""

    router_logits_width: int
    router_logits_dtype: torch.dtype


@dataclass(frozen=True)
class _LocalExtraInfo:
    """Base of connector-owned configuration."""


class _LocalControlPlaneBase:
    """Base of DP-metadata control planes."""


class _LocalConnectorBase:
    """Base of AFD connectors."""


_plugin_error: ImportError | None = None
_pbase: Any = None
_pmeta: Any = None
try:
    _pbase = importlib.import_module("afd_plugin.connectors.base")
    _pmeta = importlib.import_module("afd_plugin.connectors.metadata")
except ImportError as e:  # the plugin or vLLM is not installed
    _plugin_error = e
    _pbase = _pmeta = None

PLUGIN_AVAILABLE = _pmeta is not None
"""Whether vLLM's AFD plugin is importable (its types are then used)."""

if TYPE_CHECKING:
    AFDTransferMetadata = _LocalTransferMetadata
    AFDTransferState = _LocalTransferState
    AFDTransferContext = _LocalTransferContext
    AFDA2FTransferPayload = _LocalA2FPayload
    AFDF2ATransferPayload = _LocalF2APayload
    AFDDPMetadata = _LocalDPMetadata
    AFDControlPayload = _LocalControlPayload
    AFDExpertRoutingSpec = _LocalRoutingSpec
    _ExtraInfoBase = _LocalExtraInfo
    _ControlPlaneBase = _LocalControlPlaneBase
    _ConnectorBase = _LocalConnectorBase
elif _pmeta is not None:
    AFDTransferMetadata = _pmeta.AFDTransferMetadata
    AFDTransferState = _pmeta.AFDTransferState
    AFDTransferContext = _pmeta.AFDTransferContext
    AFDA2FTransferPayload = _pmeta.AFDA2FTransferPayload
    AFDF2ATransferPayload = _pmeta.AFDF2ATransferPayload
    AFDDPMetadata = _pmeta.AFDDPMetadata
    AFDControlPayload = _pmeta.AFDControlPayload
    AFDExpertRoutingSpec = _pmeta.AFDExpertRoutingSpec
    _ExtraInfoBase = _pbase.ConnectorExtraInfo
    _ControlPlaneBase = _pbase.AFDControlPlane
    _ConnectorBase = _pbase.AFDConnectorBase
else:
    AFDTransferMetadata = _LocalTransferMetadata
    AFDTransferState = _LocalTransferState
    AFDTransferContext = _LocalTransferContext
    AFDA2FTransferPayload = _LocalA2FPayload
    AFDF2ATransferPayload = _LocalF2APayload
    AFDDPMetadata = _LocalDPMetadata
    AFDControlPayload = _LocalControlPayload
    AFDExpertRoutingSpec = _LocalRoutingSpec
    _ExtraInfoBase = _LocalExtraInfo
    _ControlPlaneBase = _LocalControlPlaneBase
    _ConnectorBase = _LocalConnectorBase


@dataclass
class M2NTransferState(AFDTransferState):
    """The m2n connector's state on an FFN rank's transfer context.

    `peer_seq_lens[i]` are the `seq_lens` attention peer i (in rank order)
    sent, `peer_rows[i]` its token count; `topk_ids` / `topk_weights` the
    concatenated top-k routing when the gate ran on the attention side.
    """

    peer_ranks: list[int] = field(default_factory=list)
    peer_seq_lens: list[list[int]] = field(default_factory=list)
    peer_rows: list[int] = field(default_factory=list)
    topk_ids: torch.Tensor | None = None
    topk_weights: torch.Tensor | None = None
    round: int = -1


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]?)(?:I?B)?\s*$", re.IGNORECASE)


def _parse_size(key: str, value: object) -> int:
    if isinstance(value, bool):
        raise AFDValueError(f"connector_extra_config.{key}={value!r}: expected a size in bytes")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(str(value))
        if m is None:
            raise AFDValueError(
                f"connector_extra_config.{key}={value!r}: expected bytes, e.g. 1048576 or '8M'"
            )
        n = int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2).upper()]
    if n < 4096:
        raise AFDValueError(f"connector_extra_config.{key}={value!r}: at least 4096 bytes")
    return n


def _parse_int(key: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise AFDValueError(f"connector_extra_config.{key}={value!r}: expected an integer")
    try:
        n = int(value)
    except ValueError:
        raise AFDValueError(
            f"connector_extra_config.{key}={value!r}: expected an integer"
        ) from None
    if not low <= n <= high:
        raise AFDValueError(f"connector_extra_config.{key}={n}: expected {low}..{high}")
    return n


def _parse_seconds(key: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise AFDValueError(f"connector_extra_config.{key}={value!r}: expected seconds")
    try:
        s = float(value)
    except ValueError:
        raise AFDValueError(f"connector_extra_config.{key}={value!r}: expected seconds") from None
    if not s > 0:
        raise AFDValueError(f"connector_extra_config.{key}={value!r}: must be positive")
    return s


_M2N_RESERVED = {"depth", "slot_bytes", "dispatch_slot_bytes", "combine_slot_bytes"}
_M2N_RESERVED |= {"dispatch_depth", "combine_depth", "transport", "bootstrap_timeout_ms"}


@dataclass(frozen=True)
class M2NConnectorConfig(_ExtraInfoBase):
    """`connector_extra_config` of the m2n connector (every key optional).

    - `transport`: m2n transport (`shm`, `tcp`, `verbs`, `auto`; default: m2n's `auto`).
    - `slot_bytes`: largest message per rank pair and round (int or "8M"; default
      "1M"): header + seq_lens + every tensor of one micro-batch from one rank.
    - `depth`: rounds a sender may run ahead of a receiver (default 4, at least 2).
    - `num_ubatches`: micro-batches in flight (default 2).
    - `timeout`: seconds a send or receive waits before `m2n.Timeout` (default:
      no limit; a lost peer is reported as `m2n.PeerLost` either way).
    - `bootstrap_timeout`: seconds `init_afd_connector` waits for all ranks (default 120).
    - `secret`: 32 hex digits shared by all ranks (else `M2N_AFD_SECRET`, else derived).
    - `device`: where received tensors go on FFN ranks (default `cuda:<local_rank>`
      with CUDA, else `cpu`).
    - `m2n`: other m2n settings by the README's names (`{"peer_timeout_ms": 10000}`).
    """

    transport: str | None = None
    slot_bytes: int = 1 << 20
    depth: int = 4
    num_ubatches: int = 2
    timeout: float | None = None
    bootstrap_timeout: float = 120.0
    secret: str | None = None
    device: str | None = None
    m2n: Mapping[str, str | int | float | bool] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any] | None) -> M2NConnectorConfig:
        """Parse and check `connector_extra_config` (unknown keys are refused by name)."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise TypeError(f"connector_extra_config must be a mapping, got {type(raw).__name__}")
        known = {
            "transport",
            "slot_bytes",
            "depth",
            "num_ubatches",
            "timeout",
            "bootstrap_timeout",
            "secret",
            "device",
            "m2n",
        }
        unknown = sorted(set(raw) - known)
        if unknown:
            raise AFDValueError(
                f"connector_extra_config: unknown key(s) {unknown} for {CONNECTOR_NAME} "
                f"(accepted: {sorted(known)})"
            )
        kw: dict[str, Any] = {}
        if raw.get("transport") is not None:
            kw["transport"] = str(raw["transport"])
        if "slot_bytes" in raw:
            kw["slot_bytes"] = _parse_size("slot_bytes", raw["slot_bytes"])
        if "depth" in raw:
            kw["depth"] = _parse_int("depth", raw["depth"], 2, 256)
        if "num_ubatches" in raw:
            kw["num_ubatches"] = _parse_int("num_ubatches", raw["num_ubatches"], 1, 64)
        if "timeout" in raw:
            kw["timeout"] = _parse_seconds("timeout", raw["timeout"])
        if "bootstrap_timeout" in raw:
            bt = _parse_seconds("bootstrap_timeout", raw["bootstrap_timeout"])
            if bt is None:
                raise AFDValueError("connector_extra_config.bootstrap_timeout cannot be None")
            kw["bootstrap_timeout"] = bt
        if raw.get("secret") is not None:
            kw["secret"] = _check_secret(str(raw["secret"]), "connector_extra_config.secret")
        if raw.get("device") is not None:
            kw["device"] = str(raw["device"])
        if raw.get("m2n") is not None:
            extra = raw["m2n"]
            if not isinstance(extra, Mapping):
                raise AFDValueError("connector_extra_config.m2n must be a mapping")
            names = {str(k).lower().removeprefix("m2n_") for k in extra}
            clash = sorted(names & _M2N_RESERVED)
            if clash:
                raise AFDValueError(
                    f"connector_extra_config.m2n: {clash} are set by the connector's own keys "
                    "(transport, slot_bytes, depth, bootstrap_timeout)"
                )
            kw["m2n"] = {str(k): v for k, v in extra.items()}
        return cls(**kw)

    def to_mapping(self) -> dict[str, Any]:
        """The settings as a `connector_extra_config` mapping (without the secret)."""
        out: dict[str, Any] = {
            "slot_bytes": self.slot_bytes,
            "depth": self.depth,
            "num_ubatches": self.num_ubatches,
            "bootstrap_timeout": self.bootstrap_timeout,
        }
        for key in ("transport", "timeout", "device"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.m2n:
            out["m2n"] = dict(self.m2n)
        return out


def _check_secret(secret: str, what: str) -> str:
    s = secret.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{32}", s):
        raise AFDValueError(f"{what}: expected 32 hex digits (16 random bytes)")
    return s


# ---------------------------------------------------------------------------
# Wire format
# ---------------------------------------------------------------------------

_MAGIC = b"M2NA"
_VERSION = 1
_KIND_A2F, _KIND_F2A, _KIND_CONTROL = 1, 2, 3
_KIND_NAMES = {_KIND_A2F: "attention data", _KIND_F2A: "FFN output", _KIND_CONTROL: "DP metadata"}
# magic, version, kind, sections, layer, stage, rows, n_seq, blob, total
_HEAD = struct.Struct("<4sHBBiiIIIQ8x")
_SEC = struct.Struct("<BBxxI")  # section id, dtype code, columns
_MAX_SECTIONS = 4
_HEADER_BYTES = _HEAD.size + _MAX_SECTIONS * _SEC.size
_ALIGN = 64
_SEC_HIDDEN, _SEC_ROUTER, _SEC_TOPK_IDS, _SEC_TOPK_W = 1, 2, 3, 4
_SEC_ROUTED, _SEC_SHARED = 5, 6
_SEC_NAMES = {
    _SEC_HIDDEN: "hidden_states",
    _SEC_ROUTER: "router_logits",
    _SEC_TOPK_IDS: "topk_ids",
    _SEC_TOPK_W: "topk_weights",
    _SEC_ROUTED: "routed_output",
    _SEC_SHARED: "shared_output",
}


def _dtype_table() -> list[torch.dtype]:
    names = [
        "float32",
        "float16",
        "bfloat16",
        "float64",
        "int8",
        "uint8",
        "int16",
        "int32",
        "int64",
        "bool",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
    ]
    return [getattr(torch, n) for n in names if isinstance(getattr(torch, n, None), torch.dtype)]


_DTYPES = _dtype_table()
_DTYPE_CODE = {dt: i + 1 for i, dt in enumerate(_DTYPES)}


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _dtype_code(what: str, dtype: torch.dtype) -> int:
    code = _DTYPE_CODE.get(dtype)
    if code is None:
        raise AFDValueError(f"{what}: dtype {dtype} cannot be carried (supported: {_DTYPES})")
    return code


class _Section(NamedTuple):
    sid: int
    tensor: torch.Tensor


def _layout(n_seq: int, sections: Sequence[_Section], blob: int = 0) -> tuple[list[int], int]:
    """Offsets of each section and the message's total length."""
    pos = _align(_HEADER_BYTES + 8 * n_seq + blob)
    offs = []
    for s in sections:
        offs.append(pos)
        pos = _align(pos + s.tensor.numel() * s.tensor.element_size())
    return offs, pos


def _write_message(
    buf: torch.Tensor,
    kind: int,
    layer: int,
    stage: int,
    rows: int,
    seq_lens: Sequence[int],
    sections: Sequence[_Section],
    blob: bytes = b"",
) -> int:
    """Write one message at the start of `buf` (a uint8 slot); returns its length."""
    offs, total = _layout(len(seq_lens), sections, len(blob))
    head = bytearray(_HEADER_BYTES)
    _HEAD.pack_into(
        head, 0, _MAGIC, _VERSION, kind, len(sections), layer, stage, rows, len(seq_lens),
        len(blob), total,
    )  # fmt: skip
    for i, s in enumerate(sections):
        cols = s.tensor.shape[1] if s.tensor.dim() == 2 else 1
        _SEC.pack_into(head, _HEAD.size + i * _SEC.size, s.sid, _DTYPE_CODE[s.tensor.dtype], cols)
    tail = struct.pack(f"<{len(seq_lens)}q", *seq_lens) + blob
    meta = bytes(head) + tail
    buf[: len(meta)].copy_(torch.frombuffer(bytearray(meta), dtype=torch.uint8))
    for off, s in zip(offs, sections):
        n = s.tensor.numel() * s.tensor.element_size()
        if n:
            buf[off : off + n].view(s.tensor.dtype).view(s.tensor.shape).copy_(s.tensor)
    return total


class _Message(NamedTuple):
    kind: int
    layer: int
    stage: int
    rows: int
    seq_lens: list[int]
    blob: bytes
    sections: dict[int, tuple[torch.dtype, int, int]]  # id -> (dtype, cols, offset)


def _read_header(sender: int, raw: torch.Tensor) -> _Message:
    """Parse and check a message's header (`raw`: the message's bytes in the ring)."""
    nbytes = int(raw.numel())
    if nbytes < _HEADER_BYTES:
        raise m2n.ProtocolError(
            f"sender {sender}: a {nbytes}-byte message is shorter than the AFD header"
        )
    data = raw[:_HEADER_BYTES].numpy().tobytes()
    magic, version, kind, nsec, layer, stage, rows, n_seq, blob, total = _HEAD.unpack_from(data)
    if magic != _MAGIC or version != _VERSION:
        raise m2n.ProtocolError(
            f"sender {sender}: not an m2n AFD message (magic {magic!r}, version {version})"
        )
    if total != nbytes or kind not in _KIND_NAMES or nsec > _MAX_SECTIONS:
        raise m2n.ProtocolError(
            f"sender {sender}: a corrupt AFD header (kind {kind}, {nsec} sections, "
            f"{total} bytes declared, {nbytes} received)"
        )
    head_end = _HEADER_BYTES + 8 * n_seq + blob
    if head_end > nbytes:
        raise m2n.ProtocolError(f"sender {sender}: seq_lens / blob run past the message")
    data += raw[_HEADER_BYTES:head_end].numpy().tobytes()
    seq_lens = list(struct.unpack_from(f"<{n_seq}q", data, _HEADER_BYTES))
    blob_bytes = bytes(data[_HEADER_BYTES + 8 * n_seq : head_end])
    sections: dict[int, tuple[torch.dtype, int, int]] = {}
    pos = _align(head_end)
    for i in range(nsec):
        sid, code, cols = _SEC.unpack_from(data, _HEAD.size + i * _SEC.size)
        if not 1 <= code <= len(_DTYPES) or sid not in _SEC_NAMES or sid in sections:
            raise m2n.ProtocolError(f"sender {sender}: a corrupt section descriptor {i}")
        dtype = _DTYPES[code - 1]
        sections[sid] = (dtype, cols, pos)
        itemsize = torch.empty((), dtype=dtype).element_size()
        pos = _align(pos + rows * cols * itemsize)
    if pos != nbytes:
        raise m2n.ProtocolError(
            f"sender {sender}: sections of {rows} rows need {pos} bytes, the message has {nbytes}"
        )
    return _Message(kind, layer, stage, rows, seq_lens, blob_bytes, sections)


def _copy_section(
    raw: torch.Tensor, msg: _Message, sid: int, device: torch.device
) -> torch.Tensor | None:
    """Copy one section of a message (`raw`: its bytes in the ring) to a new tensor."""
    spec = msg.sections.get(sid)
    if spec is None:
        return None
    dtype, cols, off = spec
    out = torch.empty((msg.rows, cols), dtype=dtype, device=device)
    n = out.numel() * out.element_size()
    if n:
        out.copy_(raw[off : off + n].view(dtype).view(msg.rows, cols))
    return out


def _encode_control(payload: Any) -> bytes:
    """The plugin's compact JSON of a DP-metadata payload."""
    stages: dict[str, dict[str, Any]] = {}
    for stage_idx, md in payload.dp_metadata_list.items():
        counts = torch.as_tensor(md.num_tokens_across_dp_cpu).flatten().tolist()
        peak = getattr(md, "max_tokens_across_dp_cpu", None)
        peak = max(counts) if peak is None else int(torch.as_tensor(peak).item())
        stages[str(int(stage_idx))] = {
            "num_tokens_across_dp_cpu": [int(c) for c in counts],
            "max_tokens_across_dp_cpu": int(peak),
        }
    wire = {
        "dp_metadata_list": stages,
        "is_graph_capturing": bool(payload.is_graph_capturing),
        "is_warmup": bool(payload.is_warmup),
    }
    return json.dumps(wire, separators=(",", ":"), sort_keys=True).encode()


def _decode_control(blob: bytes) -> AFDControlPayload:
    try:
        wire = json.loads(blob.decode())
        stages = {
            int(k): AFDDPMetadata(
                num_tokens_across_dp_cpu=torch.tensor(
                    [int(v) for v in md["num_tokens_across_dp_cpu"]], dtype=torch.int32
                ),
                max_tokens_across_dp_cpu=torch.tensor(
                    int(md["max_tokens_across_dp_cpu"]), dtype=torch.int32
                ),
            )
            for k, md in wire["dp_metadata_list"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise m2n.ProtocolError(f"a corrupt DP-metadata control payload: {e}") from None
    return AFDControlPayload(
        dp_metadata_list=stages,
        is_graph_capturing=bool(wire.get("is_graph_capturing", False)),
        is_warmup=bool(wire.get("is_warmup", False)),
    )


# ---------------------------------------------------------------------------
# The connector
# ---------------------------------------------------------------------------


def _attr(obj: Any, name: str) -> Any:
    if obj is None or not hasattr(obj, name):
        raise AFDValueError(
            f"afd_config has no {name!r}: it needs role, host, port and rank counts"
        )
    return getattr(obj, name)


def _extra_config_of(afd_config: Any, vllm_config: Any) -> Mapping[str, Any] | None:
    """`connector_extra_config` from afd_config, else vllm_config.additional_config["afd"]."""
    raw = getattr(afd_config, "connector_extra_config", None)
    if raw is not None:
        return raw  # type: ignore[no-any-return]
    additional = getattr(vllm_config, "additional_config", None)
    if isinstance(vllm_config, Mapping):
        additional = vllm_config
    if isinstance(additional, Mapping):
        afd = additional.get("afd")
        if isinstance(afd, Mapping):
            extra = afd.get("connector_extra_config")
            if extra is not None:
                return extra  # type: ignore[no-any-return]
    return None


def _resolve(host: str, port: int) -> str:
    """`ip:port` of the rendezvous (IPv4 preferred)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise m2n.ConfigError(f"afd_config.host {host!r} does not resolve: {e}") from None
    infos.sort(key=lambda i: i[0] != socket.AF_INET)
    ip = str(infos[0][4][0])
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class _Sent(NamedTuple):
    stage: int
    layer: int
    rows: int
    cols: int
    dtype: torch.dtype


class _Received(NamedTuple):
    """A dispatch round as an FFN rank got it (copied out of the ring)."""

    kind: int
    round: int
    layer: int
    stage: int
    control: bytes
    hidden: torch.Tensor | None
    router: torch.Tensor | None
    topk_ids: torch.Tensor | None
    topk_weights: torch.Tensor | None
    peer_seq_lens: list[list[int]]
    peer_rows: list[int]


class _Pending(NamedTuple):
    stage: int
    layer: int
    peer_rows: list[int]


class M2NAFDConnector(_ConnectorBase):
    """vLLM AFD connector over an m2n group (see the module docstring for the scheme).

    `rank` / `local_rank`: the worker's process and device ranks; `vllm_config`:
    vLLM's config (only `additional_config["afd"]["connector_extra_config"]` is
    read, when `afd_config` has no `connector_extra_config`); `afd_config`: the
    plugin's `AFDConfig` or any object with `role` ("attention" / "ffn"),
    `host`, `port`, `num_attention_ranks`, `num_ffn_ranks`; `role_rank`: this
    worker's rank within its role.
    """

    attn_size: int = 0
    ffn_size: int = 0

    @classmethod
    def parse_extra_config(cls, raw: Mapping[str, Any] | None) -> M2NConnectorConfig:
        """Parse `connector_extra_config` (see `M2NConnectorConfig`)."""
        return M2NConnectorConfig.from_mapping(raw)

    def __init__(
        self,
        rank: int,
        local_rank: int,
        vllm_config: Any,
        afd_config: Any,
        role_rank: int,
    ) -> None:
        self.rank = rank
        self.local_rank = local_rank
        self.vllm_config = vllm_config
        self.afd_config = afd_config
        self.role_rank = int(role_rank)
        self.extra_info = self.parse_extra_config(_extra_config_of(afd_config, vllm_config))
        role = str(_attr(afd_config, "role"))
        if role not in ("attention", "ffn"):
            raise AFDValueError(f"afd_config.role={role!r}: expected 'attention' or 'ffn'")
        self.role = role
        self.attn_size = int(_attr(afd_config, "num_attention_ranks"))
        self.ffn_size = int(_attr(afd_config, "num_ffn_ranks"))
        self.host = str(_attr(afd_config, "host"))
        self.port = int(_attr(afd_config, "port"))
        m, n = self.attn_size, self.ffn_size
        if m < 1 or n < 1:
            raise AFDValueError(f"num_attention_ranks={m}, num_ffn_ranks={n}: both must be >= 1")
        if m < n or m % n:
            raise AFDValueError(
                f"num_attention_ranks={m} must be a multiple of num_ffn_ranks={n} (and at "
                "least as many): each FFN rank serves a fixed group of attention ranks"
            )
        size = m if role == "attention" else n
        if not 0 <= self.role_rank < size:
            raise AFDValueError(f"role_rank={role_rank} is outside 0..{size - 1} for role {role}")
        if not self.host:
            raise AFDValueError("afd_config.host is empty")
        if not 0 < self.port < 65536:
            raise AFDValueError(f"afd_config.port={self.port}: expected 1..65535")
        self.ratio = m // n
        if role == "attention":
            self.ffn_peer = self.role_rank // self.ratio
            self.attention_peers: list[int] = []
        else:
            self.ffn_peer = -1
            self.attention_peers = [self.role_rank * self.ratio + i for i in range(self.ratio)]
        self.control_plane: M2NAFDControlPlane | None = M2NAFDControlPlane(self)
        self.dp_metadata_list: dict[int, Any] = {}
        self.is_graph_capturing = False
        self.is_warmup = False
        self._lock = threading.RLock()
        self._closing = False
        self._comm: m2n.Communicator | None = None
        self._root: m2n.Root | None = None
        self._staging: torch.Tensor | None = None
        self._slot_round: dict[int, int] = {}
        self._inflight: collections.deque[_Sent] = collections.deque()
        self._pending: collections.deque[_Pending] = collections.deque()
        self._stash: collections.deque[_Received] = collections.deque()
        dev = self.extra_info.device
        if dev is None:
            dev = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(dev)

    def __repr__(self) -> str:
        state = "initialized" if self.is_initialized else "not initialized"
        return (
            f"M2NAFDConnector({self.role} {self.role_rank} of "
            f"{self.attn_size}x{self.ffn_size}, {state})"
        )

    # -- lifecycle -----------------------------------------------------------

    @property
    def unique_id_address(self) -> str:
        """The rendezvous address (`ip:port`) every rank joins."""
        return _resolve(self.host, self.port)

    def _unique_id(self) -> str:
        addr = self.unique_id_address
        secret = self.extra_info.secret
        if secret is None and os.environ.get("M2N_AFD_SECRET"):
            secret = _check_secret(os.environ["M2N_AFD_SECRET"], "M2N_AFD_SECRET")
        if secret is None:
            seed = f"m2n-afd|{addr}|{self.attn_size}x{self.ffn_size}".encode()
            secret = hashlib.sha256(seed).hexdigest()[:32]
        return f"m2n1@{addr}#{secret}"

    def init_afd_connector(self) -> None:
        """Join the m2n group (collective: every attention and FFN rank) and register buffers.

        FFN rank 0 serves the rendezvous on `host:port`. Idempotent.
        """
        with self._lock:
            if self._comm is not None:
                return
            if self._closing:
                raise AFDUsageError("the connector was closed; make a new one")
            x = self.extra_info
            uid = self._unique_id()
            cfg: dict[str, str | int | float | bool] = dict(x.m2n)
            cfg.update(
                depth=x.depth,
                dispatch_slot_bytes=x.slot_bytes,
                combine_slot_bytes=x.slot_bytes,
                bootstrap_timeout_ms=int(x.bootstrap_timeout * 1000),
            )
            if x.transport is not None:
                cfg["transport"] = x.transport
            root = None
            if self.role == "ffn" and self.role_rank == 0:
                try:
                    root = m2n.Root(unique_id=uid, timeout=x.bootstrap_timeout)
                except m2n.Error as e:
                    raise type(e)(
                        f"FFN rank 0 serves the m2n rendezvous on afd_config host:port "
                        f"({self.unique_id_address}) and could not: {e} (it must run on "
                        "that host, and the port must be free)"
                    ) from e
            role = m2n.ATTENTION if self.role == "attention" else m2n.EXPERT
            try:
                comm = m2n.Communicator(
                    role, self.role_rank, (self.attn_size, self.ffn_size), uid, cfg
                )
            except BaseException:
                if root is not None:
                    with contextlib.suppress(m2n.Error):
                        root.wait()
                raise
            if root is not None:
                root.wait()
            slots = x.num_ubatches + 1  # one per micro-batch, one for the control plane
            per = x.slot_bytes * (self.ratio if self.role == "ffn" else 1)
            staging = torch.empty(
                slots * per, dtype=torch.uint8, pin_memory=torch.cuda.is_available()
            )
            comm.register(staging)
            self._comm, self._root, self._staging = comm, root, staging
            self._slot_bytes_each = per

    @property
    def is_initialized(self) -> bool:
        """Whether `init_afd_connector` formed the group (and `close` did not end it)."""
        return self._comm is not None and not self._comm.closed

    def close(self) -> None:
        """Leave the group and free the buffers; safe to call repeatedly and from another thread.

        A receive blocked in another thread stops with `AFDUsageError`.
        """
        self._closing = True
        with self._lock:
            comm, self._comm = self._comm, None
            self._inflight.clear()
            self._pending.clear()
            self._stash.clear()
            if comm is None:
                return
            try:
                for rnd in self._slot_round.values():
                    with contextlib.suppress(m2n.Error):
                        comm.sends_on.wait_sent(rnd, timeout=5)
                comm.close()
            except m2n.Error:
                with contextlib.suppress(m2n.Error):
                    comm.abort()
                    comm.close()
            finally:
                self._staging = None
                self._slot_round.clear()

    # -- helpers -------------------------------------------------------------

    def _require(self, role: str, call: str) -> m2n.Communicator:
        comm = self._comm
        if comm is None or comm.closed:
            what = "was closed" if self._closing else "is not initialized"
            raise AFDUsageError(
                f"{call}: the m2n AFD connector {what}; call init_afd_connector() first"
            )
        if self.role != role:
            raise AFDUsageError(f"{call} is a call of the {role} side; this rank is {self.role}")
        return comm

    def _check_ubatch(self, call: str, ubatch_idx: object) -> int:
        n = self.extra_info.num_ubatches
        if isinstance(ubatch_idx, bool) or not isinstance(ubatch_idx, int):
            raise AFDValueError(f"{call}: ubatch_idx {ubatch_idx!r} is not an integer")
        if not 0 <= ubatch_idx < n:
            raise AFDValueError(
                f"{call}: ubatch_idx {ubatch_idx} is outside 0..{n - 1} "
                "(connector_extra_config.num_ubatches)"
            )
        if self.dp_metadata_list and ubatch_idx not in self.dp_metadata_list:
            raise AFDValueError(
                f"{call}: ubatch_idx {ubatch_idx} is not a stage of this step's DP metadata "
                f"(stages {sorted(self.dp_metadata_list)})"
            )
        return ubatch_idx

    def _slot(self, slot: int) -> torch.Tensor:
        assert self._staging is not None
        per = self._slot_bytes_each
        return self._staging[slot * per : (slot + 1) * per]

    def _claim(self, ch: m2n.Channel, slot: int) -> None:
        """Wait until the last round sent from `slot` has left (its bytes may change)."""
        rnd = self._slot_round.pop(slot, None)
        if rnd is not None:
            self._wait(lambda t: ch.wait_sent(rnd, timeout=t), f"{ch.name} round {rnd} sent")

    def _wait(self, op: Any, what: str) -> Any:
        """Run a blocking m2n call in slices, so that `close` from another thread stops it."""
        limit = self.extra_info.timeout
        deadline = None if limit is None else time.monotonic() + limit
        while True:
            if self._closing:
                raise AFDUsageError(f"the connector was closed while waiting for {what}")
            left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            try:
                return op(max(left, 0.001))
            except m2n.Timeout:
                if deadline is not None and time.monotonic() >= deadline:
                    raise m2n.Timeout(
                        f"waited {limit} s for {what} (connector_extra_config.timeout)"
                    ) from None

    def _too_big(self, call: str, nbytes: int, what: str) -> AFDValueError:
        return AFDValueError(
            f"{call}: the message ({what}) is {nbytes} bytes, more than the "
            f"{self.extra_info.slot_bytes}-byte slot: raise connector_extra_config.slot_bytes "
            f"(to at least {nbytes})"
        )

    # -- attention side --------------------------------------------------------

    def send_attn_output(
        self, hidden_states: torch.Tensor, context: AFDTransferContext, **kwargs: Any
    ) -> None:
        """Send one micro-batch's hidden states (and routing) to this rank's FFN rank.

        `context.metadata`: `layer_idx`, `stage_idx` (the micro-batch) and
        `seq_lens` (their sum is the number of rows). Keyword arguments:
        `router_logits` (rows x experts) and/or `topk_ids` + `topk_weights`
        (rows x k each). Returns once posted; the tensors may change at once.
        """
        call = "send_attn_output"
        with self._lock:
            comm = self._require("attention", call)
            md = context.metadata
            stage = self._check_ubatch(call, md.stage_idx)
            busy = [s for s in self._inflight if s.stage == stage]
            if busy:
                raise AFDUsageError(
                    f"{call}: ubatch {stage} already has layer {busy[0].layer} in flight; "
                    f"call recv_ffn_output(ubatch_idx={stage}) first"
                )
            if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 2:
                raise AFDValueError(
                    f"{call}: hidden_states must be a 2-D tensor (tokens x hidden), got "
                    f"{getattr(hidden_states, 'shape', type(hidden_states).__name__)}"
                )
            rows = int(hidden_states.shape[0])
            if rows != md.total_tokens:
                raise AFDValueError(
                    f"{call}: hidden_states has {rows} rows, the metadata's seq_lens "
                    f"{list(md.seq_lens)} sum to {md.total_tokens}"
                )
            sections = [_Section(_SEC_HIDDEN, hidden_states)]
            router = kwargs.get("router_logits")
            if router is not None:
                sections.append(
                    _Section(_SEC_ROUTER, self._rows_tensor(call, "router_logits", router, rows))
                )
            ids, weights = kwargs.get("topk_ids"), kwargs.get("topk_weights")
            if (ids is None) != (weights is None):
                raise AFDValueError(f"{call}: topk_ids and topk_weights go together")
            if ids is not None:
                ids = self._rows_tensor(call, "topk_ids", ids, rows)
                weights = self._rows_tensor(call, "topk_weights", weights, rows)
                if ids.shape != weights.shape:
                    raise AFDValueError(
                        f"{call}: topk_ids {tuple(ids.shape)} and topk_weights "
                        f"{tuple(weights.shape)} differ in shape"
                    )
                sections += [_Section(_SEC_TOPK_IDS, ids), _Section(_SEC_TOPK_W, weights)]
            for s in sections:
                _dtype_code(f"{call}: {_SEC_NAMES[s.sid]}", s.tensor.dtype)
            _, total = _layout(len(md.seq_lens), sections)
            if total > self.extra_info.slot_bytes:
                raise self._too_big(call, total, f"{rows} tokens of layer {md.layer_idx}")
            self._claim(comm.dispatch, stage)
            buf = self._slot(stage)
            seq = [int(v) for v in md.seq_lens]
            nbytes = _write_message(buf, _KIND_A2F, int(md.layer_idx), stage, rows, seq, sections)
            msgs: list[Any] = [None] * self.ffn_size
            msgs[self.ffn_peer] = buf[:nbytes]
            rnd = self._wait(
                lambda t: comm.dispatch.send(msgs, timeout=t), f"dispatch credit ({call})"
            )
            self._slot_round[stage] = rnd
            self._inflight.append(
                _Sent(
                    stage, int(md.layer_idx), rows, int(hidden_states.shape[1]), hidden_states.dtype
                )
            )

    @staticmethod
    def _rows_tensor(call: str, name: str, t: Any, rows: int) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise AFDValueError(
                f"{call}: {name} must be a 2-D tensor (tokens x columns), got "
                f"{getattr(t, 'shape', type(t).__name__)}"
            )
        if t.shape[0] != rows:
            raise AFDValueError(f"{call}: {name} has {t.shape[0]} rows, hidden_states has {rows}")
        return t

    def recv_ffn_output(
        self, ref_tensor: torch.Tensor, ubatch_idx: int = 0, **kwargs: Any
    ) -> torch.Tensor:
        """Receive micro-batch `ubatch_idx`'s FFN output into `ref_tensor` and return it.

        `ref_tensor` must have the shape and dtype of the hidden states sent
        for that micro-batch; it gets routed_output (+ shared_output when the
        FFN side sent one). Results come back in the order the micro-batches
        were sent: receiving another one first is refused (nothing is lost).
        """
        call = "recv_ffn_output"
        with self._lock:
            sent = self._front(call, ubatch_idx)
            want = (sent.rows, sent.cols)
            if not isinstance(ref_tensor, torch.Tensor) or tuple(ref_tensor.shape) != want:
                raise AFDValueError(
                    f"{call}: ref_tensor has shape "
                    f"{tuple(getattr(ref_tensor, 'shape', ()))}, ubatch {ubatch_idx} of "
                    f"layer {sent.layer} needs {want}"
                )
            if ref_tensor.dtype != sent.dtype:
                raise AFDValueError(
                    f"{call}: ref_tensor is {ref_tensor.dtype}, the hidden states sent were "
                    f"{sent.dtype}"
                )
            routed, shared = self._recv_combine(call, sent, ref_tensor.device)
            ref_tensor.copy_(routed)
            if shared is not None:
                ref_tensor.add_(shared)
            return ref_tensor

    def recv_ffn_payload(self, ubatch_idx: int = 0) -> AFDF2ATransferPayload:
        """Like `recv_ffn_output`, with routed and shared output apart (new tensors)."""
        call = "recv_ffn_payload"
        with self._lock:
            sent = self._front(call, ubatch_idx)
            routed, shared = self._recv_combine(call, sent, self.device)
            return AFDF2ATransferPayload(routed_output=routed, shared_output=shared)

    def _front(self, call: str, ubatch_idx: int) -> _Sent:
        self._require("attention", call)
        stage = self._check_ubatch(call, ubatch_idx)
        if not self._inflight:
            raise AFDUsageError(
                f"{call}(ubatch_idx={stage}): nothing is in flight; send_attn_output first"
            )
        sent = self._inflight[0]
        if sent.stage != stage:
            raise AFDUsageError(
                f"{call}(ubatch_idx={stage}): the next result to come back is ubatch "
                f"{sent.stage} (layer {sent.layer}); receive micro-batches in the order sent"
            )
        return sent

    def _recv_combine(
        self, call: str, sent: _Sent, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        comm = self._require("attention", call)
        rnd = self._wait(lambda t: comm.combine.recv(timeout=t), f"ubatch {sent.stage}'s result")
        try:
            routed, shared = self._parse_combine(rnd, sent, device)
        except BaseException:
            with contextlib.suppress(m2n.Error):
                rnd.release()
            self._inflight.popleft()
            raise
        rnd.release()
        self._inflight.popleft()
        return routed, shared

    def _parse_combine(
        self, rnd: m2n.Round, sent: _Sent, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        lens = rnd.lens or []
        f = self.ffn_peer
        others = [s for s, n in enumerate(lens) if n and s != f]
        if others:
            raise m2n.ProtocolError(
                f"combine round {rnd.number}: FFN rank(s) {others} sent to attention rank "
                f"{self.role_rank}, which FFN rank {f} serves"
            )
        raw = rnd.tensor(f)
        msg = _read_header(f, raw)
        if msg.kind != _KIND_F2A or _SEC_ROUTED not in msg.sections:
            raise m2n.ProtocolError(
                f"combine round {rnd.number}: FFN rank {f} sent {_KIND_NAMES[msg.kind]}, "
                "not an FFN output"
            )
        if (msg.layer, msg.stage, msg.rows) != (sent.layer, sent.stage, sent.rows):
            raise m2n.ProtocolError(
                f"combine round {rnd.number}: FFN rank {f} answered layer {msg.layer} ubatch "
                f"{msg.stage} with {msg.rows} rows; this rank waits for layer {sent.layer} "
                f"ubatch {sent.stage} ({sent.rows} rows)"
            )
        routed = _copy_section(raw, msg, _SEC_ROUTED, device)
        shared = _copy_section(raw, msg, _SEC_SHARED, device)
        assert routed is not None
        if routed.shape[1] != sent.cols:
            raise m2n.ProtocolError(
                f"combine round {rnd.number}: routed_output has {routed.shape[1]} columns, "
                f"the hidden states sent had {sent.cols}"
            )
        return routed, shared

    # -- FFN side --------------------------------------------------------------

    def _next_dispatch(self, call: str) -> _Received:
        if self._stash:
            return self._stash.popleft()
        comm = self._require("ffn", call)
        rnd = self._wait(lambda t: comm.dispatch.recv(timeout=t), "the attention side")
        try:
            got = self._parse_dispatch(rnd)
        except BaseException:
            with contextlib.suppress(m2n.Error):
                rnd.release()
            raise
        rnd.release()
        return got

    def _parse_dispatch(self, rnd: m2n.Round) -> _Received:
        lens = rnd.lens or []
        peers = self.attention_peers
        others = [s for s, n in enumerate(lens) if n and s not in peers]
        if others:
            raise m2n.ProtocolError(
                f"dispatch round {rnd.number}: attention rank(s) {others} sent to FFN rank "
                f"{self.role_rank}, which serves attention ranks {peers}"
            )
        msgs = []
        for p in peers:
            if not lens[p]:
                raise m2n.ProtocolError(
                    f"dispatch round {rnd.number}: attention rank {p} sent nothing to its "
                    f"FFN rank {self.role_rank}"
                )
            raw = rnd.tensor(p)
            msgs.append((raw, _read_header(p, raw)))
        kinds = {m.kind for _, m in msgs}
        if kinds == {_KIND_CONTROL}:
            return _Received(
                _KIND_CONTROL, rnd.number, -1, -1, msgs[0][1].blob, None, None, None, None, [], []
            )
        first = msgs[0][1]
        for p, (_, m) in zip(peers, msgs):
            if m.kind != _KIND_A2F:
                raise m2n.ProtocolError(
                    f"dispatch round {rnd.number}: attention rank {p} sent "
                    f"{_KIND_NAMES[m.kind]} where its peers sent attention data"
                )
            if (m.layer, m.stage) != (
                first.layer,
                first.stage,
            ) or m.sections.keys() != first.sections.keys():
                raise m2n.ProtocolError(
                    f"dispatch round {rnd.number}: attention rank {p} sent layer {m.layer} "
                    f"ubatch {m.stage} ({[_SEC_NAMES[s] for s in m.sections]}), attention rank "
                    f"{peers[0]} layer {first.layer} ubatch {first.stage} "
                    f"({[_SEC_NAMES[s] for s in first.sections]}): peers must send alike"
                )

        def gather(sid: int) -> torch.Tensor | None:
            parts = [_copy_section(raw, m, sid, self.device) for raw, m in msgs]
            got = [t for t in parts if t is not None]
            if not got:
                return None
            return got[0] if len(got) == 1 else torch.cat(got, 0)

        return _Received(
            _KIND_A2F,
            rnd.number,
            first.layer,
            first.stage,
            b"",
            gather(_SEC_HIDDEN),
            gather(_SEC_ROUTER),
            gather(_SEC_TOPK_IDS),
            gather(_SEC_TOPK_W),
            [m.seq_lens for _, m in msgs],
            [m.rows for _, m in msgs],
        )

    def recv_attn_output(self, ubatch_idx: int = 0, **kwargs: Any) -> AFDA2FTransferPayload:
        """Receive micro-batch `ubatch_idx` from this FFN rank's attention peers.

        Returns the peers' hidden states concatenated in rank order, with
        metadata (`layer_idx`, `stage_idx`, `seq_lens` = tokens per peer) and
        `router_logits` when sent; `context.states` is an `M2NTransferState`
        (each peer's own seq_lens, top-k routing). Keyword arguments:
        `routing_spec` (router logits required, width and dtype checked),
        `layer_idx` (checked against the layer received). Another micro-batch
        arriving first is refused and kept for the matching call.
        """
        call = "recv_attn_output"
        with self._lock:
            self._require("ffn", call)
            stage = self._check_ubatch(call, ubatch_idx)
            if any(p.stage == stage for p in self._pending):
                raise AFDUsageError(
                    f"{call}(ubatch_idx={stage}): ubatch {stage} was received and not "
                    "answered yet; call send_ffn_output for it first"
                )
            got = self._next_dispatch(call)
            if got.kind == _KIND_CONTROL:
                self._stash.appendleft(got)
                raise AFDUsageError(
                    f"{call}(ubatch_idx={stage}): the next round from the attention side is "
                    "the DP metadata of a new step: call control_plane.recv_dp_metadata_list()"
                )
            if got.stage != stage:
                self._stash.appendleft(got)
                raise AFDUsageError(
                    f"{call}(ubatch_idx={stage}): the next micro-batch from the attention side "
                    f"is ubatch {got.stage} (layer {got.layer}); receive in the order sent"
                )
            want_layer = kwargs.get("layer_idx")
            if want_layer is not None and int(want_layer) != got.layer:
                self._stash.appendleft(got)
                raise AFDUsageError(
                    f"{call}(layer_idx={want_layer}): the attention side sent layer {got.layer}"
                )
            spec = kwargs.get("routing_spec")
            if spec is not None:
                r = got.router
                width, dtype = int(spec.router_logits_width), spec.router_logits_dtype
                if r is None or r.shape[1] != width or r.dtype != dtype:
                    self._stash.appendleft(got)
                    have = "none" if r is None else f"{r.shape[1]} columns of {r.dtype}"
                    raise AFDValueError(
                        f"{call}: routing_spec needs router_logits of {width} columns of {dtype}; "
                        f"the attention side sent {have}"
                    )
            assert got.hidden is not None
            state = M2NTransferState(
                peer_ranks=list(self.attention_peers),
                peer_seq_lens=got.peer_seq_lens,
                peer_rows=got.peer_rows,
                topk_ids=got.topk_ids,
                topk_weights=got.topk_weights,
                round=got.round,
            )
            md = AFDTransferMetadata.create_ffn_metadata(
                layer_idx=got.layer, stage_idx=got.stage, seq_lens=list(got.peer_rows)
            )
            self._pending.append(_Pending(got.stage, got.layer, list(got.peer_rows)))
            return AFDA2FTransferPayload(
                hidden_states=got.hidden,
                context=AFDTransferContext(metadata=md, states=state),
                router_logits=got.router,
            )

    def send_ffn_output(
        self,
        ffn_output: torch.Tensor | AFDF2ATransferPayload,
        context: AFDTransferContext,
        **kwargs: Any,
    ) -> None:
        """Send the FFN output of a received micro-batch back, split per attention peer.

        `ffn_output`: a tensor (rows x hidden) or an `AFDF2ATransferPayload`
        (routed_output, shared_output); a shared-expert output may also come
        as `shared_output=` (or the NPU connectors' `expand_x_shared=`).
        `context`: the one `recv_attn_output` returned (its `seq_lens` split
        the rows). Micro-batches are answered in the order received.
        """
        call = "send_ffn_output"
        with self._lock:
            comm = self._require("ffn", call)
            md = context.metadata
            stage = self._check_ubatch(call, md.stage_idx)
            if "ubatch_idx" in kwargs and kwargs["ubatch_idx"] != stage:
                raise AFDValueError(
                    f"{call}: ubatch_idx={kwargs['ubatch_idx']} but the context is ubatch {stage}"
                )
            if not self._pending:
                raise AFDUsageError(f"{call}: no micro-batch was received; recv_attn_output first")
            front = self._pending[0]
            if front.stage != stage:
                raise AFDUsageError(
                    f"{call}: ubatch {stage} answered before ubatch {front.stage} (layer "
                    f"{front.layer}), which came first: answer in the order received"
                )
            if isinstance(ffn_output, torch.Tensor):
                routed, shared = ffn_output, None
            else:
                routed, shared = ffn_output.routed_output, ffn_output.shared_output
            extra = kwargs.get("shared_output", kwargs.get("expand_x_shared"))
            if extra is not None:
                if shared is not None:
                    raise AFDValueError(f"{call}: shared_output given twice")
                shared = extra
            if not isinstance(routed, torch.Tensor) or routed.dim() != 2:
                raise AFDValueError(
                    f"{call}: ffn_output must be a 2-D tensor (tokens x hidden), got "
                    f"{getattr(routed, 'shape', type(routed).__name__)}"
                )
            rows = sum(front.peer_rows)
            if routed.shape[0] != rows or md.total_tokens != rows:
                raise AFDValueError(
                    f"{call}: ffn_output has {routed.shape[0]} rows and the metadata "
                    f"{md.total_tokens}; ubatch {stage} of layer {front.layer} brought {rows} "
                    f"tokens ({front.peer_rows} from attention ranks {self.attention_peers})"
                )
            if list(md.seq_lens) != front.peer_rows:
                raise AFDValueError(
                    f"{call}: context seq_lens {list(md.seq_lens)} differ from the tokens per "
                    f"attention peer received ({front.peer_rows})"
                )
            if shared is not None and (
                not isinstance(shared, torch.Tensor) or tuple(shared.shape) != tuple(routed.shape)
            ):
                raise AFDValueError(
                    f"{call}: shared_output shape {tuple(getattr(shared, 'shape', ()))} differs "
                    f"from routed_output {tuple(routed.shape)}"
                )
            _dtype_code(f"{call}: ffn_output", routed.dtype)
            if shared is not None:
                _dtype_code(f"{call}: shared_output", shared.dtype)
            parts: list[list[_Section]] = []
            start = 0
            for n in front.peer_rows:
                secs = [_Section(_SEC_ROUTED, routed[start : start + n])]
                if shared is not None:
                    secs.append(_Section(_SEC_SHARED, shared[start : start + n]))
                parts.append(secs)
                start += n
            sizes = [_layout(1, secs)[1] for secs in parts]
            if max(sizes) > self.extra_info.slot_bytes:
                raise self._too_big(call, max(sizes), f"layer {front.layer}'s output")
            self._claim(comm.combine, stage)
            buf = self._slot(stage)
            msgs: list[Any] = [None] * self.attn_size
            slot = self.extra_info.slot_bytes
            for i, (peer, secs, n) in enumerate(zip(self.attention_peers, parts, front.peer_rows)):
                sub = buf[i * slot : (i + 1) * slot]
                nbytes = _write_message(sub, _KIND_F2A, int(md.layer_idx), stage, n, [n], secs)
                msgs[peer] = sub[:nbytes]
            rnd = self._wait(
                lambda t: comm.combine.send(msgs, timeout=t), f"combine credit ({call})"
            )
            self._slot_round[stage] = rnd
            self._pending.popleft()


class M2NAFDControlPlane(_ControlPlaneBase):
    """The DP-metadata control plane of `M2NAFDConnector` (the plugin's `AFDControlPlane`).

    The attention side sends each step's payload (the plugin's compact JSON)
    as a dispatch round ahead of the step's data: every attention rank
    calls `send_dp_metadata_list`, and each FFN rank's first attention peer
    carries it. FFN ranks receive it with `recv_dp_metadata_list`.
    """

    def __init__(self, connector: M2NAFDConnector) -> None:
        self.connector = connector

    def update_state_from_dp_metadata(self, payload: AFDControlPayload) -> None:
        """Apply a payload locally: its stages bound the `ubatch_idx` of the data calls."""
        c = self.connector
        stages = {}
        for k, md in payload.dp_metadata_list.items():
            if isinstance(k, bool) or not isinstance(k, int):
                raise AFDValueError(f"dp_metadata_list: stage {k!r} is not an integer")
            if not 0 <= k < c.extra_info.num_ubatches:
                raise AFDValueError(
                    f"dp_metadata_list: stage {k} is outside 0..{c.extra_info.num_ubatches - 1} "
                    "(connector_extra_config.num_ubatches)"
                )
            stages[k] = md
        c.dp_metadata_list = stages
        c.is_graph_capturing = bool(payload.is_graph_capturing)
        c.is_warmup = bool(payload.is_warmup)

    def send_dp_metadata_list(self, payload: AFDControlPayload) -> None:
        """Send the payload to the FFN ranks (every attention rank calls this each step)."""
        c = self.connector
        call = "send_dp_metadata_list"
        with c._lock:
            comm = c._require("attention", call)
            if c._inflight:
                raise AFDUsageError(
                    f"{call}: ubatch(es) {[s.stage for s in c._inflight]} of the previous step "
                    "are still in flight; receive them first"
                )
            blob = _encode_control(payload)
            leader = c.role_rank % c.ratio == 0
            total = _layout(0, [], len(blob))[1]
            if total > c.extra_info.slot_bytes:
                raise c._too_big(call, total, "DP metadata")
            slot = c.extra_info.num_ubatches
            c._claim(comm.dispatch, slot)
            # The FFN rank's first peer carries the payload, its other peers a marker.
            buf = c._slot(slot)
            nbytes = _write_message(buf, _KIND_CONTROL, -1, -1, 0, [], [], blob if leader else b"")
            msgs: list[Any] = [None] * c.ffn_size
            msgs[c.ffn_peer] = buf[:nbytes]
            rnd = c._wait(lambda t: comm.dispatch.send(msgs, timeout=t), f"credit ({call})")
            c._slot_round[slot] = rnd

    def recv_dp_metadata_list(self) -> AFDControlPayload:
        """Receive the next step's payload on an FFN rank (blocks until the attention sends)."""
        c = self.connector
        call = "recv_dp_metadata_list"
        with c._lock:
            c._require("ffn", call)
            if c._pending:
                raise AFDUsageError(
                    f"{call}: ubatch(es) {[p.stage for p in c._pending]} were received and not "
                    "answered; call send_ffn_output first"
                )
            got = c._next_dispatch(call)
            if got.kind != _KIND_CONTROL:
                c._stash.appendleft(got)
                raise AFDUsageError(
                    f"{call}: the next round from the attention side is data (layer "
                    f"{got.layer}, ubatch {got.stage}), not DP metadata: call recv_attn_output"
                )
            return _decode_control(got.control)


# ---------------------------------------------------------------------------
# Registration with the plugin
# ---------------------------------------------------------------------------


def register(name: str = CONNECTOR_NAME, *, replace: bool = False) -> None:
    """Register `M2NAFDConnector` with vLLM's AFD plugin under `name` (this process only).

    Calls `AFDConnectorFactory.register_connector(name, "m2n.afd",
    "M2NAFDConnector")`. The plugin's config validator
    (`afd_plugin.config.validate_afd_config`) accepts only the connector
    names in the fixed tuple `SUPPORTED_AFD_CONNECTORS`, so this also adds
    `name` to that tuple in this process; without that small patch (or the
    name added upstream) `--additional-config '{"afd": {"connector":
    "M2NAFDConnector", ...}}'` is refused. Both changes are per process:
    call this in every vLLM process (a `vllm.general_plugins` entry point
    does). Raises ImportError naming the missing module when the plugin or
    vLLM is not installed.
    """
    if _pbase is None:
        missing = getattr(_plugin_error, "name", None) or "afd_plugin"
        raise ImportError(
            f"m2n.afd.register() needs vLLM's AFD plugin (package afd_plugin, from "
            f"github.com/vllm-project/afd-plugin) and vLLM: importing it failed, {missing!r} "
            f"is missing ({_plugin_error})"
        )
    plugin_config: Any = importlib.import_module("afd_plugin.config")
    factory = importlib.import_module("afd_plugin.connectors.factory").AFDConnectorFactory
    factory.register_connector(name, __name__, "M2NAFDConnector", replace=replace)
    if name not in plugin_config.SUPPORTED_AFD_CONNECTORS:
        plugin_config.SUPPORTED_AFD_CONNECTORS = (*plugin_config.SUPPORTED_AFD_CONNECTORS, name)
