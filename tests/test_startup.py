"""What the installed startup hook (hf_fsdp_loadfix.pth) costs at interpreter start: which modules it imports,
each checked in a fresh interpreter. Timings are measured by benchmarks/startup.py, not here."""

import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import transformers

from hf_fsdp_loadfix import _config, versions
from hf_fsdp_loadfix._steps import MODEL_STEPS

CLASS = (versions.class_for(transformers.__version__) or versions.NEWEST)
TARGETS = sorted([*importlib.import_module(f"hf_fsdp_loadfix.classes.{CLASS}").PATCHES.targets, *MODEL_STEPS])
HEAVY = ["wrapt", "asyncio", "inspect", "importlib.metadata", "packaging", "torch", "transformers", "accelerate"]
PRELUDE = """
def wrapped():  # defined at start, wrapt imported only when called
    import sys, wrapt
    cls = sys.modules["transformers.modeling_utils"].PreTrainedModel
    return sorted(a for a, v in vars(cls).items() if isinstance(v, wrapt.FunctionWrapper))
"""


def fresh(code, **env):
    """Run ``code`` in a fresh interpreter of this environment; the JSON it prints last."""
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hook_imports_only_the_stub_then_patches_on_transformers_import():
    started, status, wrapped = fresh("""
        import sys, json
        started = sorted(sys.modules)
        import hf_fsdp_loadfix, transformers.modeling_utils
        print(json.dumps([started, hf_fsdp_loadfix.status(), wrapped()]))
    """)
    without = fresh("import sys, json; print(json.dumps(sorted(sys.modules)))", HF_FSDP_LOADFIX="0")
    added = sorted(set(started) - set(without))
    assert "hf_fsdp_loadfix" in added and [m for m in HEAVY if m in added] == [], added
    assert status["applied"] and status["class"] == CLASS.upper() and wrapped == TARGETS


@pytest.mark.parametrize("value", [*sorted(_config._FALSE), " Off ", "maybe"])
def test_disable_switch_skips_the_import_at_start(value):
    """A false HF_FSDP_LOADFIX (as _config parses it) imports nothing at all; anything else imports the stub,
    so that a junk value is still reported when transformers is imported (test_gate)."""
    started = fresh("import sys, json; print(json.dumps('hf_fsdp_loadfix' in sys.modules))", HF_FSDP_LOADFIX=value)
    assert started is (value.strip().lower() not in _config._FALSE)


def test_revert_before_transformers_then_apply_patches_at_once():
    """revert() before transformers is imported keeps it unpatched; apply() afterwards patches at once."""
    reverted, applied, wrapped = fresh("""
        import sys, json, hf_fsdp_loadfix
        hf_fsdp_loadfix.revert()
        import transformers.modeling_utils
        reverted = [hf_fsdp_loadfix.status()["reason"], wrapped()]
        hf_fsdp_loadfix.apply()
        print(json.dumps([reverted, hf_fsdp_loadfix.status()["applied"], wrapped()]))
    """)
    assert reverted == ["reverted", []] and applied and wrapped == TARGETS
