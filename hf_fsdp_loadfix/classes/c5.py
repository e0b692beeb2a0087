"""C5, transformers 5.6.0-5.22.2.

Upstream, non-local-rank-0: reads every shard; ``zeros_like`` for every parameter, i.e. a full committed model
per rank (8 ranks x 30B = ~480 GB on one node); root-owned non-persistent buffers stay zero.
Patched: as C4.
"""

from ._v5 import patch_set

PATCHES = patch_set("C5", _finalize_model_loading=True)
