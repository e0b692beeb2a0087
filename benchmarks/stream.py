"""Rank 0's memory and the prepare time of accelerate's ``fsdp2_prepare_model`` under bf16 mixed precision against
model size, with and without streaming (HF_FSDP_LOADFIX_STREAM), on the installed transformers and accelerate.

    pip install matplotlib                     # for the plot
    python benchmarks/stream.py [--sizes 0.1 0.25 0.5 1 2] [--nproc 2] [--repeat 3]

The checkpoints are sweep.py's (bf16 Llamas built locally once, cached under <tmp>/hf_fsdp_loadfix_bench), loaded
in their own dtype. Each rank (``python -m hf_fsdp_loadfix._worker --shard accelerate --prepare-only``, gloo, CPU)
runs from_pretrained then fsdp2_prepare_model with cpu_ram_efficient_loading; per rank: peak anonymous RSS over both
(sampled from /proc every 0.5 ms), the prepare time, and the bytes sent with dist.broadcast. Three runs per size:
mixed precision bf16 with streaming off (accelerate as it is) and on, and no mixed precision (accelerate as it is:
the time reference), each --repeat times (the highest peak and the shortest time count); --without-package adds
mixed precision bf16 with HF_FSDP_LOADFIX=0 (transformers and accelerate as they are). Targets: rank 0's peak
<= its own fp32 shard + 2 x the largest fp32 tensor + 64 MB; prepare time with mixed precision <= 1.5 x without it.
Writes benchmarks/results/stream-<accelerate>.{json,md,png} (with --without-package:
stream-<accelerate>-transformers-<transformers>.*); --from-json re-renders the table and plot of an earlier run.
"""

import argparse
import json
import os
import sys
import tempfile

from sweep import checkpoint, common_args, finish, largest_numel, save

from hf_fsdp_loadfix._worker import launch

RUNS = {"upstream": ("bf16", "0"), "streamed": ("bf16", "1"), "no mixed precision": ("no", "0")}  # package on
WITHOUT = "without the package"  # --without-package: HF_FSDP_LOADFIX=0, bf16 mixed precision
# per run, in drawing order: colour, marker, line width, alpha. "without the package" is drawn wide and pale
# underneath, so that rank 0's equal values with and without the package (streaming off) show both lines
STYLE = {WITHOUT: ("tab:purple", "v", 8.0, 0.35), "upstream": ("tab:red", "o", 3.0, 0.6),
         "streamed": ("tab:blue", "D", 1.5, 1.0), "no mixed precision": ("tab:grey", "^", 1.5, 1.0)}


def labels(rows) -> dict:
    """What each run is, for the legend: accelerate's release, and whether its prepare upcasts on rank 0."""
    v = rows[0]
    streamed = next(r for r in rows if r["run"] == "streamed")["stream"] == "applied"  # else nothing to stream
    own = f"accelerate {v['accelerate']}'s own fsdp2_prepare_model"
    return {WITHOUT: f"without the package (HF_FSDP_LOADFIX=0): transformers {v['transformers']} and {own}, bf16 "
                     "mixed precision",
            "upstream": f"{own} (HF_FSDP_LOADFIX_STREAM=0), bf16 mixed precision" + (
                ": rank 0 upcasts the whole model to fp32, then broadcasts it" if streamed else ""),
            "streamed": "the package's streamed prepare (HF_FSDP_LOADFIX_STREAM=1, its default), bf16 mixed "
                        "precision: rank 0 upcasts and broadcasts one tensor at a time" if streamed else
                        "HF_FSDP_LOADFIX_STREAM=1, bf16 mixed precision: not applied, nothing to stream (accelerate "
                        f"{v['accelerate']} does not upcast on rank 0)",
            "no mixed precision": f"{own}, no mixed precision (the time reference)"}


def measure(args, versions):
    rows = []
    for size in args.sizes:
        ckpt, params = checkpoint(size, args.dir)
        target_mb = (4 * params / args.nproc + 2 * 4 * largest_numel(ckpt)) / 2**20 + 64
        runs = {**RUNS, **({WITHOUT: ("bf16", "0")} if args.without_package else {})}
        repeats = {run: [] for run in runs}
        for _ in range(args.repeat):  # interleaved, so that load on the machine hits every run alike
            for run, (mixed, stream) in runs.items():
                env = {"HF_FSDP_LOADFIX_STREAM": stream, **({"HF_FSDP_LOADFIX": "0"} if run == WITHOUT else {})}
                outputs, results = launch(["-m", "hf_fsdp_loadfix._worker", "--ckpt", ckpt, "--shard", "accelerate",
                                           "--mixed-precision", mixed, "--prepare-only"], tempfile.mkdtemp(),
                                          nproc=args.nproc, timeout=3600, env=env)
                if any(rc for rc, _ in outputs):
                    sys.exit(next(text for rc, text in outputs if rc)[-3000:])
                repeats[run].append(results)
        for run, (_, stream) in runs.items():
            ranks = list(zip(*repeats[run]))  # per rank, its result in each repeat
            rows.append({**versions, "params": params, "nproc": args.nproc, "run": run, "target_rank0_mb": target_mb,
                         "repeat": args.repeat,
                         "stream": ranks[0][0]["status"]["accelerate_stream"] if stream == "1" else "off",
                         "peak_mb": [round(max(r["rss_peak_total_delta_kb"] for r in rs) / 1024, 1) for rs in ranks],
                         "prepare_s": [round(min(r["prepare_s"] for r in rs), 2) for rs in ranks],
                         "broadcast_mb": [round(rs[0]["bytes_broadcast"] / 2**20, 1) for rs in ranks]})
            print(rows[-1], flush=True)
    return rows


def markdown(rows):
    v = rows[0]
    lines = [f"# accelerate {v['accelerate']}, transformers {v['transformers']}: fsdp2_prepare_model under bf16 "
             "mixed precision, streamed or not", "",
             f"{v['nproc']} CPU gloo ranks, bf16 safetensors Llamas built locally, loaded as bf16, then accelerate's "
             "fsdp2_prepare_model with cpu_ram_efficient_loading; `python benchmarks/stream.py`. Peak anonymous RSS "
             "above each rank's baseline over from_pretrained + prepare; broadcast = MB each rank received through "
             "dist.broadcast. Cells: accelerate as it is / streamed; time reference: no mixed precision (accelerate as "
             "it is). "
             f"Highest peak and shortest time of {v['repeat']} runs each.", "",
             "| params | rank 0 peak MB | rank 0 target MB | rank 1 peak MB | prepare s | prepare s, no mixed "
             "precision | ratio to no mixed precision | broadcast MB |", "|---|---|---|---|---|---|---|---|"]
    by = {(r["params"], r["run"]): r for r in rows}
    met = []
    for params in sorted({r["params"] for r in rows}):
        up, st, ref = (by[(params, run)] for run in ("upstream", "streamed", "no mixed precision"))
        ratio = (max(up["prepare_s"]) / max(ref["prepare_s"]), max(st["prepare_s"]) / max(ref["prepare_s"]))
        met.append(st["peak_mb"][0] <= st["target_rank0_mb"] and ratio[1] <= 1.5)
        lines.append(f"| {params / 1e9:.2f}B | {up['peak_mb'][0]:.0f} / {st['peak_mb'][0]:.0f} | "
                     f"{st['target_rank0_mb']:.0f} | {up['peak_mb'][1]:.0f} / {st['peak_mb'][1]:.0f} | "
                     f"{max(up['prepare_s']):.2f} / {max(st['prepare_s']):.2f} | {max(ref['prepare_s']):.2f} | "
                     f"{ratio[0]:.1f}x / {ratio[1]:.1f}x | {up['broadcast_mb'][1]:.0f} / {st['broadcast_mb'][1]:.0f} |")
    streamed = next(r for r in rows if r["run"] == "streamed")
    if streamed["stream"] != "applied":
        lines += ["", f"Streaming: {streamed['stream']}. Both cells show accelerate as it is."]
    else:
        lines += ["", f"Targets (rank 0 within its target, streamed prepare within 1.5x the time without mixed "
                  f"precision) met at {sum(met)} of {len(met)} sizes."]
    if any(r["run"] == WITHOUT for r in rows):
        lines += ["", "Without the package (`HF_FSDP_LOADFIX=0`: transformers and accelerate as they are) / with it "
                  "(its defaults: streamed), both under bf16 mixed precision:", "",
                  "| params | rank 0 peak MB | rank 1 peak MB | prepare s | broadcast MB |", "|---|---|---|---|---|"]
        for params in sorted({r["params"] for r in rows}):
            off, on = by[(params, WITHOUT)], by[(params, "streamed")]
            lines.append(f"| {params / 1e9:.2f}B | {off['peak_mb'][0]:.0f} / {on['peak_mb'][0]:.0f} | "
                         f"{off['peak_mb'][1]:.0f} / {on['peak_mb'][1]:.0f} | {max(off['prepare_s']):.2f} / "
                         f"{max(on['prepare_s']):.2f} | {off['broadcast_mb'][1]:.0f} / {on['broadcast_mb'][1]:.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fig, (mem, secs) = plt.subplots(1, 2, figsize=(12, 4.5))
    handles, label = [], labels(rows)
    for run in [run for run in STYLE if any(r["run"] == run for r in rows)]:
        color, marker, width, alpha = STYLE[run]
        runs = [r for r in rows if r["run"] == run]
        x = [r["params"] / 1e9 for r in runs]
        style = {"color": color, "marker": marker, "linewidth": width, "alpha": alpha}
        if run != "no mixed precision":
            mem.plot(x, [r["peak_mb"][0] for r in runs], "-", **style)
            mem.plot(x, [r["peak_mb"][1] for r in runs], "--", markerfacecolor="none", **style)
        secs.plot(x, [max(r["prepare_s"]) for r in runs], "-", **style)
        handles.append(Line2D([], [], label=label[run], **style))
    target = [r for r in rows if r["run"] == "streamed"]
    mem.plot([r["params"] / 1e9 for r in target], [r["target_rank0_mb"] for r in target], ":", color="black")
    handles += [Line2D([], [], color="black", marker="o", label="memory: rank 0 (time: the slowest rank)"),
                Line2D([], [], color="black", marker="o", linestyle="--", markerfacecolor="none",
                       label="memory: rank 1"),
                Line2D([], [], color="black", linestyle=":", label="rank 0's target: its own fp32 shard + 2 x the "
                       "largest fp32 tensor + 64 MB")]
    mem.set_ylabel("peak anonymous RSS above baseline (MB)")
    mem.set_title("peak memory over from_pretrained + prepare")
    secs.set_ylabel("fsdp2_prepare_model (s), slowest rank")
    secs.set_title("prepare time")
    v = rows[0]
    finish(fig, (mem, secs), f"accelerate {v['accelerate']} fsdp2_prepare_model, transformers {v['transformers']}, "
           f"{v['nproc']} CPU gloo ranks, bf16 checkpoints loaded as bf16", path, handles)


def main():
    p = argparse.ArgumentParser()
    common_args(p)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3, help="runs per cell: the highest peak, the shortest time")
    p.add_argument("--without-package", action="store_true", help="also measure with HF_FSDP_LOADFIX=0")
    args = p.parse_args()

    if args.from_json:
        rows = json.load(open(args.from_json))
    else:
        import accelerate
        import torch
        import transformers

        rows = measure(args, {"accelerate": accelerate.__version__, "transformers": transformers.__version__,
                              "torch": torch.__version__})
    v = rows[0]
    stem = f"stream-{v['accelerate']}" + (f"-transformers-{v['transformers']}" if any(r["run"] == WITHOUT
                                                                                    for r in rows) else "")
    save(os.path.join(args.out, stem), rows, markdown(rows), lambda path: plot(rows, path))


if __name__ == "__main__":
    main()
