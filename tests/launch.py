"""Start N local ranks of worker.py (gloo, one per process) as ``torchrun`` would on one node."""

import os

from hf_fsdp_loadfix._worker import free_port, launch  # noqa: F401  (free_port: re-exported for the tests)

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")


def run_ranks(args, out, timeout=300, **kwargs):
    """worker.py on ``nproc`` ranks (default 2): per-rank (returncode, output), and the JSON each wrote."""
    return launch([WORKER, *args], out, timeout=timeout, **kwargs)
