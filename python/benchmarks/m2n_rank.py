"""One rank of m2n's Python round trip, 1 attention x 1 expert (run by roundtrip.py).

attention, per timed round: stamp its source, dispatch.send, wait_sent,
combine.recv, check the stamp through a zero-copy memoryview, release.
expert: dispatch.recv, check, release, stamp its source, combine.send,
wait_sent. The attention times each round (perf_counter_ns) from before
the stamp to after the release. See rtcommon for the checks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import rtcommon as rc

import m2n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", choices=["attention", "expert"], required=True)
    ap.add_argument("--uid", required=True)
    ap.add_argument("--transport", required=True)
    ap.add_argument("--sizes", required=True)
    ap.add_argument("--iters", type=int, required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--wait", required=True)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    sizes = rc.parse_sizes(a.sizes)
    big = max(sizes)
    attention = a.role == "attention"
    role = m2n.ATTENTION if attention else m2n.EXPERT
    config = {
        "transport": a.transport,
        "slot_bytes": str(big),
        "depth": a.depth,
        "wait": a.wait,
    }
    comm = m2n.Communicator(role, 0, (1, 1), a.uid, config)
    src = np.zeros(big, dtype=np.uint8)
    mem = comm.register(src)
    src_view = memoryview(src).cast("B")
    out_ch = comm.dispatch if attention else comm.combine
    in_ch = comm.combine if attention else comm.dispatch
    to = a.timeout
    perf = time.perf_counter_ns
    doc = {
        "role": a.role,
        "pid": os.getpid(),
        "transport": comm.transport,
        "transport_detail": comm.transport_detail,
        "m2n_version": m2n.__version__,
        "config": config,
        "sizes": {},
    }
    rnd_no = 0  # the benchmark's own round counter, the same on both sides
    for n in sizes:
        pat_out = rc.Pattern(n, rc.DISPATCH if attention else rc.COMBINE)
        pat_in = rc.Pattern(n, rc.COMBINE if attention else rc.DISPATCH)
        msg = [(mem, 0, n)]
        wrong = 0
        bad_rounds = 0
        samples: list[int] = []
        first = last = 0
        total = a.warmup + a.iters + 1
        for i in range(total):
            full = i < a.warmup or i == total - 1
            timed = not full
            if full:
                pat_out.fill(src, rnd_no)
            if attention:
                t0 = perf()
                if timed:
                    pat_out.stamp(src_view, rnd_no)
                r = out_ch.send(msg, to)
                out_ch.wait_sent(r, to)
                rnd = in_ch.recv(to)
                mv = rnd.memoryview(0)
                if full:
                    wrong += pat_in.wrong_bytes(mv, rnd_no)
                elif not pat_in.stamp_ok(mv, rnd_no):
                    bad_rounds += 1
                del mv
                rnd.release()
                t1 = perf()
                if timed:
                    samples.append(t1 - t0)
                    first = first or t0
                    last = t1
            else:
                rnd = in_ch.recv(to)
                mv = rnd.memoryview(0)
                if full:
                    wrong += pat_in.wrong_bytes(mv, rnd_no)
                elif not pat_in.stamp_ok(mv, rnd_no):
                    bad_rounds += 1
                del mv
                rnd.release()
                if timed:
                    pat_out.stamp(src_view, rnd_no)
                r = out_ch.send(msg, to)
                out_ch.wait_sent(r, to)
            rnd_no += 1
        entry: dict = {"wrong_bytes": wrong, "bad_stamp_rounds": bad_rounds}
        if attention:
            # rt/s: timed rounds over the wall time from the first one's start to the last one's end
            entry["stats"] = rc.stats(samples, last - first)
        doc["sizes"][str(n)] = entry
    comm.close()
    rc.write_json(a.out, doc)


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - a rank reports and fails
        rc.fail(f"{type(e).__name__}: {e}")
    sys.exit(0)
