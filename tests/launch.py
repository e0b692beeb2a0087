"""Start N local ranks of worker.py (gloo, one per process) as ``torchrun`` would on one node."""

import os

from hf_fsdp_loadfix._worker import free_port, launch  # noqa: F401  (free_port: re-exported for the tests)

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")


def run_ranks(args, out, timeout=300, **kwargs):
    """worker.py on ``nproc`` ranks (default 2): per-rank (returncode, output), and the JSON each wrote."""
    return launch([WORKER, *args], out, timeout=timeout, **kwargs)


def require_accelerate_on_cpu(kind: str = "") -> None:
    """Skip where accelerate's own FSDP2 loading cannot run on CPU/gloo, whatever this package does: before 1.8
    ``fsdp2_load_full_state_dict`` hard-codes ``.cuda()``; up to 1.14 with torch >= 2.13 tied embeddings fail in
    ``fully_shard`` ("shared with a parameter already managed by another FSDP group", accelerate#4171)."""
    import accelerate
    import pytest
    import torch
    from packaging.version import Version

    release, torch_release = Version(accelerate.__version__), Version(torch.__version__).release
    if release < Version("1.8"):
        pytest.skip(f"accelerate {release} hard-codes .cuda() in fsdp2_load_full_state_dict")
    if kind == "llama_tied" and release < Version("1.15") and torch_release >= (2, 13):
        pytest.skip(f"accelerate {release} + torch >= 2.13 cannot shard tied embeddings (accelerate#4171)")


def accelerate_behaviour() -> dict:
    """What each accelerate hook of the package is for, per release of accelerate installed here: the #3898 shape
    (a plain-tensor state-dict entry crashes fsdp2_load_full_state_dict) up to 1.15; Accelerator._prepare_fsdp2
    mapping the optimizer by data_ptr() from 1.8 (where it appears) to 1.15; fsdp2_prepare_model upcasting every
    trainable parameter before capturing the state dict from 1.14 (1.16 still upcasts on the main process)."""
    import accelerate
    from packaging.version import Version

    release = Version(accelerate.__version__)
    return {"accelerate_fix": release < Version("1.16"),
            "accelerate_optimizer": Version("1.8") <= release < Version("1.16"),
            "accelerate_stream": release >= Version("1.14")}
