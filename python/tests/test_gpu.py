"""The package on a GPU: stream-ordered rounds from a CUDA tensor, every byte checked.

Skips (saying why) without torch's CUDA. With a GPU: a 1 x 1 group over shm;
the attention rank fills a registered CUDA tensor on its stream, enqueues
the send (`send_on_stream`), then overwrites the tensor on the same stream
(the stream must hold the overwrite until the round has left); the expert
enqueues the receive (`recv_on_stream`) and copies the message, viewed as a
CUDA tensor, on its stream. Then graph-safe mode (`set_stream_mode`): at
depth 1 one step of `send_on_stream` / `recv_on_stream` /
`release_on_stream` is captured into a torch.cuda.CUDAGraph on each rank;
the attention graph first rewrites the registered source from a device
step counter it increments, so every replay sends new bytes; each graph is
replayed 50 times, and after each replay (both streams synchronised) every
byte the expert copied out is checked. scripts/gpu-check runs this file as
a script.
"""

from __future__ import annotations

import sys
import threading

import pytest
import torch

import m2n

ROUNDS, LEN = 20, 4096


def stream_rounds() -> int:
    """Run the rounds; the number of wrong ones."""
    root = m2n.Root(timeout=60)
    cfg = {"transport": "shm", "slot_bytes": 1 << 16, "depth": 2}
    box: dict[str, m2n.Communicator] = {}
    t = threading.Thread(
        target=lambda: box.setdefault("e", m2n.Communicator(m2n.EXPERT, 0, (1, 1), root, cfg))
    )
    t.start()
    a = m2n.Communicator(m2n.ATTENTION, 0, (1, 1), root, cfg)
    t.join()
    e = box["e"]
    src = torch.zeros(LEN, dtype=torch.uint8, device="cuda")
    mem = a.register(src)
    assert mem.device
    sa, se = torch.cuda.Stream(), torch.cuda.Stream()
    a.start_proxy()
    e.start_proxy()
    outs = [torch.zeros(LEN, dtype=torch.uint8, device="cuda") for _ in range(ROUNDS)]
    for k in range(ROUNDS):
        with torch.cuda.stream(sa):
            src.fill_(k + 1)
            a.dispatch.send_on_stream([src], sa)
            src.fill_(0xEE)  # the next writer: held until the round left
        rnd = e.dispatch.recv_on_stream(se)
        with torch.cuda.stream(se):
            outs[k].copy_(rnd.tensor(0, torch.uint8, (LEN,)))
        rnd.release_on_stream(se)
    sa.synchronize()
    se.synchronize()
    bad = sum(1 for k in range(ROUNDS) if not bool((outs[k] == k + 1).all()))
    a.stop_proxy()
    e.stop_proxy()
    e.close()
    a.close()
    print(f"test_gpu.py: {ROUNDS} stream-ordered rounds from a CUDA tensor over shm, {bad} wrong")
    return bad


REPLAYS = 50


def graph_replays() -> int:
    """Capture one graph-safe step per rank at depth 1, replay it; the number of wrong replays."""
    root = m2n.Root(timeout=60)
    cfg = {"transport": "shm", "slot_bytes": 1 << 16, "depth": 1}
    box: dict[str, m2n.Communicator] = {}
    t = threading.Thread(
        target=lambda: box.setdefault("e", m2n.Communicator(m2n.EXPERT, 0, (1, 1), root, cfg))
    )
    t.start()
    a = m2n.Communicator(m2n.ATTENTION, 0, (1, 1), root, cfg)
    t.join()
    e = box["e"]
    src = torch.zeros(LEN, dtype=torch.uint8, device="cuda")
    a.register(src)
    out = torch.zeros(LEN, dtype=torch.uint8, device="cuda")
    step = torch.zeros(1, dtype=torch.int32, device="cuda")
    idx = torch.arange(LEN, dtype=torch.int32, device="cuda")
    sa, se = torch.cuda.Stream(), torch.cuda.Stream()
    a.start_proxy()
    e.start_proxy()
    a.dispatch.set_stream_mode(m2n.STREAM_GRAPH_SAFE, sa)
    e.dispatch.set_stream_mode(m2n.STREAM_GRAPH_SAFE, se)
    assert a.dispatch.stream_mode == e.dispatch.stream_mode == m2n.STREAM_GRAPH_SAFE
    assert a.combine.stream_mode == m2n.STREAM_SEQUENCE
    with pytest.raises(m2n.UsageError, match="graph-safe"):
        e.dispatch.try_recv()  # the direct API, refused on a graph-safe side
    ga, ge = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(ga, stream=sa, capture_error_mode="relaxed"):
        step.add_(1)
        src.copy_(((step + idx) % 251 + 1).to(torch.uint8))
        a.dispatch.send_on_stream([src], sa)
    with torch.cuda.graph(ge, stream=se, capture_error_mode="relaxed"):
        rnd = e.dispatch.recv_on_stream(se)
        out.copy_(rnd.tensor(0, torch.uint8, (LEN,)))
        rnd.release_on_stream(se)
    ref = torch.arange(LEN, dtype=torch.int32)
    bad = 0
    for k in range(REPLAYS):
        with torch.cuda.stream(sa):
            ga.replay()
        with torch.cuda.stream(se):
            ge.replay()
        se.synchronize()
        sa.synchronize()
        want = ((k + 1 + ref) % 251 + 1).to(torch.uint8)
        if not torch.equal(out.cpu(), want):
            bad += 1
    del ga, ge
    a.stop_proxy()
    e.stop_proxy()
    e.close()
    a.close()
    print(
        f"test_gpu.py: {REPLAYS} replays of a graph-safe step captured in CUDA graphs (depth 1),"
        f" {bad} wrong"
    )
    return bad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for torch")
def test_stream_ordered_rounds_from_a_cuda_tensor() -> None:
    assert stream_rounds() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device for torch")
def test_graph_safe_step_captured_in_cuda_graphs_replays() -> None:
    assert graph_replays() == 0


if __name__ == "__main__":
    if not torch.cuda.is_available():
        print("test_gpu.py: FAIL: torch sees no CUDA device")
        sys.exit(1)
    wrong = stream_rounds()
    wrong += graph_replays()
    sys.exit(1 if wrong else 0)
