"""C1, transformers 4.53.0-4.56.2.

Upstream, non-local-rank-0: ``_move_missing_keys_from_meta_to_cpu`` gives every parameter an ``empty_like``
CPU tensor (uncommitted until touched: ``keep_in_fp32`` casts and accelerate's fp32 upcast commit it) and
persistent buffers keep their ``__init__`` values. Shards are already skipped there (meta ``load_state_dict``).
Patched: parameters and persistent buffers stay on meta; non-persistent buffers get the owner's ``_init_weights``.
"""

from .. import _runtime
from . import PatchSet

PATCHES = PatchSet(
    "C1",
    {
        # checks the checkpoint on every rank together (headers only) before shards are read
        "_load_pretrained_model": (
            _runtime.load_pretrained_model,
            ("model", "state_dict", "checkpoint_files", "pretrained_model_name_or_path", "ignore_mismatched_sizes",
             "sharded_metadata"),
        ),
        "_move_missing_keys_from_meta_to_cpu": (
            _runtime.move_missing_keys,
            ("missing_keys", "unexpected_keys", "dtype", "hf_quantizer"),
        ),
        "_initialize_missing_keys": (
            _runtime.initialize_missing_keys,
            ("loaded_keys", "ignore_mismatched_sizes", "is_quantized"),
        ),
    },
)
