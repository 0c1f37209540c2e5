"""One rank of NIXL's round trip, 1 x 1, run in NIXL's own venv (by roundtrip.py).

The same exchange as m2n's: the attention WRITEs n bytes from its
registered source into the expert's registered destination with a
notification; the expert, once the notification is in, checks the bytes
and WRITEs n bytes back into the attention's destination with a
notification; the attention checks them. As NIXL's examples do it:
nixl_agent, register_memory, get_xfer_descs, initialize_xfer (one
transfer handle per size and direction, made before the timed loop and
reposted each round with that round's notification), transfer,
check_xfer_state, get_new_notifs. No progress thread (calls progress the
worker); polling loops follow the same wait policy as m2n's (spin N empty
polls, then yield). Agent metadata and buffer addresses go through files
in --dir. See rtcommon for the checks and the schedule.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import importlib.metadata
import json
import os
import sys
import time
from collections import deque

import numpy as np
import rtcommon as rc
from nixl._api import nixl_agent, nixl_agent_config


def ucx_version() -> str:
    """The version of the UCX that NIXL loaded (its bundled libucp)."""
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "libucp" in line}
        for lib in libs:
            fn = ctypes.CDLL(lib).ucp_get_version_string
            fn.restype = ctypes.c_char_p
            return fn().decode()
    except (OSError, AttributeError):
        pass
    return "?"


def wait_file(path: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.01)
    with open(path) as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--role", choices=["attention", "expert"], required=True)
    ap.add_argument("--dir", required=True, help="rendezvous folder (metadata files)")
    ap.add_argument("--sizes", required=True)
    ap.add_argument("--iters", type=int, required=True)
    ap.add_argument("--warmup", type=int, required=True)
    ap.add_argument("--wait", required=True, help="spin, yield or spin-yield[:N]")
    ap.add_argument("--err-mode", choices=["peer", "none"], required=True)
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    sizes = rc.parse_sizes(a.sizes)
    big = max(sizes)
    attention = a.role == "attention"
    me = a.role
    peer_role = "expert" if attention else "attention"

    # -- setup (not timed) ----------------------------------------------------
    agent = nixl_agent(
        me,
        nixl_agent_config(enable_prog_thread=False, enable_listen_thread=False, backends=[]),
    )
    params = agent.get_plugin_params("UCX")
    params["ucx_error_handling_mode"] = a.err_mode
    agent.create_backend("UCX", params)
    src = np.zeros(big, dtype=np.uint8)
    dst = np.zeros(big, dtype=np.uint8)
    src_addr, dst_addr = src.ctypes.data, dst.ctypes.data
    reg = agent.register_memory([(src_addr, big, 0, ""), (dst_addr, big, 0, "")], "DRAM")
    if reg is None:
        raise RuntimeError("register_memory failed")
    rc.write_json(
        os.path.join(a.dir, f"{me}.json"),
        {"meta": base64.b64encode(agent.get_agent_metadata()).decode(), "dst": dst_addr},
    )
    peer_info = wait_file(os.path.join(a.dir, f"{peer_role}.json"), a.timeout)
    peer = agent.add_remote_agent(base64.b64decode(peer_info["meta"]))
    if isinstance(peer, bytes):
        peer = peer.decode()
    if peer != peer_role:
        raise RuntimeError(f"remote agent is named {peer!r}, expected {peer_role!r}")
    handles = {}
    for n in sizes:
        local = agent.get_xfer_descs([(src_addr, n, 0)], "DRAM")
        remote = agent.get_xfer_descs([(peer_info["dst"], n, 0)], "DRAM")
        handles[n] = agent.initialize_xfer("WRITE", local, remote, peer, b"")
    agent.make_connection(peer)
    # both sides loaded each other's metadata before either writes
    rc.write_json(os.path.join(a.dir, f"{me}.ready"), {})
    wait_file(os.path.join(a.dir, f"{peer_role}.ready"), a.timeout)

    src_view = memoryview(src).cast("B")
    dst_view = memoryview(dst).cast("B")
    poll = rc.Poll(rc.parse_wait(a.wait), a.timeout)
    pending: deque = deque()
    perf = time.perf_counter_ns
    transfer = agent.transfer
    state = agent.check_xfer_state
    notifs = agent.get_new_notifs

    def write(h: object, note: bytes) -> None:
        st = transfer(h, note)
        poll.reset("waiting for a WRITE to complete")
        while st != "DONE":
            if st == "ERR":
                raise RuntimeError("NIXL transfer failed (ERR)")
            poll.idle()
            st = state(h)

    def wait_note(note: bytes) -> None:
        poll.reset(f"waiting for notification {note!r}")
        while not pending:
            got = notifs()
            msgs = got.get(peer_role)
            if msgs:
                pending.extend(msgs)
            else:
                poll.idle()
        m = pending.popleft()
        if m != note:
            raise RuntimeError(f"notification {m!r}, expected {note!r}")

    doc: dict = {"role": me, "pid": os.getpid(), "err_mode": a.err_mode, "sizes": {}}
    doc["ucx_tls"] = os.environ.get("UCX_TLS", "")
    doc["backend_params"] = agent.get_backend_params("UCX")
    doc["nixl_version"] = importlib.metadata.version("nixl")
    doc["ucx_version"] = ucx_version()
    rnd_no = 0
    for n in sizes:
        pat_out = rc.Pattern(n, rc.DISPATCH if attention else rc.COMBINE)
        pat_in = rc.Pattern(n, rc.COMBINE if attention else rc.DISPATCH)
        h = handles[n]
        wrong = 0
        bad_rounds = 0
        samples: list[int] = []
        first = last = 0
        total = a.warmup + a.iters + 1
        for i in range(total):
            full = i < a.warmup or i == total - 1
            timed = not full
            note = b"%d" % rnd_no
            if full:
                pat_out.fill(src, rnd_no)
            if attention:
                t0 = perf()
                if timed:
                    pat_out.stamp(src_view, rnd_no)
                write(h, note)
                wait_note(note)
                if full:
                    wrong += pat_in.wrong_bytes(dst_view, rnd_no)
                elif not pat_in.stamp_ok(dst_view, rnd_no):
                    bad_rounds += 1
                t1 = perf()
                if timed:
                    samples.append(t1 - t0)
                    first = first or t0
                    last = t1
            else:
                wait_note(note)
                if full:
                    wrong += pat_in.wrong_bytes(dst_view, rnd_no)
                elif not pat_in.stamp_ok(dst_view, rnd_no):
                    bad_rounds += 1
                if timed:
                    pat_out.stamp(src_view, rnd_no)
                write(h, note)
            rnd_no += 1
        entry: dict = {"wrong_bytes": wrong, "bad_stamp_rounds": bad_rounds}
        if attention:
            entry["stats"] = rc.stats(samples, last - first)
        doc["sizes"][str(n)] = entry
    if pending:
        raise RuntimeError(f"{len(pending)} notifications left over")
    rc.write_json(a.out, doc)
    # Let the peer finish its last WRITE before this agent goes away.
    rc.write_json(os.path.join(a.dir, f"{me}.done"), {})
    wait_file(os.path.join(a.dir, f"{peer_role}.done"), a.timeout)
    for h in handles.values():
        agent.release_xfer_handle(h)
    agent.remove_remote_agent(peer)
    agent.deregister_memory(reg)


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - a rank reports and fails
        rc.fail(f"{type(e).__name__}: {e}")
    sys.exit(0)
