"""The package's own environment variables, parsed strictly: a junk value is an error naming the variable."""

import os

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"hf_fsdp_loadfix: environment variable {name}={raw!r} is not a boolean; use 1 or 0")


def enabled() -> bool:
    """HF_FSDP_LOADFIX=0 turns the whole package off (default on)."""
    return env_flag("HF_FSDP_LOADFIX", True)


def forced() -> bool:
    """HF_FSDP_LOADFIX_FORCE=1 applies the newest patch set to a release outside the table if its structure matches."""
    return env_flag("HF_FSDP_LOADFIX_FORCE", False)
