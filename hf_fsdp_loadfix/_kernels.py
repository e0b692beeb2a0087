"""transformers' kernels step, on a model the package keeps on meta.

With the ``kernels`` package installed, transformers kernelizes a model for ``model.device``: ``from_pretrained`` right
after the load (5.25: on by default; earlier 5.x with ``use_kernels=True``), ``model.train()``/``eval()`` when the
kernel mode changes, ``set_use_kernels`` and ``reset_kernels``. All of them reach kernels' ``kernelize`` through
``transformers.integrations.hub_kernels._kernels_kernelize(model, device=...)``. For a model whose weights are on meta
that device is ``meta``, which kernels refuses (``Unsupported device type 'meta'``). Local rank 0 loads onto the CPU,
so the meta model is kernelized for the CPU, exactly as rank 0's: the same mode, the same layers replaced."""

import torch

from ._broadcast import from_rank0

MODULE = "transformers.integrations.hub_kernels"
TARGET = "_kernels_kernelize"
LOADING_DEVICE = "cpu"  # where from_pretrained puts local rank 0's weights without a device_map


def _is_meta(device) -> bool:
    return device is not None and torch.device(device).type == "meta"


def kernelize(wrapped, instance, args, kwargs):
    """kernels' ``kernelize(model, *, device, mode, use_fallback)``, for a meta model the package loaded: the
    device local rank 0 loaded it onto."""
    model = args[0] if args else kwargs.get("model")
    if _is_meta(kwargs.get("device")) and from_rank0(model):
        kwargs = {**kwargs, "device": LOADING_DEVICE}
    return wrapped(*args, **kwargs)


def mismatch(hub_kernels) -> str | None:
    """None when transformers' ``kernelize`` hands kernels a ``device`` keyword through ``_kernels_kernelize``."""
    outer = getattr(hub_kernels, "kernelize", None)
    if not callable(getattr(hub_kernels, TARGET, None)) or not callable(outer):
        return f"{MODULE} has no kernelize/{TARGET} (is the kernels package installed?)"
    import inspect

    if TARGET not in inspect.unwrap(outer).__code__.co_names:
        return f"{MODULE}.kernelize does not call {TARGET}"
    return None
