"""One step off accelerate's FSDP2 path, on 2 gloo ranks (tests/offpath.py): a real Accelerator that runs DDP under the
FSDP variables, transformers' own DistributedConfig FSDP load, FSDP1 as accelerate builds it (and HSDP on two
simulated nodes), rank 0 loading for longer than the collective timeout, and ranks whose dtypes differ. "Upstream" is
the same process with the package reverted, so both runs share one launch."""

import os
import threading
import time

import pytest
from launch import require_accelerate_on_cpu
from packaging.version import Version

from hf_fsdp_loadfix._worker import free_port, launch

OFFPATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "offpath.py")


def _native_release() -> bool:
    import transformers

    return Version(transformers.__version__) >= Version("5.15")  # DistributedConfig(fsdp_size=N) shards from 5.15


def _stream_applies() -> bool:
    import accelerate.utils.fsdp_utils

    import hf_fsdp_loadfix

    return hf_fsdp_loadfix.status()["accelerate_stream"] == "applied"


def _ok(outputs):
    for rc, text in outputs:
        assert rc == 0, text[-4000:]


NATIVE = ["llama", "llama_tied", "root_buffer"]
FSDP1 = ["llama_tied", "deepseek_v3", "root_buffer"]
DDP = ["llama", "llama_tied"]


@pytest.fixture(scope="module")
def runs(checkpoints, tmp_path_factory):
    """One launch, every scenario in turn (native first: an Accelerator, once made, stays in the process)."""
    require_accelerate_on_cpu()
    scenarios = [("native", kind) for kind in NATIVE if _native_release()] + [("fsdp1", kind) for kind in FSDP1]
    scenarios += [("dtype", "llama")] if _stream_applies() else []
    scenarios += [("ddp", kind) for kind in DDP]
    args = [a for name, kind in scenarios for a in ("--scenario", name, kind, checkpoints(kind))]
    outputs, results = launch([OFFPATH, *args], tmp_path_factory.mktemp("offpath"), timeout=400)
    _ok(outputs)
    return [r["scenarios"] for r in results]


def _each(runs, key):
    return [r[key] for r in runs]


@pytest.mark.parametrize("kind", DDP)
def test_real_accelerator_running_ddp_under_the_fsdp_variables_trains_as_upstream(runs, kind):
    """Accelerator(cpu=True, fsdp_plugin=FSDP2 + cpu_ram_efficient_loading) runs DDP with the FSDP variables set: rank
    1's weights are on meta after from_pretrained; prepare fills them from rank 0 (the optimizer built before prepare
    trains them); 3 SGD steps give losses equal on both ranks and bitwise equal to upstream, and the same trained
    state and buffers. A forward before prepare on rank 1 is one clear error; status names the trap."""
    rank0, rank1 = _each(runs, f"ddp:{kind}")
    for r in (rank0, rank1):
        assert r["distributed_type"] == "MULTI_CPU"
        assert any(t.startswith("accelerate runs MULTI_CPU, not FSDP") for t in r["traps"]), r["traps"]
        for run in ("patched", "sharded"):  # sharded: every rank on meta, each reads the checkpoint at prepare
            assert r[run]["wrapper"] == r["upstream"]["wrapper"] == "DistributedDataParallel"
            assert r[run]["losses"] == r["upstream"]["losses"] == rank0["upstream"]["losses"]
            assert r[run]["state"] == r["upstream"]["state"] == rank0["upstream"]["state"]
            assert r[run]["buffers"] == r["upstream"]["buffers"]
        assert r["sharded"]["devices"] == ["meta"]
        assert r["upstream"]["forward_before_prepare"] == "ok"
    losses = rank0["patched"]["losses"]
    assert len(losses) == 3 and losses[2] < losses[0], losses
    assert rank0["patched"]["devices"] == ["cpu"] and rank1["patched"]["devices"] == ["meta"]
    assert rank0["patched"]["forward_before_prepare"] == "ok"
    assert rank1["patched"]["forward_before_prepare"].startswith(
        "RuntimeError: hf_fsdp_loadfix: this model was loaded under FSDP cpu-ram-efficient loading")
    assert "Prepare it first" in rank1["patched"]["forward_before_prepare"]


@pytest.mark.parametrize("kind", NATIVE)
def test_native_distributed_config_load_under_the_fsdp_variables(runs, kind):
    """transformers' own from_pretrained(distributed_config=DistributedConfig(fsdp_size=2)) with ACCELERATE_USE_FSDP and
    FSDP_CPU_RAM_EFFICIENT_LOADING set: every rank reads its slices as upstream does (DTensors, every gathered key
    equal to the checkpoint), non-persistent buffers, root-owned ones included (upstream leaves those zero on rank
    1), equal to a plain load's, logits equal on both ranks and to a plain load's, in < 60 s."""
    if not _native_release():
        pytest.skip("DistributedConfig(fsdp_size=N) shards from transformers 5.15")
    results = _each(runs, f"native:{kind}")
    for r in results:
        assert r["dtensor"][-1] is True and r["devices"] == ["cpu"], r
        assert r["checkpoint_keys_compared"] > 0 and r["mismatch_vs_checkpoint"] == [], r
        assert r["buffer_mismatch_vs_plain"] == [], r
        assert r["logits"] == r["logits_plain"] == results[0]["logits"]
        assert r["buffers"] == results[0]["buffers"]
    assert sum(r["seconds"] for r in _each(runs, f"native:{kind}")) < 120  # both ranks' seconds: < 60 s each


@pytest.mark.parametrize("kind", FSDP1)
def test_fsdp1_sync_module_states_as_accelerate_builds_it(runs, kind):
    """FSDP1 with sync_module_states, param_init_fn = to_empty(recurse=False) under accelerate's ensure_weights_retied
    and decoder layers auto-wrapped: every gathered key equals the checkpoint, logits, buffers and the loss of one
    SGD step equal upstream's on every rank, and the tie survives the step."""
    results = _each(runs, f"fsdp1:{kind}")
    assert results[1]["patched"]["devices"] == ["meta"]
    for r in results:
        for run in ("patched", "upstream"):
            assert r[run]["checkpoint_keys_compared"] > 0 and r[run]["mismatch_vs_checkpoint"] == [], r[run]
        assert r["patched"]["logits"] == r["upstream"]["logits"] == results[0]["upstream"]["logits"]
        assert r["patched"]["losses"] == r["upstream"]["losses"] == results[0]["upstream"]["losses"]
        assert r["patched"]["buffers"] == r["upstream"]["buffers"] == results[0]["upstream"]["buffers"]
        assert r["patched"]["tied_after_step"] is (kind == "llama_tied")


def test_accelerate_ranks_whose_dtypes_differ_fail_together(runs):
    """Rank 1's frozen embeddings are float16, rank 0's bfloat16: accelerate's fsdp2_prepare_model raises the same
    error on every rank, naming key and both dtypes, within 30 s, instead of reinterpreted bytes or a hang."""
    if not _stream_applies():
        pytest.skip("the layout agreement runs where the rank-0 stream applies (accelerate >= 1.14)")
    results = _each(runs, "dtype:llama")
    expected = ("hf_fsdp_loadfix: the model being prepared differs between ranks: rank 1: model.embed_tokens.weight "
                "dtype torch.float16 (rank 0: torch.bfloat16)")
    for r in results:
        assert r["error"] == expected and r["seconds"] < 30


def test_accelerate_prepare_waits_for_a_rank_0_slower_than_the_collective_timeout(checkpoints, tmp_path):
    """A process group with a 15 s timeout, rank 0's load 40 s late: rank 1 waits in the package's store poll, not in
    a collective, and both ranks end with the checkpoint's values and equal logits."""
    require_accelerate_on_cpu()
    outputs, results = launch([OFFPATH, "--pg-timeout", "15", "--late", "40", "--scenario", "late", "llama",
                               checkpoints("llama")], tmp_path, timeout=200)
    _ok(outputs)
    rank0, rank1 = (r["scenarios"]["late:llama"] for r in results)
    assert rank1["prepare_s"] > 30  # it did wait
    for r in (rank0, rank1):
        assert r["checkpoint_keys_compared"] > 0 and r["mismatch_vs_checkpoint"] == []
    assert rank0["logits"] == rank1["logits"]


def test_accelerate_prepare_wait_ends_within_seconds_when_rank_0_fails(checkpoints, tmp_path):
    """Rank 0 raises in its load while rank 1 waits for it: both ranks exit within 30 s, rank 1 with one clear error."""
    require_accelerate_on_cpu()
    start = time.monotonic()
    outputs, _ = launch([OFFPATH, "--late", "3", "--raise", "--scenario", "late", "llama", checkpoints("llama")],
                        tmp_path, timeout=120)
    assert time.monotonic() - start < 30 + 15  # imports and start-up of both ranks: under 15 s here
    (rc0, text0), (rc1, text1) = outputs
    assert rc0 != 0 and "rank 0's load failed (simulated)" in text0
    assert rc1 != 0 and "hf_fsdp_loadfix: rank 1 lost the job's store while waiting for rank 0 to finish loading" \
        in text1


def two_nodes(args, out):
    """``args`` on 2 simulated nodes of 2 ranks (LOCAL_RANK 0 and 1 on each); every rank's scenarios."""
    port, found = free_port(), {}

    def node(n):
        found[n] = launch(args, out, timeout=300, node_rank=n, nnodes=2, port=port)

    threads = [threading.Thread(target=node, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _ok(found[0][0] + found[1][0])
    return [r["scenarios"] for r in found[0][1] + found[1][1]]


def test_fsdp1_hybrid_shard_on_two_simulated_nodes(checkpoints, tmp_path):
    """HSDP over 2 "nodes" of 2 ranks (local rank 0 of each node loads; FSDP1 HYBRID_SHARD skips the buffer sync on
    non-source nodes, pytorch#178569): on every rank of both nodes the gathered state equals the checkpoint, and
    buffers, logits and the loss of one step equal node 0 rank 0's, which equal upstream's."""
    require_accelerate_on_cpu()
    results = two_nodes([OFFPATH, "--hsdp"] + [a for kind in ("llama", "root_buffer")
                                               for a in ("--scenario", "fsdp1", kind, checkpoints(kind))], tmp_path)
    for kind in ("llama", "root_buffer"):
        first = results[0][f"fsdp1:{kind}"]
        assert [r[f"fsdp1:{kind}"]["patched"]["devices"] for r in results] == [["cpu"], ["meta"], ["cpu"], ["meta"]]
        facts = ("buffers", "logits", "losses")
        assert [first["patched"][f] for f in facts] == [first["upstream"][f] for f in facts]  # rank 0 loads alike
        for r in results:
            got = r[f"fsdp1:{kind}"]["patched"]
            assert got["checkpoint_keys_compared"] > 0 and got["mismatch_vs_checkpoint"] == [], got
            assert [got[f] for f in facts] == [first["patched"][f] for f in facts]
