"""``hf-fsdp-loadfix check``: load a checkpoint on N local CPU ranks under FSDP cpu-ram-efficient conditions,
without and with the patch, run the FSDP2 broadcast from rank 0, and say whether the contract holds."""

import json
import os
import shutil
import sys
import tempfile
import time

PEAK_LIMIT_MB = 32  # non-rank-0 growth during from_pretrained that still counts as "no model-sized allocation"


def build_llama(path: str, hidden: int, layers: int, vocab: int = 32000, seed: int = 0) -> int:
    """Save a randomly initialised bf16 Llama (every parameter random, norms included, so a missed load cannot
    pass by accident) built locally with ``from_config``; returns its parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    from ._worker import dtype_kwargs

    logging.disable_progress_bar()
    heads = max(4, hidden // 128)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.6875) // 64 * 64,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                      max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(cfg, **dtype_kwargs("bfloat16"))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def evaluate(outputs, results) -> list[str]:
    """Every way the ranks' reports break the contract (empty: it holds)."""
    failed = [f"rank {i} exited with status {rc}: {(text.strip().splitlines() or [''])[-1]}"
              for i, ((rc, text), r) in enumerate(zip(outputs, results)) if rc or r is None]
    if failed:
        return failed
    r0 = results[0]
    for r in results[1:]:
        rank = f"rank {r['rank']}"
        devices = sorted({v["device"] for v in r["state"].values()})
        if devices != ["meta"]:
            failed.append(f"{rank}: parameters and persistent buffers on {', '.join(devices)}, not meta")
        layout = [k for k in r0["state"].keys() | r["state"].keys()
                  if {**r0["state"].get(k, {}), "device": 0} != {**r["state"].get(k, {}), "device": 0}]
        if layout:
            failed.append(f"{rank}: {len(layout)} state-dict entries differ from rank 0's in shape or dtype, "
                          f"e.g. {sorted(layout)[0]}")
        buffers = sorted(k for k in r0["non_persistent"].keys() | r["non_persistent"].keys()
                         if r0["non_persistent"].get(k) != r["non_persistent"].get(k))
        if buffers:
            failed.append(f"{rank}: non-persistent buffers differ from rank 0's: {', '.join(buffers)}")
        if r["tied"] != r0["tied"]:
            failed.append(f"{rank}: input/output embeddings {'tied' if r['tied'] else 'not tied'}, unlike rank 0")
        peak = r["rss_peak_delta_kb"] / 1024
        if peak > PEAK_LIMIT_MB:
            failed.append(f"{rank}: from_pretrained grew anonymous memory by {peak:.0f} MB "
                          f"(more than {PEAK_LIMIT_MB} MB: a model-sized allocation)")
    for r in results:
        rank = f"rank {r['rank']}"
        if r["mismatch_vs_checkpoint"]:
            failed.append(f"{rank}: after the broadcast {len(r['mismatch_vs_checkpoint'])} keys differ from the "
                          f"checkpoint, e.g. {r['mismatch_vs_checkpoint'][0]}")
        if r["state_digest"] != r0["state_digest"]:
            failed.append(f"{rank}: after the broadcast its full state differs from rank 0's")
        if "logits_error" not in r and (r["logits_nan"] or r["logits_digest"] != r0["logits_digest"]):
            failed.append(f"{rank}: logits " + ("contain NaN" if r["logits_nan"] else "differ from rank 0's"))
    return failed


def _cells(results) -> dict:
    """One column of the table: what each row shows for one run."""
    if any(r is None for r in results):
        return {}
    rest = results[1:]
    yes = {True: "yes", False: "no"}
    cells = {f"peak RSS in from_pretrained, rank {r['rank']}": f"+{r['rss_peak_delta_kb'] / 1024:.1f} MB"
             for r in results}
    cells["from_pretrained time, ranks 1+"] = f"{max(r['load_s'] for r in rest):.2f} s"
    cells["ranks 1+: parameters on"] = ", ".join(sorted({v["device"] for r in rest for v in r["state"].values()}))
    cells["ranks 1+: non-persistent buffers = rank 0's"] = yes[
        all(r["non_persistent"] == results[0]["non_persistent"] for r in rest)]
    compared = min(r["checkpoint_keys_compared"] for r in results)
    cells["after broadcast: keys = checkpoint"] = (
        f"{yes[not any(r['mismatch_vs_checkpoint'] for r in results)]} ({compared} keys)")
    cells["after broadcast: state equal on all ranks"] = yes[len({r["state_digest"] for r in results}) == 1]
    cells["logits equal on all ranks, no NaN"] = "n/a" if any("logits_error" in r for r in results) else yes[
        len({r["logits_digest"] for r in results}) == 1 and not any(r["logits_nan"] for r in results)]
    return cells


def check(model: str | None = None, nproc: int = 2, dtype: str = "float32", as_json: bool = False) -> int:
    """Run the check; print the table (or JSON); 0 if the contract holds with the patch, 1 if not."""
    from importlib import metadata

    from . import _worker

    def say(msg, end="\n"):
        print(msg, end=end, file=sys.stderr, flush=True)

    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    stack = {d: version(d) for d in ("transformers", "torch", "accelerate")}
    say("hf-fsdp-loadfix check: " + ", ".join(f"{d} {v}" for d, v in stack.items()))
    tmp = tempfile.mkdtemp(prefix="hf_fsdp_loadfix_check_")
    report = {"stack": stack, "nproc": nproc, "load_dtype": dtype, "runs": {}}
    try:
        steps = 2 if model else 3
        if model is None:
            t0 = time.perf_counter()
            say(f"[1/{steps}] building a small bf16 Llama locally ... ", end="")
            model = os.path.join(tmp, "model")
            params = build_llama(model, hidden=512, layers=4)
            say(f"{params / 1e6:.1f}M parameters, {time.perf_counter() - t0:.1f} s")
        report["model"] = model
        fsdp_env = {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
        for step, (name, env) in enumerate((("upstream", {"HF_FSDP_LOADFIX": "0"}), ("patched", {})), steps - 1):
            t0 = time.perf_counter()
            say(f"[{step}/{steps}] {name}: {nproc} CPU ranks load as {dtype}, FSDP2 broadcast from rank 0 ... ",
                end="")
            outputs, results = _worker.launch(["-m", "hf_fsdp_loadfix._worker", "--ckpt", model, "--dtype", dtype],
                                              os.path.join(tmp, name), nproc=nproc, env={**fsdp_env, **env},
                                              timeout=3600)
            say(f"{time.perf_counter() - t0:.1f} s")
            status = next((r["status"] for r in results[1:] if r), None)
            report["runs"][name] = {"failures": evaluate(outputs, results), "cells": _cells(results),
                                    "applied": bool(status and status["applied"]),
                                    "patch": status and (status["class"] if status["applied"] else status["reason"]),
                                    "output": [text[-2000:] for rc, text in outputs if rc]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    up, fixed = report["runs"]["upstream"], report["runs"]["patched"]
    report["passed"] = not fixed["failures"]
    print(json.dumps(report, indent=1) if as_json else _table(up, fixed, report["passed"]))
    return 0 if report["passed"] else 1


def _table(up: dict, fixed: dict, passed: bool) -> str:
    patch = fixed["patch"] if fixed["applied"] else "NOT applied"
    head = "upstream (HF_FSDP_LOADFIX=0)", f"with hf_fsdp_loadfix ({patch})"
    rows = list(dict.fromkeys([*up["cells"], *fixed["cells"]])) + ["contract"]
    up["cells"]["contract"] = "FAIL" if up["failures"] else "PASS"
    fixed["cells"]["contract"] = "FAIL" if fixed["failures"] else "PASS"
    width = max(map(len, rows))
    lines = [f"{'':{width}}  {head[0]:30}  {head[1]}"]
    lines += [f"{row:{width}}  {up['cells'].get(row, '-'):30}  {fixed['cells'].get(row, '-')}" for row in rows]
    if not fixed["applied"]:
        lines.append(f"\nThe patch is not applied: {fixed['patch'] or 'no rank reported a status'}")
    for title, run in (("Upstream (what the package fixes)", up), ("With hf_fsdp_loadfix", fixed)):
        if run["failures"]:
            lines += ["", f"{title}:"] + [f"  - {f}" for f in run["failures"]] + run["output"]
    lines.append("\n" + ("PASS: FSDP cpu-ram-efficient loading on this stack is memory-flat and correct with "
                         "hf_fsdp_loadfix." if passed else "FAIL: the contract does not hold with hf_fsdp_loadfix "
                         "on this stack (see above)."))
    return "\n".join(lines)
