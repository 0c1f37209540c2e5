"""m2n.hf: transformers' own Mixtral and Qwen3-MoE with their experts in other processes.

The checkpoints are made here by transformers itself (small, random), and
the reference is the same model run whole in this process by transformers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import HERE
from test_launch import free_port

import m2n

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

NEW_TOKENS = 6
# f32 logits: both sides run the same transformers code on the same weights,
# and the expert sums are added in the same order (see m2n/hf.py); what can
# differ is a matrix product over a different set of rows (an expert rank
# batches every attention rank's rows), which BLAS may block differently:
# a few ulp of the hidden state per layer, amplified by the layers after.
# With top-2 routing the sums are formed exactly as transformers forms them,
# and on this machine the results are bit-identical; on another BLAS they
# might not be. Logits here are O(0.1) to O(1), so 1e-5 absolute (about 100
# ulp at 0.5) leaves room for that while catching a wrong row, expert or
# weight (an expert swapped moves them by over 1e-3: the test below).
ATOL = 1e-5


def make_model(family: str, out: Path) -> Any:
    torch.manual_seed(7)
    common = dict(
        vocab_size=96,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
        max_position_embeddings=128,
    )
    if family == "mixtral":
        cfg = transformers.MixtralConfig(intermediate_size=48, num_local_experts=6, **common)
        model = transformers.MixtralForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3MoeConfig(
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=8,
            head_dim=16,
            norm_topk_prob=True,
            mlp_only_layers=[1],  # a dense layer between sparse ones stays on the attention rank
            **common,
        )
        model = transformers.Qwen3MoeForCausalLM(cfg)
    # Random init gives near-uniform routers; sharpen them so that routing
    # (and so the rows each expert rank gets) is decisive and varied.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.mul_(20.0)
    model.eval()
    model.save_pretrained(out)
    return model


def reference(model: Any, prompts: Any) -> tuple[Any, Any]:
    out = model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize(("family", "m", "n"), [("mixtral", 2, 2), ("qwen3_moe", 1, 2)])
def test_generate_under_torchrun_matches_transformers(
    family: str, m: int, n: int, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    model = make_model(family, model_dir)
    g = torch.Generator().manual_seed(11)
    # Attention rank 0 has two prompts of 5 tokens, rank 1 three of 7: the
    # ranks run prefill and decode rounds of different sizes side by side.
    prompts = [torch.randint(3, 96, (2 + a, 5 + 2 * a), generator=g) for a in range(m)]
    torch.save(prompts, tmp_path / "prompts.pt")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(m + n),
            "--master-port",
            str(free_port()),
            str(HERE / "hf_app.py"),
            "torchrun",
            str(model_dir),
            str(tmp_path),
            str(m),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    # prefill + NEW_TOKENS - 1 decode forwards, one round per sparse layer each
    sparse = 3 if family == "mixtral" else 2
    rounds = NEW_TOKENS * sparse
    for a in range(m):
        assert f"attention {a}: {rounds} rounds" in log, log
    for e in range(n):
        assert f"expert {e}: {rounds + 1} rounds" in log, log  # and the closing round
    worst = 0.0
    for a in range(m):
        got = torch.load(tmp_path / f"attn{a}.pt")
        want_seq, want_logits = reference(model, prompts[a])
        assert torch.equal(got["sequences"], want_seq), (a, got["sequences"], want_seq)
        diff = (got["logits"] - want_logits).abs().max().item()
        worst = max(worst, diff)
        assert diff <= ATOL, f"attention rank {a}: logits differ by {diff}"
    print(f"{family} {m}x{n}: tokens equal, logits within {worst:.2e}")


def test_the_comparison_catches_a_wrong_expert(tmp_path: Path) -> None:
    """The tolerance is not loose: two experts of one layer swapped move the logits far past it."""
    model = make_model("mixtral", tmp_path / "model")
    prompts = torch.randint(3, 96, (2, 5), generator=torch.Generator().manual_seed(11))
    _, want = reference(model, prompts)
    with torch.no_grad():
        experts = model.model.layers[1].mlp.experts
        for p in (experts.gate_up_proj, experts.down_proj):
            p[[2, 3]] = p[[3, 2]].clone()
    _, got = reference(model, prompts)
    assert (got - want).abs().max().item() > 100 * ATOL


def test_a_killed_expert_is_an_error_in_generate_not_a_hang(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    make_model("mixtral", model_dir)
    torch.save([torch.randint(3, 96, (2, 5))], tmp_path / "prompts.pt")
    port = free_port()
    uid = m2n.unique_id(f"127.0.0.1:{port}")
    procs, logs = [], []
    for rank in range(3):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "RANK": str(rank),
            "WORLD_SIZE": "3",
            "M2N_UNIQUE_ID": uid,
        }
        cmd = [sys.executable, str(HERE / "hf_app.py"), "env", str(model_dir), str(tmp_path), "1"]
        logs.append(tmp_path / f"rank{rank}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    attention, victim = procs[0], procs[2]
    try:
        deadline = time.monotonic() + 120
        while "generating" not in logs[0].read_text():
            assert attention.poll() is None, logs[0].read_text()
            assert time.monotonic() < deadline, "the attention rank never started generating"
            time.sleep(0.1)
        time.sleep(1.0)  # well into generation
        os.kill(victim.pid, signal.SIGKILL)
        t0 = time.monotonic()
        attention.wait(timeout=60)
        took = time.monotonic() - t0
        out = logs[0].read_text()
        assert attention.returncode != 0, out
        assert "generate raised PeerLost" in out, out
        assert "expert 1" in out, out
        print(f"generate raised PeerLost {took:.2f} s after the kill")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


def test_misuse_is_refused_by_name() -> None:
    from conftest import run_group

    import m2n.hf

    def body(comm: m2n.Communicator) -> str:
        if comm.role == m2n.ATTENTION:
            with pytest.raises(m2n.InvalidArgument, match="no sparse MoE block"):
                m2n.hf.disaggregate(torch.nn.Linear(4, 4), comm)
            with pytest.raises(m2n.UsageError, match="serve_experts runs on expert ranks"):
                m2n.hf.serve_experts("/nonexistent", comm)
        else:
            with pytest.raises(m2n.UsageError, match="disaggregate runs on attention ranks"):
                m2n.hf.disaggregate(torch.nn.Linear(4, 4), comm)
        return "ok"

    assert set(run_group((1, 1), body).values()) == {"ok"}
