"""C2, transformers 4.57.0-4.57.6.

As C1 with new signatures (``unexpected_keys`` dropped; ``_initialize_missing_keys(missing_keys, is_quantized)``
whose non-persistent-buffer test compares tensors against a set of names). Same patch as C1.
"""

from .. import _runtime
from . import PatchSet

PATCHES = PatchSet(
    "C2",
    {
        # checks the checkpoint on every rank together (headers only) before shards are read
        "_load_pretrained_model": (
            _runtime.load_pretrained_model,
            ("model", "state_dict", "checkpoint_files", "pretrained_model_name_or_path", "ignore_mismatched_sizes",
             "sharded_metadata"),
        ),
        "_move_missing_keys_from_meta_to_cpu": (
            _runtime.move_missing_keys,
            ("missing_keys", "dtype", "hf_quantizer"),
        ),
        "_initialize_missing_keys": (_runtime.initialize_missing_keys, ("missing_keys", "is_quantized")),
    },
)
