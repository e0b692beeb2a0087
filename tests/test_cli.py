"""The user-facing commands, run as users run them: the ``hf-fsdp-loadfix`` console script and
``python -m hf_fsdp_loadfix``, in a fresh interpreter of the test environment."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import transformers

from hf_fsdp_loadfix import _status, versions

SCRIPT = os.path.join(os.path.dirname(sys.executable), "hf-fsdp-loadfix")
GATE = ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING", "LOCAL_RANK", "RANK", "WORLD_SIZE")
CLASS = (versions.class_for(transformers.__version__) or versions.NEWEST).upper()
# a release newer than the table is patched by structure, with the newest class
CASE = "tested" if versions.class_for(transformers.__version__) else \
    f"untested (newer than {versions.NEWEST_TESTED}), structure matches {CLASS}"


def cli(*args, env=None, module=False, timeout=120):
    clean = {k: v for k, v in os.environ.items() if k not in GATE and not k.startswith("HF_FSDP_LOADFIX")}
    cmd = [sys.executable, "-m", "hf_fsdp_loadfix", *args] if module else [SCRIPT, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**clean, **(env or {})}, timeout=timeout)


def test_status_text_and_json():
    text, js = cli("status"), cli("status", "--json", module=True)
    assert text.returncode == js.returncode == 0, text.stderr + js.stderr
    report = json.loads(js.stdout)
    assert report["applied"] and report["class"] == CLASS and report["reason"] is None
    assert report["transformers"] == transformers.__version__ and report["traps"] == []
    assert report["startup_hook"] and open(report["startup_hook"]).read().rstrip().endswith('__import__("hf_fsdp_loadfix")')
    assert f"patch:           applied ({CLASS})" in text.stdout
    assert report["case"] == CASE and f"release:         {CASE}" in text.stdout
    assert f"transformers {transformers.__version__}" in text.stdout
    assert f"startup hook:    installed: {report['startup_hook']}" in text.stdout


def test_status_says_why_not_applied_and_names_traps():
    off = cli("status", env={"HF_FSDP_LOADFIX": "0", "FSDP_CPU_RAM_EFFICIENT_LOADING": "1"})
    assert off.returncode == 1
    assert "patch:           NOT applied: disabled by HF_FSDP_LOADFIX=0" in off.stdout
    assert "trap:            FSDP_CPU_RAM_EFFICIENT_LOADING is set but ACCELERATE_USE_FSDP is not" in off.stdout
    junk = cli("status", "--json", env={"HF_FSDP_LOADFIX_BUFFERS": "maybe"})
    assert junk.returncode == 1 and "HF_FSDP_LOADFIX_BUFFERS='maybe'" in json.loads(junk.stdout)["reason"]
    junk = cli("status", "--json", env={"HF_FSDP_LOADFIX_FORCE": "sure"})
    assert json.loads(junk.stdout)["reason"] == ("hf_fsdp_loadfix: environment variable HF_FSDP_LOADFIX_FORCE='sure' "
                                                 "is not a boolean; use one of 1/0/true/false/yes/no/on/off")


def test_version_and_strict_status():
    from hf_fsdp_loadfix import __version__

    version = cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"hf-fsdp-loadfix {__version__}"
    trap = {"FSDP_CPU_RAM_EFFICIENT_LOADING": "1"}
    assert cli("status", env=trap).returncode == 0  # the patch applies: traps alone do not fail plain status
    strict = cli("status", "--strict", env=trap, module=True)
    assert strict.returncode == 1 and "trap:            FSDP_CPU_RAM_EFFICIENT_LOADING is set" in strict.stdout


def test_status_says_not_installed(monkeypatch):
    """What a stack without accelerate (or transformers) reads; metadata is faked, the report and text are real."""
    from hf_fsdp_loadfix import _cli

    monkeypatch.setattr(_status, "_installed", lambda dist: None)
    state = {"class": None, "reason": "waiting for transformers.modeling_utils to be imported",
             "accelerate": "not imported", "case": None}
    report = _status.report(state)
    assert report["accelerate_fix"] == "not installed" and report["reason"] == "transformers is not installed"
    text = _cli.status_text(report)
    assert "accelerate fix:  not installed" in text and "patch:           NOT applied: transformers is not installed" \
        in text and "transformers not installed, torch not installed, accelerate not installed" in text


@pytest.mark.parametrize("env,trap", [
    ({"FSDP_CPU_RAM_EFFICIENT_LOADING": "1"}, "ACCELERATE_USE_FSDP is not"),
    ({"FSDP_CPU_RAM_EFFICIENT_LOADING": "1", "ACCELERATE_USE_FSDP": "true"}, "LOCAL_RANK is not set"),
    ({"FSDP_CPU_RAM_EFFICIENT_LOADING": "sure"}, "FSDP_CPU_RAM_EFFICIENT_LOADING='sure' is not a boolean"),
    ({"LOCAL_RANK": "first"}, "LOCAL_RANK='first' is not an integer"),
])
def test_traps(monkeypatch, env, trap):
    for k in GATE:
        monkeypatch.delenv(k, raising=False)
    assert _status.traps() == []
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    found = _status.traps()
    assert len(found) == 1 and trap in found[0], found


def test_check_passes_with_the_patch():
    """Default model built locally, 2 CPU ranks, with and without the patch, sharded as the stack would."""
    proc = cli("check", "--json", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    fixed, up = report["runs"]["patched"], report["runs"]["upstream"]
    assert report["passed"] and fixed["applied"] and fixed["patch"] == CLASS and fixed["failures"] == []
    assert report["model"] is None and report["model_params"] > 40e6  # no path of the deleted temporary model
    accelerate = importlib.util.find_spec("accelerate") is not None
    assert fixed["sharding"] == up["sharding"] == ("accelerate" if accelerate else "native")
    assert fixed["accelerate_fix"] == ("applied" if accelerate else "not installed")
    for rank in fixed["ranks"]:
        assert rank["exit_status"] == 0 and rank["checkpoint_keys_compared"] > 0
        assert rank["checkpoint_keys_mismatched"] == 0 and rank["state_equal_rank0"] and rank["logits_equal_rank0"]
        assert rank["non_persistent_buffers_equal_rank0"] and rank["logits_nan"] is False
    rank1, up1 = fixed["ranks"][1], up["ranks"][1]
    assert rank1["devices"] == ["meta"] and up1["devices"] == ["cpu"]
    assert isinstance(rank1["load_s"], float) and 0 <= rank1["rss_peak_mb"] < 32
    assert transformers.__version__.startswith("4.") or up1["rss_peak_mb"] > 32  # 4.x: uncommitted placeholders
    assert any("parameters and persistent buffers on cpu, not meta" in f for f in up["failures"]), up
    assert "[2/3] patched" in proc.stderr and "[3/3] upstream" in proc.stderr  # progress while it runs


def test_check_reports_the_failure_without_the_patch(checkpoints):
    """The check must be able to fail: with the package disabled, both columns are upstream's. A bf16 load (no
    cast) of this tiny model looks flat upstream, and the table says why."""
    proc = cli("check", "--model", checkpoints("llama"), "--nproc", "3", "--dtype", "bfloat16", module=True,
               env={"HF_FSDP_LOADFIX": "0"}, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    contract = next(line for line in proc.stdout.splitlines() if line.startswith("contract"))
    assert contract.split()[1:] == ["FAIL", "FAIL"]
    assert "The patch is not applied: disabled by HF_FSDP_LOADFIX=0" in proc.stdout
    for rank in (1, 2):
        assert f"rank {rank}: parameters and persistent buffers on cpu, not meta" in proc.stdout
    assert "FAIL: the contract does not hold" in proc.stdout
    note = "(upstream's ranks 1+ look flat: without a dtype cast they read the checkpoint memory-mapped, and file " \
           "pages are not anonymous memory)"
    assert (note in proc.stdout.splitlines()) == (not transformers.__version__.startswith("4."))


@pytest.mark.parametrize("model,error", [
    ("/nonexistent/model", "--model /nonexistent/model is not a local directory"),
    ("org/name", "--model org/name is not a local directory; check loads local checkpoints only (download it "
                 "first: hf download org/name --local-dir DIR)"),
    ("config_only", "is not a checkpoint directory: it has no *.safetensors or *.bin weights"),
    ("empty", "is not a checkpoint directory: it has no config.json"),
])
def test_check_cannot_run_exits_2_with_one_line(tmp_path, model, error):
    """Refused before any rank starts (a Hub id is never downloaded): one line, at once."""
    if model in ("config_only", "empty"):
        os.makedirs(tmp_path / model)
        if model == "config_only":
            (tmp_path / model / "config.json").write_text("{}")
        model = str(tmp_path / model)
    proc = cli("check", "--model", model, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: --model ")
    assert proc.stderr.strip().endswith(error)
    js = cli("check", "--model", model, "--json", module=True, timeout=60)
    assert js.returncode == 2 and json.loads(js.stdout) == {"passed": False, "error": proc.stderr.strip()[7:]}


def test_check_reports_a_rejected_checkpoint(checkpoints, tmp_path):
    """A truncated shard: the package refuses it on every rank; check says so (exit 2), not a contract failure,
    and does not go on to the upstream run."""
    ckpt = str(tmp_path / "truncated")
    shutil.copytree(checkpoints("llama_sharded"), ckpt)
    shard = os.path.join(ckpt, sorted(f for f in os.listdir(ckpt) if f.endswith(".safetensors"))[-1])
    os.truncate(shard, os.path.getsize(shard) - 100)
    proc = cli("check", "--model", ckpt, "--json", timeout=600)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    error = json.loads(proc.stdout)["error"]
    assert error.startswith("hf_fsdp_loadfix rejected the checkpoint before loading (rank 0, 1): checkpoint "
                            "problem"), error
    assert os.path.basename(shard) in error and "upstream" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {error}"


def test_check_reports_a_model_that_does_not_load_at_all(tmp_path):
    """Rank 0 fails alike with and without the package (a config transformers cannot read): exit 2, one line."""
    os.makedirs(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text('{"model_type": "no_such_model_type"}')
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")
    proc = cli("check", "--model", str(tmp_path / "model"), timeout=600)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the model does not load on this stack, with or without hf_fsdp_loadfix (rank 0): ")
    assert "no_such_model_type" in last, last
