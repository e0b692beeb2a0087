"""C4, transformers 5.4.0-5.5.4.

Upstream, non-local-rank-0: reads every shard; ``empty_like`` placeholders; ``_initialize_missing_keys`` marks the
whole state dict and the root module initialised, so buffers owned by the root module stay garbage.
Patched: as C3, and the root module's non-persistent buffers are computed too.
"""

from ._v5 import patch_set

PATCHES = patch_set("C4", _finalize_model_loading=True)
