"""C1, transformers 4.53.0-4.56.2.

Upstream, non-local-rank-0: ``_move_missing_keys_from_meta_to_cpu`` gives every parameter an ``empty_like``
CPU tensor (uncommitted until touched: ``keep_in_fp32`` casts and accelerate's fp32 upcast commit it) and
persistent buffers keep their ``__init__`` values. Shards are already skipped there (meta ``load_state_dict``).
Patched: parameters and persistent buffers stay on meta; non-persistent buffers get the owner's ``_init_weights``.
"""

from ._v4 import patch_set

PATCHES = patch_set(
    "C1",
    move_params=("missing_keys", "unexpected_keys", "dtype", "hf_quantizer"),
    init_params=("loaded_keys", "ignore_mismatched_sizes", "is_quantized"),
)
