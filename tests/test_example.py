"""examples/: the accelerate config parses with accelerate's own loader, and examples/train.py trains on 2 CPU gloo
ranks as the README's two commands start it (``accelerate launch --config_file examples/accelerate_fsdp2.yaml`` with
the package, ``torchrun`` with ``HF_FSDP_LOADFIX=0``): bitwise equal losses, rank 1's parameters on meta with the
package and on cpu without. Then the script's accelerate branch (what it runs on GPUs), forced onto CPU."""

import os
import subprocess
import sys

import pytest

from hf_fsdp_loadfix._worker import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train.py")
CONFIG = os.path.join(ROOT, "examples", "accelerate_fsdp2.yaml")
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIG]

# accelerate runs DDP on CPU whatever the config says; this runs the example's accelerate branch with accelerate's
# FSDP2 state forced on (the FSDP plugin built from the FSDP_* variables accelerate launch set), as on GPUs
FSDP2_ON_CPU = '''
import runpy, sys
import accelerate, torch
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

is_available, init = torch.cuda.is_available, accelerate.Accelerator.__init__

def fsdp2_on_cpu(self, *args, **kwargs):
    torch.cuda.is_available = is_available
    init(self, *args, cpu=True, **kwargs)
    plugin = FullyShardedDataParallelPlugin()
    if self.state.mixed_precision != "no":
        plugin.set_mixed_precision(self.state.mixed_precision)
    self.state.distributed_type, self.state.fsdp_plugin = DistributedType.FSDP, plugin

torch.cuda.is_available = lambda: True  # so that the example takes its accelerate branch
accelerate.Accelerator.__init__ = fsdp2_on_cpu
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


def run(cmd, out, package: bool):
    """Run ``cmd`` (2 ranks); the text it printed and each rank's JSON."""
    import json

    env = {**os.environ, "HF_FSDP_LOADFIX": "1" if package else "0", "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout, [json.load(open(out / f"rank{rank}.json")) for rank in range(2)]


def test_the_accelerate_config_parses_with_accelerates_loader():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(CONFIG)
    assert isinstance(config, ClusterConfig)
    assert (config.distributed_type, config.mixed_precision, config.num_processes) == ("FSDP", "bf16", 2)
    assert config.fsdp_config["fsdp_version"] == 2
    assert config.fsdp_config["fsdp_cpu_ram_efficient_loading"] is True
    assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(tmp_path_factory.mktemp("example") / "tiny-llama")  # the first run builds it (--random-model)


def plain(*args, **env):
    """The example run with plain python, as a user might start it, no launcher's variables."""
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    return subprocess.run([sys.executable, EXAMPLE, *args], env={**clean, **env}, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_the_example_says_how_to_start_it():
    """Without a launcher: how to start it (torchrun, accelerate launch), not torch's 'environment variable RANK
    expected'; exit 2, nothing trained."""
    proc = plain("--cpu")
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "train.py: error: RANK and WORLD_SIZE are not set: start one process per rank: torchrun --nproc_per_node 2 "
        "examples/train.py --cpu (CPU ranks), or accelerate launch --config_file examples/accelerate_fsdp2.yaml "
        "examples/train.py (GPUs)")


def test_a_model_path_without_a_checkpoint_is_an_error(tmp_path):
    """--model at a path with no checkpoint (a typo): one error naming it and --random-model, exit 2, nothing written
    there; from rank 0 only (the other ranks exit 2 silently)."""
    typo = str(tmp_path / "no" / "such-model")
    proc = plain("--cpu", "--model", typo)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"train.py: error: --model {typo}: no checkpoint there (no config.json); pass a local checkpoint directory, "
        "or add --random-model to build a tiny random Llama there")
    assert not os.path.exists(tmp_path / "no")
    other = plain("--cpu", "--model", typo, RANK="1", WORLD_SIZE="2")
    assert (other.returncode, other.stdout, other.stderr) == (2, "", "")


def test_the_help_describes_every_option():
    import re

    proc = plain("--help")
    assert proc.returncode == 0, proc.stderr
    for option in ("--model MODEL", "--random-model", "--cpu", "--sharded", "--steps STEPS", "--out OUT"):
        assert re.search(rf"^  {option}  +\w", proc.stdout, re.M), (option, proc.stdout)
    assert "torchrun --nproc_per_node 2" in proc.stdout and "accelerate launch" in proc.stdout


def test_the_cpu_path_trains_as_upstream(ckpt, tmp_path):
    """With the package (accelerate launch) and without it (torchrun): every loss bitwise equal on both ranks and in
    both runs, and decreasing; rank 1's parameters on meta after from_pretrained with the package, cpu without.
    With --sharded (shard-on-read, fill_shards) the same losses, rank 0 on meta too."""
    args = [EXAMPLE, "--cpu", "--model", ckpt, "--random-model"]
    text, patched = run([*ACCELERATE_LAUNCH, "--main_process_port", str(free_port()), *args], tmp_path / "on", True)
    _, upstream = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                       str(free_port()), *args], tmp_path / "off", False)
    assert [r["patched"] for r in patched + upstream] == [True, True, False, False]
    assert [r["devices_after_from_pretrained"] for r in patched] == [["cpu"], ["meta"]]
    assert [r["devices_after_from_pretrained"] for r in upstream] == [["cpu"], ["cpu"]]
    assert "rank 1: parameters on meta after from_pretrained" in text
    _, sharded = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                      str(free_port()), *args, "--sharded"], tmp_path / "sharded", True)
    assert [r["devices_after_from_pretrained"] for r in sharded] == [["meta"], ["meta"]]  # shard-on-read: rank 0 too
    losses = patched[0]["losses"]
    assert all(r["losses"] == losses for r in patched + upstream + sharded), [r["losses"] for r in
                                                                              patched + upstream + sharded]
    assert len(losses) == 5 and all(a > b for a, b in zip(losses, losses[1:])), losses
    assert f"step 4: loss {losses[4]!r}" in text


def test_the_accelerate_branch_trains_as_upstream(ckpt, tmp_path):
    """The example's accelerate branch (optimizer built before prepare, as accelerate's FSDP2 requires) under
    accelerate launch with the config, bf16 mixed precision, FSDP2 forced onto CPU: losses equal with and without
    the package. (accelerate maps the optimizer's parameters by data_ptr(), 0 for every meta parameter: without the
    package's mapping, rank 1's optimizer held one parameter many times and training diverged.)"""
    from launch import require_accelerate_on_cpu

    require_accelerate_on_cpu()
    shim = tmp_path / "fsdp2_on_cpu.py"
    shim.write_text(FSDP2_ON_CPU)
    runs = []
    for package in (True, False):
        cmd = [*ACCELERATE_LAUNCH, "--main_process_port", str(free_port()), str(shim), EXAMPLE, "--model", ckpt,
               "--random-model"]
        runs.append(run(cmd, tmp_path / str(package), package)[1])
    (on0, on1), (off0, off1) = runs
    assert (on1["devices_after_from_pretrained"], off1["devices_after_from_pretrained"]) == (["meta"], ["cpu"])
    assert off0["losses"] == off1["losses"] and off0["losses"][-1] < off0["losses"][0]
    assert on0["losses"] == on1["losses"] == off0["losses"], (on0["losses"], off0["losses"])
