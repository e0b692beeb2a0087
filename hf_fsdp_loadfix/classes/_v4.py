"""The 4.x patch set shared by C1 and C2: the same three functions, with each class's signatures."""

from .. import _runtime
from . import PatchSet


def patch_set(name: str, move_params: tuple[str, ...], init_params: tuple[str, ...]) -> PatchSet:
    return PatchSet(
        name,
        {
            # checks the checkpoint on every rank together (headers only) before shards are read
            "_load_pretrained_model": (
                _runtime.load_pretrained_model,
                ("model", "state_dict", "checkpoint_files", "pretrained_model_name_or_path",
                 "ignore_mismatched_sizes", "sharded_metadata"),
            ),
            "_move_missing_keys_from_meta_to_cpu": (_runtime.move_missing_keys, move_params),
            "_initialize_missing_keys": (_runtime.initialize_missing_keys, init_params),
        },
        keywords={"_load_pretrained_model": ("hf_quantizer",)},
        callers={"_load_pretrained_model": ("_move_missing_keys_from_meta_to_cpu", "_initialize_missing_keys")},
    )
