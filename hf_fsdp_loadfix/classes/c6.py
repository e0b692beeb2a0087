"""C6, transformers 5.23.0 - 5.24.x.

Upstream, non-local-rank-0: reads every shard and keeps the checkpoint values (mmap-backed without a cast, a
materialised copy with one); only non-persistent buffers get ``zeros_like``, root-owned ones stay zero.
Patched: as C4.
"""

from ._v5 import patch_set

PATCHES = patch_set("C6", _finalize_model_loading=True)
