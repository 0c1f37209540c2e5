"""The f32 reference against transformers in float32, every family.

For each family the runtime runs, a small random model of transformers'
own class is built with sharp weights rounded to bf16 values (so that the
runtime, which holds weights in bf16, computes on the very same numbers),
saved with ``save_pretrained`` (the Hub's per-expert layout), and scored by
teacher forcing with transformers in float32 and with
``moe-run --reference --score --dtype f32``. Every log-probability must
agree within TOLERANCE. Negative controls (the same checkpoint with one
detail of its config.json changed) must not: they show that a wrong
detail is visible at this tolerance.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import transformers

TOLERANCE = 1e-3
SEQUENCES = [
    [1, 5, 9, 33, 200, 7, 8, 100, 250, 3, 44, 12],
    [300, 2, 2, 2, 17],
    [(i * 37 + 11) % 320 for i in range(40)],
]
COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 320,
    "rope_theta": 1e4,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "max_position_embeddings": 512,
}
SPARSE: dict[str, Any] = {"decoder_sparse_step": 1, "mlp_only_layers": []}
# Qwen3-MoE's own head_dim (queries 2 x hidden wide).
HEAD_DIM: dict[str, Any] = {"head_dim": 32}
# DeepSeek-V3 at small size: MLA with both low-rank projections, YaRN over
# an original context shorter than the longest sequence, 16 experts in 4
# groups (top-4 from the best 2), a shared expert, the first layer dense.
YARN: dict[str, Any] = {
    "rope_type": "yarn",
    "rope_theta": 1e4,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}
DEEPSEEK: dict[str, Any] = {
    **{k: v for k, v in COMMON.items() if k != "rope_theta"},
    "num_hidden_layers": 3,
    "max_position_embeddings": 128,  # factor x original
    "num_key_value_heads": 4,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "moe_intermediate_size": 32,
    "intermediate_size": 96,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "rope_interleave": True,
    "rope_parameters": YARN,
}


@dataclass
class Family:
    """A family: how to build its transformers model, and its controls."""

    name: str
    build: Callable[[], transformers.PreTrainedModel]
    # (what is broken, config.json edits)
    controls: list[tuple[str, dict[str, Any]]]


def families() -> list[Family]:
    """Every family the runtime runs, at small size."""
    t = transformers
    rope = {"rope_theta": 1e6}
    return [
        Family(
            "mixtral",
            lambda: t.MixtralForCausalLM(
                t.MixtralConfig(intermediate_size=128, num_local_experts=8, **COMMON)
            ),
            [("rope theta 1e6 instead of 1e4", rope)],
        ),
        Family(
            "qwen3_moe",
            lambda: t.Qwen3MoeForCausalLM(
                t.Qwen3MoeConfig(
                    **HEAD_DIM,
                    moe_intermediate_size=64,
                    intermediate_size=256,
                    num_experts=16,
                    num_experts_per_tok=4,
                    norm_topk_prob=True,
                    **SPARSE,
                    **COMMON,
                )
            ),
            [("norm_topk_prob flipped", {"norm_topk_prob": False})],
        ),
        Family(
            "qwen3_moe_dense",
            lambda: t.Qwen3MoeForCausalLM(
                t.Qwen3MoeConfig(
                    **HEAD_DIM,
                    moe_intermediate_size=64,
                    intermediate_size=256,
                    num_experts=16,
                    num_experts_per_tok=4,
                    norm_topk_prob=True,
                    decoder_sparse_step=1,
                    mlp_only_layers=[0],
                    **COMMON,
                )
            ),
            [],
        ),
        Family(
            "olmoe",
            lambda: t.OlmoeForCausalLM(
                t.OlmoeConfig(
                    intermediate_size=64,
                    num_experts=16,
                    num_experts_per_tok=4,
                    norm_topk_prob=False,
                    pad_token_id=0,
                    eos_token_id=1,
                    **COMMON,
                )
            ),
            [("norm_topk_prob flipped", {"norm_topk_prob": True})],
        ),
        Family(
            "qwen2_moe",
            lambda: t.Qwen2MoeForCausalLM(
                t.Qwen2MoeConfig(
                    moe_intermediate_size=64,
                    shared_expert_intermediate_size=128,
                    intermediate_size=256,
                    num_experts=16,
                    num_experts_per_tok=4,
                    norm_topk_prob=False,
                    **SPARSE,
                    **COMMON,
                )
            ),
            [("norm_topk_prob flipped", {"norm_topk_prob": True})],
        ),
        Family(
            "deepseek_v3",
            lambda: t.DeepseekV3ForCausalLM(t.DeepseekV3Config(**DEEPSEEK)),
            [
                ("rope_interleave flipped", {"rope_interleave": False}),
                ("no group limit (topk_group 4)", {"topk_group": 4}),
                (
                    "plain rope instead of YaRN",
                    {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
                ),
                ("routed_scaling_factor 1", {"routed_scaling_factor": 1.0}),
            ],
        ),
    ]


def sharpen(model: torch.nn.Module) -> None:
    """Sharp random weights (large enough that a wrong detail moves the scores), as bf16 values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + (torch.rand_like(p) - 0.5) * 0.6)
            elif name.endswith("bias"):
                p.copy_(torch.rand_like(p) - 0.5)
            else:
                scale = 3.0 * (3.0 / p.shape[-1]) ** 0.5
                p.copy_((torch.rand_like(p) * 2 - 1) * scale)
            p.copy_(p.to(torch.bfloat16).float())
        # DeepSeek-V3's score-correction bias is a buffer: about the size
        # of the sigmoid scores' spread, so that it changes some choices.
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(((torch.rand_like(b) - 0.5) * 0.4).to(torch.bfloat16).float())


def hf_scores(model: transformers.PreTrainedModel, seq: list[int]) -> list[float]:
    """Teacher-forced log-probabilities from transformers in float32."""
    with torch.no_grad():
        lp = model(torch.tensor([seq])).logits.float().log_softmax(-1)[0]
    return [lp[i - 1, seq[i]].item() for i in range(1, len(seq))]


def our_scores(moe_run: str, model_dir: Path, seq: list[int], dtype: str = "f32") -> list[float]:
    """Teacher-forced log-probabilities from moe-run's reference in ``dtype``."""
    args = [moe_run, "--model", str(model_dir), "--reference", "--score", "--dtype", dtype]
    args += ["--prompt-ids", ",".join(map(str, seq))]
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    if out.returncode != 0 or not out.stdout.startswith("scores: "):
        sys.exit(f"check_f32: moe-run failed on {model_dir}: {out.stderr.strip()}")
    return [float(v) for v in out.stdout.split()[1:]]


def deviation(moe_run: str, model_dir: Path, want: list[list[float]]) -> float:
    """Largest |ours - transformers| over every scored token."""
    return deviations(moe_run, model_dir, want)[0]


def deviations(
    moe_run: str, model_dir: Path, want: list[list[float]], dtype: str = "f32"
) -> tuple[float, float]:
    """Largest and mean |ours - transformers| over every scored token."""
    diffs: list[float] = []
    for seq, ref in zip(SEQUENCES, want):
        got = our_scores(moe_run, model_dir, seq, dtype)
        if len(got) != len(ref):
            sys.exit(f"check_f32: {len(got)} scores for {len(ref)} tokens")
        diffs += [abs(a - b) for a, b in zip(got, ref)]
    return max(diffs), sum(diffs) / len(diffs)


def spread(a: list[list[float]], b: list[list[float]]) -> tuple[float, float]:
    """Largest and mean |a - b| over every scored token."""
    d = [abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v)]
    return max(d), sum(d) / len(d)


def main() -> None:
    """Checks every family; exits non-zero on any failure."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--moe-run", required=True)
    ap.add_argument("--json", help="also write the figures here")
    a = ap.parse_args()
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    failed = []
    print(f"# f32: moe-run --reference --dtype f32 against transformers {transformers.__version__}")
    print(f"# {'family':<10} {'max |ours - hf_f32|':>20}  tolerance {TOLERANCE:g}")
    with tempfile.TemporaryDirectory() as tmp:
        for fam in families():
            model = fam.build()  # float32 parameters, as transformers makes them
            model.eval()  # type: ignore[no-untyped-call]
            model.config._attn_implementation = "eager"
            sharpen(model)
            d = Path(tmp) / fam.name
            model.save_pretrained(d)
            want = [hf_scores(model, s) for s in SEQUENCES]
            worst = deviation(a.moe_run, d, want)
            ok = worst <= TOLERANCE
            print(f"  {fam.name:<10} {worst:>20.3g}  {'ok' if ok else 'FAILED'}")
            row: dict[str, Any] = {"family": fam.name, "max_abs": worst, "controls": {}}
            if not ok:
                failed.append(fam.name)
            config = json.loads((d / "config.json").read_text())
            for what, edits in fam.controls:
                (d / "config.json").write_text(json.dumps({**config, **edits}))
                off = deviation(a.moe_run, d, want)
                caught = off > TOLERANCE
                print(
                    f"  {'':<10} {off:>20.3g}  control: {what}: {'caught' if caught else 'MISSED'}"
                )
                row["controls"][what] = off
                if not caught:
                    failed.append(f"{fam.name} control ({what})")
            # bf16, for the record (not a pass/fail bound here: check.py
            # bounds it on its own checkpoints): the runtime's bf16 against
            # transformers f32, next to transformers' own bf16.
            (d / "config.json").write_text(json.dumps(config))
            ours_bf16 = deviations(a.moe_run, d, want, "bf16")
            hf_bf16 = spread([hf_scores(model.to(torch.bfloat16), s) for s in SEQUENCES], want)
            print(
                f"  {'':<10} bf16 vs hf f32, max / mean: moe-run {ours_bf16[0]:.3f} / "
                f"{ours_bf16[1]:.3f}, transformers bf16 {hf_bf16[0]:.3f} / {hf_bf16[1]:.3f}"
            )
            row["bf16"] = {"moe_run": ours_bf16, "transformers": hf_bf16}
            rows.append(row)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    if failed:
        sys.exit(f"check_f32: failed: {', '.join(failed)}")
    print("check_f32: every family agrees with transformers in float32")


if __name__ == "__main__":
    main()
