"""Waiting for rank 0 with no timeout but the user's own.

Under the package, ranks other than 0 finish ``from_pretrained`` in a second while rank 0 reads the checkpoint (25-30
minutes for a 235B-665 GiB model). The first collective after it would wait for rank 0 under the process group's or
the store's timeout (NCCL: 10 min; ``ddp_timeout``: 30 min) and kill the job. So before the first collective of a
prepare, rank 0 sets a key in the job's store and every other rank polls ``store.check`` (which returns at once) with
backoff until the key is there: no collective, no blocking store call, a deadline set by ``HF_FSDP_LOADFIX_WAIT``.
If rank 0 dies, its store (or torchrun's agent) goes away and the wait ends within seconds with one clear error.
"""

import logging
import time

import torch

from . import _config

logger = logging.getLogger("hf_fsdp_loadfix")
WAITED = "_hf_fsdp_loadfix_waited"  # on a model whose ranks already met: one wait per model
_calls = [0]  # waits so far in this process: rank 0's n-th key is what the others' n-th wait polls for


def _store():
    from torch.distributed import distributed_c10d

    get = getattr(distributed_c10d, "_get_default_store", None)
    return get() if get is not None else None


def wait_for_rank0(model=None) -> None:
    """Return once global rank 0 has called this too (rank 0 returns at once). Call it on every rank before the first
    collective that follows ``from_pretrained`` under FSDP cpu-ram-efficient loading, such as your own
    ``set_model_state_dict(..., broadcast_from_rank0=True)``; accelerate's prepare calls it for you. With ``model``,
    once per model."""
    dist = torch.distributed
    deadline = _config.wait_seconds()  # a junk value raises on every rank
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    if model is not None:
        if getattr(model, WAITED, False):
            return
        setattr(model, WAITED, True)
    store = _store()
    if store is None:
        logger.warning("hf_fsdp_loadfix: this torch has no default store to wait on; not waiting for rank 0")
        return
    _calls[0] += 1
    key, rank = f"hf_fsdp_loadfix/rank0_ready/{_calls[0]}", dist.get_rank()
    if rank == 0:
        store.set(key, "1")
        return
    start = logged = time.monotonic()
    delay = 0.01
    while True:
        try:
            if store.check([key]):
                return
        except Exception as err:  # noqa: BLE001 - rank 0's store gone: the job is over
            first = str(err).splitlines()[0] if str(err) else repr(err)  # torch appends C++ frames to the message
            raise RuntimeError(
                f"hf_fsdp_loadfix: rank {rank} lost the job's store while waiting for rank 0 to finish loading "
                f"({type(err).__name__}: {first}); rank 0 has most likely failed: see its output") from None
        now = time.monotonic()
        if now - start > deadline:
            raise TimeoutError(
                f"hf_fsdp_loadfix: rank {rank} waited {deadline:.0f} s for rank 0 to finish loading "
                "(HF_FSDP_LOADFIX_WAIT); raise HF_FSDP_LOADFIX_WAIT if rank 0's load is that slow, else see rank 0's "
                "output")
        if now - logged >= 60:
            logged = now
            logger.warning("hf_fsdp_loadfix: rank %d waiting for rank 0 to finish loading (%d min)", rank,
                           (now - start) // 60)
        time.sleep(delay)
        delay = min(2 * delay, 1.0)
