"""Fail fast: every rank of an FSDP cpu-ram-efficient load checks its own checkpoint files before any tensor data
is read.

Once non-rank-0 processes stop reading weights, a problem only rank 0 would meet (a truncated or corrupt shard, a
key the index promises but the shard lacks, a shape the model does not expect) would make rank 0 raise while the
others block in the FSDP broadcast until the collective timeout. Each rank reads the safetensors headers only (a
few KB per shard) and raises at once on what it sees. No collective: ``from_pretrained`` stays callable on any
subset of ranks. On shared storage every rank sees the same files, so every rank raises; a shard missing on one
node raises on that node, and the others fail when they reach the broadcast its ranks never join.
"""

import logging
import os

import torch

logger = logging.getLogger("hf_fsdp_loadfix")
last = {"check": "no FSDP load yet"}
_PICKLE_NOTE = ".bin/pickle checkpoints are not checked: that would mean reading their data"


def _problems(model, files, weight_map, compare_shapes: bool) -> list[str]:
    from safetensors import safe_open

    expected = {k: list(v.shape) for k, v in model.state_dict().items()} if compare_shapes else {}
    prefix = model.base_model_prefix
    listed = {}
    for key, shard in (weight_map or {}).items():
        listed.setdefault(shard, set()).add(key)
    problems = []
    for path in files:
        name = os.path.basename(path)
        if not path.endswith(".safetensors"):
            continue
        try:
            with safe_open(path, framework="pt") as f:
                shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as err:  # noqa: BLE001 - truncated, corrupt, missing on this node: all reported alike
            problems.append(f"{name} is unreadable ({type(err).__name__}: {err})")
            continue
        for key in sorted(listed.get(name, set()) - shapes.keys()):
            problems.append(f"{name} lacks {key}, which the index assigns to it")
        for key, shape in sorted(shapes.items()):
            target = next((k for k in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")) if k in expected), None)
            if target is not None and expected[target] != shape:
                problems.append(f"{name}: {key} has shape {shape}, the model expects {expected[target]}")
    return problems


def check_checkpoint(model, files, weight_map, compare_shapes: bool) -> None:
    """Run on every rank of an FSDP load, locally: raise a RuntimeError naming shard and key on any problem.

    ``compare_shapes`` (4.x) checks checkpoint shapes against the model for keys that match it directly; 5.x
    loads run upstream's own key and shape checks on meta tensors on every rank, so only headers and the
    index are checked there. Callers pass ``compare_shapes=False`` when ``ignore_mismatched_sizes`` is set.
    """
    try:
        problems = _problems(model, files, weight_map, compare_shapes)
    except Exception as err:  # noqa: BLE001 - a check this rank cannot run leaves the load to upstream
        last["check"] = f"skipped: the check itself failed ({type(err).__name__}: {err})"
        logger.warning("hf_fsdp_loadfix: checkpoint check %s", last["check"])
        return
    if problems:
        last["check"] = f"failed: {'; '.join(problems)}"
        raise RuntimeError(f"hf_fsdp_loadfix: checkpoint problem found before loading: {'; '.join(problems)}")
    pickled = any(not f.endswith(".safetensors") for f in files)
    if pickled and torch.distributed.get_rank() != 0 and last["check"] != f"passed; {_PICKLE_NOTE}":
        logger.warning("hf_fsdp_loadfix: %s", _PICKLE_NOTE)
    last["check"] = f"passed; {_PICKLE_NOTE}" if pickled else "passed"
