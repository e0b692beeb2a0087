"""C7, transformers 5.25.0 - 5.25.x.

Upstream, non-local-rank-0: loads as C6 (its loading functions are C6's), then ``from_pretrained`` kernelizes the
model by default (``kernels`` is a dependency, ``use_kernels`` defaults to on), for ``model.device``; so do
``model.train()``/``eval()``. On a meta model that device is ``meta`` and kernels raises.
Patched: as C4, and the kernels step is given local rank 0's loading device (``_kernels``).
"""

from ._v5 import patch_set

PATCHES = patch_set("C7", _finalize_model_loading=True, set_use_kernels=True, kernels=True)
