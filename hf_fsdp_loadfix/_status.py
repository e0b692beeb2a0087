"""``status()``: what is installed, which class it is, whether the patch is applied, and why not."""

import os
import sys
from importlib import metadata

from . import __version__, _checkpoint, _config, versions


def _installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


_TRUE = {"1", "true", "yes", "on", "y", "t"}
_BOOL = _TRUE | {"0", "false", "no", "off", "n", "f"}  # what transformers' strtobool accepts


def _process_role() -> str:
    """Would a ``from_pretrained`` here take the non-rank-0 path?  Mirrors transformers' gate and names the trap."""
    env = {k: os.environ.get(k) for k in ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING", "LOCAL_RANK")}
    junk = [f"{k}={v!r} is not a boolean (transformers will raise)" for k, v in list(env.items())[:2]
            if v is not None and v.strip().lower() not in _BOOL]
    if junk:
        return "; ".join(junk)
    use_fsdp, efficient = ((env[k] or "").strip().lower() in _TRUE for k in list(env)[:2])
    if not efficient:
        return "inactive: FSDP_CPU_RAM_EFFICIENT_LOADING is not set"
    if not use_fsdp:
        return "inactive: FSDP_CPU_RAM_EFFICIENT_LOADING is set but ACCELERATE_USE_FSDP is not (every rank loads fully)"
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return "inactive: torch.distributed is not initialised (initialise it before from_pretrained)"
    if env["LOCAL_RANK"] is None:
        return "inactive: LOCAL_RANK is not set"
    if env["LOCAL_RANK"].strip() == "0":
        return "local rank 0: loads the checkpoint as upstream does"
    return f"non-local-rank-0 (LOCAL_RANK={env['LOCAL_RANK']}): parameters stay on meta, buffers computed locally"


def report(state: dict) -> dict:
    version = _installed("transformers")
    expected = versions.class_for(version) if version else None
    try:
        _config.validate()
        env_error, options = None, {"buffers": _config.buffers(), "source": _config.source()}
    except ValueError as err:
        env_error, options = str(err), None
    return {
        "hf_fsdp_loadfix": __version__,
        "transformers": version,
        "torch": _installed("torch"),
        "accelerate": _installed("accelerate"),
        "supported": versions.SUPPORTED,
        "class": state["class"] or (expected.upper() if expected else None),
        "applied": state["class"] is not None,
        "reason": env_error or state["reason"],
        "accelerate_fix": state["accelerate"],
        "options": options,
        "process": _process_role(),
        "checkpoint_check": _checkpoint.last["check"],
    }
