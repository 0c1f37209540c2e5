"""The transports that the parametrized tests run over, by their fixture names."""

from __future__ import annotations

from typing import Any

#: A transport's name, or ``fabric:PROVIDER`` for the fabric transport over
#: one libfabric provider (``shm`` runs on any host, in threads of one
#: process as between processes).
NAMES = ["shm", "tcp", "fabric:shm"]


def config(name: str) -> dict[str, Any]:
    """The communicator settings that select transport `name`."""
    kind, _, provider = name.partition(":")
    return {"transport": kind, **({"fi_provider": provider} if provider else {})}
