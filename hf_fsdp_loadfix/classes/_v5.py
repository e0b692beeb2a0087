"""The 5.x patch set shared by C3-C6: their upstream bodies differ, the functions and signatures do not."""

from .. import _runtime
from . import PatchSet


def patch_set(name: str, **markers: bool) -> PatchSet:
    return PatchSet(
        name,
        {
            # the loading hook: every rank checks the checkpoint together (headers only); non-rank-0 then reads
            # safetensors headers / a meta torch.load, never tensor data
            "_load_pretrained_model": (
                _runtime.load_pretrained_model,
                ("model", "state_dict", "checkpoint_files", "load_config"),
            ),
            "_move_missing_keys_from_meta_to_device": (
                _runtime.move_missing_keys,
                ("missing_keys", "device_map", "device_mesh", "hf_quantizer"),
            ),
            "_initialize_missing_keys": (_runtime.initialize_missing_keys, ("is_quantized",)),
        },
        {"_move_missing_keys_from_meta_to_cpu": False, **markers},
    )
