"""What training frameworks do to a model between ``from_pretrained`` and accelerate's prepare.

Upstream every rank holds real weights there; with the package the other ranks (and, under shard-on-read, every
rank) hold meta entries until the fill. Each step here ends with what upstream ends with: rank 0's values.

- ``resize_token_embeddings`` (TRL's ``clone_chat_template``, LlamaFactory, axolotl). Its default ``mean_resizing``
  samples the new rows from the old rows' mean and covariance, which cannot run on meta. On a meta model the
  package loaded, the mean initialisation is skipped: the new rows are meta, with rank 0's shapes and dtypes, and the
  fill gives rank 0's rows, which rank 0 drew as upstream does. Under shard-on-read local rank 0 first reads the old
  embedding (and an untied head) whole from the files, so the step runs for real there; the resized entries then
  travel as keys the checkpoint lacks do (broadcast from rank 0 at the fill, never read sliced from the files, whose
  shapes they no longer have), and stay real on local rank 0 until then, so that later writes to their rows
  (``.data``, ``torch.no_grad()``) are the ones broadcast.
- The Trainer's device move before prepare (``Trainer._move_model_to_device``, under DDP): every rank builds the
  Trainer, so the model is filled from rank 0 there, as DDP's construction would, and then moved.
- The Trainer's own ``cpu_ram_efficient_loading`` under plain ``torchrun``: transformers 5.x ``TrainingArguments``
  sets ``FSDP_CPU_RAM_EFFICIENT_LOADING`` but not ``ACCELERATE_USE_FSDP``, so transformers' FSDP gate stays closed and
  every rank loads everything. The package records what the arguments asked for (``fsdp_plugin_args``, what the
  Trainer gives accelerate's FSDP plugin) and opens the gate for the ``from_pretrained`` calls that follow.
"""

import torch

from . import _broadcast, _runtime, _sharded, _wait

# TrainingArguments asked for FSDP with cpu_ram_efficient_loading (the last one built in this process says)
trainer_asked = False


def _meta(tensor) -> bool:
    return tensor is not None and tensor.device.type == "meta"


def skip_mean_on_meta(wrapped, instance, args, kwargs):
    """``_init_added_embeddings_weights_with_mean(old, new, ...)`` / ``_init_added_lm_head_bias_with_mean(old, new,
    ...)``: nothing to compute on a meta model the package loaded (rank 0's rows arrive at the fill)."""
    old = args[0] if args else next(iter(kwargs.values()))
    if _broadcast.from_rank0(instance) and (_meta(getattr(old, "weight", None)) or _meta(getattr(old, "bias", None))):
        return None
    return wrapped(*args, **kwargs)


def _resized(model) -> dict:
    """The entries ``resize_token_embeddings`` replaces, by role: input and output embeddings' weight (and bias)."""
    modules = {"input": model.get_input_embeddings(), "output": model.get_output_embeddings()}
    return {(role, attr): getattr(m, attr) for role, m in modules.items() if m is not None
            for attr in ("weight", "bias") if getattr(m, attr, None) is not None}


def resize_token_embeddings(wrapped, instance, args, kwargs):
    """``resize_token_embeddings`` of a model loaded for shard-on-read (elsewhere it is upstream's, with the mean
    initialisation skipped on meta): local rank 0 runs it on the old values read from the files, every rank then
    moves the resized entries from "read from the files" to "from rank 0" alike."""
    root, source = _sharded.source_of(instance)
    before = _resized(instance)
    asked = _runtime._bind(wrapped, args, kwargs).arguments
    resizes = asked.get("new_num_tokens") is not None or asked.get("pad_to_multiple_of") is not None
    if source is None or not resizes or not any(_meta(p) for p in before.values()):
        return wrapped(*args, **kwargs)
    keys = {}  # id -> the state-dict keys naming it, in state-dict order (the same before and after the resize)
    for key, tensor in root.state_dict(keep_vars=True).items():
        keys.setdefault(id(tensor), []).append(key)
    names = {role: keys[id(p)] for role, p in before.items()}
    rank0 = _runtime.local_rank_0()
    if rank0:
        with torch.no_grad():
            for param in {id(p): p for p in before.values() if _meta(p)}.values():
                value = _sharded.whole_value(source, keys[id(param)][0])
                torch.utils.swap_tensors(param, torch.nn.Parameter(value, param.requires_grad))
    result = wrapped(*args, **kwargs)
    after = _resized(instance)
    for param in {id(p): p for p in after.values()}.values():  # one entry per tensor, with its tied names
        tied = dict.fromkeys(k for role, p in after.items() if p is param for k in names[role])
        _sharded.from_rank0_now(source, list(tied), param.detach() if rank0 else None)
    return result


def meta_buffers_from_rank0(model) -> None:
    """Before the first broadcast of a prepare: non-persistent buffers that a step after ``from_pretrained`` built from
    meta weights (peft's ``trainable_tokens_original``, rows of the embedding) are meta off rank 0, and nothing
    broadcasts non-persistent buffers. Rank 0's, one broadcast each in name order, placed on the CPU as the package
    places computed buffers. A collective, every rank alike (the same buffers; which are meta anywhere is agreed);
    one clear error on every rank where rank 0 has no value either (shard-on-read)."""
    import torch.distributed as dist

    owned = _runtime._owned_buffers(model, persistent=False)
    named = sorted(((q, module, name, buf) for module, name, buf, q in owned), key=lambda entry: entry[0])
    if not named:
        return
    device, rank0 = _broadcast.group_device(), dist.get_rank() == 0
    here = [buf.device.type == "meta" for *_, buf in named]
    flags = torch.tensor([here, [m and rank0 for m in here]], dtype=torch.int32, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    lacking = [q for (q, *_), f in zip(named, flags[1].tolist()) if f]
    if lacking:
        raise RuntimeError(
            f"hf_fsdp_loadfix: non-persistent buffers built after from_pretrained from weights no rank holds yet: "
            f"{', '.join(lacking[:5])}. Under HF_FSDP_LOADFIX_SOURCE=sharded rank 0 is on meta too: use "
            "HF_FSDP_LOADFIX_SOURCE=local for this job, or add them after prepare.")
    for (q, module, name, buf), flag in zip(named, flags[0].tolist()):
        if flag:
            value = buf.to(device) if rank0 else torch.empty(buf.shape, dtype=buf.dtype, device=device)
            dist.broadcast(value, src=0, group=dist.group.WORLD)
            if not rank0:
                module._buffers[name] = value.to("cpu")


def fill_whole(model, device) -> None:
    """A model loaded under FSDP cpu-ram-efficient loading that is used without FSDP (DDP, no wrapper): every rank
    ends with rank 0's values (shard-on-read: each reads them from the files), as DDP's construction gives. A
    collective, on every rank; once per model."""
    if not _broadcast.from_rank0(model):
        return
    _wait.wait_for_rank0(model)
    meta_buffers_from_rank0(model)
    if _sharded.source_of(model)[1] is not None:  # shard-on-read: no rank holds it; each reads it whole
        _sharded.fill(model, device)
    else:
        _broadcast.fill_from_rank0(model, device)
    _filled(model)


def move_model_to_device(wrapped, instance, args, kwargs):
    """``Trainer._move_model_to_device(model, device)``: filled from rank 0 first (every rank builds the Trainer)."""
    bound = _runtime._bind(wrapped, args, kwargs)
    fill_whole(bound.arguments["model"], bound.arguments["device"])
    return wrapped(*args, **kwargs)


def trl_prepare_fsdp(wrapped, instance, args, kwargs):
    """trl's ``prepare_fsdp(model, accelerator)``, which shards a reference model (DPO, GRPO, RLOO, KTO) that trl
    loaded itself after the Accelerator set the FSDP variables: under FSDP2 a plain ``fully_shard``, no broadcast.
    Filled after it, as accelerate's prepare fills (rank 0's state broadcast; shard-on-read: each rank's slices).
    FSDP1 broadcasts itself (``sync_module_states``)."""
    bound = _runtime._bind(wrapped, args, kwargs)
    model, accelerator = bound.arguments["model"], bound.arguments["accelerator"]
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if not _broadcast.pending(model) or getattr(plugin, "fsdp_version", None) != 2:
        return wrapped(*args, **kwargs)
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    _wait.wait_for_rank0(model)
    meta_buffers_from_rank0(model)
    sharded = _sharded.source_of(model)[1] is not None
    full = model.state_dict() if dist.get_rank() == 0 and not sharded else {}
    result = wrapped(*args, **kwargs)
    if sharded:
        _sharded.fill(result, accelerator.device)
    else:
        if hasattr(result, "tie_weights"):
            result.tie_weights()  # tied aliases point at the sharded parameter
        set_model_state_dict(result, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    _filled(model)
    return result


def _filled(model) -> None:
    """Nothing is pending from rank 0 any more for ``model``."""
    for module in model.modules():
        if getattr(module, _broadcast.FROM_RANK0, False):
            setattr(module, _broadcast.FROM_RANK0, False)


def training_args_post_init(wrapped, instance, args, kwargs):
    """``TrainingArguments.__post_init__``: record whether it asked for FSDP with ``cpu_ram_efficient_loading``."""
    global trainer_asked

    result = wrapped(*args, **kwargs)
    plugin_args = getattr(instance, "fsdp_plugin_args", None)
    trainer_asked = bool(isinstance(plugin_args, dict) and plugin_args.get("cpu_ram_efficient_loading"))
    return result


def fsdp_enabled(wrapped, instance, args, kwargs):
    """transformers' ``is_fsdp_enabled()``, also true where ``TrainingArguments`` asked for FSDP with
    ``cpu_ram_efficient_loading`` (5.x sets only ``FSDP_CPU_RAM_EFFICIENT_LOADING``), the process group is up and
    that variable still says true: the gate ``accelerate launch`` opens, and 4.57's arguments opened."""
    if wrapped(*args, **kwargs):
        return True
    if not trainer_asked:
        return False
    import os

    from ._config import STRTOBOOL_TRUE

    dist = torch.distributed
    efficient = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").strip().lower() in STRTOBOOL_TRUE
    return dist.is_available() and dist.is_initialized() and efficient


# PreTrainedModel attribute -> its wrapper (where the release has it)
MODEL_STEPS = {"resize_token_embeddings": resize_token_embeddings,
               "_init_added_embeddings_weights_with_mean": skip_mean_on_meta,
               "_init_added_lm_head_bias_with_mean": skip_mean_on_meta}
