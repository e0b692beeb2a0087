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


def _plain_buffers(model):
    """(state-dict key, owners) for each persistent buffer that is no DTensor, sorted by key. Keys are the state
    dict's own names (wrapper prefixes such as ``_checkpoint_wrapped_module.`` already stripped, ``_orig_mod.``
    and peft's kept), found by tensor identity; owners are the (module, name) pairs that register the tensor."""
    from torch.distributed.tensor import DTensor

    owners = {}
    for owner, leaf, buf, _ in _owned_buffers(model, persistent=True):
        owners.setdefault(id(buf), []).append((owner, leaf))
    return sorted(
        (key, owners[id(t)]) for key, t in model.state_dict(keep_vars=True).items()
        if id(t) in owners and not isinstance(t, DTensor)
    )


def load_full_state_dict(wrapped, instance, args, kwargs):
    def call(accelerator, model, full_sd, *rest, **kw):
        import torch.distributed as dist

        plain = _plain_buffers(model)
        for key, owners in plain:
            current = owners[0][0]._buffers[owners[0][1]]
            if accelerator.is_main_process:
                value = full_sd[key].detach().to(accelerator.device).contiguous()
            else:
                value = torch.empty(current.shape, dtype=current.dtype, device=accelerator.device)
            dist.broadcast(value, src=0, group=dist.group.WORLD)
            for owner, leaf in owners:
                owner._buffers[leaf] = value
                # hidden from accelerate's DTensor-only loop: model.state_dict() and full_sd both lose the key, so
                # the zip-ordered loop of accelerate 1.6-1.13 stays aligned
                owner._non_persistent_buffers_set.add(leaf)
        try:
            keys = {key for key, _ in plain}
            return wrapped(accelerator, model, {k: v for k, v in full_sd.items() if k not in keys}, *rest, **kw)
        finally:
            for _, owners in plain:
                for owner, leaf in owners:
                    owner._non_persistent_buffers_set.discard(leaf)

    return call(*args, **kwargs)
