"""Ranks run in their own processes by the tests (argv: scenario and its arguments)."""

from __future__ import annotations

import os
import signal
import sys

import transports

import m2n


def expert_dies(uid: str, rank: str, m: str, n: str, transport: str) -> int:
    """An expert that answers one round, then is killed (SIGKILL) before the second.

    `transport` is one of `transports.NAMES`."""
    cfg = {**transports.config(transport), "peer_timeout_ms": 10000}
    comm = m2n.Communicator(m2n.EXPERT, int(rank), (int(m), int(n)), uid, cfg)
    out = bytearray(64)
    comm.register(out)
    with comm.dispatch.recv(timeout=30) as rnd:
        out[:8] = rnd.bytes(0)[:8]
    comm.combine.wait_sent(comm.combine.send([out] * int(m), timeout=30), timeout=30)
    if int(rank) == int(n) - 1:
        os.kill(os.getpid(), signal.SIGKILL)
    # The other experts stay (without answering) until the attention ranks,
    # having failed on the lost expert, leave: they must not be the peer
    # that an attention rank reports.
    try:
        while True:
            with comm.dispatch.recv(timeout=30):
                pass
    except m2n.Error as e:
        print(f"expert {rank}: {type(e).__name__}", flush=True)
    return 0


def blocked_recv(uid: str) -> int:
    """An expert blocked in recv() without limit; the test sends SIGINT."""
    comm = m2n.Communicator(m2n.EXPERT, 0, (1, 1), uid, {"transport": "shm"})
    print("waiting", flush=True)
    try:
        comm.dispatch.recv()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        comm.close()
        return 0
    return 1


def quiet_attention(uid: str) -> int:
    """An attention rank that joins and waits until its expert leaves."""
    with m2n.Communicator(m2n.ATTENTION, 0, (1, 1), uid, {"transport": "shm"}) as comm:
        try:
            with comm.combine.recv(timeout=60):
                return 1
        except m2n.PeerLost:
            return 0


if __name__ == "__main__":
    scenario, *rest = sys.argv[1:]
    sys.exit(
        {
            "expert_dies": expert_dies,
            "blocked_recv": blocked_recv,
            "quiet_attention": quiet_attention,
        }[scenario](*rest)
    )
