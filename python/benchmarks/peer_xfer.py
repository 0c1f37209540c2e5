"""M x N round trips over NIXL and Mooncake TransferEngine, like m2n_perf --pattern roundtrip.

Driven by `scripts/peer-bench lib`. Three commands:

  run    (any Python 3.10+, stdlib only): starts M attention + N expert rank
         processes of one library in that library's own venv, waits for them,
         takes each iteration's time as the maximum over the attention ranks
         and writes one JSON with the figures per size.
  rank   (in the peer's venv; imports numpy and nixl or mooncake): one rank.
  table  (stdlib only): m2n_perf's JSONs and the peers' JSONs into one table
         per transport and shape, and summary.json; exit 1 with
         "MISSING FIGURES: ..." if any figure is missing or any byte is wrong.

The exchange of one round, the same as m2n_perf's roundtrip: each of the M
attention ranks WRITEs S bytes into each of the N experts (dispatch); each
expert, once all M messages are in, WRITEs S bytes back into each attention
rank (combine); an attention rank's round ends when all N replies are in.
The same bytes each way (a bare notification back would flatter the peer).

How each library is used (as its own examples and tests do):
  * NIXL: nixl_agent with the UCX backend, no progress thread (the default
    one made round trips 48-104 ms here), register_memory, agent metadata
    exchanged through files, initialize_xfer("WRITE") per size and peer made
    before the timed loop and reposted each round with that round's
    notification (agent.transfer(handle, note)), check_xfer_state until
    DONE, get_new_notifs for "the data is there". Shared memory: UCX_TLS=
    posix,sysv,cma,self with backend parameter ucx_error_handling_mode=none
    (else NIXL_ERR_BACKEND); TCP: UCX_TLS=tcp,self. UCX_MODULES='^*ib*'
    (else any process that made a UCX backend segfaults at exit in the
    bundled libnl-route-3).
  * Mooncake TransferEngine: initialize(host, "P2PHANDSHAKE", "tcp", ""),
    register_memory, transfer_submit_write per peer then
    transfer_check_status until each is done (a batch is freed once it
    reports done), then an 8-byte flag (round + 1) written the same way
    into the peer's registered flag word, which the peer polls. Its notify
    path opens a new TCP connection per call (hundreds of TIME_WAIT sockets
    per 100 calls), so it is not used. Mooncake's only transport without
    RDMA here is tcp: its "shm" column is empty (there is no shared-memory
    transport in the non-CUDA wheel), so it is compared over TCP only.

Every wait is a polling loop with m2n's own wait policy `auto` (what
m2n_perf runs with here): when the host runs more ranks than it has cores,
yield the core on every empty poll, else spin 256 empty polls first, then
yield (a pure spin starves Mooncake's own threads and, with M + N > 2
processes on 2 cores, everyone). --spins N overrides it.

Checks: warm-up rounds and one final check round (untimed, after the timed
ones, as m2n_perf -c 1) fill every byte of every message with its pattern
and compare every byte on receipt. Timed rounds do no data work, as in
m2n_perf (--stamps: write and compare the first and last 8 bytes of each
message inside the timed part; about 2 us per message and side here, a
third of m2n's 1x1 shm round trip at 64 KiB). The notification (NIXL) or
flag (Mooncake) names the round, so a late or early message is an error.
The pattern of a message depends on the size, the direction, the source,
the destination and the round, so a stale or misplaced message does not
pass.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Any

DISPATCH = 1
COMBINE = 2
STAMP = 8


# --- pure helpers (no numpy; tested in python/tests/test_peer_xfer.py) ------


def parse_size(text: str) -> int:
    """`4096`, `64K`, `1M` (binary suffixes, as m2n_perf reads them)."""
    t = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    value = int(t[:-1] if mult != 1 else t) * mult
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value


def parse_sizes(text: str) -> list[int]:
    return [parse_size(s) for s in text.replace(" ", ",").split(",") if s.strip()]


def size_name(n: int) -> str:
    for suffix, mult in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{suffix}"
    return str(n)


def ladder(sizes: list[int], factor: int = 4) -> tuple[int, int]:
    """(smallest, largest) if the sizes are m2n_perf's -b lo -e hi -f factor ladder, in full."""
    if not sizes:
        raise ValueError("no sizes")
    lo, hi = min(sizes), max(sizes)
    want, x = [], lo
    while x <= hi:
        want.append(x)
        x *= factor
    if sorted(set(sizes)) != want:
        steps = ", ".join(map(size_name, want))
        raise ValueError(f"m2n_perf -b {lo} -e {hi} -f {factor} measures {steps}: give those sizes")
    return lo, hi


def pattern_seed(nbytes: int, direction: int, src: int, dst: int) -> int:
    """The seed of one message stream's base bytes (size, direction, source, destination)."""
    return ((nbytes * 4 + direction) * 1009 + src) * 1013 + dst


def round_key(rnd: int, src: int, dst: int) -> int:
    """The byte XORed into the base bytes at round `rnd` (never the same for consecutive rounds)."""
    return (rnd + 37 * src + 101 * dst) & 0xFF


def percentile(sorted_us: list[float], q: float) -> float:
    """Nearest rank (what an HDR histogram's value_at_quantile gives, to its precision)."""
    n = len(sorted_us)
    if n == 0:
        raise ValueError("no samples")
    i = max(0, min(n - 1, math.ceil(q * n) - 1))
    return sorted_us[i]


def iteration_times(per_rank_us: list[list[float]]) -> list[float]:
    """Each iteration's time: the maximum over ranks (as m2n_perf's all_reduce max)."""
    if not per_rank_us:
        raise ValueError("no ranks")
    lens = {len(r) for r in per_rank_us}
    if len(lens) != 1:
        raise ValueError(f"ranks timed different numbers of iterations: {sorted(lens)}")
    return [max(col) for col in zip(*per_rank_us, strict=True)]


def summary(samples_us: list[float], m: int, n: int, nbytes: int) -> dict[str, float]:
    """p50/p99 over iterations and m2n_perf's roundtrip algbw/busbw (from the mean time)."""
    xs = sorted(samples_us)
    mean = sum(xs) / len(xs)
    return {
        "samples": len(xs),
        "mean_us": mean,
        "min_us": xs[0],
        "max_us": xs[-1],
        "p50_us": percentile(xs, 0.50),
        "p99_us": percentile(xs, 0.99),
        # two messages per pair and round trip (dispatch + combine), as m2n_perf
        "algbw_gbps": 2.0 * m * n * nbytes / (mean * 1e-6) / 1e9,
        "busbw_gbps": 2.0 * max(m, n) * nbytes / (mean * 1e-6) / 1e9,
    }


def auto_spins(ranks: int, cores: int) -> int:
    """m2n's M2N_WAIT=auto: yield at once when ranks outnumber cores, else spin 256 polls first."""
    return 0 if ranks > cores else 256


def write_json(path: str, doc: Any) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def wait_file(path: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.005)
    with open(path) as f:
        return json.load(f)


# --- one rank (peer venv) ----------------------------------------------------


class Pattern:
    """The bytes of one message stream (size, direction, source, destination) per round.

    Round r's message is a fixed random byte string XORed with round_key(r,
    src, dst); `stamp`/`stamp_ok` write and compare only its first and last
    `STAMP` bytes (precomputed, so that they cost the timed part little).
    """

    def __init__(self, np: Any, nbytes: int, direction: int, src: int, dst: int) -> None:
        self.np = np
        rng = np.random.default_rng(pattern_seed(nbytes, direction, src, dst))
        self.n = nbytes
        self.src, self.dst = src, dst
        self.base = rng.integers(0, 256, nbytes, dtype=np.uint8)
        self.k = min(STAMP, nbytes)
        self.tail_at = nbytes - self.k
        head, tail = self.base[: self.k], self.base[self.tail_at :]
        self.heads = [(head ^ np.uint8(key)).tobytes() for key in range(256)]
        self.tails = [(tail ^ np.uint8(key)).tobytes() for key in range(256)]

    def key(self, rnd: int) -> int:
        return round_key(rnd, self.src, self.dst)

    def fill(self, dst: Any, rnd: int) -> None:
        self.np.bitwise_xor(self.base, self.np.uint8(self.key(rnd)), out=dst)

    def stamp(self, view: memoryview, at: int, rnd: int) -> None:
        key = self.key(rnd)
        view[at : at + self.k] = self.heads[key]
        view[at + self.tail_at : at + self.n] = self.tails[key]

    def stamp_ok(self, view: memoryview, at: int, rnd: int) -> bool:
        key = self.key(rnd)
        return (
            view[at : at + self.k] == self.heads[key]
            and view[at + self.tail_at : at + self.n] == self.tails[key]
        )

    def wrong_bytes(self, got: Any, rnd: int) -> int:
        return int(self.np.count_nonzero(got != (self.base ^ self.np.uint8(self.key(rnd)))))


class Rank:
    """What both libraries' ranks share: buffers, patterns, the schedule."""

    def __init__(self, a: argparse.Namespace) -> None:
        import numpy as np

        # The wait policy's loop, shared with the other rank scripts
        # (rtcommon imports numpy, so only ranks import it).
        from rtcommon import Poll

        self.np = np
        self.a = a
        self.m, self.n = a.senders, a.experts
        self.rank = a.rank
        self.attention = a.rank < self.m
        # peers: the other side's ranks; slot k of my buffers belongs to peers[k]
        self.peers = list(range(self.m, self.m + self.n)) if self.attention else list(range(self.m))
        self.my_slot = self.rank if self.attention else self.rank - self.m
        self.sizes = parse_sizes(a.sizes)
        self.big = max(self.sizes)
        k = len(self.peers)
        self.src = np.zeros(k * self.big, dtype=np.uint8)
        self.dst = np.zeros(k * self.big, dtype=np.uint8)
        self.src_view = memoryview(self.src).cast("B")
        self.dst_view = memoryview(self.dst).cast("B")
        self.poll = Poll(a.spins, a.timeout)

    def patterns(self, nbytes: int) -> tuple[list[Pattern], list[Pattern]]:
        """Per peer: (what I send, what I receive)."""
        out_dir, in_dir = (DISPATCH, COMBINE) if self.attention else (COMBINE, DISPATCH)
        outs = [Pattern(self.np, nbytes, out_dir, self.rank, p) for p in self.peers]
        ins = [Pattern(self.np, nbytes, in_dir, p, self.rank) for p in self.peers]
        return outs, ins

    def fill(self, outs: list[Pattern], nbytes: int, rnd: int, full: bool) -> None:
        for k, pat in enumerate(outs):
            at = k * self.big
            if full:
                pat.fill(self.src[at : at + nbytes], rnd)
            else:
                pat.stamp(self.src_view, at, rnd)

    def wrong(self, ins: list[Pattern], nbytes: int, rnd: int, full: bool) -> int:
        bad = 0
        for k, pat in enumerate(ins):
            at = k * self.big
            if full:
                bad += pat.wrong_bytes(self.dst[at : at + nbytes], rnd)
            elif not pat.stamp_ok(self.dst_view, at, rnd):
                bad += 1
        return bad

    # the library's part
    def setup(self) -> None:
        raise NotImplementedError

    def prepare(self, nbytes: int) -> None:
        pass

    def send_all(self, nbytes: int, rnd: int) -> None:
        """WRITE this round's message to every peer, with "it is there"; wait for completion."""
        raise NotImplementedError

    def wait_all(self, rnd: int) -> None:
        """Return once every peer's message of round `rnd` is in."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def barrier(self, name: str) -> None:
        d = self.a.dir
        write_json(os.path.join(d, f"{name}.{self.rank}"), {})
        for r in range(self.m + self.n):
            wait_file(os.path.join(d, f"{name}.{r}"), self.a.timeout)

    def run(self) -> dict[str, Any]:
        a = self.a
        perf = time.perf_counter_ns
        self.setup()
        self.barrier("ready")
        doc: dict[str, Any] = {"rank": self.rank, "attention": self.attention, "sizes": {}}
        rnd = 0
        for nbytes in self.sizes:
            outs, ins = self.patterns(nbytes)
            self.prepare(nbytes)
            self.barrier(f"size{nbytes}")
            samples: list[float] = []
            wrong = 0
            total = a.warmup + a.iters + 1
            for i in range(total):
                full = i < a.warmup or i == total - 1
                timed = not full
                touch = full or a.stamps  # timed rounds: no data work unless --stamps
                if self.attention:
                    if touch:
                        self.fill(outs, nbytes, rnd, full)
                    t0 = perf()
                    self.send_all(nbytes, rnd)
                    self.wait_all(rnd)
                    t1 = perf()
                    if touch:
                        wrong += self.wrong(ins, nbytes, rnd, full)
                    if timed:
                        samples.append((t1 - t0) / 1e3)
                else:
                    self.wait_all(rnd)
                    if touch:
                        wrong += self.wrong(ins, nbytes, rnd, full)
                        self.fill(outs, nbytes, rnd, full)
                    self.send_all(nbytes, rnd)
                rnd += 1
            doc["sizes"][str(nbytes)] = {"wrong_bytes": wrong, "samples_us": samples}
        doc.update(self.describe())
        self.barrier("done")
        self.close()
        return doc

    def describe(self) -> dict[str, Any]:
        return {}


class NixlRank(Rank):
    def setup(self) -> None:
        import base64

        from nixl._api import nixl_agent, nixl_agent_config

        self.name = f"r{self.rank}"
        self.agent = nixl_agent(
            self.name,
            nixl_agent_config(enable_prog_thread=False, enable_listen_thread=False, backends=[]),
        )
        params = self.agent.get_plugin_params("UCX")
        params["ucx_error_handling_mode"] = self.a.err_mode
        self.agent.create_backend("UCX", params)
        size = self.src.nbytes
        self.reg = self.agent.register_memory(
            [(self.src.ctypes.data, size, 0, ""), (self.dst.ctypes.data, size, 0, "")], "DRAM"
        )
        if self.reg is None:
            raise RuntimeError("register_memory failed")
        meta = base64.b64encode(self.agent.get_agent_metadata()).decode()
        write_json(
            os.path.join(self.a.dir, f"meta.{self.rank}"),
            {"meta": meta, "dst": self.dst.ctypes.data},
        )
        self.remote: list[tuple[str, int]] = []
        for p in self.peers:
            info = wait_file(os.path.join(self.a.dir, f"meta.{p}"), self.a.timeout)
            got = self.agent.add_remote_agent(base64.b64decode(info["meta"]))
            got = got.decode() if isinstance(got, bytes) else got
            if got != f"r{p}":
                raise RuntimeError(f"remote agent is {got!r}, expected r{p}")
            self.remote.append((got, int(info["dst"])))
        self.handles: dict[int, list[Any]] = {}
        for name, _ in self.remote:
            self.agent.make_connection(name)
        self.pending: dict[str, list[bytes]] = {name: [] for name, _ in self.remote}

    def prepare(self, nbytes: int) -> None:
        hs = []
        for k, (name, rdst) in enumerate(self.remote):
            local = self.agent.get_xfer_descs(
                [(self.src.ctypes.data + k * self.big, nbytes, 0)], "DRAM"
            )
            remote = self.agent.get_xfer_descs(
                [(rdst + self.my_slot * self.big, nbytes, 0)], "DRAM"
            )
            hs.append(self.agent.initialize_xfer("WRITE", local, remote, name, b""))
        self.handles[nbytes] = hs

    def send_all(self, nbytes: int, rnd: int) -> None:
        note = b"%d" % rnd
        hs = self.handles[nbytes]
        states = [self.agent.transfer(h, note) for h in hs]
        self.poll.reset(f"NIXL WRITEs of round {rnd}")
        while True:
            busy = False
            for i, st in enumerate(states):
                if st == "ERR":
                    raise RuntimeError("NIXL transfer failed (ERR)")
                if st != "DONE":
                    states[i] = self.agent.check_xfer_state(hs[i])
                    busy = busy or states[i] != "DONE"
            if not busy:
                return
            self.poll.idle()

    def wait_all(self, rnd: int) -> None:
        note = b"%d" % rnd
        self.poll.reset(f"NIXL notifications of round {rnd}")
        while not all(self.pending[name] for name, _ in self.remote):
            got = self.agent.get_new_notifs()
            if any(got.values()):
                for name, msgs in got.items():
                    self.pending[name].extend(msgs)
            else:
                self.poll.idle()
        for name, _ in self.remote:
            m = self.pending[name].pop(0)
            if m != note:
                raise RuntimeError(f"notification {m!r} from {name}, expected {note!r}")

    def describe(self) -> dict[str, Any]:
        import importlib.metadata

        return {
            "lib": "nixl",
            "version": importlib.metadata.version("nixl"),
            "ucx_tls": os.environ.get("UCX_TLS", ""),
            "backend_params": self.agent.get_backend_params("UCX"),
        }

    def close(self) -> None:
        for hs in self.handles.values():
            for h in hs:
                self.agent.release_xfer_handle(h)
        for name, _ in self.remote:
            self.agent.remove_remote_agent(name)
        self.agent.deregister_memory(self.reg)


class MooncakeRank(Rank):
    def setup(self) -> None:
        from mooncake.engine import TransferEngine

        np = self.np
        self.te = TransferEngine()
        if self.te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
            raise RuntimeError("TransferEngine.initialize failed")
        # flags[k]: the last round peer k's message is in (+1); flag_out: mine
        self.flags = np.zeros(len(self.peers), dtype=np.uint64)
        self.flag_out = np.zeros(1, dtype=np.uint64)
        for buf in (self.src, self.dst, self.flags, self.flag_out):
            if self.te.register_memory(buf.ctypes.data, buf.nbytes) != 0:
                raise RuntimeError("register_memory failed")
        me = f"127.0.0.1:{self.te.get_rpc_port()}"
        write_json(
            os.path.join(self.a.dir, f"meta.{self.rank}"),
            {"session": me, "dst": self.dst.ctypes.data, "flags": self.flags.ctypes.data},
        )
        self.remote: list[tuple[str, int, int]] = []
        for p in self.peers:
            info = wait_file(os.path.join(self.a.dir, f"meta.{p}"), self.a.timeout)
            self.remote.append((info["session"], int(info["dst"]), int(info["flags"])))

    def _wait_batches(self, ids: list[int], what: str) -> None:
        self.poll.reset(what)
        left = list(ids)
        while left:
            still = []
            for b in left:
                st = self.te.transfer_check_status(b)
                if st < 0:
                    raise RuntimeError(f"Mooncake transfer failed ({st}) while {what}")
                if st == 0:
                    still.append(b)
            left = still
            if left:
                self.poll.idle()

    def send_all(self, nbytes: int, rnd: int) -> None:
        te = self.te
        src = self.src.ctypes.data
        ids = []
        for k, (sess, rdst, _) in enumerate(self.remote):
            b = te.transfer_submit_write(
                sess, src + k * self.big, rdst + self.my_slot * self.big, nbytes
            )
            if b <= 0:
                raise RuntimeError(f"transfer_submit_write to {sess} refused ({b})")
            ids.append(b)
        self._wait_batches(ids, f"Mooncake WRITEs of round {rnd}")
        # the data is complete at the peer; now the flag that says so
        self.flag_out[0] = rnd + 1
        fo = self.flag_out.ctypes.data
        ids = []
        for sess, _, rflags in self.remote:
            b = te.transfer_submit_write(sess, fo, rflags + 8 * self.my_slot, 8)
            if b <= 0:
                raise RuntimeError(f"transfer_submit_write (flag) to {sess} refused ({b})")
            ids.append(b)
        self._wait_batches(ids, f"Mooncake flag WRITEs of round {rnd}")

    def wait_all(self, rnd: int) -> None:
        want = rnd + 1
        flags = self.flags
        self.poll.reset(f"Mooncake flags of round {rnd}")
        while not bool((flags == want).all()):
            self.poll.idle()

    def describe(self) -> dict[str, Any]:
        import importlib.metadata

        return {
            "lib": "mooncake",
            "version": importlib.metadata.version("mooncake-transfer-engine-non-cuda"),
            "protocol": "tcp",
        }


def cmd_rank(a: argparse.Namespace) -> int:
    cls = {"nixl": NixlRank, "mooncake": MooncakeRank}[a.lib]
    try:
        doc = cls(a).run()
    except Exception as e:  # noqa: BLE001 - a rank reports and fails
        print(
            f"peer_xfer rank {a.rank} ({a.lib}): {type(e).__name__}: {e}",
            file=sys.stderr,
            flush=True,
        )
        return 1
    write_json(os.path.join(a.dir, f"out.{a.rank}.json"), doc)
    return 0


# --- run: one library, one transport, one shape -----------------------------

# NIXL's UCX per transport: UCX_TLS and ucx_error_handling_mode.
NIXL_UCX = {"shm": ("posix,sysv,cma,self", "none"), "tcp": ("tcp,self", "peer")}


def cmd_run(a: argparse.Namespace) -> int:
    if a.lib == "mooncake" and a.transport != "tcp":
        print("peer_xfer: Mooncake runs over tcp only here", file=sys.stderr)
        return 2
    world = a.senders + a.experts
    a.python, a.dir, a.out = (os.path.abspath(x) for x in (a.python, a.dir, a.out))
    if a.spins is None:
        a.spins = auto_spins(world, len(os.sched_getaffinity(0)))
    os.makedirs(a.dir, exist_ok=True)
    env = dict(os.environ)
    for k in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(k, None)
    err_mode = "peer"
    if a.lib == "nixl":
        tls, err_mode = NIXL_UCX[a.transport]
        env.update(
            UCX_TLS=tls, UCX_MODULES="^*ib*", NIXL_LOG_LEVEL=env.get("NIXL_LOG_LEVEL", "WARN")
        )
    else:
        env.setdefault("GLOG_minloglevel", "1")
    common = [
        "--lib", a.lib, "--senders", str(a.senders), "--experts", str(a.experts),
        "--sizes", a.sizes, "--iters", str(a.iters), "--warmup", str(a.warmup),
        "--dir", a.dir, "--timeout", str(a.timeout), "--err-mode", err_mode,
        "--spins", str(a.spins), *(["--stamps"] if a.stamps else []),
    ]  # fmt: skip
    me = os.path.abspath(__file__)
    procs = []
    logs = []
    for r in range(world):
        log = open(os.path.join(a.dir, f"rank{r}.log"), "w")  # noqa: SIM115 - closed below
        logs.append(log)
        cmd = [a.python, me, "rank", "--rank", str(r), *common]
        procs.append(
            subprocess.Popen(cmd, env=env, cwd=a.dir, stdout=log, stderr=subprocess.STDOUT)
        )
    deadline = time.monotonic() + a.run_timeout
    rcs: list[int | None] = [None] * world
    try:
        while any(x is None for x in rcs):
            rcs = [p.poll() for p in procs]
            if any(x not in (None, 0) for x in rcs) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if any(x is None for x in rcs):
            # a rank failed or the run is late: give the others a moment, then stop them
            time.sleep(2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
    rcs = [p.returncode for p in procs]
    what = f"{a.lib} {a.transport} {a.senders}x{a.experts}"
    if any(rcs):
        for r in range(world):
            with open(os.path.join(a.dir, f"rank{r}.log")) as f:
                tail = f.read()[-1500:]
            if rcs[r]:
                print(f"--- rank {r} (exit {rcs[r]}):\n{tail}", file=sys.stderr)
        print(f"peer_xfer: {what}: rank exit codes {rcs}", file=sys.stderr)
        return 1
    docs = []
    for r in range(world):
        with open(os.path.join(a.dir, f"out.{r}.json")) as f:
            docs.append(json.load(f))
    out: dict[str, Any] = {
        "lib": a.lib,
        "transport": a.transport,
        "senders": a.senders,
        "experts": a.experts,
        "iters": a.iters,
        "warmup": a.warmup,
        "spins": a.spins,
        "stamps": a.stamps,
        "info": {k: v for k, v in docs[0].items() if k not in ("sizes", "rank", "attention")},
        "rows": [],
    }
    if a.lib == "nixl":
        out["info"]["ucx_error_handling_mode"] = err_mode
    for nbytes in parse_sizes(a.sizes):
        per = [d["sizes"][str(nbytes)] for d in docs]
        wrong = sum(p["wrong_bytes"] for p in per)
        times = iteration_times([p["samples_us"] for p in per[: a.senders]])
        row = {"bytes": nbytes, "wrong": wrong, **summary(times, a.senders, a.experts, nbytes)}
        out["rows"].append(row)
        print(
            f"#  {what} {size_name(nbytes):>5}: p50 {row['p50_us']:9.1f} us"
            f"  p99 {row['p99_us']:9.1f} us"
            f"  busbw {row['busbw_gbps']:6.3f} GB/s  wrong {wrong}",
            flush=True,
        )
    write_json(a.out, out)
    return 0


# --- table --------------------------------------------------------------------


def ratio(x: float | None, y: float | None) -> float | None:
    return x / y if x and y else None


def cmd_table(a: argparse.Namespace) -> int:
    missing: list[str] = []
    wrong: list[str] = []
    sizes = parse_sizes(a.sizes)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split()]
    transports = a.transports.split()
    peers = (("nixl", "NIXL"), ("mooncake", "Mooncake"))

    def load(path: str) -> dict[str, Any] | None:
        if not os.path.exists(path):
            return None
        with open(path) as f:
            doc: dict[str, Any] = json.load(f)
        return doc

    def m2n_row(doc: dict[str, Any] | None, n: int) -> dict[str, Any] | None:
        for r in (doc or {}).get("rows", []):
            if r["bytes"] == n:
                m = r["m2n"]
                return {
                    "p50_us": m["stats"]["p50_us"],
                    "p99_us": m["stats"]["p99_us"],
                    "busbw_gbps": m["busbw_gbps"],
                    "wrong": m["wrong"],
                }
        return None

    def peer_row(doc: dict[str, Any] | None, n: int) -> dict[str, Any] | None:
        for r in (doc or {}).get("rows", []):
            if r["bytes"] == n:
                return r
        return None

    out_rows = []
    lines = []
    goal_n = goal_met = 0
    for t in transports:
        for m, e in shapes:
            shape = f"{m}x{e}"
            tag = f"{t}-{shape}"
            mdoc = load(os.path.join(a.out, f"m2n-{tag}.json"))
            pdocs = {k: load(os.path.join(a.out, f"{k}-{tag}.json")) for k, _ in peers}
            lines.append(f"## {t}, {shape} ({m} attention x {e} experts)")
            lines.append(
                f"# {'size':>5} | {'m2n p50':>8} {'p99':>8} {'busbw':>6}"
                f" | {'NIXL p50':>8} {'p99':>8}"
                f" {'busbw':>6} | {'MC p50':>8} {'p99':>8} {'busbw':>6} | {'p50 x':>6} {'p99 x':>6}"
                f" {'bw x':>6} | goal"
            )
            for n in sizes:
                mr = m2n_row(mdoc, n)
                if mr is None:
                    missing.append(f"m2n {tag} {size_name(n)}")
                prs = {}
                for k, label in peers:
                    if k == "mooncake" and t != "tcp":
                        prs[k] = None  # no shared-memory transport
                        continue
                    prs[k] = peer_row(pdocs[k], n)
                    if prs[k] is None:
                        missing.append(f"{label} {tag} {size_name(n)}")
                for who, r in [("m2n", mr), *[(k, prs[k]) for k, _ in peers]]:
                    if r is not None:
                        for f in ("p50_us", "p99_us", "busbw_gbps"):
                            v = r.get(f)
                            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                                missing.append(f"{who} {tag} {size_name(n)} {f}={v!r}")
                        if r.get("wrong"):
                            wrong.append(f"{who} {tag} {size_name(n)}: {r['wrong']} wrong bytes")
                got = [r for r in prs.values() if r]
                best_p50 = min((r["p50_us"] for r in got), default=None)
                best_p99 = min((r["p99_us"] for r in got), default=None)
                best_bw = max((r["busbw_gbps"] for r in got), default=None)
                p50x = ratio(best_p50, mr and mr["p50_us"])
                p99x = ratio(mr and mr["p99_us"], best_p99)
                bwx = ratio(mr and mr["busbw_gbps"], best_bw)
                in_goal = 64 << 10 <= n <= 1 << 20
                goal = "-"
                if in_goal and None not in (p50x, p99x, bwx):
                    assert p50x is not None and p99x is not None and bwx is not None
                    ok = p50x >= 2 and bwx >= 2 and p99x <= 0.5
                    goal_n += 1
                    goal_met += ok
                    goal = (
                        "met"
                        if ok
                        else "MISS "
                        + ",".join(
                            w
                            for w, bad in (("p50", p50x < 2), ("p99", p99x > 0.5), ("bw", bwx < 2))
                            if bad
                        )
                    )

                def f(r: dict[str, Any] | None, k: str, w: int, p: int) -> str:
                    return f"{r[k]:>{w}.{p}f}" if r else f"{'-':>{w}}"

                def g(x: float | None) -> str:
                    return f"{x:>6.2f}" if x is not None else f"{'-':>6}"

                lines.append(
                    f"  {size_name(n):>5} | {f(mr, 'p50_us', 8, 1)} {f(mr, 'p99_us', 8, 1)}"
                    f" {f(mr, 'busbw_gbps', 6, 2)} | {f(prs['nixl'], 'p50_us', 8, 1)}"
                    f" {f(prs['nixl'], 'p99_us', 8, 1)} {f(prs['nixl'], 'busbw_gbps', 6, 2)} |"
                    f" {f(prs['mooncake'], 'p50_us', 8, 1)} {f(prs['mooncake'], 'p99_us', 8, 1)}"
                    f" {f(prs['mooncake'], 'busbw_gbps', 6, 2)} |"
                    f" {g(p50x)} {g(p99x)} {g(bwx)} | {goal}"
                )
                out_rows.append(
                    {
                        "transport": t,
                        "shape": shape,
                        "bytes": n,
                        "m2n": mr,
                        "nixl": prs["nixl"],
                        "mooncake": prs["mooncake"],
                        "p50_x": p50x,
                        "p99_x": p99x,
                        "busbw_x": bwx,
                        "goal": goal,
                    }
                )
    lines.append(
        "# us per round trip (max over ranks per iteration; p50/p99 over iterations); busbw GB/s "
        "= 2 x max(M,N) x size / mean time (m2n_perf's roundtrip definition); "
        "p50 x = better peer p50 / m2n p50, p99 x = m2n p99 / better peer p99, "
        "bw x = m2n busbw / better peer busbw"
    )
    lines.append(
        f"# goal (64 KiB-1 MiB: p50 x >= 2, bw x >= 2, p99 x <= 0.5): "
        f"{goal_met} of {goal_n} rows met"
    )
    text = "\n".join(lines)
    print(text)
    write_json(
        os.path.join(a.out, "summary.json"),
        {"rows": out_rows, "goal_met": goal_met, "goal_rows": goal_n, "table": text,
         "missing": missing, "wrong": wrong},
    )  # fmt: skip
    print(f"# summary: {os.path.join(a.out, 'summary.json')}")
    status = 0
    if wrong:
        print("WRONG BYTES: " + "; ".join(wrong), file=sys.stderr)
        status = 1
    if missing:
        print("MISSING FIGURES: " + "; ".join(missing), file=sys.stderr)
        status = 1
    return status


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("rank", "run"):
        p = sub.add_parser(name)
        p.add_argument("--lib", choices=["nixl", "mooncake"], required=True)
        p.add_argument("--senders", type=int, required=True)
        p.add_argument("--experts", type=int, required=True)
        p.add_argument("--sizes", required=True)
        p.add_argument("--iters", type=int, required=True)
        p.add_argument("--warmup", type=int, required=True)
        p.add_argument("--dir", required=True, help="rendezvous folder")
        p.add_argument("--timeout", type=float, default=60.0, help="seconds without progress")
        p.add_argument(
            "--spins", type=int, help="empty polls before yielding (default: as m2n's wait auto)"
        )
        p.add_argument(
            "--stamps",
            action="store_true",
            help="also write and check each message's first and last 8 bytes in timed rounds "
            "(about 2 us per message and side here; m2n_perf does no data work in timed rounds)",
        )
        if name == "rank":
            p.add_argument("--rank", type=int, required=True)
            p.add_argument("--err-mode", default="peer")
        else:
            p.add_argument("--transport", choices=["shm", "tcp"], required=True)
            p.add_argument("--python", required=True, help="python of the library's venv")
            p.add_argument("--out", required=True)
            p.add_argument("--run-timeout", type=float, default=600.0)
    lad = sub.add_parser("ladder", help="print m2n_perf's -b and -e for the sizes (factor 4)")
    lad.add_argument("--sizes", required=True)
    t = sub.add_parser("table")
    t.add_argument("--out", required=True, help="folder with m2n-/nixl-/mooncake-T-MxN.json")
    t.add_argument("--sizes", required=True)
    t.add_argument("--shapes", default="1x1 2x2 4x2")
    t.add_argument("--transports", default="shm tcp")
    a = ap.parse_args()
    if a.cmd == "rank":
        return cmd_rank(a)
    if a.cmd == "run":
        return cmd_run(a)
    if a.cmd == "ladder":
        try:
            lo, hi = ladder(parse_sizes(a.sizes))
        except ValueError as e:
            print(f"peer_xfer: {e}", file=sys.stderr)
            return 2
        print(lo, hi)
        return 0
    return cmd_table(a)


if __name__ == "__main__":
    sys.exit(main())
