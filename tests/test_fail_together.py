"""A checkpoint problem only rank 0 would meet must raise a clear error on every rank, at once, with no collective
inside from_pretrained (shared storage: every rank sees the same files)."""

import json
import os
import shutil
import time

import pytest
from launch import run_ranks
from safetensors.torch import load_file, save_file


def _corrupt(src, dst, how):
    shutil.copytree(src, dst)
    weight_map = json.load(open(os.path.join(dst, "model.safetensors.index.json")))["weight_map"]
    key, shard = sorted(weight_map.items())[3]
    path = os.path.join(dst, shard)
    if how == "truncated":
        os.truncate(path, os.path.getsize(path) - 100)
    elif how == "shard_missing":
        os.remove(path)
    else:
        tensors = load_file(path)
        if how == "key_removed":
            tensors.pop(key)
        else:  # wrong_shape
            tensors[key] = tensors[key][:-1].clone()
        save_file(tensors, path, metadata={"format": "pt"})
    return key, shard


CORRUPT = ["key_removed", "wrong_shape", "truncated"]


@pytest.fixture(scope="module")
def corrupt_runs(checkpoints, tmp_path_factory):
    """One launch: each corrupt checkpoint loaded in turn (a load that raises is recorded and the next one runs),
    then the .bin checkpoint. The (key, shard) each corruption touched, the launch's seconds, outputs, results."""
    root = tmp_path_factory.mktemp("corrupt")
    touched = {how: _corrupt(checkpoints("llama_sharded"), str(root / how), how) for how in CORRUPT}
    # each corruption's name as the case's kind: a label (tests/models.load_class loads any such kind as a causal LM)
    cases = [(how, str(root / how)) for how in CORRUPT] + [("llama_bin", checkpoints("llama_bin"))]
    start = time.monotonic()
    outputs, results = run_ranks([a for kind, ckpt in cases for a in ("--case", kind, "auto", "load", ckpt)] +
                                 ["--errors"], root / "out", timeout=180)  # a hang fails here
    for rc, text in outputs:
        assert rc == 0, text[-4000:]
    return touched, time.monotonic() - start, outputs, [r["cases"] for r in results]


@pytest.mark.parametrize("how", CORRUPT)
def test_corrupt_shard_fails_on_every_rank_quickly(corrupt_runs, how):
    touched, elapsed, outputs, results = corrupt_runs
    key, shard = touched[how]
    for (_, text), cases in zip(outputs, results):
        error = cases[f"{how}:auto:load"].get("error", "")
        text = text.split(f"== case {how}:auto:load")[1].split("== case ")[0]  # this load's output
        # 5.x raises upstream's own mismatch error on every rank, after logging the report that names the key;
        # every other case is the package's error
        assert f"checkpoint problem found before loading: {shard}" in error or (
            how == "wrong_shape" and "ignore_mismatched_sizes" in error and key in text
        ), error[-2000:]
    assert elapsed < 90, elapsed  # four loads in one launch; process start-up and imports dominate on 2 cores


def test_shard_missing_on_one_node_fails_on_every_rank(checkpoints, tmp_path):
    """Node-local storage: the rank missing the shard raises at once naming it; rank 0 loads and fails in the
    broadcast that rank never joins (gloo: the peer closed the connection; torchrun would stop every worker)."""
    other = str(tmp_path / "node1")
    _, shard = _corrupt(checkpoints("llama_sharded"), other, "shard_missing")
    start = time.monotonic()
    outputs, _ = run_ranks(["--ckpt", checkpoints("llama_sharded"), "--ckpt-other", other, "--mode", "native"],
                           tmp_path / "out", timeout=120)
    assert time.monotonic() - start < 60
    assert all(rc != 0 for rc, _ in outputs), outputs
    assert f"checkpoint problem found before loading: {shard} is unreadable" in outputs[1][1], outputs[1][1][-2000:]


def test_pickle_checkpoint_is_not_checked_and_says_so(corrupt_runs):
    _, _, outputs, results = corrupt_runs
    assert ".bin/pickle checkpoints are not checked" in results[1]["llama_bin:auto:load"]["status"]["checkpoint_check"]
    assert outputs[1][1].count(".bin/pickle checkpoints are not checked") == 1
