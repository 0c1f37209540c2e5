"""m2n's Python round trip against m2n_perf (Rust) and NIXL's Python API, in one run.

Driven by scripts/bench-python, which builds m2n_perf, checks m2n's
environment and makes NIXL's. Per transport (shm, tcp), one after the
other on this machine:
  1. m2n_perf under mpiexec, --pattern roundtrip, 1 x 1 (the Rust path);
  2. m2n's Python API, 1 x 1, two processes (m2n_rank.py);
  3. NIXL's Python API, 1 x 1, two processes in NIXL's venv (nixl_rank.py):
     UCX shared memory or UCX TCP.
Then one table. Anything missing (a rank failing, a size without a figure,
a wrong byte) stops the run with a message and a non-zero exit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import rtcommon as rc

import m2n

HERE = os.path.dirname(os.path.abspath(__file__))

# NIXL's UCX backend per transport: UCX_TLS, and ucx_error_handling_mode
# (shared-memory-only transports need "none", else NIXL_ERR_BACKEND).
NIXL_UCX = {
    "shm": ("posix,sysv,cma,self", "none"),
    "tcp": ("tcp,self", "peer"),
}


class BenchError(Exception):
    pass


def size_name(n: int) -> str:
    for suffix, mult in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{suffix}"
    return str(n)


def pinned(cpus: list[int] | None, i: int):  # a preexec_fn, or None
    if not cpus:
        return None
    cpu = cpus[i % len(cpus)]
    return lambda: os.sched_setaffinity(0, {cpu})


def run_pair(what: str, cmds: list[list[str]], env: dict, a: argparse.Namespace, cwd: str) -> None:
    """Start both ranks (attention, expert), wait for both; a failure or a timeout is fatal."""
    timeout = a.pair_timeout
    procs = [
        subprocess.Popen(c, env=env, cwd=cwd, preexec_fn=pinned(a.cpus, i))
        for i, c in enumerate(cmds)
    ]
    try:
        rcs = [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired as e:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        raise BenchError(f"{what}: ranks still running after {timeout:.0f}s") from e
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(rcs):
        raise BenchError(f"{what}: rank exit codes {rcs} (attention, expert)")


def load_ranks(what: str, dirpath: str, sizes: list[int]) -> dict:
    """The attention's figures per size, with both sides' check counts; fatal if any is missing."""
    docs = {}
    for role in ("attention", "expert"):
        path = os.path.join(dirpath, f"{role}.out.json")
        if not os.path.exists(path):
            raise BenchError(f"{what}: the {role} rank wrote no results ({path})")
        with open(path) as f:
            docs[role] = json.load(f)
    out = {"ranks": docs, "rows": {}}
    for n in sizes:
        a = docs["attention"]["sizes"].get(str(n))
        e = docs["expert"]["sizes"].get(str(n))
        if a is None or e is None or "stats" not in a:
            raise BenchError(f"{what}: no figure for {n} B")
        wrong = a["wrong_bytes"] + e["wrong_bytes"]
        bad = a["bad_stamp_rounds"] + e["bad_stamp_rounds"]
        st = a["stats"]
        for k in ("p50_us", "p99_us", "rt_per_s"):
            if not (st.get(k) or 0) > 0:
                raise BenchError(f"{what}: {k} at {n} B is {st.get(k)!r}")
        out["rows"][n] = dict(st, wrong_bytes=wrong, bad_stamp_rounds=bad)
    return out


def run_m2n_perf(a: argparse.Namespace, transport: str, sizes: list[int], work: str) -> dict:
    lo, hi = min(sizes), max(sizes)
    for n in sizes:
        q = n // lo
        if n % lo or q & (q - 1):
            raise BenchError(f"m2n_perf steps by a factor 2 from {lo}: {n} B is not on that ladder")
    out = os.path.join(work, f"m2n_perf-{transport}.json")
    cmd = [
        *a.mpiexec.split(),
        *(["-bind-to", "core"] if a.cpus else []),
        "-n",
        "2",
        a.m2n_perf,
        "--senders",
        "1",
        "-b",
        str(lo),
        "-e",
        str(hi),
        "-f",
        "2",
        "-n",
        str(a.iters),
        "-w",
        str(a.warmup),
        "-c",
        "1",
        "--transport",
        transport,
        "--pattern",
        "roundtrip",
        "--baseline",
        "none",
        "--wait",
        a.wait,
        "--depth",
        str(a.depth),
        "--json",
        out,
    ]
    print(f"# [{transport}] m2n_perf: {' '.join(cmd)}", flush=True)
    try:
        res = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=a.pair_timeout)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"m2n_perf over {transport}: still running after {e.timeout:.0f}s") from e
    log = os.path.join(work, f"m2n_perf-{transport}.log")
    with open(log, "w") as f:
        f.write(res.stdout + res.stderr)
    if res.returncode != 0 or not os.path.exists(out):
        sys.stderr.write(res.stdout[-4000:] + res.stderr[-4000:])
        raise BenchError(f"m2n_perf over {transport} failed (exit {res.returncode}); log: {log}")
    with open(out) as f:
        doc = json.load(f)
    rows = {}
    for row in doc["rows"]:
        rows[row["bytes"]] = row["m2n"]
    picked = {}
    for n in sizes:
        r = rows.get(n)
        if r is None:
            raise BenchError(f"m2n_perf over {transport}: no row for {n} B in {out}")
        if r["wrong"] != 0:
            raise BenchError(f"m2n_perf over {transport}: {r['wrong']} wrong bytes at {n} B")
        st = r["stats"]
        if not (st["p50_us"] > 0 and st["p99_us"] > 0 and st["mean_us"] > 0):
            raise BenchError(f"m2n_perf over {transport}: empty figures at {n} B")
        picked[n] = dict(st, rt_per_s=1e6 / st["mean_us"], wrong_bytes=r["wrong"])
    return {"json": doc, "rows": picked, "log": log}


def run_m2n_python(a: argparse.Namespace, transport: str, sizes: list[int], work: str) -> dict:
    d = tempfile.mkdtemp(prefix=f"m2n-{transport}-", dir=work)
    root = m2n.Root("127.0.0.1:0", timeout=60)
    common = [
        "--uid",
        root.unique_id,
        "--transport",
        transport,
        "--sizes",
        ",".join(map(str, sizes)),
        "--iters",
        str(a.iters),
        "--warmup",
        str(a.warmup),
        "--wait",
        a.wait,
        "--depth",
        str(a.depth),
    ]
    cmds = [
        [sys.executable, os.path.join(HERE, "m2n_rank.py"), "--role", role, *common]
        + ["--out", os.path.join(d, f"{role}.out.json")]
        for role in ("attention", "expert")
    ]
    print(f"# [{transport}] m2n-python: {len(sizes)} sizes, wait {a.wait}", flush=True)
    run_pair(f"m2n-python over {transport}", cmds, dict(os.environ), a, d)
    return load_ranks(f"m2n-python over {transport}", d, sizes)


def run_nixl(a: argparse.Namespace, transport: str, sizes: list[int], work: str) -> dict:
    d = tempfile.mkdtemp(prefix=f"nixl-{transport}-", dir=work)
    tls, err_mode = NIXL_UCX[transport]
    env = dict(os.environ)
    env.update(
        UCX_TLS=tls,
        # any process that made a UCX backend segfaults at exit in the bundled
        # libnl-route-3 unless UCX's InfiniBand modules stay unloaded
        UCX_MODULES="^*ib*",
        NIXL_LOG_LEVEL=env.get("NIXL_LOG_LEVEL", "WARN"),
    )
    # NIXL's venv must not see m2n's packages
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    common = [
        "--dir",
        d,
        "--sizes",
        ",".join(map(str, sizes)),
        "--iters",
        str(a.iters),
        "--warmup",
        str(a.warmup),
        "--wait",
        a.wait,
        "--err-mode",
        err_mode,
    ]
    cmds = [
        [a.nixl_python, os.path.join(HERE, "nixl_rank.py"), "--role", role, *common]
        + ["--out", os.path.join(d, f"{role}.out.json")]
        for role in ("attention", "expert")
    ]
    print(
        f"# [{transport}] NIXL: UCX_TLS={tls} ucx_error_handling_mode={err_mode}, "
        f"no progress thread, polling {a.wait}",
        flush=True,
    )
    run_pair(f"NIXL over {transport}", cmds, env, a, d)
    return load_ranks(f"NIXL over {transport}", d, sizes)


def check_cost() -> float:
    """Microseconds of one round trip's stamps and checks (each side stamps once, checks once)."""
    pat = rc.Pattern(1 << 16, rc.DISPATCH)
    buf = bytearray(1 << 16)
    view = memoryview(buf)
    pat.stamp(view, 1)
    reps = 20000
    t0 = time.perf_counter_ns()
    for i in range(reps):
        pat.stamp(view, i)
        pat.stamp_ok(view, i)
    dt = time.perf_counter_ns() - t0
    return 2 * dt / reps / 1e3


def median_rows(reps: list[dict]) -> dict:
    """Each figure's median over the repeats; wrong bytes and rounds summed."""
    rows = {}
    for n in reps[0]["rows"]:
        per = [r["rows"][n] for r in reps]
        row = {
            k: statistics.median(q[k] for q in per)
            for k in ("p50_us", "p99_us", "mean_us", "rt_per_s")
        }
        row["wrong_bytes"] = sum(q.get("wrong_bytes", 0) for q in per)
        row["bad_stamp_rounds"] = sum(q.get("bad_stamp_rounds", 0) for q in per)
        row["p50_us_each"] = [q["p50_us"] for q in per]
        row["p99_us_each"] = [q["p99_us"] for q in per]
        rows[n] = row
    return rows


def fmt(x: float | None, width: int, prec: int = 2) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.{prec}f}"


def table(a: argparse.Namespace, results: dict, sizes: list[int], nixl_sizes: list[int]) -> str:
    lines = []
    head = (
        f"#{'transport':>10} {'size':>8} | {'m2n-python':^26} | {'m2n_perf (Rust)':^17} "
        f"| {'py-rs':>7} | {'NIXL python':^26} | {'m2n-py vs NIXL':^22} | {'goal':>4} "
        f"{'#wrong':>6}"
    )
    unit = (
        f"#{'':>10} {'(B)':>8} | {'p50':>7} {'p99':>8} {'rt/s':>9} | {'p50':>8} {'p99':>8} "
        f"| {'p50 us':>7} | {'p50':>7} {'p99':>8} {'rt/s':>9} | {'rt/s x':>6} {'p50 x':>7} "
        f"{'p99 x':>7} | {'':>4} {'':>6}"
    )
    lines += [head, unit]
    goals_all = []
    for t in a.transports:
        py, rs, nx = (results[t][k]["rows"] for k in ("m2n-python", "m2n_perf", "nixl"))
        for n in sorted(set(sizes) | set(nixl_sizes)):
            p = py.get(n)
            r = rs.get(n)
            x = nx.get(n)
            delta = p["p50_us"] - r["p50_us"] if p and r else None
            thr = p["rt_per_s"] / x["rt_per_s"] if p and x else None
            p50x = x["p50_us"] / p["p50_us"] if p and x else None
            p99x = x["p99_us"] / p["p99_us"] if p and x else None
            if thr is not None:
                ok = thr >= 1.5 and p50x >= 1.5 and p99x >= 2.0
                goals_all.append(ok)
                goal = "met" if ok else "MISS"
            else:
                goal = "-"
            wrong = sum(
                (d or {}).get("wrong_bytes", 0) + (d or {}).get("bad_stamp_rounds", 0)
                for d in (p, r, x)
            )
            lines.append(
                f" {t:>10} {n:>8} | {fmt(p and p['p50_us'], 7)} {fmt(p and p['p99_us'], 8)} "
                f"{fmt(p and p['rt_per_s'], 9, 0)} | {fmt(r and r['p50_us'], 8)} "
                f"{fmt(r and r['p99_us'], 8)} | {fmt(delta, 7)} | {fmt(x and x['p50_us'], 7)} "
                f"{fmt(x and x['p99_us'], 8)} {fmt(x and x['rt_per_s'], 9, 0)} | "
                f"{fmt(thr, 6)} {fmt(p50x, 7)} {fmt(p99x, 7)} | {goal:>4} {wrong:>6}"
            )
    met = sum(goals_all)
    lines.append(
        f"# Goals (m2n-python vs NIXL at NIXL's sizes: rt/s x >= 1.5, p50 x >= 1.5, "
        f"p99 x >= 2, i.e. p99 at most half): {met} of {len(goals_all)} rows met"
    )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m2n-perf", required=True, help="the m2n_perf binary")
    ap.add_argument("--mpiexec", default="mpiexec", help="MPICH's launcher (words split)")
    ap.add_argument("--nixl-python", required=True, help="python of NIXL's venv")
    ap.add_argument("--sizes", default="8,64K,256K", help="m2n sizes (m2n-python, m2n_perf)")
    ap.add_argument("--nixl-sizes", default="64K,256K")
    ap.add_argument("--transports", default="shm,tcp")
    ap.add_argument("-n", "--iters", type=int, default=5000, help="timed round trips per size")
    ap.add_argument("-w", "--warmup", type=int, default=200, help="untimed, fully checked")
    ap.add_argument(
        "-r", "--repeat", type=int, default=3, help="runs of each contender; the table: medians"
    )
    ap.add_argument("--wait", default="spin-yield:256", help="wait policy, all three contenders")
    ap.add_argument("--depth", type=int, default=4, help="m2n slots per sender")
    ap.add_argument("--pair-timeout", type=float, default=240.0, help="seconds per contender run")
    ap.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the attention and the expert to two different cores "
        "(m2n_perf: mpiexec -bind-to core)",
    )
    ap.add_argument("--json", help="write every figure here")
    a = ap.parse_args()
    if a.repeat < 1 or a.iters < 1 or a.warmup < 0:
        raise BenchError("--repeat and --iters must be at least 1, --warmup at least 0")
    allowed = sorted(os.sched_getaffinity(0))
    a.cpus = None if a.no_pin or len(allowed) < 2 else allowed[:2]
    a.transports = [t.strip() for t in a.transports.split(",") if t.strip()]
    sizes = rc.parse_sizes(a.sizes)
    nixl_sizes = rc.parse_sizes(a.nixl_sizes)
    for t in a.transports:
        if t not in NIXL_UCX:
            raise BenchError(f"transport {t!r}: this benchmark knows shm and tcp")
    for what, path in (("m2n_perf", a.m2n_perf), ("NIXL's python", a.nixl_python)):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise BenchError(f"{what} is missing: {path}")
    launcher = a.mpiexec.split()[0]
    if shutil.which(launcher) is None:
        raise BenchError(f"{launcher} is missing (MPICH's mpiexec runs m2n_perf)")

    work = tempfile.mkdtemp(prefix="bench-python-")
    load = os.getloadavg()
    print("# bench-python: m2n Python round trip vs m2n_perf (Rust) vs NIXL Python, 1 x 1")
    print(
        f"# m2n {m2n.__version__} ({os.path.dirname(m2n.__file__)}), m2n_perf {a.m2n_perf}, "
        f"NIXL python {a.nixl_python}"
    )
    print(
        f"# sizes {','.join(map(size_name, sizes))} (NIXL {','.join(map(size_name, nixl_sizes))})"
        f"  warmup iters: {a.warmup}  iters: {a.iters}  wait: {a.wait}  depth: {a.depth}"
        f"  transports: {','.join(a.transports)}  repeats: {a.repeat} (figures: medians)"
    )
    print(
        f"# machine: {os.cpu_count()} cpus, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, load average at start "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        "# timing: m2n-python and NIXL: the attention process times each round trip "
        "(perf_counter_ns) from before stamping its source to after checking the reply "
        "(m2n: and releasing it), back to back, no barrier; checks of the first and last 8 "
        "bytes on both sides inside the timed part, every byte in warm-up rounds and one "
        "final round (untimed). m2n_perf: MPI barrier per round, max over ranks, checks only in "
        "an extra untimed round. p50/p99 by nearest rank; rt/s = timed rounds / their wall "
        "time (m2n_perf: 1e6 / mean)"
    )
    pin = (
        f"attention on cpu {a.cpus[0]}, expert on cpu {a.cpus[1]} (m2n_perf: mpiexec -bind-to core)"
        if a.cpus
        else "not pinned"
    )
    print(f"# ranks: {pin}")
    print(
        f"# the stamps and checks inside m2n-python's and NIXL's timed part cost about "
        f"{check_cost():.2f} us per round trip here (2 stamps + 2 checks, timed in-process)"
    )
    print(f"# work folder: {work}", flush=True)

    runners = {"m2n_perf": run_m2n_perf, "m2n-python": run_m2n_python, "nixl": run_nixl}
    runs: dict = {t: {k: [] for k in runners} for t in a.transports}
    for rep in range(a.repeat):
        # contenders interleaved, their order rotated per repeat, so that the
        # other load on this machine falls on all of them alike
        order = list(runners)
        order = order[rep % len(order) :] + order[: rep % len(order)]
        for t in a.transports:
            print(f"# repeat {rep + 1} of {a.repeat}, {t}: {', '.join(order)}", flush=True)
            for k in order:
                run_sizes = nixl_sizes if k == "nixl" else sizes
                runs[t][k].append(runners[k](a, t, run_sizes, work))
            if rep == 0:
                py_rank = runs[t]["m2n-python"][0]["ranks"]["attention"]
                nx_rank = runs[t]["nixl"][0]["ranks"]["attention"]
                print(
                    f"# [{t}] m2n-python: transport {py_rank['transport']} "
                    f"({py_rank['transport_detail']}); NIXL {nx_rank.get('nixl_version', '?')}, "
                    f"UCX {nx_rank.get('ucx_version', '?')}, UCX_TLS={nx_rank['ucx_tls']}, "
                    f"backend {nx_rank['backend_params']}",
                    flush=True,
                )
    results = {t: {k: {"rows": median_rows(v)} for k, v in runs[t].items()} for t in runs}

    print(
        "# py-rs = m2n-python p50 - m2n_perf p50: the Python layer's cost per round trip, "
        "including the stamps and checks above (m2n_perf has none in its timed part); "
        "rt/s x = m2n-python rt/s / NIXL rt/s; p50 x, p99 x = NIXL / m2n-python "
        "(above 1: m2n faster)"
    )
    text = table(a, results, sizes, nixl_sizes)
    print(text, flush=True)
    load = os.getloadavg()
    print(f"# load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")

    wrong = 0
    for t in a.transports:
        for k in ("m2n_perf", "m2n-python", "nixl"):
            for n, row in results[t][k]["rows"].items():
                bad = row.get("wrong_bytes", 0) + row.get("bad_stamp_rounds", 0)
                if bad:
                    print(f"# WRONG: {k} over {t} at {n} B: {bad} wrong bytes/rounds")
                wrong += bad
    if a.json:
        doc = {
            "tool": "bench-python",
            "when": datetime.datetime.now().isoformat(timespec="seconds"),
            "settings": dict(
                {
                    k: getattr(a, k)
                    for k in ("sizes", "nixl_sizes", "iters", "warmup", "wait", "repeat")
                },
                depth=a.depth,
                transports=a.transports,
                nixl_ucx=NIXL_UCX,
            ),
            "median": {
                t: {k: {str(n): row for n, row in v["rows"].items()} for k, v in results[t].items()}
                for t in a.transports
            },
            "repeats": {
                t: {
                    k: [{str(n): row for n, row in r["rows"].items()} for r in v]
                    for k, v in runs[t].items()
                }
                for t in a.transports
            },
            "table": text,
        }
        rc.write_json(a.json, doc)
        print(f"# figures: {a.json}")
    if wrong:
        print("# FAILED: wrong bytes (see above)", file=sys.stderr)
        return 1
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench-python: {e}", file=sys.stderr)
        sys.exit(1)
