"""accelerate >= 1.14 (recognised by structure): rank 0's memory in ``fsdp2_prepare_model``.

Under mixed precision accelerate upcasts every trainable parameter to fp32 in place on every rank before it captures
the full state dict, so rank 0 holds an fp32 copy of the whole model (4 B/param) next to the shards it builds; it
then broadcasts fp32 (twice the checkpoint's bytes) and ``distribute_tensor`` scatters each tensor again from rank 0
although every rank already holds it.

Streaming instead: rank 0 keeps the tensors ``from_pretrained`` gave it (memory-mapped where transformers left them
so) and moves its parameters to ``meta`` like every other rank, so accelerate's upcast, sharding and state-dict
capture cost nothing. The load then broadcasts each tensor once in its loaded dtype, every rank slices its own
shard locally (as torch's ``_distribute_tensors`` does) and casts it to the dtype accelerate gives the parameter.
bf16/fp16 -> fp32 is exact and slicing commutes with an element-wise cast, so every shard is bitwise what accelerate
produces. Only a rank's own shards outlive a step.
"""

import ast
import contextvars
import inspect
import math
import textwrap

import torch

from . import _broadcast, _config
from ._shard import as_target, local_slice

PREPARE = "fsdp2_prepare_model"
LOAD = "fsdp2_load_full_state_dict"
# everything accelerate's fsdp2_load_full_state_dict calls, per release that streaming replaces: a release that calls
# anything else (or no longer calls one of these) is not streamed
LOAD_CALLS = {
    "1.14-1.15": {"KeyError", "_cast_and_contiguous", "_infer_parameter_dtype", "broadcast", "contiguous", "detach",
                  "distribute_tensor", "empty", "get_parameter_or_buffer", "get_submodule", "getattr", "hasattr",
                  "is_contiguous", "isinstance", "items", "len", "load_state_dict", "rsplit", "size", "state_dict",
                  "to", "to_local"},
    # plain tensors handled (accelerate#3898 fixed), the target's dtype read through getattr
    "1.16": {"KeyError", "_cast_and_contiguous", "_get_target_contiguity_and_dtype", "broadcast", "contiguous",
             "detach", "distribute_tensor", "empty", "get_submodule", "getattr", "is_contiguous", "isinstance",
             "items", "len", "load_state_dict", "rpartition", "size", "state_dict", "to", "to_local"},
}
_active = contextvars.ContextVar("hf_fsdp_loadfix_stream", default=None)
applies = False  # set where this accelerate's structure is the one streamed (``mismatch`` is None)


def _tree(fn):
    return ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(fn))))


def _calls(tree) -> set:
    return {n.func.attr if isinstance(n.func, ast.Attribute) else n.func.id
            for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, (ast.Attribute, ast.Name))}


def _upcast_then_capture(tree) -> bool:
    """accelerate 1.14's shape: ``p.data = p.data.to(torch.float32)`` in a loop over ``model.named_parameters()``,
    then ``sd = model.state_dict()``, and ``sd`` handed to ``fsdp2_load_full_state_dict``."""
    upcast = [loop.lineno for loop in ast.walk(tree)
              if isinstance(loop, ast.For) and "named_parameters" in _calls(loop.iter)
              and any(isinstance(a, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr == "data"
                                                        for t in a.targets)
                      and "float32" in ast.unparse(a.value) for a in ast.walk(loop))]
    captured = {t.id: node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute)
                and node.value.func.attr == "state_dict" for t in node.targets if isinstance(t, ast.Name)}
    handed = {a.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
              and n.func.id == LOAD and len(n.args) >= 3 for a in n.args[2:3] if isinstance(a, ast.Name)}
    return bool(upcast) and any(captured.get(name, 0) > min(upcast) for name in handed)


def mismatch(fsdp_utils) -> str | None:
    """None when accelerate's ``fsdp2_prepare_model`` upcasts before capturing the state dict and its
    ``fsdp2_load_full_state_dict`` is the one this module replaces, else why it is not streamed."""
    import accelerate

    prepare, load = getattr(fsdp_utils, PREPARE, None), getattr(fsdp_utils, LOAD, None)
    if not (callable(prepare) and callable(load)):
        return f"not needed: accelerate {accelerate.__version__} has no {PREPARE}/{LOAD}"
    try:
        prepare_tree, load_tree = _tree(prepare), _tree(load)
    except (OSError, TypeError, SyntaxError):
        return f"not applied: the source of accelerate's {PREPARE}/{LOAD} is not readable"
    if not _upcast_then_capture(prepare_tree):
        return (f"not needed: accelerate {accelerate.__version__}'s {PREPARE} does not upcast parameters before "
                "capturing the state dict it broadcasts")
    params = tuple(inspect.signature(load).parameters)
    calls = _calls(load_tree)
    if params != ("accelerator", "model", "full_sd", "cpu_offload") or calls not in LOAD_CALLS.values():
        nearest = min(LOAD_CALLS.values(), key=lambda known: len(calls ^ known))
        diff = sorted(calls ^ nearest)
        return (f"not applied: accelerate {accelerate.__version__}'s {LOAD}{params} is not one streaming replaces "
                f"({', '.join(LOAD_CALLS)}){'; calls differ: ' + ', '.join(diff) if diff else ''}")
    return None


class _Stream:
    def __init__(self, model, plan, low):
        self.model, self.plan, self.low = model, plan, low  # plan: rank 0's {key: (dtype, shape)}, in its order


def _static_skip(accelerator, model) -> bool:
    """The cases accelerate's own cpu-ram-efficient broadcast does not run, or that streaming leaves to it."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    plugin = accelerator.state.fsdp_plugin
    inner = getattr(model, "_orig_mod", model)
    return (not plugin.cpu_ram_efficient_loading or getattr(plugin, "ignored_modules", None) is not None
            or isinstance(model, FSDPModule) or isinstance(inner, FSDPModule)
            or any(p.__class__.__name__ == "Params4bit" or isinstance(p, DTensor) for p in model.parameters()))


def _params_to_meta(model) -> None:
    """What accelerate's ``model.to("meta")`` does to real parameters (a new ``Parameter`` on meta, same
    ``requires_grad``), done early and keeping shared parameters shared."""
    new = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.device.type != "meta":
                if id(param) not in new:
                    new[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="meta"), param.requires_grad)
                module._parameters[name] = new[id(param)]


def prepare_model(wrapped, instance, args, kwargs):
    """Inside the ``fsdp2_prepare_model`` wrapper (``_accelerate.prepare_fsdp2``): rank 0's parameters go to meta
    before accelerate sees them (their loaded tensors are kept aside for the streaming load below), on every rank."""

    def call(accelerator, model, *rest, **kw):
        if not _config.stream() or _static_skip(accelerator, model):
            return wrapped(accelerator, model, *rest, **kw)
        plan = _broadcast.agree(model, accelerator.device, upcast=accelerator.mixed_precision != "no")
        low = {}
        if accelerator.is_main_process:
            low = {k: v.detach() for k, v in model.state_dict().items()}
        _params_to_meta(model)
        token = _active.set(_Stream(model, plan, low))
        try:
            return wrapped(accelerator, model, *rest, **kw)
        finally:
            _active.reset(token)

    return call(*args, **kwargs)


def stream_for(model):
    """The streaming state of the ``fsdp2_prepare_model`` call that is loading ``model``, if any."""
    stream = _active.get()
    return stream if stream is not None and stream.model is model else None


def load(stream, accelerator, model, cpu_offload=False):
    """accelerate 1.14-1.16's ``fsdp2_load_full_state_dict`` (key-based, one broadcast per key from global rank 0, each
    shard cast to the parameter's dtype, contiguous as the parameter is, on CPU under ``cpu_offload``), streamed:
    each tensor is broadcast once in its loaded dtype (received into one reused buffer the size of the largest tensor:
    no allocation per tensor, so no fragmentation), each rank copies out its own slice as torch's
    ``_distribute_tensors`` does, and a parameter tied to an earlier key (same tensor) is broadcast once."""
    import torch.distributed as dist

    targets = model.state_dict(keep_vars=True)  # meta DTensors, named as the state dict names them
    keys = [k for k in stream.plan if k in targets]  # rank 0's order; plain buffers: the accelerate#3898 fix's
    device = targets[keys[0]].device_mesh.device_type if keys else "cpu"
    buffer = torch.empty(max((math.prod(stream.plan[k][1]) * stream.plan[k][0].itemsize for k in keys), default=0),
                         dtype=torch.uint8, device=device)
    sharded, done = {}, {}
    for key in keys:
        target, value = targets[key], stream.low.pop(key, None)
        if id(target) not in done:
            dtype, shape = stream.plan[key]
            if accelerator.is_main_process and value.device.type == device and value.is_contiguous():
                full = value  # sent as it is (memory-mapped where transformers left it so)
            else:
                full = buffer[:math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                if accelerator.is_main_process:
                    full.copy_(value)
            dist.broadcast(full, src=0, group=dist.group.WORLD)
            done[id(target)] = as_target(local_slice(full, target.device_mesh, target.placements), target, cpu_offload)
        sharded[key] = done[id(target)]
        del value
    stream.low.clear()
    del buffer
    model.load_state_dict(sharded, assign=True)
    return model
