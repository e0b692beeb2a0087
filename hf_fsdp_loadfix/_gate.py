"""The release gate: which patch set a transformers release gets, and whether it can be trusted.

A release in the table (``versions``) gets its class's patch set, checked for structure (``classes``). A release newer
than the table gets the newest patch set if its structure matches, and before the first load the patch would change
in this process it must pass a proof (:class:`Proof`): structure covers the functions the package wraps, not
everything upstream then runs on the loaded model (5.25's kernels step was such a change)."""

import importlib
import warnings

from . import _config, versions


def select(modeling_utils, version: str):
    """(patch set, None when the release is tested, else why it is patched untested) or (None, why not)."""
    name = versions.class_for(version)
    newer = versions.newer_than_table(version)
    if name is None and not _config.forced() and not newer:
        return None, (f"transformers {version} is older than the supported range {versions.SUPPORTED}; not patched "
                      "(set HF_FSDP_LOADFIX_FORCE=1 to try the newest patch set)")
    patches = importlib.import_module(f".classes.{name or versions.NEWEST}", __package__).PATCHES
    mismatch = patches.mismatch(modeling_utils)
    if mismatch:
        return None, f"transformers {version} does not have the structure of {patches.name}: {mismatch}; not patched"
    if name:
        return patches, None
    return patches, f"newer than {versions.NEWEST_TESTED}" if newer else "HF_FSDP_LOADFIX_FORCE=1"


# the tiny model of the proof: a tied Llama (rotary inv_freq, a non-persistent buffer; a tied head)
TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True)


class Proof:
    """Once per process, at the first FSDP cpu-ram-efficient load of an untested release, on every rank alike (local,
    no collective; it does not depend on the rank, so every rank reaches the same verdict, and the accelerate hooks
    stay the same on all of them): a tiny tied Llama built from a config is saved to a temporary folder and loaded
    through the real ``from_pretrained`` on the non-rank-0 meta path, then ``train()`` and ``eval()`` run on it. It
    must raise nothing, and keep the contract: every state-dict entry on meta with the saved shape and dtype, the
    tie kept, every non-persistent buffer real and equal to the saved model's. About 0.2 s; the global RNG is left
    as it was.

    ``holds()`` is True when it passed. ``on_verdict`` is called once, with None when it passed, else with why (it
    then reverts the package in this process, so the job runs as upstream); with ``HF_FSDP_LOADFIX_STRICT=1`` a
    failure is one error instead, raised at every load."""

    def __init__(self, version: str, on_verdict):
        self.version, self.on_verdict, self.verdict = version, on_verdict, None

    def holds(self) -> bool:
        first = self.verdict is None
        if first:
            self.verdict = self._run()
        if not self.verdict:
            if first:
                self.on_verdict(None)
            return True
        message = (f"hf_fsdp_loadfix: transformers {self.version} is untested (newer than {versions.NEWEST_TESTED}) "
                   f"and the package's meta path fails on it ({self.verdict})")
        if _config.strict():
            raise RuntimeError(f"{message}. HF_FSDP_LOADFIX_STRICT=1 makes this an error; unset it to let the package "
                               "step aside (the job then runs as upstream), set HF_FSDP_LOADFIX=0, or pin a tested "
                               "release (constraints.txt)")
        if first:
            warnings.warn(f"{message}; the package steps aside in this process and the job runs as upstream "
                          "(HF_FSDP_LOADFIX=0 silences this; pin a tested release: constraints.txt)",
                          RuntimeWarning, stacklevel=2)
            self.on_verdict(f"transformers {self.version} failed the proof: {self.verdict}; not patched")
        return False

    def _run(self) -> str:
        """'' when the proof passes, else the failing step and the error's last line."""
        import os
        import tempfile

        import torch
        from safetensors.torch import save_model
        from transformers import LlamaConfig, LlamaForCausalLM
        from transformers.utils import logging

        from . import _runtime

        step, bar = "building the tiny model", logging.is_progress_bar_enabled()
        logging.disable_progress_bar()
        try:
            with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as folder:
                saved = LlamaForCausalLM(LlamaConfig(**TINY))
                # not save_pretrained: under torch.distributed it writes on global rank 0 only, and the verdict must
                # not depend on the rank
                saved.config.to_json_file(os.path.join(folder, "config.json"))
                save_model(saved, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
                step = "from_pretrained on the meta path"
                with _runtime.proving():
                    model = LlamaForCausalLM.from_pretrained(folder)
                    step = "train() and eval() of the loaded model"
                    model.train()
                    model.eval()
                step = "the contract after from_pretrained"
                problems = _contract_problems(model, saved)
                if problems:
                    raise AssertionError("; ".join(problems))
        except Exception as err:  # noqa: BLE001 - any failure of the meta path is the finding
            last = (str(err).strip().splitlines() or [""])[-1]
            return f"{step}: {type(err).__name__}: {last}"[:500]
        finally:
            if bar:
                logging.enable_progress_bar()
        return ""


def _contract_problems(model, saved) -> list[str]:
    import torch

    expected = saved.state_dict()
    problems = [f"{k} is {v.device.type} {v.dtype} {list(v.shape)}, not meta {expected[k].dtype} "
                f"{list(expected[k].shape)}" for k, v in model.state_dict().items()
                if v.device.type != "meta" or k not in expected or (v.dtype, v.shape) != (expected[k].dtype,
                                                                                          expected[k].shape)]
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        problems.append("the tied head is no longer tied")
    mine, theirs = dict(model.named_buffers()), dict(saved.named_buffers())
    for name, buf in theirs.items():
        if name not in model.state_dict() and not (name in mine and mine[name].device.type != "meta"
                                                   and torch.equal(mine[name], buf)):
            problems.append(f"non-persistent buffer {name} is not the saved model's")
    return problems
