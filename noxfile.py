"""Test matrix, run from any interpreter (system Python, a venv, conda): ``python3 -m pip install nox uv && python3 -m nox``.

Every session builds its own virtualenv with uv, which hard-links packages from its cache: a pinned torch is
downloaded once, not once per session. uv does not read pip's configuration, so the sessions take a CPU torch
from the wheel folders pip is configured with (``pip config list``: ``find-links``) when there are any, and
otherwise from PyTorch's CPU wheel index.
"""

import subprocess
import sys

import nox

nox.options.default_venv_backend = "uv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests", "newest", "torch-2.15", "accelerate"]

TORCH = "2.13.0"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
HUB_4X = ["huggingface-hub<1.0"]  # transformers 4.x predates huggingface-hub 1.0

# What a session runs: pytest runs, each a list of arguments. A launch of 2 ranks keeps both cores busy; the
# files that check one fresh interpreter at a time run 2 tests at once (pytest-xdist).
LOAD_PATH = ["tests/test_contract.py", "tests/test_field.py", "tests/test_fail_together.py",
             "tests/test_gate.py::test_structure_check_tells_4x_from_5x"]
ONE_INTERPRETER = ["tests/test_gate.py", "tests/test_startup.py", "tests/test_cli.py"]
OFF_PATH = "tests/test_offpath.py"  # DDP under the FSDP variables, native DistributedConfig, FSDP1/HSDP, long loads
SHARDED = "tests/test_sharded.py"  # HF_FSDP_LOADFIX_SOURCE=sharded against the default path
EXAMPLE = "tests/test_example.py"  # examples/train.py on CPU, and its accelerate branch
CLIENTS = "tests/test_clients.py"  # transformers.Trainer and trl.SFTTrainer, resize_token_embeddings before prepare
WHOLE = [["-n", "2", *ONE_INTERPRETER],
         [*LOAD_PATH[:-1], "tests/test_beyond.py", "tests/test_stream.py", OFF_PATH, SHARDED, EXAMPLE, CLIENTS]]
TRL = ["trl"]  # SFTTrainer's tests (skipped without it); its datasets needs huggingface-hub >= 1, so 5.x only
# every test that goes through accelerate outside the load path
ACCELERATE_TESTS = ["-k", "accelerate", "tests/test_gate.py", "tests/test_beyond.py", "tests/test_stream.py"]
# one environment per behaviour class (hf_fsdp_loadfix/versions.py): release -> (extra pins, pytest runs).
# The whole suite on 4.57.6 (the 4.x patch set, newest accelerate), 5.23.0 (C6, accelerate 1.15.0: the #3898 fix
# and the optimizer mapping still needed) and 5.25.0 (C7, the tested combination of constraints.txt: accelerate
# 1.16.0); the load path on the other classes. 5.3.0 and 5.5.4 take accelerate 1.13.0 and 1.14.0, whose
# fsdp2_load_full_state_dict differs (1.13: cpu_offload argument; 1.14: key-based instead of zip-ordered), and also
# run every other accelerate test. C5 runs on torch 2.15 (session torch-2.15). `nox -s everything` runs the whole
# suite on every class.
CLASSES = {"4.56.2": (HUB_4X, [LOAD_PATH]), "4.57.6": (HUB_4X, WHOLE),
           "5.3.0": (["accelerate==1.13.0"], [LOAD_PATH, ACCELERATE_TESTS, [SHARDED]]),
           "5.5.4": (["accelerate==1.14.0"], [LOAD_PATH, ACCELERATE_TESTS]),
           "5.23.0": (["accelerate==1.15.0", *TRL], WHOLE), "5.25.0": (["-c", "constraints.txt", *TRL], WHOLE)}
TORCH_NEWEST = ("2.15.0", "5.22.2")  # FSDPParam.reset_sharded_param changed on accelerate's assign=True path
# opt-in (`nox -s boundaries`): the first release of each class (4.57.0 is yanked, so 4.57.1)
BOUNDARIES = {"4.53.0": HUB_4X, "4.57.1": HUB_4X, "5.0.0": [], "5.4.0": [], "5.6.0": []}
# accelerate 1.6, the first release with FSDP2 loading (cuda hard-coded: on CPU only its gating and structure
# tests run), with a transformers release of its time
ACCELERATE = {"1.6.0": ["transformers==4.57.6", *HUB_4X]}


def _torch_source() -> list[str]:
    """pip's own wheel folders (``find-links``) if it has any, else PyTorch's CPU index (no CUDA wheels)."""
    try:
        config = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                                timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        config = ""
    folders = [value.strip("'\"") for key, _, value in (line.partition("=") for line in config.splitlines())
               if key.endswith(".find-links")]
    links = dict.fromkeys(link for value in folders for link in value.split())
    return [arg for link in links for arg in ("--find-links", link)] or ["--index-url", CPU_INDEX]


def _run(session, torch: str, *pins: str, runs=WHOLE):
    session.install(torch, *_torch_source())
    session.install(".[test]", *pins, torch)  # torch pinned again: nothing may replace it
    # uv installs no bytecode; with PYTHONDONTWRITEBYTECODE set as well (some CI images set it), each of the
    # suite's fresh interpreters would compile what it imports of torch and transformers again (twice the time)
    env = {"PYTHONDONTWRITEBYTECODE": ""}
    session.run("python", "-c", "import torch, transformers, accelerate; print('torch', torch.__version__, "
                "'transformers', transformers.__version__, 'accelerate', accelerate.__version__)", env=env)
    for tests in runs:  # with pytest arguments passed through (-k ...), a run may select nothing (exit 5)
        session.run("python", "-m", "pytest", "-q", "--durations=10", *tests, *session.posargs, env=env,
                    success_codes=[0, 5] if session.posargs else [0])


@nox.session
@nox.parametrize("release", list(CLASSES))
def tests(session, release):
    """One release per behaviour class, torch 2.13.0."""
    pins, runs = CLASSES[release]
    _run(session, f"torch=={TORCH}", f"transformers=={release}", *pins, runs=runs)


@nox.session
def newest(session):
    """The load path, the rank-0 stream, the off-path setups, shard-on-read, the example and the clients (Trainer,
    SFTTrainer) on the newest torch, transformers, accelerate, peft and trl on the index: CI tries each new upstream
    release the next time it runs."""
    _run(session, "torch", "transformers", "accelerate", "peft", *TRL,
         runs=[[*LOAD_PATH, "tests/test_stream.py", OFF_PATH, SHARDED, EXAMPLE, CLIENTS]])


@nox.session(name="torch-2.15")
def torch_2_15(session):
    """The newest torch minor with the C5 release: the load path, and transformers' native DistributedConfig load."""
    _run(session, f"torch=={TORCH_NEWEST[0]}", f"transformers=={TORCH_NEWEST[1]}",
         runs=[LOAD_PATH, ["-k", "native", OFF_PATH]])


@nox.session
@nox.parametrize("release", list(ACCELERATE))
def accelerate(session, release):
    """Every test that goes through accelerate, on an accelerate release no class session takes."""
    _run(session, f"torch=={TORCH}", f"accelerate=={release}", *ACCELERATE[release], runs=[["-k", "accelerate"]])


@nox.session
@nox.parametrize("release", [*CLASSES, TORCH_NEWEST[1]])
def everything(session, release):
    """Opt-in: the whole suite on one release per behaviour class, torch 2.13.0, with the class session's pins."""
    _run(session, f"torch=={TORCH}", f"transformers=={release}", *CLASSES.get(release, ([],))[0])


@nox.session
@nox.parametrize("release", list(BOUNDARIES))
def boundaries(session, release):
    """Opt-in: the whole suite on the first release of each class."""
    _run(session, f"torch=={TORCH}", f"transformers=={release}", *BOUNDARIES[release])
