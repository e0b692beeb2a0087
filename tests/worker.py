"""One rank of an FSDP cpu-ram-efficient load, run by ``launch.run_ranks``; writes what it saw as JSON.

Steps: from_pretrained under transformers' FSDP gate (peak anonymous RSS sampled from /proc), then optionally
shard with accelerate's real ``fsdp2_prepare_model`` or native ``fully_shard`` + ``set_model_state_dict(
broadcast_from_rank0=True)``, gather the full state dict and compare it bitwise with the checkpoint and with a
plain single-process load, and run a forward pass.
"""

import argparse
import hashlib
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def rss_anon_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = rss_anon_kb(), threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_anon_kb())
            time.sleep(0.0005)

    def finish(self):
        self.stop.set()
        self.join()
        return max(self.peak, rss_anon_kb())


def digest(t):
    import torch

    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return hashlib.sha1(t.numpy().tobytes()).hexdigest()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--kind", default="llama")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--mode", default="load", choices=["load", "accelerate", "native"])
    p.add_argument("--patch", type=int, default=1, help="import hf_fsdp_loadfix explicitly")
    p.add_argument("--ckpt-other", help="the checkpoint path ranks other than 0 see (a node missing a shard)")
    p.add_argument("--seed-per-rank", action="store_true", help="a different RNG stream on each rank")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    os.environ.setdefault("ACCELERATE_USE_FSDP", "true")
    os.environ.setdefault("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if args.patch:
        import hf_fsdp_loadfix  # noqa: F401
    import transformers
    from models import load_class

    from packaging.version import Version

    dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    load_kwargs = {dtype_kw: args.dtype if args.dtype == "auto" else getattr(torch, args.dtype)}
    cls = load_class(args.kind)
    if args.seed_per_rank:
        torch.manual_seed(1234 + rank)
    dist.barrier()

    sampler = PeakSampler()
    base = sampler.peak
    sampler.start()
    t0 = time.perf_counter()
    ckpt = args.ckpt_other if args.ckpt_other and rank else args.ckpt
    model, info = cls.from_pretrained(ckpt, output_loading_info=True, **load_kwargs)
    load_s = time.perf_counter() - t0
    peak = sampler.finish()

    npb = {}
    for mod_name, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            buf = module._buffers.get(name)
            if buf is not None:
                key = f"{mod_name}.{name}" if mod_name else name
                npb[key] = {"device": buf.device.type, "dtype": str(buf.dtype),
                            "digest": None if buf.device.type == "meta" else digest(buf)}
    in_emb, out_emb = model.get_input_embeddings(), model.get_output_embeddings()
    result = {
        "rank": rank,
        "transformers": transformers.__version__,
        "status": __import__("hf_fsdp_loadfix").status() if "hf_fsdp_loadfix" in sys.modules else None,
        "load_s": load_s,
        "rss_base_kb": base,
        "rss_peak_delta_kb": peak - base,
        "rss_after_delta_kb": rss_anon_kb() - base,
        "state": {k: {"device": v.device.type, "shape": list(v.shape), "dtype": str(v.dtype)}
                  for k, v in model.state_dict().items()},
        "non_persistent": npb,
        "tied": out_emb is not None and in_emb.weight is out_emb.weight,
        "missing_keys": sorted(info["missing_keys"]),
    }
    if args.mode != "load":
        result.update(shard_and_compare(model, args, cls, load_kwargs, rank))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def forward(model, kind):
    import torch

    ids = torch.arange(1, 9).reshape(1, 8) % 100
    kwargs = {"decoder_input_ids": ids} if kind == "t5" else {}
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits.float()


def shard_and_compare(model, args, cls, load_kwargs, rank):
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

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
        from torch.distributed.fsdp import fully_shard

        full_sd = model.state_dict() if rank == 0 else {}
        fully_shard(model)
        model.tie_weights()  # 4.x T5 ties whole modules: point every alias at the sharded parameter
        set_model_state_dict(model, full_sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full_sd

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    logits = forward(model, args.kind)
    buffers = dict(model.named_buffers())

    # Reference: the same checkpoint loaded by plain transformers, without the FSDP gate.
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    ref = cls.from_pretrained(args.ckpt, **load_kwargs)
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"
    ref_sd, ref_logits = ref.state_dict(), forward(ref, args.kind)
    on_disk = {}
    for f in os.listdir(args.ckpt):
        path = os.path.join(args.ckpt, f)
        if f.endswith(".safetensors"):
            on_disk.update(load_file(path))
        elif f.endswith(".bin"):
            on_disk.update(torch.load(path, weights_only=True))

    def same(a, b):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())

    return {
        "sharded_keys": sorted(full),
        "mismatch_vs_reference": sorted(k for k, v in full.items() if k not in ref_sd or not same(v, ref_sd[k])),
        "mismatch_vs_checkpoint": sorted(
            k for k, v in full.items() if k in on_disk and not torch.equal(v.cpu(), on_disk[k].to(v.dtype))
        ),
        "checkpoint_keys_compared": sum(k in on_disk for k in full),
        "buffer_mismatch_vs_reference": sorted(
            k for k, v in ref.named_buffers() if k not in buffers or not same(buffers[k], v)
        ),
        "tied_after_shard": (lambda i, o: o is not None and i.weight is o.weight)(
            model.get_input_embeddings(), model.get_output_embeddings()),
        "logits_digest": digest(logits),
        "logits_nan": bool(torch.isnan(logits).any()),
        "logits_max_diff_vs_reference": float((logits - ref_logits).abs().max()),
    }


if __name__ == "__main__":
    main()
