"""`Channel.set_stream_mode` / `stream_mode` where no CUDA stream exists.

On a 1 x 1 group over shm: every side starts in `STREAM_SEQUENCE`; an
unknown mode or channel is `InvalidArgument` naming it (before any stream
is looked at, through the wrapper and the extension alike); a good mode
without a CUDA driver or GPU is `StreamError` saying what is missing and
leaves the mode as it was; the direct API still moves rounds afterwards,
every byte checked. (The graph-safe replay: test_gpu.py on a GPU machine.)
"""

from __future__ import annotations

import pytest
import torch
from conftest import run_group

import m2n

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")


def test_modes_are_named_constants() -> None:
    assert m2n.STREAM_SEQUENCE == "sequence"
    assert m2n.STREAM_GRAPH_SAFE == "graph-safe"
    assert {"STREAM_SEQUENCE", "STREAM_GRAPH_SAFE"} <= set(m2n.__all__)
    doc = m2n.Channel.set_stream_mode.__doc__ or ""
    for said in ("before the capture", "whole ring cycle", "depth 1", "direct API"):
        assert said in doc, said


def test_bad_mode_and_channel_are_named() -> None:
    def body(comm: m2n.Communicator) -> None:
        for ch in (comm.dispatch, comm.combine):
            assert ch.stream_mode == m2n.STREAM_SEQUENCE
            with pytest.raises(
                m2n.InvalidArgument, match="'graph' is not 'sequence' or 'graph-safe'"
            ):
                ch.set_stream_mode("graph", 0)
            with pytest.raises(m2n.InvalidArgument, match="'GRAPH-SAFE'"):
                ch.set_stream_mode("GRAPH-SAFE")
            with pytest.raises(m2n.InvalidArgument, match="not a CUDA stream"):
                ch.set_stream_mode(m2n.STREAM_GRAPH_SAFE, "stream")
        # The extension checks too, before the stream.
        with pytest.raises(m2n.InvalidArgument, match='"bogus" is not "sequence" or "graph-safe"'):
            comm._c.set_stream_mode(0, "bogus", 0)
        with pytest.raises(m2n.InvalidArgument, match="channel 7"):
            comm._c.set_stream_mode(7, m2n.STREAM_GRAPH_SAFE, 0)
        with pytest.raises(m2n.InvalidArgument, match="channel 9"):
            comm._c.stream_mode(9)

    run_group((1, 1), body)


@no_cuda
def test_graph_safe_without_cuda_is_a_stream_error_and_changes_nothing() -> None:
    def body(comm: m2n.Communicator) -> None:
        for ch in (comm.dispatch, comm.combine):
            for mode in (m2n.STREAM_GRAPH_SAFE, m2n.STREAM_SEQUENCE):
                with pytest.raises(m2n.StreamError, match="CUDA"):
                    ch.set_stream_mode(mode, 0)
                with pytest.raises(m2n.StreamError, match="no CUDA device"):
                    ch.set_stream_mode(mode)  # torch's current stream: none
            assert ch.stream_mode == m2n.STREAM_SEQUENCE
        # Still the direct API: a round each way, every byte checked.
        buf, view = comm.alloc(256)
        for k in range(3):
            if comm.role == m2n.ATTENTION:
                view[:] = bytes((k * 7 + i) % 251 for i in range(256))
                comm.dispatch.wait_sent(comm.dispatch.send([buf]), timeout=10)
                with comm.combine.recv(timeout=10) as rnd:
                    assert rnd.bytes(0) == bytes(255 - (k * 7 + i) % 251 for i in range(256))
            else:
                with comm.dispatch.recv(timeout=10) as rnd:
                    got = rnd.bytes(0)
                assert got == bytes((k * 7 + i) % 251 for i in range(256))
                view[:] = bytes(255 - b for b in got)
                comm.combine.wait_sent(comm.combine.send([buf]), timeout=10)

    run_group((1, 1), body, config={"slot_bytes": 256, "depth": 1})
