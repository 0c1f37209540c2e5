"""The runtime's Mixtral against Hugging Face transformers on the same checkpoint.

A small, "sharp" MixtralForCausalLM is made with a fixed seed, its weights
rounded to bf16, and written in the layout of Mixtral's published checkpoints
(``config.json`` as transformers writes it, ``model.safetensors`` with the
per-expert ``block_sparse_moe.experts.J.{w1,w2,w3}`` tensors). transformers
loads that directory back (its own conversion to its fused expert tensors) and
scores a few token sequences by teacher forcing, in float32 (the reference)
and in bfloat16 (its own rounding error, the yardstick); ``moe-run
--reference --score`` scores the same sequences from the same directory.

The runtime computes in bf16, so it cannot equal float32: it must stay within
a bound derived from transformers' own bf16 deviation. Negative controls (the
same checkpoint with two experts' ``w1``/``w3`` swapped, or read with the
wrong rope theta) must break that bound, or the check is vacuous.

Usage: ``check.py --moe-run PATH [--keep DIR] [--json FILE]``. Exits 1 with
a message naming what failed.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import save_file
from transformers import MixtralConfig, MixtralForCausalLM

SEED = 23
# Token sequences: lengths from a short prompt to past a few rope periods
# of the fastest frequencies.
LENGTHS = (5, 12, 23, 40)
# The bound on |moe-run - transformers f32| over the scored tokens, for its
# max and its mean alike: BOUND_FACTOR times transformers' own bf16
# deviation (measured in the same run), and never below BOUND_FLOOR. A
# correct bf16 implementation lands near 1x (moe-run: 1.2x of the max, 0.8x
# of the mean); the subtlest real bug tried in transformers itself (no top-k
# renormalisation) lands at 7.6x and 5.7x, a wrong rope, GQA map or
# attention scale at 28x to 44x of the max.
BOUND_FACTOR = 2.0
BOUND_FLOOR = 0.02


@dataclass(frozen=True)
class Shape:
    """The model's shape, small enough to run in a second on a CPU."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    experts: int = 8
    top_k: int = 2
    ffn: int = 128
    vocab: int = 320
    # Small, so that rope turns far within 40 tokens.
    rope_theta: float = 1e4

    def config(self) -> MixtralConfig:
        """The transformers configuration (full attention, untied, silu)."""
        return MixtralConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.ffn,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            num_local_experts=self.experts,
            num_experts_per_tok=self.top_k,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            rms_norm_eps=1e-5,
            sliding_window=None,
            tie_word_embeddings=False,
            hidden_act="silu",
        )


def sharp_scale(shape: Shape, name: str) -> float | None:
    """The uniform scale of a parameter, as moe-runtime/src/model/init.rs has it.

    ``None`` is a norm weight (``1 + U(-0.2, 0.2)``). Large router, expert and
    LM-head scales make every detail of a layer move the scores. Names of
    transformers 5 (fused experts) and 4 (per-expert modules) are both known;
    any other parameter is an error, so that none keeps its default init.
    """
    h, f = shape.hidden, shape.ffn
    qd = shape.hidden  # heads * head_dim

    def unit(fan_in: int) -> float:
        return math.sqrt(3.0 / fan_in)

    table: list[tuple[str, float | None]] = [
        ("embed_tokens.weight", 1.0),
        ("norm.weight", None),
        ("q_proj.weight", 2.0 * unit(h)),
        ("k_proj.weight", 2.0 * unit(h)),
        ("v_proj.weight", unit(h)),
        ("o_proj.weight", unit(qd)),
        ("gate.weight", 4.0 * unit(h)),
        ("experts.gate_up_proj", 1.5 * unit(h)),
        ("w1.weight", 1.5 * unit(h)),
        ("w3.weight", 1.5 * unit(h)),
        ("experts.down_proj", 2.0 * unit(f)),
        ("w2.weight", 2.0 * unit(f)),
        ("lm_head.weight", 6.0 * unit(h)),
    ]
    for suffix, scale in table:
        if name.endswith(suffix):
            return scale
    raise SystemExit(f"check.py: no sharp scale for parameter {name} (a new transformers layout?)")


def sharp_model(shape: Shape) -> MixtralForCausalLM:
    """A float32 MixtralForCausalLM with sharp, bf16-representable weights."""
    torch.manual_seed(SEED)
    model = MixtralForCausalLM(shape.config())
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            u = torch.rand(p.shape, generator=gen, dtype=torch.float32) * 2.0 - 1.0
            scale = sharp_scale(shape, name)
            v = 1.0 + 0.2 * u if scale is None else scale * u
            p.copy_(v.to(torch.bfloat16).to(torch.float32))
    return model


def hub_tensors(model: MixtralForCausalLM, shape: Shape) -> dict[str, torch.Tensor]:
    """The model's weights in bf16 under the Hub's Mixtral names.

    transformers 5 holds a layer's experts fused: ``mlp.experts.gate_up_proj``
    ``[E, 2F, H]`` (rows ``:F`` are ``w1``, the gate; ``F:`` are ``w3``, the
    up projection), ``mlp.experts.down_proj`` ``[E, H, F]`` (``w2``) and the
    router as ``mlp.gate.weight``. Published checkpoints (and transformers 4)
    have ``block_sparse_moe.gate.weight`` and ``block_sparse_moe.experts.J.
    {w1,w2,w3}.weight``; transformers 4's names pass through unchanged.
    """
    f = shape.ffn
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        t = t.detach().to(torch.bfloat16)
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("mlp.experts.gate_up_proj") + "block_sparse_moe.experts"
            for j in range(shape.experts):
                out[f"{prefix}.{j}.w1.weight"] = t[j, :f].contiguous()
                out[f"{prefix}.{j}.w3.weight"] = t[j, f:].contiguous()
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name.removesuffix("mlp.experts.down_proj") + "block_sparse_moe.experts"
            for j in range(shape.experts):
                out[f"{prefix}.{j}.w2.weight"] = t[j].contiguous()
        elif name.endswith(".mlp.gate.weight"):
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t.contiguous()
        else:
            out[name] = t.contiguous()
    want = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(shape.layers):
        p = f"model.layers.{i}"
        want |= {f"{p}.self_attn.{x}_proj.weight" for x in "qkvo"}
        want |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"}
        want.add(f"{p}.block_sparse_moe.gate.weight")
        for j in range(shape.experts):
            want |= {f"{p}.block_sparse_moe.experts.{j}.{w}.weight" for w in ("w1", "w2", "w3")}
    if set(out) != want:
        raise SystemExit(
            "check.py: the state dict does not map onto the Hub's Mixtral names: "
            f"extra {sorted(set(out) - want)[:4]}, missing {sorted(want - set(out))[:4]}"
        )
    return out


def write_checkpoint(
    directory: Path, config: MixtralConfig, tensors: dict[str, torch.Tensor]
) -> None:
    """``config.json`` (transformers' own writer) and one ``model.safetensors``."""
    directory.mkdir(parents=True, exist_ok=True)
    config.architectures = ["MixtralForCausalLM"]
    config.dtype = torch.bfloat16  # written as "dtype": "bfloat16", like a bf16 model's save
    config.save_pretrained(directory)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def load(directory: Path, dtype: torch.dtype) -> MixtralForCausalLM:
    """The checkpoint as transformers loads it (eager attention), checked whole."""
    loaded: Any = MixtralForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation="eager", output_loading_info=True
    )
    model, info = loaded
    if not isinstance(model, MixtralForCausalLM):
        raise SystemExit(f"check.py: transformers loaded {directory} as {type(model).__name__}")
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"check.py: transformers loaded {directory} with {problems}")
    if model.training:
        raise SystemExit("check.py: from_pretrained left the model in training mode")
    return model


def same_weights(made: MixtralForCausalLM, loaded: MixtralForCausalLM) -> None:
    """The loaded model holds exactly the weights made.

    So the Hub names written mean to transformers' own conversion what they
    mean here (``w1`` the gate, ``w3`` the up projection).
    """
    a, b = made.state_dict(), loaded.state_dict()
    differ = [k for k in a if k not in b or not torch.equal(a[k], b[k])]
    if differ or set(a) != set(b):
        raise SystemExit(
            f"check.py: transformers read back other weights than written: {differ[:4]}"
        )


def sequences(vocab: int) -> list[list[int]]:
    """Seeded random token sequences of LENGTHS (ids from 1)."""
    gen = torch.Generator().manual_seed(SEED + 1)
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in LENGTHS]


def hf_scores(model: MixtralForCausalLM, seqs: list[list[int]]) -> list[list[float]]:
    """Teacher-forced natural-log probabilities of every token after the first."""
    out = []
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s])
            logits = model(input_ids=ids).logits[0].float()
            lp = torch.log_softmax(logits, dim=-1)
            out.append([float(lp[i - 1, s[i]]) for i in range(1, len(s))])
    return out


def moe_run_scores(moe_run: Path, directory: Path, seqs: list[list[int]]) -> list[list[float]]:
    """``moe-run --reference --score`` on the same sequences."""
    cmd = [str(moe_run), "--model", str(directory), "--reference", "--score"]
    for s in seqs:
        cmd += ["--prompt-ids", ",".join(map(str, s))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise SystemExit(f"check.py: {' '.join(cmd[:6])} ... exited {r.returncode}:\n{r.stderr}")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("scores:")]
    scores = [[float(x) for x in ln.split()[1:]] for ln in lines]
    if [len(x) for x in scores] != [len(s) - 1 for s in seqs]:
        raise SystemExit(
            f"check.py: moe-run printed {[len(x) for x in scores]} scores for "
            f"sequences of {[len(s) for s in seqs]} tokens:\n{r.stdout}"
        )
    return scores


@dataclass(frozen=True)
class Deviation:
    """Max and mean |a - b| over every scored token."""

    max: float
    mean: float


def deviation(a: list[list[float]], b: list[list[float]]) -> Deviation:
    """The deviation of scores ``a`` from ``b``."""
    d = [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return Deviation(max(d), sum(d) / len(d))


def controls(base: Path, shape: Shape, tensors: dict[str, torch.Tensor]) -> list[tuple[str, Path]]:
    """Broken variants of the checkpoint that the check must catch."""
    out = []
    swapped = dict(tensors)
    for j in (0, 1):
        p = f"model.layers.0.block_sparse_moe.experts.{j}"
        swapped[f"{p}.w1.weight"], swapped[f"{p}.w3.weight"] = (
            tensors[f"{p}.w3.weight"],
            tensors[f"{p}.w1.weight"],
        )
    d = base / "control-w1-w3"
    write_checkpoint(d, shape.config(), swapped)
    out.append(("control: w1/w3 swapped, experts 0,1 of layer 0", d))
    d = base / "control-rope"
    write_checkpoint(d, Shape(rope_theta=1e6).config(), tensors)
    out.append(("control: rope_theta 1e6 for 1e4", d))
    return out


@dataclass(frozen=True)
class Row:
    """One line of the report."""

    what: str
    dev: Deviation
    verdict: str


def within(d: Deviation, bound: Deviation) -> bool:
    """Both the max and the mean within the bound."""
    return d.max <= bound.max and d.mean <= bound.mean


def report(rows: list[Row], bound: Deviation, seqs: list[list[int]], shape: Shape) -> None:
    """The table: a header stating every setting, one row per set of scores."""
    scored = sum(len(s) - 1 for s in seqs)
    print(
        f"# moe-runtime mixtral vs transformers {transformers.__version__} "
        f"(torch {torch.__version__}): teacher-forced log-probabilities"
    )
    print(
        f"# model: h {shape.hidden}, {shape.layers} layers, {shape.heads}/{shape.kv_heads} heads, "
        f"{shape.experts} experts top-{shape.top_k}, ffn {shape.ffn}, vocab {shape.vocab}, "
        f"rope_theta {shape.rope_theta:g}, sharp weights in bf16, seed {SEED}"
    )
    print(
        f"# sequences: {len(seqs)} of {', '.join(map(str, LENGTHS))} tokens, {scored} scored; "
        "d = score - transformers float32 (eager attention)"
    )
    print(
        f"# bound: max and mean |d| each within {BOUND_FACTOR:g} x transformers bf16's "
        f"(at least {BOUND_FLOOR:g}): {bound.max:.5f} and {bound.mean:.5f}"
    )
    print("#")
    print(f"# {'scores':<48} {'max|d|':>9} {'mean|d|':>9}  verdict")
    for r in rows:
        print(f"  {r.what:<48} {r.dev.max:>9.5f} {r.dev.mean:>9.5f}  {r.verdict}")


def main() -> int:
    """Runs the check; 0 when moe-run agrees and every control is caught."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moe-run", type=Path, required=True, help="the moe-run binary")
    ap.add_argument("--keep", type=Path, help="write the checkpoints here (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = ap.parse_args()
    if not args.moe_run.is_file():
        raise SystemExit(f"check.py: {args.moe_run} is not a file")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    shape = Shape()
    with tempfile.TemporaryDirectory(prefix="moe-transformers.") as tmp:
        base = args.keep or Path(tmp)
        ckpt = base / "mixtral"
        model = sharp_model(shape)
        tensors = hub_tensors(model, shape)
        write_checkpoint(ckpt, shape.config(), tensors)
        seqs = sequences(shape.vocab)
        f32 = load(ckpt, torch.float32)
        same_weights(model, f32)
        hf32 = hf_scores(f32, seqs)
        own = deviation(hf_scores(load(ckpt, torch.bfloat16), seqs), hf32)
        ours = deviation(moe_run_scores(args.moe_run, ckpt, seqs), hf32)
        bound = Deviation(
            max(BOUND_FACTOR * own.max, BOUND_FLOOR), max(BOUND_FACTOR * own.mean, BOUND_FLOOR)
        )
        rows = [
            Row("moe-run --reference (bf16)", ours, "ok" if within(ours, bound) else "FAIL"),
            Row("transformers bf16", own, "-"),
        ]
        for what, d in controls(base, shape, tensors):
            dev = deviation(moe_run_scores(args.moe_run, d, seqs), hf32)
            rows.append(Row(what, dev, "MISSED" if within(dev, bound) else "caught"))

    report(rows, bound, seqs, shape)
    if args.json:
        figures = {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "scored_tokens": sum(len(s) - 1 for s in seqs),
            "bound": {"max": bound.max, "mean": bound.mean},
            "rows": [
                {"what": r.what, "max": r.dev.max, "mean": r.dev.mean, "verdict": r.verdict}
                for r in rows
            ],
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")

    ok = True
    if rows[0].verdict != "ok":
        print(
            f"check.py: moe-run deviates from transformers float32 by max {ours.max:.5f}, "
            f"mean {ours.mean:.5f}, past the bound ({bound.max:.5f}, {bound.mean:.5f})",
            file=sys.stderr,
        )
        ok = False
    for r in rows:
        if r.verdict == "MISSED":
            print(
                f"check.py: the check is vacuous: '{r.what}' stays within the bound",
                file=sys.stderr,
            )
            ok = False
    print("check-transformers: passed" if ok else "check-transformers: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
