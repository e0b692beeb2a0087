"""Gating and activation, each in a fresh interpreter (the installed wheel's startup hook is active there)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import transformers
from launch import accelerate_behaviour, run_ranks
from packaging.version import Version

from hf_fsdp_loadfix import versions
from hf_fsdp_loadfix._steps import MODEL_STEPS

NEXT = versions.FIRST_UNTESTED  # the next minor after the table

STEPS = list(MODEL_STEPS)  # what frameworks do before prepare, wrapped on every class
TARGETS_4 = ["_load_pretrained_model", "_move_missing_keys_from_meta_to_cpu", "_initialize_missing_keys", *STEPS]
TARGETS_5 = ["_load_pretrained_model", "_move_missing_keys_from_meta_to_device", "_initialize_missing_keys", *STEPS]
IS_4 = transformers.__version__.startswith("4.")
TARGETS = TARGETS_4 if IS_4 else TARGETS_5

PRELUDE = """
import json, sys, threading, warnings
import wrapt
def wrapped_attrs():
    mu = sys.modules["transformers.modeling_utils"]
    return sorted(a for a, v in vars(mu.PreTrainedModel).items() if isinstance(v, wrapt.FunctionWrapper))
"""


def py(code, env=None):
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        env={k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None},
        capture_output=True, text=True, timeout=120,
    )
    return proc.returncode, proc.stdout, proc.stderr


def py_json(code, env=None):
    rc, out, err = py(code, env)
    assert rc == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "version,expected",
    [("4.52.4", None), ("4.53.0", "c1"), ("4.56.2", "c1"), ("4.57.0", "c2"), ("4.57.6", "c2"), ("5.0.0", "c3"),
     ("5.3.0", "c3"), ("5.4.0", "c4"), ("5.5.4", "c4"), ("5.6.0", "c5"), ("5.22.2", "c5"), ("5.23.0", "c6"),
     ("5.23.1", "c6"), ("5.24.0", "c6"), ("5.25.0", "c7"), ("5.25.3", "c7"), (NEXT, None), (f"{NEXT}.dev0", None),
     ("6.0.0", None)],
)
def test_version_table(version, expected):
    assert versions.class_for(version) == expected


@pytest.mark.parametrize("version,newer", [("4.52.4", False), ("5.25.1", False), (NEXT, True),
                                           (f"{NEXT}.dev0", True), ("6.0.0", True)])
def test_newer_than_table(version, newer):
    assert versions.newer_than_table(version) == newer


def test_structure_check_tells_4x_from_5x():
    import importlib

    import transformers.modeling_utils as mu

    name = (versions.class_for(transformers.__version__) or versions.NEWEST)
    assert importlib.import_module(f"hf_fsdp_loadfix.classes.{name}").PATCHES.mismatch(mu) is None
    other = "c6" if IS_4 else "c2"
    assert "PreTrainedModel." in importlib.import_module(f"hf_fsdp_loadfix.classes.{other}").PATCHES.mismatch(mu)


def test_import_is_lazy_then_patches_on_transformers_import():
    out = py_json("""
        import hf_fsdp_loadfix
        before = ("transformers" in sys.modules, hf_fsdp_loadfix.status())
        import transformers.modeling_utils
        print(json.dumps([before, hf_fsdp_loadfix.status(), wrapped_attrs()]))
    """)
    (imported, pending), after, wrapped = out
    assert not imported and not pending["applied"] and "waiting" in pending["reason"]
    assert after["applied"] and after["class"] == (versions.class_for(transformers.__version__) or versions.NEWEST).upper()
    assert wrapped == sorted(TARGETS)


def test_startup_hook_installed_and_active_in_fresh_interpreter():
    from importlib import metadata

    files = [str(f) for f in metadata.files("hf-fsdp-loadfix") or []]
    assert "hf_fsdp_loadfix.pth" in files, "install the package (pip install .), not just PYTHONPATH"
    out = py_json("""
        started = "hf_fsdp_loadfix" in sys.modules
        import transformers.modeling_utils
        print(json.dumps([started, wrapped_attrs()]))
    """)
    assert out == [True, sorted(TARGETS)]
    no_site = subprocess.run([sys.executable, "-S", "-c", "import sys; print('hf_fsdp_loadfix' in sys.modules)"],
                             capture_output=True, text=True)
    assert no_site.stdout.strip() == "False"  # python -S: no site, no startup hook


def test_startup_hook_fixes_unmodified_script(checkpoints, tmp_path):
    """The worker with --patch 0 never imports the package: only the .pth hook can have patched it."""
    outputs, (rank0, rank1) = run_ranks(["--ckpt", checkpoints("llama"), "--patch", "0"], tmp_path)
    assert all(rc == 0 for rc, _ in outputs), outputs
    assert {v["device"] for v in rank1["state"].values()} == {"meta"}
    assert rank1["non_persistent"] == rank0["non_persistent"]


# the newest patch set's structure (C7: C6's loading functions, and from_pretrained's kernels step through the kernels
# package) fits 5.25+; 5.1-5.24 lack that step or the kernels package, 5.0.0 lacks _finalize_model_loading
NEWEST_FITS = Version(transformers.__version__) >= Version("5.25")
NEWEST = versions.NEWEST.upper()

RELABEL = """
    import transformers
    transformers.__version__ = LABEL  # before transformers.modeling_utils is imported: the package sees this release
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import hf_fsdp_loadfix, transformers.modeling_utils
        hf_fsdp_loadfix.apply(); hf_fsdp_loadfix.apply()
    ours = [str(w.message) for w in caught if "hf_fsdp_loadfix" in str(w.message)]
"""


def relabelled(label, env=None, then="print(json.dumps([ours, hf_fsdp_loadfix.status(), wrapped_attrs()]))"):
    return py_json(textwrap.dedent(RELABEL.replace("LABEL", repr(label))) + textwrap.dedent(then), env=env)


def test_older_release_refused_with_one_warning():
    messages, status, wrapped = relabelled("4.52.4")
    assert len(messages) == 1 and "4.52.4 is older" in messages[0] and versions.SUPPORTED in messages[0]
    assert not status["applied"] and status["case"] == f"refused: {status['reason']}" and wrapped == []


def test_next_minor_patched_by_structure_with_one_warning():
    """The newest tested release labelled as the next minor: patched without FORCE when the newest class's structure
    fits, one warning naming both releases, to be proven at the first FSDP load (tests/test_contract.py); refused for
    structure where it does not. STRICT does not refuse it: it turns a failed proof into an error."""
    for env in ({}, {"HF_FSDP_LOADFIX_STRICT": "1"}):
        messages, status, wrapped = relabelled(NEXT, env=env)
        assert len(messages) == 1 and NEXT in messages[0]
        if NEWEST_FITS:
            assert status["applied"] and status["class"] == NEWEST and wrapped == sorted(TARGETS_5)
            assert status["case"] == (f"untested (newer than {versions.NEWEST_TESTED}), structure matches {NEWEST}; "
                                      "to be proven at the first FSDP load")
            assert messages[0] == (f"hf_fsdp_loadfix: transformers {NEXT} is untested (newer than "
                                   f"{versions.NEWEST_TESTED}); patched because its structure matches {NEWEST}, if "
                                   "it passes a proof at the first FSDP load")
        else:
            assert not status["applied"] and wrapped == [] and f"does not have the structure of {NEWEST}" in messages[0]
            assert status["case"] == f"refused: {status['reason']}"


def test_force_applies_newest_class_when_structure_matches():
    """FORCE keeps its meaning for a release older than the table."""
    messages, status, wrapped = relabelled("4.52.4", env={"HF_FSDP_LOADFIX_FORCE": "1"})
    if NEWEST_FITS:
        assert status["applied"] and status["class"] == NEWEST and wrapped == sorted(TARGETS_5) and len(messages) == 1
        assert status["case"] == (f"untested (HF_FSDP_LOADFIX_FORCE=1), structure matches {NEWEST}; to be proven at "
                                  "the first FSDP load")
    else:
        assert not status["applied"] and f"structure of {NEWEST}" in status["reason"] and wrapped == []


BREAK = """
    import dataclasses, sys
    mu = sys.modules["transformers.modeling_utils"]
    cls, init = mu.PreTrainedModel, sys.modules.get("transformers.initialization")

    def renamed(self, *args, quantized=False, **kwargs):  # is_quantized renamed
        pass

    breaks = [  # (where, attribute, broken value), each one structural element of what the runtime relies on
        (mu, "is_deepspeed_zero3_enabled", None),
        (mu, "load_state_dict", lambda checkpoint_file, device="cpu", weights_only=True: {}),
        (cls, "_initialize_missing_keys", renamed),
    ]
    if hasattr(mu, "LoadStateDictConfig"):  # 5.x: a field the loading hook reads removed
        config = mu.LoadStateDictConfig
        fields = [f.name for f in dataclasses.fields(config) if f.name != "weights_only"]
        breaks.append((mu, "LoadStateDictConfig", dataclasses.make_dataclass(
            "LoadStateDictConfig", fields, namespace={"is_quantized": config.is_quantized})))
        breaks.append((init, "guard_torch_init_functions", None))
    found = []
    for owner, attr, value in breaks:
        hf_fsdp_loadfix.revert()
        original = vars(owner)[attr]
        if value is None:
            delattr(owner, attr)
        else:
            setattr(owner, attr, value)
        hf_fsdp_loadfix.apply()
        found.append([attr, hf_fsdp_loadfix.status(), wrapped_attrs()])
        setattr(owner, attr, original)
    hf_fsdp_loadfix.revert(); hf_fsdp_loadfix.apply()
    print(json.dumps([found, hf_fsdp_loadfix.status()["applied"]]))
"""


def test_broken_structural_element_refused_naming_it():
    """Each element the runtime relies on, broken in turn on the next-minor label (the release's own label where
    the newest class does not fit): refused, the reason naming it; restored, patched again."""
    found, restored = relabelled(NEXT if NEWEST_FITS else transformers.__version__, then=BREAK)
    expected = {
        "is_deepspeed_zero3_enabled": "transformers.modeling_utils.is_deepspeed_zero3_enabled() is missing",
        "load_state_dict": "transformers.modeling_utils.load_state_dict has no parameter map_location",
        "_initialize_missing_keys": "PreTrainedModel._initialize_missing_keys(",
        "LoadStateDictConfig": "LoadStateDictConfig has no weights_only",
        "guard_torch_init_functions": "transformers.initialization.guard_torch_init_functions is missing",
    }
    assert len(found) == (3 if IS_4 else 5)
    for attr, status, wrapped in found:
        assert not status["applied"] and wrapped == [], attr
        assert "does not have the structure of" in status["reason"] and expected[attr] in status["reason"], status
        assert status["case"] == f"refused: {status['reason']}"
    assert restored


def test_disable_switch():
    status, wrapped = py_json("""
        import hf_fsdp_loadfix, transformers.modeling_utils
        print(json.dumps([hf_fsdp_loadfix.status(), wrapped_attrs()]))
    """, env={"HF_FSDP_LOADFIX": "0"})
    assert not status["applied"] and "HF_FSDP_LOADFIX=0" in status["reason"] and wrapped == []


@pytest.mark.parametrize("var", ["HF_FSDP_LOADFIX", "HF_FSDP_LOADFIX_FORCE", "HF_FSDP_LOADFIX_STRICT",
                                 "HF_FSDP_LOADFIX_ACCELERATE", "HF_FSDP_LOADFIX_STREAM",
                                 "HF_FSDP_LOADFIX_BUFFERS", "HF_FSDP_LOADFIX_SOURCE", "HF_FSDP_LOADFIX_WAIT"])
def test_junk_env_value_is_a_clear_error(var):
    rc, _, err = py("import hf_fsdp_loadfix; import transformers.modeling_utils", env={var: "maybe"})
    assert rc != 0 and f"environment variable {var}='maybe' is not" in err
    status = py_json("import hf_fsdp_loadfix; print(json.dumps(hf_fsdp_loadfix.status()))", env={var: "maybe"})
    assert var in status["reason"]


@pytest.mark.parametrize("raw", ["0", "-5", "nan", "inf", "10 min"])
def test_wait_deadline_must_be_a_positive_number_of_seconds(monkeypatch, raw):
    from hf_fsdp_loadfix import _config

    monkeypatch.setenv("HF_FSDP_LOADFIX_WAIT", raw)
    with pytest.raises(ValueError, match=f"HF_FSDP_LOADFIX_WAIT='{raw}' is not a positive number of seconds"):
        _config.wait_seconds()
    monkeypatch.setenv("HF_FSDP_LOADFIX_WAIT", "90.5")
    assert _config.wait_seconds() == 90.5
    monkeypatch.delenv("HF_FSDP_LOADFIX_WAIT")
    assert _config.wait_seconds() == 6 * 3600


def test_double_apply_threads_and_revert():
    out = py_json("""
        import hf_fsdp_loadfix, transformers.modeling_utils as mu
        threads = [threading.Thread(target=hf_fsdp_loadfix.apply) for _ in range(8)]
        [t.start() for t in threads]; [t.join() for t in threads]
        attrs = wrapped_attrs()
        inner = {a: type(vars(mu.PreTrainedModel)[a].__wrapped__).__name__ for a in attrs}
        originals = {a: vars(mu.PreTrainedModel)[a].__wrapped__ for a in attrs}
        hf_fsdp_loadfix.revert()
        restored = all(vars(mu.PreTrainedModel)[a] is originals[a] for a in attrs)
        reverted = [wrapped_attrs(), hf_fsdp_loadfix.status()["reason"]]
        hf_fsdp_loadfix.apply()
        print(json.dumps([attrs, inner, restored, reverted, wrapped_attrs()]))
    """)
    attrs, inner, restored, reverted, again = out
    assert attrs == sorted(TARGETS) and "FunctionWrapper" not in inner.values()
    assert restored and reverted == [[], "reverted"] and again == sorted(TARGETS)


def test_status_names_environment_traps():
    def process(env, code="import hf_fsdp_loadfix; print(json.dumps(hf_fsdp_loadfix.status()))"):
        clean = {"ACCELERATE_USE_FSDP": None, "FSDP_CPU_RAM_EFFICIENT_LOADING": None}
        return py_json(code, env={**clean, **env})["process"]

    assert "ACCELERATE_USE_FSDP is not" in process({"FSDP_CPU_RAM_EFFICIENT_LOADING": "1"})
    assert "not initialised" in process({"FSDP_CPU_RAM_EFFICIENT_LOADING": "1", "ACCELERATE_USE_FSDP": "1"})
    assert "is not a boolean" in process({"FSDP_CPU_RAM_EFFICIENT_LOADING": "sure"})


def test_fsdp_gate_not_met_means_upstream_behaviour(checkpoints, tmp_path):
    """FSDP_CPU_RAM_EFFICIENT_LOADING without ACCELERATE_USE_FSDP: transformers loads fully on every rank, so the
    package stays out of the way and status() says why."""
    outputs, (rank0, rank1) = run_ranks(["--ckpt", checkpoints("llama")], tmp_path,
                                        env={"ACCELERATE_USE_FSDP": "false"})
    assert all(rc == 0 for rc, _ in outputs), outputs
    assert {v["device"] for v in rank1["state"].values()} == {"cpu"}
    assert rank1["status"]["applied"] and "ACCELERATE_USE_FSDP is not" in rank1["status"]["process"]


def test_quantized_and_zero3_loads_go_to_the_original_functions():
    """Gating unit test: a real (1-process) gloo group with LOCAL_RANK=1 meets transformers' non-rank-0 gate;
    a quantizer or ZeRO-3 must still hand every call to the original function."""
    out = py_json("""
        import os, torch.distributed as dist
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], LOCAL_RANK="1",
                          ACCELERATE_USE_FSDP="1", FSDP_CPU_RAM_EFFICIENT_LOADING="1")
        dist.init_process_group("gloo", rank=0, world_size=1)
        import transformers.modeling_utils as mu
        from hf_fsdp_loadfix import _runtime
        calls = []
        def original(missing_keys, device_map, device_mesh, hf_quantizer):
            calls.append("move")
        def original_init(is_quantized):
            calls.append("init")
        seen = [_runtime.is_target(False), _runtime.is_target(True)]
        _runtime.move_missing_keys(original, None, ([], None, None), {"hf_quantizer": object()})
        _runtime.initialize_missing_keys(original_init, None, (True,), {})
        mu.is_deepspeed_zero3_enabled = lambda: True
        seen.append(_runtime.is_target(False))
        _runtime.initialize_missing_keys(original_init, None, (False,), {})
        dist.destroy_process_group()
        print(json.dumps([seen, calls]))
    """, env={"PORT": str(__import__("launch").free_port())})
    assert out == [[True, False, False], ["move", "init", "init"]]


def test_accelerate_hooks_applied_on_import_each_for_what_it_is_for_and_switchable():
    """fsdp2_load_full_state_dict is wrapped wherever it exists (shard-on-read fills there); the #3898 fix, the stream
    and the optimizer mapping where this accelerate still needs them, each saying why not where it does not;
    HF_FSDP_LOADFIX_ACCELERATE=0 turns the fix and the stream off, not the fill."""
    pytest.importorskip("accelerate")
    code = """
        import hf_fsdp_loadfix, accelerate.utils.fsdp_utils as fu, accelerate.accelerator
        print(json.dumps([hf_fsdp_loadfix.status(),
                          isinstance(vars(fu)["fsdp2_load_full_state_dict"], wrapt.FunctionWrapper)]))
    """
    status, wrapped = py_json(code)
    assert wrapped and status["accelerate_fill"] == "applied"
    for hook, needed in accelerate_behaviour().items():
        assert (status[hook] == "applied") == needed, (hook, status[hook])
        assert needed or status[hook].startswith("not needed"), (hook, status[hook])
    status, wrapped = py_json(code, env={"HF_FSDP_LOADFIX_ACCELERATE": "0"})
    assert wrapped and status["accelerate_fill"] == "applied"
    assert "disabled" in status["accelerate_fix"] and "disabled" in status["accelerate_stream"]


def test_accelerate_fix_recognises_the_3898_shape(tmp_path):
    """By structure, not version: accelerate's function with the #3898 shape is wrapped; the same source with a DTensor
    check of each state-dict entry (accelerate PR #3921, released in 1.16) is not, and says why; nor is a renamed
    parameter. Built from whichever of the two shapes the installed accelerate has."""
    import importlib.util
    import inspect
    import re

    import accelerate.utils.fsdp_utils as fu

    from hf_fsdp_loadfix import _accelerate

    def module(name, text):
        (tmp_path / f"{name}.py").write_text("import torch\nfrom torch.distributed.tensor import DTensor\n" + text)
        spec = importlib.util.spec_from_file_location(name, tmp_path / f"{name}.py")
        spec.loader.exec_module(mod := importlib.util.module_from_spec(spec))
        return mod

    source = inspect.getsource(inspect.unwrap(fu.fsdp2_load_full_state_dict))
    if accelerate_behaviour()["accelerate_fix"]:  # up to 1.15: the #3898 shape; add the check
        assert _accelerate.mismatch(fu) is None
        fixed, loops = re.subn(r"^( *)for .*\bsharded_param\b.*:\n", lambda m: f"{m[0]}{m[1]}    if not isinstance("
                               f"sharded_param, DTensor):\n{m[1]}        continue\n", source, flags=re.M)
        assert loops == 2  # rank 0's and the other ranks' loop
        broken = source
    else:  # 1.16+: fixed upstream; take the check out again
        fixed = source
        broken, checks = re.subn(r"isinstance\(sharded_param, DTensor\)", "True", source)
        assert checks == 1 and "handles plain tensors" in _accelerate.mismatch(fu)
    assert "handles plain tensors" in _accelerate.mismatch(module("fixed", fixed))
    assert _accelerate.mismatch(module("broken", broken)) is None
    renamed = source.replace("(accelerator, model", "(accelerator, module", 1)
    assert "does not start with ('accelerator', 'model', 'full_sd')" in _accelerate.mismatch(module("renamed", renamed))


def test_contract_verification_names_what_breaks_it(monkeypatch):
    """The post-load check on non-rank-0 (local, no collective): state dict on meta, non-persistent buffers real
    (and finite on an untested release: a tested one may hold -inf masks); anything else raises naming the entry."""
    import torch

    from hf_fsdp_loadfix import _runtime

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(2, 2, device="meta")
            self.register_buffer("table", torch.zeros(2, device="meta"))  # persistent: arrives by broadcast
            self.register_buffer("inv_freq", torch.ones(2), persistent=False)  # computed locally
            self.register_buffer("position", torch.arange(2), persistent=False)

    _runtime.verify_contract(Tiny())
    breaks = {
        "proj.weight": lambda m: setattr(m.proj, "weight", torch.nn.Parameter(torch.zeros(2, 2))),
        "table": lambda m: m.register_buffer("table", torch.zeros(2)),
        "inv_freq": lambda m: m.inv_freq.fill_(float("nan")),
        "position": lambda m: m.register_buffer("position", torch.arange(2, device="meta"), persistent=False),
    }
    nan = Tiny()
    nan.inv_freq.fill_(float("nan"))
    monkeypatch.setattr(_runtime, "untested_release", False)  # whatever release is installed
    _runtime.verify_contract(nan)  # a tested release: only placement is checked
    monkeypatch.setattr(_runtime, "untested_release", True)
    for name, breaks_it in breaks.items():
        breaks_it(model := Tiny())
        with pytest.raises(RuntimeError, match=rf"contract does not hold: .*\b{name}\b"):
            _runtime.verify_contract(model)
