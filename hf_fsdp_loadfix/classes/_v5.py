"""The 5.x patch set shared by C3-C7: their upstream bodies differ, the functions and signatures do not."""

from .. import _runtime
from . import PatchSet

POST_LOAD = ("_move_missing_keys_from_meta_to_device", "_initialize_missing_keys")


def patch_set(name: str, kernels: bool = False, **markers: bool) -> PatchSet:
    callers = {"_finalize_model_loading": POST_LOAD} if markers.get("_finalize_model_loading") else {}
    if kernels:  # from_pretrained's tail kernelizes the loaded model (C7)
        callers["from_pretrained"] = ("set_use_kernels",)
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
        # C4-C7's post-load caller must still call both (C3 also spans 5.0.0's _finalize_load_state_dict)
        callers=callers,
        load_config=("is_quantized", "sharded_metadata", "ignore_mismatched_sizes", "weights_only", "device_map"),
        init_guard=True,
        kernels=kernels,
    )
