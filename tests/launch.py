"""Start N local ranks (gloo, one per process) as ``torchrun`` would on one node, with a hard timeout."""

import json
import os
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(args, out, nproc=2, env=None, timeout=300, script=None, node_rank=0, nnodes=1, port=None):
    """Run ``script`` (default: worker.py) on ``nproc`` ranks; return per-rank (returncode, output) and results."""
    port = port or free_port()
    procs = []
    for local in range(nproc):
        rank = node_rank * nproc + local
        penv = {**os.environ, **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(local),
                "WORLD_SIZE": str(nproc * nnodes), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, script or os.path.join(HERE, "worker.py"), *args, "--out", str(out)],
            env=penv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            text, _ = proc.communicate(timeout=timeout)
            outputs.append((proc.returncode, text))
    finally:
        for proc in procs:
            proc.kill()
    results = []
    for local in range(nproc):
        path = os.path.join(str(out), f"rank{node_rank * nproc + local}.json")
        results.append(json.load(open(path)) if os.path.exists(path) else None)
    return outputs, results
