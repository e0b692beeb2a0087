"""The user-facing commands, run as users run them: the ``hf-fsdp-loadfix`` console script and
``python -m hf_fsdp_loadfix``, in a fresh interpreter of the test environment."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import transformers

from hf_fsdp_loadfix import _check, _status, versions

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
    if not accelerate:
        assert fixed["accelerate_fix"] == "not installed"
    else:  # accelerate#3898's shape up to 1.15, fixed upstream in 1.16
        from launch import accelerate_behaviour

        needed = accelerate_behaviour()["accelerate_fix"]
        assert (fixed["accelerate_fix"] == "applied") == needed, fixed["accelerate_fix"]
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


def test_check_source_sharded_holds_rank_0_to_the_rules_too(checkpoints):
    """check --source sharded: every rank, rank 0 included, on meta after from_pretrained and flat, nothing
    broadcast, every key equal to the checkpoint; a model shard-on-read leaves to the default path fails, naming
    why (a pickle checkpoint: slices are read from safetensors only)."""
    if importlib.util.find_spec("accelerate") is None:
        pytest.skip("shard-on-read fills through accelerate's fsdp2_prepare_model here")
    proc = cli("check", "--json", "--source", "sharded", "--model", checkpoints("llama"), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    fixed, up = report["runs"]["patched"], report["runs"]["upstream"]
    assert report["source"] == "sharded" and report["passed"] and fixed["failures"] == []
    for rank in fixed["ranks"]:
        assert rank["devices"] == ["meta"] and rank["rss_peak_mb"] < 32 and rank["checkpoint_keys_mismatched"] == 0
    # the evidence, per rank in bytes: each read its own slices (together, the checkpoint's tensors once), nothing was
    # broadcast; upstream's rank 0 broadcast the whole model
    assert [r["bytes_broadcast"] for r in fixed["ranks"]] == [0, 0]
    assert sum(r["bytes_read"] for r in fixed["ranks"]) == tensor_bytes(checkpoints("llama"))
    assert all(0 < r["bytes_read"] < tensor_bytes(checkpoints("llama")) and r["keys_sliced"] > 0
               for r in fixed["ranks"])
    assert up["ranks"][0]["bytes_broadcast"] > tensor_bytes(checkpoints("llama")) and "bytes_read" not in up["ranks"][0]
    table = _check._table(report).splitlines()
    assert table[0].endswith(f"  with hf_fsdp_loadfix ({CLASS}, shard-on-read)")
    rows = {cells[0]: cells[1:] for cells in (re.split(r"\s{2,}", line) for line in table[1:]) if len(cells) == 3}
    assert rows["FSDP2 sharding + shard-on-read"][0] == rows["FSDP2 sharding + broadcast"][1] == "-"
    assert rows["bytes read from the files, rank 1"] == ["-", f"{fixed['ranks'][1]['bytes_read']:,}"]
    assert rows["bytes broadcast, rank 0"] == [f"{up['ranks'][0]['bytes_broadcast']:,}", "0"]
    assert rows["after fill: keys = checkpoint"][0] == rows["after broadcast: keys = checkpoint"][1] == "-"
    assert rows["after fill: state equal on all ranks"] == ["-", "yes"]
    proc = cli("check", "--json", "--source", "sharded", "--model", checkpoints("llama_bin"), timeout=600)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    failures = json.loads(proc.stdout)["runs"]["patched"]["failures"]
    assert failures[0].startswith("shard-on-read not used for ") and ": .bin/pickle checkpoint" in failures[0], failures


def tensor_bytes(ckpt: str) -> int:
    """The bytes of every tensor in the checkpoint's safetensors files, as stored."""
    from safetensors import safe_open

    from hf_fsdp_loadfix._sharded import _nbytes

    total = 0
    for name in os.listdir(ckpt):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(ckpt, name), "pt") as f:
                total += sum(_nbytes(f.get_slice(k)) for k in f.keys())
    return total


def clean_env(monkeypatch):
    """This process's environment as ``cli`` gives the command's."""
    for k in [*os.environ]:
        if k in GATE or k.startswith("HF_FSDP_LOADFIX"):
            monkeypatch.delenv(k)


def test_check_reports_the_failure_without_the_patch(checkpoints, monkeypatch, capsys):
    """The check must be able to fail: its ranks run with the package disabled (HF_FSDP_LOADFIX=0 in the ranks only:
    the command refuses it), so both columns are upstream's. A bf16 load (no cast) of this tiny model looks flat
    upstream, and the table says why."""
    from hf_fsdp_loadfix import _check, _worker

    clean_env(monkeypatch)
    launch = _worker.launch
    monkeypatch.setattr(_worker, "launch", lambda argv, out, env=None, **kw: launch(
        argv, out, env={**(env or {}), "HF_FSDP_LOADFIX": "0"}, **kw))
    assert _check.check(checkpoints("llama"), 3, "bfloat16", device="cpu") == 1
    out = capsys.readouterr().out
    contract = next(line for line in out.splitlines() if line.startswith("contract"))
    assert contract.split()[1:] == ["FAIL", "FAIL"]
    assert "The patch is not applied: disabled by HF_FSDP_LOADFIX=0" in out
    for rank in (1, 2):
        assert f"rank {rank}: parameters and persistent buffers on cpu, not meta" in out
    assert "FAIL: the contract does not hold" in out
    note = "(upstream's ranks 1+ look flat: without a dtype cast they read the checkpoint memory-mapped, and file " \
           "pages are not anonymous memory)"
    assert (note in out.splitlines()) == (not transformers.__version__.startswith("4."))


def test_check_names_the_rank_that_failed_and_says_the_patch_is_applied(checkpoints, monkeypatch, capsys):
    """A rank that fails inside from_pretrained writes no report: check names it, the step and the exception, and says
    the patch is applied, from the status each rank recorded before the load (never "NOT applied" for an applied
    patch). The failure: the patched run's ranks get a value transformers' FSDP gate raises on."""
    from hf_fsdp_loadfix import _check, _worker

    clean_env(monkeypatch)
    launch = _worker.launch
    monkeypatch.setattr(_worker, "launch", lambda argv, out, env=None, **kw: launch(argv, out, env={
        **env, **({} if "HF_FSDP_LOADFIX" in env else {"FSDP_CPU_RAM_EFFICIENT_LOADING": "sure"})}, **kw))
    assert _check.check(checkpoints("llama"), 2, as_json=True) == 1
    report = json.loads(capsys.readouterr().out)
    fixed = report["runs"]["patched"]
    assert fixed["applied"] is True and fixed["patch"] == CLASS
    for rank in fixed["ranks"]:
        assert rank["exit_status"] == 1 and rank["failed"] == "in from_pretrained", rank
        assert rank["error"].startswith("ValueError: ") and "'sure'" in rank["error"], rank
    assert fixed["failures"][1] == f"rank 1 exited with status 1 in from_pretrained: {fixed['ranks'][1]['error']}"
    assert report["runs"]["upstream"]["ranks"][1]["devices"] == ["cpu"]  # upstream ran as ever
    table = _check._table(report)
    assert table.splitlines()[0].endswith(f"with hf_fsdp_loadfix ({CLASS})") and "NOT applied" not in table
    assert f"The patch is applied ({CLASS}), and rank 0 failed in from_pretrained: {fixed['ranks'][0]['error']}" \
        in table.splitlines()


def test_check_names_the_rank_that_failed_first():
    """Rank 1 fails in from_pretrained; rank 0 then fails in the sharding's broadcast, which rank 1 never joins: the
    table's line names rank 1. A run where no rank got to from_pretrained says the status is unknown, not "NOT
    applied"."""
    from hf_fsdp_loadfix._check import STEPS, _first_failure, _ranks, _table, evaluate

    outputs = [(1, "Traceback (most recent call last):\nRuntimeError: Connection closed by peer [127.0.0.1]:4321"),
               (1, "[rank1]: Traceback (most recent call last):\n[rank1]: ValueError: Unsupported device type "
                   "'meta'.\n[rank1]:   Supported device types are: cpu, cuda")]
    status = {"applied": True, "class": CLASS, "accelerate_fix": "applied"}
    steps = [{"step": STEPS[1], "status": status}, {"step": STEPS[0], "status": status}]
    ranks = _ranks(outputs, [None, None], steps)
    assert _first_failure(ranks) == {"rank": 1, "exit_status": 1, "failed": "in from_pretrained",
                                     "error": "ValueError: Unsupported device type 'meta'."}
    assert evaluate(outputs, [None, None], steps=steps) == [
        "rank 0 exited with status 1 in the FSDP2 sharding: RuntimeError: Connection closed by peer [127.0.0.1]:4321",
        "rank 1 exited with status 1 in from_pretrained: ValueError: Unsupported device type 'meta'."]
    run = {"ranks": ranks, "failures": ["x"], "output": [], "accelerate_fix": "applied", "sharding": "accelerate"}
    report = {"runs": {"upstream": run, "patched": {**run, "applied": None, "patch": None}}, "passed": False,
              "source": "local", "load_dtype": "float32", "stack": {"transformers": transformers.__version__}}
    table = _table(report)
    assert "with hf_fsdp_loadfix (status unknown)" in table.splitlines()[0] and "NOT applied" not in table
    assert "Rank 1 failed in from_pretrained: ValueError: Unsupported device type 'meta'." in table.splitlines()


def test_junk_option_one_error_at_once():
    """A junk HF_FSDP_LOADFIX_SOURCE: status names it once (on the patch line) and claims no class outside the range
    and no 'traps: none'; check refuses it before building anything (exit 2, one line)."""
    error = "hf_fsdp_loadfix: environment variable HF_FSDP_LOADFIX_SOURCE='bogus' is not one of local, global, sharded"
    proc = cli("status", env={"HF_FSDP_LOADFIX_SOURCE": "bogus"})
    assert proc.returncode == 1 and (proc.stdout + proc.stderr).count("HF_FSDP_LOADFIX_SOURCE") == 1, proc
    assert f"patch:           NOT applied: {error}\n" in proc.stdout and "error" not in proc.stderr
    assert "outside the supported range" not in proc.stdout and "traps:           none in" not in proc.stdout
    assert "traps:           none besides the invalid option (importing transformers raises its error)" in proc.stdout
    check = cli("check", env={"HF_FSDP_LOADFIX_SOURCE": "bogus"}, timeout=60)
    assert check.returncode == 2 and check.stdout == "" and check.stderr.splitlines() == [f"error: {error}"], check


def test_unknown_option_shows_the_commands_usage():
    """A typo in a command's option: that command's usage and error, exit 2; one before the command: the top-level."""
    for command in ("check", "status"):
        proc = cli(command, "--nrpoc", "2")
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.startswith(f"usage: hf-fsdp-loadfix {command} "), proc.stderr
        assert proc.stderr.splitlines()[-1] == f"hf-fsdp-loadfix {command}: error: unrecognized arguments: --nrpoc 2"
    proc = cli("--nrpoc", "status")
    assert proc.returncode == 2 and proc.stderr.startswith("usage: hf-fsdp-loadfix [-h]"), proc.stderr
    assert proc.stderr.splitlines()[-1] == "hf-fsdp-loadfix: error: unrecognized arguments: --nrpoc"


def test_check_refuses_at_once_when_disabled():
    """HF_FSDP_LOADFIX=0: the patched run would be upstream too; one line naming the variable, exit 2, no rank."""
    proc = cli("check", env={"HF_FSDP_LOADFIX": "0"}, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.splitlines() == ["error: hf_fsdp_loadfix is disabled by HF_FSDP_LOADFIX=0, so the check would "
                                        "compare upstream with itself; unset HF_FSDP_LOADFIX to run it"]
    js = cli("check", "--json", env={"HF_FSDP_LOADFIX": "0"}, module=True, timeout=60)
    assert js.returncode == 2 and "HF_FSDP_LOADFIX=0" in json.loads(js.stdout)["error"]


def test_check_nproc_at_least_2():
    """--help says it; the error is check's own (its usage line), exit 2."""
    assert "at least 2" in " ".join(cli("check", "--help").stdout.split())
    for value, error in (("1", "must be at least 2 (rank 0 and a rank that loads nothing), not 1"),
                         ("two", "'two' is not an integer")):
        proc = cli("check", "--nproc", value)
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.startswith("usage: hf-fsdp-loadfix check "), proc.stderr
        assert proc.stderr.splitlines()[-1] == f"hf-fsdp-loadfix check: error: argument --nproc: {error}"


def test_help_is_plain_text():
    """No reST markup (``literal``, :role:) in any --help."""
    for args in (["--help"], ["status", "--help"], ["check", "--help"]):
        proc = cli(*args)
        assert proc.returncode == 0 and proc.stdout.startswith("usage: hf-fsdp-loadfix"), proc.stderr
        assert "``" not in proc.stdout and ":func:" not in proc.stdout and ":class:" not in proc.stdout, proc.stdout
    assert "python -m hf_fsdp_loadfix" in " ".join(cli("--help").stdout.split())


def test_status_says_why_it_takes_seconds():
    """One line on stderr before the imports; --json's stdout stays JSON."""
    proc = cli("status", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["applied"]
    assert proc.stderr.splitlines()[0] == ("hf-fsdp-loadfix status: importing transformers, accelerate and peft to "
                                           "see what a training process gets ...")


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate's switches")
def test_status_names_the_variable_that_disabled_it():
    """Each line names the one variable that is set, never 'A or B'; accelerate's prepare wrapper has its line."""
    off = cli("status", env={"HF_FSDP_LOADFIX": "0"}).stdout
    peft = ("peft adapters:   ",) if importlib.util.find_spec("peft") else ()
    for line in ("accelerate fix:  ", "rank-0 stream:   ", "prepare wrapper: ", *peft):
        assert f"{line}disabled by HF_FSDP_LOADFIX=0\n" in off, off
    accel = cli("status", env={"HF_FSDP_LOADFIX_ACCELERATE": "0"}).stdout
    assert "accelerate fix:  disabled by HF_FSDP_LOADFIX_ACCELERATE=0\n" in accel, accel
    assert "rank-0 stream:   disabled by HF_FSDP_LOADFIX_ACCELERATE=0\n" in accel
    assert "prepare wrapper: applied\n" in accel and f"patch:           applied ({CLASS})" in accel
    assert " or HF_FSDP_LOADFIX" not in off + accel
    from hf_fsdp_loadfix import _check  # check's table: the column says which switch turned accelerate's fix off

    run = {"ranks": [{"error": "x"}], "accelerate_fix": "disabled by HF_FSDP_LOADFIX_ACCELERATE=0"}
    assert _check._cells({**run, "sharding": "accelerate"})["FSDP2 sharding + broadcast"] == \
        "accelerate, fix off (HF_FSDP_LOADFIX_ACCELERATE=0)"
    assert _check._cells({**run, "sharding": "accelerator", "accelerate_fix": "applied"})[
        "FSDP2 sharding + broadcast"] == "Accelerator.prepare, fix applied"


# --device cuda, on this CPU machine: the choice of path, the launch, the rank-to-GPU mapping, the report


@pytest.mark.parametrize("device,nproc,gpus,sharding,expected", [
    (None, None, 0, "accelerate", ("cpu", 2, None)),
    (None, 3, 0, "accelerate", ("cpu", 3, None)),
    (None, None, 1, "accelerate", ("cpu", 2, "one CUDA GPU: --device cuda needs 2 or more (one rank per GPU); "
                                              "running on CPU ranks")),
    (None, None, 4, "accelerate", ("cuda", 4, None)),
    (None, 2, 4, "accelerate", ("cuda", 2, None)),
    ("cpu", None, 4, "accelerate", ("cpu", 2, None)),
    ("cuda", None, 2, "accelerate", ("cuda", 2, None)),
    (None, None, 2, "native", ("cpu", 2, "2 CUDA GPUs, but --device cuda needs accelerate >= 1.6; running on CPU "
                                         "ranks")),
    ("cuda", None, 1, "accelerate", "--device cuda needs 2 or more CUDA GPUs (one rank per GPU); this machine has 1"),
    ("cuda", 5, 4, "accelerate", "--nproc 5 is more than the 4 CUDA GPUs (one rank per GPU)"),
    ("cuda", None, 2, "native", "--device cuda runs accelerate's Accelerator.prepare with FSDP2: install accelerate "
                                ">= 1.6"),
])
def test_check_device_plan(device, nproc, gpus, sharding, expected):
    from hf_fsdp_loadfix._check import CannotRun, plan

    if isinstance(expected, str):
        with pytest.raises(CannotRun) as err:
            plan(device, nproc, gpus, sharding)
        assert str(err.value) == expected
    else:
        assert plan(device, nproc, gpus, sharding) == expected


class Launched(Exception):
    pass


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="--device cuda runs accelerate")
@pytest.mark.parametrize("gpus", [1, 2, 3])
def test_check_launches_one_rank_per_gpu(tmp_path, monkeypatch, capsys, gpus):
    """torch's GPU count faked: 2 or more start that many NCCL ranks of the worker's --device cuda; one says so and
    starts the CPU ranks."""
    import torch

    from hf_fsdp_loadfix import _check, _worker

    clean_env(monkeypatch)
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_text("{}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    launched = []

    def launch(argv, out, nproc, env, timeout):
        launched.append((argv, nproc, env))
        raise Launched

    monkeypatch.setattr(_worker, "launch", launch)
    with pytest.raises(Launched):
        _check.check(str(tmp_path))
    (argv, nproc, env), err = launched[0], capsys.readouterr().err
    assert argv[:2] == ["-m", "hf_fsdp_loadfix._worker"] and env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    if gpus == 1:
        assert nproc == 2 and "--device" not in argv and "one CUDA GPU: --device cuda needs 2 or more" in err
        assert "2 CPU ranks load as float32, accelerate's fsdp2_prepare_model" in err
    else:
        assert nproc == gpus and argv[-2:] == ["--device", "cuda"] and "--shard accelerate" in " ".join(argv)
        assert (f"{gpus} CUDA ranks (NCCL) load as float32, accelerate's Accelerator.prepare(model, optimizer), one "
                "training step") in err


def test_launch_maps_local_ranks_to_gpus(tmp_path, monkeypatch):
    """launch gives local ranks 0..N-1 (RANK on a second node offset by N); the worker's GPU is its local rank's."""
    from hf_fsdp_loadfix import _worker

    started = []

    class Proc:
        returncode = 0

        def __init__(self, cmd, env, **kwargs):
            started.append((cmd, env))

        def communicate(self, timeout=None):
            return "", None

        def kill(self):
            pass

    monkeypatch.setattr(_worker.subprocess, "Popen", Proc)
    outputs, results = _worker.launch(["-m", "hf_fsdp_loadfix._worker", "--device", "cuda"], tmp_path, nproc=3,
                                      node_rank=1, nnodes=2)
    assert outputs == [(0, "")] * 3 and results == [None] * 3
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for _, e in started] == [("3", "0", "6"), ("4", "1", "6"),
                                                                                  ("5", "2", "6")]
    assert [_worker.rank_device("cuda", int(e["LOCAL_RANK"])) for _, e in started] == ["cuda:0", "cuda:1", "cuda:2"]
    assert _worker.rank_device("cpu", 2) == "cpu"
    assert started[0][0][-4:] == ["--device", "cuda", "--out", str(tmp_path)]


def gpu_rank(rank: int, **changes) -> dict:
    """What a --device cuda rank writes (the fields check reads), as it writes it when all is well."""
    return {"rank": rank, "status": {"applied": True, "class": CLASS, "accelerate_fix": "applied"},
            "state": {"w": {"device": "cpu" if rank == 0 else "meta", "shape": [4], "dtype": "torch.float32"}},
            "non_persistent": {}, "tied": False, "rss_peak_delta_kb": 512, "load_s": 0.1, "persistent_buffers": [],
            "checkpoint_keys_compared": 1, "mismatch_vs_checkpoint": [], "state_digest": "s", "logits_digest": "l",
            "logits_nan": False, "device": f"cuda:{rank}", "optimizer_params": 3, "model_params": 3,
            "optimizer_model_params": 3, "train_loss": 0.25, **changes}


def test_check_reports_the_gpu_rows():
    """The rows a --device cuda run adds, and the failures: an optimizer that lost parameters in prepare, a step
    that raised or gave a non-finite loss."""
    from hf_fsdp_loadfix._check import _cells, _ranks, evaluate

    ok = [(0, "")] * 2
    good = [gpu_rank(0), gpu_rank(1)]
    assert evaluate(ok, good) == []
    cells = _cells({"ranks": _ranks(ok, good), "accelerate_fix": "applied", "sharding": "accelerator"})
    assert cells["ranks on GPUs"] == "cuda:0, cuda:1" and cells["prepare: optimizer holds every parameter"] == "yes"
    assert cells["one training step, finite loss"] == "yes"
    bad = [gpu_rank(0, train_loss=float("nan")), gpu_rank(1, optimizer_model_params=1)]
    assert evaluate(ok, bad) == [
        "rank 0: the training step's loss is nan",
        "rank 1: after prepare(model, optimizer) the optimizer holds 1 of the model's 3 parameters in 3 entries: a "
        "training step does not train the others"]
    ranks = _ranks(ok, bad)
    assert ranks[0]["train_loss"] is None and ranks[1]["optimizer_holds_params"] is False
    json.dumps(ranks, allow_nan=False)  # check --json stays strict JSON
    cells = _cells({"ranks": ranks, "accelerate_fix": "applied", "sharding": "accelerator"})
    assert cells["prepare: optimizer holds every parameter"] == cells["one training step, finite loss"] == "no"
    raised = [gpu_rank(0), gpu_rank(1, train_error="RuntimeError: boom")]
    del raised[1]["train_loss"]
    assert evaluate(ok, raised) == ["rank 1: the training step raised RuntimeError: boom"]
    assert _ranks(ok, raised)[1]["train_error"] == "RuntimeError: boom"


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
