"""m2n.afd: the connector for vLLM's AFD plugin, driven through the plugin's contract.

Without vLLM or the plugin installed (the connector is duck-typed): ranks in
processes (afd_ranks.py) and in threads, misuse refused by name, and, when a
copy of the plugin's sources is at hand, its factory and types.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import afd_ranks
import pytest
import torch

import m2n
import m2n.afd as afd

HERE = Path(__file__).resolve().parent
torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_threads(targets: list[Callable[[], Any]], timeout: float = 30.0) -> list[Any]:
    """Run each target in a thread; re-raise the first failure; fail if one hangs."""
    results: list[Any] = [None] * len(targets)

    def wrap(i: int) -> None:
        try:
            results[i] = targets[i]()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            results[i] = e

    threads = [threading.Thread(target=wrap, args=(i,), daemon=True) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    stuck = [i for i, t in enumerate(threads) if t.is_alive()]
    assert not stuck, f"targets {stuck} did not finish within {timeout} s"
    failures = [r for r in results if isinstance(r, BaseException)]
    # A failed check first: the peers of a rank that failed see it as lost.
    failures.sort(key=lambda e: isinstance(e, m2n.PeerLost))
    if failures:
        raise failures[0]
    return results


def afd_config(role: str, port: int, m: int = 1, n: int = 1, **extra: Any) -> SimpleNamespace:
    cfg = {"transport": "shm", "slot_bytes": "64K", "timeout": 5, **extra}
    return SimpleNamespace(
        role=role,
        host="127.0.0.1",
        port=port,
        num_attention_ranks=m,
        num_ffn_ranks=n,
        connector_extra_config=cfg,
    )


def connected_pair(**extra: Any) -> tuple[afd.M2NAFDConnector, afd.M2NAFDConnector]:
    """A 1 x 1 group in this process: (attention, FFN), both initialised."""
    port = free_port()
    a = afd.M2NAFDConnector(0, 0, None, afd_config("attention", port, **extra), 0)
    f = afd.M2NAFDConnector(0, 0, None, afd_config("ffn", port, **extra), 0)
    run_threads([a.init_afd_connector, f.init_afd_connector])
    return a, f


def ctx(layer: int, ub: int, seq: list[int]) -> afd.AFDTransferContext:
    return afd.AFDTransferContext(afd.AFDTransferMetadata(layer, ub, seq))


def refused(exc: type[BaseException], *words: str) -> Any:
    """pytest.raises that also checks every word is in the message."""

    class Check:
        def __enter__(self) -> None:
            self.cm = pytest.raises(exc)
            self.info = self.cm.__enter__()

        def __exit__(self, *a: Any) -> bool:
            handled = self.cm.__exit__(*a)
            msg = str(self.info.value)
            for w in words:
                assert w in msg, f"{w!r} not in {msg!r}"
            return bool(handled)

    return Check()


# ---------------------------------------------------------------------------
# The contract, end to end
# ---------------------------------------------------------------------------


def test_two_attention_processes_one_ffn_process_over_tcp() -> None:
    """2 x 1 in three processes: the FFN rank concatenates both peers and splits back."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [("ffn", 0), ("attention", 0), ("attention", 1)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "afd_ranks.py"), role, str(r), "2", "1", str(port), "tcp"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for role, r in ranks
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=60)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    report = "\n".join(f"--- {rk}:\n{o}" for rk, o in zip(ranks, outs))
    assert [p.returncode for p in procs] == [0, 0, 0], report
    assert "ffn 0: 15 micro-batches checked" in outs[0], report
    assert "attention 0: 15 results checked" in outs[1], report
    assert "attention 1: 15 results checked" in outs[2], report


@pytest.mark.parametrize("shape", [(1, 1), (2, 2)])
def test_contract_in_threads(shape: tuple[int, int]) -> None:
    """1 x 1 and 2 x 2 over shm, every rank a thread of this process."""
    m, n = shape
    port = free_port()
    targets: list[Callable[[], Any]] = [
        lambda r=r: afd_ranks.ffn_rank(r, m, n, port, "shm")  # type: ignore[misc]
        for r in range(n)
    ] + [
        lambda r=r: afd_ranks.attention_rank(r, m, n, port, "shm")  # type: ignore[misc]
        for r in range(m)
    ]
    run_threads(targets, timeout=60)


# ---------------------------------------------------------------------------
# Misuse
# ---------------------------------------------------------------------------


def test_use_before_init_is_refused() -> None:
    port = free_port()
    a = afd.M2NAFDConnector(0, 0, None, afd_config("attention", port), 0)
    f = afd.M2NAFDConnector(0, 0, None, afd_config("ffn", port), 0)
    assert not a.is_initialized
    h = torch.zeros(2, 4)
    with refused(afd.AFDUsageError, "send_attn_output", "init_afd_connector"):
        a.send_attn_output(h, ctx(0, 0, [2]))
    with refused(RuntimeError, "recv_ffn_output", "init_afd_connector"):
        a.recv_ffn_output(h, ubatch_idx=0)
    with refused(m2n.UsageError, "recv_attn_output", "init_afd_connector"):
        f.recv_attn_output(ubatch_idx=0)
    with refused(afd.AFDUsageError, "send_ffn_output", "init_afd_connector"):
        f.send_ffn_output(h, ctx(0, 0, [2]))
    assert f.control_plane is not None
    with refused(afd.AFDUsageError, "recv_dp_metadata_list", "init_afd_connector"):
        f.control_plane.recv_dp_metadata_list()
    a.close()  # closing an unused connector is fine, twice too
    a.close()
    with refused(afd.AFDUsageError, "closed"):
        a.init_afd_connector()


def test_bad_configuration_is_refused_by_name() -> None:
    port = free_port()
    with refused(ValueError, "frobnicate", "connector_extra_config"):
        afd.M2NAFDConnector(0, 0, None, afd_config("attention", port, frobnicate=1), 0)
    with refused(m2n.InvalidArgument, "slot_bytes"):
        afd.M2NAFDConnector(0, 0, None, afd_config("attention", port, slot_bytes="lots"), 0)
    with refused(ValueError, "depth"):
        afd.M2NAFDConnector(0, 0, None, afd_config("attention", port, depth=1), 0)
    with refused(ValueError, "secret", "32 hex"):
        afd.M2NAFDConnector(0, 0, None, afd_config("attention", port, secret="xyz"), 0)
    with refused(ValueError, "num_attention_ranks=1", "multiple of num_ffn_ranks=2"):
        afd.M2NAFDConnector(0, 0, None, afd_config("attention", port, m=1, n=2), 0)
    with refused(ValueError, "role_rank=2", "0..1"):
        afd.M2NAFDConnector(0, 0, None, afd_config("attention", port, m=2, n=1), 2)
    with refused(ValueError, "role", "'decode'"):
        afd.M2NAFDConnector(0, 0, None, afd_config("decode", port), 0)
    with refused(ValueError, "'num_attention_ranks'"):
        afd.M2NAFDConnector(0, 0, None, SimpleNamespace(role="ffn"), 0)
    with refused(ValueError, "m2n", "depth"):
        afd.M2NAFDConnector(0, 0, None, afd_config("ffn", port, m2n={"M2N_DEPTH": 8}), 0)
    # The extra config is also found where the plugin keeps it.
    vllm_config = SimpleNamespace(
        additional_config={"afd": {"connector_extra_config": {"num_ubatches": 3}}}
    )
    plain = SimpleNamespace(role="ffn", host="127.0.0.1", port=port)
    plain.num_attention_ranks = plain.num_ffn_ranks = 1
    c = afd.M2NAFDConnector(0, 0, vllm_config, plain, 0)
    assert c.extra_info.num_ubatches == 3
    assert afd.M2NAFDConnector.parse_extra_config(None) == afd.M2NConnectorConfig()


def test_wrong_ubatch_and_shapes_are_refused_and_nothing_is_lost() -> None:
    a, f = connected_pair()
    try:
        h0, h1 = torch.randn(3, 8), torch.randn(5, 8)
        with refused(ValueError, "hidden_states has 4 rows", "[3]", "sum to 3"):
            a.send_attn_output(torch.randn(4, 8), ctx(0, 0, [3]))
        with refused(ValueError, "hidden_states has 3 rows", "sum to 4"):
            a.send_attn_output(h0, ctx(0, 0, [3, 1]))
        with refused(ValueError, "router_logits has 2 rows"):
            a.send_attn_output(h0, ctx(0, 0, [3]), router_logits=torch.zeros(2, 4))
        with refused(ValueError, "topk_ids and topk_weights go together"):
            a.send_attn_output(h0, ctx(0, 0, [3]), topk_ids=torch.zeros(3, 2))
        with refused(m2n.InvalidArgument, "ubatch_idx 2", "0..1", "num_ubatches"):
            a.send_attn_output(h0, ctx(0, 2, [3]))
        with refused(afd.AFDUsageError, "nothing is in flight"):
            a.recv_ffn_output(h0, ubatch_idx=0)

        a.send_attn_output(h0, ctx(0, 0, [3]))
        with refused(afd.AFDUsageError, "ubatch 0 already has layer 0 in flight"):
            a.send_attn_output(h0, ctx(1, 0, [3]))
        a.send_attn_output(h1, ctx(0, 1, [5]))

        # The FFN side: ubatch 1 asked for while ubatch 0 is next; kept, not lost.
        with refused(afd.AFDUsageError, "ubatch_idx=1", "next micro-batch", "is ubatch 0"):
            f.recv_attn_output(ubatch_idx=1)
        with refused(ValueError, "ubatch_idx 7 is outside 0..1"):
            f.recv_attn_output(ubatch_idx=7)
        spec = afd.AFDExpertRoutingSpec(4, torch.float32)
        with refused(m2n.InvalidArgument, "routing_spec", "router_logits", "sent none"):
            f.recv_attn_output(ubatch_idx=0, routing_spec=spec)
        p0 = f.recv_attn_output(ubatch_idx=0)
        assert torch.equal(p0.hidden_states, h0)
        with refused(afd.AFDUsageError, "ubatch 0 was received and not answered"):
            f.recv_attn_output(ubatch_idx=0)
        p1 = f.recv_attn_output(ubatch_idx=1)
        assert torch.equal(p1.hidden_states, h1)
        assert (p1.context.metadata.layer_idx, p1.context.metadata.stage_idx) == (0, 1)
        with refused(afd.AFDUsageError, "ubatch 1 answered before ubatch 0"):
            f.send_ffn_output(p1.hidden_states * 2, p1.context)
        with refused(ValueError, "ffn_output has 2 rows", "brought 3 tokens"):
            f.send_ffn_output(torch.zeros(2, 8), p0.context)
        with refused(ValueError, "shared_output shape (3, 7)"):
            f.send_ffn_output(p0.hidden_states, p0.context, shared_output=torch.zeros(3, 7))
        with refused(ValueError, "ubatch_idx=1 but the context is ubatch 0"):
            f.send_ffn_output(p0.hidden_states, p0.context, ubatch_idx=1)
        f.send_ffn_output(p0.hidden_states * 2, p0.context)
        f.send_ffn_output(p1.hidden_states * 3, p1.context)

        # The attention side: results come back in the order sent.
        with refused(afd.AFDUsageError, "recv_ffn_output(ubatch_idx=1)", "is ubatch 0"):
            a.recv_ffn_output(torch.empty(5, 8), ubatch_idx=1)
        with refused(ValueError, "ref_tensor has shape (4, 8)", "needs (3, 8)"):
            a.recv_ffn_output(torch.empty(4, 8), ubatch_idx=0)
        with refused(ValueError, "ref_tensor is torch.float16"):
            a.recv_ffn_output(torch.empty(3, 8, dtype=torch.float16), ubatch_idx=0)
        r0 = a.recv_ffn_output(torch.empty(3, 8), ubatch_idx=0)
        r1 = a.recv_ffn_output(torch.empty(5, 8), ubatch_idx=1)
        assert torch.equal(r0, h0 * 2) and torch.equal(r1, h1 * 3)

        # A message bigger than the slot names the knob and the size it needs.
        with refused(
            ValueError, "more than the 65536-byte slot", "connector_extra_config.slot_bytes"
        ):
            a.send_attn_output(torch.zeros(1000, 32), ctx(1, 0, [1000]))

        # The control plane and data in the wrong order.
        assert a.control_plane is not None and f.control_plane is not None
        payload = afd.AFDControlPayload({0: afd.AFDDPMetadata(torch.tensor([3]))}, False, False)
        with refused(ValueError, "stage 5", "num_ubatches"):
            a.control_plane.update_state_from_dp_metadata(
                afd.AFDControlPayload({5: afd.AFDDPMetadata(torch.tensor([3]))}, False, False)
            )
        a.control_plane.update_state_from_dp_metadata(payload)
        a.control_plane.send_dp_metadata_list(payload)
        with refused(ValueError, "ubatch_idx 1 is not a stage of this step's DP metadata"):
            a.send_attn_output(h1, ctx(1, 1, [5]))
        a.send_attn_output(h0, ctx(1, 0, [3]))
        with refused(afd.AFDUsageError, "DP metadata of a new step", "recv_dp_metadata_list"):
            f.recv_attn_output(ubatch_idx=0)
        got = f.control_plane.recv_dp_metadata_list()
        assert got.dp_metadata_list[0].num_tokens_across_dp_cpu.tolist() == [3]
        with refused(afd.AFDUsageError, "is data (layer 1, ubatch 0)", "recv_attn_output"):
            f.control_plane.recv_dp_metadata_list()
        p = f.recv_attn_output(ubatch_idx=0, layer_idx=1)
        f.send_ffn_output(
            afd.AFDF2ATransferPayload(p.hidden_states, p.hidden_states + 1), p.context
        )
        payload2 = a.recv_ffn_payload(ubatch_idx=0)
        assert torch.equal(payload2.routed_output, h0)
        assert payload2.shared_output is not None
        assert torch.equal(payload2.shared_output, h0 + 1)
    finally:
        a.close()
        f.close()
    assert not a.is_initialized and not f.is_initialized
    with refused(afd.AFDUsageError, "was closed"):
        a.send_attn_output(torch.zeros(1, 8), ctx(0, 0, [1]))


def test_close_from_another_thread_ends_a_blocked_receive() -> None:
    """The plugin's FFN loop blocks in recv_dp_metadata_list; shutdown closes from elsewhere."""
    a, f = connected_pair(timeout=30)
    assert f.control_plane is not None
    cp = f.control_plane
    seen: list[BaseException] = []

    def loop() -> None:
        try:
            cp.recv_dp_metadata_list()
        except BaseException as e:  # noqa: BLE001 - checked below
            seen.append(e)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    t.join(0.3)
    assert t.is_alive()
    f.close()
    t.join(5)
    assert not t.is_alive(), "the blocked receive did not end on close()"
    assert len(seen) == 1 and isinstance(seen[0], afd.AFDUsageError), seen
    assert "closed while waiting" in str(seen[0])
    a.close()


def test_timeout_names_the_knob() -> None:
    a, f = connected_pair(timeout=0.3)
    try:
        with refused(m2n.Timeout, "connector_extra_config.timeout"):
            f.recv_attn_output(ubatch_idx=0)
    finally:
        a.close()
        f.close()


# ---------------------------------------------------------------------------
# The plugin
# ---------------------------------------------------------------------------


def test_register_without_the_plugin_names_what_is_missing() -> None:
    if afd.PLUGIN_AVAILABLE:
        pytest.skip("the plugin is installed here")
    with refused(ImportError, "afd_plugin", "register"):
        afd.register()
    # Without the plugin, the local types carry the plugin's fields and checks.
    md = afd.AFDTransferMetadata.create_ffn_metadata(layer_idx=1, stage_idx=0, seq_lens=[2, 3])
    assert md.total_tokens == 5 and md.validate_tensor_shape((5, 8))
    with refused(ValueError, "positive"):
        afd.AFDTransferMetadata(0, 0, [2, 0])


PLUGIN_MIRROR = Path(os.environ.get("AFD_PLUGIN_GIT", "/work/.mirror/vllm-project+afd-plugin/repo"))

PLUGIN_CHECK = r"""
import sys, types, torch
vllm = types.ModuleType("vllm"); fc = types.ModuleType("vllm.forward_context")
class DPMetadata: pass
fc.DPMetadata = DPMetadata; vllm.forward_context = fc
sys.modules.update({"vllm": vllm, "vllm.forward_context": fc})
import m2n.afd as afd
from afd_plugin.connectors import AFDConnectorBase, AFDConnectorFactory, metadata
from afd_plugin.config import parse_afd_config
assert afd.PLUGIN_AVAILABLE and afd.AFDTransferMetadata is metadata.AFDTransferMetadata
assert issubclass(afd.M2NAFDConnector, AFDConnectorBase)
afd.register()
par = types.SimpleNamespace(data_parallel_size=1, prefill_context_parallel_size=1,
                            tensor_parallel_size=1, data_parallel_rank=0)
def cfg(role):
    afd_raw = {"connector": "M2NAFDConnector", "role": role, "host": "127.0.0.1",
               "port": int(sys.argv[1]), "connector_extra_config": {"transport": "shm"}}
    return types.SimpleNamespace(additional_config={"afd": afd_raw}, parallel_config=par)
conns = [AFDConnectorFactory.create_connector(0, 0, cfg(r), parse_afd_config(cfg(r)))
         for r in ("attention", "ffn")]
a, f = conns
assert type(a) is afd.M2NAFDConnector and a.extra_info.transport == "shm"
import threading
t = threading.Thread(target=f.init_afd_connector); t.start(); a.init_afd_connector(); t.join()
md = metadata.AFDTransferMetadata.create_attention_metadata(layer_idx=2, stage_idx=0, seq_len=3)
h = torch.randn(3, 8)
a.send_attn_output(h, metadata.AFDTransferContext(md), router_logits=torch.ones(3, 4))
p = f.recv_attn_output(ubatch_idx=0, routing_spec=metadata.AFDExpertRoutingSpec(4, torch.float32))
assert type(p) is metadata.AFDA2FTransferPayload
assert isinstance(p.context.states, metadata.AFDTransferState)
f.send_ffn_output(p.hidden_states * 3, p.context)
assert torch.equal(a.recv_ffn_output(torch.empty(3, 8)), h * 3)
a.close(); f.close()
print("plugin ok")
"""


@pytest.mark.skipif(
    not (PLUGIN_MIRROR / "HEAD").exists(), reason="no copy of the afd-plugin sources"
)
def test_with_the_plugins_own_factory_and_types(tmp_path: Path) -> None:
    """The plugin's sources (a git mirror) with a stub vllm.forward_context: factory, types."""
    tree = subprocess.run(
        ["git", "-C", str(PLUGIN_MIRROR), "archive", "HEAD", "afd_plugin/config.py",
         "afd_plugin/config_utils.py", "afd_plugin/connectors/__init__.py",
         "afd_plugin/connectors/base.py", "afd_plugin/connectors/metadata.py",
         "afd_plugin/connectors/factory.py", "afd_plugin/distributed/__init__.py",
         "afd_plugin/distributed/topology.py"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=tree, check=True)
    (tmp_path / "afd_plugin" / "__init__.py").write_text("")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", PLUGIN_CHECK, str(free_port())],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0 and "plugin ok" in out.stdout, out.stdout + out.stderr
