"""Shard-on-read (``HF_FSDP_LOADFIX_SOURCE=sharded``): every rank, rank 0 included, reads only its own slices of the
checkpoint, so no rank holds the whole model and nothing is broadcast.

``from_pretrained`` (every rank takes the non-rank-0 path: meta state dict, real non-persistent buffers) keeps a
:class:`Source` on the model: for each state-dict key, the safetensors file and checkpoint key it loads unchanged
from, and the dtype ``from_pretrained`` gave it. After FSDP2 has sharded the meta model (accelerate's
``fsdp2_prepare_model``, or your own ``fully_shard``), :func:`fill` reads each local shard through safetensors
``get_slice`` (only this rank's bytes), casts it as the default path would (checkpoint dtype -> loaded dtype -> the
dtype accelerate gives the parameter) and assigns it. Slicing commutes with an element-wise cast, so every shard is
bitwise the default path's.

A load this cannot serve exactly is left to the default path when ``from_pretrained`` runs, with one log line
naming why: .bin/pickle checkpoints, a key transformers renames or converts at load (5.x weight conversions such as
expert fusion, 4.x ``key_mapping`` or legacy renames), keys missing from the checkpoint (a new head: rank 0
initialises them), shapes that differ (``ignore_mismatched_sizes``). The decision depends only on the model and the
checkpoint's headers, so every rank takes it alike.
"""

import dataclasses
import logging
import os

import torch

from ._shard import as_target, local_index

logger = logging.getLogger("hf_fsdp_loadfix")
SHARDED = "_hf_fsdp_loadfix_sharded"  # the model's Source, or None where the default path serves it
last = {"shard_on_read": "no shard-on-read load yet"}


@dataclasses.dataclass
class Source:
    files: dict  # state-dict key -> (safetensors file, checkpoint key), read unchanged
    loaded: dict = dataclasses.field(default_factory=dict)  # state-dict key -> dtype from_pretrained gave it


def _headers(files):
    from safetensors import safe_open

    found = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            found.update({k: (path, list(f.get_slice(k).get_shape())) for k in f.keys()})
    return found


def _converted(key, weight_mapping, fix_key):
    """Does transformers rename or convert this checkpoint key at load?  (5.x: a weight transform matches it; 4.x:
    ``_fix_state_dict_key_on_load`` or ``key_mapping`` changes it.)"""
    for transform in weight_mapping or ():
        if transform.rename_source_key(key)[1] is not None:
            return type(transform).__name__
    if fix_key is not None:
        fixed = fix_key(key)
        if (fixed[0] if isinstance(fixed, tuple) else fixed) != key:
            return "a legacy rename"
    return None


def plan(model, files, weight_mapping=None, key_mapping=None):
    """(Source, None) where every state-dict entry loads unchanged from one safetensors key of its shape, else
    (None, why)."""
    if not files or not all(f.endswith(".safetensors") for f in files):
        return None, ".bin/pickle checkpoint (slices can only be read from safetensors)"
    if key_mapping:
        return None, "transformers renames keys at load (key_mapping, or the model's legacy checkpoint names)"
    try:
        headers = _headers(files)
        fix_key = getattr(model, "_fix_state_dict_key_on_load", None) if weight_mapping is None else None
        for key in sorted(headers):
            how = _converted(key, weight_mapping, fix_key)
            if how:
                return None, f"transformers converts {key} at load ({how}); shard-on-read reads keys loaded unchanged"
    except Exception as err:  # noqa: BLE001 - an unreadable header or a transform API this code does not know
        return None, f"the checkpoint's keys could not be matched ({type(err).__name__}: {err})"
    prefix, entries = model.base_model_prefix, model.state_dict(keep_vars=True)
    # tied keys (target -> source): 4.x ties at construction (one tensor), 5.x after loading (all_tied_weights_keys)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    files_of, first, missing, shapes = {}, {}, [], []
    for key, tensor in entries.items():
        if id(tensor) in first or tied.get(key) in entries:  # tied to another key: filled with it
            files_of[key] = tied.get(key) or first[id(tensor)]
            continue
        first[id(tensor)] = key
        name = next((k for k in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")) if k in headers), None)
        if name is None:
            missing.append(key)
        elif headers[name][1] != list(tensor.shape):
            shapes.append(key)
        else:
            files_of[key] = (headers[name][0], name)
    if missing:
        return None, f"{len(missing)} keys are not in the checkpoint (e.g. {missing[0]}): rank 0 initialises them"
    if shapes:
        return None, f"{len(shapes)} keys have another shape in the checkpoint (e.g. {shapes[0]})"
    files_of = {k: files_of[v] if isinstance(v, str) else v for k, v in files_of.items()}  # a tied key: its source's
    return Source(files_of), None


def decide(model, files, weight_mapping=None, key_mapping=None) -> None:
    """At ``from_pretrained``, on every rank alike: keep a Source on the model, or log once why it takes the default
    path."""
    source, why = plan(model, files, weight_mapping, key_mapping)
    setattr(model, SHARDED, source)
    if source is None:
        message = f"shard-on-read not used for {type(model).__name__}: {why}; the default path loads it"
        if last["shard_on_read"] != message:
            logger.warning("hf_fsdp_loadfix: %s", message)
        last["shard_on_read"] = message


def source_of(model):
    """(root module, Source) of the module of ``model`` that ``from_pretrained`` loaded for shard-on-read, else
    (None, None)."""
    if not isinstance(model, torch.nn.Module):
        return None, None
    # vars(), not getattr: peft's wrappers forward attribute reads to the model they wrap
    return next(((m, vars(m)[SHARDED]) for m in model.modules() if vars(m).get(SHARDED) is not None), (None, None))


def record_loaded(model) -> None:
    """After ``from_pretrained``: the dtype each entry was given (the default path casts the checkpoint to it)."""
    source = getattr(model, SHARDED, None)
    if source is not None:
        source.loaded = {k: v.dtype for k, v in model.state_dict(keep_vars=True).items()}


def fill(model, device=None, cpu_offload=False) -> None:
    """Fill every state-dict entry of the sharded ``model`` from the checkpoint: DTensors with this rank's slices,
    plain tensors (persistent buffers) whole. Local, no collective. Raises naming the keys where the model holds
    entries the checkpoint does not (peft adapters added after loading: load them on the default path)."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    root, source = source_of(model)
    if source is None:
        raise RuntimeError("hf_fsdp_loadfix: this model was not loaded for shard-on-read (HF_FSDP_LOADFIX_SOURCE="
                           f"sharded under FSDP cpu-ram-efficient loading): {last['shard_on_read']}")
    targets = root.state_dict(keep_vars=True)
    unknown = sorted(k for k in targets if k not in source.files)
    if unknown:
        raise RuntimeError(
            f"hf_fsdp_loadfix: shard-on-read cannot fill {len(unknown)} entries that are not in the checkpoint (e.g. "
            f"{unknown[0]}): modules added after from_pretrained (peft adapters) have no source on any rank. Set "
            "HF_FSDP_LOADFIX_SOURCE=local for this job.")
    handles, done, filled = {}, {}, {}
    sliced = whole = read = 0
    try:
        for key, target in targets.items():
            if id(target) not in done:
                path, name = source.files[key]
                if path not in handles:
                    handles[path] = safe_open(path, framework="pt")
                tensor_slice = handles[path].get_slice(name)
                loaded = source.loaded.get(key, target.dtype)
                # get_slice gives this rank's rows as copy-on-write pages of the memory-mapped file (as native
                # DistributedConfig shards are) or fresh memory: no copy beyond the casts
                if isinstance(target, DTensor):
                    index = local_index(target.shape, target.device_mesh, target.placements)
                    local = tensor_slice[index]
                    value, sliced = as_target(local.to(loaded), target, cpu_offload, copy=False), sliced + 1
                else:
                    local = tensor_slice[:]
                    value, whole = local.to(loaded).to(target.dtype).to(device or "cpu"), whole + 1
                read += local.numel() * local.element_size()
                del local
                done[id(target)] = value
            filled[key] = done[id(target)]
    finally:
        handles.clear()
    # DTensors (FSDP2) through load_state_dict(assign=True), as accelerate does; a tied key gets its twin's tensor.
    # Plain tensors (persistent buffers; every entry of a model prepared without FSDP) swapped in place: an optimizer
    # built before prepare keeps training them, ties stay ties.
    root.load_state_dict({k: v for k, v in filled.items() if isinstance(v, DTensor)}, assign=True, strict=False)
    swapped = set()
    with torch.no_grad():
        for key, value in filled.items():
            target = targets[key]
            if not isinstance(value, DTensor) and id(target) not in swapped:
                swapped.add(id(target))
                is_param = isinstance(target, torch.nn.Parameter)
                torch.utils.swap_tensors(target, torch.nn.Parameter(value, target.requires_grad) if is_param else value)
    last["shard_on_read"] = {"keys_sliced": sliced, "keys_whole": whole, "bytes_read": read,
                             "files": sorted(os.path.basename(p) for p in {p for p, _ in source.files.values()})}
