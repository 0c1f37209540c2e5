"""Misuse and failures raise the right exception, never crash or read reused memory."""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
import transports
from conftest import rank_process, run_group

import m2n


def test_exception_hierarchy() -> None:
    for name in (
        "PeerLost",
        "Timeout",
        "Aborted",
        "ConfigError",
        "InvalidArgument",
        "UsageError",
        "ProtocolError",
        "TransportError",
        "StreamError",
        "BootstrapError",
    ):
        assert issubclass(getattr(m2n, name), m2n.Error), name
    assert issubclass(m2n.Error, Exception)


def test_released_round_and_its_views() -> None:
    def body(comm: m2n.Communicator) -> None:
        if comm.role == m2n.ATTENTION:
            x = torch.arange(8, dtype=torch.int32)
            comm.register(x)
            comm.dispatch.wait_sent(comm.dispatch.send([x], timeout=30), timeout=30)
            comm.dispatch.wait_sent(comm.dispatch.send([x[:2]], timeout=30), timeout=30)
            return
        rnd = comm.dispatch.recv(timeout=30)
        t = rnd.tensor(0, torch.int32)
        a = rnd.numpy(0, np.int32)[2:]  # a view of a view
        with pytest.raises(m2n.UsageError, match="still alive"):
            rnd.release()
        del t
        with pytest.raises(m2n.UsageError, match="still alive"):
            rnd.release()
        assert a.tolist() == [2, 3, 4, 5, 6, 7]
        del a
        rnd.release()
        with pytest.raises(m2n.UsageError, match="released"):
            rnd.tensor(0)
        with pytest.raises(m2n.UsageError, match="released"):
            rnd.release()
        # close() refuses while a view of a held round is alive.
        rnd2 = comm.dispatch.recv(timeout=30)
        mv = rnd2.memoryview(0)
        with pytest.raises(m2n.UsageError, match="live views"):
            comm.close()
        assert bytes(mv) == bytes(np.arange(2, dtype=np.int32).data)
        del mv
        rnd2.release()

    run_group((1, 1), body)


def test_wrong_dtype_shape_sender() -> None:
    def body(comm: m2n.Communicator) -> None:
        if comm.role == m2n.ATTENTION:
            buf = bytearray(10)
            comm.register(buf)
            comm.dispatch.wait_sent(comm.dispatch.send([buf], timeout=30), timeout=30)
            return
        with comm.dispatch.recv(timeout=30) as rnd:
            with pytest.raises(m2n.InvalidArgument, match="not a whole number"):
                rnd.tensor(0, torch.float32)
            with pytest.raises(m2n.InvalidArgument, match="not a whole number"):
                rnd.numpy(0, np.float64)
            with pytest.raises(m2n.InvalidArgument, match="shape"):
                rnd.tensor(0, torch.int16, (2, 3))
            with pytest.raises(m2n.InvalidArgument, match="shape"):
                rnd.numpy(0, np.uint8, (3, -1))
            with pytest.raises(m2n.InvalidArgument, match="sender 1"):
                rnd.tensor(1)
            assert rnd.tensor(0, torch.int16, (-1, 1)).shape == (5, 1)

    run_group((1, 1), body)


def test_unregistered_foreign_and_wrong_direction() -> None:
    def body(comm: m2n.Communicator) -> None:
        if comm.role == m2n.ATTENTION:
            with pytest.raises(m2n.InvalidArgument, match="not inside memory registered"):
                comm.dispatch.send([torch.zeros(4)], timeout=1)
            x = torch.zeros(2, 8)
            comm.register(x)
            with pytest.raises(m2n.InvalidArgument, match="not contiguous"):
                comm.dispatch.send([x[:, 1]], timeout=1)
            with pytest.raises(m2n.InvalidArgument, match="one message per receiver"):
                comm.dispatch.send([x[0], x[1]], timeout=1)
            with pytest.raises(m2n.InvalidArgument, match="outside its region"):
                comm.dispatch.send([(comm._mems[0], 60, 8)], timeout=1)
            with pytest.raises(m2n.UsageError, match="cannot send"):
                comm.combine.send([x[0]], timeout=1)
            with pytest.raises(m2n.UsageError, match="cannot receive"):
                comm.dispatch.try_recv()
            with pytest.raises(m2n.InvalidArgument, match="read-only"):
                comm.register(b"bytes are read-only")
            with pytest.raises(m2n.InvalidArgument, match="not a tensor"):
                comm.register(object())
            ready.wait(30)
            foreign = stash["mem"]
            with pytest.raises(m2n.UsageError, match="another communicator"):
                comm.deregister(foreign)
            with pytest.raises(m2n.UsageError, match="not registered with this communicator"):
                comm.dispatch.send([(foreign, 0, 4)], timeout=1)
            comm.dispatch.wait_sent(comm.dispatch.send([x[0]], timeout=30), timeout=30)
        else:
            stash["mem"] = comm.register(bytearray(16))
            ready.set()
            with comm.dispatch.recv(timeout=30) as rnd:
                assert rnd.lens == [32]

    stash: dict[str, m2n.Memory] = {}
    ready = threading.Event()
    run_group((1, 1), body)


def test_deregister_and_closed_and_aborted() -> None:
    def body(comm: m2n.Communicator) -> None:
        if comm.role == m2n.EXPERT:
            with comm.dispatch.recv(timeout=30):
                pass
            return
        buf = bytearray(32)
        mem = comm.register(buf)
        comm.dispatch.wait_sent(comm.dispatch.send([buf], timeout=30), timeout=30)
        comm.deregister(mem)
        with pytest.raises(m2n.InvalidArgument, match="not inside"):
            comm.dispatch.send([buf], timeout=1)
        with pytest.raises(m2n.UsageError, match="not registered"):
            comm.deregister(mem)
        comm.close()
        comm.close()  # idempotent
        with pytest.raises(m2n.UsageError, match="closed"):
            comm.progress()

    run_group((1, 1), body)

    def aborting(comm: m2n.Communicator) -> str:
        if comm.role == m2n.ATTENTION:
            comm.abort()
            with pytest.raises(m2n.Aborted):
                comm.progress()
            with pytest.raises(m2n.Aborted):
                comm.combine.recv(timeout=1)
            return "aborted"
        with pytest.raises(m2n.PeerLost) as lost:
            comm.dispatch.recv(timeout=30)
        assert lost.value.peer_role == "attention" and lost.value.peer_rank == 0
        return "saw it"

    assert sorted(run_group((1, 1), aborting).values()) == ["aborted", "saw it"]


def test_bad_config_and_ids() -> None:
    with pytest.raises(m2n.ConfigError, match="M2N_DEPHT"):
        m2n.Communicator(m2n.ATTENTION, 0, (1, 1), m2n.unique_id("127.0.0.1:1"), {"depht": 4})
    with pytest.raises(m2n.ConfigError, match="M2N_TRANSPORT"):
        m2n.Communicator(
            m2n.ATTENTION, 0, (1, 1), m2n.unique_id("127.0.0.1:1"), {"transport": "carrier-pigeon"}
        )
    with pytest.raises(m2n.InvalidArgument, match="unique id"):
        m2n.Communicator(m2n.ATTENTION, 0, (1, 1), "not an id")
    with pytest.raises(m2n.InvalidArgument, match="role"):
        m2n.Communicator("router", 0, (1, 1), m2n.unique_id("127.0.0.1:1"))
    with pytest.raises(m2n.InvalidArgument, match="rank 3"):
        m2n.Communicator(m2n.EXPERT, 3, (1, 2), m2n.unique_id("127.0.0.1:1"))
    with pytest.raises(m2n.InvalidArgument, match="root address"):
        m2n.Root("nowhere")
    with pytest.raises(m2n.InvalidArgument, match="timeout"):
        m2n.Root(timeout=-1)
    # Nobody serves this root: the rendezvous fails within its timeout.
    with pytest.raises(m2n.BootstrapError):
        m2n.Communicator(
            m2n.ATTENTION, 0, (1, 1), m2n.unique_id("127.0.0.1:9"), {"bootstrap_timeout_ms": 300}
        )


def test_timeout_then_retry_and_gil_released() -> None:
    def body(comm: m2n.Communicator) -> None:
        if comm.role == m2n.ATTENTION:
            go.wait(30)
            buf = bytearray(b"late")
            comm.register(buf)
            comm.dispatch.wait_sent(comm.dispatch.send([buf], timeout=30), timeout=30)
            return
        counter = [0]
        stop = threading.Event()

        def count() -> None:
            while not stop.is_set():
                counter[0] += 1

        t = threading.Thread(target=count)
        t.start()
        with pytest.raises(m2n.Timeout, match="timed out after"):
            comm.dispatch.recv(timeout=0.5)
        # The counting thread ran while recv blocked: the GIL was released.
        ran = counter[0]
        stop.set()
        t.join()
        assert ran > 10_000, f"only {ran} iterations ran beside a blocking recv"
        go.set()
        with comm.dispatch.recv(timeout=30) as rnd:  # nothing was lost by the timeout
            assert rnd.number == 0 and rnd.bytes(0) == b"late"

    go = threading.Event()
    run_group((1, 1), body)


def test_stream_calls_refuse_without_cuda() -> None:
    def body(comm: m2n.Communicator) -> None:
        if comm.role == m2n.ATTENTION:
            x = torch.zeros(4)
            comm.register(x)
            with pytest.raises(m2n.StreamError):
                comm.dispatch.send_on_stream([x], 0)
            with pytest.raises(m2n.InvalidArgument, match="not a CUDA stream"):
                comm.dispatch.send_on_stream([x], "stream")
            if not torch.cuda.is_available():
                with pytest.raises(m2n.StreamError):
                    comm._c.register_device(1 << 40, 64, x)
        else:
            with pytest.raises(m2n.StreamError):
                comm.dispatch.recv_on_stream(0)
            comm.start_proxy()
            with pytest.raises(m2n.UsageError, match="already running"):
                comm.start_proxy()
            comm.stop_proxy()
            with pytest.raises(m2n.UsageError, match="no proxy"):
                comm.stop_proxy()

    run_group((1, 1), body)


@pytest.mark.parametrize("shape", [(2, 2), (3, 2)], ids=["2x2", "3x2"])
def test_killed_expert_is_peer_lost(transport: str, shape: tuple[int, int]) -> None:
    """The last expert is killed after a round: every attention rank raises PeerLost naming it."""
    m, n = shape
    root = m2n.Root(timeout=60)
    experts = [
        rank_process("expert_dies", root.unique_id, str(e), str(m), str(n), transport)
        for e in range(n)
    ]
    errors: dict[int, BaseException] = {}

    def attention(rank: int) -> None:
        cfg = {**transports.config(transport), "peer_timeout_ms": 10000}
        with m2n.Communicator(m2n.ATTENTION, rank, shape, root, cfg) as comm:
            x = bytearray(64 * n)
            comm.register(x)
            comm.dispatch.send([memoryview(x)[64 * e : 64 * (e + 1)] for e in range(n)], timeout=30)
            with comm.combine.recv(timeout=30):
                pass
            try:
                comm.dispatch.send([memoryview(x)[:64]] * n, timeout=30)
                with comm.combine.recv(timeout=30):
                    pass
            except m2n.PeerLost as e:
                errors[rank] = e
            # Nobody leaves before every attention rank has seen the loss: a
            # rank that leaves is itself a lost peer (to the experts, which
            # then leave too). Waiting ranks keep their links alive.
            with lock:
                seen[0] += 1
            until = time.monotonic() + 30  # a rank that failed earlier never comes
            while time.monotonic() < until:
                with lock:
                    if seen[0] == m:
                        break
                try:
                    comm.progress()
                except m2n.Error:
                    pass
                time.sleep(0.001)

    seen, lock = [0], threading.Lock()
    threads = [threading.Thread(target=attention, args=(a,)) for a in range(m)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for p in experts:
        p.wait(60)
    assert sorted(errors) == list(range(m)), f"PeerLost on {sorted(errors)}"
    for e in errors.values():
        assert (e.peer_role, e.peer_rank) == ("expert", n - 1), str(e)  # type: ignore[attr-defined]
        assert "expert" in str(e)
    assert experts[-1].returncode == -signal.SIGKILL


def test_ctrl_c_interrupts_a_blocking_recv() -> None:
    root = m2n.Root(timeout=60)
    attention = rank_process("quiet_attention", root.unique_id)
    expert = rank_process("blocked_recv", root.unique_id)
    assert expert.stdout is not None
    assert expert.stdout.readline().strip() == "waiting"
    time.sleep(0.3)  # into the blocking call
    expert.send_signal(signal.SIGINT)
    out, _ = expert.communicate(timeout=30)
    attention.wait(30)
    assert expert.returncode == 0 and "interrupted" in out, out


def test_unique_id_command() -> None:
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "m2n", "unique-id", "127.0.0.1:29555"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith("m2n1@127.0.0.1:29555#")
    bad = subprocess.run(
        [sys.executable, "-m", "m2n", "unique-id", "host"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "root address" in bad.stderr
