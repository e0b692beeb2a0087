"""One rank of an FSDP cpu-ram-efficient load, run by ``launch.run_ranks``; writes what it saw as JSON.

Steps: from_pretrained under transformers' FSDP gate (peak anonymous RSS sampled from /proc), then optionally
shard with accelerate's real ``fsdp2_prepare_model`` or native ``fully_shard`` + ``set_model_state_dict(
broadcast_from_rank0=True)``, gather the full state dict and compare it bitwise with the checkpoint and with a
plain single-process load, and run a forward pass.
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
    p.add_argument("--ckpt", required=True)
    p.add_argument("--kind", default="llama")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--mode", default="load", choices=["load", "accelerate", "native"])
    p.add_argument("--patch", type=int, default=1, help="import hf_fsdp_loadfix explicitly")
    p.add_argument("--ckpt-other", help="the checkpoint path ranks other than 0 see (a node missing a shard)")
    p.add_argument("--seed-per-rank", action="store_true", help="a different RNG stream on each rank")
    p.add_argument("--relabel", help="set transformers.__version__ to this before the package sees transformers")
    p.add_argument("--out", required=True)
    args = p.parse_args()

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

    load_kwargs = helpers.dtype_kwargs(args.dtype)
    cls = load_class(args.kind)
    if args.seed_per_rank:
        torch.manual_seed(1234 + rank)
    dist.barrier()

    ckpt = args.ckpt_other if args.ckpt_other and rank else args.ckpt
    model, info, measured = helpers.load(cls, ckpt, **load_kwargs)
    result = {
        "rank": rank,
        "transformers": transformers.__version__,
        "status": __import__("hf_fsdp_loadfix").status() if "hf_fsdp_loadfix" in sys.modules else None,
        **measured,
        **helpers.describe(model),
        "missing_keys": sorted(info["missing_keys"]),
    }
    if args.mode != "load":
        result.update(shard_and_compare(model, args, cls, load_kwargs, rank))
    helpers.finish(result, args.out)


def shard_and_compare(model, args, cls, load_kwargs, rank):
    import torch

    if args.mode == "accelerate":
        from types import SimpleNamespace

        from accelerate.utils import FullyShardedDataParallelPlugin
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        layers = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Layer")})
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, cpu_ram_efficient_loading=True,
                                                auto_wrap_policy="transformer_based_wrap",
                                                transformer_cls_names_to_wrap=layers)
        accelerator = SimpleNamespace(
            state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None, parallelism_config=None,
            mixed_precision="no", is_main_process=rank == 0, device=torch.device("cpu"),
        )
        model = fsdp2_prepare_model(accelerator, model)
    else:
        model = helpers.shard_native(model, rank)

    full = helpers.full_state(model)
    logits = helpers.forward(model)
    buffers = dict(model.named_buffers())

    # Reference: the same checkpoint loaded by plain transformers, without the FSDP gate.
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    ref = cls.from_pretrained(args.ckpt, **load_kwargs)
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"
    ref_sd, ref_logits = ref.state_dict(), helpers.forward(ref)

    def same(a, b):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())

    return {
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
