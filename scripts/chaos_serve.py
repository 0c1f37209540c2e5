"""The body of scripts/chaos-serve (see there). Standard library only."""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROBE_PROMPTS = [f"Probe prompt number {i}: tell me about the sea" for i in range(6)]
PROBE_TOKENS = 48
SECRET = "chaos-serve-secret-0123456789abcdef"


def die(msg: str) -> None:
    """Fails loudly with `msg`."""
    print(f"scripts/chaos-serve: {msg}", file=sys.stderr)
    sys.exit(1)


class Net:
    """Two namespaces joined by a veth pair (10.231.77.1 and .2)."""

    def __init__(self) -> None:
        pid = os.getpid() % 100000
        self.a, self.b = f"chs-a-{pid}", f"chs-b-{pid}"
        va, vb = f"chsa{pid}", f"chsb{pid}"
        for cmd in (
            ["netns", "add", self.a],
            ["netns", "add", self.b],
            ["link", "add", va, "type", "veth", "peer", "name", vb],
            ["link", "set", va, "netns", self.a],
            ["link", "set", vb, "netns", self.b],
        ):
            subprocess.run(["ip", *cmd], check=True)
        for ns, dev, host in ((self.a, va, 1), (self.b, vb, 2)):
            subprocess.run(
                ["ip", "-n", ns, "addr", "add", f"10.231.77.{host}/24", "dev", dev], check=True
            )
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)

    def close(self) -> None:
        """Removes the namespaces."""
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], check=False)


class Server:
    """moe-serve (and, with netns, its remote experts and their restarter)."""

    def __init__(self, args: argparse.Namespace, model: Path, net: Net | None) -> None:
        self.bin = Path(args.bin)
        self.model = str(model)
        self.net = net
        self.log: list[tuple[float, str]] = []
        self.procs: list[subprocess.Popen] = []
        env = dict(
            os.environ, M2N_WAIT="yield", M2N_PEER_TIMEOUT_MS="1500", MOE_SERVE_SECRET=SECRET
        )
        self.env = env
        shape = ["--attention", "2", "--experts", "2", "--max-batch", "32"]
        self.shape = shape
        cmd = [
            str(self.bin / "moe-serve"),
            "--model",
            self.model,
            *shape,
            "--served-model-name",
            "chaos",
            "--port",
            "8000",
            "--recovery-timeout-s",
            "60",
        ]
        if net:
            env["M2N_TRANSPORT"] = "tcp"
            cmd = [
                "ip",
                "netns",
                "exec",
                net.a,
                *cmd,
                "--spawn",
                "attention",
                "--control-listen",
                "10.231.77.1:7411",
            ]
        self.server = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        threading.Thread(target=self._read, args=(self.server.stderr,), daemon=True).start()
        if net:
            self.stop_restarter = False
            self.experts: dict[int, list[subprocess.Popen]] = {0: [], 1: []}
            for rank in (0, 1):
                self.start_expert(rank, standby=False)
                self.start_expert(rank, standby=True)
            threading.Thread(target=self._restarter, daemon=True).start()
        line = self.server.stdout.readline() if self.server.stdout else ""
        if "listening on" not in line:
            die(f"moe-serve did not start: {line!r}; its log: {self.log[-10:]}")

    def start_expert(self, rank: int, standby: bool) -> None:
        """Starts a remote expert worker (netns mode) for `rank`."""
        assert self.net
        cmd = [
            "ip",
            "netns",
            "exec",
            self.net.b,
            str(self.bin / "moe-serve"),
            "--join",
            "10.231.77.1:7411",
            "--worker",
            "expert",
            "--rank",
            str(rank),
            "--model",
            self.model,
            *self.shape[:4],
        ]
        if standby:
            cmd.append("--standby")
        p = subprocess.Popen(
            cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.experts[rank].append(p)

    def _restarter(self) -> None:
        while not self.stop_restarter:
            for rank, ps in self.experts.items():
                live = [p for p in ps if p.poll() is None]
                if len(live) < len(ps):
                    self.experts[rank] = live
                    self.start_expert(rank, standby=True)
            time.sleep(0.2)

    def _read(self, f: object) -> None:
        for line in f:
            self.log.append((time.monotonic(), line.rstrip()))

    def workers(self) -> list[int]:
        """Process ids of the live workers in service.

        The server's children and, with netns, the experts in service: the
        first ones and the standbys the server says took over (not the
        standbys still waiting).
        """
        took_over = {
            int(m.group(1))
            for _, text in self.log
            if (m := re.search(r"the standby \(pid (\d+)\) takes over", text))
        }
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                state = (d / "stat").read_text().split()[2]
            except OSError:
                continue
            if (
                self.model in cmd
                and "--worker" in cmd
                and ("--standby" not in cmd or int(d.name) in took_over)
                and state != "Z"
                and not cmd.startswith("ip ")
            ):
                out.append(int(d.name))
        return out

    def close(self) -> None:
        """Stops the server (a drain) and the experts it did not start."""
        if self.net:
            self.stop_restarter = True
        self.server.send_signal(signal.SIGTERM)
        try:
            self.server.wait(30)
        except subprocess.TimeoutExpired:
            self.server.kill()
        if self.net:
            for ps in self.experts.values():
                for p in ps:
                    p.kill()


def in_ns(server: Server, argv: list[str]) -> list[str]:
    """The command `argv`, run in the server's namespace if it has one."""
    return ["ip", "netns", "exec", server.net.a, *argv] if server.net else argv


def probe_once(
    server: Server, prompt: str
) -> tuple[bool, list[str], list[tuple[float, float]], str]:
    """One streamed greedy completion.

    Whether it succeeded, its text pieces, (arrival, gap) per token after
    the first, and its error.
    """
    body = json.dumps(
        {
            "model": "chaos",
            "prompt": prompt,
            "max_tokens": PROBE_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
    )
    cmd = in_ns(
        server,
        [
            "curl",
            "-sN",
            "--max-time",
            "120",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            "http://127.0.0.1:8000/v1/completions",
        ],
    )
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    pieces, gaps, last, err = [], [], None, ""
    assert p.stdout
    for line in p.stdout:
        if not line.startswith("data: ") or line.startswith("data: [DONE]"):
            continue
        ev = json.loads(line[6:])
        if "error" in ev:
            err = json.dumps(ev["error"])
            continue
        now = time.monotonic()
        if last is not None:
            gaps.append((now, now - last))
        last = now
        pieces.append(ev["choices"][0]["text"])
    p.wait()
    ok = not err and len(pieces) == PROBE_TOKENS
    return ok, pieces, gaps, err or ("" if ok else f"{len(pieces)} pieces")


def knee(server: Server, bin_dir: Path, out: Path) -> float:
    """Requests per second at saturation (everything at once)."""
    doc = loadgen(
        server, bin_dir, out / "knee.json", ["--num-prompts", "48", "--max-concurrency", "32"]
    )
    return float(doc["request_throughput"])


def loadgen(server: Server, bin_dir: Path, path: Path, extra: list[str]) -> dict:
    """Runs moe-loadgen against the server; its JSON summary."""
    cmd = in_ns(
        server,
        [
            str(bin_dir / "moe-loadgen"),
            "--url",
            "http://127.0.0.1:8000",
            "--len-scale",
            "0.25",
            "--input-len-median",
            "256",
            "--output-len-median",
            "256",
            "--json",
            str(path),
            *extra,
        ],
    )
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    if not path.exists():
        die(f"moe-loadgen wrote no {path}")
    return json.loads(path.read_text())


def pct(xs: list[float], q: float) -> float:
    """The `q` quantile of `xs` (nearest rank)."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    """The campaign: start, measure the knee, load, strike, report."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--duration", type=float, default=300)
    ap.add_argument("--every", type=float, default=20)
    ap.add_argument("--mode", choices=["shm", "netns"], default="shm")
    ap.add_argument("--out")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    bin_dir = Path(args.bin)
    for b in ("moe-init", "moe-serve", "moe-loadgen"):
        if not (bin_dir / b).exists():
            die(f"{bin_dir / b} is missing")
    out = Path(args.out or tempfile.mkdtemp(prefix="chaos-serve-"))
    out.mkdir(parents=True, exist_ok=True)
    model = out / "mixtral-mini"
    if not model.exists():
        subprocess.run(
            [
                str(bin_dir / "moe-init"),
                "--config",
                "mixtral-mini",
                "--seed",
                "1",
                "--out",
                str(model),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    net = Net() if args.mode == "netns" else None
    server = None
    try:
        server = Server(args, model, net)
        reference = []
        for p in PROBE_PROMPTS:
            ok, pieces, _, err = probe_once(server, p)
            if not ok:
                die(f"the undisturbed probe failed: {err}")
            reference.append(pieces)
        rate = 0.7 * knee(server, bin_dir, out)
        print(
            f"== {args.mode}: knee measured; load at {rate:.2f} req/s for {args.duration:.0f} s, "
            f"a fault every {args.every:.0f} s"
        )
        t_start = time.monotonic()
        t_end = t_start + args.duration
        n = max(8, int(rate * args.duration))
        load_out: dict = {}
        load = threading.Thread(
            target=lambda: load_out.update(
                loadgen(
                    server,
                    bin_dir,
                    out / "load.json",
                    ["--num-prompts", str(n), "--request-rate", f"{rate:.3f}", "--seed", "3"],
                )
            )
        )
        load.start()
        probes: list[tuple[bool, bool, str]] = []
        gaps: list[tuple[float, float]] = []

        def probing() -> None:
            i = 0
            while time.monotonic() < t_end:
                k = i % len(PROBE_PROMPTS)
                ok, pieces, g, err = probe_once(server, PROBE_PROMPTS[k])
                probes.append((ok, pieces == reference[k], err))
                gaps.extend(g)
                i += 1

        prober = threading.Thread(target=probing)
        prober.start()
        rng = random.Random(args.seed)
        faults: list[tuple[float, str, int]] = []
        while True:
            time.sleep(args.every)
            if time.monotonic() > t_end - 5:
                break
            pids = server.workers()
            if not pids:
                die("no live worker to strike")
            pid = rng.choice(pids)
            kind = "SIGSTOP" if len(faults) % 4 == 3 else "SIGKILL"
            os.kill(pid, signal.SIGSTOP if kind == "SIGSTOP" else signal.SIGKILL)
            faults.append((time.monotonic(), kind, pid))
            if kind == "SIGSTOP":
                threading.Timer(10, lambda p=pid: _cont(p)).start()
        prober.join()
        load.join()
        if not load_out:
            die("moe-loadgen gave no result")
        # Recovery times: each fault to the next "serving again" line.
        again = [
            (t, float(m.group(1)))
            for t, text in server.log
            if (m := re.search(r"serving again ([0-9.]+) s after the loss", text))
        ]
        # By kind, and by how the place was filled: a standby took over
        # (the server logs it) or a new process started.
        rec: dict[str, list[float]] = {}
        windows = []
        for t, kind, _ in faults:
            after = [x for x in again if x[0] >= t]
            if after:
                standby = any(
                    t <= ts <= after[0][0] and "takes over" in text for ts, text in server.log
                )
                how = f"{kind}, {'standby' if standby else 'process start'}"
                rec.setdefault(how, []).append(after[0][1])
                windows.append((t, after[0][0]))
        if not any(rec.values()):
            die(f"no recovery was logged; the server's last lines: {server.log[-10:]}")
        inside = [g for ts, g in gaps if any(a <= ts <= b + 0.5 for a, b in windows)]
        outside = [g for ts, g in gaps if not any(a <= ts <= b + 0.5 for a, b in windows)]
        summary = {
            "mode": args.mode,
            "duration_s": args.duration,
            "rate_rps": rate,
            "faults": {
                "SIGKILL": sum(1 for f in faults if f[1] == "SIGKILL"),
                "SIGSTOP": sum(1 for f in faults if f[1] == "SIGSTOP"),
            },
            "load_ok": load_out.get("completed"),
            "load_failed": load_out.get("failed"),
            "load_errors": load_out.get("errors", [])[:3],
            "probe_ok": sum(1 for p in probes if p[0]),
            "probe_failed": sum(1 for p in probes if not p[0]),
            "probe_identical": sum(1 for p in probes if p[0] and p[1]),
            "probe_differing": sum(1 for p in probes if p[0] and not p[1]),
            "probe_errors": [p[2] for p in probes if not p[0]][:3],
            "recovery_s": {
                k: {"n": len(v), "p50": pct(v, 0.5), "max": max(v) if v else float("nan")}
                for k, v in rec.items()
            },
            "itl_p99_ms_inside_recovery": 1e3 * pct(inside, 0.99),
            "itl_p99_ms_outside_recovery": 1e3 * pct(outside, 0.99),
            "itl_p50_ms_outside_recovery": 1e3 * pct(outside, 0.5),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        (out / "server.log").write_text(
            "".join(f"{t - t_start:9.3f} {text}\n" for t, text in server.log)
        )
        print(json.dumps(summary, indent=2))
        print(f"== written to {out}/summary.json")
        bad = summary["load_failed"] or summary["probe_failed"] or summary["probe_differing"]
        if bad:
            sys.exit(1)
    finally:
        if server:
            server.close()
        if net:
            net.close()


def _cont(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


if __name__ == "__main__":
    main()
