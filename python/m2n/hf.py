"""Hugging Face transformers models with their experts in other processes, over m2n.

On attention ranks, `disaggregate(model, comm)` replaces the expert
collection of every sparse MoE block of a transformers model (Mixtral,
Qwen3-MoE, OLMoE, Qwen2-MoE: any block with a `gate` router and an
`experts` module holding `gate_up_proj` / `down_proj`) with one that sends
the rows routed to each expert rank over m2n and adds up what comes back.
The block's own forward stays transformers' code: the router (and its
recorded `router_logits`), jitter, a shared expert all run where they ran.
On expert ranks, `serve_experts(model_dir, comm)` reads only this rank's
experts from the checkpoint and answers until every attention rank is done,
computing with the model's own experts class on its slice of the weights.

    comm = m2n.init_from_torch(attention=1)          # torchrun --nproc-per-node 3 app.py
    if comm.role == m2n.ATTENTION:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        with comm, m2n.hf.disaggregate(model, comm):
            out = model.generate(ids, max_new_tokens=32)
    else:
        with comm:
            m2n.hf.serve_experts(model_dir, comm)

Expert rank j of N holds experts [j*E//N, (j+1)*E//N) of every sparse
layer. Each MoE forward is one m2n round: dispatch carries, per expert
rank, the rows routed to at least one of its experts with their top-k ids
(local to that rank; the others set to the "no expert here" index the
experts class skips) and weights; combine brings back each row's weighted
sum over that rank's experts. The expert rank computes with the model's
own experts class (whatever implementation transformers picked: grouped_mm,
batched_mm, eager) in transformers' expert-parallel mode, where an id equal
to the local expert count means "not here". The attention rank adds the
ranks' sums in rank order into zeros: with top-2 routing that is exactly
the sum transformers forms (a + b, as a + 0 and 0 + b); with more experts
per token the additions may group differently. So the results differ from
the single-process model only by such regrouping and by a matrix product
over a different set of rows rounding differently.

All M attention ranks take part in every round (m2n rounds are collective
over the group), so they must run the same number of MoE forwards while
they generate; one that finishes early keeps answering rounds with empty
messages from `Disaggregated.close()` (the context's exit) until every
attention rank has closed, and then the experts return.

A dead or hung expert rank is `m2n.PeerLost` out of `generate()` (after
m2n's peer timeout), never a hang.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from . import ATTENTION, EXPERT, Communicator, InvalidArgument, Memory, ProtocolError, UsageError

__all__ = ["Disaggregated", "ExpertStats", "disaggregate", "serve_experts"]

_MAGIC = 0x6D326866  # "m2hf"
_HEADER = 8  # int32 words: magic, layer, rows, top_k, flags, hidden dtype, weights dtype, width
_HEADER_BYTES = _HEADER * 4
_DONE = 1  # dispatch: this attention rank has closed
_STOP = 2  # combine: every attention rank has closed; the experts are returning
_ALIGN = 16  # every section starts 16-byte aligned (the header is 32 bytes)

_DTYPES: list[torch.dtype] = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _dtype_code(dtype: torch.dtype) -> int:
    try:
        return _DTYPES.index(dtype)
    except ValueError:
        raise InvalidArgument(
            f"dtype {dtype} is not one m2n.hf sends (float32, float16, bfloat16, float64)"
        ) from None


def _dtype_of(code: int) -> torch.dtype:
    if not 0 <= code < len(_DTYPES):
        raise ProtocolError(f"m2n.hf: a message names dtype code {code}, which is not one it sends")
    return _DTYPES[code]


def _up(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _bounds(num_experts: int, ranks: int) -> list[tuple[int, int]]:
    """Each expert rank's experts: contiguous, balanced ranges."""
    return [(j * num_experts // ranks, (j + 1) * num_experts // ranks) for j in range(ranks)]


def _sparse_blocks(model: torch.nn.Module) -> Iterator[tuple[int, str, Any]]:
    """(layer, module name, block) of every sparse MoE block, in layer order."""
    for name, mod in model.named_modules():
        experts = getattr(mod, "experts", None)
        if not (isinstance(experts, torch.nn.Module) and hasattr(mod, "gate")):
            continue
        if not all(hasattr(experts, p) for p in ("gate_up_proj", "down_proj", "num_experts")):
            continue
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        if m is None:
            raise InvalidArgument(f"m2n.hf: cannot tell the layer of the MoE block {name!r}")
        yield int(m.group(1)), name, mod


class _Outbox:
    """One registered buffer per peer, grown (re-registered) when a message needs more."""

    def __init__(self, comm: Communicator, peers: int, nbytes: int) -> None:
        self._comm = comm
        self._bufs: list[torch.Tensor] = []
        self._mems: list[Memory] = []
        for _ in range(peers):
            buf = torch.zeros(nbytes, dtype=torch.uint8)
            self._mems.append(comm.register(buf))
            self._bufs.append(buf)
        self.last_round: int | None = None

    def buffer(self, peer: int, nbytes: int, channel: Any) -> torch.Tensor:
        buf = self._bufs[peer]
        if buf.numel() < nbytes:
            if self.last_round is not None:
                channel.wait_sent(self.last_round)
            self._comm.deregister(self._mems[peer])
            buf = torch.zeros(max(nbytes, 2 * buf.numel()), dtype=torch.uint8)
            self._mems[peer] = self._comm.register(buf)
            self._bufs[peer] = buf
        return buf

    def ready(self, channel: Any) -> None:
        """Wait until the last round sent from these buffers may be overwritten."""
        if self.last_round is not None:
            channel.wait_sent(self.last_round)


def _put(buf: torch.Tensor, off: int, t: torch.Tensor) -> int:
    """Copy `t`'s bytes into `buf` at `off`; returns the aligned end."""
    nbytes = t.numel() * t.element_size()
    if nbytes:
        buf[off : off + nbytes].view(t.dtype).view(t.shape).copy_(t)
    return _up(off + nbytes)


def _get(
    msg: torch.Tensor, off: int, dtype: torch.dtype, shape: tuple[int, ...]
) -> tuple[torch.Tensor, int]:
    """A view of `shape` x `dtype` in `msg` at `off`, and the aligned end."""
    count = 1
    for d in shape:
        count *= d
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    if off + nbytes > msg.numel():
        raise ProtocolError(
            f"m2n.hf: a message of {msg.numel()} bytes is too short for {shape} x {dtype} at {off}"
        )
    return msg[off : off + nbytes].view(dtype).view(shape), _up(off + nbytes)


def _header(msg: torch.Tensor, sender: int) -> list[int]:
    if msg.numel() < _HEADER_BYTES:
        raise ProtocolError(f"m2n.hf: rank {sender}'s message has {msg.numel()} bytes, no header")
    head = [int(v) for v in msg[:_HEADER_BYTES].view(torch.int32).tolist()]
    if head[0] != _MAGIC:
        raise ProtocolError(
            f"m2n.hf: rank {sender}'s message is not an m2n.hf message (magic {head[0]:#x}): "
            "is another program using this group?"
        )
    return head


class _RemoteExperts(torch.nn.Module):
    """Stands in for a block's experts: the same forward signature, computed on the expert ranks."""

    def __init__(self, link: Disaggregated, layer: int, num_experts: int) -> None:
        super().__init__()
        self._link = link
        self.layer = layer
        self.num_experts = num_experts

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return self._link._round(self.layer, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, over m2n"


@dataclass
class _Timing:
    rounds: int = 0
    round_s: float = 0.0  # inside _round: packing, the m2n round, unpacking
    wait_s: float = 0.0  # from the dispatch send to the combine round's arrival


class Disaggregated:
    """An attention rank's link to the expert ranks; made by `disaggregate`.

    A context manager: `close()` (on a clean exit) tells the experts this
    rank is done and keeps answering rounds until every attention rank is;
    on an exception it only marks the link closed (the communicator's own
    exit aborts the group, so the others fail fast).
    """

    def __init__(self, model: torch.nn.Module, comm: Communicator) -> None:
        if comm.role != ATTENTION:
            raise UsageError(
                f"m2n.hf.disaggregate runs on attention ranks; this is expert rank {comm.rank} "
                "(call m2n.hf.serve_experts there)"
            )
        blocks = list(_sparse_blocks(model))
        if not blocks:
            raise InvalidArgument(
                f"{type(model).__name__} has no sparse MoE block (a module with `gate` and "
                "`experts` holding gate_up_proj / down_proj): nothing to disaggregate"
            )
        self.comm = comm
        self.layers = [layer for layer, _, _ in blocks]
        _, n = comm.shape
        self.num_experts = int(blocks[0][2].experts.num_experts)
        if self.num_experts < n:
            raise InvalidArgument(
                f"{self.num_experts} experts cannot be spread over {n} expert ranks"
            )
        self.bounds = _bounds(self.num_experts, n)
        self.timing = _Timing()
        self._closed = False
        self._outbox = _Outbox(comm, n, 1 << 16)
        for layer, _, block in blocks:
            experts = block.experts
            if int(experts.num_experts) != self.num_experts:
                raise InvalidArgument(
                    f"layer {layer} has {experts.num_experts} experts, layer {self.layers[0]} "
                    f"{self.num_experts}: m2n.hf needs the same number in every sparse layer"
                )
            block.experts = _RemoteExperts(self, layer, self.num_experts)

    def _round(
        self, layer: int, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if self._closed:
            raise UsageError(
                "this model's experts were served over an m2n.hf link that is closed; "
                "load the model again to run it"
            )
        t0 = time.perf_counter()
        comm = self.comm
        if x.dim() != 2 or top_k_index.shape != top_k_weights.shape:
            raise InvalidArgument(
                f"m2n.hf: expected rows x hidden states and matching top-k ids and weights, got "
                f"{tuple(x.shape)}, {tuple(top_k_index.shape)}, {tuple(top_k_weights.shape)}"
            )
        x = x.contiguous()
        rows, width = x.shape
        top_k = top_k_index.shape[1]
        ids = top_k_index.to(torch.int32)
        weights = top_k_weights.contiguous()
        hd, wd = _dtype_code(x.dtype), _dtype_code(weights.dtype)
        self._outbox.ready(comm.dispatch)
        msgs: list[torch.Tensor] = []
        picks: list[torch.Tensor] = []
        for j, (lo, hi) in enumerate(self.bounds):
            mine = (ids >= lo) & (ids < hi)
            pick = mine.any(dim=1).nonzero().flatten()
            # Another rank's expert: the "not here" index the experts class
            # skips (transformers' own expert-parallel sentinel), weight 0.
            local = torch.where(mine, ids - lo, hi - lo)[pick]
            wsel = torch.where(mine, weights, torch.zeros_like(weights))[pick]
            n = pick.numel()
            size = (
                _HEADER_BYTES
                + _up(n * top_k * 4)
                + _up(n * top_k * weights.element_size())
                + n * width * x.element_size()
            )
            buf = self._outbox.buffer(j, size, comm.dispatch)
            head = torch.tensor([_MAGIC, layer, n, top_k, 0, hd, wd, width], dtype=torch.int32)
            off = _put(buf, 0, head)
            off = _put(buf, off, local)
            off = _put(buf, off, wsel)
            _put(buf, off, x[pick])
            msgs.append(buf[:size])
            picks.append(pick)
        t1 = time.perf_counter()
        self._outbox.last_round = comm.dispatch.send(msgs)
        rnd = comm.combine.recv()
        t2 = time.perf_counter()
        with rnd:
            out = self._gather(rnd, layer, x, picks)
        self.timing.rounds += 1
        self.timing.wait_s += t2 - t1
        self.timing.round_s += time.perf_counter() - t0
        return out

    def _gather(
        self, rnd: Any, layer: int, x: torch.Tensor, picks: list[torch.Tensor]
    ) -> torch.Tensor:
        out = torch.zeros_like(x)
        for j, pick in enumerate(picks):
            msg = rnd.tensor(j, torch.uint8)
            head = _header(msg, j)
            if head[1] != layer or head[2] != pick.numel() or head[4] & _STOP:
                raise ProtocolError(
                    f"m2n.hf: expert rank {j} answered layer {head[1]} with {head[2]} rows "
                    f"(flags {head[4]}) for layer {layer} with {pick.numel()} rows"
                )
            part, _ = _get(msg, _HEADER_BYTES, x.dtype, (pick.numel(), x.shape[1]))
            out.index_add_(0, pick, part)
            del part, msg
        return out

    def close(self) -> None:
        """Tell the experts this rank is done; answer rounds until every attention rank is."""
        if self._closed:
            return
        self._closed = True
        comm = self.comm
        while True:
            self._outbox.ready(comm.dispatch)
            msgs = []
            for j in range(len(self.bounds)):
                buf = self._outbox.buffer(j, _HEADER_BYTES, comm.dispatch)
                _put(buf, 0, torch.tensor([_MAGIC, -1, 0, 0, _DONE, 0, 0, 0], dtype=torch.int32))
                msgs.append(buf[:_HEADER_BYTES])
            self._outbox.last_round = comm.dispatch.send(msgs)
            with comm.combine.recv() as rnd:
                flags = [_header(rnd.tensor(j, torch.uint8), j)[4] for j in range(len(msgs))]
            if all(f & _STOP for f in flags):
                break
            if any(f & _STOP for f in flags):
                raise ProtocolError(f"m2n.hf: only some expert ranks stopped (flags {flags})")
        self._outbox.ready(comm.dispatch)

    def __enter__(self) -> Disaggregated:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True


def disaggregate(model: torch.nn.Module, comm: Communicator) -> Disaggregated:
    """Move `model`'s experts to the expert ranks of `comm` (an attention rank's call).

    Every sparse MoE block's `experts` module is replaced by one that sends
    its rows over m2n (the local expert weights are dropped); routing stays
    here. Use the result as a context manager around generation.
    """
    return Disaggregated(model, comm)


# ---------------------------------------------------------------------------
# Expert ranks
# ---------------------------------------------------------------------------

_NAMES = {
    "w1": "gate",
    "gate_proj": "gate",
    "w3": "up",
    "up_proj": "up",
    "w2": "down",
    "down_proj": "down",
}


def _checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: model_dir / v for k, v in weight_map.items()}
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise InvalidArgument(
            f"{model_dir} has neither model.safetensors nor model.safetensors.index.json"
        )
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {k: single for k in f.keys()}


def _load_experts(
    files: dict[str, Path], layer: int, lo: int, hi: int, dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts lo..hi-1 of one layer as (gate_up_proj, down_proj), read from the checkpoint."""
    from safetensors import safe_open

    pattern = re.compile(rf"^(?:model\.)?layers\.{layer}\.\w+\.experts\.(\d+)\.(\w+)\.weight$")
    wanted: dict[tuple[int, str], str] = {}
    for key in files:
        m = pattern.match(key)
        if m and lo <= int(m.group(1)) < hi and m.group(2) in _NAMES:
            wanted[(int(m.group(1)), _NAMES[m.group(2)])] = key
    loaded: dict[tuple[int, str], torch.Tensor] = {}
    by_file: dict[Path, list[tuple[int, str]]] = {}
    for slot, key in wanted.items():
        by_file.setdefault(files[key], []).append(slot)
    for path, slots in by_file.items():
        with safe_open(str(path), "pt") as f:
            for slot in slots:
                loaded[slot] = f.get_tensor(wanted[slot])
    gate_up, down = [], []
    for e in range(lo, hi):
        missing = [p for p in ("gate", "up", "down") if (e, p) not in loaded]
        if missing:
            raise InvalidArgument(
                f"the checkpoint has no {'/'.join(missing)} weights for expert {e} of layer "
                f"{layer} (looked for layers.{layer}.*.experts.{e}.{{w1,w3,w2 or "
                "gate_proj,up_proj,down_proj}.weight)"
            )
        gate_up.append(torch.cat([loaded[(e, "gate")], loaded[(e, "up")]], dim=0))
        down.append(loaded[(e, "down")])
    gu, dn = torch.stack(gate_up), torch.stack(down)
    if dtype is not None:
        gu, dn = gu.to(dtype), dn.to(dtype)
    return gu, dn


@dataclass
class ExpertStats:
    """What an expert rank did: rounds, rows, and seconds computing and waiting."""

    rounds: int = 0
    rows: int = 0
    compute_s: float = 0.0
    wait_s: float = 0.0
    layers: list[int] = field(default_factory=list)


def serve_experts(
    model_dir: str | Path,
    comm: Communicator,
    *,
    dtype: torch.dtype | None = None,
    timeout: float | None = None,
) -> ExpertStats:
    """Serve this rank's experts of the model in `model_dir` until every attention rank closes.

    Reads the config and only this rank's experts of every sparse layer
    (safetensors, a single file or sharded), in `dtype` (default: the
    checkpoint's), and runs the model's own experts class on them.
    `timeout` bounds the wait for each round (None: until a peer is lost).
    """
    if comm.role != EXPERT:
        raise UsageError(
            f"m2n.hf.serve_experts runs on expert ranks; this is attention rank {comm.rank} "
            "(call m2n.hf.disaggregate there)"
        )
    m, n = comm.shape
    experts: dict[int, torch.nn.Module] = {}
    # Loading takes a while (transformers' import too); the proxy thread
    # keeps this rank's heartbeats going meanwhile, so the attention ranks
    # waiting in their first round do not take it for hung.
    comm.start_proxy()
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        model_dir = Path(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
        blocks = list(_sparse_blocks(skeleton))
        if not blocks:
            raise InvalidArgument(f"the model in {model_dir} has no sparse MoE block to serve")
        num_experts = int(blocks[0][2].experts.num_experts)
        if num_experts < n:
            raise InvalidArgument(f"{num_experts} experts cannot be spread over {n} expert ranks")
        lo, hi = _bounds(num_experts, n)[comm.rank]
        files = _checkpoint_files(model_dir)
        for layer, _, block in blocks:
            gu, dn = _load_experts(files, layer, lo, hi, dtype)
            mod = block.experts  # the model's own class, on the meta device
            mod.gate_up_proj = torch.nn.Parameter(gu, requires_grad=False)
            mod.down_proj = torch.nn.Parameter(dn, requires_grad=False)
            mod.num_experts = hi - lo
            # Ids == num_experts are experts on other ranks: transformers'
            # expert-parallel mode skips them (and zeroes their rows).
            mod._is_expert_parallel = True
            experts[layer] = mod.eval()
    finally:
        comm.stop_proxy()
    del skeleton
    stats = ExpertStats(layers=sorted(experts))
    outbox = _Outbox(comm, m, 1 << 16)
    done = [False] * m
    with torch.inference_mode():
        while True:
            t0 = time.perf_counter()
            rnd = comm.dispatch.recv(timeout)
            t1 = time.perf_counter()
            outbox.ready(comm.combine)
            with rnd:
                sizes = _answer(rnd, experts, hi - lo, done, outbox, comm, stats)
            stop = all(done)
            msgs = []
            for a, size in enumerate(sizes):
                buf = outbox.buffer(a, _HEADER_BYTES, comm.combine)
                if stop:
                    _put(
                        buf, 0, torch.tensor([_MAGIC, -1, 0, 0, _STOP, 0, 0, 0], dtype=torch.int32)
                    )
                    size = _HEADER_BYTES
                msgs.append(buf[:size])
            outbox.last_round = comm.combine.send(msgs)
            stats.rounds += 1
            stats.wait_s += t1 - t0
            stats.compute_s += time.perf_counter() - t1
            if stop:
                comm.combine.wait_sent(outbox.last_round)
                return stats


def _answer(
    rnd: Any,
    experts: dict[int, torch.nn.Module],
    local: int,
    done: list[bool],
    outbox: _Outbox,
    comm: Communicator,
    stats: ExpertStats,
) -> list[int]:
    """Compute one round; write each attention rank's answer into the outbox; their sizes."""
    heads = []
    for a in range(len(done)):
        msg = rnd.tensor(a, torch.uint8)
        head = _header(msg, a)
        if head[4] & _DONE:
            done[a] = True
        elif done[a]:
            raise ProtocolError(f"m2n.hf: attention rank {a} sent a layer after it closed")
        heads.append(head)
        del msg
    sizes = [_HEADER_BYTES] * len(done)
    by_layer: dict[int, list[int]] = {}
    for a, head in enumerate(heads):
        if not head[4] & _DONE:
            if head[1] not in experts:
                raise ProtocolError(
                    f"m2n.hf: attention rank {a} sent layer {head[1]}, which has no experts "
                    f"here (sparse layers: {sorted(experts)}): are both sides the same model?"
                )
            by_layer.setdefault(head[1], []).append(a)
    for layer, senders in by_layer.items():
        xs, ids, ws, counts = [], [], [], []
        for a in senders:
            _, _, rows, top_k, _, hd, wd, width = heads[a]
            msg = rnd.tensor(a, torch.uint8)
            i, off = _get(msg, _HEADER_BYTES, torch.int32, (rows, top_k))
            w, off = _get(msg, off, _dtype_of(wd), (rows, top_k))
            x, _ = _get(msg, off, _dtype_of(hd), (rows, width))
            if rows and (int(i.min()) < 0 or int(i.max()) > local):
                raise ProtocolError(
                    f"m2n.hf: attention rank {a} sent expert ids outside 0..{local} "
                    f"for layer {layer}"
                )
            ids.append(i.long())
            ws.append(w.clone())
            xs.append(x.clone())
            counts.append(rows)
            del i, w, x, msg
        x_all = torch.cat(xs)
        mod = experts[layer]
        if x_all.dtype != mod.gate_up_proj.dtype:
            raise InvalidArgument(
                f"m2n.hf: the attention ranks send {x_all.dtype} hidden states and the experts "
                f"hold {mod.gate_up_proj.dtype} weights: pass dtype= to serve_experts"
            )
        y = mod(x_all, torch.cat(ids), torch.cat(ws)) if x_all.shape[0] else x_all
        stats.rows += x_all.shape[0]
        start = 0
        for a, rows in zip(senders, counts):
            width = heads[a][7]
            size = _HEADER_BYTES + rows * width * y.element_size()
            buf = outbox.buffer(a, size, comm.combine)
            answer = torch.tensor(
                [_MAGIC, layer, rows, 0, 0, heads[a][5], 0, width], dtype=torch.int32
            )
            off = _put(buf, 0, answer)
            _put(buf, off, y[start : start + rows])
            sizes[a] = size
            start += rows
    for a, head in enumerate(heads):
        if head[4] & _DONE:
            buf = outbox.buffer(a, _HEADER_BYTES, comm.combine)
            _put(buf, 0, torch.tensor([_MAGIC, -1, 0, 0, 0, 0, 0, 0], dtype=torch.int32))
    return sizes
