"""``hf-fsdp-loadfix check``: load a checkpoint on N local CPU ranks under FSDP cpu-ram-efficient conditions,
without and with the patch, run the FSDP2 broadcast from rank 0, and say whether the contract holds."""

import json
import os
import re
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


def _error_line(text: str) -> str:
    """The exception line of a rank's traceback (its first line where the message spans several), else its last."""
    lines = [re.sub(r"^\[rank\d+\]: ", "", line) for line in text.strip().splitlines()] or [""]
    return next((line for line in reversed(lines) if re.match(r"[\w.]+(Error|Exception)\b", line)), lines[-1])


def evaluate(outputs, results) -> list[str]:
    """Every way the ranks' reports break the contract (empty: it holds)."""
    failed = [f"rank {i} exited with status {rc}: {_error_line(text)}"
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


def _ranks(outputs, results) -> list[dict]:
    """Per-rank numbers for the JSON report and the table (units in the field names)."""
    r0, ranks = results[0] or {}, []
    for i, ((rc, text), r) in enumerate(zip(outputs, results)):
        if r is None:
            ranks.append({"rank": i, "exit_status": rc, "error": _error_line(text)})
            continue
        ranks.append({
            "rank": i, "exit_status": rc, "rss_peak_mb": round(r["rss_peak_delta_kb"] / 1024, 1),
            "load_s": round(r["load_s"], 3), "devices": sorted({v["device"] for v in r["state"].values()}),
            "non_persistent_buffers_equal_rank0": r["non_persistent"] == r0.get("non_persistent"),
            "checkpoint_keys_compared": r["checkpoint_keys_compared"],
            "checkpoint_keys_mismatched": len(r["mismatch_vs_checkpoint"]),
            "state_equal_rank0": r["state_digest"] == r0.get("state_digest"),
            "logits_equal_rank0": None if "logits_error" in r else r["logits_digest"] == r0.get("logits_digest"),
            "logits_nan": r.get("logits_nan"),
        })
    return ranks


def _cells(run: dict) -> dict:
    """One column of the table, formatted from a run's numbers."""
    ranks, yes = run["ranks"], {True: "yes", False: "no"}
    fix = "applied" if run["accelerate_fix"] == "applied" else "off"
    cells = {"FSDP2 sharding + broadcast": f"accelerate, fix {fix}" if run["sharding"] == "accelerate"
             else "torch fully_shard"}
    if any("error" in r for r in ranks):
        return cells
    rest = ranks[1:]
    cells.update({f"peak RSS in from_pretrained, rank {r['rank']}": f"+{r['rss_peak_mb']:.1f} MB" for r in ranks})
    cells["from_pretrained time, ranks 1+"] = f"{max(r['load_s'] for r in rest):.2f} s"
    cells["ranks 1+: parameters on"] = ", ".join(sorted({d for r in rest for d in r["devices"]}))
    cells["ranks 1+: non-persistent buffers = rank 0's"] = yes[all(r["non_persistent_buffers_equal_rank0"]
                                                                   for r in rest)]
    compared = min(r["checkpoint_keys_compared"] for r in ranks)
    cells["after broadcast: keys = checkpoint"] = (
        f"{yes[not any(r['checkpoint_keys_mismatched'] for r in ranks)]} ({compared} keys)")
    cells["after broadcast: state equal on all ranks"] = yes[all(r["state_equal_rank0"] for r in ranks)]
    cells["logits equal on all ranks, no NaN"] = "n/a" if any(r["logits_equal_rank0"] is None for r in ranks) else (
        yes[all(r["logits_equal_rank0"] and not r["logits_nan"] for r in ranks)])
    return cells


class CannotRun(Exception):
    """The check could not run (exit status 2): a bad ``--model``, or a checkpoint the package rejected."""


REJECTED = "hf_fsdp_loadfix: checkpoint problem"  # the package's error for a checkpoint it refuses to load


def validate_model(model: str) -> None:
    """Refuse what is not a local checkpoint directory up front: no rank is started, nothing is downloaded."""
    if not os.path.isdir(model):
        hub = not os.path.exists(model) and re.fullmatch(r"[\w.-]+/[\w.-]+", model)
        raise CannotRun(f"--model {model} is not a local directory" + (
            f"; check loads local checkpoints only (download it first: hf download {model} --local-dir DIR)"
            if hub else ""))
    files = os.listdir(model)
    if "config.json" not in files:
        raise CannotRun(f"--model {model} is not a checkpoint directory: it has no config.json")
    if not any(f.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")) for f in files):
        raise CannotRun(f"--model {model} is not a checkpoint directory: it has no *.safetensors or *.bin weights")


def check(model: str | None = None, nproc: int = 2, dtype: str = "float32", as_json: bool = False) -> int:
    """Run the check; print the table (or JSON); 0 if the contract holds with the patch, 1 if not. Raises
    :class:`CannotRun` when it cannot run."""
    from importlib import metadata

    from packaging.version import Version

    from . import __version__, _worker

    if model is not None:
        validate_model(model)

    def say(msg, end="\n"):
        print(msg, end=end, file=sys.stderr, flush=True)

    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    stack = {d: version(d) for d in ("transformers", "torch", "accelerate")}
    if stack["transformers"] is None:
        raise CannotRun("transformers is not installed")
    # accelerate's real fsdp2_prepare_model where accelerate can run it (1.6.0 added its full-state-dict broadcast)
    sharding = "accelerate" if stack["accelerate"] and Version(stack["accelerate"]) >= Version("1.6") else "native"
    say("hf-fsdp-loadfix check: " + ", ".join(f"{d} {v or 'not installed'}" for d, v in stack.items()))
    tmp = tempfile.mkdtemp(prefix="hf_fsdp_loadfix_check_")
    report = {"hf_fsdp_loadfix": __version__, "stack": stack, "model": model, "nproc": nproc, "load_dtype": dtype,
              "runs": {}}
    try:
        steps = 2 if model else 3
        if model is None:
            t0 = time.perf_counter()
            say(f"[1/{steps}] building a small bf16 Llama locally ... ", end="")
            model = os.path.join(tmp, "model")
            report["model_params"] = build_llama(model, hidden=512, layers=4)
            report["build_s"] = round(time.perf_counter() - t0, 2)
            say(f"{report['model_params'] / 1e6:.1f}M parameters, {report['build_s']:.1f} s")
        fsdp_env = {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true", "HF_HUB_OFFLINE": "1"}
        by = "accelerate's fsdp2_prepare_model" if sharding == "accelerate" else "FSDP2 broadcast from rank 0"
        # patched first: a checkpoint the package rejects ends the check before upstream is tried
        for step, (name, env) in enumerate((("patched", {}), ("upstream", {"HF_FSDP_LOADFIX": "0"})), steps - 1):
            t0 = time.perf_counter()
            say(f"[{step}/{steps}] {name}: {nproc} CPU ranks load as {dtype}, {by} ... ", end="")
            outputs, results = _worker.launch(["-m", "hf_fsdp_loadfix._worker", "--ckpt", model, "--dtype", dtype,
                                               "--shard", sharding], os.path.join(tmp, name), nproc=nproc,
                                              env={**fsdp_env, **env}, timeout=3600)
            wall_s = round(time.perf_counter() - t0, 2)
            say(f"{wall_s:.1f} s")
            rejected = {i: line.split("hf_fsdp_loadfix: ", 1)[1] for i, (rc, text) in enumerate(outputs) if rc
                        for line in text.splitlines() if REJECTED in line}
            if rejected:
                raise CannotRun(f"hf_fsdp_loadfix rejected the checkpoint before loading (rank "
                                f"{', '.join(map(str, sorted(rejected)))}): {rejected[min(rejected)]}")
            status = next((r["status"] for r in results[1:] if r), None)
            report["runs"][name] = {
                "wall_s": wall_s, "failures": evaluate(outputs, results),
                "applied": bool(status and status["applied"]),
                "patch": status and (status["class"] if status["applied"] else status["reason"]),
                "accelerate_fix": status and status["accelerate_fix"], "sharding": sharding,
                "persistent_buffers": len(results[0]["persistent_buffers"]) if results[0] else None,
                "ranks": _ranks(outputs, results), "output": [text[-2000:] for rc, text in outputs if rc]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fixed, up = report["runs"]["patched"]["ranks"][0], report["runs"]["upstream"]["ranks"][0]
    if "error" in fixed and fixed["error"] == up.get("error"):  # rank 0 fails alike with and without the package
        raise CannotRun(f"the model does not load on this stack, with or without hf_fsdp_loadfix (rank 0): "
                        f"{fixed['error']}")
    fixed = report["runs"]["patched"]
    report["passed"] = not fixed["failures"]
    print(json.dumps(report, indent=1) if as_json else _table(report))
    return 0 if report["passed"] else 1


def _table(report: dict) -> str:
    up, fixed, passed = report["runs"]["upstream"], report["runs"]["patched"], report["passed"]
    patch = fixed["patch"] if fixed["applied"] else "NOT applied"
    columns = [_cells(up), _cells(fixed)]
    head = "upstream (HF_FSDP_LOADFIX=0)", f"with hf_fsdp_loadfix ({patch})"
    rows = list(dict.fromkeys([*columns[0], *columns[1]])) + ["contract"]
    for cells, run in zip(columns, (up, fixed)):
        cells["contract"] = "FAIL" if run["failures"] else "PASS"
    width = max(map(len, rows))
    lines = [f"{'':{width}}  {head[0]:30}  {head[1]}"]
    lines += [f"{row:{width}}  {columns[0].get(row, '-'):30}  {columns[1].get(row, '-')}" for row in rows]
    looks_flat = all("devices" in r and r["devices"] != ["meta"] and r["rss_peak_mb"] <= PEAK_LIMIT_MB
                     for r in up["ranks"][1:])
    if looks_flat and report["load_dtype"] != "float32" and not report["stack"]["transformers"].startswith("4."):
        lines.append("(upstream's ranks 1+ look flat: without a dtype cast they read the checkpoint memory-mapped, "
                     "and file pages are not anonymous memory)")
    if not fixed["applied"]:
        lines.append(f"\nThe patch is not applied: {fixed['patch'] or 'no rank reported a status'}")
    for title, run in (("Upstream (what the package fixes)", up), ("With hf_fsdp_loadfix", fixed)):
        if run["failures"]:
            lines += ["", f"{title}:"] + [f"  - {f}" for f in run["failures"]] + run["output"]
    lines.append("\n" + ("PASS: FSDP cpu-ram-efficient loading on this stack is memory-flat and correct with "
                         "hf_fsdp_loadfix." if passed else "FAIL: the contract does not hold with hf_fsdp_loadfix "
                         "on this stack (see above)."))
    return "\n".join(lines)
