"""``hf-fsdp-loadfix check``: load a checkpoint on N local ranks under FSDP cpu-ram-efficient conditions, without
and with the patch, run the FSDP2 broadcast from rank 0, and say whether the contract holds. CPU ranks (gloo) run
accelerate's ``fsdp2_prepare_model``; with 2 or more CUDA GPUs, one rank per GPU (NCCL) runs accelerate's real
``Accelerator.prepare(model, optimizer)`` and a training step (``--device cuda``, ``_worker``'s GPU section)."""

import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time

from ._worker import STEPS

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


def _where(step: dict | None) -> str:
    """Where a rank that wrote no report failed, from the step it recorded (``_worker.step``)."""
    return f"in {step['step']}" if step else "before from_pretrained"


def evaluate(outputs, results, sharded: bool = False, steps=None) -> list[str]:
    """Every way the ranks' reports break the contract (empty: it holds). ``sharded`` (shard-on-read): rank 0 joins
    the rules of the other ranks, and nothing may be broadcast but the keys the checkpoint lacks. ``steps``: what
    each rank recorded (``_worker.steps``), to say where a rank failed."""
    steps = steps or [None] * len(outputs)
    failed = [f"rank {i} exited with status {rc} {_where(step)}: {_error_line(text)}"
              for i, ((rc, text), r, step) in enumerate(zip(outputs, results, steps)) if rc or r is None]
    if failed:
        return failed
    r0 = results[0]
    if sharded:
        used = r0["status"]["shard_on_read"]  # as from_pretrained left it: why it is not used, where it is not
        if isinstance(used, str) and used.startswith("shard-on-read not used"):
            failed.append(used)
        failed += [f"rank {r['rank']}: {r['bytes_broadcast']} bytes broadcast under shard-on-read (keys the "
                   f"checkpoint lacks: {r.get('bytes_from_rank0', 0)})"
                   for r in results if r.get("bytes_broadcast", 0) > r.get("bytes_from_rank0", 0)]
    for r in results if sharded else results[1:]:
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
    fill = "fill" if sharded else "broadcast"
    for r in results:
        rank = f"rank {r['rank']}"
        if r["mismatch_vs_checkpoint"]:
            failed.append(f"{rank}: after the {fill} {len(r['mismatch_vs_checkpoint'])} keys differ from the "
                          f"checkpoint, e.g. {r['mismatch_vs_checkpoint'][0]}")
        if r["state_digest"] != r0["state_digest"]:
            failed.append(f"{rank}: after the {fill} its full state differs from rank 0's")
        if "logits_error" not in r and (r["logits_nan"] or r["logits_digest"] != r0["logits_digest"]):
            failed.append(f"{rank}: logits " + ("contain NaN" if r["logits_nan"] else "differ from rank 0's"))
        if "optimizer_params" in r and not r["optimizer_params"] == r["optimizer_model_params"] == r["model_params"]:
            failed.append(f"{rank}: after prepare(model, optimizer) the optimizer holds "
                          f"{r['optimizer_model_params']} of the model's {r['model_params']} parameters in "
                          f"{r['optimizer_params']} entries: a training step does not train the others")
        if "train_error" in r:
            failed.append(f"{rank}: the training step raised {r['train_error']}")
        elif "train_loss" in r and not math.isfinite(r["train_loss"]):
            failed.append(f"{rank}: the training step's loss is {r['train_loss']}")
    return failed


def _ranks(outputs, results, steps=None) -> list[dict]:
    """Per-rank numbers for the JSON report and the table (units in the field names)."""
    r0, ranks = results[0] or {}, []
    for i, ((rc, text), r, step) in enumerate(zip(outputs, results, steps or [None] * len(outputs))):
        if r is None:
            ranks.append({"rank": i, "exit_status": rc, "failed": _where(step), "error": _error_line(text)})
            continue
        ranks.append({
            "rank": i, "exit_status": rc, "rss_peak_mb": round(r["rss_peak_delta_kb"] / 1024, 1),
            "load_s": round(r["load_s"], 3), "devices": sorted({v["device"] for v in r["state"].values()}),
            "bytes_broadcast": r.get("bytes_broadcast"), **_read_fields(r),
            "non_persistent_buffers_equal_rank0": r["non_persistent"] == r0.get("non_persistent"),
            "checkpoint_keys_compared": r["checkpoint_keys_compared"],
            "checkpoint_keys_mismatched": len(r["mismatch_vs_checkpoint"]),
            "state_equal_rank0": r["state_digest"] == r0.get("state_digest"),
            "logits_equal_rank0": None if "logits_error" in r else r["logits_digest"] == r0.get("logits_digest"),
            "logits_nan": r.get("logits_nan"),
            **_gpu_fields(r),
        })
    return ranks


def _read_fields(r: dict) -> dict:
    """What a shard-on-read rank read from the checkpoint files (``status()["shard_on_read"]`` after the fill)."""
    read = r.get("shard_on_read")
    if not read:
        return {}
    return {"bytes_read": read["bytes_read"], "bytes_from_rank0": read["bytes_broadcast"],
            **{k: read[k] for k in ("keys_sliced", "keys_whole", "keys_converted", "keys_from_rank0")}}


def _gpu_fields(r: dict) -> dict:
    """What a ``--device cuda`` rank adds: its GPU, the optimizer after prepare, the training step."""
    if "device" not in r:
        return {}
    loss = r.get("train_loss")
    return {"device": r["device"], "optimizer_holds_params": r["optimizer_params"] == r["optimizer_model_params"]
            == r["model_params"], "train_loss": loss if loss is not None and math.isfinite(loss) else None,
            **({"train_error": r["train_error"]} if "train_error" in r else {})}


def _cells(run: dict, show_bytes: bool = False) -> dict:
    """One column of the table, formatted from a run's numbers; ``show_bytes``: the bytes each rank read from the
    files and broadcast (``check --source sharded``)."""
    ranks, yes, fix = run["ranks"], {True: "yes", False: "no"}, run["accelerate_fix"] or ""
    off = fix.removeprefix("disabled by ")  # the variable that turned it off, where one did
    fix = "applied" if fix == "applied" else f"off ({off})" if off != fix else \
        "not needed" if fix.startswith("not needed") else "off"
    fill = run.get("fill", "broadcast")  # how the shards got their values: broadcast from rank 0, or shard-on-read
    after = "after fill" if fill == "shard-on-read" else "after broadcast"
    cells = {f"FSDP2 sharding + {fill}": {"accelerate": f"accelerate, fix {fix}", "native": "torch fully_shard",
                                          "accelerator": f"Accelerator.prepare, fix {fix}"}[run["sharding"]]}
    if any("error" in r for r in ranks):
        return cells
    rest = ranks[1:]
    cells.update({f"peak RSS in from_pretrained, rank {r['rank']}": f"+{r['rss_peak_mb']:.1f} MB" for r in ranks})
    if show_bytes:
        cells.update({f"bytes read from the files, rank {r['rank']}": f"{r['bytes_read']:,}" if "bytes_read" in r
                      else "-" for r in ranks})
        cells.update({f"bytes broadcast, rank {r['rank']}": f"{r['bytes_broadcast']:,}" for r in ranks})
    cells["from_pretrained time, ranks 1+"] = f"{max(r['load_s'] for r in rest):.2f} s"
    cells["rank 0: parameters on"] = ", ".join(ranks[0]["devices"])
    cells["ranks 1+: parameters on"] = ", ".join(sorted({d for r in rest for d in r["devices"]}))
    cells["ranks 1+: non-persistent buffers = rank 0's"] = yes[all(r["non_persistent_buffers_equal_rank0"]
                                                                   for r in rest)]
    compared = min(r["checkpoint_keys_compared"] for r in ranks)
    cells[f"{after}: keys = checkpoint"] = (
        f"{yes[not any(r['checkpoint_keys_mismatched'] for r in ranks)]} ({compared} keys)")
    cells[f"{after}: state equal on all ranks"] = yes[all(r["state_equal_rank0"] for r in ranks)]
    no_forward = any(r["logits_equal_rank0"] is None for r in ranks)
    cells["logits equal on all ranks, no NaN"] = "n/a" if no_forward else (
        yes[all(r["logits_equal_rank0"] and not r["logits_nan"] for r in ranks)])
    if "device" in ranks[0]:  # --device cuda
        cells["ranks on GPUs"] = ", ".join(r["device"] for r in ranks)
        cells["prepare: optimizer holds every parameter"] = yes[all(r["optimizer_holds_params"] for r in ranks)]
        cells["one training step, finite loss"] = "n/a" if no_forward else yes[all(r["train_loss"] is not None
                                                                                  for r in ranks)]
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


def cuda_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def plan(device: str | None, nproc: int | None, gpus: int, sharding: str) -> tuple[str, int, str | None]:
    """(device, ranks, a note to print) for ``--device`` and ``--nproc``, given the CUDA GPUs and how accelerate can
    shard: one rank per GPU where there are 2 or more and accelerate has FSDP2, else 2 CPU ranks. Raises
    :class:`CannotRun` for a ``--device cuda`` that cannot run."""
    note = None
    if device is None:
        device = "cuda" if gpus >= 2 and sharding == "accelerate" else "cpu"
        if gpus == 1:
            note = "one CUDA GPU: --device cuda needs 2 or more (one rank per GPU); running on CPU ranks"
        elif gpus >= 2 and device == "cpu":
            note = f"{gpus} CUDA GPUs, but --device cuda needs accelerate >= 1.6; running on CPU ranks"
    if device == "cpu":
        return device, nproc or 2, note
    if sharding != "accelerate":
        raise CannotRun("--device cuda runs accelerate's Accelerator.prepare with FSDP2: install accelerate >= 1.6")
    if gpus < 2:
        raise CannotRun(f"--device cuda needs 2 or more CUDA GPUs (one rank per GPU); this machine has {gpus}")
    if nproc is not None and nproc > gpus:
        raise CannotRun(f"--nproc {nproc} is more than the {gpus} CUDA GPUs (one rank per GPU)")
    return device, nproc or gpus, note


def check(model: str | None = None, nproc: int | None = None, dtype: str = "float32", as_json: bool = False,
          device: str | None = None, source: str = "local") -> int:
    """Run the check; print the table (or JSON); 0 if the contract holds with the patch, 1 if not. Raises
    :class:`CannotRun` when it cannot run. ``device``/``nproc`` None: as :func:`plan` chooses. ``source``: the
    patched run's HF_FSDP_LOADFIX_SOURCE (``sharded``: shard-on-read, rank 0 held to the same rules)."""
    from importlib import metadata

    from packaging.version import Version

    from . import __version__, _config, _worker

    _config.validate()  # a junk HF_FSDP_LOADFIX* value: one error naming it, before anything is built
    if not _config.enabled():  # the patched run would be upstream too: nothing to compare
        raise CannotRun("hf_fsdp_loadfix is disabled by HF_FSDP_LOADFIX=0, so the check would compare upstream with "
                        "itself; unset HF_FSDP_LOADFIX to run it")
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
    device, nproc, note = plan(device, nproc, cuda_gpus() if device != "cpu" else 0, sharding)
    if note:
        say(note)
    if device == "cuda":
        sharding, ranks = "accelerator", f"{nproc} CUDA ranks (NCCL)"
        by = "accelerate's Accelerator.prepare(model, optimizer), one training step"
    else:
        ranks = f"{nproc} CPU ranks"
        by = "accelerate's fsdp2_prepare_model" if sharding == "accelerate" else "FSDP2 broadcast from rank 0"
    tmp = tempfile.mkdtemp(prefix="hf_fsdp_loadfix_check_")
    report = {"hf_fsdp_loadfix": __version__, "stack": stack, "model": model, "device": device, "nproc": nproc,
              "load_dtype": dtype, "source": source, "runs": {}}
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
        argv = ["-m", "hf_fsdp_loadfix._worker", "--ckpt", model, "--dtype", dtype, "--shard",
                "native" if sharding == "native" else "accelerate"] + (["--device", "cuda"] if device == "cuda" else [])
        # patched first: a checkpoint the package rejects ends the check before upstream is tried
        runs = (("patched", {"HF_FSDP_LOADFIX_SOURCE": source}), ("upstream", {"HF_FSDP_LOADFIX": "0"}))
        for step, (name, env) in enumerate(runs, steps - 1):
            t0 = time.perf_counter()
            say(f"[{step}/{steps}] {name}: {ranks} load as {dtype}, {by} ... ", end="")
            out = os.path.join(tmp, name)
            outputs, results = _worker.launch(argv, out, nproc=nproc, env={**fsdp_env, **env}, timeout=3600)
            reached = _worker.steps(out, nproc)
            wall_s = round(time.perf_counter() - t0, 2)
            say(f"{wall_s:.1f} s")
            rejected = {i: line.split("hf_fsdp_loadfix: ", 1)[1] for i, (rc, text) in enumerate(outputs) if rc
                        for line in text.splitlines() if REJECTED in line}
            if rejected:
                raise CannotRun(f"hf_fsdp_loadfix rejected the checkpoint before loading (rank "
                                f"{', '.join(map(str, sorted(rejected)))}): {rejected[min(rejected)]}")
            # the package's status as each rank saw it, after the load or (a rank that failed) before it; ranks 1+
            # first: the ranks the patch is for. None: no rank got as far as from_pretrained.
            status = next((r["status"] for r in [*results[1:], *reached[1:], results[0], reached[0]] if r), None)
            sor = name == "patched" and source == "sharded"
            report["runs"][name] = {
                "wall_s": wall_s, "failures": evaluate(outputs, results, sor, reached),
                "applied": status and status["applied"],
                "patch": status and (status["class"] if status["applied"] else status["reason"]),
                "accelerate_fix": status and status["accelerate_fix"], "sharding": sharding,
                "fill": "shard-on-read" if sor else "broadcast",
                "persistent_buffers": len(results[0]["persistent_buffers"]) if results[0] else None,
                "ranks": _ranks(outputs, results, reached), "output": [text[-2000:] for rc, text in outputs if rc]}
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


def _first_failure(ranks: list[dict]) -> dict | None:
    """The rank that failed at the earliest step (the others often fail only because it left the collectives)."""
    order = ["before from_pretrained", *(f"in {step}" for step in STEPS)]
    failed = [r for r in ranks if "error" in r]
    return min(failed, key=lambda r: order.index(r["failed"])) if failed else None


def _table(report: dict) -> str:
    up, fixed, passed = report["runs"]["upstream"], report["runs"]["patched"], report["passed"]
    sharded = report["source"] == "sharded"
    patch = {True: f"{fixed['patch']}{', shard-on-read' if sharded else ''}", False: "NOT applied",
             None: "status unknown"}[fixed["applied"]]
    columns = [_cells(up, sharded), _cells(fixed, sharded)]
    head = "upstream (HF_FSDP_LOADFIX=0)", f"with hf_fsdp_loadfix ({patch})"
    # the columns' rows side by side: where a label differs (broadcast / fill), both, each with its own column's value
    rows = list(dict.fromkeys(row for pair in itertools.zip_longest(*columns) for row in pair if row)) + ["contract"]
    for cells, run in zip(columns, (up, fixed)):
        cells["contract"] = "FAIL" if run["failures"] else "PASS"
    width, left = max(map(len, rows)), max(30, *map(len, columns[0].values()))
    lines = [f"{'':{width}}  {head[0]:{left}}  {head[1]}"]
    lines += [f"{row:{width}}  {columns[0].get(row, '-'):{left}}  {columns[1].get(row, '-')}" for row in rows]
    looks_flat = all("devices" in r and r["devices"] != ["meta"] and r["rss_peak_mb"] <= PEAK_LIMIT_MB
                     for r in up["ranks"][1:])
    if looks_flat and report["load_dtype"] != "float32" and not report["stack"]["transformers"].startswith("4."):
        lines.append("(upstream's ranks 1+ look flat: without a dtype cast they read the checkpoint memory-mapped, "
                     "and file pages are not anonymous memory)")
    first, said = _first_failure(fixed["ranks"]), []
    if fixed["applied"] is None:
        said.append("No rank got as far as from_pretrained, so whether the patch applies is not known here "
                    "(hf-fsdp-loadfix status says)")
    elif not fixed["applied"]:
        said.append(f"The patch is not applied: {fixed['patch']}")
    if first:
        failed = f"rank {first['rank']} failed {first['failed']}: {first['error']}"
        said.append(f"The patch is applied ({fixed['patch']}), and {failed}" if fixed["applied"] else
                    failed[0].upper() + failed[1:])
    if said:
        lines += ["", *said]
    for title, run in (("Upstream (what the package fixes)", up), ("With hf_fsdp_loadfix", fixed)):
        if run["failures"]:
            lines += ["", f"{title}:"] + [f"  - {f}" for f in run["failures"]] + [o.rstrip() for o in run["output"]]
    lines.append("\n" + ("PASS: FSDP cpu-ram-efficient loading on this stack is memory-flat and correct with "
                         "hf_fsdp_loadfix." if passed else "FAIL: the contract does not hold with hf_fsdp_loadfix "
                         "on this stack (see above)."))
    return "\n".join(lines)
