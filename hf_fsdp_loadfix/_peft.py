"""peft adapters on a model loaded under FSDP cpu-ram-efficient loading.

Initialisations that compute the adapter from the base weights (``init_lora_weights`` = pissa, olora, corda, eva,
loftq) cannot run before prepare: the base weights are on meta off local rank 0 (on every rank under
shard-on-read). ``inject_adapter`` raises one clear error on every rank instead of a meta-tensor crash inside torch.

Under shard-on-read: peft creates an adapter on CPU (its own initialisation, from the process's
random state) and then moves it to its base layer's device: under shard-on-read every base layer is on meta, on
rank 0 too, so the values peft made would be lost on every rank. On local rank 0 this keeps them, cast as the
default path's rank 0 ends with them (peft's own move, to CPU in the base layer's dtype), beside the layer; the
fill broadcasts them from rank 0, named as the state dict names them. Every other case is peft's own move.
"""

import torch

from ._sharded import KEPT

MOVE = "_move_adapter_to_device_of_base_layer"
INJECT = "inject_adapter"
READS_BASE = ("pissa", "olora", "corda", "eva", "loftq")  # init_lora_weights values computed from the base weights


def _keeps(layer) -> bool:
    """Local rank 0 of a shard-on-read FSDP load, and a base layer on meta."""
    import sys

    from . import _config, _runtime

    if _config.source() != "sharded" or "transformers.modeling_utils" not in sys.modules:
        return False
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.device.type == "meta" and _runtime.is_fsdp_load(False) \
        and _runtime.local_rank_0()


def move_adapter(wrapped, instance, args, kwargs):
    """``BaseTunerLayer._move_adapter_to_device_of_base_layer(adapter_name, device=None)``."""
    from ._runtime import _bind

    bound = _bind(wrapped, args, kwargs)
    if bound.arguments.get("device") is not None or not _keeps(instance):
        return wrapped(*args, **kwargs)
    adapter = bound.arguments["adapter_name"]
    wrapped(adapter, device=torch.device("cpu"))  # as on the default path's rank 0: CPU, the base layer's dtype
    kept = vars(instance).setdefault(KEPT, {})
    for attr in (*instance.adapter_layer_names, *instance.other_param_names):
        holder = getattr(instance, attr, None)
        if isinstance(holder, torch.nn.Module) and adapter in getattr(holder, "keys", lambda: ())():
            item = holder[adapter]
            tensors = item.state_dict(keep_vars=True) if isinstance(item, torch.nn.Module) else {"": item}
            for name, tensor in tensors.items():
                if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu":
                    kept[".".join(p for p in (attr, adapter, name) if p)] = tensor.detach().clone()
    return wrapped(*args, **kwargs)


def inject_adapter(wrapped, instance, args, kwargs):
    """``BaseTuner.inject_adapter(model, adapter_name, ...)``: an initialisation that reads the base weights, on a
    model whose weights only rank 0 holds (every rank alike), is one clear error."""
    from ._broadcast import pending
    from ._runtime import _bind

    bound = _bind(wrapped, args, kwargs)
    init = getattr(instance.peft_config.get(bound.arguments["adapter_name"]), "init_lora_weights", None)
    if isinstance(init, str) and init.lower().startswith(READS_BASE) and pending(bound.arguments["model"]):
        raise RuntimeError(
            f"hf_fsdp_loadfix: peft's init_lora_weights={init!r} computes the adapter from the base weights, but this "
            "model was loaded under FSDP cpu-ram-efficient loading: until accelerate's prepare, only local rank 0 "
            "holds them (no rank under HF_FSDP_LOADFIX_SOURCE=sharded). Load the model with "
            "FSDP_CPU_RAM_EFFICIENT_LOADING=false so that every rank reads the weights (or set HF_FSDP_LOADFIX=0), "
            "or use an initialisation that does not read them (init_lora_weights=True/'gaussian').")
    return wrapped(*args, **kwargs)
