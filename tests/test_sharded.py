"""Shard-on-read (HF_FSDP_LOADFIX_SOURCE=sharded) on 2 gloo ranks: every rank, rank 0 included, loads on meta and reads
only its own slices of the checkpoint at accelerate's load. Each case runs accelerate's fsdp2_prepare_model twice in
one process (tests/worker.py --stream-case), with SOURCE=local (the default path: rank 0 loads and broadcasts) and
SOURCE=sharded, then one SGD step; every local shard, buffer, dtype, requires_grad, the loss and the shards after the
step must be bitwise equal. (Loads shard-on-read leaves to the default path are tests/test_cli.py's.)"""

import os

import pytest
from launch import require_accelerate_on_cpu, run_ranks
from test_offpath import OFFPATH, two_nodes

from hf_fsdp_loadfix._worker import launch

# name -> (checkpoint kind, build options); tests/worker.py STREAM_CASES says what each name changes
CASES = {
    "ac": ("uneven", {"vocab": 131}),  # activation checkpointing, an uneven shard
    "tied": ("llama_tied", {}),
    "keep_fp32": ("keep_fp32", {}),
    "frozen": ("llama", {}),
    "offload": ("llama", {}),  # cpu_offload
    "nomp": ("llama_sharded", {}),  # several safetensors files, no mixed precision
    "fp32": ("llama", {}),  # a cast at load (bf16 checkpoint, fp32 model)
    "persistent_buffer": ("deepseek_v3", {}),  # DeepSeek-V3: a persistent plain buffer, MoE
    "moe": ("mixtral", {}),  # per-expert checkpoint keys (5.x fuses them at load)
    "vlm": ("llava", {}),  # renamed keys (4.x key_mapping, 5.x WeightRenaming): read sliced under their new names
    "qkv": ("llama_qkv", {}),  # 5.x: q, k, v split from one fused key (Chunk on the sharded dim: not slice-safe)
    "lora": ("llama", {}),  # peft LoRA added after loading: rank 0 keeps peft's values, the fill broadcasts them
    "new_head": ("llama_base", {}),  # a LlamaModel checkpoint loaded as a causal LM: lm_head is missing
}


def _converted_at_load(kind):
    """What 5.x converts at load, as shard-on-read reads it through the release's own loader: per-expert keys fused
    on the expert dim ("sliced": each rank reads only its experts, where the release's loader can), or the fused qkv
    key split on the sharded dim ("whole": each rank reads it whole and keeps its slice). None: nothing converted."""
    import inspect

    import transformers

    if not transformers.__version__.startswith("5.") or kind not in ("deepseek_v3", "mixtral", "llama_qkv"):
        return None
    if kind == "llama_qkv":
        return "whole"
    try:
        from transformers.distributed.sharding_utils import DtensorShardOperation
    except ImportError:
        return "whole"
    return "sliced" if "tensor_idx" in inspect.signature(DtensorShardOperation.shard_tensor).parameters else "whole"


def _checkpoint_bytes(ckpt) -> int:
    from safetensors import safe_open

    sizes = {"BF16": 2, "F16": 2, "F32": 4}
    total = 0
    for f in os.listdir(ckpt):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(ckpt, f), "pt") as st:
                for k in st.keys():
                    s = st.get_slice(k)
                    n = 1
                    for d in s.get_shape():
                        n *= d
                    total += n * sizes[s.get_dtype()]
    return total


def _require(name) -> None:
    """Skip where accelerate itself cannot run the case, whatever the source: tied embeddings on accelerate <= 1.14
    with torch >= 2.13 (accelerate#4171); mixed parameter dtypes under mixed precision before accelerate 1.14 upcasts
    them ("FSDP expects uniform original parameter dtype")."""
    import accelerate
    from packaging.version import Version

    require_accelerate_on_cpu(CASES[name][0])
    if name == "qkv" and not __import__("transformers").__version__.startswith("5."):
        pytest.skip("a fused qkv key loads through 5.x's weight conversions")
    if name in ("keep_fp32", "frozen") and Version(accelerate.__version__) < Version("1.14"):
        pytest.skip(f"accelerate {accelerate.__version__}: FSDP expects uniform original parameter dtype under bf16 "
                    "mixed precision")


def _can_run(name) -> bool:
    try:
        _require(name)
        return True
    except pytest.skip.Exception:
        return False


@pytest.fixture(scope="module")
def runs(checkpoints, tmp_path_factory):
    require_accelerate_on_cpu()
    ckpts = {name: checkpoints(kind, **opts) for name, (kind, opts) in CASES.items() if _can_run(name)}
    load = {"uneven": "llama", "llama_sharded": "llama"}  # the class each checkpoint kind loads as
    args = [a for name in ckpts for a in ("--stream-case", name, load.get(CASES[name][0], CASES[name][0]), ckpts[name])]
    outputs, results = run_ranks(args + ["--vary", "HF_FSDP_LOADFIX_SOURCE", "--stream", "local,sharded"],
                                 tmp_path_factory.mktemp("sharded"), timeout=400)
    for rc, text in outputs:
        assert rc == 0, text[-4000:]
    return ckpts, [r["cases"] for r in results]


@pytest.mark.parametrize("name", list(CASES))
def test_accelerate_shard_on_read_is_bitwise_the_default_path(runs, name):
    ckpts, results = runs
    if name not in ckpts:
        _require(name)  # skips, naming why
    kind = CASES[name][0]
    converted = _converted_at_load(kind)
    read = []
    for rank, cases in enumerate(results):
        default, sharded = cases[name]["local"], cases[name]["sharded"]
        assert sharded["shards"] == default["shards"], name
        assert sharded["buffers"] == default["buffers"], name
        assert sharded["loss"] == default["loss"] and sharded["after_step"] == default["after_step"], name
        if "mismatch_vs_checkpoint" in sharded:
            assert sharded["mismatch_vs_checkpoint"] == []
            # by name: a base-model checkpoint lacks the prefix, and Llava is saved under its legacy names
            assert sharded["checkpoint_keys_compared"] > 0 or kind in ("llama_base", "llava")
        info = sharded["shard_on_read"]
        # rank 0 too: every entry on meta after from_pretrained, only its slices read
        assert sharded["devices_after_load"] == ["meta"] and default["devices_after_load"] == (
            ["cpu"] if rank == 0 else ["meta"])
        # nothing broadcast but the keys the checkpoint lacks: the new head (rank 0 initialised it as upstream does)
        # and the LoRA adapters (peft made them on rank 0 as on the default path)
        assert sharded["bytes_broadcast"] == info["bytes_broadcast"] < default["bytes_broadcast"]
        assert (info["bytes_broadcast"] > 0) == (info["keys_from_rank0"] > 0) == (name in ("new_head", "lora")), info
        # read whole: DeepSeek-V3's persistent buffer, and the keys the release converts at load, unless sliced
        assert info["keys_sliced"] > 0 and (info["keys_converted"] > 0) == bool(converted), info
        assert info["keys_whole"] == (kind == "deepseek_v3") + (info["keys_converted"] if converted == "whole"
                                                                 else 0), info
        read.append(info["bytes_read"])
    total = _checkpoint_bytes(ckpts[name])
    if converted == "whole" or kind == "deepseek_v3":  # each rank its own slices, and the keys read whole
        assert all(total / len(read) < r < total for r in read) and sum(read) > total, (read, total)
    else:  # each rank its own slices: together the checkpoint once
        assert all(r <= 0.55 * total for r in read) and sum(read) == total, (read, total)


def test_public_fill_shards_on_torch_native_fully_shard(checkpoints, tmp_path):
    """fsdp_loading() around from_pretrained with no FSDP variables set (and none left after it), fully_shard per
    decoder layer and on the root, fill_shards(): rank 0's parameters on meta after loading too, every gathered key
    equal to the checkpoint, logits equal on both ranks and to a plain load's."""
    outputs, results = launch([OFFPATH, *[a for kind in ("llama", "llama_tied")
                                          for a in ("--scenario", "fill", kind, checkpoints(kind))]], tmp_path,
                              timeout=200)
    for rc, text in outputs:
        assert rc == 0, text[-4000:]
    for kind in ("llama", "llama_tied"):
        got = [r["scenarios"][f"fill:{kind}"] for r in results]
        for r in got:
            assert r["devices_after_load"] == ["meta"] and r["variables_after"] == []
            # LoRA added after the block: no rank kept its values, every rank raises naming them and the fix
            assert r["lora_error"].startswith("hf_fsdp_loadfix: shard-on-read cannot fill 8 entries") and \
                "lora_A" in r["lora_error"] and "HF_FSDP_LOADFIX_SOURCE=local" in r["lora_error"], r["lora_error"]
            assert r["checkpoint_keys_compared"] > 0 and r["mismatch_vs_checkpoint"] == []
            assert r["logits"] == r["logits_plain"] == got[0]["logits"]
            assert r["shard_on_read"]["keys_sliced"] > 0


@pytest.fixture(scope="module")
def nodes(checkpoints, tmp_path_factory):
    """One launch on 2 simulated nodes of 2 ranks (one FSDP2 mesh of 4): the public fill_shards on Llama, and
    accelerate's fsdp2_prepare_model both ways on Llama and (where accelerate runs on CPU) Mixtral."""
    kinds = {"fill": ["llama"], "accelerate": [k for k, case in (("llama", "fp32"), ("mixtral", "moe"))
                                               if _can_run(case)]}
    ckpts = {kind: checkpoints(kind) for kind in ("llama", "mixtral")}
    args = [a for name, ks in kinds.items() for kind in ks for a in ("--scenario", name, kind, ckpts[kind])]
    return ckpts, two_nodes([OFFPATH, *args], tmp_path_factory.mktemp("nodes"))


def test_public_fill_shards_on_two_simulated_nodes(nodes):
    """Every rank of both nodes (each node's local rank 0 included) on meta after loading, its own quarter read,
    every gathered key equal to the checkpoint, logits equal to a plain load's."""
    ckpts, found = nodes
    results = [r["fill:llama"] for r in found]
    for r in results:
        assert r["devices_after_load"] == ["meta"] and r["mismatch_vs_checkpoint"] == []
        assert r["logits"] == r["logits_plain"] == results[0]["logits"]
    assert sum(r["shard_on_read"]["bytes_read"] for r in results) == _checkpoint_bytes(ckpts["llama"])


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_accelerate_shard_on_read_on_two_simulated_nodes(nodes, kind):
    """accelerate's fsdp2_prepare_model over 2 nodes of 2 ranks: with shard-on-read every rank of both nodes on meta
    after loading, nothing broadcast, the bytes read summing to the checkpoint (Mixtral on 5.23+: each rank's one
    expert of four, through transformers' loader); every local shard and the logits bitwise the default path's
    (each node's local rank 0 loads, global rank 0 broadcasts), every gathered key equal to the checkpoint."""
    ckpts, found = nodes
    if f"accelerate:{kind}" not in found[0]:
        _require("moe" if kind == "mixtral" else "fp32")  # skips, naming why
    results = [r[f"accelerate:{kind}"] for r in found]
    assert [r["local"]["devices_after_load"] for r in results] == [["cpu"], ["meta"], ["cpu"], ["meta"]]
    read = []
    for r in results:
        default, sharded = r["local"], r["sharded"]
        assert sharded["devices_after_load"] == ["meta"] and sharded["bytes_broadcast"] == 0
        assert sharded["shards"] == default["shards"] and sharded["logits"] == default["logits"]
        assert sharded["mismatch_vs_checkpoint"] == [] and sharded["checkpoint_keys_compared"] > 0
        read.append(sharded["shard_on_read"]["bytes_read"])
    total = _checkpoint_bytes(ckpts[kind])
    if _converted_at_load(kind) == "whole":  # the experts read whole by every rank
        assert sum(read) > total, (read, total)
    else:
        assert sum(read) == total, (read, total)
