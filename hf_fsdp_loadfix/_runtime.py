"""What a non-local-rank-0 FSDP process does instead of upstream's post-load steps.

Every wrapper here decides at call time (inside ``from_pretrained``), never at import: the FSDP environment
variables and the process group are usually set up after interpreter start.  Anything that is not a
non-local-rank-0, non-quantized, non-ZeRO-3 FSDP cpu-ram-efficient load is handed to the original function.
"""

import contextlib
import contextvars
import dataclasses
import hashlib
import inspect
import sys
from types import SimpleNamespace

import torch

from . import _config, _sharded
from ._broadcast import FROM_RANK0, group_device

NATIVE = "_hf_fsdp_loadfix_native"  # set on a model whose load transformers distributes itself (DTensors at load)
# inside one model's loading steps: what transformers' is_local_dist_rank_0 answers (None: its own answer)
_role = contextvars.ContextVar("hf_fsdp_loadfix_role", default=None)
# an untested release's proof (_gate.Proof), settled before the first FSDP load the patch changes; None: tested
proof = None
_proving = contextvars.ContextVar("hf_fsdp_loadfix_proving", default=False)


@contextlib.contextmanager
def proving():
    """The proof's own load: the non-rank-0 meta path on every rank, no shard-on-read, no collective."""
    token = _proving.set(True)
    try:
        yield
    finally:
        _proving.reset(token)


def _modeling_utils():
    return sys.modules["transformers.modeling_utils"]


def is_fsdp_load(is_quantized: bool) -> bool:
    """Transformers' own FSDP gate, consulted through ``transformers.modeling_utils`` as upstream does."""
    mu = _modeling_utils()
    return not is_quantized and mu.is_fsdp_enabled() and not mu.is_deepspeed_zero3_enabled()


def is_target(is_quantized: bool) -> bool:
    """A non-loading rank of an FSDP cpu-ram-efficient load: the only case the package changes."""
    return is_fsdp_load(is_quantized) and not _modeling_utils().is_local_dist_rank_0()


def local_dist_rank_0(wrapped, instance, args, kwargs):
    """Wraps transformers' ``is_local_dist_rank_0``: with HF_FSDP_LOADFIX_SOURCE=global only global rank 0 reads
    the checkpoint (accelerate broadcasts from it), every other rank on every node takes the non-rank-0 path. Inside
    a model's loading steps :func:`loader_role` decides: a load transformers distributes itself, every rank reads
    its own slices and finishes as rank 0 does; a shard-on-read load, every rank takes the non-rank-0 path."""
    if _role.get() is not None:
        return _role.get()
    dist = torch.distributed
    if _config.source() == "global" and dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return wrapped(*args, **kwargs)


def _bind(wrapped, args, kwargs):
    """Arguments by name: one wrapper serves every release's signature."""
    return inspect.signature(wrapped).bind(*args, **kwargs)


def _owned_buffers(model, persistent: bool):
    """(module, name, tensor, qualified name) for each buffer a module registers itself, persistent or not."""
    for prefix, module in model.named_modules():
        for name, buf in module._buffers.items():
            if buf is not None and (name not in module._non_persistent_buffers_set) == persistent:
                yield module, name, buf, f"{prefix}.{name}" if prefix else name


def _replace_buffers(model, persistent: bool, want, make):
    """Replace each buffer for which ``want(buf)`` holds by ``make(buf)``; shared buffers stay shared."""
    done = {}
    for module, name, buf, _ in list(_owned_buffers(model, persistent)):
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


# set by activation for a release newer than the table: its non-persistent buffers must also be finite (a model may
# legitimately hold -inf in a mask buffer, so tested releases are not held to that)
untested_release = False


def verify_contract(model) -> None:
    """Non-rank-0, at the end of loading (local, no collective): every state-dict entry on meta, every non-persistent
    buffer real (and finite on an untested release). Cheap; guards releases newer than the table against upstream
    changes the structure check cannot see. Raises naming the entries: under torchrun the agent then stops the
    other ranks."""
    real = [k for k, t in model.state_dict(keep_vars=True).items()
            if isinstance(t, torch.Tensor) and t.device.type != "meta"]
    bad = [q for _, _, buf, q in _owned_buffers(model, persistent=False)
           if buf.device.type == "meta" or (untested_release and (buf.is_floating_point() or buf.is_complex())
                                            and not buf.isfinite().all())]
    if real or bad:
        import transformers

        def some(names):
            return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")

        raise RuntimeError(
            f"hf_fsdp_loadfix: after from_pretrained on this non-local-rank-0 process (transformers "
            f"{transformers.__version__}) the contract does not hold:"
            + (f" state-dict entries not on meta: {some(real)};" if real else "")
            + (f" non-persistent buffers on meta or not finite: {some(bad)};" if bad else "")
            + " upstream changed in a way the package does not handle. Set HF_FSDP_LOADFIX=0 or use a tested "
            "transformers release, and report this."
        )


def _fingerprint(buf) -> str:
    if buf.device.type == "meta":
        return "meta"
    return hashlib.sha1(buf.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def sync_non_persistent_buffers(model, mode: str) -> None:
    """HF_FSDP_LOADFIX_BUFFERS: run on every rank after loading, the same collectives in the same order.

    ``verify``: one all_gather of (name, dtype, shape, hash) per rank; any difference from rank 0 raises on every
    rank, naming the buffers. ``broadcast``: the differing buffers are copied from rank 0 in sorted-name order,
    dtype preserved, on the process group's device. Names, dtypes or shapes that differ always raise.
    """
    if mode == "off":
        return
    dist = torch.distributed
    named = sorted(((q, buf) for _, _, buf, q in _owned_buffers(model, persistent=False)), key=lambda e: e[0])
    mine = [(name, str(buf.dtype), list(buf.shape), _fingerprint(buf)) for name, buf in named]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    layout = [entry[:3] for entry in everyone[0]]
    wrong_layout = [rank for rank, entries in enumerate(everyone) if [e[:3] for e in entries] != layout]
    if wrong_layout:
        raise RuntimeError(
            f"hf_fsdp_loadfix: non-persistent buffer names, dtypes or shapes on ranks {wrong_layout} differ from "
            f"rank 0's {layout}: a broadcast of them would hang or reinterpret bytes"
        )
    differ = {}
    for rank, entries in enumerate(everyone):
        for (name, *_, digest), (*_, digest0) in zip(entries, everyone[0]):
            if digest != digest0:
                differ.setdefault(name, []).append(rank)
    if mode == "verify":
        if differ:
            detail = "; ".join(f"{name} (ranks {ranks})" for name, ranks in sorted(differ.items()))
            raise RuntimeError(
                f"hf_fsdp_loadfix: non-persistent buffers differ from rank 0 after loading: {detail}. The model's "
                "_init_weights does not recompute them; set HF_FSDP_LOADFIX_BUFFERS=broadcast to copy rank 0's."
            )
        return
    device = group_device()
    with torch.no_grad():
        for name, buf in named:
            if name in differ:
                value = buf.detach().to(device)
                dist.broadcast(value, src=0)
                buf.copy_(value)


def distributed_by_transformers(model, load_config) -> bool:
    """transformers shards this load itself (``distributed_config``, a tensor-parallel mesh, or parameters that are
    already DTensors when the loader runs): each rank reads its own slices, as upstream does."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return bool(getattr(model, "_is_distributed_loading_by_transformers", False)
                or getattr(load_config, "device_mesh", None) is not None
                or (dtensor is not None and any(isinstance(p, dtensor.DTensor) for p in model.parameters())))


@contextlib.contextmanager
def _acting(role):
    token = _role.set(role)
    try:
        yield
    finally:
        _role.reset(token)


def loader_role(model):
    """Around upstream's steps of loading ``model``: a load transformers distributes, every rank is its own loader
    (local rank 0); a shard-on-read load, no rank is (each fills its shards from the files later)."""
    sharded = getattr(model, _sharded.SHARDED, None) or _proving.get()
    return _acting(True if getattr(model, NATIVE, False) else False if sharded else None)


def local_rank_0() -> bool:
    """Is this local rank 0, as transformers itself answers outside any loading role?"""
    with _acting(None):
        return _modeling_utils().is_local_dist_rank_0()


def initialises_missing(model) -> bool:
    """Local rank 0 of a shard-on-read load whose checkpoint lacks keys: it runs upstream's steps for those keys as
    the default path's rank 0 does (the other entries stay on meta, marked loaded, so upstream leaves them alone)."""
    source = getattr(model, _sharded.SHARDED, None)
    return bool(source and source.missing) and local_rank_0()


def _meta_guard(module, args):
    """Forward pre-hook on a non-rank-0 model whose weights are on meta: one clear error instead of a meta-tensor
    crash inside torch. Removes itself once the weights are real (filled by FSDP, DDP or the package)."""
    if any(p.device.type == "meta" for p in module.parameters()):
        raise RuntimeError(
            "hf_fsdp_loadfix: this model was loaded under FSDP cpu-ram-efficient loading (ACCELERATE_USE_FSDP and "
            "FSDP_CPU_RAM_EFFICIENT_LOADING set) on a process other than local rank 0 (or with "
            "HF_FSDP_LOADFIX_SOURCE=sharded), so its weights are on meta until they are broadcast from rank 0 (or "
            "read into its shards). Prepare it first (accelerator.prepare(model), accelerate's fsdp2_prepare_model, "
            "or fully_shard + set_model_state_dict(broadcast_from_rank0=True) or hf_fsdp_loadfix.fill_shards), or "
            "load it with FSDP_CPU_RAM_EFFICIENT_LOADING=false (or HF_FSDP_LOADFIX=0) where every rank needs the "
            "weights before that.")
    module._hf_fsdp_loadfix_guard.remove()


def guard_meta_forward(model) -> None:
    model._hf_fsdp_loadfix_guard = model.register_forward_pre_hook(_meta_guard)


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
    quantized = _bind(wrapped, args, kwargs).arguments["hf_quantizer"] is not None
    with loader_role(instance):
        if not is_target(quantized):
            return wrapped(*args, **kwargs)
    if initialises_missing(instance):  # upstream's, as rank 0: only the missing keys leave meta
        with _acting(True):
            wrapped(*args, **kwargs)
    else:
        keep_state_dict_on_meta(instance)
    place_non_persistent_buffers(instance)
    return None


def initialize_missing_keys(wrapped, instance, args, kwargs):
    """``_initialize_missing_keys`` (every class; 4.x and 5.x signatures differ, ``is_quantized`` is common)."""
    is_quantized = _bind(wrapped, args, kwargs).arguments["is_quantized"]
    with loader_role(instance):
        target = is_target(is_quantized)
    if target and initialises_missing(instance):  # upstream's, as rank 0: it initialises only what was not loaded
        with _acting(True):
            result = wrapped(*args, **kwargs)
        _sharded.keep_initialised(instance)
        keep_state_dict_on_meta(instance)
    else:
        with loader_role(instance):
            result = init_non_persistent_buffers(instance) if target else wrapped(*args, **kwargs)
    if is_fsdp_load(is_quantized) and not _proving.get():
        sync_non_persistent_buffers(instance, _config.buffers())
    if target:
        verify_contract(instance)  # after the collective above, so that a raise here cannot hang the others
        guard_meta_forward(instance)
        _sharded.record_loaded(instance)
    return result


def load_pretrained_model(wrapped, instance, args, kwargs):
    """``_load_pretrained_model``, every class: each rank of an FSDP load checks its checkpoint files first (locally,
    no collective: upstream's ``from_pretrained`` has none, and may be called by one rank alone).

    5.x non-rank-0: then hand upstream a meta state dict so no checkpoint data is read, cast or kept, while key
    renaming, expert fusion, dtype plans and the loading report run exactly as on rank 0. (4.x non-rank-0
    already reads shards on meta.) A load transformers distributes itself is upstream's on every rank.
    """
    bound = _bind(wrapped, args, kwargs)
    bound.apply_defaults()
    arg = bound.arguments
    load_config = arg.get("load_config")  # 5.x; 4.x passes the same facts as separate arguments
    options = load_config or SimpleNamespace(
        is_quantized=arg["hf_quantizer"] is not None,
        sharded_metadata=arg["sharded_metadata"],
        ignore_mismatched_sizes=arg["ignore_mismatched_sizes"],
    )
    model = arg["model"]
    if not is_fsdp_load(options.is_quantized):
        return wrapped(*args, **kwargs)
    if distributed_by_transformers(model, load_config):
        setattr(model, NATIVE, True)  # upstream reads each rank's slices; its post-load steps run as on rank 0
        return wrapped(*args, **kwargs)
    if proof is not None and not _proving.get() and not proof.holds():  # failed: the package has stepped aside
        return wrapped(*args, **kwargs)
    from ._checkpoint import check_checkpoint

    check_checkpoint(
        model,
        arg["checkpoint_files"] or [],
        (options.sharded_metadata or {}).get("weight_map"),
        compare_shapes=load_config is None and not options.ignore_mismatched_sizes,
    )
    setattr(model, FROM_RANK0, True)  # on every rank: accelerate's prepare waits for rank 0, fills a non-FSDP model
    if _config.source() == "sharded" and arg["state_dict"] is None and not _proving.get():
        _sharded.decide(model, arg["checkpoint_files"], load_config, arg.get("key_mapping"))
    with loader_role(model):
        if load_config is None or not is_target(load_config.is_quantized):
            return wrapped(*args, **kwargs)
        arg["state_dict"] = meta_state_dict(arg["state_dict"], arg["checkpoint_files"], load_config.weights_only)
        # every loaded weight is placed on meta: upstream's conversions then only compute shapes and dtypes
        arg["load_config"] = dataclasses.replace(load_config, device_map={"": "meta"})
        return wrapped(*bound.args, **bound.kwargs)
