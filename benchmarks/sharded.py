"""Time to a sharded model and per-rank peak memory, against model size: the default path (rank 0 reads and
broadcasts), shard-on-read (HF_FSDP_LOADFIX_SOURCE=sharded) and transformers' native DistributedConfig load, side by
side in one run on the installed transformers and accelerate.

    pip install matplotlib                     # for the plot
    python benchmarks/sharded.py [--sizes 0.1 0.5 1] [--nproc 2] [--dtype bfloat16 float32] [--repeat 2]

The checkpoints are sweep.py's (bf16 Llamas built locally once, cached under <tmp>/hf_fsdp_loadfix_bench). Each rank
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
from sweep import checkpoint, common_args, finish, largest_numel, save  # noqa: E402

MODES = ("default", "sharded", "native")
STYLE = {"default": ("tab:red", "o"), "sharded": ("tab:blue", "D"), "native": ("tab:green", "s")}


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


def measure(args, versions):
    from packaging.version import Version

    from hf_fsdp_loadfix._worker import launch

    modes = [m for m in MODES if m != "native" or Version(versions["transformers"]) >= Version("5.15")]
    rows = []
    for size in args.sizes:
        ckpt, params = checkpoint(size, args.dir)
        for dtype in args.dtype:
            width = 2 if dtype == "bfloat16" else 4
            target_mb = (width * params / args.nproc + 2 * width * largest_numel(ckpt)) / 2**20 + 64
            repeats = {m: [] for m in modes}
            for _ in range(args.repeat):  # interleaved: load on the machine hits every mode alike
                for mode in modes:
                    outputs, results = launch([os.path.abspath(__file__), "--worker", "--mode", mode, "--ckpt", ckpt,
                                               "--dtype", dtype], tempfile.mkdtemp(), nproc=args.nproc, timeout=3600)
                    if any(rc for rc, _ in outputs):
                        sys.exit(next(text for rc, text in outputs if rc)[-3000:])
                    repeats[mode].append(results)
            for mode in modes:
                ranks = list(zip(*repeats[mode]))
                rows.append({**versions, "params": params, "nproc": args.nproc, "load_dtype": dtype, "mode": mode,
                             "repeat": args.repeat, "target_mb": round(target_mb, 1),
                             "checkpoint_mb": round(2 * params / 2**20, 1),
                             "peak_mb": [round(max(r["peak_kb"] for r in rs) / 1024, 1) for rs in ranks],
                             "seconds": round(min(max(r["seconds"] for r in rep) for rep in repeats[mode]), 2),
                             "read_mb": [None if rs[0]["bytes_read"] is None else round(rs[0]["bytes_read"] / 2**20, 1)
                                         for rs in ranks],
                             "broadcast_mb": [round(rs[0]["bytes_broadcast"] / 2**20, 1) for rs in ranks]})
                print(rows[-1], flush=True)
    return rows


def markdown(rows):
    v = rows[0]
    lines = [f"# Shard-on-read: transformers {v['transformers']}, accelerate {v['accelerate']}, {v['nproc']} ranks", "",
             "Time to a sharded model (from_pretrained + accelerate's fsdp2_prepare_model; native: from_pretrained "
             "with DistributedConfig(fsdp_size=N)), slowest rank; peak anonymous RSS above each rank's baseline over "
             "both; bf16 safetensors Llamas built locally, CPU gloo ranks, no mixed precision; `python "
             f"benchmarks/sharded.py`. Shortest time and highest peak of {v['repeat']} runs each.", "",
             "| params | load dtype | mode | time s | rank 0 peak MB | rank 1 peak MB | target MB | read MB per rank "
             "| broadcast MB per rank |", "|---|---|---|---|---|---|---|---|---|"]
    by = {(r["params"], r["load_dtype"], r["mode"]): r for r in rows}
    notes = []
    for (params, dtype, mode), r in sorted(by.items(), key=lambda kv: (kv[0][0], kv[0][1], MODES.index(kv[0][2]))):
        read = "/".join(f"{x:.0f}" for x in r["read_mb"]) if r["read_mb"][0] is not None else "-"
        lines.append(f"| {params / 1e9:.2f}B | {dtype} | {mode} | {r['seconds']:.2f} | {r['peak_mb'][0]:.0f} | "
                     f"{r['peak_mb'][1]:.0f} | {r['target_mb']:.0f} | {read} | {r['broadcast_mb'][1]:.0f} |")
        if mode == "sharded":
            default, native = by[(params, dtype, "default")], by.get((params, dtype, "native"))
            within = max(r["peak_mb"]) <= r["target_mb"]
            vs = r["seconds"] / default["seconds"]
            vs_native = f", {r['seconds'] / native['seconds']:.2f}x native" if native else ""
            notes.append(f"- {params / 1e9:.2f}B {dtype}: sharded {vs:.2f}x the default path's time{vs_native}; every "
                         f"rank {'within' if within else 'above'} its target")
    return "\n".join(lines + [""] + notes) + "\n"


def plot(rows, path):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["load_dtype"] for r in rows})
    fig, axes = plt.subplots(len(dtypes), 2, figsize=(12, 4.2 * len(dtypes)), squeeze=False)
    for (mem, secs), dtype in zip(axes, dtypes):
        for mode, (color, marker) in STYLE.items():
            runs = [r for r in rows if r["mode"] == mode and r["load_dtype"] == dtype]
            if not runs:
                continue
            x = [r["params"] / 1e9 for r in runs]
            mem.plot(x, [r["peak_mb"][0] for r in runs], "-", color=color, marker=marker, label=f"rank 0, {mode}")
            mem.plot(x, [r["peak_mb"][1] for r in runs], "--", color=color, marker=marker, markerfacecolor="none",
                     label=f"rank 1, {mode}")
            secs.plot(x, [r["seconds"] for r in runs], "-", color=color, marker=marker, label=mode)
        target = [r for r in rows if r["mode"] == "sharded" and r["load_dtype"] == dtype]
        mem.plot([r["params"] / 1e9 for r in target], [r["target_mb"] for r in target], ":", color="black",
                 label="target (own shard + 2 x largest tensor + 64 MB)")
        mem.set_title(f"peak memory, loaded as {dtype}")
        mem.set_ylabel("peak anonymous RSS above baseline (MB)")
        secs.set_title(f"time to the sharded model, loaded as {dtype}")
        secs.set_ylabel("seconds, slowest rank")
    v = rows[0]
    finish(fig, axes.flat, f"shard-on-read vs the default path vs native DistributedConfig: transformers "
           f"{v['transformers']}, accelerate {v['accelerate']}, {v['nproc']} CPU ranks", path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_args(p)
    p.add_argument("--nproc", type=int, default=2)
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
