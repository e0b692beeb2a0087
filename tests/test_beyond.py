"""Opt-in capabilities beyond upstream: accelerate's persistent-buffer fix, cross-rank buffer checks, and
single-source loading across nodes."""

import threading

import pytest
from launch import accelerate_behaviour, free_port, require_accelerate_on_cpu, run_ranks


def test_accelerate_persistent_buffers_without_the_fix(checkpoints, tmp_path):
    """Sentinel for accelerate#3898: the same DeepSeek-V3 run as the contract test, fix switched off. Up to 1.15
    accelerate crashes on the plain-tensor buffer; 1.16 fixed it (float32: see test_contract.CASES): the run passes,
    every key equal to the checkpoint."""
    require_accelerate_on_cpu()
    outputs, results = run_ranks(["--ckpt", checkpoints("deepseek_v3"), "--kind", "deepseek_v3", "--mode",
                                  "accelerate", "--dtype", "float32"], tmp_path,
                                 env={"HF_FSDP_LOADFIX_ACCELERATE": "0"}, timeout=120)
    if accelerate_behaviour()["accelerate_fix"]:
        assert outputs[0][0] != 0 and "device_mesh" in outputs[0][1]
        return
    assert all(rc == 0 for rc, _ in outputs), outputs[0][1][-4000:]
    for r in results:
        assert r["checkpoint_keys_compared"] > 0 and r["mismatch_vs_checkpoint"] == [] and not r["logits_nan"]


def _random_buffer_run(checkpoints, tmp_path, mode):
    return run_ranks(["--ckpt", checkpoints("random_buffer"), "--kind", "random_buffer", "--seed-per-rank"],
                     tmp_path, env={"HF_FSDP_LOADFIX_BUFFERS": mode}, timeout=120)


def test_buffers_default_leaves_uncomputable_buffer_as_today(checkpoints, tmp_path):
    outputs, (rank0, rank1) = _random_buffer_run(checkpoints, tmp_path, "off")
    assert all(rc == 0 for rc, _ in outputs), outputs
    assert rank0["non_persistent"]["noise"] != rank1["non_persistent"]["noise"]
    assert rank0["non_persistent"]["scale"] == rank1["non_persistent"]["scale"]


def test_buffers_verify_raises_on_every_rank_naming_the_buffer(checkpoints, tmp_path):
    outputs, _ = _random_buffer_run(checkpoints, tmp_path, "verify")
    for rc, text in outputs:
        assert rc != 0 and "non-persistent buffers differ from rank 0" in text and "noise (ranks [1])" in text


def test_buffers_broadcast_copies_rank0(checkpoints, tmp_path):
    outputs, (rank0, rank1) = _random_buffer_run(checkpoints, tmp_path, "broadcast")
    assert all(rc == 0 for rc, _ in outputs), outputs
    assert rank1["non_persistent"] == rank0["non_persistent"]  # values and dtypes
    assert rank1["non_persistent"]["noise"]["device"] == "cpu"


def _two_nodes(checkpoints, tmp_path, env):
    """Two launchers with distinct node ranks, 2 ranks each, one rendezvous: global ranks 0-3."""
    port, found = free_port(), {}
    args = ["--ckpt", checkpoints("llama"), "--mode", "native", "--dtype", "float32"]

    def node(rank):
        found[rank] = run_ranks(args, tmp_path, env=env, node_rank=rank, nnodes=2, port=port, timeout=240)

    threads = [threading.Thread(target=node, args=(n,)) for n in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    outputs = found[0][0] + found[1][0]
    assert all(rc == 0 for rc, _ in outputs), outputs
    return found[0][1] + found[1][1]


@pytest.mark.parametrize("source", ["local", "global"])
def test_source_global_reads_checkpoint_on_global_rank0_only(checkpoints, tmp_path, source):
    results = _two_nodes(checkpoints, tmp_path, {"HF_FSDP_LOADFIX_SOURCE": source})
    real = [r["rank"] for r in results if {v["device"] for v in r["state"].values()} == {"cpu"}]
    assert real == ([0] if source == "global" else [0, 2])  # 2 = local rank 0 of the second node
    for r in results:
        assert r["mismatch_vs_checkpoint"] == [] and r["mismatch_vs_reference"] == []
        assert r["logits_digest"] == results[0]["logits_digest"]
