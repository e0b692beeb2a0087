"""Time to a sharded model and per-rank peak memory, against model size: the default path (rank 0 reads and
broadcasts), shard-on-read (HF_FSDP_LOADFIX_SOURCE=sharded) and transformers' native DistributedConfig load, side by
side in one run on the installed transformers and accelerate.

    pip install matplotlib                     # for the plot
    python benchmarks/sharded.py [--sizes 0.1 0.5 1 2] [--nproc 2 4] [--moe 0.4] [--dtype bfloat16 float32]
                                 [--repeat 2]

The checkpoints are sweep.py's (bf16 Llamas built locally once, cached under <tmp>/hf_fsdp_loadfix_bench); --moe adds
a bf16 Mixtral of about that many billion parameters, saved with per-expert keys (5.x fuses them at load: shard-on-read
reads them through transformers' own loader, sliced where it can). Each rank
(this script with --worker, gloo, CPU) runs from_pretrained under the FSDP variables, then accelerate's
fsdp2_prepare_model with cpu_ram_efficient_loading (default and sharded), or from_pretrained(distributed_config=
DistributedConfig(fsdp_size=N)) without the FSDP variables (native, transformers >= 5.15). Per rank: the peak
anonymous RSS over both steps (sampled from /proc every 0.5 ms), the time to the sharded model, the bytes it read from
the checkpoint (shard-on-read) and received by dist.broadcast. Targets: every rank <= its own shard + 2 x the largest
tensor + 64 MB; time <= 0.8 x the default path and <= 1.1 x native. Writes benchmarks/results/sharded-<transformers>.
{json,md,png}; --from-json re-renders an earlier run.
"""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sweep import _numels, checkpoint, common_args, finish, largest_numel, save  # noqa: E402

MODES = ("default", "sharded", "native")
# drawn in this order: native wide and pale underneath, shard-on-read dashed and hollow on top, so that where their
# values are equal (memory, most times) both show
STYLE = {"native": {"color": "tab:green", "marker": "s", "markersize": 10, "linewidth": 8, "alpha": 0.35},
         "default": {"color": "tab:red", "marker": "o", "markersize": 6, "linewidth": 1.8},
         "sharded": {"color": "tab:blue", "marker": "D", "markersize": 5, "linewidth": 1.6, "linestyle": "--",
                     "markerfacecolor": "white"}}
LABEL = {"default": "default path (HF_FSDP_LOADFIX_SOURCE=local): rank 0 reads the checkpoint, accelerate's "
                    "fsdp2_prepare_model broadcasts it",
         "sharded": "shard-on-read (HF_FSDP_LOADFIX_SOURCE=sharded): each rank reads only its own slices, nothing "
                    "broadcast",
         "native": "transformers' native load: from_pretrained(distributed_config=DistributedConfig(fsdp_size=N)), "
                   "no FSDP variables"}


def worker(args):
    import torch.distributed as dist

    from hf_fsdp_loadfix import _worker as helpers

    if args.mode == "native":
        dist.init_process_group("gloo")
    else:
        os.environ["HF_FSDP_LOADFIX_SOURCE"] = "sharded" if args.mode == "sharded" else "local"
        helpers.init_rank()
    import hf_fsdp_loadfix

    cls, kwargs = helpers.model_class(args.ckpt), helpers.dtype_kwargs(args.dtype)
    if args.mode == "native":
        from transformers.distributed import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(fsdp_size=dist.get_world_size())
    dist.barrier()
    sampler = helpers.PeakSampler()
    sampler.start()
    start = time.perf_counter()
    with helpers.counted_broadcasts() as sent:
        model = cls.from_pretrained(args.ckpt, **kwargs)
        if args.mode != "native":
            model = helpers.shard_accelerate(model, dist.get_rank())
    seconds = time.perf_counter() - start
    peak = sampler.finish()
    read = hf_fsdp_loadfix.status()["shard_on_read"]
    helpers.finish({"rank": dist.get_rank(), "seconds": seconds, "peak_kb": peak, "bytes_broadcast": sent[0],
                    "bytes_read": read["bytes_read"] if isinstance(read, dict) else None}, args.out)


MOE = {0.4: (1024, 8, 8)}  # billions -> (hidden, layers, experts)


def moe_checkpoint(size, root):
    """A bf16 Mixtral, every parameter random, saved by the installed transformers (per-expert keys)."""
    hidden, layers, experts = MOE[size]
    path = os.path.join(root, f"mixtral_h{hidden}_l{layers}_e{experts}")
    if not os.path.exists(os.path.join(path, "config.json")):
        import torch
        from transformers import MixtralConfig, MixtralForCausalLM

        print(f"building {path}", flush=True)
        cfg = MixtralConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 1.375) // 64 * 64,
                            num_hidden_layers=layers, num_attention_heads=hidden // 128, num_key_value_heads=2,
                            num_local_experts=experts, num_experts_per_tok=2, max_position_embeddings=256)
        torch.manual_seed(0)
        model = MixtralForCausalLM._from_config(cfg, dtype=torch.bfloat16)
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.05)
        model.save_pretrained(path)
    return path, sum(_numels(path))


def measure(args, versions):
    from packaging.version import Version

    from hf_fsdp_loadfix._worker import launch

    modes = [m for m in MODES if m != "native" or Version(versions["transformers"]) >= Version("5.15")]
    models = [("llama", *checkpoint(size, args.dir)) for size in args.sizes]
    models += [("mixtral", *moe_checkpoint(size, args.dir)) for size in args.moe]
    rows = []
    for model, ckpt, params in models:
        largest = largest_numel(ckpt)
        for nproc in args.nproc:
            for dtype in args.dtype:
                width = 2 if dtype == "bfloat16" else 4
                target_mb = (width * params / nproc + 2 * width * largest) / 2**20 + 64
                repeats = {m: [] for m in modes}
                for _ in range(args.repeat):  # interleaved: load on the machine hits every mode alike
                    for mode in modes:
                        outputs, results = launch([os.path.abspath(__file__), "--worker", "--mode", mode, "--ckpt",
                                                   ckpt, "--dtype", dtype], tempfile.mkdtemp(), nproc=nproc,
                                                  timeout=3600)
                        if any(rc for rc, _ in outputs):
                            sys.exit(next(text for rc, text in outputs if rc)[-3000:])
                        repeats[mode].append(results)
                for mode in modes:
                    ranks = list(zip(*repeats[mode]))
                    rows.append({**versions, "model": model, "params": params, "nproc": nproc, "load_dtype": dtype,
                                 "mode": mode, "repeat": args.repeat, "target_mb": round(target_mb, 1),
                                 "checkpoint_mb": round(2 * params / 2**20, 1),
                                 "peak_mb": [round(max(r["peak_kb"] for r in rs) / 1024, 1) for rs in ranks],
                                 "seconds": round(min(max(r["seconds"] for r in rep) for rep in repeats[mode]), 2),
                                 "read_mb": [None if rs[0]["bytes_read"] is None else
                                             round(rs[0]["bytes_read"] / 2**20, 1) for rs in ranks],
                                 "broadcast_mb": [round(rs[0]["bytes_broadcast"] / 2**20, 1) for rs in ranks]})
                    print(rows[-1], flush=True)
    return rows


def markdown(rows):
    v = rows[0]
    lines = [f"# Shard-on-read: transformers {v['transformers']}, accelerate {v['accelerate']}", "",
             "Time to a sharded model (from_pretrained + accelerate's fsdp2_prepare_model; native: from_pretrained "
             "with DistributedConfig(fsdp_size=N)), slowest rank; peak anonymous RSS above each rank's baseline over "
             "both; bf16 safetensors checkpoints built locally (Llamas; Mixtral with per-expert keys), CPU gloo ranks "
             f"sharing 2 cores, no mixed precision; `python benchmarks/sharded.py`. Shortest time and highest peak of "
             f"{v['repeat']} runs each. Target: each rank's own shard + 2 x the largest tensor + 64 MB.", "",
             "| model | ranks | load dtype | mode | time s | rank 0 peak MB | other ranks' peak MB (max) | target MB "
             "| read MB per rank (min-max) | broadcast MB per rank |", "|---|---|---|---|---|---|---|---|---|---|"]
    by = {(r.get("model", "llama"), r["params"], r["nproc"], r["load_dtype"], r["mode"]): r for r in rows}
    notes = []
    for key, r in sorted(by.items(), key=lambda kv: (*kv[0][:4], MODES.index(kv[0][4]))):
        model, params, nproc, dtype, mode = key
        reads = [x for x in r["read_mb"] if x is not None]
        read = f"{min(reads):.0f}-{max(reads):.0f}" if reads else "-"
        lines.append(f"| {model} {params / 1e9:.2f}B | {nproc} | {dtype} | {mode} | {r['seconds']:.2f} | "
                     f"{r['peak_mb'][0]:.0f} | {max(r['peak_mb'][1:]):.0f} | {r['target_mb']:.0f} | {read} | "
                     f"{max(r['broadcast_mb'][1:]):.0f} |")
        if mode == "sharded":
            default, native = by[(*key[:4], "default")], by.get((*key[:4], "native"))
            within = max(r["peak_mb"]) <= r["target_mb"]
            vs = r["seconds"] / default["seconds"]
            vs_native = f", {r['seconds'] / native['seconds']:.2f}x native" if native else ""
            notes.append(f"- {model} {params / 1e9:.2f}B, {nproc} ranks, {dtype}: sharded {vs:.2f}x the default "
                         f"path's time{vs_native}; every rank {'within' if within else 'above'} its target")
    return "\n".join(lines + [""] + notes) + "\n"


def plot(rows, path):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    dtypes, counts = sorted({r["load_dtype"] for r in rows}), sorted({r["nproc"] for r in rows})
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]  # bars and legend; lines drawn in STYLE's order
    llama = [r for r in rows if r.get("model", "llama") == "llama"]
    mixtral = [r for r in rows if r.get("model") == "mixtral"]
    fig, axes = plt.subplots(len(dtypes) + bool(mixtral), 2 * len(counts),
                             figsize=(5.5 * 2 * len(counts), 4.2 * (len(dtypes) + bool(mixtral))), squeeze=False)
    for i, dtype in enumerate(dtypes):  # the Llamas against their size: memory, then time, one panel per rank count
        for j, nproc in enumerate(counts):
            mem, secs = axes[i][j], axes[i][len(counts) + j]
            runs = [r for r in llama if r["load_dtype"] == dtype and r["nproc"] == nproc]
            for mode in [m for m in STYLE if m in modes]:
                done = [r for r in runs if r["mode"] == mode]
                mem.plot([r["params"] / 1e9 for r in done], [max(r["peak_mb"]) for r in done], **STYLE[mode])
                secs.plot([r["params"] / 1e9 for r in done], [r["seconds"] for r in done], **STYLE[mode])
            target = [r for r in runs if r["mode"] == "sharded"]
            mem.plot([r["params"] / 1e9 for r in target], [r["target_mb"] for r in target], color="black",
                     linewidth=0.9)
            mem.set_title(f"Llama: peak memory, {nproc} ranks, loaded as {dtype}", fontsize=10)
            mem.set_ylabel("peak anonymous RSS above baseline,\nhighest rank (MB)")
            secs.set_title(f"Llama: time to the sharded model, {nproc} ranks, loaded as {dtype}", fontsize=10)
            secs.set_ylabel("seconds, slowest rank")
    for j, nproc in enumerate(counts if mixtral else ()):  # the Mixtral: one size, bars per load dtype
        mem, secs = axes[-1][j], axes[-1][len(counts) + j]
        width = 0.8 / len(modes)
        for k, mode in enumerate(modes):
            done = {r["load_dtype"]: r for r in mixtral if r["mode"] == mode and r["nproc"] == nproc}
            at = [d for d, dtype in enumerate(dtypes) if dtype in done]  # the load dtype's group of bars
            x, runs = [d + (k - (len(modes) - 1) / 2) * width for d in at], [done[dtypes[d]] for d in at]
            bar = {"color": STYLE[mode]["color"], "alpha": 0.5 if mode == "native" else 1.0}
            mem.bar_label(mem.bar(x, [max(r["peak_mb"]) for r in runs], width, **bar), fmt="%.0f", fontsize=7)
            secs.bar_label(secs.bar(x, [r["seconds"] for r in runs], width, **bar), fmt="%.2f", fontsize=7)
            if mode == "sharded":
                mem.hlines([r["target_mb"] for r in runs], [d - 0.45 for d in at], [d + 0.45 for d in at],
                           color="black", linewidth=0.9)
        name = f"Mixtral {mixtral[0]['params'] / 1e9:.2f}B, per-expert keys"
        mem.set_title(f"{name}: peak memory, {nproc} ranks", fontsize=10)
        mem.set_ylabel("peak anonymous RSS above baseline,\nhighest rank (MB)")
        secs.set_title(f"{name}: time to the sharded model, {nproc} ranks", fontsize=10)
        secs.set_ylabel("seconds, slowest rank")
        for ax in (mem, secs):
            ax.set_xticks(range(len(dtypes)), [f"loaded as {dtype}" for dtype in dtypes])
            ax.grid(True, axis="y", alpha=0.3)
            ax.margins(y=0.12)
    handles = [Line2D([], [], label=LABEL[mode], **STYLE[mode]) for mode in modes]
    handles.append(Line2D([], [], color="black", linewidth=0.9, label="memory target of every rank: its own shard + "
                          "2 x the largest tensor + 64 MB"))
    v = rows[0]
    names = {"sharded": "shard-on-read", "default": "the default path", "native": "native DistributedConfig"}
    finish(fig, axes[:len(dtypes)].flat, " vs ".join(names[m] for m in names if m in modes) + f":\ntransformers "
           f"{v['transformers']}, accelerate {v['accelerate']}, bf16 checkpoints, CPU gloo ranks", path, handles)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p)
    p.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    p.add_argument("--moe", type=float, nargs="*", default=list(MOE), choices=list(MOE))
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args, _ = p.parse_known_args()
    if args.worker:
        args.dtype = args.dtype[0]
        return worker(args)
    import accelerate
    import transformers

    versions = {"transformers": transformers.__version__, "accelerate": accelerate.__version__}
    rows = json.load(open(args.from_json)) if args.from_json else measure(args, versions)
    stem = os.path.join(args.out, f"sharded-{rows[0]['transformers']}")
    save(stem, rows, markdown(rows), lambda path: plot(rows, path))


if __name__ == "__main__":
    main()
