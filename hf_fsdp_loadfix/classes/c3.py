"""C3, transformers 5.0.0-5.3.0.

Upstream, non-local-rank-0: reads every shard; ``empty_like`` for every parameter and buffer, then a full random
``initialize_weights()`` (a committed model-sized copy, and seconds of init). Patched: the loading hook gives
upstream meta tensors, parameters stay on meta, only non-persistent-buffer owners run ``_init_weights``.
"""

from ._v5 import patch_set

PATCHES = patch_set("C3", mark_tied_weights_as_initialized=True)
