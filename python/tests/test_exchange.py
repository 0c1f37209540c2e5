"""Rounds of tensors and arrays through whole groups, every value checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_group

import m2n

ROUNDS = 12
ROWS, HIDDEN = 3, 40


def tokens(round_no: int, attention: int, expert: int) -> torch.Tensor:
    """What attention rank `attention` sends expert `expert` in round `round_no`."""
    base = round_no * 1000 + attention * 100 + expert * 10
    return torch.arange(ROWS * HIDDEN, dtype=torch.float32).reshape(ROWS, HIDDEN) + base


def exchange(comm: m2n.Communicator) -> int:
    m, n = comm.shape
    if comm.role == m2n.ATTENTION:
        # One registered tensor; each expert's message is a slice of it.
        x = torch.empty(n, ROWS, HIDDEN, dtype=torch.float32)
        comm.register(x)
        for k in range(ROUNDS):
            for e in range(n):
                x[e] = tokens(k, comm.rank, e)
            sent = comm.dispatch.send([x[e] for e in range(n)], timeout=30)
            assert sent == k
            with comm.combine.recv(timeout=30) as rnd:
                assert rnd.number == k and len(rnd) == n
                for e in range(n):
                    y = rnd.tensor(e, torch.float32, (ROWS, HIDDEN))
                    assert torch.equal(y, tokens(k, comm.rank, e) * 2 + e), f"round {k} expert {e}"
                    del y
            # The send of round k is complete once its answer is back.
            assert comm.dispatch.is_sent(k)
        return ROUNDS
    # Experts: numpy views in, answers from a registered numpy array.
    out = np.empty((m, ROWS, HIDDEN), dtype=np.float32)
    comm.register(out)
    for k in range(ROUNDS):
        with comm.dispatch.recv(timeout=30) as rnd:
            for a in range(m):
                got = rnd.numpy(a, np.float32, (ROWS, -1))
                want = tokens(k, a, comm.rank).numpy()
                assert np.array_equal(got, want), f"round {k} from attention {a}"
                out[a] = got * 2 + comm.rank
                del got
        r = comm.combine.send([out[a] for a in range(m)], timeout=30)
        comm.combine.wait_sent(r, timeout=30)
    return ROUNDS


@pytest.mark.parametrize("shape", [(2, 2), (3, 2)], ids=["2x2", "3x2"])
def test_rounds_every_value_checked(transport: str, shape: tuple[int, int]) -> None:
    results = run_group(shape, exchange, transport)
    assert set(results.values()) == {ROUNDS}


def test_bf16_tensors_and_tuples_and_empty_messages() -> None:
    """bfloat16 through (Memory, offset, nbytes) messages, and empty ones (None)."""

    def body(comm: m2n.Communicator) -> None:
        if comm.role == m2n.ATTENTION:
            x = torch.linspace(-3, 3, 64, dtype=torch.bfloat16)
            mem = comm.register(x)
            assert mem.nbytes == 128 and not mem.device
            comm.dispatch.send([(mem, 32, 64), None], timeout=30)
            with comm.combine.recv(timeout=30) as rnd:
                assert rnd.lens == [0, 6]
                assert rnd.tensor(0).numel() == 0
                assert rnd.bytes(1) == b"thanks"
        else:
            with comm.dispatch.recv(timeout=30) as rnd:
                if comm.rank == 0:
                    got = rnd.tensor(0, torch.bfloat16, (2, 16))
                    want = torch.linspace(-3, 3, 64, dtype=torch.bfloat16)[16:48].reshape(2, 16)
                    assert torch.equal(got, want)
                    # Zero-copy: the tensor and the array are the ring's bytes.
                    arr = rnd.numpy(0, np.uint16)
                    assert got.data_ptr() == arr.__array_interface__["data"][0] == rnd._addrs[0]
                    del got, arr
                else:
                    assert rnd.nbytes(0) == 0 and bytes(rnd.memoryview(0)) == b""
            msg = bytearray(b"thanks")
            comm.register(msg)
            r = comm.combine.send([msg if comm.rank == 1 else None], timeout=30)
            comm.combine.wait_sent(r, timeout=30)

    run_group((1, 2), body)


def test_alloc_memory_is_a_source() -> None:
    def body(comm: m2n.Communicator) -> None:
        if comm.role == m2n.ATTENTION:
            mem, view = comm.alloc(4096)
            view[:5] = b"hello"
            comm.dispatch.wait_sent(comm.dispatch.send([(mem, 0, 5)], timeout=30), timeout=30)
            with comm.combine.recv(timeout=30) as rnd:
                assert rnd.bytes(0) == b"HELLO"
        else:
            with comm.dispatch.recv(timeout=30) as rnd:
                answer = bytearray(rnd.bytes(0).upper())
            comm.register(answer)
            comm.combine.wait_sent(comm.combine.send([answer], timeout=30), timeout=30)

    run_group((1, 1), body, "tcp")


def test_nonblocking_event_loop(transport: str) -> None:
    """try_send / try_recv / progress only: no blocking call."""
    rounds = 30

    def body(comm: m2n.Communicator) -> int:
        buf = np.zeros(16, dtype=np.int64)
        comm.register(buf)
        seen = 0
        posted = 0
        if comm.role == m2n.ATTENTION:
            assert comm.combine.try_recv() is None  # nothing can be in yet
            while seen < rounds:
                if posted < rounds and (posted == 0 or comm.dispatch.is_sent(posted - 1)):
                    buf[:] = posted
                    if comm.dispatch.try_send([buf]) is not None:
                        posted += 1
                rnd = comm.combine.try_recv()
                if rnd is None:
                    comm.progress()
                    continue
                assert rnd.number == seen
                assert (rnd.numpy(0, np.int64) == seen + 1).all()
                rnd.release()
                seen += 1
            return seen
        while seen < rounds:
            rnd = comm.dispatch.try_recv()
            if rnd is None:
                comm.progress()
                continue
            value = int(rnd.numpy(0, np.int64)[0])
            rnd.release()
            assert value == seen
            buf[:] = value + 1
            while comm.combine.try_send([buf]) is None:
                comm.progress()
            while not comm.combine.is_sent(seen):
                comm.progress()
            seen += 1
        return seen

    results = run_group((1, 1), body, transport)
    assert set(results.values()) == {rounds}
