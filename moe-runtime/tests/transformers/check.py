"""The runtime's families against Hugging Face transformers on the same checkpoints.

For Mixtral, Qwen3-MoE and OLMoE (not yet Qwen2-MoE), a small, "sharp" model
of transformers' own class is made with a fixed seed, its weights
rounded to bf16, and saved by transformers' ``save_pretrained`` in bf16.
transformers 5 holds a layer's experts fused (``mlp.experts.gate_up_proj``,
``mlp.experts.down_proj``) and writes them back in the published per-expert
layout (Mixtral's ``block_sparse_moe.experts.J.{w1,w2,w3}``, Qwen3-MoE's and
OLMoE's ``mlp.experts.J.{gate,up,down}_proj``); the check compares the file
written with that layout, derived here from the fused tensors, name by name
and bit for bit. transformers loads the directory back (no missing or
unexpected keys, the same weights) and scores a few token sequences by
teacher forcing, in float32 (the reference) and in bfloat16 (its own rounding
error, the yardstick); ``moe-run --reference --score`` scores the same
sequences from the same directory.

The runtime computes in bf16, so it cannot equal float32: it must stay within
a bound derived from transformers' own bf16 deviation on the same family.
Negative controls per family (a checkpoint with two experts' gate and up
projections swapped, the queries' and keys' norms swapped, or a config read
with the wrong rope theta or the other ``norm_topk_prob``) must break that
bound, or the check is vacuous.

Each family's table prints as it is done (about 4 s each on 2 cores).
Usage: ``check.py --moe-run PATH [--family NAME]... [--keep DIR] [--json
FILE]``. Exits 1 with a message naming what failed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

SEED = 23
# Token sequences: lengths from a short prompt to past a few rope periods
# of the fastest frequencies.
LENGTHS = (5, 12, 23, 40)
# The bound on |moe-run - transformers f32| over the scored tokens, for its
# max and its mean alike: BOUND_FACTOR times transformers' own bf16
# deviation (measured in the same run, on the same family), and never below
# BOUND_FLOOR. A correct bf16 implementation lands near 1x (Mixtral: 1.2x of
# the max, 0.8x of the mean); the subtlest real bug tried in transformers
# itself (no top-k renormalisation) lands at 7.6x and 5.7x, a wrong rope,
# GQA map or attention scale at 28x to 44x of the max.
BOUND_FACTOR = 2.0
BOUND_FLOOR = 0.02


@dataclass(frozen=True)
class Shape:
    """A model's shape, small enough to run in a second on a CPU."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    # Width of a head: hidden / heads unless the family has its own.
    head_dim: int = 16
    experts: int = 8
    top_k: int = 2
    # The experts' intermediate size.
    ffn: int = 128
    vocab: int = 320
    # Small, so that rope turns far within 40 tokens.
    rope_theta: float = 1e4
    # Top-k routing weights renormalised to sum to 1 (Mixtral always).
    norm_topk: bool = True
    # The router's scale, in units of sqrt(3 / h).
    router: float = 4.0

    def rope(self) -> dict[str, Any]:
        """The ``rope_parameters`` of transformers 5 for plain rope."""
        return {"rope_type": "default", "rope_theta": self.rope_theta}

    def describe(self) -> str:
        """One line for the report's header."""
        return (
            f"h {self.hidden}, {self.layers} layers, {self.heads}/{self.kv_heads} heads of "
            f"{self.head_dim}, {self.experts} experts top-{self.top_k}"
            f"{'' if self.norm_topk else ' not renormalised'}, expert ffn {self.ffn}, "
            f"router scale {self.router:g}, vocab {self.vocab}, rope_theta {self.rope_theta:g}"
        )


def mixtral_config(s: Shape) -> PreTrainedConfig:
    """Mixtral: full attention, untied, silu; top-k always renormalised."""
    return MixtralConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.ffn,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        num_local_experts=s.experts,
        num_experts_per_tok=s.top_k,
        rope_parameters=s.rope(),
        rms_norm_eps=1e-5,
        sliding_window=None,
        tie_word_embeddings=False,
        hidden_act="silu",
    )


def qwen3_moe_config(s: Shape) -> PreTrainedConfig:
    """Qwen3-MoE as the runtime runs it: every layer sparse, no window, no bias.

    ``intermediate_size`` (the dense MLP's, used by no layer here) differs
    from ``moe_intermediate_size`` so that reading the wrong one shows.
    ``head_dim`` is no declared field of transformers 5.24's config class
    (its attention reads it with ``getattr``, as published configs set it),
    so it goes in as an extra keyword, written to config.json.
    """
    extra: dict[str, Any] = {"head_dim": s.head_dim}
    return Qwen3MoeConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=3 * s.ffn,
        moe_intermediate_size=s.ffn,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        num_experts=s.experts,
        num_experts_per_tok=s.top_k,
        norm_topk_prob=s.norm_topk,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        use_sliding_window=False,
        attention_bias=False,
        rope_parameters=s.rope(),
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        hidden_act="silu",
        **extra,
    )


def olmoe_config(s: Shape) -> PreTrainedConfig:
    """OLMoE: no clipping, no bias; its norms assume head_dim = hidden / heads."""
    if s.head_dim * s.heads != s.hidden:
        raise SystemExit(
            "check.py: OlmoeAttention's q_norm is hidden_size wide: head_dim must be h/heads"
        )
    return OlmoeConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.ffn,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        num_experts=s.experts,
        num_experts_per_tok=s.top_k,
        norm_topk_prob=s.norm_topk,
        clip_qkv=None,
        attention_bias=False,
        rope_parameters=s.rope(),
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        hidden_act="silu",
    )


@dataclass(frozen=True)
class ExpertNames:
    """A family's published names for a layer's router and experts.

    The router is ``{block}.gate.weight``; expert J's projections are
    ``{block}.experts.J.{gate,up,down}.weight``, ``gate`` the one under silu.
    """

    block: str
    gate: str
    up: str
    down: str


MIXTRAL_NAMES = ExpertNames("block_sparse_moe", "w1", "w3", "w2")
QWEN_NAMES = ExpertNames("mlp", "gate_proj", "up_proj", "down_proj")

# A checkpoint as written: config.json's fields and the tensors by name.
Config = dict[str, Any]
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Control:
    """A broken variant of a family's checkpoint that the check must catch."""

    what: str
    # Edits copies of config.json and of the tensors in place.
    edit: Callable[[Config, Tensors], None]


@dataclass(frozen=True)
class Family:
    """One family as checked: transformers' class, its shape, its controls."""

    key: str  # the table's and --family's name, also the checkpoint's folder
    model_type: str
    model_class: type[PreTrainedModel]
    config: Callable[[Shape], PreTrainedConfig]
    shape: Shape
    names: ExpertNames
    qk_norm: bool  # self_attn.{q,k}_norm.weight present
    controls: tuple[Control, ...]


def swap_gate_up(names: ExpertNames, experts: tuple[int, ...]) -> Control:
    """Layer 0's gate and up projections swapped for a few experts."""

    def edit(_: Config, t: Tensors) -> None:
        for j in experts:
            p = f"model.layers.0.{names.block}.experts.{j}"
            g, u = f"{p}.{names.gate}.weight", f"{p}.{names.up}.weight"
            t[g], t[u] = t[u], t[g]

    cols = ",".join(map(str, experts))
    return Control(f"{names.gate}/{names.up} swapped, experts {cols} of layer 0", edit)


def rope_theta(theta: float) -> Control:
    """config.json read with another rope theta."""

    def edit(c: Config, _: Tensors) -> None:
        c["rope_parameters"]["rope_theta"] = theta

    shown = f"{theta:.0e}".replace("e+0", "e")
    return Control(f"rope_theta {shown} in config.json", edit)


def flip_norm_topk(was: bool) -> Control:
    """config.json read with the other ``norm_topk_prob``."""

    def edit(c: Config, _: Tensors) -> None:
        if c["norm_topk_prob"] is not was:
            raise SystemExit(f"check.py: config.json has norm_topk_prob {c['norm_topk_prob']}")
        c["norm_topk_prob"] = not was

    return Control(f"norm_topk_prob {str(not was).lower()} in config.json", edit)


def swap_qk_norm(_: Config, t: Tensors) -> None:
    """Every layer's query and key norm weights exchanged (same shape per head)."""
    for name in [n for n in t if n.endswith(".self_attn.q_norm.weight")]:
        k = name.replace(".q_norm.", ".k_norm.")
        t[name], t[k] = t[k], t[name]


def unit_qk_norm(_: Config, t: Tensors) -> None:
    """Every layer's query and key norm weights set to 1 (as if ignored)."""
    for name in [
        n for n in t if n.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight"))
    ]:
        t[name] = torch.ones_like(t[name])


# Fine-grained experts with a flatter router than Mixtral's (2 units for 4):
# the top-4 weights sum to 0.82 on average (0.96 at 4 units), so whether
# they are renormalised moves the scores well past the bound.
QWEN3 = Shape(head_dim=32, experts=16, top_k=4, ffn=64, router=2.0)
FAMILIES = (
    Family(
        key="mixtral",
        model_type="mixtral",
        model_class=MixtralForCausalLM,
        config=mixtral_config,
        shape=Shape(),
        names=MIXTRAL_NAMES,
        qk_norm=False,
        controls=(swap_gate_up(MIXTRAL_NAMES, (0, 1)), rope_theta(1e6)),
    ),
    # Qwen3-30B-A3B renormalises its top-k; the config's default does not.
    # head_dim 32 with h 64 and 4 heads: the queries are 2h wide.
    Family(
        key="qwen3_moe",
        model_type="qwen3_moe",
        model_class=Qwen3MoeForCausalLM,
        config=qwen3_moe_config,
        shape=QWEN3,
        names=QWEN_NAMES,
        qk_norm=True,
        controls=(
            Control("q_norm/k_norm swapped, every layer", swap_qk_norm),
            flip_norm_topk(True),
        ),
    ),
    Family(
        key="qwen3_moe-no-renorm",
        model_type="qwen3_moe",
        model_class=Qwen3MoeForCausalLM,
        config=qwen3_moe_config,
        shape=replace(QWEN3, norm_topk=False),
        names=QWEN_NAMES,
        qk_norm=True,
        controls=(flip_norm_topk(False),),
    ),
    # OLMoE-1B-7B does not renormalise (transformers' default). GQA, so the
    # key norm (kv_heads * head_dim) is narrower than the query norm (h).
    Family(
        key="olmoe",
        model_type="olmoe",
        model_class=OlmoeForCausalLM,
        config=olmoe_config,
        shape=Shape(experts=16, top_k=4, ffn=64, router=2.0, norm_topk=False),
        names=QWEN_NAMES,
        qk_norm=True,
        controls=(
            flip_norm_topk(False),
            Control("q_norm/k_norm weights all 1, every layer", unit_qk_norm),
        ),
    ),
)


@dataclass(frozen=True)
class Init:
    """A parameter's values: ``center + spread * U(-1, 1)``."""

    center: float
    spread: float


def sharp_init(s: Shape, name: str) -> Init:
    """A parameter's values, after moe-runtime/src/model/init.rs.

    Norm weights are ``1 + U(-0.2, 0.2)``, but the query and key norms ``1 +
    U(-0.5, 0.5)`` so that a missing or misplaced one shows. Large router,
    expert and LM-head scales make every detail of a layer move the scores;
    the router's is the shape's (init.rs: 4).
    Names of transformers 5 (fused experts) and 4 (per-expert modules) are
    both known; any other parameter is an error, so that none keeps its
    default init.
    """
    h, f = s.hidden, s.ffn
    qd = s.heads * s.head_dim

    def unit(fan_in: int) -> Init:
        return Init(0.0, math.sqrt(3.0 / fan_in))

    def times(k: float, i: Init) -> Init:
        return Init(0.0, k * i.spread)

    # First match wins: the q/k norms before the other norms.
    table: list[tuple[str, Init]] = [
        ("embed_tokens.weight", Init(0.0, 1.0)),
        ("q_norm.weight", Init(1.0, 0.5)),
        ("k_norm.weight", Init(1.0, 0.5)),
        ("norm.weight", Init(1.0, 0.2)),
        ("q_proj.weight", times(2.0, unit(h))),
        ("k_proj.weight", times(2.0, unit(h))),
        ("v_proj.weight", unit(h)),
        ("o_proj.weight", unit(qd)),
        ("gate.weight", times(s.router, unit(h))),
        ("experts.gate_up_proj", times(1.5, unit(h))),
        ("w1.weight", times(1.5, unit(h))),
        ("w3.weight", times(1.5, unit(h))),
        ("gate_proj.weight", times(1.5, unit(h))),
        ("up_proj.weight", times(1.5, unit(h))),
        ("experts.down_proj", times(2.0, unit(f))),
        ("w2.weight", times(2.0, unit(f))),
        ("down_proj.weight", times(2.0, unit(f))),
        ("lm_head.weight", times(6.0, unit(h))),
    ]
    for suffix, init in table:
        if name.endswith(suffix):
            return init
    raise SystemExit(f"check.py: no sharp scale for parameter {name} (a new transformers layout?)")


def sharp_model(fam: Family) -> PreTrainedModel:
    """A float32 model of the family with sharp, bf16-representable weights."""
    torch.manual_seed(SEED)
    model = fam.model_class(fam.config(fam.shape))
    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            u = torch.rand(p.shape, generator=gen, dtype=torch.float32) * 2.0 - 1.0
            init = sharp_init(fam.shape, name)
            v = init.center + init.spread * u
            p.copy_(v.to(torch.bfloat16).to(torch.float32))
    return model


def hub_tensors(model: PreTrainedModel, fam: Family) -> Tensors:
    """The model's weights in bf16 under the family's published names.

    transformers 5 holds a layer's experts fused: ``mlp.experts.gate_up_proj``
    ``[E, 2F, H]`` (rows ``:F`` are the gate, under silu; ``F:`` the up
    projection: ``gate, up = linear(x, gate_up_proj[j]).chunk(2)``),
    ``mlp.experts.down_proj`` ``[E, H, F]`` and the router as
    ``mlp.gate.weight``. Published checkpoints (and transformers 4) have one
    tensor per expert and projection; transformers 4's names pass through.
    """
    s, n = fam.shape, fam.names
    out: Tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach().to(torch.bfloat16)
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("mlp.experts.gate_up_proj") + f"{n.block}.experts"
            for j in range(s.experts):
                out[f"{prefix}.{j}.{n.gate}.weight"] = t[j, : s.ffn].contiguous()
                out[f"{prefix}.{j}.{n.up}.weight"] = t[j, s.ffn :].contiguous()
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name.removesuffix("mlp.experts.down_proj") + f"{n.block}.experts"
            for j in range(s.experts):
                out[f"{prefix}.{j}.{n.down}.weight"] = t[j].contiguous()
        elif name.endswith(".mlp.gate.weight"):
            out[name.replace(".mlp.gate.", f".{n.block}.gate.")] = t.contiguous()
        else:
            out[name] = t.contiguous()
    want = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(s.layers):
        p = f"model.layers.{i}"
        want |= {f"{p}.self_attn.{x}_proj.weight" for x in "qkvo"}
        if fam.qk_norm:
            want |= {f"{p}.self_attn.q_norm.weight", f"{p}.self_attn.k_norm.weight"}
        want |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"}
        want.add(f"{p}.{n.block}.gate.weight")
        for j in range(s.experts):
            want |= {f"{p}.{n.block}.experts.{j}.{w}.weight" for w in (n.gate, n.up, n.down)}
    if set(out) != want:
        raise SystemExit(
            f"check.py: the {fam.key} state dict does not map onto the published names: "
            f"extra {sorted(set(out) - want)[:4]}, missing {sorted(want - set(out))[:4]}"
        )
    return out


def save_checkpoint(directory: Path, model: PreTrainedModel, fam: Family) -> tuple[Config, Tensors]:
    """The checkpoint as transformers' own bf16 save writes it, checked against the layout.

    Returns config.json and the tensors as written, for the controls.
    """
    bf16 = copy.deepcopy(model).bfloat16()
    bf16.save_pretrained(directory, save_original_format=True)
    config: Config = json.loads((directory / "config.json").read_text())
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    if files != ["model.safetensors"]:
        raise SystemExit(f"check.py: save_pretrained wrote {files}, not one model.safetensors")
    written = load_file(str(directory / "model.safetensors"))
    want = hub_tensors(model, fam)
    if set(written) != set(want):
        raise SystemExit(
            f"check.py: save_pretrained's {fam.key} names are not the published layout: "
            f"extra {sorted(set(written) - set(want))[:4]}, "
            f"missing {sorted(set(want) - set(written))[:4]}"
        )
    differ = [
        k
        for k in want
        if written[k].dtype != torch.bfloat16 or not torch.equal(written[k], want[k])
    ]
    if differ:
        raise SystemExit(f"check.py: save_pretrained wrote other values under {differ[:4]}")
    if config.get("model_type") != fam.model_type or config.get("architectures") != [
        fam.model_class.__name__
    ]:
        raise SystemExit(f"check.py: {directory}/config.json names {config.get('model_type')}")
    return config, written


def write_control(directory: Path, config: Config, tensors: Tensors, control: Control) -> None:
    """A copy of the checkpoint with the control's edit."""
    c, t = copy.deepcopy(config), dict(tensors)
    control.edit(c, t)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    save_file(t, str(directory / "model.safetensors"), metadata={"format": "pt"})


def load(directory: Path, fam: Family, dtype: torch.dtype) -> PreTrainedModel:
    """The checkpoint as transformers loads it (eager attention), checked whole."""
    loaded: Any = fam.model_class.from_pretrained(
        directory, dtype=dtype, attn_implementation="eager", output_loading_info=True
    )
    model, info = loaded
    if not isinstance(model, fam.model_class):
        raise SystemExit(f"check.py: transformers loaded {directory} as {type(model).__name__}")
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise SystemExit(f"check.py: transformers loaded {directory} with {problems}")
    if model.training:
        raise SystemExit("check.py: from_pretrained left the model in training mode")
    return model


def same_weights(made: PreTrainedModel, loaded: PreTrainedModel) -> None:
    """The loaded model holds exactly the weights made.

    So the published names mean to transformers' own conversion what they
    mean here (the gate under silu, the up projection beside it).
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


def hf_scores(model: PreTrainedModel, seqs: list[list[int]]) -> list[list[float]]:
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


def within(d: Deviation, bound: Deviation) -> bool:
    """Both the max and the mean within the bound."""
    return d.max <= bound.max and d.mean <= bound.mean


@dataclass(frozen=True)
class Row:
    """One line of a family's table."""

    what: str
    dev: Deviation
    verdict: str


@dataclass(frozen=True)
class Outcome:
    """A family's figures: the bound and every row, moe-run's first."""

    fam: Family
    seqs: list[list[int]]
    bound: Deviation
    rows: list[Row]


def check_family(fam: Family, base: Path, moe_run: Path) -> Outcome:
    """Writes the family's checkpoint and controls under ``base`` and scores them all."""
    seqs = sequences(fam.shape.vocab)
    ckpt = base / fam.key
    model = sharp_model(fam)
    config, tensors = save_checkpoint(ckpt, model, fam)
    f32 = load(ckpt, fam, torch.float32)
    same_weights(model, f32)
    hf32 = hf_scores(f32, seqs)
    own = deviation(hf_scores(load(ckpt, fam, torch.bfloat16), seqs), hf32)
    ours = deviation(moe_run_scores(moe_run, ckpt, seqs), hf32)
    bound = Deviation(
        max(BOUND_FACTOR * own.max, BOUND_FLOOR), max(BOUND_FACTOR * own.mean, BOUND_FLOOR)
    )
    rows = [
        Row("moe-run --reference (bf16)", ours, "ok" if within(ours, bound) else "FAIL"),
        Row("transformers bf16", own, "-"),
    ]
    for i, control in enumerate(fam.controls):
        d = base / f"{fam.key}-control-{i}"
        write_control(d, config, tensors, control)
        dev = deviation(moe_run_scores(moe_run, d, seqs), hf32)
        rows.append(
            Row(f"control: {control.what}", dev, "MISSED" if within(dev, bound) else "caught")
        )
    return Outcome(fam, seqs, bound, rows)


def report(out: Outcome) -> None:
    """A family's table: a header stating every setting, one row per set of scores."""
    fam, seqs, bound = out.fam, out.seqs, out.bound
    scored = sum(len(s) - 1 for s in seqs)
    print(
        f"# moe-runtime {fam.key} vs transformers {transformers.__version__} "
        f"{fam.model_class.__name__} (torch {torch.__version__}): teacher-forced log-probabilities"
    )
    print(f"# model: {fam.shape.describe()}, sharp weights in bf16, seed {SEED}")
    print(
        f"# sequences: {len(seqs)} of {', '.join(map(str, LENGTHS))} tokens, {scored} scored; "
        "d = score - transformers float32 (eager attention)"
    )
    print(
        f"# bound: max and mean |d| each within {BOUND_FACTOR:g} x transformers bf16's "
        f"(at least {BOUND_FLOOR:g}): {bound.max:.5f} and {bound.mean:.5f}"
    )
    print("#")
    print(f"# {'scores':<56} {'max|d|':>9} {'mean|d|':>9}  verdict")
    for r in out.rows:
        print(f"  {r.what:<56} {r.dev.max:>9.5f} {r.dev.mean:>9.5f}  {r.verdict}")
    print()


def figures(outcomes: list[Outcome]) -> dict[str, Any]:
    """The figures as JSON: per family, its bound and rows."""
    return {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "families": [
            {
                "family": o.fam.key,
                "model_type": o.fam.model_type,
                "class": o.fam.model_class.__name__,
                "shape": o.fam.shape.describe(),
                "scored_tokens": sum(len(s) - 1 for s in o.seqs),
                "bound": {"max": o.bound.max, "mean": o.bound.mean},
                "rows": [
                    {"what": r.what, "max": r.dev.max, "mean": r.dev.mean, "verdict": r.verdict}
                    for r in o.rows
                ],
            }
            for o in outcomes
        ],
    }


def failures(out: Outcome) -> list[str]:
    """What failed in a family: moe-run past the bound, or a control within it."""
    msgs = []
    ours, b = out.rows[0].dev, out.bound
    if out.rows[0].verdict != "ok":
        msgs.append(
            f"check.py: {out.fam.key}: moe-run deviates from transformers float32 by max "
            f"{ours.max:.5f}, mean {ours.mean:.5f}, past the bound ({b.max:.5f}, {b.mean:.5f})"
        )
    for r in out.rows:
        if r.verdict == "MISSED":
            msgs.append(f"check.py: {out.fam.key}: vacuous: '{r.what}' stays within the bound")
    return msgs


def main() -> int:
    """Runs the check; 0 when moe-run agrees and every control is caught."""
    keys = [f.key for f in FAMILIES]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--moe-run", type=Path, required=True, help="the moe-run binary")
    ap.add_argument(
        "--family", action="append", choices=keys, help="check only these (default: all)"
    )
    ap.add_argument("--keep", type=Path, help="write the checkpoints here (default: a temp dir)")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = ap.parse_args()
    if not args.moe_run.is_file():
        raise SystemExit(f"check.py: {args.moe_run} is not a file")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    chosen = [f for f in FAMILIES if args.family is None or f.key in args.family]
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="moe-transformers.") as tmp:
        base = args.keep or Path(tmp)
        for fam in chosen:
            out = check_family(fam, base, args.moe_run)
            report(out)
            outcomes.append(out)
    if args.json:
        args.json.write_text(json.dumps(figures(outcomes), indent=2) + "\n")

    msgs = [m for o in outcomes for m in failures(o)]
    for m in msgs:
        print(m, file=sys.stderr)
    print("check-transformers: FAILED" if msgs else "check-transformers: passed")
    return 1 if msgs else 0


if __name__ == "__main__":
    sys.exit(main())
