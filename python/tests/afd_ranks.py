"""One rank of an AFD group, run by test_afd.py in its own process (or a thread).

argv: role (attention / ffn), role rank, M, N, port, transport. The ranks go
through the plugin's contract in the plugin's call order: a control-plane
step ahead of each batch, three layers, two micro-batches in DBO order on
the attention side (send 0, send 1, recv 0, send 0, recv 1, ...), router
logits, top-k routing and shared-expert outputs. Every value is checked
against what the other side must have sent; a mismatch raises AssertionError
(and the process exits non-zero).
"""

from __future__ import annotations

import os
import sys
import zlib
from types import SimpleNamespace

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

import m2n.afd as afd

torch.set_num_threads(1)

LAYERS = 3
HIDDEN = 32
EXPERTS = 8
TOPK = 2
# Per step: the payload kind, the dtype, the micro-batches.
STEPS = [
    ("router", torch.float32, (0, 1)),
    ("topk", torch.float32, (0, 1)),
    ("plain", torch.bfloat16, (0,)),
]


def rows(step: int, ub: int, arank: int) -> int:
    return 3 + step + 2 * ub + arank


def seq_lens(step: int, ub: int, arank: int) -> list[int]:
    n = rows(step, ub, arank)
    return [2, n - 2] if step == 1 else [n]


def gen(
    tag: str, step: int, layer: int, ub: int, arank: int, shape: tuple[int, ...]
) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(repr((tag, step, layer, ub, arank)).encode()))
    return torch.randn(shape, generator=g)


def inputs(step: int, layer: int, ub: int, arank: int) -> dict[str, torch.Tensor]:
    kind, dtype, _ = STEPS[step]
    n = rows(step, ub, arank)
    out = {"hidden_states": gen("h", step, layer, ub, arank, (n, HIDDEN)).to(dtype)}
    if kind in ("router", "topk"):
        out["router_logits"] = gen("r", step, layer, ub, arank, (n, EXPERTS))
    if kind == "topk":
        g = torch.Generator().manual_seed(step * 100 + layer * 10 + ub + arank)
        out["topk_ids"] = torch.randint(0, EXPERTS, (n, TOPK), generator=g)
        out["topk_weights"] = gen("w", step, layer, ub, arank, (n, TOPK))
    return out


def ffn(step: int, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The "FFN": routed = hidden * (layer + 1); a shared output on steps 1 and 2."""
    routed = (hidden.float() * (layer + 1)).to(hidden.dtype)
    shared = (hidden.float() + layer).to(hidden.dtype) if step > 0 else None
    return routed, shared


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(what)


def dp_counts(step: int, ub: int, m: int) -> list[int]:
    return [rows(step, ub, a) for a in range(m)]


def config(role: str, m: int, n: int, port: int, transport: str) -> SimpleNamespace:
    return SimpleNamespace(
        role=role,
        host="127.0.0.1",
        port=port,
        num_attention_ranks=m,
        num_ffn_ranks=n,
        connector_extra_config={"transport": transport, "slot_bytes": "64K", "timeout": 20},
    )


def attention_rank(rank: int, m: int, n: int, port: int, transport: str) -> None:
    conn = afd.M2NAFDConnector(rank, 0, None, config("attention", m, n, port, transport), rank)
    conn.init_afd_connector()
    try:
        attention_steps(conn, rank, m)
    finally:
        conn.close()
    check(not conn.is_initialized, "not initialized after close")


def attention_steps(conn: afd.M2NAFDConnector, rank: int, m: int) -> None:
    check(conn.is_initialized, "is_initialized after init")
    cp = conn.control_plane
    assert cp is not None
    results = 0
    for step, (_kind, _dtype, ubs) in enumerate(STEPS):
        payload = afd.AFDControlPayload(
            dp_metadata_list={
                ub: afd.AFDDPMetadata(torch.tensor(dp_counts(step, ub, m))) for ub in ubs
            },
            is_graph_capturing=False,
            is_warmup=step == 0,
        )
        cp.update_state_from_dp_metadata(payload)
        cp.send_dp_metadata_list(payload)

        def send(layer: int, ub: int, step: int = step) -> None:
            md = afd.AFDTransferMetadata(layer, ub, seq_lens(step, ub, rank))
            x = inputs(step, layer, ub, rank)
            conn.send_attn_output(x.pop("hidden_states"), afd.AFDTransferContext(md), **x)

        def recv(layer: int, ub: int, step: int = step) -> None:
            nonlocal results
            h = inputs(step, layer, ub, rank)["hidden_states"]
            routed, shared = ffn(step, layer, h)
            want = routed.clone()
            if shared is not None:
                want.add_(shared)
            ref = torch.full_like(h, -7)
            got = conn.recv_ffn_output(ref, ubatch_idx=ub)
            check(got is ref, "recv_ffn_output returns ref_tensor")
            check(torch.equal(got, want), f"step {step} layer {layer} ubatch {ub}: FFN result")
            results += 1

        # DBO order: both micro-batches go out, then each result is taken
        # and the next layer of that micro-batch sent before the other's.
        for ub in ubs:
            send(0, ub)
        for layer in range(LAYERS):
            for ub in ubs:
                recv(layer, ub)
                if layer + 1 < LAYERS:
                    send(layer + 1, ub)
    # The end: an empty step tells the FFN ranks to stop.
    stop = afd.AFDControlPayload(dp_metadata_list={}, is_graph_capturing=False, is_warmup=False)
    cp.update_state_from_dp_metadata(stop)
    cp.send_dp_metadata_list(stop)
    print(f"attention {rank}: {results} results checked", flush=True)


def ffn_rank(rank: int, m: int, n: int, port: int, transport: str) -> None:
    conn = afd.M2NAFDConnector(rank, 0, None, config("ffn", m, n, port, transport), rank)
    conn.init_afd_connector()
    try:
        ffn_steps(conn, rank, m, n)
    finally:
        conn.close()


def ffn_steps(conn: afd.M2NAFDConnector, rank: int, m: int, n: int) -> None:
    cp = conn.control_plane
    assert cp is not None
    peers = [rank * (m // n) + i for i in range(m // n)]
    received = 0
    for step, (kind, dtype, ubs) in enumerate(STEPS):
        payload = cp.recv_dp_metadata_list()
        check(sorted(payload.dp_metadata_list) == list(ubs), f"step {step}: stages")
        for ub in ubs:
            md = payload.dp_metadata_list[ub]
            check(
                md.num_tokens_across_dp_cpu.tolist() == dp_counts(step, ub, m),
                f"step {step}: DP token counts",
            )
            check(int(md.max_tokens_across_dp_cpu) == max(dp_counts(step, ub, m)), "max tokens")
        check(payload.is_warmup == (step == 0), "is_warmup")
        check(payload.is_graph_capturing is False, "is_graph_capturing")
        cp.update_state_from_dp_metadata(payload)
        for layer in range(LAYERS):
            for ub in ubs:
                spec = afd.AFDExpertRoutingSpec(EXPERTS, torch.float32) if kind != "plain" else None
                got = conn.recv_attn_output(ubatch_idx=ub, routing_spec=spec)
                sent = [inputs(step, layer, ub, a) for a in peers]
                ctx = got.context
                where = f"step {step} layer {layer} ubatch {ub}"
                check(ctx.metadata.layer_idx == layer, f"{where}: layer_idx")
                check(ctx.metadata.stage_idx == ub, f"{where}: stage_idx")
                per_peer = [rows(step, ub, a) for a in peers]
                check(ctx.metadata.seq_lens == per_peer, f"{where}: seq_lens per peer")
                check(ctx.metadata.total_tokens == sum(per_peer), f"{where}: total_tokens")
                st = ctx.states
                assert isinstance(st, afd.M2NTransferState)
                check(st.peer_ranks == peers, f"{where}: peer ranks")
                check(
                    st.peer_seq_lens == [seq_lens(step, ub, a) for a in peers],
                    f"{where}: each peer's seq_lens",
                )
                want_h = torch.cat([s["hidden_states"] for s in sent])
                check(got.hidden_states.dtype == dtype, f"{where}: dtype")
                check(torch.equal(got.hidden_states, want_h), f"{where}: hidden_states")
                if kind == "plain":
                    check(got.router_logits is None, f"{where}: no router_logits")
                else:
                    want_r = torch.cat([s["router_logits"] for s in sent])
                    assert got.router_logits is not None
                    check(torch.equal(got.router_logits, want_r), f"{where}: router_logits")
                if kind == "topk":
                    assert st.topk_ids is not None and st.topk_weights is not None
                    ids = torch.cat([s["topk_ids"] for s in sent])
                    w = torch.cat([s["topk_weights"] for s in sent])
                    check(torch.equal(st.topk_ids, ids), f"{where}: topk_ids")
                    check(torch.equal(st.topk_weights, w), f"{where}: topk_weights")
                else:
                    check(st.topk_ids is None and st.topk_weights is None, f"{where}: no top-k")
                received += 1
                routed, shared = ffn(step, layer, got.hidden_states)
                if step == 1:  # the payload type, as the NPU runner passes it
                    out = afd.AFDF2ATransferPayload(routed_output=routed, shared_output=shared)
                    conn.send_ffn_output(out, ctx, ubatch_idx=ub)
                elif step == 2:  # shared output as a keyword
                    conn.send_ffn_output(routed, ctx, shared_output=shared)
                else:  # the plain tensor, as the GPU runner passes it
                    conn.send_ffn_output(routed, ctx)
    last = cp.recv_dp_metadata_list()
    check(last.dp_metadata_list == {}, "the stop step")
    print(f"ffn {rank}: {received} micro-batches checked", flush=True)


if __name__ == "__main__":
    role, r, m_, n_, port_, transport_ = sys.argv[1:]
    main = attention_rank if role == "attention" else ffn_rank
    main(int(r), int(m_), int(n_), int(port_), transport_)
