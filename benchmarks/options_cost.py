"""What the opt-in options cost on a ~0.7B-param Llama (built locally once): non-rank-0 from_pretrained time
and peak anonymous RSS with HF_FSDP_LOADFIX_BUFFERS=off/verify/broadcast, and per-rank peak for two simulated
nodes of 2 ranks with HF_FSDP_LOADFIX_SOURCE=local/global (fp32 load, so a real copy shows as anonymous memory).

    python benchmarks/options_cost.py
"""

import os
import sys
import tempfile
import threading

from hf_fsdp_loadfix._check import build_llama
from hf_fsdp_loadfix._worker import free_port, launch

CKPT = os.path.join(tempfile.gettempdir(), "hf_fsdp_loadfix_bench", "llama_h2048_l11")


def ranks(env, dtype="bfloat16", nnodes=1):
    port, found = free_port(), {}

    def node(n):
        found[n] = launch(["-m", "hf_fsdp_loadfix._worker", "--ckpt", CKPT, "--dtype", dtype, "--load-only"],
                          tempfile.mkdtemp(), env=env, node_rank=n, nnodes=nnodes, port=port, timeout=1200)

    threads = [threading.Thread(target=node, args=(n,)) for n in range(nnodes)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    results = []
    for n in range(nnodes):
        for rc, text in found[n][0]:
            if rc:
                sys.exit(text[-3000:])
        results += found[n][1]
    return results


def main():
    if not os.path.exists(os.path.join(CKPT, "config.json")):
        build_llama(CKPT, hidden=2048, layers=11)
    print("| HF_FSDP_LOADFIX_BUFFERS | rank 1 load s | rank 1 peak MB |")
    print("|---|---|---|")
    for mode in ("off", "verify", "broadcast"):
        r = ranks({"HF_FSDP_LOADFIX_BUFFERS": mode})[1]
        print(f"| {mode} | {r['load_s']:.3f} | {r['rss_peak_delta_kb'] / 1024:.1f} |")
    print("\n| HF_FSDP_LOADFIX_SOURCE (2 nodes x 2 ranks, fp32) | peak MB per global rank 0/1/2/3 |")
    print("|---|---|")
    for source in ("local", "global"):
        rs = ranks({"HF_FSDP_LOADFIX_SOURCE": source}, dtype="float32", nnodes=2)
        peaks = " / ".join(f"{r['rss_peak_delta_kb'] / 1024:.0f}" for r in rs)
        print(f"| {source} | {peaks} |")


if __name__ == "__main__":
    main()
