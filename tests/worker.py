"""One rank of an FSDP cpu-ram-efficient load, run by ``launch.run_ranks``; writes what it saw as JSON.

Steps: from_pretrained under transformers' FSDP gate (peak anonymous RSS sampled from /proc), then optionally
shard with accelerate's real ``fsdp2_prepare_model`` or native ``fully_shard`` + ``set_model_state_dict(
broadcast_from_rank0=True)``, gather the full state dict and compare it bitwise with the checkpoint and with a
plain single-process load, and run a forward pass.

Field options: ``--alone`` (before that: each rank in turn loads alone under the gate while the others wait in a
barrier), ``--second-model`` (after it: rank 0 alone loads the checkpoint again), ``--ac``/``--ac-offload``/
``--compile`` (accelerate's own activation checkpointing, with offload, or ``torch.compile`` before
``fsdp2_prepare_model``), ``--lora`` (peft LoRA, then 3 SGD steps on one batch instead of the comparisons).

``--stream-case NAME KIND CKPT`` (repeated) instead of ``--ckpt``: for each case, accelerate's ``fsdp2_prepare_model``
under bf16 mixed precision twice in this process, with HF_FSDP_LOADFIX_STREAM=0 and =1, and what each left (see
:func:`stream_case`).

``--case KIND DTYPE MODE CKPT`` (repeated) instead of ``--ckpt``: the load, shard and compare steps for each case
in turn in this one process; the JSON maps ``KIND:DTYPE:MODE`` to what a single-case run writes. ``MODE`` may name
field options after a ``+`` (``accelerate+ac-offload``); with ``--errors`` a load that raises is recorded as
``{"error": ...}`` and the next case runs.
"""

import argparse
import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The package's measuring helpers, loaded from their file so that this process does not import the package
# itself: with --patch 0 only the startup hook (or nothing) can have patched transformers.
_PACKAGE_DIR = importlib.util.find_spec("hf_fsdp_loadfix").submodule_search_locations[0]
_spec = importlib.util.spec_from_file_location("_loadfix_worker", os.path.join(_PACKAGE_DIR, "_worker.py"))
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt")
    p.add_argument("--case", nargs=4, action="append", metavar=("KIND", "DTYPE", "MODE", "CKPT"),
                   help="instead of --ckpt, repeated: several cases in this one process")
    p.add_argument("--errors", action="store_true",
                   help="with --case: a case whose from_pretrained raises records the error and the run goes on")
    p.add_argument("--stream-case", nargs=3, action="append", metavar=("NAME", "KIND", "CKPT"),
                   help="instead of --ckpt, repeated: accelerate's prepare with and without streaming, compared")
    p.add_argument("--stream", default="0,1", help="the values of --vary each --stream-case runs with")
    p.add_argument("--vary", default="HF_FSDP_LOADFIX_STREAM", help="the variable --stream gives values to")
    p.add_argument("--kind", default="llama")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--mode", default="load", choices=["load", "accelerate", "native"])
    p.add_argument("--patch", type=int, default=1, help="import hf_fsdp_loadfix explicitly")
    p.add_argument("--ckpt-other", help="the checkpoint path ranks other than 0 see (a node missing a shard)")
    p.add_argument("--seed-per-rank", action="store_true", help="a different RNG stream on each rank")
    p.add_argument("--relabel", help="set transformers.__version__ to this before the package sees transformers")
    p.add_argument("--break-tail", action="store_true",
                   help="a new release whose from_pretrained ends with a step that needs real weights (model.eval())")
    p.add_argument("--alone", action="store_true", help="first, each rank loads alone while the others wait")
    p.add_argument("--second-model", action="store_true", help="last, rank 0 alone loads the checkpoint again")
    p.add_argument("--ac", action="store_true", help="accelerate's activation checkpointing before preparing")
    p.add_argument("--ac-offload", action="store_true", help="--ac with activation_checkpointing_offload")
    p.add_argument("--compile", action="store_true", help="torch.compile (eager backend) before preparing")
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16"],
                   help="accelerate's, with --mode accelerate")
    p.add_argument("--lora", action="store_true", help="peft LoRA, prepared, 3 SGD steps on one batch: the losses")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    if not (args.ckpt or args.case or args.stream_case):
        p.error("--ckpt, --case or --stream-case is required")

    rank = helpers.init_rank()
    import torch
    import torch.distributed as dist

    if args.relabel:
        import transformers

        transformers.__version__ = args.relabel  # transformers.modeling_utils (the package's trigger) not imported yet
    if args.patch:
        import hf_fsdp_loadfix  # noqa: F401
    import transformers
    from models import load_class

    if args.break_tail:  # what a release newer than the table could add after the load, which fails on meta
        from transformers.modeling_utils import PreTrainedModel

        upstream_eval = PreTrainedModel.eval

        def eval_reading_weights(self):
            float(sum(p.float().sum() for p in self.parameters()))  # "cannot be called on meta tensors"
            return upstream_eval(self)

        PreTrainedModel.eval = eval_reading_weights

    load_kwargs = helpers.dtype_kwargs(args.dtype)
    cls = load_class(args.kind)
    if args.seed_per_rank:
        torch.manual_seed(1234 + rank)
    dist.barrier()
    if args.case:
        return helpers.finish({"rank": rank, "cases": run_cases(args, rank)}, args.out)
    if args.stream_case:
        return helpers.finish({"rank": rank, "cases": {name: {
            stream: stream_case(name, kind, ckpt, stream, args, rank) for stream in args.stream.split(",")}
            for name, kind, ckpt in args.stream_case}}, args.out)

    ranks = range(dist.get_world_size()) if args.alone else []
    alone = [load_alone(cls, args.ckpt, load_kwargs, rank, r) for r in ranks]
    ckpt = args.ckpt_other if args.ckpt_other and rank else args.ckpt
    model, result = load_and_describe(cls, ckpt, load_kwargs, rank)
    result["alone"] = [a for a in alone if a]
    if args.lora:
        result["losses"] = lora_steps(model, args, rank)
    elif args.mode != "load":
        result.update(shard_and_compare(model, args, cls, load_kwargs, rank))
    if args.second_model:
        result["second_model"] = load_alone(cls, args.ckpt, load_kwargs, rank, 0)
    helpers.finish(result, args.out)


def load_and_describe(cls, ckpt, load_kwargs, rank):
    """from_pretrained (peak RSS sampled) and what it left: the model and this rank's result dict."""
    import transformers

    model, info, measured = helpers.load(cls, ckpt, **load_kwargs)
    return model, {
        "rank": rank,
        "transformers": transformers.__version__,
        "status": __import__("hf_fsdp_loadfix").status() if "hf_fsdp_loadfix" in sys.modules else None,
        **measured,
        **helpers.describe(model),
        "missing_keys": sorted(info["missing_keys"]),
    }


def run_cases(args, rank):
    """Each ``--case`` in turn, as a single-case run of it loads (peak RSS sampled), describes, shards and compares."""
    import gc

    import torch.distributed as dist
    from models import load_class

    results = {}
    for kind, dtype, mode, ckpt in args.case:
        base, *setups = mode.split("+")  # accelerate+ac: the field option --ac for this case
        case = argparse.Namespace(**{**vars(args), "kind": kind, "dtype": dtype, "mode": base, "ckpt": ckpt,
                                     **{setup.replace("-", "_"): True for setup in setups}})
        cls, load_kwargs = load_class(kind), helpers.dtype_kwargs(dtype)
        gc.collect()  # the previous case's models: out of this load's RSS base
        dist.barrier()
        key = f"{kind}:{dtype}:{mode}"
        print(f"== case {key}", flush=True)  # what follows in this rank's output is this case's
        try:
            model, result = load_and_describe(cls, ckpt, load_kwargs, rank)
        except Exception as exc:
            if not args.errors:
                raise
            results[key] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"[{key}] {results[key]['error']}", flush=True)
            continue
        if base != "load":
            result.update(shard_and_compare(model, case, cls, load_kwargs, rank))
        results[key] = result
        del model
    return results


def plain_load(cls, ckpt, load_kwargs):
    """The same checkpoint loaded by plain transformers, without the FSDP gate."""
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    try:
        return cls.from_pretrained(ckpt, **load_kwargs)
    finally:
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"


def load_alone(cls, ckpt, load_kwargs, rank, loader):
    """Rank ``loader`` alone calls from_pretrained under the FSDP gate while the others wait in a barrier (a
    collective inside from_pretrained would hang here). Returns, on that rank, its time and how it compares with
    a plain load: parameters' devices, keys whose shape or dtype differ, keys whose values differ, non-persistent
    buffers that differ."""
    import torch
    import torch.distributed as dist

    found = None
    if rank == loader:
        model, _, measured = helpers.load(cls, ckpt, **load_kwargs)
        ref = plain_load(cls, ckpt, load_kwargs)
        sd, ref_sd = model.state_dict(), ref.state_dict()
        layout = sorted(k for k in ref_sd.keys() | sd.keys() if k not in sd or k not in ref_sd
                        or (sd[k].shape, sd[k].dtype) != (ref_sd[k].shape, ref_sd[k].dtype))
        npb, ref_npb = helpers.describe(model)["non_persistent"], helpers.describe(ref)["non_persistent"]
        found = {
            "rank": rank,
            "load_s": measured["load_s"],
            "devices": sorted({t.device.type for t in sd.values()}),
            "layout_mismatch": layout,
            "value_mismatch": sorted(k for k in ref_sd if k not in layout and sd[k].device.type != "meta"
                                     and not torch.equal(sd[k], ref_sd[k])),
            "buffer_mismatch": sorted(k for k in ref_npb if npb.get(k) != ref_npb[k]),
        }
    dist.barrier()
    return found


def accelerator_like(model, rank, mixed_precision, ac=False, ac_offload=False, **plugin_kwargs):
    """The package's accelerator-like object, wrapping the model's decoder layers, with activation checkpointing
    (with offload) and other plugin fields."""
    layers = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Layer")})
    if ac or ac_offload:
        plugin_kwargs["activation_checkpointing"] = True
    if ac_offload:
        plugin_kwargs["activation_checkpointing_offload"] = True
    return helpers.accelerator_like(rank, mixed_precision, transformer_cls_names_to_wrap=layers, **plugin_kwargs)


def accelerate_prepare(model, args, rank):
    """accelerate's own steps: activation checkpointing (``fsdp2_apply_ac``; releases without it apply the plugin's
    activation checkpointing inside ``fsdp2_prepare_model``), then ``fsdp2_prepare_model``."""
    import torch
    from accelerate.utils import fsdp_utils

    accelerator = accelerator_like(model, rank, args.mixed_precision, args.ac, args.ac_offload)
    if (args.ac or args.ac_offload) and hasattr(fsdp_utils, "fsdp2_apply_ac"):
        model = fsdp_utils.fsdp2_apply_ac(accelerator, model)
    if args.compile:
        model = torch.compile(model, backend="eager")
    return fsdp_utils.fsdp2_prepare_model(accelerator, model)


def lora_steps(model, args, rank):
    """peft LoRA on the loaded model (non-rank-0: base on meta), prepared by accelerate, 3 SGD steps on one batch."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # the LoRA init: rank 0's is broadcast
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    model = accelerate_prepare(model, args, rank)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.arange(1, 17).reshape(2, 8) % model.config.vocab_size
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


# --stream-case NAME: what the case changes (mixed precision "no" for nomp, accelerate's cpu_offload for offload,
# activation checkpointing for ac; frozen: the embeddings and the first layer frozen; lora: peft LoRA on q/v)
STREAM_CASES = {"ac": {"ac": True}, "tied": {}, "keep_fp32": {}, "frozen": {}, "persistent_buffer": {}, "lora": {},
                "offload": {"cpu_offload": True}, "nomp": {"mixed_precision": "no"}, "fp32": {"dtype": "float32"}}


def stream_case(name, kind, ckpt, stream, args, rank):
    """Load ``ckpt`` (bf16), apply the case, run accelerate's fsdp2_prepare_model under bf16 mixed precision (its
    activation checkpointing first for ``ac``) with HF_FSDP_LOADFIX_STREAM=``stream``, then one SGD step on one batch.
    Returns this rank's local shard of every state-dict key (digest, dtype, placements, requires_grad), every
    buffer, the bytes that went through ``dist.broadcast`` in prepare, the bytes of rank 0's loaded
    tensors, the checkpoint comparison of the gathered state, the loss, and the shards after the step."""
    import gc

    import torch
    from accelerate.utils import fsdp_utils
    from models import load_class
    from peft import LoraConfig, get_peft_model

    gc.collect()
    os.environ[args.vary] = stream
    opts = STREAM_CASES.get(name, {})  # any other name: a plain case (the checkpoint's kind is what differs)
    ckpt = args.ckpt_other if args.ckpt_other and rank else ckpt
    torch.manual_seed(0)  # keys missing from the checkpoint: rank 0 initialises them alike in every run
    if kind == "llama_qkv":
        __import__("models").register_qkv()
    model = load_class(kind).from_pretrained(ckpt, **helpers.dtype_kwargs(opts.get("dtype", "bfloat16")))
    devices_after_load = sorted({t.device.type for t in model.state_dict().values()})
    if name == "frozen":
        for key, param in model.named_parameters():
            if "embed_tokens" in key or ".layers.0." in key:
                param.requires_grad_(False)
    if name == "lora":
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    unique = {id(t): t for t in model.state_dict(keep_vars=True).values()}.values()
    loaded_bytes = sum(t.numel() * t.element_size() for t in unique)
    extra = {"cpu_offload": torch.distributed.fsdp.CPUOffloadPolicy(pin_memory=False)} \
        if opts.get("cpu_offload") else {}  # pinned memory needs an accelerator
    accelerator = accelerator_like(model, rank, opts.get("mixed_precision", "bf16"), opts.get("ac", False), **extra)
    if opts.get("ac"):
        model = fsdp_utils.fsdp2_apply_ac(accelerator, model)
    with helpers.counted_broadcasts() as sent:
        model = fsdp_utils.fsdp2_prepare_model(accelerator, model)

    def shards():
        return {k: {"digest": helpers.digest(v.to_local() if hasattr(v, "to_local") else v), "dtype": str(v.dtype),
                    "placements": str(getattr(v, "placements", None)), "requires_grad": v.requires_grad}
                for k, v in model.state_dict(keep_vars=True).items()}

    result = {"shards": shards(), "bytes_broadcast": sent[0], "loaded_bytes": loaded_bytes,
              "buffers": {k: [helpers.digest(v), str(v.dtype)] for k, v in model.named_buffers()},
              "status": __import__("hf_fsdp_loadfix").status()["accelerate_stream"],
              "shard_on_read": __import__("hf_fsdp_loadfix").status()["shard_on_read"],
              "devices_after_load": devices_after_load}
    if name != "lora":
        result.update(helpers.compare_to_checkpoint(helpers.full_state(model), ckpt))
    ids = torch.arange(1, 17).reshape(2, 8) % model.config.get_text_config().vocab_size
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    # no KV cache in training: activation checkpointing's recompute would append to it again (upstream's error,
    # "Recomputed values ... have different metadata", with or without the package)
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    result.update(loss=loss.item(), after_step=shards())
    return result


def shard_and_compare(model, args, cls, load_kwargs, rank):
    import torch

    if args.mode == "accelerate":
        model = accelerate_prepare(model, args, rank)
    else:
        model = helpers.shard_native(model, rank)

    wrappers = sorted({type(m).__name__.removeprefix("FSDP") for m in model.modules()}  # fully_shard renames classes
                      & {"CheckpointWrapper", "OffloadWrapper", "OptimizedModule"})
    full = helpers.full_state(model)  # named as the state dict names them (wrapper prefixes removed)
    logits = helpers.forward(model)
    # named_buffers keeps the prefixes of accelerate's activation-checkpointing wrappers and of torch.compile
    buffers = {k.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): v
               for k, v in model.named_buffers()}

    ref = plain_load(cls, args.ckpt, load_kwargs)
    ref_sd, ref_logits = ref.state_dict(), helpers.forward(ref)

    def same(a, b):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())

    return {
        "wrappers": wrappers,
        "sharded_keys": sorted(full),
        "mismatch_vs_reference": sorted(k for k, v in full.items() if k not in ref_sd or not same(v, ref_sd[k])),
        **helpers.compare_to_checkpoint(full, args.ckpt),
        "buffer_mismatch_vs_reference": sorted(
            k for k, v in ref.named_buffers() if k not in buffers or not same(buffers[k], v)
        ),
        "tied_after_shard": (lambda i, o: o is not None and i.weight is o.weight)(
            model.get_input_embeddings(), model.get_output_embeddings()),
        "logits_digest": helpers.digest(logits),
        "logits_nan": bool(torch.isnan(logits).any()),
        "logits_max_diff_vs_reference": float((logits - ref_logits).abs().max()),
    }


if __name__ == "__main__":
    main()
