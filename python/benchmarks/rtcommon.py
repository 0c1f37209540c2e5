"""What the round-trip benchmark's rank programs share (stdlib and numpy only).

It is imported by ranks running in m2n's environment (target/venv) and by
ranks running in NIXL's own environment (target/peers/nixl-venv), so it must
not import m2n or nixl.

Schedule of one size, the same for every contender and both sides:
  * `warmup` rounds, not timed: the sender fills every byte of its message
    with the round's pattern and the receiver compares every byte;
  * `iters` timed rounds: the sender writes the round's pattern into the
    first and last (up to) 8 bytes of the message (a "stamp"), the receiver
    compares those bytes; both happen inside the timed round trip, for m2n
    and NIXL alike;
  * one verify round, not timed: every byte again, after the timed ones.
The pattern of round r is a fixed random byte string (per size and
direction) XORed with r mod 256, so a stale message (a slot or buffer
still holding an earlier round) does not pass.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

DISPATCH = 1
COMBINE = 2
STAMP = 8


def parse_size(text: str) -> int:
    """`8`, `64K`, `1M` (binary suffixes, as m2n_perf reads them)."""
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text[:-1] if mult != 1 else text
    value = int(digits) * mult
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


def parse_sizes(text: str) -> list[int]:
    return [parse_size(s) for s in text.split(",") if s.strip()]


class Pattern:
    """The bytes one direction carries at one size, per round."""

    def __init__(self, nbytes: int, direction: int) -> None:
        rng = np.random.default_rng(nbytes * 8 + direction)
        self.n = nbytes
        self.base = rng.integers(0, 256, nbytes, dtype=np.uint8)
        k = min(STAMP, nbytes)
        self.k = k
        self.tail_at = nbytes - k
        head = self.base[:k]
        tail = self.base[self.tail_at :]
        self.heads = [(head ^ np.uint8(key)).tobytes() for key in range(256)]
        self.tails = [(tail ^ np.uint8(key)).tobytes() for key in range(256)]

    def fill(self, dst: np.ndarray, rnd: int) -> None:
        """Every byte of round `rnd` into dst[:n]."""
        np.bitwise_xor(self.base, np.uint8(rnd & 0xFF), out=dst[: self.n])

    def stamp(self, dst: memoryview, rnd: int) -> None:
        """Round `rnd`'s first and last bytes into the byte view dst."""
        key = rnd & 0xFF
        dst[: self.k] = self.heads[key]
        dst[self.tail_at : self.n] = self.tails[key]

    def stamp_ok(self, view: memoryview, rnd: int) -> bool:
        key = rnd & 0xFF
        return (
            view[: self.k].tobytes() == self.heads[key]
            and view[self.tail_at : self.n].tobytes() == self.tails[key]
        )

    def wrong_bytes(self, view: object, rnd: int) -> int:
        """How many of the n bytes in view differ from round `rnd`'s pattern."""
        got = np.frombuffer(view, dtype=np.uint8, count=self.n)
        return int(np.count_nonzero(got != (self.base ^ np.uint8(rnd & 0xFF))))


def stats(samples_ns: list[int], loop_ns: int) -> dict:
    """p50/p99 by nearest rank (as nccl-tests' -I), mean, and round trips per second."""
    xs = sorted(samples_ns)
    n = len(xs)
    if n == 0:
        raise ValueError("no samples")

    def rank(p: float) -> float:
        i = max(0, min(n - 1, int(np.ceil(p / 100.0 * n)) - 1))
        return xs[i] / 1e3

    return {
        "samples": n,
        "p50_us": rank(50),
        "p99_us": rank(99),
        "p999_us": rank(99.9),
        "min_us": xs[0] / 1e3,
        "max_us": xs[-1] / 1e3,
        "mean_us": sum(xs) / n / 1e3,
        "rt_per_s": n / (loop_ns / 1e9),
    }


class Poll:
    """The wait policy `spin-yield:N` for hand-written polling loops.

    Call `idle()` after each empty poll: it spins `spins` times, then
    yields the core on every further empty poll, and raises TimeoutError
    past the deadline. `reset()` after progress.
    """

    __slots__ = ("deadline", "empty", "spins", "timeout", "what")

    def __init__(self, spins: int, timeout: float) -> None:
        self.spins = spins
        self.timeout = timeout
        self.empty = 0
        self.deadline = 0.0
        self.what = ""

    def reset(self, what: str) -> None:
        self.empty = 0
        self.what = what

    def idle(self) -> None:
        self.empty += 1
        e = self.empty
        if e == 1:
            self.deadline = time.monotonic() + self.timeout
        if e > self.spins:
            os.sched_yield()
        if (e & 1023) == 0 and time.monotonic() > self.deadline:
            raise TimeoutError(f"no progress for {self.timeout}s while {self.what}")


def parse_wait(wait: str) -> int:
    """The spin count of an m2n wait policy, for `Poll` (spin: never yield; yield: 0)."""
    if wait == "spin":
        return 1 << 62
    if wait == "yield":
        return 0
    if wait.startswith("spin-yield"):
        _, _, n = wait.partition(":")
        return int(n) if n else 256
    raise ValueError(f"wait policy {wait!r}: use spin, yield or spin-yield[:N]")


def write_json(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def fail(msg: str) -> None:
    print(f"{os.path.basename(sys.argv[0])}: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)
