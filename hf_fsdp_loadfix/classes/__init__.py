"""One module per upstream behaviour class: what upstream does on a non-local-rank-0 process, and which
functions this package wraps there.  ``PatchSet.mismatch`` is the structural check run before patching: the
wrapped functions and everything ``_runtime`` calls at load time, so that a release newer than the table can be
trusted when it matches."""

import dataclasses
import inspect
import sys
from dataclasses import dataclass, field
from typing import Callable

# transformers.modeling_utils helpers the runtime calls with no arguments (is_local_dist_rank_0 is also wrapped)
HELPERS = ("is_fsdp_enabled", "is_deepspeed_zero3_enabled", "is_local_dist_rank_0")


def _params(fn) -> tuple[str, ...]:
    return tuple(p for p in inspect.signature(fn).parameters if p != "self")


def _binds(fn, *args) -> bool:
    try:
        inspect.signature(fn).bind(*args)
        return True
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class PatchSet:
    name: str
    # PreTrainedModel attribute -> (wrapt wrapper, the upstream parameter names it expects, ``self``/``cls`` excluded)
    targets: dict[str, tuple[Callable, tuple[str, ...]]]
    # attributes whose presence (True) or absence (False) tells this class from its neighbours
    markers: dict[str, bool] = field(default_factory=dict)
    # wrapped function -> further parameters the runtime reads by name, anywhere in the signature
    keywords: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # PreTrainedModel function -> the wrapped functions it must still call (else the fix would silently not run)
    callers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # LoadStateDictConfig attributes the loading hook reads, or replaces with dataclasses.replace (5.x)
    load_config: tuple[str, ...] = ()
    # transformers.initialization.guard_torch_init_functions, entered around _init_weights (5.x)
    init_guard: bool = False
    # transformers.integrations.hub_kernels' kernelize step, given local rank 0's device on a meta model (_kernels)
    kernels: bool = False

    def mismatch(self, modeling_utils) -> str | None:
        """Every way this release's structure does not fit the patch set, one clause each; None when it fits."""
        return "; ".join(self.mismatches(modeling_utils)) or None

    def mismatches(self, mu) -> list[str]:
        cls, found = mu.PreTrainedModel, []
        for attr, present in self.markers.items():
            if hasattr(cls, attr) != present:
                found.append(f"PreTrainedModel.{attr} is {'missing' if present else 'present'}")
        for attr, (_, params) in self.targets.items():
            fn = getattr(cls, attr, None)
            if fn is None:
                found.append(f"PreTrainedModel.{attr} is missing")
                continue
            names = _params(fn)
            if names[: len(params)] != params:
                found.append(f"PreTrainedModel.{attr}{names} does not start with {params}")
            found += [f"PreTrainedModel.{attr} has no parameter {k!r}" for k in self.keywords.get(attr, ())
                      if k not in names]
        for caller, callees in self.callers.items():
            fn = getattr(cls, caller, None)
            if fn is None:
                found.append(f"PreTrainedModel.{caller} is missing")
            else:
                found += [f"PreTrainedModel.{caller} does not call {c}" for c in callees
                          if c not in inspect.unwrap(fn).__code__.co_names]
        for name in HELPERS:
            if not (callable(getattr(mu, name, None)) and _binds(getattr(mu, name))):
                found.append(f"transformers.modeling_utils.{name}() is missing or needs arguments")
        load = getattr(mu, "load_state_dict", None)
        missing = [p for p in ("map_location", "weights_only") if not callable(load) or p not in _params(load)]
        if missing:
            found.append(f"transformers.modeling_utils.load_state_dict has no parameter {', '.join(missing)}")
        if not (callable(getattr(cls, "_init_weights", None)) and _binds(cls._init_weights, None, None)):
            found.append("PreTrainedModel._init_weights(module) is missing")
        if self.init_guard:
            init = sys.modules.get("transformers.initialization")
            if not callable(getattr(init, "guard_torch_init_functions", None)):
                found.append("transformers.initialization.guard_torch_init_functions is missing")
        if self.kernels:
            from .. import _kernels

            why = _kernels.mismatch(sys.modules.get(_kernels.MODULE))
            if why:
                found.append(why)
        if self.load_config:
            config = getattr(mu, "LoadStateDictConfig", None)
            if not dataclasses.is_dataclass(config):
                found.append("transformers.modeling_utils.LoadStateDictConfig is missing or not a dataclass")
            else:
                fields = {f.name for f in dataclasses.fields(config)}
                lost = [a for a in self.load_config
                        if a not in fields and not isinstance(getattr(config, a, None), property)]
                if lost:
                    found.append(f"LoadStateDictConfig has no {', '.join(lost)}")
        return list(dict.fromkeys(found))  # a marker and a caller may name the same missing function
