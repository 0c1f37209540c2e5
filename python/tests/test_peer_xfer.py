"""The pure parts of python/benchmarks/peer_xfer.py (no NIXL, no Mooncake needed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peer_xfer as px  # noqa: E402


def test_sizes_and_ladder():
    assert px.parse_sizes("64K 256K,1M") == [64 << 10, 256 << 10, 1 << 20]
    assert px.size_name(256 << 10) == "256K" and px.size_name(1000) == "1000"
    assert px.ladder([64 << 10, 256 << 10, 1 << 20]) == (64 << 10, 1 << 20)
    with pytest.raises(ValueError, match="16K"):
        px.ladder([4 << 10, 64 << 10])  # m2n_perf -f 4 would also measure 16K
    with pytest.raises(ValueError):
        px.parse_size("0")


def test_round_keys_and_seeds_tell_messages_apart():
    # consecutive rounds of one stream never share a key; nor do the streams of one round
    for src, dst in ((0, 2), (1, 3), (3, 0)):
        keys = [px.round_key(r, src, dst) for r in range(256)]
        assert len(set(keys)) == 256
    seeds = {
        px.pattern_seed(n, d, s, t)
        for n in (4096, 65536)
        for d in (px.DISPATCH, px.COMBINE)
        for s in range(6)
        for t in range(6)
    }
    assert len(seeds) == 2 * 2 * 6 * 6


def test_pattern_checks_catch_stale_and_misplaced_bytes():
    n = 4096
    pat = px.Pattern(np, n, px.DISPATCH, 0, 2)
    buf = np.zeros(2 * n, dtype=np.uint8)
    view = memoryview(buf).cast("B")
    pat.fill(buf[n:], 7)
    assert pat.wrong_bytes(buf[n:], 7) == 0
    assert pat.wrong_bytes(buf[n:], 8) == n  # another round's key changes every byte
    assert pat.stamp_ok(view, n, 7) and not pat.stamp_ok(view, n, 8)
    pat.stamp(view, n, 8)  # a timed round writes only the head and tail
    assert pat.stamp_ok(view, n, 8)
    buf[n + n // 2] ^= 1
    assert pat.wrong_bytes(buf[n:], 7) > 0
    other = px.Pattern(np, n, px.DISPATCH, 1, 2)  # another source's message in this slot
    assert other.wrong_bytes(buf[n:], 7) > n // 2
    assert not other.stamp_ok(view, n, 8)


def test_statistics_as_m2n_perf():
    # per iteration the maximum over ranks, then nearest-rank percentiles
    times = px.iteration_times([[1.0, 5.0, 3.0], [2.0, 4.0, 9.0]])
    assert times == [2.0, 5.0, 9.0]
    with pytest.raises(ValueError):
        px.iteration_times([[1.0], [1.0, 2.0]])
    xs = [float(i) for i in range(1, 101)]
    assert px.percentile(xs, 0.5) == 50.0 and px.percentile(xs, 0.99) == 99.0
    s = px.summary([10.0, 10.0, 40.0], m=4, n=2, nbytes=1 << 20)
    # m2n_perf roundtrip: busbw = 2 x max(M, N) x size / mean; algbw = 2 x M x N x size / mean
    assert s["mean_us"] == 20.0
    assert s["busbw_gbps"] == pytest.approx(2 * 4 * (1 << 20) / 20e-6 / 1e9)
    assert s["algbw_gbps"] == pytest.approx(2 * 8 * (1 << 20) / 20e-6 / 1e9)
    assert px.auto_spins(6, 2) == 0 and px.auto_spins(2, 2) == 256


def _m2n_doc(sizes):
    return {
        "rows": [
            {
                "bytes": n,
                "m2n": {
                    "busbw_gbps": 4.0,
                    "wrong": 0,
                    "stats": {"p50_us": 10.0, "p99_us": 20.0},
                },
            }
            for n in sizes
        ]
    }


def _peer_doc(sizes, p50=50.0):
    return {
        "rows": [
            {"bytes": n, "p50_us": p50, "p99_us": 100.0, "busbw_gbps": 1.0, "wrong": 0}
            for n in sizes
        ]
    }


def _table(tmp_path, capsys):
    sys_argv = sys.argv
    sys.argv = ["peer_xfer.py", "table", "--out", str(tmp_path), "--sizes", "64K"]
    sys.argv += ["--shapes", "1x1", "--transports", "shm tcp"]
    try:
        rc = px.main()
    finally:
        sys.argv = sys_argv
    return rc, capsys.readouterr()


def test_table_fails_loudly_on_a_missing_figure(tmp_path, capsys):
    sizes = [64 << 10]
    for t in ("shm", "tcp"):
        (tmp_path / f"m2n-{t}-1x1.json").write_text(json.dumps(_m2n_doc(sizes)))
        (tmp_path / f"nixl-{t}-1x1.json").write_text(json.dumps(_peer_doc(sizes)))
    # Mooncake over tcp missing
    rc, out = _table(tmp_path, capsys)
    assert rc == 1 and "MISSING FIGURES: Mooncake tcp-1x1 64K" in out.err
    (tmp_path / "mooncake-tcp-1x1.json").write_text(json.dumps(_peer_doc(sizes, p50=0.0)))
    rc, out = _table(tmp_path, capsys)
    assert rc == 1 and "p50_us=0.0" in out.err  # a zero is missing, not a figure
    (tmp_path / "mooncake-tcp-1x1.json").write_text(json.dumps(_peer_doc(sizes, p50=40.0)))
    rc, out = _table(tmp_path, capsys)
    assert rc == 0, out.err
    summary = json.loads((tmp_path / "summary.json").read_text())
    tcp = [r for r in summary["rows"] if r["transport"] == "tcp"][0]
    assert tcp["p50_x"] == pytest.approx(4.0)  # the better peer: Mooncake's 40 us
    assert tcp["p99_x"] == pytest.approx(0.2) and tcp["busbw_x"] == pytest.approx(4.0)
    assert tcp["goal"] == "met" and summary["goal_met"] == 2
