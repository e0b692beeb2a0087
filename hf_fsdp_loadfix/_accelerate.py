"""accelerate 1.6.0-1.15.x: ``fsdp2_load_full_state_dict`` assumes every state-dict entry is a DTensor, so a
persistent plain-tensor buffer (DeepSeek-V3's ``e_score_correction_bias``) crashes it on rank 0 with
``'Tensor' object has no attribute 'device_mesh'`` (accelerate#3898). The wrapper broadcasts such buffers whole
from rank 0 (dtype preserved, sorted by name, before accelerate's own broadcasts on every rank) and hides them
from accelerate while it handles the DTensors exactly as before."""

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ._runtime import _owned_buffers

BROKEN = SpecifierSet(">=1.6.0,<1.16")
TARGET = "fsdp2_load_full_state_dict"


def mismatch(fsdp_utils) -> str | None:
    import accelerate

    if not BROKEN.contains(Version(accelerate.__version__), prereleases=True):
        return f"accelerate {accelerate.__version__} is outside the affected range {BROKEN}"
    if not callable(getattr(fsdp_utils, TARGET, None)):
        return f"accelerate.utils.fsdp_utils.{TARGET} is missing"
    return None


def load_full_state_dict(wrapped, instance, args, kwargs):
    def call(accelerator, model, full_sd, *rest, **kw):
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        plain = sorted(
            ((key, owner, leaf) for owner, leaf, buf, key in _owned_buffers(model, persistent=True)
             if not isinstance(buf, DTensor)),
            key=lambda entry: entry[0],
        )
        for key, owner, leaf in plain:
            current = owner._buffers[leaf]
            if accelerator.is_main_process:
                value = full_sd[key].detach().to(accelerator.device).contiguous()
            else:
                value = torch.empty(current.shape, dtype=current.dtype, device=accelerator.device)
            dist.broadcast(value, src=0, group=dist.group.WORLD)
            owner._buffers[leaf] = value
            owner._non_persistent_buffers_set.add(leaf)  # hidden from accelerate's DTensor-only loop
        try:
            keys = {key for key, _, _ in plain}
            return wrapped(accelerator, model, {k: v for k, v in full_sd.items() if k not in keys}, *rest, **kw)
        finally:
            for _, owner, leaf in plain:
                owner._non_persistent_buffers_set.discard(leaf)

    return call(*args, **kwargs)
