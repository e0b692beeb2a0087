"""One rank of a job one step off accelerate's FSDP2 path, run by ``launch.run_ranks``; writes what it saw as JSON.

``--scenario`` (repeated, each run in turn in this one process, under ACCELERATE_USE_FSDP and
FSDP_CPU_RAM_EFFICIENT_LOADING):

- ``ddp KIND CKPT``: a real ``Accelerator(cpu=True, fsdp_plugin=FSDP2 + cpu_ram_efficient_loading)``, which runs
  DDP; a forward before ``prepare``; ``prepare(model, optimizer)`` and 3 SGD steps; then the same with
  HF_FSDP_LOADFIX_SOURCE=sharded, and with the package reverted (upstream), so the losses and the trained state
  compare in one launch.
- ``native KIND CKPT``: transformers' own ``from_pretrained(distributed_config=DistributedConfig(fsdp_size=N))``.
- ``fsdp1 KIND CKPT``: FSDP1 built as accelerate builds it for cpu_ram_efficient_loading (``sync_module_states``,
  ``param_init_fn`` = ``to_empty(recurse=False)`` + accelerate's ``ensure_weights_retied``, decoder layers
  auto-wrapped; ``--hsdp``: HYBRID_SHARD over the simulated nodes), one SGD step, then upstream as for ``ddp``.
- ``late KIND CKPT``: rank 0 starts its load ``--late`` seconds after the others (``--raise``: then fails), then
  accelerate's ``fsdp2_prepare_model``; the process group has a ``--pg-timeout`` of its own.
- ``dtype KIND CKPT``: rank 1 casts its frozen embeddings to float16 before accelerate's ``fsdp2_prepare_model``.
- ``fill KIND CKPT``: shard-on-read on torch-native FSDP2 through the public calls (``fsdp_loading``, ``fill_shards``).
"""

import argparse
import datetime
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_fsdp_loadfix._worker as helpers  # noqa: E402


def steps(model, optimizer, n, vocab):
    """``n`` SGD steps on one batch: the losses (a model without a loss of its own: the mean square of its logits)."""
    import torch

    ids = torch.arange(1, 17).reshape(2, 8) % vocab
    losses = []
    for _ in range(n):
        out = model(input_ids=ids, labels=ids)
        loss = out.loss if getattr(out, "loss", None) is not None else out.logits.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _vocab(model):
    cfg = model.config
    return getattr(cfg, "vocab_size", None) or getattr(cfg, "vocab", None) or cfg.get_text_config().vocab_size


def _digests(state):
    return {k: helpers.digest(v) for k, v in state.items()}


def ddp(kind, ckpt, args, rank):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin
    from models import load_class

    import hf_fsdp_loadfix

    accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(
        fsdp_version=2, cpu_ram_efficient_loading=True))
    result = {"distributed_type": accelerator.distributed_type.name, "traps": hf_fsdp_loadfix.status()["traps"]}
    for run in ("patched", "sharded", "upstream"):
        os.environ["HF_FSDP_LOADFIX_SOURCE"] = "sharded" if run == "sharded" else "local"
        if run == "upstream":
            hf_fsdp_loadfix.revert()
        model = load_class(kind).from_pretrained(ckpt)
        entry = {"devices": sorted({t.device.type for t in model.state_dict().values()})}
        try:
            helpers.forward(model)
            entry["forward_before_prepare"] = "ok"
        except Exception as err:  # noqa: BLE001 - the error is what is compared
            entry["forward_before_prepare"] = f"{type(err).__name__}: {err}"
        vocab, optimizer = _vocab(model), torch.optim.SGD(model.parameters(), lr=0.5)
        model, optimizer = accelerator.prepare(model, optimizer)
        entry["wrapper"] = type(model).__name__
        entry["losses"] = steps(model, optimizer, 3, vocab)
        entry["state"] = _digests(accelerator.unwrap_model(model).state_dict())
        entry["buffers"] = _digests(dict(accelerator.unwrap_model(model).named_buffers()))
        result[run] = entry
    hf_fsdp_loadfix.apply()
    return result


def native(kind, ckpt, args, rank):
    import torch
    import torch.distributed as dist
    from models import load_class
    from transformers.distributed import DistributedConfig

    import hf_fsdp_loadfix

    cls = load_class(kind)
    model = cls.from_pretrained(ckpt, distributed_config=DistributedConfig(fsdp_size=dist.get_world_size()),
                                **helpers.dtype_kwargs("float32"))
    from torch.distributed.tensor import DTensor

    sd = model.state_dict()
    full = helpers.full_state(model)
    plain = _plain(cls, ckpt)
    plain_buffers = dict(plain.named_buffers())
    buffers = dict(model.named_buffers())
    return {
        "status_process": hf_fsdp_loadfix.status()["process"],
        "dtensor": sorted({isinstance(v, DTensor) for v in sd.values()}),
        "devices": sorted({v.device.type for v in sd.values()}),
        **helpers.compare_to_checkpoint(full, ckpt),
        "keys": len(full),
        "buffer_mismatch_vs_plain": sorted(k for k, v in plain_buffers.items()
                                           if k not in buffers or not torch.equal(buffers[k].cpu(), v)),
        "buffers": _digests(buffers),
        "logits": helpers.digest(helpers.forward(model)),
        "logits_plain": helpers.digest(helpers.forward(plain)),
    }


def _plain(cls, ckpt, **kwargs):
    """The same checkpoint loaded by plain transformers in this process, without the FSDP gate."""
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    try:
        return cls.from_pretrained(ckpt, **helpers.dtype_kwargs("float32"), **kwargs)
    finally:
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"


def fsdp1(kind, ckpt, args, rank):
    import functools

    import torch
    import torch.distributed as dist
    import torch.distributed.fsdp._init_utils as init_utils
    from accelerate.utils.fsdp_utils import ensure_weights_retied
    from models import load_class
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    import hf_fsdp_loadfix

    # torch refuses sync_module_states for CPU tensors ("requires them to be on GPU"); the gloo broadcast runs
    init_utils._check_module_states_for_sync_module_states = lambda states: None
    result = {}
    for run in ("patched", "upstream"):
        if run == "upstream":
            hf_fsdp_loadfix.revert()
        model = load_class(kind).from_pretrained(ckpt, **helpers.dtype_kwargs("float32"))
        entry = {"devices": sorted({t.device.type for t in model.state_dict().values()})}
        layers = {type(m) for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "Block"))}
        strategy = {}
        if args.hsdp:
            nodes = dist.get_world_size() // int(os.environ["LOCAL_WORLD_SIZE"])
            mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (nodes, int(os.environ["LOCAL_WORLD_SIZE"])))
            strategy = {"sharding_strategy": ShardingStrategy.HYBRID_SHARD, "device_mesh": mesh}
        model = FSDP(
            model, sync_module_states=True, device_id=torch.device("cpu"), use_orig_params=True,
            auto_wrap_policy=functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layers)
            if layers else None,
            param_init_fn=ensure_weights_retied(lambda m: m.to_empty(device=torch.device("cpu"), recurse=False),
                                                model, torch.device("cpu")),
            **strategy)
        inner = model.module
        entry["buffers"] = _digests(dict(inner.named_buffers()))
        with FSDP.state_dict_type(model, torch.distributed.fsdp.StateDictType.FULL_STATE_DICT,
                                  torch.distributed.fsdp.FullStateDictConfig(offload_to_cpu=False, rank0_only=False)):
            full = model.state_dict()
        entry.update(helpers.compare_to_checkpoint(full, ckpt))
        entry["logits"] = helpers.digest(helpers.forward(model))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        entry["losses"] = steps(model, optimizer, 1, _vocab(inner))
        out_emb = inner.get_output_embeddings()
        entry["tied_after_step"] = out_emb is not None and out_emb.weight is inner.get_input_embeddings().weight
        result[run] = entry
        del model
    hf_fsdp_loadfix.apply()
    return result


def late(kind, ckpt, args, rank):
    from models import load_class

    if rank == 0:
        time.sleep(args.late)
        if args.raise_:
            raise RuntimeError("rank 0's load failed (simulated)")
    model = load_class(kind).from_pretrained(ckpt, **helpers.dtype_kwargs("float32"))
    start = time.monotonic()
    model = helpers.shard_accelerate(model, rank)
    return {"prepare_s": time.monotonic() - start, "logits": helpers.digest(helpers.forward(model)),
            **helpers.compare_to_checkpoint(helpers.full_state(model), ckpt)}


def dtype(kind, ckpt, args, rank):
    import torch
    from models import load_class

    model = load_class(kind).from_pretrained(ckpt, **helpers.dtype_kwargs("bfloat16"))
    embed = model.get_input_embeddings()
    embed.weight.requires_grad_(False)
    if rank == 1:
        embed.weight.data = embed.weight.data.to(torch.float16)
    try:
        helpers.shard_accelerate(model, rank, "bf16")
    except RuntimeError as err:
        return {"error": str(err)}
    return {"error": None}


def _lora_error(kind, ckpt):
    """LoRA added after a load under fsdp_loading() alone (the FSDP variables unset by then): rank 0 kept no values of
    the adapters, so fill_shards must raise on every rank, naming them."""
    from models import load_class
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard

    import hf_fsdp_loadfix

    saved = {k: os.environ.pop(k) for k in ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING")}
    try:
        with hf_fsdp_loadfix.fsdp_loading():
            model = load_class(kind).from_pretrained(ckpt, **helpers.dtype_kwargs("float32"))
    finally:
        os.environ.update(saved)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    fully_shard(model)
    try:
        hf_fsdp_loadfix.fill_shards(model)
    except RuntimeError as err:
        return str(err)
    return None


def fill(kind, ckpt, args, rank):
    """The public shard-on-read call on torch-native FSDP2, with no FSDP variables set: ``fsdp_loading()`` around
    from_pretrained, ``fully_shard`` per decoder layer and on the root, ``fill_shards``."""
    from models import load_class
    from torch.distributed.fsdp import fully_shard

    import hf_fsdp_loadfix

    saved = {k: os.environ.pop(k) for k in ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING")}
    try:
        with hf_fsdp_loadfix.fsdp_loading():
            model = load_class(kind).from_pretrained(ckpt, **helpers.dtype_kwargs("float32"))
        variables_after = sorted(k for k in saved if k in os.environ)
    finally:
        os.environ.update(saved)
    devices = sorted({t.device.type for t in model.state_dict().values()})
    for module in model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            fully_shard(module)
    fully_shard(model)
    hf_fsdp_loadfix.fill_shards(model)
    return {"devices_after_load": devices, "variables_after": variables_after, "lora_error": _lora_error(kind, ckpt),
            "shard_on_read": hf_fsdp_loadfix.status()["shard_on_read"],
            "logits": helpers.digest(helpers.forward(model)),
            "logits_plain": helpers.digest(helpers.forward(_plain(load_class(kind), ckpt))),
            **helpers.compare_to_checkpoint(helpers.full_state(model), ckpt)}


def accelerate(kind, ckpt, args, rank):
    """accelerate's own fsdp2_prepare_model under the FSDP variables, the default path (SOURCE=local) and then
    shard-on-read (SOURCE=sharded) in this one process: per source the devices after loading, the bytes broadcast,
    shard-on-read's report, this rank's local shards, the logits and the checkpoint comparison."""
    from models import load_class

    import hf_fsdp_loadfix

    found = {}
    for source in ("local", "sharded"):
        os.environ["HF_FSDP_LOADFIX_SOURCE"] = source
        model = load_class(kind).from_pretrained(ckpt, **helpers.dtype_kwargs("float32"))
        devices = sorted({t.device.type for t in model.state_dict().values()})
        with helpers.counted_broadcasts() as sent:
            model = helpers.shard_accelerate(model, rank)
        found[source] = {"devices_after_load": devices, "bytes_broadcast": sent[0],
                         "shard_on_read": hf_fsdp_loadfix.status()["shard_on_read"] if source == "sharded" else None,
                         "shards": {k: helpers.digest(v.to_local()) for k, v in model.state_dict().items()},
                         "logits": helpers.digest(helpers.forward(model)),
                         **helpers.compare_to_checkpoint(helpers.full_state(model), ckpt)}
    del os.environ["HF_FSDP_LOADFIX_SOURCE"]
    return found


SCENARIOS = {"ddp": ddp, "native": native, "fsdp1": fsdp1, "late": late, "dtype": dtype, "fill": fill,
             "accelerate": accelerate}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--scenario", nargs=3, action="append", required=True, metavar=("NAME", "KIND", "CKPT"))
    p.add_argument("--pg-timeout", type=float, default=300.0)
    p.add_argument("--late", type=float, default=0.0)
    p.add_argument("--raise", dest="raise_", action="store_true")
    p.add_argument("--hsdp", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import torch.distributed as dist

    os.environ.setdefault("ACCELERATE_USE_FSDP", "true")
    os.environ.setdefault("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.pg_timeout))
    rank = dist.get_rank()
    import transformers

    import hf_fsdp_loadfix  # noqa: F401

    results = {}
    for name, kind, ckpt in args.scenario:
        dist.barrier()
        start = time.monotonic()
        print(f"== scenario {name} {kind}", flush=True)
        results[f"{name}:{kind}"] = {**SCENARIOS[name](kind, ckpt, args, rank), "seconds": time.monotonic() - start}
    helpers.finish({"rank": rank, "transformers": transformers.__version__, "scenarios": results}, args.out)


if __name__ == "__main__":
    main()
