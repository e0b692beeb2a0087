"""The package's own environment variables, parsed strictly: a junk value is an error naming the variable."""

import os

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
# what transformers' strtobool accepts for its FSDP variables (ACCELERATE_USE_FSDP, FSDP_CPU_RAM_EFFICIENT_LOADING)
STRTOBOOL_TRUE = _TRUE | {"y", "t"}
STRTOBOOL = STRTOBOOL_TRUE | _FALSE | {"n", "f"}


def _raw(name: str):
    raw = os.environ.get(name)
    return None if raw is None or raw.strip() == "" else raw


def env_flag(name: str, default: bool) -> bool:
    raw = _raw(name)
    if raw is None:
        return default
    if raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise ValueError(f"hf_fsdp_loadfix: environment variable {name}={raw!r} is not a boolean; use one of "
                     "1/0/true/false/yes/no/on/off")


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices``; the first is the default."""
    raw = _raw(name)
    if raw is None:
        return choices[0]
    if raw.strip().lower() in choices:
        return raw.strip().lower()
    raise ValueError(f"hf_fsdp_loadfix: environment variable {name}={raw!r} is not one of {', '.join(choices)}")


def enabled() -> bool:
    """HF_FSDP_LOADFIX=0 turns the whole package off (default on)."""
    return env_flag("HF_FSDP_LOADFIX", True)


def forced() -> bool:
    """HF_FSDP_LOADFIX_FORCE=1 applies the newest patch set to a release older than the table if its structure
    matches (then proven as an untested release is)."""
    return env_flag("HF_FSDP_LOADFIX_FORCE", False)


def strict() -> bool:
    """HF_FSDP_LOADFIX_STRICT=1: an untested release that fails the proof (``_gate.Proof``) is an error at the load,
    instead of the package stepping aside with a warning."""
    return env_flag("HF_FSDP_LOADFIX_STRICT", False)


def accelerate_fix() -> bool:
    """HF_FSDP_LOADFIX_ACCELERATE=0 leaves accelerate's fsdp2_load_full_state_dict alone (default: fix it)."""
    return env_flag("HF_FSDP_LOADFIX_ACCELERATE", True)


def stream() -> bool:
    """HF_FSDP_LOADFIX_STREAM=0 leaves rank 0's side of accelerate's fsdp2_prepare_model as upstream has it (default:
    stream the upcast and broadcast each tensor once). Read at each fsdp2_prepare_model call."""
    return env_flag("HF_FSDP_LOADFIX_STREAM", True)


def buffers() -> str:
    """HF_FSDP_LOADFIX_BUFFERS: off | verify (compare non-persistent buffers across ranks) | broadcast (rank 0's)."""
    return env_choice("HF_FSDP_LOADFIX_BUFFERS", ("off", "verify", "broadcast"))


def source() -> str:
    """HF_FSDP_LOADFIX_SOURCE: local (one real copy per node, transformers' default) | global (global rank 0 only) |
    sharded (no rank holds the model: every rank reads its own slices of the checkpoint at prepare)."""
    return env_choice("HF_FSDP_LOADFIX_SOURCE", ("local", "global", "sharded"))


WAIT_DEFAULT = 6 * 3600.0


def wait_seconds() -> float:
    """HF_FSDP_LOADFIX_WAIT: how long (seconds) a rank waits for rank 0 to finish loading before the first collective
    of a prepare (default 6 hours)."""
    raw = _raw("HF_FSDP_LOADFIX_WAIT")
    if raw is None:
        return WAIT_DEFAULT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"hf_fsdp_loadfix: environment variable HF_FSDP_LOADFIX_WAIT={raw!r} is not a positive number "
                         "of seconds")
    return value


def validate() -> None:
    """Raise on the first junk value among all the package's variables."""
    for check in (enabled, forced, strict, accelerate_fix, stream, buffers, source, wait_seconds):
        check()
