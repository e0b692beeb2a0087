"""Non-rank-0 peak anonymous RSS and from_pretrained time, unpatched vs patched, on the installed transformers.

    python benchmarks/load_memory.py [--hidden 2048 --layers 11]   # ~0.69B params, 1.4 GB bf16 safetensors

Builds the checkpoint locally once (no hub), then for each load dtype (the checkpoint's bf16, and a cast to
fp32) runs 2 gloo ranks with HF_FSDP_LOADFIX=0 and =1. RSS is sampled from /proc/self/status (RssAnon) on
each rank during from_pretrained and reported above that rank's baseline.
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from launch import run_ranks  # noqa: E402
from models import build  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=11)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "hf_fsdp_loadfix_bench"))
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()

    import transformers

    ckpt = os.path.join(args.dir, f"llama_h{args.hidden}_l{args.layers}_v{args.vocab}")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        build("sized", ckpt, hidden=args.hidden, layers=args.layers, vocab=args.vocab,
              inter=int(args.hidden * 2.6875))
    size_mb = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt)) / 2**20
    rows = []
    for dtype in ("bfloat16", "float32"):
        for patched in (0, 1):
            out = tempfile.mkdtemp()
            outputs, results = run_ranks(["--ckpt", ckpt, "--dtype", dtype, "--patch", str(patched)], out,
                                         env={"HF_FSDP_LOADFIX": str(patched)}, timeout=1200)
            for rc, text in outputs:
                if rc:
                    sys.exit(text[-3000:])
            r0, r1 = results
            rows.append({
                "transformers": transformers.__version__, "load_dtype": dtype, "patched": bool(patched),
                "rank0_peak_mb": round(r0["rss_peak_delta_kb"] / 1024, 1),
                "rank1_peak_mb": round(r1["rss_peak_delta_kb"] / 1024, 1),
                "rank1_load_s": round(r1["load_s"], 3), "rank0_load_s": round(r0["load_s"], 3),
                "rank1_param_devices": sorted({v["device"] for v in r1["state"].values()}),
            })
    print(f"checkpoint: {ckpt} ({size_mb:.0f} MB), transformers {transformers.__version__}")
    print("| load dtype | patched | rank 0 peak MB | rank 1 peak MB | rank 1 load s | rank 1 params on |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['load_dtype']} | {r['patched']} | {r['rank0_peak_mb']} | {r['rank1_peak_mb']} | "
              f"{r['rank1_load_s']} | {','.join(r['rank1_param_devices'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
