"""The user-facing commands, run as users run them: the ``hf-fsdp-loadfix`` console script and
``python -m hf_fsdp_loadfix``, in a fresh interpreter of the test environment."""

import json
import os
import subprocess
import sys

import pytest
import transformers

from hf_fsdp_loadfix import _status, versions

SCRIPT = os.path.join(os.path.dirname(sys.executable), "hf-fsdp-loadfix")
GATE = ("ACCELERATE_USE_FSDP", "FSDP_CPU_RAM_EFFICIENT_LOADING", "LOCAL_RANK", "RANK", "WORLD_SIZE")
CLASS = versions.class_for(transformers.__version__).upper()


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
    assert report["startup_hook"] and open(report["startup_hook"]).read().strip() == "import hf_fsdp_loadfix"
    assert f"patch:           applied ({CLASS})" in text.stdout
    assert report["case"] == "tested" and "release:         tested" in text.stdout
    assert f"transformers {transformers.__version__}" in text.stdout
    assert f"startup hook:    installed: {report['startup_hook']}" in text.stdout


def test_status_says_why_not_applied_and_names_traps():
    off = cli("status", env={"HF_FSDP_LOADFIX": "0", "FSDP_CPU_RAM_EFFICIENT_LOADING": "1"})
    assert off.returncode == 1
    assert "patch:           NOT applied: disabled by HF_FSDP_LOADFIX=0" in off.stdout
    assert "trap:            FSDP_CPU_RAM_EFFICIENT_LOADING is set but ACCELERATE_USE_FSDP is not" in off.stdout
    junk = cli("status", "--json", env={"HF_FSDP_LOADFIX_BUFFERS": "maybe"})
    assert junk.returncode == 1 and "HF_FSDP_LOADFIX_BUFFERS='maybe'" in json.loads(junk.stdout)["reason"]


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
    """Default model built locally, 2 CPU ranks, without and with the patch."""
    proc = cli("check", "--json", timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    fixed, up = report["runs"]["patched"], report["runs"]["upstream"]
    assert report["passed"] and fixed["applied"] and fixed["patch"] == CLASS and fixed["failures"] == []
    assert fixed["cells"]["ranks 1+: parameters on"] == "meta"
    assert fixed["cells"]["after broadcast: keys = checkpoint"].startswith("yes (")
    assert fixed["cells"]["logits equal on all ranks, no NaN"] == "yes"
    assert any("parameters and persistent buffers on cpu, not meta" in f for f in up["failures"]), up
    assert "[3/3] patched" in proc.stderr  # progress while it runs


def test_check_reports_the_failure_without_the_patch(checkpoints):
    """The check must be able to fail: with the package disabled, both columns are upstream's."""
    proc = cli("check", "--model", checkpoints("llama"), "--nproc", "3", module=True,
               env={"HF_FSDP_LOADFIX": "0"}, timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    contract = next(line for line in proc.stdout.splitlines() if line.startswith("contract"))
    assert contract.split()[1:] == ["FAIL", "FAIL"]
    assert "The patch is not applied: disabled by HF_FSDP_LOADFIX=0" in proc.stdout
    for rank in (1, 2):
        assert f"rank {rank}: parameters and persistent buffers on cpu, not meta" in proc.stdout
    assert "FAIL: the contract does not hold" in proc.stdout
