"""``status()``: what is installed, which class it is, whether the patch is applied, and why not."""

import os
import site
import sys
from importlib import metadata

from . import __version__, _checkpoint, _config, versions


def _installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


_TRUE, _BOOL = _config.STRTOBOOL_TRUE, _config.STRTOBOOL  # what transformers' strtobool accepts


_GATE = ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING")


def _flags() -> tuple[bool, bool]:
    """(ACCELERATE_USE_FSDP, FSDP_CPU_RAM_EFFICIENT_LOADING) as transformers' gate sees them; the first also true where
    a TrainingArguments of this process asked for FSDP with cpu_ram_efficient_loading (the package opens the gate)."""
    use_fsdp, efficient = ((os.environ.get(k) or "").strip().lower() in _TRUE for k in _GATE)
    steps = sys.modules.get("hf_fsdp_loadfix._steps")
    return use_fsdp or bool(steps and steps.trainer_asked), efficient


def traps() -> list[str]:
    """Environment mistakes that silently lose the optimisation, or break the load, on every rank."""
    found = [f"{k}={os.environ[k]!r} is not a boolean: transformers raises ValueError in from_pretrained"
             for k in _GATE if k in os.environ and os.environ[k].strip().lower() not in _BOOL]
    use_fsdp, efficient = _flags()
    if efficient and not use_fsdp:
        found.append("FSDP_CPU_RAM_EFFICIENT_LOADING is set but ACCELERATE_USE_FSDP is not, and no TrainingArguments "
                     "of this process asked for FSDP with cpu_ram_efficient_loading: every rank loads the full "
                     "checkpoint (create TrainingArguments before from_pretrained, or set ACCELERATE_USE_FSDP=true)")
    local = os.environ.get("LOCAL_RANK")
    global_source = os.environ.get("HF_FSDP_LOADFIX_SOURCE", "").strip().lower() == "global"  # rank from the group
    if efficient and use_fsdp and local is None and not global_source:
        found.append("LOCAL_RANK is not set: transformers treats every process, global rank 0 included, as "
                     "non-local-rank-0, so no process loads the weights (launch with torchrun or accelerate launch)")
    accelerate = _accelerate_type()
    if efficient and use_fsdp and accelerate not in (None, "FSDP"):
        found.append(f"accelerate runs {accelerate}, not FSDP, but ACCELERATE_USE_FSDP and "
                     "FSDP_CPU_RAM_EFFICIENT_LOADING are set: a from_pretrained off local rank 0 leaves the weights on "
                     "meta. accelerator.prepare(model) fills them from rank 0; a model used before that raises. Unset "
                     "the variables (or FSDP_CPU_RAM_EFFICIENT_LOADING=false) when not training with FSDP")
    if local is not None and not local.strip().lstrip("-").isdigit():
        found.append(f"LOCAL_RANK={local!r} is not an integer: transformers raises ValueError in from_pretrained")
    return found


def _accelerate_type() -> str | None:
    """accelerate's distributed type once an ``Accelerator`` exists in this process (``Accelerator(cpu=True,
    fsdp_plugin=...)`` runs DDP, MULTI_CPU), else None."""
    state = sys.modules.get("accelerate.state")
    kind = getattr(state, "AcceleratorState", None) and state.AcceleratorState._shared_state.get("distributed_type")
    return getattr(kind, "name", None) or (str(kind) if kind else None)


def _process_role(found: list[str]) -> str:
    """Would a ``from_pretrained`` here take the non-rank-0 path?  Mirrors transformers' gate; ``found``: traps()."""
    junk = [t for t in found if "is not a" in t]
    if junk:
        return "; ".join(junk)
    use_fsdp, efficient = _flags()
    if not efficient:
        return "inactive: FSDP_CPU_RAM_EFFICIENT_LOADING is not set"
    if not use_fsdp:
        return "inactive: FSDP_CPU_RAM_EFFICIENT_LOADING is set but ACCELERATE_USE_FSDP is not (every rank loads fully)"
    dist = sys.modules.get("torch.distributed")
    if dist is None or not (dist.is_available() and dist.is_initialized()):
        return "inactive: torch.distributed is not initialised (initialise it before from_pretrained)"
    local = os.environ.get("LOCAL_RANK")
    if local is None:
        return "non-local-rank-0 (LOCAL_RANK is not set): no process of this job loads the weights"
    if local.strip() == "0":
        return "local rank 0: loads the checkpoint as upstream does"
    return f"non-local-rank-0 (LOCAL_RANK={local}): parameters stay on meta, buffers computed locally"


def startup_hook() -> str | None:
    """The installed ``hf_fsdp_loadfix.pth``, if a site directory of this interpreter holds one."""
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return next((p for p in (os.path.join(d, "hf_fsdp_loadfix.pth") for d in dirs) if os.path.isfile(p)), None)


def report(state: dict) -> dict:
    version = _installed("transformers")
    expected = versions.class_for(version) if version else None
    try:
        _config.validate()
        env_error, options = None, {"buffers": _config.buffers(), "source": _config.source(),
                                     "stream": _config.stream()}
    except ValueError as err:
        env_error, options = str(err), None
    found = traps()
    return {
        "hf_fsdp_loadfix": __version__,
        "transformers": version,
        "torch": _installed("torch"),
        "accelerate": _installed("accelerate"),
        "supported": versions.SUPPORTED,
        "class": state["class"] or (expected.upper() if expected else None),
        "applied": state["class"] is not None,
        "case": state["case"],  # "tested", "untested (newer than X), structure matches CN", "refused: why"
        "reason": env_error or (state["reason"] if version else "transformers is not installed"),
        "accelerate_fix": state["accelerate"] if _installed("accelerate") else "not installed",
        "accelerate_stream": state["stream"] if _installed("accelerate") else "not installed",
        "accelerate_prepare": state["prepare"] if _installed("accelerate") else "not installed",
        "accelerate_fill": state["fill"] if _installed("accelerate") else "not installed",  # shard-on-read's fill
        "accelerate_optimizer": state["optimizer"] if _installed("accelerate") else "not installed",
        "peft_adapters": state["peft"] if _installed("peft") else "not installed",  # kept for shard-on-read
        "options": options,
        "startup_hook": startup_hook(),
        "process": _process_role(found),
        "traps": found,
        "checkpoint_check": _checkpoint.last["check"],
        # HF_FSDP_LOADFIX_SOURCE=sharded: the last fill's keys read sliced / whole and bytes, or why the default path
        "shard_on_read": (sys.modules.get("hf_fsdp_loadfix._sharded") and
                          sys.modules["hf_fsdp_loadfix._sharded"].last["shard_on_read"]) or "not used",
    }
