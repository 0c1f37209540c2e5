"""Groups formed by the launchers users run: torchrun, torch.distributed, mpiexec."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HERE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(cmd: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=240, env={**os.environ, **env}
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    return out


@pytest.mark.parametrize("attention", [2, 3])
def test_torchrun_forms_the_group(attention: int) -> None:
    n = 4 if attention == 2 else 5
    out = launch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(n),
            "--master-port",
            str(free_port()),
            str(HERE / "launch_app.py"),
            "torchrun",
        ],
        {"M2N_ATTENTION": str(attention), "OMP_NUM_THREADS": "1"},
    )
    shape = f"{attention}x{n - attention}"
    for a in range(attention):
        assert f"attention {a} of {shape}: 8 rounds checked" in out, out
    for e in range(n - attention):
        assert f"expert {e} of {shape}: 8 rounds checked" in out, out


def test_initialised_torch_distributed_group() -> None:
    out = launch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            str(HERE / "launch_app.py"),
            "torch-dist",
        ],
        {"OMP_NUM_THREADS": "1"},
    )
    assert "torch-dist: attention 0 of 1x1" in out and "torch-dist: expert 0 of 1x1" in out, out


@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec (MPICH) is not installed")
def test_mpiexec_with_a_unique_id() -> None:
    uid = subprocess.run(
        [sys.executable, "-m", "m2n", "unique-id", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    out = launch(
        ["mpiexec", "-n", "3", sys.executable, str(HERE / "launch_app.py"), "env"],
        {"M2N_UNIQUE_ID": uid, "M2N_ATTENTION": "1", "OMP_NUM_THREADS": "1"},
    )
    assert "env: attention 0 of 1x2" in out and "env: expert 1 of 1x2" in out, out


def test_the_readme_example_under_torchrun(tmp_path: Path) -> None:
    """The README's torchrun example, as written there, on 4 ranks."""
    readme = (HERE.parent.parent / "README.md").read_text()
    start = readme.index("comm = m2n.init_from_torch(attention=2")
    begin = readme.rindex("```python\n", 0, start) + len("```python\n")
    app = tmp_path / "app.py"
    done = 'print(f"done {comm.role}", flush=True)\n'
    app.write_text(readme[begin : readme.index("```", start)] + done)
    out = launch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "4",
            "--master-port",
            str(free_port()),
            str(app),
        ],
        {"OMP_NUM_THREADS": "1"},
    )
    assert out.count("done attention") == 2 and out.count("done expert") == 2, out
