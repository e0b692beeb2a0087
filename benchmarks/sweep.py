"""Peak anonymous RSS of every rank during ``from_pretrained`` against model size, upstream vs patched, on the
installed transformers.

    pip install matplotlib                     # for the plot
    python benchmarks/sweep.py [--sizes 0.1 0.25 0.5 1 2] [--nproc 2 4] [--budget-gb 20]

Each size is a bf16 Llama built locally once (cached under <tmp>/hf_fsdp_loadfix_bench). For each load dtype
(bfloat16 = the checkpoint's, float32 = a cast), rank count, and HF_FSDP_LOADFIX=0 / 1, the ranks run
``python -m hf_fsdp_loadfix._worker --load-only`` (gloo, CPU). A run whose total memory, extrapolated linearly from
the same configuration at the previous size, would exceed --budget-gb is skipped and recorded as skipped.
Writes benchmarks/results/sweep-<transformers>.{json,md,png}; --from-json JSON re-renders the table and plot of an
earlier run without measuring.
"""

import argparse
import json
import math
import os
import sys
import tempfile

from hf_fsdp_loadfix import versions
from hf_fsdp_loadfix._check import PEAK_LIMIT_MB, build_llama
from hf_fsdp_loadfix._worker import launch

SIZES = {0.1: (768, 8), 0.25: (1024, 16), 0.5: (1536, 16), 1.0: (2048, 20), 2.0: (2560, 26)}  # (hidden, layers)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
BASELINE_MB = 400  # a rank's resident memory before from_pretrained (interpreter, torch, transformers)


def _numels(ckpt):
    """The element count of every tensor in the checkpoint's safetensors headers."""
    numels = []
    for name in sorted(os.listdir(ckpt)):
        if name.endswith(".safetensors"):
            with open(os.path.join(ckpt, name), "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            numels += [math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__"]
    return numels


def largest_numel(ckpt):
    return max(_numels(ckpt))


def checkpoint(size, root):
    hidden, layers = SIZES[size]
    path = os.path.join(root, f"llama_h{hidden}_l{layers}")
    if not os.path.exists(os.path.join(path, "config.json")):
        print(f"building {path}", flush=True)
        build_llama(path, hidden, layers)
    return path, sum(_numels(path))


def finish(fig, axes, title, path, handles=None):
    """The x axis, grid and legend every size plot has (``handles``: one legend for all panels, below them), the
    title, saved."""
    for ax in axes:
        ax.set_xlabel("parameters (billions)")
        ax.grid(True, alpha=0.3)
        if handles is None:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    if handles:
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0), fontsize=9, frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def sweep(args, version):
    rows, last = [], {}
    for size in args.sizes:
        ckpt, params = checkpoint(size, args.dir)
        for dtype in ("bfloat16", "float32"):
            for nproc in args.nproc:
                for patched in (False, True):
                    key = (dtype, nproc, patched)
                    row = {"transformers": version, "params": params, "load_dtype": dtype, "nproc": nproc,
                           "patched": patched}
                    if key in last:
                        prev_params, prev_total = last[key]
                        predicted = prev_total * params / prev_params + nproc * BASELINE_MB
                        if predicted > args.budget_gb * 1024:
                            rows.append({**row, "skipped": f"needs ~{predicted / 1024:.0f} GB"})
                            print("skip", rows[-1], flush=True)
                            continue
                    outputs, results = launch(["-m", "hf_fsdp_loadfix._worker", "--ckpt", ckpt, "--dtype", dtype,
                                               "--load-only"], tempfile.mkdtemp(), nproc=nproc, timeout=3600,
                                              env={"HF_FSDP_LOADFIX": str(int(patched))})
                    if any(rc for rc, _ in outputs):
                        sys.exit(next(text for rc, text in outputs if rc)[-3000:])
                    peaks = [r["rss_peak_delta_kb"] / 1024 for r in results]
                    last[key] = (params, sum(peaks))
                    rows.append({**row, "peak_mb": [round(p, 1) for p in peaks],
                                 "load_s": [round(r["load_s"], 3) for r in results],
                                 "non_rank0_devices": sorted({v["device"] for r in results[1:]
                                                              for v in r["state"].values()}),
                                 "applied": results[1]["status"]["applied"]})
                    print(rows[-1], flush=True)
    return rows


def markdown(rows, version, cls):
    lines = [f"# transformers {version} ({cls}): peak anonymous RSS during from_pretrained", "",
             "MB above each rank's baseline, sampled from /proc/self/status every 0.5 ms; bf16 safetensors Llama "
             "checkpoints built locally; CPU, gloo; `python benchmarks/sweep.py`. Each cell: upstream / patched.", "",
             "| params | load dtype | ranks | rank 0 MB | non-rank-0 MB (max) | non-rank-0 load s | "
             "non-rank-0 params on |", "|---|---|---|---|---|---|---|"]

    def cells(run):  # (rank 0 peak, max non-rank-0 peak, max non-rank-0 load time, non-rank-0 placement)
        if "skipped" in run:
            return ("skipped",) * 4
        return (f"{run['peak_mb'][0]:.1f}", f"{max(run['peak_mb'][1:]):.1f}", f"{max(run['load_s'][1:]):.2f}",
                ",".join(run["non_rank0_devices"]))

    runs = {(r["params"], r["load_dtype"], r["nproc"], r["patched"]): r for r in rows}
    for (params, dtype, nproc, patched), r in runs.items():
        if not patched:
            pairs = zip(cells(r), cells(runs[(params, dtype, nproc, True)]))
            lines.append(f"| {params / 1e9:.2f}B | {dtype} | {nproc} | "
                         + " | ".join(f"{up} / {fixed}" for up, fixed in pairs) + " |")
    patched = [max(r["peak_mb"][1:]) for r in rows if r["patched"] and "peak_mb" in r]
    lines += ["", f"Patched non-rank-0 peak over all runs: max {max(patched):.1f} MB "
              f"(target ≤ {PEAK_LIMIT_MB} MB: {'met' if max(patched) <= PEAK_LIMIT_MB else 'NOT met'})."]
    lines += [f"Skipped: {r['params'] / 1e9:.2f}B {r['load_dtype']} {r['nproc']} ranks "
              f"{'patched' if r['patched'] else 'upstream'}: {r['skipped']} (over --budget-gb on this machine)."
              for r in rows if "skipped" in r]
    return "\n".join(lines) + "\n"


# per (series, patched): colour, marker, marker size, line style, line width, alpha, hollow marker. Drawn in this
# order, wide and pale below, small on top, so that equal values (rank 0 everywhere, all four on 4.x) show every line
SERIES = {("rank 0", True): ("tab:blue", "o", 6, "-", 4.5, 0.35, False),
          ("non-rank-0 (max)", False): ("tab:red", "s", 13, "--", 1.3, 1.0, True),
          ("rank 0", False): ("tab:blue", "o", 9, "--", 1.3, 1.0, True),
          ("non-rank-0 (max)", True): ("tab:red", "s", 4, "-", 1.5, 1.0, False)}
LEGEND = ["rank 0, upstream", "rank 0, patched", "non-rank-0 (max), upstream", "non-rank-0 (max), patched",
          f"{PEAK_LIMIT_MB} MB target"]
NOTE_4X = ("4.x: upstream's non-rank-0 placeholders are CPU memory not yet written, so from_pretrained alone looks "
           "flat;\naccelerate's fp32 upcast under mixed precision writes them in prepare: see "
           "benchmarks/results/stream-1.15.0-transformers-4.57.6.md")


def plot(rows, version, cls, path):
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    dtypes, nprocs = sorted({r["load_dtype"] for r in rows}), sorted({r["nproc"] for r in rows})
    fig, axes = plt.subplots(len(dtypes), len(nprocs), figsize=(6 * len(nprocs), 4.6 * len(dtypes)), squeeze=False)
    for i, dtype in enumerate(dtypes):
        for j, nproc in enumerate(nprocs):
            ax = axes[i][j]
            runs = [r for r in rows if (r["load_dtype"], r["nproc"]) == (dtype, nproc)]
            for (name, patched), (color, marker, size, style, width, alpha, hollow) in SERIES.items():
                done = [r for r in runs if r["patched"] == patched and "peak_mb" in r]
                peaks = [r["peak_mb"][0] if name == "rank 0" else max(r["peak_mb"][1:]) for r in done]
                ax.plot([r["params"] / 1e9 for r in done], [max(p, 0.1) for p in peaks], style, color=color,
                        linewidth=width, alpha=alpha, marker=marker, markersize=size,
                        markerfacecolor="none" if hollow else color,
                        label=f"{name}, {'patched' if patched else 'upstream'}")
            for r in runs:  # a skipped run: an x at the top of the panel, with the reason
                if "skipped" in r:
                    x, top = r["params"] / 1e9, ax.get_xaxis_transform()
                    ax.plot(x, 0.93, "x", color="black", markersize=10, markeredgewidth=2, transform=top)
                    ax.annotate(f"{'patched' if r['patched'] else 'upstream'} skipped\n({r['skipped']})", (x, 0.93),
                                xycoords=top, xytext=(-8, -4), textcoords="offset points", ha="right", va="top",
                                fontsize=7)
            ax.axhline(PEAK_LIMIT_MB, color="grey", linewidth=0.8, linestyle=":", label=f"{PEAK_LIMIT_MB} MB target")
            handles = sorted(ax.get_legend_handles_labels()[0], key=lambda h: LEGEND.index(h.get_label()))
            if any("skipped" in r for r in runs):
                handles.append(Line2D([], [], color="black", marker="x", linestyle="none", markersize=8,
                                      markeredgewidth=2, label="run skipped: over --budget-gb"))
            ax.set_yscale("log")
            ax.set_ylim(top=ax.get_ylim()[1] * 4)  # room for the skipped marks
            ax.set_xlabel("parameters (billions)")
            ax.set_ylabel("peak anonymous RSS above baseline (MB)")
            ax.set_title(f"load as {dtype}, {nproc} ranks")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(handles=handles, fontsize=7, loc="center right", framealpha=0.85)
    fig.suptitle(f"transformers {version} ({cls}): peak memory of each rank during from_pretrained under FSDP "
                 "cpu-ram-efficient loading, upstream vs patched")
    if cls in ("C1", "C2"):
        fig.text(0.5, 0.005, NOTE_4X, ha="center", va="bottom", fontsize=8, style="italic")
    fig.tight_layout(rect=(0, 0.04 if cls in ("C1", "C2") else 0, 1, 1))
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser()
    common_args(p)
    p.add_argument("--nproc", type=int, nargs="+", default=[2, 4])
    p.add_argument("--budget-gb", type=float, default=20)
    args = p.parse_args()

    if args.from_json:
        rows = json.load(open(args.from_json))
        version = rows[0]["transformers"]
    else:
        import transformers

        version = transformers.__version__
        rows = sweep(args, version)
    cls = (versions.class_for(version) or "unsupported").upper()
    save(os.path.join(args.out, f"sweep-{version}"), rows, markdown(rows, version, cls),
         lambda path: plot(rows, version, cls, path))


def common_args(p):
    """The options sweep.py and stream.py share."""
    p.add_argument("--sizes", type=float, nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "hf_fsdp_loadfix_bench"))
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--from-json", help="only rewrite the table and plot from an earlier run's JSON")


def save(stem, rows, text, plot_to):
    """<stem>.json, <stem>.md and <stem>.png (``plot_to(path)``); print the table."""
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(text)
    plot_to(stem + ".png")
    print(text)


if __name__ == "__main__":
    main()
