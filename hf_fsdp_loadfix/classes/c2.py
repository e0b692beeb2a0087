"""C2, transformers 4.57.0-4.57.6.

As C1 with new signatures (``unexpected_keys`` dropped; ``_initialize_missing_keys(missing_keys, is_quantized)``
whose non-persistent-buffer test compares tensors against a set of names). Same patch as C1.
"""

from ._v4 import patch_set

PATCHES = patch_set(
    "C2",
    move_params=("missing_keys", "dtype", "hf_quantizer"),
    init_params=("missing_keys", "is_quantized"),
)
