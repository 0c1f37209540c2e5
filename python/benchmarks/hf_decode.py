"""Decode speed of a transformers MoE model disaggregated over m2n.hf, against the same model whole.

    python hf_decode.py make DIR                 # a random Mixtral checkpoint (transformers' own)
    python hf_decode.py whole DIR BATCH OUT.json # the model in one process
    torchrun --nproc-per-node 2 hf_decode.py split DIR BATCH OUT.json   # 1 attention + 1 expert

Decode tokens/s = batch x (N - 1) / (t(N new tokens) - t(1 new token)):
generate() with N and with 1 new tokens (the prefill alone), the best of
REPEATS each. Where the time goes, per decode step: whole, torch's own
experts module (timed by a forward hook pair); split, the m2n.hf round on
the attention rank (packing + m2n + unpacking), the wait inside it (send to
the combine's arrival), and the expert rank's compute. Every process uses
one torch thread.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

PROMPT = 16
NEW = 33
REPEATS = 3


def make(out: str) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=1024,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    )
    MixtralForCausalLM(cfg).save_pretrained(out)


def _prompts(batch: int) -> torch.Tensor:
    return torch.randint(3, 1024, (batch, PROMPT), generator=torch.Generator().manual_seed(1))


def _generate(model: Any, prompts: torch.Tensor, new: int) -> float:
    t0 = time.perf_counter()
    out = model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
    )
    took = time.perf_counter() - t0
    assert out.shape[1] == PROMPT + new, out.shape
    return took


def _decode(model: Any, prompts: torch.Tensor, clock: list[float]) -> dict[str, float]:
    """Best-of-REPEATS decode time per step, and the clocks' share of it."""
    _generate(model, prompts, 2)  # warm-up
    best: dict[str, float] | None = None
    for _ in range(REPEATS):
        clock[:] = [0.0] * len(clock)
        t1 = _generate(model, prompts, 1)
        c1 = list(clock)
        clock[:] = [0.0] * len(clock)
        tn = _generate(model, prompts, NEW)
        steps = NEW - 1
        got = {"step_s": (tn - t1) / steps}
        for i, (a, b) in enumerate(zip(c1, clock)):
            got[f"clock{i}_s"] = (b - a) / steps
        if best is None or got["step_s"] < best["step_s"]:
            best = got
    assert best is not None
    return best


def whole(model_dir: str, batch: int, out: str) -> None:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    clock = [0.0]
    start: list[float] = []

    def pre(*_: Any) -> None:
        start.append(time.perf_counter())

    def post(*_: Any) -> None:
        clock[0] += time.perf_counter() - start.pop()

    for layer in model.model.layers:
        layer.mlp.experts.register_forward_pre_hook(pre)
        layer.mlp.experts.register_forward_hook(post)
    r = _decode(model, _prompts(batch), clock)
    res = {"batch": batch, "step_s": r["step_s"], "experts_s": r["clock0_s"]}
    Path(out).write_text(json.dumps(res))


def split(model_dir: str, batch: int, out: str) -> None:
    import os

    import m2n
    import m2n.hf

    torch.set_num_threads(1)
    model = None
    if int(os.environ["RANK"]) == 0:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    comm = m2n.init_from_torch(attention=1, config={"transport": "shm"})
    with comm:
        if model is None:
            # The compute of decode rounds (batch rows: this one rank holds
            # every expert) apart from the prefill's.
            per_rows: dict[int, list[float]] = {}
            answer = m2n.hf._answer

            def timed_answer(rnd: Any, *args: Any) -> list[int]:
                stats = args[-1]
                rows0, t0 = stats.rows, time.perf_counter()
                sizes = answer(rnd, *args)
                per_rows.setdefault(stats.rows - rows0, []).append(time.perf_counter() - t0)
                return sizes

            m2n.hf._answer = timed_answer  # type: ignore[assignment]
            m2n.hf.serve_experts(model_dir, comm)
            decode = per_rows.get(batch, [])
            assert decode, f"no round of {batch} rows reached the expert rank: {sorted(per_rows)}"
            Path(out + ".expert").write_text(
                json.dumps({"rounds": len(decode), "compute_s": sum(decode) / len(decode)})
            )
            return
        with m2n.hf.disaggregate(model, comm) as link:
            clock = [0.0, 0.0]
            orig = link._round

            def timed(*args: Any) -> torch.Tensor:
                r0, w0 = link.timing.round_s, link.timing.wait_s
                y = orig(*args)
                clock[0] += link.timing.round_s - r0
                clock[1] += link.timing.wait_s - w0
                return y

            link._round = timed  # type: ignore[method-assign]
            r = _decode(model, _prompts(batch), clock)
            rounds = link.timing.rounds
        res = {
            "batch": batch,
            "step_s": r["step_s"],
            "round_s": r["clock0_s"],
            "wait_s": r["clock1_s"],
            "rounds": rounds,
        }
        Path(out).write_text(json.dumps(res))


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "make":
        make(sys.argv[2])
    elif what == "whole":
        whole(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif what == "split":
        split(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        sys.exit(f"unknown mode {what!r}: make, whole or split")
