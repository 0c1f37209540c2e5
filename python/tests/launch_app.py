"""A whole M x N group started by a launcher (torchrun or mpiexec); every value checked.

argv[1]: "torchrun" (m2n.init_from_torch), "torch-dist" (torch.distributed
initialised with gloo first) or "env" (m2n.init_from_env, under mpiexec).
"""

from __future__ import annotations

import sys

import torch

import m2n

ROUNDS = 8


def main(how: str) -> int:
    if how == "torchrun":
        comm = m2n.init_from_torch(config={"transport": "shm"})
    elif how == "torch-dist":
        import torch.distributed as dist

        dist.init_process_group("gloo")
        comm = m2n.init_from_torch(config={"transport": "tcp"})
    else:
        comm = m2n.init_from_env(config={"transport": "shm"})
    with comm:
        m, n = comm.shape
        if comm.role == m2n.ATTENTION:
            x = torch.empty(n, 16, dtype=torch.float64)
            comm.register(x)
            for k in range(ROUNDS):
                for e in range(n):
                    x[e] = torch.full((16,), float(k * 100 + comm.rank * 10 + e))
                comm.dispatch.send(list(x), timeout=60)
                with comm.combine.recv(timeout=60) as rnd:
                    for e in range(n):
                        want = float(k * 100 + comm.rank * 10 + e) + 0.5
                        assert torch.all(rnd.tensor(e, torch.float64) == want), (k, e)
        else:
            y = torch.empty(m, 16, dtype=torch.float64)
            comm.register(y)
            for _ in range(ROUNDS):
                with comm.dispatch.recv(timeout=60) as rnd:
                    for a in range(m):
                        y[a] = rnd.tensor(a, torch.float64) + 0.5
                comm.combine.wait_sent(comm.combine.send(list(y), timeout=60), timeout=60)
        print(f"{how}: {comm.role} {comm.rank} of {m}x{n}: {ROUNDS} rounds checked", flush=True)
    if how == "torch-dist":
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
