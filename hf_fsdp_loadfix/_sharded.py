"""Shard-on-read (``HF_FSDP_LOADFIX_SOURCE=sharded``): every rank, rank 0 included, reads only its own slices of the
checkpoint, so no rank holds the whole model and nothing is broadcast (but keys the checkpoint lacks).

``from_pretrained`` (every rank takes the non-rank-0 path: meta state dict, real non-persistent buffers) keeps a
:class:`Source` on the model: for each state-dict key, the safetensors file and checkpoint key it loads unchanged
from, and the dtype ``from_pretrained`` gave it. After FSDP2 has sharded the meta model (accelerate's
``fsdp2_prepare_model``, or your own ``fully_shard``), :func:`fill` reads each local shard through safetensors
``get_slice`` (only this rank's bytes), casts it as the default path would (checkpoint dtype -> loaded dtype -> the
dtype accelerate gives the parameter) and assigns it. Slicing commutes with an element-wise cast, so every shard is
bitwise the default path's.

Keys transformers renames at load (5.x ``WeightRenaming``, 4.x ``key_mapping`` and legacy renames) are read
sliced under the name the release's own renaming gives them. Keys it *converts* (5.x ``WeightConverter``) go
through the release's own loader, one conversion at a time. Where the conversion is proven slice-safe (per-expert
keys stacked on dim 0 and concatenated on another dim: transformers' ``DtensorShardOperation`` reads only this rank's
experts, 5.23 and 5.24) the loader reads this rank's slices; every other conversion (qkv splits, rope permutations,
transposes, releases without that loader) falls back per key: each rank reads its sources whole (a node's page cache
shares them), the loader converts them, and the rank keeps its slice. ``status()["shard_on_read"]`` counts the keys
read sliced and whole, and how many of them were converted.

Keys missing from the checkpoint (a new head) come out as on the default path: local rank 0 runs upstream's own
initialisation for just those keys at ``from_pretrained`` (every other entry stays on meta there too), keeps them
beside the model, and :func:`fill` broadcasts them from rank 0, one key at a time: the only broadcast of
shard-on-read.

A load this cannot serve exactly is left to the default path when ``from_pretrained`` runs, with one log line
naming why: .bin/pickle checkpoints, shapes that differ (``ignore_mismatched_sizes``). The decision depends only on
the model and the checkpoint's headers, so every rank takes it alike.
"""

import contextlib
import dataclasses
import logging
import math
import os

import torch

from ._broadcast import group_device
from ._shard import as_target, local_index, local_slice

logger = logging.getLogger("hf_fsdp_loadfix")
SHARDED = "_hf_fsdp_loadfix_sharded"  # the model's Source, or None where the default path serves it
# on a peft layer, local rank 0: the adapter values peft made, {"lora_A.default.weight": tensor, ...} (``_peft``)
KEPT = "_hf_fsdp_loadfix_adapters"
last = {"shard_on_read": "no shard-on-read load yet"}


@dataclasses.dataclass
class Source:
    files: dict  # state-dict key -> (safetensors file, checkpoint key), read sliced
    loaded: dict = dataclasses.field(default_factory=dict)  # state-dict key -> dtype from_pretrained gave it
    # keys the release converts at load: state-dict key -> its conversion (the first target's name), and that
    # conversion -> its source (safetensors file, checkpoint key)s; converted by the release's loader
    converted: dict = dataclasses.field(default_factory=dict)
    conversions: dict = dataclasses.field(default_factory=dict)
    sliceable: set = dataclasses.field(default_factory=set)  # conversions the loader can read sliced
    twins: dict = dataclasses.field(default_factory=dict)  # a key tied to a converted or missing key -> that key
    missing: list = dataclasses.field(default_factory=list)  # keys not in the checkpoint: rank 0 initialises them
    initialised: dict = dataclasses.field(default_factory=dict)  # local rank 0: their values, until the fill
    load_config: object = None  # 5.x: the loader's own configuration, placing on CPU


def _headers(files):
    from safetensors import safe_open

    found = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            found.update({k: (path, list(f.get_slice(k).get_shape())) for k in f.keys()})
    return found


def _names_5x(model, headers, weight_mapping, entries):
    """5.x: checkpoint key -> state-dict key, by the release's own ``rename_source_key`` (renamings, then at most one
    converter, the base-model prefix added or stripped), as ``convert_and_load_state_dict_in_model`` matches them.
    Returns (renamed: state-dict key -> checkpoint key, conversions: first target -> (targets, checkpoint keys,
    slice-safe))."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    renamings = [t for t in weight_mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in weight_mapping if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    renamed, conversions = {}, {}
    for key in sorted(headers):
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, entries)
        if name not in entries and key in entries:
            name, pattern = key, None
        if name not in entries:
            continue  # unexpected: the default path ignores it too
        if pattern is None:
            renamed.setdefault(name, key)
        else:  # the loader groups a conversion's sources under its first target (others: as it names them)
            first = by_pattern[pattern].target_patterns[0]
            targets = [name.replace(first, t) for t in by_pattern[pattern].target_patterns]
            safe = _slice_safe(by_pattern[pattern].operations)
            conversions.setdefault(name, ([t for t in targets if t in entries], [], safe))[1].append(key)
    return renamed, conversions


def _names_4x(model, headers, key_mapping, entries):
    """4.x: checkpoint key -> state-dict key by the release's own ``_get_key_renaming_mapping`` (legacy renames,
    ``key_mapping``), then the base-model prefix added or stripped."""
    rename = getattr(model, "_get_key_renaming_mapping", None)
    mapping = rename(sorted(headers), key_mapping) if rename else {k: k for k in headers}
    prefix, renamed = model.base_model_prefix, {}
    for key, name in mapping.items():
        match = next((n for n in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")) if n in entries), None)
        if match is not None:
            renamed.setdefault(match, key)
    return renamed, {}


def _slice_safe(operations) -> bool:
    """Per-expert tensors stacked on dim 0, then concatenated on another dim: sharded on dim 0, this rank's experts
    make its shard. Only where the release's DtensorShardOperation drops the experts a rank does not own (its
    ``shard_tensor`` takes the expert index: 5.23, 5.24)."""
    import inspect

    try:
        from transformers.distributed.sharding_utils import DtensorShardOperation
    except ImportError:
        return False
    if "tensor_idx" not in inspect.signature(DtensorShardOperation.shard_tensor).parameters:
        return False
    kinds = [(type(op).__name__, getattr(op, "dim", None)) for op in operations]
    return bool(kinds) and kinds[0] == ("MergeModulelist", 0) and all(
        name == "Concatenate" and dim not in (0, None) for name, dim in kinds[1:])


def _loader():
    """5.x: the release's ``convert_and_load_state_dict_in_model`` and the arguments its signature takes beside the
    model, the state dict and the load config (None where it takes others)."""
    import inspect

    from transformers.core_model_loading import convert_and_load_state_dict_in_model as load

    params = inspect.signature(load).parameters
    if not {"model", "state_dict", "load_config"} <= params.keys():
        return None, None
    extra = {"tp_plan": None} if "tp_plan" in params else {}
    if any(p.default is inspect.Parameter.empty for n, p in params.items()
           if n not in ("model", "state_dict", "load_config", *extra)):
        return None, None
    return load, extra


def plan(model, files, load_config=None, key_mapping=None):
    """(Source, None) where every state-dict entry loads from the checkpoint (sliced under the release's name for
    it, or whole through one of its conversions), else (None, why)."""
    if not files or not all(f.endswith(".safetensors") for f in files):
        return None, ".bin/pickle checkpoint (slices can only be read from safetensors)"
    entries = model.state_dict(keep_vars=True)
    try:
        headers = _headers(files)
        if load_config is None:
            renamed, conversions = _names_4x(model, headers, key_mapping, entries)
        else:
            mapping = getattr(load_config, "weight_mapping", None) or []
            renamed, conversions = _names_5x(model, headers, mapping, entries)
        if conversions and _loader()[0] is None:
            return None, "transformers converts keys at load and this release's loader cannot be called per conversion"
    except Exception as err:  # noqa: BLE001 - an unreadable header or a transform API this code does not know
        return None, f"the checkpoint's keys could not be matched ({type(err).__name__}: {err})"
    converted = {t: first for first, (targets, *_) in conversions.items() for t in targets}
    # tied keys (target -> source): 4.x ties at construction (one tensor), 5.x after loading (all_tied_weights_keys)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    files_of, first, twins, missing, shapes = {}, {}, {}, [], []
    for key, tensor in entries.items():
        if id(tensor) in first or tied.get(key) in entries:  # tied to another key: filled with it
            twins[key] = tied.get(key) or first[id(tensor)]
            continue
        first[id(tensor)] = key
        name = renamed.get(key)
        if key in converted:
            continue  # read whole through its conversion
        if name is None:
            missing.append(key)
        elif headers[name][1] != list(tensor.shape):
            shapes.append(key)
        else:
            files_of[key] = (headers[name][0], name)
    if shapes:
        return None, f"{len(shapes)} keys have another shape in the checkpoint (e.g. {shapes[0]})"
    files_of.update({key: files_of[twin] for key, twin in twins.items() if twin in files_of})  # a tied key: its twin's
    source = Source(files_of, converted=converted, missing=missing,
                    twins={k: t for k, t in twins.items() if t not in files_of},
                    conversions={c: [(headers[k][0], k) for k in keys] for c, (_, keys, _) in conversions.items()},
                    sliceable={c for c, (*_, safe) in conversions.items() if safe})
    if conversions:
        source.load_config = dataclasses.replace(load_config, device_map={"": "cpu"})
    return source, None


def decide(model, files, load_config=None, key_mapping=None) -> None:
    """At ``from_pretrained``, on every rank alike: keep a Source on the model, or log once why it takes the default
    path."""
    source, why = plan(model, files, load_config, key_mapping)
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


def _sharded_on_dim_0(target) -> bool:
    from torch.distributed.tensor import DTensor, Replicate, Shard

    return isinstance(target, DTensor) and all(p == Shard(0) or isinstance(p, Replicate) for p in target.placements)


def _convert(root, source, conversions, keys, open_file):
    """{key: (tensor, sliced)} for ``keys`` (the state-dict keys of ``conversions``), converted by the release's own
    loader in one call as the default path converts them, in the dtype from_pretrained gave them: this rank's local
    shard where the conversion is slice-safe, else the full tensor, from its sources read whole. Each key's entry is
    replaced for the call by a meta stand-in (a DTensor of the target's layout, or a plain tensor of its full shape),
    then put back, so the loader keeps nothing."""
    from torch.distributed.tensor import DTensor

    load, extra = _loader()
    put_back, expect = [], {}
    for key in keys:
        path, _, name = key.rpartition(".")
        module = root.get_submodule(path)
        slots = module._parameters if name in module._parameters else module._buffers
        original = slots[name]
        dtype = source.loaded.get(key, original.dtype)
        sliced = source.converted[key] in source.sliceable and _sharded_on_dim_0(original)
        if sliced:
            local = original.to_local()
            stand_in = DTensor.from_local(torch.empty(local.shape, dtype=dtype, device="meta"), original.device_mesh,
                                          original.placements, run_check=False, shape=original.shape,
                                          stride=original.stride())
        else:
            stand_in = torch.empty(original.shape, dtype=dtype, device="meta")
        expect[key] = (local.shape if sliced else original.shape, sliced)
        slots[name] = torch.nn.Parameter(stand_in, original.requires_grad) if slots is module._parameters else stand_in
        put_back.append((key, module, slots, name, original))
    try:
        state_dict = {name: open_file(path).get_slice(name)
                      for c in conversions for path, name in source.conversions[c]}
        with _quiet_progress():
            load(model=root, state_dict=state_dict, load_config=source.load_config, **extra)
        made = {}
        for key, module, _, name, _ in put_back:
            value = getattr(module, name).detach()
            made[key] = (value.to_local() if isinstance(value, DTensor) else value, expect[key][1])
    finally:
        for _, _, slots, name, original in put_back:
            slots[name] = original
    wrong = sorted(k for k, (v, _) in made.items() if v.device.type == "meta" or v.shape != expect[k][0])
    if wrong:
        raise RuntimeError(f"hf_fsdp_loadfix: shard-on-read: transformers' loader did not convert {wrong[0]} from "
                           f"{[n for _, n in source.conversions[source.converted[wrong[0]]]][:3]} to its shape. Set "
                           "HF_FSDP_LOADFIX_SOURCE=local for this job, and report this.")
    return made


@contextlib.contextmanager
def _quiet_progress():
    """No "Loading weights" progress bar per conversion."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def keep_initialised(model) -> None:
    """After upstream initialised the missing keys on local rank 0: keep their values beside the model until the fill
    broadcasts them, and put the entries back on meta (rank 0 holds to the rules of the others)."""
    source = getattr(model, SHARDED)
    entries = model.state_dict(keep_vars=True)
    source.initialised = {k: entries[k].detach() for k in source.missing}
    with torch.no_grad():
        for key in source.missing:
            tensor = entries[key]
            if tensor.device.type != "meta":
                meta = tensor.detach().to("meta")
                torch.utils.swap_tensors(tensor, torch.nn.Parameter(meta, tensor.requires_grad)
                                         if isinstance(tensor, torch.nn.Parameter) else meta)


def whole_value(source, key):
    """Local rank 0, before the fill: the value the default path's rank 0 holds for ``key`` (read whole from the files,
    cast to the dtype from_pretrained gave it; or kept from its initialisation). For a step that needs it
    (``_steps``)."""
    key = source.twins.get(key, key)
    if key in source.initialised:
        return source.initialised[key]
    if key not in source.files:
        raise RuntimeError(f"hf_fsdp_loadfix: under shard-on-read, {key} has no value before the fill (the release "
                           "converts it at load), and a step before prepare needs it; set HF_FSDP_LOADFIX_SOURCE=local "
                           "for this job")
    from safetensors import safe_open

    path, name = source.files[key]
    with safe_open(path, framework="pt") as f:
        value = f.get_tensor(name)
    return value.to(source.loaded.get(key, value.dtype))


def from_rank0_now(source, keys, value) -> None:
    """Every rank alike: the entries ``keys`` (one tensor, tied names after the first) no longer match the checkpoint
    (a step resized them): the fill broadcasts them from rank 0 as keys the checkpoint lacks, never reads them from
    the files. ``value``: local rank 0's value of them, None elsewhere."""
    first, *others = keys
    for key in keys:
        source.files.pop(key, None)
        source.converted.pop(key, None)
        source.twins.pop(key, None)
    if first not in source.missing:
        source.missing.append(first)
    source.twins.update(dict.fromkeys(others, first))
    if value is not None:
        source.initialised[first] = value


def _kept_values(root) -> dict:
    """Local rank 0's kept adapter values under ``root``, by state-dict key (activation checkpointing's wrapper,
    which the state dict does not name, left out of the module names)."""
    return {f"{name.replace('_checkpoint_wrapped_module.', '')}.{key}": value
            for name, module in root.named_modules() for key, value in vars(module).get(KEPT, {}).items()}


def _adapters(root, added, device) -> dict:
    """Entries added after from_pretrained (peft adapters): local rank 0's values of them, as peft made them there
    (``_peft``), once every rank agrees rank 0 has them all; else the same error on every rank."""
    import torch.distributed as dist

    kept = _kept_values(root) if dist.get_rank() == 0 else {}
    box = [sorted(kept.keys() & set(added))]
    dist.broadcast_object_list(box, src=0, group=dist.group.WORLD, device=device)
    lacking = [k for k in added if k not in box[0]]
    if lacking:
        raise RuntimeError(
            f"hf_fsdp_loadfix: shard-on-read cannot fill {len(lacking)} entries that are not in the checkpoint (e.g. "
            f"{lacking[0]}): modules added after from_pretrained have no source, and rank 0 kept no value of them "
            "(peft adapters are kept under accelerate's path, where the FSDP variables are set for the whole job). "
            "Set HF_FSDP_LOADFIX_SOURCE=local for this job.")
    return {k: kept[k] for k in added if k in kept}


def _from_rank0(keys, values, targets, done, place, loaded, device) -> int:
    """``keys`` from rank 0 (``values``: its own), one broadcast per key in sorted order, each rank keeping its
    slice; every rank calls it with the same keys. Returns the bytes broadcast."""
    import torch.distributed as dist

    sent = 0
    for key in sorted(keys):
        target = targets[key]
        if id(target) in done:
            continue
        dtype = loaded.get(key, target.dtype)
        if dist.get_rank() == 0:
            value = values[key].to(device=device, dtype=dtype).contiguous()
        else:
            value = torch.empty(target.shape, dtype=dtype, device=device)
        dist.broadcast(value, src=0, group=dist.group.WORLD)
        sent += value.numel() * value.element_size()
        done[id(target)] = place(key, target, value, whole=True)
    return sent


def fill(model, device=None, cpu_offload=False) -> None:
    """Fill every state-dict entry of the sharded ``model``: DTensors with this rank's slices of the checkpoint,
    plain tensors (persistent buffers) whole; a key the release converts at load through its own loader. Local, no
    collective, except for entries no file holds: keys the checkpoint lacks and peft adapters added after loading
    come from rank 0 (raising on every rank, naming them, where rank 0 has no value of them)."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor

    root, source = source_of(model)
    if source is None:
        raise RuntimeError("hf_fsdp_loadfix: this model was not loaded for shard-on-read (HF_FSDP_LOADFIX_SOURCE="
                           f"sharded under FSDP cpu-ram-efficient loading): {last['shard_on_read']}")
    targets = root.state_dict(keep_vars=True)
    # peft's wrapper of a layer it adapts names the layer's own entries ``<layer>.base_layer.<name>``
    aliases = {k: k.replace(".base_layer.", ".") for k in targets if ".base_layer." in k}
    aliases = {k: v for k, v in aliases.items() if v in source.files and k not in source.files}
    source.files.update({k: source.files[v] for k, v in aliases.items()})
    source.loaded.update({k: source.loaded[v] for k, v in aliases.items() if v in source.loaded})
    added = sorted(k for k in targets if k not in source.files and k not in source.converted
                   and k not in source.twins and k not in source.missing)
    handles, done, filled = {}, {}, {}
    # keys read sliced (this rank's part only) and whole; of those, converted by the release's loader; from rank 0
    count = {"keys_sliced": 0, "keys_whole": 0, "keys_converted": 0, "bytes_read": 0, "keys_from_rank0": 0,
             "bytes_broadcast": 0}

    def open_file(path):
        if path not in handles:
            handles[path] = safe_open(path, framework="pt")
        return handles[path]

    def place(key, target, local, whole):
        # get_slice gives this rank's rows as copy-on-write pages of the memory-mapped file (as native
        # DistributedConfig shards are) or fresh memory: no copy beyond the casts
        loaded = source.loaded.get(key, target.dtype)
        if isinstance(target, DTensor):
            if whole:
                local = local_slice(local, target.device_mesh, target.placements)
            return as_target(local.to(loaded), target, cpu_offload, copy=whole)
        return local.to(loaded).to(target.dtype).to(device or "cpu")

    try:
        for key, target in targets.items():
            if id(target) in done or key not in source.files:
                continue
            path, name = source.files[key]
            tensor_slice = open_file(path).get_slice(name)
            index = local_index(target.shape, target.device_mesh, target.placements) \
                if isinstance(target, DTensor) else None
            local = tensor_slice[index] if index is not None else tensor_slice[:]
            count["bytes_read"] += local.numel() * local.element_size()
            done[id(target)] = place(key, target, local, whole=index is None and isinstance(target, DTensor))
            count["keys_sliced" if index is not None else "keys_whole"] += 1
            del local
        conversions = {}
        for key in targets:
            if key in source.converted and id(targets[key]) not in done:
                conversions.setdefault(source.converted[key], []).append(key)
        # slice-safe without a cast in one call: the loader's pieces are views of the mapped files, it makes only
        # this rank's shards. The others one at a time: cast pieces or full tensors are held until converted.
        together = [c for c in conversions
                    if c in source.sliceable and not _casts(source, c, conversions[c], open_file)]
        calls = [together] + [[c] for c in conversions if c not in together]
        for call in filter(None, calls):
            made = _convert(root, source, call, [k for c in call for k in conversions[c]], open_file)
            for key, (value, sliced) in made.items():
                done[id(targets[key])] = place(key, targets[key], value, whole=not sliced)
                count["keys_converted"] += 1
                count["keys_sliced" if sliced else "keys_whole"] += 1
            for c in call:
                if all(made[k][1] for k in conversions[c]):  # this rank's experts, read as stored
                    path, name = source.conversions[c][0]
                    stored = _itemsize_of(open_file(path).get_slice(name))
                    count["bytes_read"] += sum(made[k][0].numel() for k in conversions[c]) * stored
                else:
                    count["bytes_read"] += sum(_nbytes(open_file(p).get_slice(n)) for p, n in source.conversions[c])
        if source.missing or added:  # a collective: every rank has the same keys (the model, the headers)
            on = device or group_device()
            values = {**source.initialised, **_adapters(root, added, on)} if added else source.initialised
            count["keys_from_rank0"] = len(source.missing) + len(added)
            count["bytes_broadcast"] = _from_rank0([*source.missing, *added], values, targets, done, place,
                                                   source.loaded, on)
            source.initialised.clear()
        for key, twin in source.twins.items():  # tied to a converted or missing key: its twin's value
            done.setdefault(id(targets[key]), done[id(targets[twin])])
        filled = {key: done[id(target)] for key, target in targets.items()}
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
    paths = {p for p, _ in source.files.values()} | {p for c in source.conversions.values() for p, _ in c}
    last["shard_on_read"] = {**count, "files": sorted(os.path.basename(p) for p in paths)}


_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}  # safetensors' dtype names


def _casts(source, conversion, keys, open_file) -> bool:
    """Does from_pretrained give the keys of ``conversion`` another dtype than the checkpoint's?"""
    path, name = source.conversions[conversion][0]
    stored = _DTYPES.get(open_file(path).get_slice(name).get_dtype())
    return any(source.loaded.get(k) != stored for k in keys)


def _nbytes(tensor_slice) -> int:
    return math.prod(tensor_slice.get_shape()) * _itemsize_of(tensor_slice)


def _itemsize_of(tensor_slice) -> int:
    return _DTYPES.get(tensor_slice.get_dtype(), torch.float32).itemsize

