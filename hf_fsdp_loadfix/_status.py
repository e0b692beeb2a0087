"""``status()``: what is installed, which class it is, whether the patch is applied, and why not."""

import os
import sys
from importlib import metadata

from . import __version__, _config, versions


def _installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _process_role() -> str:
    """Would a ``from_pretrained`` here take the non-rank-0 path?  Mirrors transformers' gate and names the trap."""
    use_fsdp = os.environ.get("ACCELERATE_USE_FSDP")
    efficient = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING")
    problems = []
    for name, raw in (("ACCELERATE_USE_FSDP", use_fsdp), ("FSDP_CPU_RAM_EFFICIENT_LOADING", efficient)):
        if raw is not None and raw.strip().lower() not in {"1", "true", "yes", "on", "y", "t", "0", "false", "no", "off", "n", "f"}:
            problems.append(f"{name}={raw!r} is not a boolean (transformers will raise)")
    if problems:
        return "; ".join(problems)
    truthy = lambda raw: raw is not None and raw.strip().lower() in {"1", "true", "yes", "on", "y", "t"}  # noqa: E731
    if truthy(efficient) and not truthy(use_fsdp):
        return "inactive: FSDP_CPU_RAM_EFFICIENT_LOADING is set but ACCELERATE_USE_FSDP is not (every rank loads fully)"
    if not truthy(efficient):
        return "inactive: FSDP_CPU_RAM_EFFICIENT_LOADING is not set"
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return "inactive: torch.distributed is not initialised (initialise it before from_pretrained)"
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is None:
        return "inactive: LOCAL_RANK is not set"
    if local_rank.strip() == "0":
        return "local rank 0: loads the checkpoint as upstream does"
    return f"non-local-rank-0 (LOCAL_RANK={local_rank}): parameters stay on meta, buffers computed locally"


def report(state: dict) -> dict:
    version = _installed("transformers")
    expected = versions.class_for(version) if version else None
    try:
        env_error, enabled = None, _config.enabled() and True
        _config.forced()
    except ValueError as err:
        env_error, enabled = str(err), None
    return {
        "hf_fsdp_loadfix": __version__,
        "transformers": version,
        "torch": _installed("torch"),
        "accelerate": _installed("accelerate"),
        "supported": versions.SUPPORTED,
        "class": state["class"] or (expected.upper() if expected else None),
        "applied": state["class"] is not None,
        "reason": env_error or state["reason"],
        "enabled": enabled,
        "process": _process_role(),
    }
