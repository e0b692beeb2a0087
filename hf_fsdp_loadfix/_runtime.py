"""What a non-local-rank-0 FSDP process does instead of upstream's post-load steps.

Every wrapper here decides at call time (inside ``from_pretrained``), never at import: the FSDP environment
variables and the process group are usually set up after interpreter start.  Anything that is not a
non-local-rank-0, non-quantized, non-ZeRO-3 FSDP cpu-ram-efficient load is handed to the original function.
"""

import contextlib
import dataclasses
import inspect
import sys

import torch


def _modeling_utils():
    return sys.modules["transformers.modeling_utils"]


def is_target(is_quantized: bool) -> bool:
    """Transformers' own gate, consulted through ``transformers.modeling_utils`` as upstream does."""
    mu = _modeling_utils()
    return (
        not is_quantized
        and mu.is_fsdp_enabled()
        and not mu.is_local_dist_rank_0()
        and not mu.is_deepspeed_zero3_enabled()
    )


def _bind(wrapped, args, kwargs):
    """Arguments by name: one wrapper serves every release's signature."""
    return inspect.signature(wrapped).bind(*args, **kwargs)


def _owned_buffers(model, persistent: bool):
    """(module, name, tensor) for every buffer the module registers itself, persistent or not."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and (name not in module._non_persistent_buffers_set) == persistent:
                yield module, name, buf


def _replace_buffers(model, persistent: bool, want, make):
    """Replace each buffer for which ``want(buf)`` holds by ``make(buf)``; shared buffers stay shared."""
    done = {}
    for module, name, buf in list(_owned_buffers(model, persistent)):
        if want(buf):
            if id(buf) not in done:
                done[id(buf)] = make(buf)
            module._buffers[name] = done[id(buf)]


def keep_state_dict_on_meta(model) -> None:
    """State-dict entries arrive by broadcast from rank 0: nothing real is kept for them here.

    Parameters are already on meta (the model is built there and the loading hook gives them meta values);
    persistent buffers built on CPU by a 4.x ``__init__`` go to meta too.
    """
    _replace_buffers(model, True, lambda b: b.device.type != "meta", lambda b: b.to("meta"))


def place_non_persistent_buffers(model) -> None:
    """Non-persistent buffers are never broadcast: give each meta one a CPU tensor of its own dtype."""
    _replace_buffers(model, False, lambda b: b.device.type == "meta", lambda b: torch.empty_like(b, device="cpu"))


def _init_guard():
    initialization = sys.modules.get("transformers.initialization")
    guard = getattr(initialization, "guard_torch_init_functions", None)
    return guard() if guard is not None else contextlib.nullcontext()


def init_non_persistent_buffers(model) -> None:
    """Mark the state dict initialised (it comes from rank 0) and compute non-persistent buffers locally.

    ``_init_weights`` runs only on the modules that own a non-persistent buffer, the root included, each
    with the ``_init_weights`` of its nearest enclosing ``PreTrainedModel`` (as upstream's ``smart_apply``
    dispatches for composite models). Parameters are on meta there, so nothing else is computed.
    """
    for tensor in model.state_dict(keep_vars=True).values():
        tensor._is_hf_initialized = True
    pretrained_cls = _modeling_utils().PreTrainedModel

    owners = []

    def walk(module, init_owner):
        if isinstance(module, pretrained_cls):
            init_owner = module
        if any(n in module._buffers and module._buffers[n] is not None for n in module._non_persistent_buffers_set):
            owners.append((init_owner, module))
        for child in module.children():
            walk(child, init_owner)

    walk(model, model)
    with torch.no_grad(), _init_guard():
        for init_owner, module in owners:
            init_owner._init_weights(module)
    model._is_hf_initialized = True


def meta_state_dict(state_dict, checkpoint_files, weights_only: bool):
    """Keys, shapes and dtypes of the checkpoint as meta tensors: safetensors headers or a meta ``torch.load``,
    never tensor data."""
    if state_dict is not None:
        return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in state_dict.items()}
    load_state_dict = _modeling_utils().load_state_dict
    merged = {}
    for file in checkpoint_files:
        merged.update(load_state_dict(file, map_location="meta", weights_only=weights_only))
    return merged


# --- wrapt wrappers, one per upstream function


def move_missing_keys(wrapped, instance, args, kwargs):
    """``_move_missing_keys_from_meta_to_cpu`` (4.x) / ``_move_missing_keys_from_meta_to_device`` (5.x)."""
    if not is_target(_bind(wrapped, args, kwargs).arguments["hf_quantizer"] is not None):
        return wrapped(*args, **kwargs)
    keep_state_dict_on_meta(instance)
    place_non_persistent_buffers(instance)
    return None


def initialize_missing_keys(wrapped, instance, args, kwargs):
    """``_initialize_missing_keys`` (every class; 4.x and 5.x signatures differ, ``is_quantized`` is common)."""
    if not is_target(_bind(wrapped, args, kwargs).arguments["is_quantized"]):
        return wrapped(*args, **kwargs)
    init_non_persistent_buffers(instance)
    return None


def load_pretrained_model(wrapped, instance, args, kwargs):
    """5.x ``_load_pretrained_model``: hand upstream a meta state dict so no checkpoint data is read, cast or kept,
    while key renaming, expert fusion, dtype plans and the loading report run exactly as on rank 0."""
    bound = _bind(wrapped, args, kwargs)
    load_config = bound.arguments["load_config"]
    if not is_target(load_config.is_quantized):
        return wrapped(*args, **kwargs)
    bound.arguments["state_dict"] = meta_state_dict(
        bound.arguments["state_dict"], bound.arguments["checkpoint_files"], load_config.weights_only
    )
    # every loaded weight is placed on meta: upstream's conversions then only compute shapes and dtypes
    bound.arguments["load_config"] = dataclasses.replace(load_config, device_map={"": "meta"})
    return wrapped(*bound.args, **bound.kwargs)
