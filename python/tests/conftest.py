"""Helpers: a whole M x N group in threads of this process, or in processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
import transports

import m2n

HERE = Path(__file__).resolve().parent


def run_group(
    shape: tuple[int, int],
    body: Callable[[m2n.Communicator], Any],
    transport: str = "shm",
    config: dict[str, Any] | None = None,
    timeout: float = 60.0,
) -> dict[tuple[str, int], Any]:
    """Run `body(comm)` on every rank of a group, each in a thread; re-raise the first failure.

    `transport` is one of `transports.NAMES`."""
    root = m2n.Root(timeout=timeout)
    cfg = {**transports.config(transport), **(config or {})}
    results: dict[tuple[str, int], Any] = {}

    def rank_main(role: str, rank: int) -> None:
        try:
            with m2n.Communicator(role, rank, shape, root, cfg) as comm:
                results[(role, rank)] = body(comm)
        except BaseException as e:  # noqa: BLE001 - reported below
            results[(role, rank)] = e

    ranks = [(m2n.ATTENTION, r) for r in range(shape[0])] + [
        (m2n.EXPERT, r) for r in range(shape[1])
    ]
    threads = [threading.Thread(target=rank_main, args=rk, daemon=True) for rk in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    stuck = [rk for rk, t in zip(ranks, threads) if t.is_alive()]
    assert not stuck, f"ranks {stuck} did not finish within {timeout} s"
    for rk in ranks:
        if isinstance(results[rk], BaseException):
            raise results[rk]
    return results


def rank_process(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start tests/ranks.py with `args` in a new Python process."""
    return subprocess.Popen(
        [sys.executable, str(HERE / "ranks.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(params=transports.NAMES)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)
