"""One module per upstream behaviour class: what upstream does on a non-local-rank-0 process, and which
functions this package wraps there.  ``PatchSet.matches`` is the structural check run before patching."""

import inspect
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class PatchSet:
    name: str
    # PreTrainedModel attribute -> (wrapt wrapper, the upstream parameter names it expects, ``self``/``cls`` excluded)
    targets: dict[str, tuple[Callable, tuple[str, ...]]]
    # attributes whose presence (True) or absence (False) tells this class from its neighbours
    markers: dict[str, bool] = field(default_factory=dict)

    def mismatch(self, pretrained_model_cls) -> str | None:
        """Why this release's structure does not fit the patch set, or None when it does."""
        for attr, present in self.markers.items():
            if hasattr(pretrained_model_cls, attr) != present:
                return f"PreTrainedModel.{attr} is {'missing' if present else 'present'}"
        for attr, (_, params) in self.targets.items():
            fn = getattr(pretrained_model_cls, attr, None)
            if fn is None:
                return f"PreTrainedModel.{attr} is missing"
            found = tuple(p for p in inspect.signature(fn).parameters if p != "self")
            if found[: len(params)] != params:
                return f"PreTrainedModel.{attr}{found} does not start with {params}"
        return None
