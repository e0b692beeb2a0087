"""accelerate's entry points, wrapped.

Every ``fsdp2_prepare_model`` and ``Accelerator.prepare_model`` of a model loaded under FSDP cpu-ram-efficient
loading first waits for rank 0 to get there (``_wait``: no collective timeout can fire during rank 0's load). A
model ``Accelerator.prepare_model`` prepares without FSDP (``Accelerator(cpu=True, fsdp_plugin=...)`` runs DDP with
the FSDP variables still set) is filled from rank 0 first (``_steps.fill_whole``): DDP cannot copy out of
meta, and a model with no wrapper would keep meta weights.

Each accelerate hook is gated on what it is for, recognised by structure, not by version:
- ``fsdp2_load_full_state_dict`` (1.6+) is wrapped wherever it exists: shard-on-read fills there (every rank reads its
  own slices), and the rank-0 stream replaces it where ``_stream`` recognises it.
- The accelerate#3898 fix (``buffer_fix``), where the load still assumes every state-dict entry is a DTensor
  (1.6.0-1.15.0): a persistent plain-tensor buffer (DeepSeek-V3's ``e_score_correction_bias``) crashes it on rank 0
  with ``'Tensor' object has no attribute 'device_mesh'``. The wrapper broadcasts such buffers whole from rank 0
  (dtype preserved, sorted by name, before accelerate's own broadcasts on every rank) and hides them from accelerate
  while it handles the DTensors exactly as before. 1.16 handles plain tensors itself. The stream always does this.
- The optimizer mapping (``prepare_fsdp2_accelerator``), where ``Accelerator._prepare_fsdp2`` maps parameters by
  ``data_ptr()`` (1.6-1.15); 1.16 maps meta parameters by identity itself (``_get_parameter_id``)."""

import ast
import inspect
import textwrap

import torch

from . import _broadcast, _sharded, _steps, _stream, _wait
from ._runtime import _bind, _owned_buffers

TARGET = "fsdp2_load_full_state_dict"
PREPARE = _stream.PREPARE
PARAMS = ("accelerator", "model", "full_sd")  # what the wrapper passes positionally
buffer_fix = False  # set where accelerate's load has accelerate#3898's shape (``mismatch`` is None)


def load_mismatch(fsdp_utils) -> str | None:
    """None when ``fsdp2_load_full_state_dict`` exists with the parameters the wrapper passes, else why not."""
    import accelerate

    fn = getattr(fsdp_utils, TARGET, None)
    if not callable(fn):
        return f"not applied: accelerate {accelerate.__version__} has no {TARGET}"
    params = tuple(inspect.signature(fn).parameters)
    if params[:3] != PARAMS:
        return f"not applied: accelerate's {TARGET}{params} does not start with {PARAMS}"
    return None


def optimizer_mismatch(accelerator_module) -> str | None:
    """None when ``Accelerator._prepare_fsdp2`` maps the optimizer's parameters by ``data_ptr()`` (0 for every meta
    parameter), else why the mapping is left to accelerate."""
    import accelerate

    fn = vars(accelerator_module.Accelerator).get("_prepare_fsdp2")
    if not callable(fn):
        return f"not needed: accelerate {accelerate.__version__} has no Accelerator._prepare_fsdp2"
    names = inspect.unwrap(fn).__code__.co_names
    if "_get_parameter_id" in names or "data_ptr" not in names:
        return (f"not needed: accelerate {accelerate.__version__} maps meta parameters by identity itself "
                "(_get_parameter_id)")
    return None


def mismatch(fsdp_utils) -> str | None:
    """None when ``fsdp2_load_full_state_dict`` has accelerate#3898's shape (recognised by structure, not by version),
    else why it is not wrapped."""
    import accelerate

    why = load_mismatch(fsdp_utils)
    if why:
        return why
    fn = getattr(fsdp_utils, TARGET)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(fn))))
    except (OSError, TypeError, SyntaxError):
        return f"not applied: the source of accelerate's {TARGET} is not readable, its shape cannot be recognised"
    if not unchecked_mesh_loop(tree):
        return (f"not needed: accelerate {accelerate.__version__}'s {TARGET} handles plain tensors (no loop over "
                "model.state_dict() reads .device_mesh without a type check)")
    return None


def unchecked_mesh_loop(tree) -> bool:
    """accelerate#3898's shape: a loop over the entries of ``sd = model.state_dict()`` that reads ``.device_mesh`` off
    an entry without an ``isinstance``/``hasattr`` test of that entry in the loop."""

    def names(node):
        return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}

    state_dicts = {
        target.id
        for node in ast.walk(tree) if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Attribute) and node.value.func.attr == "state_dict"
        for target in node.targets if isinstance(target, ast.Name)
    }
    for loop in ast.walk(tree):
        if not (isinstance(loop, ast.For) and state_dicts & names(loop.iter)):
            continue
        read = {n.value.id for n in ast.walk(loop)
                if isinstance(n, ast.Attribute) and n.attr == "device_mesh" and isinstance(n.value, ast.Name)}
        tested = {n.args[0].id for n in ast.walk(loop)
                  if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in ("isinstance", "hasattr")
                  and n.args and isinstance(n.args[0], ast.Name)}
        if (read & names(loop.target)) - tested:
            return True
    return False


def _plain_buffers(model):
    """(state-dict key, owners) for each persistent buffer that is no DTensor, sorted by key. Keys are the state
    dict's own names (wrapper prefixes such as ``_checkpoint_wrapped_module.`` already stripped, ``_orig_mod.``
    and peft's kept), found by tensor identity; owners are the (module, name) pairs that register the tensor."""
    from torch.distributed.tensor import DTensor

    owners = {}
    for owner, leaf, buf, _ in _owned_buffers(model, persistent=True):
        owners.setdefault(id(buf), []).append((owner, leaf))
    return sorted(
        (key, owners[id(t)]) for key, t in model.state_dict(keep_vars=True).items()
        if id(t) in owners and not isinstance(t, DTensor)
    )


def load_full_state_dict(wrapped, instance, args, kwargs):
    def call(accelerator, model, full_sd, *rest, **kw):
        import torch.distributed as dist

        if _sharded.source_of(model)[1] is not None:  # every rank reads its own slices: nothing to broadcast
            _sharded.fill(model, accelerator.device, *rest, **kw)
            return model
        stream = _stream.stream_for(model)
        if stream is None and not buffer_fix:
            return wrapped(accelerator, model, full_sd, *rest, **kw)
        plain = _plain_buffers(model)
        for key, owners in plain:
            current = owners[0][0]._buffers[owners[0][1]]
            if accelerator.is_main_process:
                value = full_sd[key].detach().to(accelerator.device).contiguous()
            else:
                value = torch.empty(current.shape, dtype=current.dtype, device=accelerator.device)
            dist.broadcast(value, src=0, group=dist.group.WORLD)
            for owner, leaf in owners:
                owner._buffers[leaf] = value
                # hidden from accelerate's DTensor-only loop: model.state_dict() and full_sd both lose the key, so
                # the zip-ordered loop of accelerate 1.6-1.13 stays aligned
                owner._non_persistent_buffers_set.add(leaf)
        try:
            if stream is not None:
                return _stream.load(stream, accelerator, model, *rest, **kw)
            keys = {key for key, _ in plain}
            return wrapped(accelerator, model, {k: v for k, v in full_sd.items() if k not in keys}, *rest, **kw)
        finally:
            for _, owners in plain:
                for owner, leaf in owners:
                    owner._non_persistent_buffers_set.discard(leaf)

    return call(*args, **kwargs)


def prepare_fsdp2(wrapped, instance, args, kwargs):
    """``fsdp2_prepare_model(accelerator, model)``: wait for rank 0, then accelerate's (streamed where that applies)."""
    model = _bind(wrapped, args, kwargs).arguments["model"]
    if _broadcast.from_rank0(model):
        _wait.wait_for_rank0(model)
        _steps.meta_buffers_from_rank0(model)
    if _stream.applies and _sharded.source_of(model)[1] is None:
        return _stream.prepare_model(wrapped, instance, args, kwargs)
    return wrapped(*args, **kwargs)


def prepare_model(wrapped, instance, args, kwargs):
    """``Accelerator.prepare_model``: FSDP1 (its ``sync_module_states`` broadcast), DDP and no wrapper at all. A model
    loaded under the FSDP variables waits for rank 0; prepared without FSDP, it is filled from rank 0 first."""
    from accelerate.utils import DistributedType

    model = _bind(wrapped, args, kwargs).arguments["model"]
    if _broadcast.from_rank0(model) and not getattr(model, "_is_accelerate_prepared", False):
        if instance.distributed_type != DistributedType.FSDP:
            _steps.fill_whole(model, instance.device)
        else:
            _wait.wait_for_rank0(model)
    return wrapped(*args, **kwargs)


def prepare_fsdp2_accelerator(wrapped, instance, args, kwargs):
    """``Accelerator._prepare_fsdp2(*args)`` (``prepare(model, optimizer)`` under FSDP2) of accelerate 1.6-1.15 maps the
    optimizer's parameters to the sharded ones by ``data_ptr()``, which is 0 for every meta parameter: off rank 0 (and
    on every rank under shard-on-read) the optimizer would end with one parameter repeated, and train silently wrong.
    Each meta parameter answers a distinct ``data_ptr()`` (its ``id``) for the duration of the call."""
    shadowed = [p for obj in args if _broadcast.from_rank0(obj) for p in obj.parameters() if p.device.type == "meta"]
    for param in shadowed:
        param.data_ptr = (lambda key=id(param): key)
    try:
        return wrapped(*args, **kwargs)
    finally:
        for param in shadowed:
            vars(param).pop("data_ptr", None)
