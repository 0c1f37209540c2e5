"""A transformers MoE model with its experts over m2n, as users would run it.

Under torchrun (argv: "torchrun", model dir, out dir, M): attention ranks
load the model, `m2n.hf.disaggregate` it, generate greedily from
`prompts.pt[rank]` and save the sequences and logits to `attn{rank}.pt`;
expert ranks `m2n.hf.serve_experts`.

Under a plain launcher (argv: "env", model dir, out dir, M; RANK, WORLD_SIZE,
M2N_UNIQUE_ID set): the same group via m2n.init_from_env, but the attention
rank generates until an error, which it prints (the kill test).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import m2n
import m2n.hf

NEW_TOKENS = 6


def main(how: str, model_dir: str, out_dir: str, m: int) -> int:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model = None
    if rank < m:  # load before joining: a rank busy for longer than the peer timeout is lost
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if how == "torchrun":
        comm = m2n.init_from_torch(attention=m, config={"transport": "shm"})
    else:  # the kill test: a short peer timeout
        comm = m2n.init_from_env(attention=m, config={"transport": "shm", "peer_timeout_ms": 2000})
    with comm:
        if model is None:
            stats = m2n.hf.serve_experts(model_dir, comm)
            print(f"expert {comm.rank}: {stats.rounds} rounds, layers {stats.layers}", flush=True)
            return 0
        prompts = torch.load(Path(out_dir) / "prompts.pt")[comm.rank]
        with m2n.hf.disaggregate(model, comm) as link:
            if how == "torchrun":
                out = model.generate(
                    prompts,
                    attention_mask=torch.ones_like(prompts),
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    output_logits=True,
                    return_dict_in_generate=True,
                )
                torch.save(
                    {"sequences": out.sequences, "logits": torch.stack(out.logits)},
                    Path(out_dir) / f"attn{comm.rank}.pt",
                )
                print(f"attention {comm.rank}: {link.timing.rounds} rounds", flush=True)
            else:
                print("generating", flush=True)
                try:
                    while True:
                        model.generate(
                            prompts,
                            attention_mask=torch.ones_like(prompts),
                            max_new_tokens=NEW_TOKENS,
                            min_new_tokens=NEW_TOKENS,
                            do_sample=False,
                        )
                except m2n.PeerLost as e:
                    print(f"generate raised PeerLost: {e}", flush=True)
                    raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
