"""Memory-flat, correct FSDP cpu-ram-efficient loading for Hugging Face transformers.

``import hf_fsdp_loadfix`` (or the startup hook installed with the wheel) calls :func:`apply`, which patches
``transformers.modeling_utils.PreTrainedModel`` as soon as that module is imported, never importing it itself.
"""

import sys
import warnings
from _thread import RLock

from . import _config

# The startup hook imports this package in every interpreter of the environment, so only modules the
# interpreter has (nearly) loaded anyway are imported here. wrapt (and with it asyncio, inspect and
# importlib.metadata), packaging and torch wait until transformers or accelerate is imported (_Trigger); by
# then sys.path is complete, even where the hook ran before the site directory holding wrapt was on it.

__version__ = "0.1.0"
__all__ = ["apply", "fill_shards", "fsdp_loading", "revert", "status", "wait_for_rank0"]

_MODULE = "transformers.modeling_utils"
_ACCELERATE = "accelerate.utils.fsdp_utils"
_ACCELERATOR = "accelerate.accelerator"
_ACCELERATE_ALIASES = ("accelerate.utils", "accelerate.accelerator")  # import fsdp_utils' functions by name
_PEFT = "peft.tuners.tuners_utils"
_TRAINING_ARGS = "transformers.training_args"
_TRAINER = "transformers.trainer"
_TRL_MODELS = "trl.models.utils"
_lock = RLock()
_state = {"wanted": False, "hook": False, "class": None, "reason": "apply() not called", "originals": {},
          "accelerate": "not imported", "stream": "not imported", "prepare": "not imported", "peft": "not imported",
          "fill": "not imported", "optimizer": "not imported", "case": None}


def apply() -> None:
    """Patch transformers now if it is imported, else the moment it is. Idempotent and thread-safe."""
    with _lock:
        _state["wanted"] = True
        if _state["hook"]:
            for name, hook in _HOOKS:
                if name in sys.modules:
                    hook(sys.modules[name])
        elif "transformers" in sys.modules or "accelerate" in sys.modules:
            _register()
        else:
            if not any(isinstance(f, _Trigger) for f in sys.meta_path):
                sys.meta_path.insert(0, _Trigger())
            _state["reason"] = "waiting for transformers/accelerate to be imported"


def _register() -> None:
    """wrapt's post-import hooks: each runs at once if its module is imported, else when it is."""
    try:
        import wrapt
    except ImportError as err:
        _state["reason"] = f"not patched: {err}"
        return
    _state["hook"] = True
    _state["reason"] = f"waiting for {_MODULE} to be imported"
    for name, hook in _HOOKS:
        wrapt.register_post_import_hook(hook, name)


def revert() -> None:
    """Restore the original transformers (and accelerate) functions and stop any pending patch."""
    with _lock:
        _state["wanted"] = False
        for (owner, attr), (original, aliases) in _state["originals"].items():
            _rebind(aliases, attr, vars(owner)[attr], original)
            setattr(owner, attr, original)
        _state["originals"] = {}
        _state.update({"class": None, "reason": "reverted", "case": None,
                       **dict.fromkeys(("accelerate", "stream", "prepare", "peft", "fill", "optimizer"), "reverted")})
        stream = sys.modules.get(f"{__name__}._stream")
        if stream is not None:
            stream.applies = False


def status() -> dict:
    """Versions, behaviour class, whether the patch is applied, and why not if it is not."""
    from ._status import report

    with _lock:
        return report(_state)


def wait_for_rank0(model=None) -> None:
    """Call on every rank just before your own first collective after ``from_pretrained`` under FSDP cpu-ram-efficient
    loading (``set_model_state_dict(..., broadcast_from_rank0=True)``): returns once global rank 0 got there too, with
    no collective timeout (``HF_FSDP_LOADFIX_WAIT``). accelerate's prepare calls it for you."""
    from ._wait import wait_for_rank0 as wait

    wait(model)


def fill_shards(model) -> None:
    """After your own ``fully_shard`` of a model loaded for shard-on-read (:func:`fsdp_loading`, or
    ``HF_FSDP_LOADFIX_SOURCE=sharded`` under the FSDP variables): every rank reads its own slices of the checkpoint
    into its shards, no collective (keys the checkpoint lacks, such as a new head, come from rank 0: then call it on
    every rank). Call it before the first forward. Raises naming the reason where the model was left to the default
    path (then broadcast rank 0's state dict instead)."""
    from ._sharded import fill

    mesh = next((p.device_mesh for p in model.parameters() if hasattr(p, "device_mesh")), None)
    fill(model, mesh.device_type if mesh is not None else None)


class fsdp_loading:  # noqa: N801 - used as a function: ``with hf_fsdp_loadfix.fsdp_loading(): ...``
    """``with hf_fsdp_loadfix.fsdp_loading(): model = AutoModel.from_pretrained(...)``: transformers' FSDP
    cpu-ram-efficient gate (``ACCELERATE_USE_FSDP``, ``FSDP_CPU_RAM_EFFICIENT_LOADING``) and the package's
    ``HF_FSDP_LOADFIX_SOURCE`` for this block only. ``source``: ``sharded`` (every rank reads its own slices later,
    :func:`fill_shards`), ``local`` or ``global`` (rank 0 loads; broadcast its state dict after ``fully_shard``)."""

    def __init__(self, source: str = "sharded"):
        self.values = {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
                       "HF_FSDP_LOADFIX_SOURCE": source}

    def __enter__(self):
        import os

        self.saved = {k: os.environ.get(k) for k in self.values}
        os.environ.update(self.values)
        try:
            _config.source()  # a junk source raises here, naming the variable
        except ValueError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        import os

        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Trigger:
    """Registers the post-import hooks when transformers or accelerate is first imported, so that interpreter
    start-up imports nothing more. Stays in sys.meta_path, inert, so the finder list is never shortened while
    the import machinery walks it."""

    def find_spec(self, name, path=None, target=None):
        if name in ("transformers", "accelerate") and not _state["hook"]:
            with _lock:
                if _state["wanted"] and not _state["hook"]:  # not after revert()
                    _register()
        return None


def _wrap(owner, attr, wrapper, aliases=()) -> None:
    """Wrap ``owner.attr``, and the modules named in ``aliases`` that already imported it by name (accelerate
    imported before the package); those imported later bind the wrapper itself."""
    import wrapt

    original = vars(owner)[attr]
    _state["originals"][(owner, attr)] = (original, aliases)
    wrapt.wrap_function_wrapper(owner, attr, wrapper)
    _rebind(aliases, attr, original, vars(owner)[attr])


def _rebind(aliases, attr, old, new) -> None:
    for name in aliases:
        module = sys.modules.get(name)
        if module is not None and vars(module).get(attr) is old:
            setattr(module, attr, new)


def _on_import(modeling_utils) -> None:
    with _lock:
        if not _state["wanted"] or _state["class"]:
            return
        _config.validate()  # a junk value raises here, naming the variable
        if not _config.enabled():
            _state["reason"] = "disabled by HF_FSDP_LOADFIX=0"
            return
        import transformers

        from . import _gate, _kernels, _runtime, _steps

        cls, version = modeling_utils.PreTrainedModel, transformers.__version__
        patches, why = _gate.select(modeling_utils, version)
        if patches is None:
            if _state["reason"] != why:  # one warning per process
                warnings.warn(f"hf_fsdp_loadfix: {why}", RuntimeWarning, stacklevel=2)
            _state["reason"], _state["case"] = why, f"refused: {why}"
            return
        for attr, (wrapper, _) in patches.targets.items():
            _wrap(cls, attr, wrapper)
        _wrap(modeling_utils, "is_local_dist_rank_0", _runtime.local_dist_rank_0)  # HF_FSDP_LOADFIX_SOURCE
        _wrap(modeling_utils, "is_fsdp_enabled", _steps.fsdp_enabled)  # the Trainer's own cpu_ram_efficient_loading
        for attr, wrapper in _steps.MODEL_STEPS.items():  # what frameworks do to the model before prepare
            if callable(vars(cls).get(attr)):
                _wrap(cls, attr, wrapper)
        hub_kernels = sys.modules.get(_kernels.MODULE)
        if _kernels.mismatch(hub_kernels) is None:  # every release with the kernels step, C7 or not
            _wrap(hub_kernels, _kernels.TARGET, _kernels.kernelize)
        _state["class"], _state["reason"] = patches.name, None
        _state["case"] = "tested" if not why else (
            f"untested ({why}), structure matches {patches.name}; to be proven at the first FSDP load")
        _runtime.untested_release = bool(why)
        _runtime.proof = _gate.Proof(version, _proven) if why else None
        if why:
            warnings.warn(f"hf_fsdp_loadfix: transformers {version} is untested ({why}); patched because its "
                          f"structure matches {patches.name}, if it passes a proof at the first FSDP load",
                          RuntimeWarning, stacklevel=2)


def _proven(why: str | None) -> None:
    """An untested release passed the proof (``why`` None), or failed it: then this process runs as upstream
    (``revert``), and status says why."""
    with _lock:
        if why is None:
            _state["case"] = _state["case"].replace("to be proven at the first FSDP load", "proven in this process")
            return
        revert()
        _state["reason"], _state["case"] = why, f"refused: {why}"
        for hook in ("accelerate", "stream", "prepare", "peft", "fill", "optimizer"):
            _state[hook] = f"reverted: {why}"


def _disabled() -> str | None:
    for name, on in (("HF_FSDP_LOADFIX", _config.enabled), ("HF_FSDP_LOADFIX_ACCELERATE", _config.accelerate_fix)):
        if not on():
            return f"disabled by {name}=0"
    return None


def _on_accelerate_import(fsdp_utils) -> None:
    """Each accelerate hook where what it is for applies (``_accelerate``): the wait for rank 0 around
    ``fsdp2_prepare_model`` whenever the package is on (the transformers patch leaves meta weights whatever the
    accelerate switch says), and the shard-on-read fill inside ``fsdp2_load_full_state_dict``; the accelerate#3898 fix
    and the rank-0 stream unless HF_FSDP_LOADFIX_ACCELERATE=0."""
    from . import _accelerate, _stream

    with _lock:
        if not _state["wanted"] or (fsdp_utils, _accelerate.PREPARE) in _state["originals"]:
            return
        _config.validate()
        if not _config.enabled():
            _state["accelerate"] = _state["stream"] = _state["prepare"] = _state["fill"] = _disabled()
            return
        if callable(getattr(fsdp_utils, _accelerate.PREPARE, None)):
            _wrap(fsdp_utils, _accelerate.PREPARE, _accelerate.prepare_fsdp2, _ACCELERATE_ALIASES)
        load_why = _accelerate.load_mismatch(fsdp_utils)
        if load_why is None:
            _wrap(fsdp_utils, _accelerate.TARGET, _accelerate.load_full_state_dict, _ACCELERATE_ALIASES)
        _state["fill"] = load_why or "applied"
        if _disabled():
            _state["accelerate"] = _state["stream"] = _disabled()
            return
        fix_why = load_why or _accelerate.mismatch(fsdp_utils)
        stream_why = load_why or _stream.mismatch(fsdp_utils)
        _accelerate.buffer_fix, _stream.applies = fix_why is None, stream_why is None
        _state["accelerate"], _state["stream"] = fix_why or "applied", stream_why or "applied"


def _on_accelerator_import(accelerator) -> None:
    """``Accelerator.prepare_model`` (FSDP1, DDP, no wrapper): the wait for rank 0, and the fill of a model prepared
    without FSDP; ``Accelerator._prepare_fsdp2``: the optimizer's parameters mapped right for meta parameters, where
    accelerate maps them by ``data_ptr()``."""
    from . import _accelerate

    with _lock:
        owner = accelerator.Accelerator
        if not _state["wanted"] or (owner, "prepare_model") in _state["originals"]:
            return
        _config.validate()
        if not _config.enabled():
            _state["prepare"] = _state["optimizer"] = _disabled()
            return
        _wrap(owner, "prepare_model", _accelerate.prepare_model)
        why = _accelerate.optimizer_mismatch(accelerator)
        if why is None:
            _wrap(owner, "_prepare_fsdp2", _accelerate.prepare_fsdp2_accelerator)
        _state["prepare"], _state["optimizer"] = "applied", why or "applied"


def _on_peft_import(tuners_utils) -> None:
    """``BaseTunerLayer._move_adapter_to_device_of_base_layer``: under shard-on-read, local rank 0 keeps the adapter
    values peft made before they go to their meta base layer's device; ``BaseTuner.inject_adapter``: initialisations
    that read the base weights are one clear error before prepare (``_peft``)."""
    import inspect

    from . import _peft

    _wrap_step(getattr(tuners_utils, "BaseTuner", None), _peft.INJECT, _peft.inject_adapter)
    with _lock:
        owner = getattr(tuners_utils, "BaseTunerLayer", None)
        move = vars(owner).get(_peft.MOVE) if owner is not None else None
        if not _state["wanted"] or (owner, _peft.MOVE) in _state["originals"]:
            return
        if not _config.enabled():
            _state["peft"] = "disabled by HF_FSDP_LOADFIX=0"
            return
        if not callable(move) or not {"adapter_name", "device"} <= inspect.signature(move).parameters.keys():
            _state["peft"] = f"not applied: this peft has no {_peft.MOVE}(adapter_name, device)"
            return
        _wrap(owner, _peft.MOVE, _peft.move_adapter)
        _state["peft"] = "applied"


def _on_training_args_import(training_args) -> None:
    """``TrainingArguments.__post_init__``: what it asked accelerate's FSDP plugin for (``_steps``)."""
    from . import _steps

    _wrap_step(training_args.TrainingArguments, "__post_init__", _steps.training_args_post_init)


def _on_trainer_import(trainer) -> None:
    """``Trainer._move_model_to_device``: a model filled from rank 0 before it moves (``_steps``)."""
    from . import _steps

    _wrap_step(trainer.Trainer, "_move_model_to_device", _steps.move_model_to_device)


def _on_trl_models_import(utils) -> None:
    """trl's ``prepare_fsdp``, which shards a reference model with no broadcast: filled after it (``_steps``). trl's
    trainers import it by name: those already imported are rebound."""
    from . import _steps

    aliases = tuple(name for name, module in list(sys.modules.items())
                    if name.startswith("trl.") and module is not None and vars(module).get("prepare_fsdp") is
                    vars(utils).get("prepare_fsdp"))
    _wrap_step(utils, "prepare_fsdp", _steps.trl_prepare_fsdp, aliases)


def _wrap_step(owner, attr, wrapper, aliases=()) -> None:
    """Wrap ``owner.attr`` once, where it exists and the package is on."""
    with _lock:
        if _state["wanted"] and owner is not None and (owner, attr) not in _state["originals"] \
                and callable(vars(owner).get(attr)) and _config.enabled():
            _wrap(owner, attr, wrapper, aliases)


_HOOKS = ((_MODULE, _on_import), (_ACCELERATE, _on_accelerate_import), (_ACCELERATOR, _on_accelerator_import),
          (_PEFT, _on_peft_import), (_TRAINING_ARGS, _on_training_args_import), (_TRAINER, _on_trainer_import),
          (_TRL_MODELS, _on_trl_models_import))
apply()
