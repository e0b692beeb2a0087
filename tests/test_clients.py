"""Real clients on 2 CPU gloo ranks: ``transformers.Trainer`` and ``trl.SFTTrainer`` on a tiny Llama, 3 steps, each run
once with the package and once with ``HF_FSDP_LOADFIX=0`` (upstream): losses per step and the trained full state
bitwise equal, and rank 1 on meta after ``from_pretrained`` with the package. Modes:

- ``launch``: the variables ``accelerate launch`` sets for an FSDP2 config with cpu_ram_efficient_loading, accelerate's
  FSDP2 forced onto CPU (:func:`fsdp2_on_cpu`; on CPU it would run DDP);
- ``ddp``: the same variables, and the DDP that accelerate really runs on CPU;
- ``torchrun``: no variables; only ``TrainingArguments(fsdp=..., fsdp_config={"version": 2,
  "cpu_ram_efficient_loading": True})``, made before ``from_pretrained`` as scripts do; FSDP2 forced onto CPU.

And ``resize_token_embeddings(V + 8)`` (mean_resizing on and off, untied and tied Llama) between ``from_pretrained``
and accelerate's ``fsdp2_prepare_model``: the full state and the logits equal upstream's on both ranks.

One launch per client and package setting runs all its cases (``python test_clients.py --client NAME --case ...``);
a case that fails on any rank is recorded as that rank's error, and the others go on."""

import argparse
import contextlib
import datetime
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MODES = ["launch", "ddp", "torchrun"]
# KIND:mean|plain[:pad][:sharded][:write]: pad_to_multiple_of=64; shard-on-read; the new rows then written through
# .data (LlamaFactory's noisy mean init)
RESIZES = ["llama:mean", "llama:plain", "llama_tied:mean", "llama_tied:plain:pad", "llama:mean:sharded:write",
           "llama_tied:mean:pad:sharded", "llama:plain:sharded"]
LAUNCH_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true",
              "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
              "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT"}  # what accelerate launch sets for such a config
TRAINER_FSDP = {"fsdp": "full_shard auto_wrap", "fsdp_config": {
    "version": 2, "cpu_ram_efficient_loading": True, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}


# ---- one rank (run as a script by the fixtures below)


@contextlib.contextmanager
def fsdp2_on_cpu(force: bool):
    """Every ``Accelerator`` made inside runs accelerate's FSDP2 on CPU (with the plugin it was given, or the one the
    FSDP variables describe), as it would on GPUs."""
    import accelerate
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    init = accelerate.Accelerator.__init__

    def forced(self, *args, **kwargs):
        init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()
        if self.state.mixed_precision != "no":
            plugin.set_mixed_precision(self.state.mixed_precision)
        self.state.distributed_type, self.state.fsdp_plugin = DistributedType.FSDP, plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # else a later AcceleratorState resets it

    accelerate.Accelerator.__init__ = forced if force else init
    try:
        yield
    finally:
        accelerate.Accelerator.__init__ = init


def tokenizer(vocab: int):
    """A word-level tokenizer built here (``t0`` ... ``t<vocab-1>``, specials at 0-3): SFTTrainer needs one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>"])}
    words.update({f"t{i}": i for i in range(len(words), vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def rows(vocab: int, n: int = 16):
    return [[4 + (7 * i + 3 * j) % (vocab - 4) for j in range(8)] for i in range(n)]


def train_case(client, mode, ckpt, out, step):
    """``step(phase, fn)`` runs one phase on every rank and stops the case on all of them where any rank failed."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    import hf_fsdp_loadfix._worker as helpers

    common = dict(output_dir=out, use_cpu=True, max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                  logging_steps=1, report_to="none", save_strategy="no", seed=0, disable_tqdm=True,
                  **(TRAINER_FSDP if mode == "torchrun" else {}))
    if client == "sft":
        from trl import SFTConfig as Args
    elif client == "dpo":
        from trl import DPOConfig as Args
    else:
        Args = TrainingArguments
    args = step("args", lambda: Args(**common))  # inits the process group; torchrun: sets the one FSDP variable
    model = step("load", lambda: AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32))
    found = {"devices": sorted({t.device.type for t in model.state_dict().values()})}
    vocab = model.config.vocab_size
    if client == "sft":
        from datasets import Dataset
        from trl import SFTTrainer

        data = Dataset.from_dict({"input_ids": rows(vocab)})
        trainer = step("trainer", lambda: SFTTrainer(model=model, args=args, train_dataset=data,
                                                     processing_class=tokenizer(vocab)))
    elif client == "dpo":  # its reference model is loaded inside, after the Accelerator set the FSDP variables
        from datasets import Dataset
        from trl import DPOTrainer

        text = [" ".join(f"t{t}" for t in r) for r in rows(vocab)]
        data = Dataset.from_dict({"prompt": [t[:11] for t in text], "chosen": [t[11:] for t in text],
                                  "rejected": [t[11:][::-1].strip() for t in text]})
        trainer = step("trainer", lambda: DPOTrainer(model=model, args=args, train_dataset=data,
                                                     processing_class=tokenizer(vocab)))
    else:
        data = [{"input_ids": r, "labels": r, "attention_mask": [1] * len(r)} for r in rows(vocab)]
        trainer = step("trainer", lambda: Trainer(model=model, args=args, train_dataset=data))
    found["distributed_type"] = trainer.accelerator.distributed_type.name
    losses, training_step = [], trainer.training_step

    def recorded(*a, **kw):
        loss = training_step(*a, **kw)
        losses.append(loss.item())
        return loss

    trainer.training_step = recorded
    step("train", trainer.train)
    full = step("state", lambda: helpers.full_state(trainer.model))
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    saved = os.path.join(out, "saved")
    step("save", lambda: trainer.save_model(saved))  # rank 0 writes the trained model; then every rank reads it
    step("read", lambda: torch.distributed.barrier())
    found["saved"] = step("read", lambda: saved_digests(saved))
    return {**found, "losses": losses, "grad_norms": norms, "state": {k: helpers.digest(v) for k, v in full.items()}}


def saved_digests(folder):
    """The tensors of the safetensors files ``save_model`` wrote, digested by key."""
    import glob

    from safetensors.torch import load_file

    import hf_fsdp_loadfix._worker as helpers

    return {k: helpers.digest(v) for f in sorted(glob.glob(os.path.join(folder, "*.safetensors")))
            for k, v in load_file(f).items()}


def resize_case(kind, flags, ckpt, step):
    import torch
    from transformers import AutoModelForCausalLM

    import hf_fsdp_loadfix._worker as helpers

    os.environ.update(LAUNCH_ENV)
    if "sharded" in flags:
        os.environ["HF_FSDP_LOADFIX_SOURCE"] = "sharded"
    model = step("load", lambda: AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32))
    found = {"devices": sorted({t.device.type for t in model.state_dict().values()})}
    torch.manual_seed(0)  # the new rows: rank 0's are broadcast
    step("resize", lambda: model.resize_token_embeddings(model.config.vocab_size + 8, mean_resizing="mean" in flags,
                                                         pad_to_multiple_of=64 if "pad" in flags else None))
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight

    def write_new_rows():  # LlamaFactory's noisy mean init: the old rows' mean plus noise, written through .data
        noise = torch.empty_like(emb.data[-8:]).normal_(mean=0, std=emb.shape[1] ** -0.5)
        emb.data[-8:] = emb.data[:-8].mean(dim=0, keepdim=True) + noise

    if "write" in flags:
        step("write", write_new_rows)
    found["after_resize"] = [emb.device.type, list(emb.shape), str(emb.dtype), emb is head]
    rank = torch.distributed.get_rank()
    sharded = step("prepare", lambda: helpers.shard_accelerate(model, rank))
    full = step("state", lambda: helpers.full_state(sharded))
    logits = step("forward", lambda: helpers.forward(sharded))
    return {**found, "state": {k: helpers.digest(v) for k, v in full.items()}, "logits": helpers.digest(logits),
            "tied": sharded.get_input_embeddings().weight is sharded.get_output_embeddings().weight}


def peft_case(kind, ckpt, step):
    """peft between from_pretrained and prepare: ``pissa``, a LoRA initialised from the base weights; ``tokens``,
    ``trainable_token_indices`` (rows of the embedding copied into a non-persistent buffer), then accelerate's
    fsdp2_prepare_model, the full state and the logits."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import hf_fsdp_loadfix._worker as helpers

    os.environ.update(LAUNCH_ENV)
    model = step("load", lambda: AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32))
    config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa") if kind == "pissa" else \
        LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=[5, 6])
    torch.manual_seed(0)  # LoRA's random init: rank 0's is broadcast
    peft_model = step("peft", lambda: get_peft_model(model, config))
    found = {"adapters": sorted(k for k in peft_model.state_dict() if "lora_" in k or "trainable_tokens" in k)}
    if kind == "pissa":
        return found
    sharded = step("prepare", lambda: helpers.shard_accelerate(peft_model, torch.distributed.get_rank()))
    full = step("state", lambda: helpers.full_state(sharded))
    buffers = {k: helpers.digest(b) for k, b in sharded.named_buffers() if "trainable_tokens_original" in k}
    logits = step("forward", lambda: helpers.forward(sharded))
    return {**found, "state": {k: helpers.digest(v) for k, v in full.items()}, "buffers": buffers,
            "logits": helpers.digest(logits)}


class CaseFailed(Exception):
    pass


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--client", required=True, choices=["trainer", "sft", "dpo"])
    p.add_argument("--case", action="append", required=True, help="a mode, or resize:KIND:mean|plain")
    p.add_argument("--ckpt", action="append", required=True, help="KIND=DIR")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, ckpts = dist.get_rank(), dict(c.split("=", 1) for c in args.ckpt)
    import hf_fsdp_loadfix
    import hf_fsdp_loadfix._worker as helpers

    results = {"rank": rank, "cases": {}}
    for case in args.case:
        print(f"== case {case}", flush=True)

        def step(phase, fn):
            try:
                value, error = fn(), None
            except Exception as err:  # noqa: BLE001 - recorded, the case stops on every rank
                value, error = None, f"{phase}: {type(err).__name__}: {err}"
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, error)
            if any(everyone):
                raise CaseFailed({r: e for r, e in enumerate(everyone) if e})
            return value

        saved = dict(os.environ)
        try:
            with fsdp2_on_cpu(case in ("launch", "torchrun")):
                if case.startswith("peft:"):
                    found = peft_case(case.split(":")[1], ckpts["llama"], step)
                elif case.startswith("resize:"):
                    _, kind, *flags = case.split(":")
                    found = resize_case(kind, flags, ckpts[kind], step)
                else:
                    if case != "torchrun":
                        os.environ.update(LAUNCH_ENV)
                    found = train_case(args.client, case, ckpts["llama"], os.path.join(args.out, case), step)
        except CaseFailed as failed:
            found = {"errors": failed.args[0]}
        finally:
            os.environ.clear()
            os.environ.update(saved)
        results["cases"][case] = found
    results["applied"] = hf_fsdp_loadfix.status()["applied"]  # transformers is imported by now
    helpers.finish(results, args.out)


# ---- the tests


def _runs(client, cases, checkpoints, tmp_path_factory):
    """{"on": [rank0, rank1], "off": [...]}: one launch each, with the package and with HF_FSDP_LOADFIX=0."""
    from launch import launch, require_accelerate_on_cpu

    require_accelerate_on_cpu()
    ckpts = [a for kind in ("llama", "llama_tied") for a in ("--ckpt", f"{kind}={checkpoints(kind)}")]
    found = {}
    for name, flag in (("on", "1"), ("off", "0")):
        argv = [os.path.abspath(__file__), "--client", client, *[a for c in cases for a in ("--case", c)], *ckpts]
        outputs, results = launch(argv, tmp_path_factory.mktemp(f"{client}_{name}"), env={"HF_FSDP_LOADFIX": flag},
                                  timeout=600)
        for rc, text in outputs:
            assert rc == 0, text[-4000:]
        assert [r["applied"] for r in results] == [flag == "1"] * 2
        found[name] = [r["cases"] for r in results]
    return found


@pytest.fixture(scope="module")
def trainer_runs(checkpoints, tmp_path_factory):
    return _runs("trainer", MODES + [f"resize:{r}" for r in RESIZES] + ["peft:pissa", "peft:tokens"],
                 checkpoints, tmp_path_factory)


@pytest.fixture(scope="module")
def sft_runs(checkpoints, tmp_path_factory):
    pytest.importorskip("trl")
    return _runs("sft", MODES, checkpoints, tmp_path_factory)


@pytest.fixture(scope="module")
def dpo_runs(checkpoints, tmp_path_factory):
    pytest.importorskip("trl")
    return _runs("dpo", ["launch", "ddp"], checkpoints, tmp_path_factory)


def _trains_as_upstream(runs, mode):
    import transformers
    from packaging.version import Version

    if mode == "torchrun" and Version(transformers.__version__).major < 5:
        pytest.skip("4.x TrainingArguments sets ACCELERATE_USE_FSDP itself but never FSDP_VERSION: it asks for FSDP1, "
                    "which refuses CPU tensors (the launch mode covers 4.x)")
    on, off = ([r[mode] for r in runs[name]] for name in ("on", "off"))
    assert all("errors" not in r for r in off), [r.get("errors") for r in off]  # upstream trains
    assert all("errors" not in r for r in on), [r.get("errors") for r in on]
    assert [r["devices"] for r in off] == [["cpu"], ["cpu"]]
    assert [r["devices"] for r in on] == [["cpu"], ["meta"]]
    want = "MULTI_CPU" if mode == "ddp" else "FSDP"
    assert [r["distributed_type"] for r in on + off] == [want] * 4
    for rank in (0, 1):
        assert len(off[rank]["losses"]) == 3
        assert on[rank]["losses"] == off[rank]["losses"], (rank, on[rank]["losses"], off[rank]["losses"])
        assert on[rank]["grad_norms"] == off[rank]["grad_norms"] == off[0]["grad_norms"]
        assert on[rank]["state"] == off[rank]["state"] == off[0]["state"]
        # the trained model as save_model wrote it: upstream's file, the trained state
        saved = on[rank]["saved"]
        assert saved and saved == off[rank]["saved"] and all(off[0]["state"][k] == v for k, v in saved.items())


@pytest.mark.parametrize("mode", MODES)
def test_trainer_trains_as_upstream(trainer_runs, mode):
    """transformers.Trainer, 3 AdamW steps: each rank's losses and grad norms, and the trained full state (equal on
    both ranks), bitwise upstream's; rank 1 on meta after from_pretrained with the package, on cpu without."""
    _trains_as_upstream(trainer_runs, mode)


@pytest.mark.parametrize("mode", MODES)
def test_sft_trainer_trains_as_upstream(sft_runs, mode):
    """trl.SFTTrainer (its defaults: bf16, gradient checkpointing) on a pre-tokenized dataset, as for the Trainer."""
    _trains_as_upstream(sft_runs, mode)


@pytest.mark.parametrize("mode", ["launch", "ddp"])
def test_dpo_trainer_with_its_reference_model_trains_as_upstream(dpo_runs, mode):
    """trl.DPOTrainer loads its reference model itself, after the Accelerator set the FSDP variables (rank 1 on meta
    even under plain torchrun), and shards it with trl's own prepare_fsdp (a plain fully_shard, no broadcast) or
    prepares it with accelerate (DDP): filled from rank 0 there, it trains as upstream. On 4.x upstream itself trains on
    garbage there (rank 1's reference model is uninitialised memory, and trl broadcasts nothing: NaN losses); with the
    package it trains on rank 0's reference model."""
    import math

    import transformers
    from packaging.version import Version

    on, off = ([r[mode] for r in dpo_runs[name]] for name in ("on", "off"))
    if Version(transformers.__version__).major >= 5:
        return _trains_as_upstream(dpo_runs, mode)
    assert any(math.isnan(x) for r in off for x in r["losses"]), off  # upstream 4.x: broken
    assert all("errors" not in r for r in on) and [r["devices"] for r in on] == [["cpu"], ["meta"]]
    assert all(math.isfinite(x) for r in on for x in r["losses"] + r["grad_norms"])
    assert on[1]["grad_norms"] == on[0]["grad_norms"] and on[1]["state"] == on[0]["state"]


@pytest.mark.parametrize("case", RESIZES)
def test_resize_token_embeddings_between_load_and_prepare(trainer_runs, case):
    """Rank 0 resizes for real (its new rows broadcast), rank 1 on meta: the new shape and dtype, ties kept; after
    accelerate's fsdp2_prepare_model the full state and the logits are upstream's on both ranks. Under shard-on-read
    rank 0 reads the old embedding from the files first; writes to the new rows after the resize are kept."""
    from launch import require_accelerate_on_cpu

    require_accelerate_on_cpu(case.split(":")[0])
    on, off = ([r[f"resize:{case}"] for r in trainer_runs[name]] for name in ("on", "off"))
    assert all("errors" not in r for r in off), [r.get("errors") for r in off]
    assert all("errors" not in r for r in on), [r.get("errors") for r in on]
    assert on[1]["devices"] == ["meta"] and on[1]["after_resize"][0] == "meta"
    assert on[1]["after_resize"][1:] == off[1]["after_resize"][1:] == off[0]["after_resize"][1:]
    for rank in (0, 1):
        assert on[rank]["state"] == off[rank]["state"] == off[0]["state"]
        assert on[rank]["logits"] == off[rank]["logits"] == off[0]["logits"]
        assert on[rank]["tied"] is off[rank]["tied"] is case.startswith("llama_tied")


def test_peft_init_from_base_weights_is_one_clear_error_on_every_rank(trainer_runs):
    """init_lora_weights='pissa' before prepare: upstream (every rank holds the weights) initialises it; with the
    package only rank 0 does, so every rank raises the same error naming the step and the fix."""
    pytest.importorskip("peft")
    on, off = ([r["peft:pissa"] for r in trainer_runs[name]] for name in ("on", "off"))
    assert all("errors" not in r and r["adapters"] for r in off), off
    for r in on:
        errors = r["errors"]
        assert sorted(errors) == ["0", "1"], errors
        assert all("init_lora_weights='pissa'" in e and "FSDP_CPU_RAM_EFFICIENT_LOADING=false" in e
                   for e in errors.values()), errors


def test_peft_trainable_tokens_before_prepare_as_upstream(trainer_runs):
    """peft's trainable_token_indices copies embedding rows into a non-persistent buffer, meta off rank 0 with the
    package: rank 0's, broadcast before accelerate's prepare. Full state, that buffer and the logits upstream's (on 4.x,
    where upstream's rank 1 copies uninitialised memory, rank 0's)."""
    import transformers
    from packaging.version import Version

    pytest.importorskip("peft")
    on, off = ([r["peft:tokens"] for r in trainer_runs[name]] for name in ("on", "off"))
    assert all("errors" not in r for r in off + on), [r.get("errors") for r in off + on]
    if Version(transformers.__version__).major < 5:  # upstream 4.x: rank 1's rows are uninitialised memory there
        off = [off[0], off[0]]
    for rank in (0, 1):
        assert on[rank]["buffers"] and on[rank]["buffers"] == off[rank]["buffers"] == off[0]["buffers"]
        assert on[rank]["state"] == off[rank]["state"] == off[0]["state"]
        assert on[rank]["logits"] == off[rank]["logits"] == off[0]["logits"]


if __name__ == "__main__":
    main()
