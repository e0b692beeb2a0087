"""Beyond the designed path, as training scripts use it: loads by one rank alone, a second model on rank 0,
accelerate's activation checkpointing and torch.compile around a persistent buffer, peft LoRA training."""

import pytest
from launch import require_accelerate_on_cpu, run_ranks


def test_alone_second_model_and_lora_accelerate(checkpoints, tmp_path):
    """One launch per setting: rank 0 alone, then rank 1 alone, loads under the FSDP gate while the other waits in a
    barrier (a collective inside from_pretrained would hang); then every rank loads, adds LoRA, is prepared by
    accelerate and takes 3 SGD steps on one batch; then rank 0 alone loads a second model. Upstream
    (HF_FSDP_LOADFIX=0) runs the same script for the losses."""
    require_accelerate_on_cpu()
    args = ["--ckpt", checkpoints("llama"), "--mode", "accelerate", "--alone", "--second-model", "--lora"]
    runs = {}
    for name, env in (("patched", {}), ("upstream", {"HF_FSDP_LOADFIX": "0"})):
        outputs, runs[name] = run_ranks(args + ["--patch", str(int(name == "patched"))], tmp_path / name, env=env,
                                        timeout=120)
        for rc, text in outputs:
            assert rc == 0, text[-4000:]
    rank0, rank1 = runs["patched"]
    assert rank0["status"]["applied"] and runs["upstream"][1]["status"] is None  # package not imported

    # rank 0 alone, before and after the all-rank load: a plain load, bitwise, every key and non-persistent buffer
    (alone0,) = rank0["alone"]
    for load in (alone0, rank0["second_model"]):
        assert load["load_s"] < 30 and load["devices"] == ["cpu"], load
        assert load["layout_mismatch"] == load["value_mismatch"] == load["buffer_mismatch"] == [], load
    # rank 1 alone: transformers' non-rank-0 load (weights come by broadcast): a plain load's keys, shapes and
    # dtypes on meta, non-persistent buffers equal to the plain load's
    (alone1,) = rank1["alone"]
    assert alone1["load_s"] < 30 and alone1["devices"] == ["meta"], alone1
    assert alone1["layout_mismatch"] == alone1["buffer_mismatch"] == [], alone1

    # LoRA on a base whose non-rank-0 weights were on meta: identical losses on every rank and to upstream, and
    # the steps do train
    losses = rank0["losses"]
    assert len(losses) == 3 and losses[2] < losses[0], losses
    assert rank1["losses"] == losses == runs["upstream"][0]["losses"] == runs["upstream"][1]["losses"]


SETUPS = ["ac", "ac-offload", "compile"]


def _has_setup(setup):
    from accelerate.utils import FullyShardedDataParallelPlugin

    fields = FullyShardedDataParallelPlugin.__dataclass_fields__
    return setup != "ac-offload" or "activation_checkpointing_offload" in fields


@pytest.fixture(scope="module")
def wrapper_runs(checkpoints, tmp_path_factory):
    """Every setup this accelerate has, in one launch (process start-up and imports are most of a launch)."""
    require_accelerate_on_cpu()
    # float32: see test_contract.CASES (transformers >= 5.24 keeps the router gate fp32 in a bf16 load)
    ckpt = checkpoints("deepseek_v3")
    args = [a for setup in SETUPS if _has_setup(setup) for a in ("--case", "deepseek_v3", "float32",
                                                                     f"accelerate+{setup}", ckpt)]
    return run_ranks(args, tmp_path_factory.mktemp("wrappers"), timeout=300)


@pytest.mark.parametrize("setup", SETUPS)
def test_accelerate_fix_under_wrappers(wrapper_runs, setup):
    """DeepSeek-V3's persistent e_score_correction_bias through accelerate's real fsdp2_apply_ac (checkpoint_wrapper,
    with offload_wrapper) or torch.compile, then fsdp2_prepare_model: the wrappers change module names, not
    state-dict keys."""
    if not _has_setup(setup):
        pytest.skip("this accelerate has no activation_checkpointing_offload")
    outputs, results = wrapper_runs
    for rc, text in outputs:
        assert rc == 0, text[-4000:]
    results = [r["cases"][f"deepseek_v3:float32:accelerate+{setup}"] for r in results]
    expected = {"ac": ["CheckpointWrapper"], "ac-offload": ["CheckpointWrapper", "OffloadWrapper"],
                "compile": ["OptimizedModule"]}[setup]
    for r in results:
        assert r["wrappers"] == expected
        assert any(k.endswith("e_score_correction_bias") for k in r["sharded_keys"])
        assert r["checkpoint_keys_compared"] > 0 and r["mismatch_vs_checkpoint"] == [] == r["mismatch_vs_reference"]
        assert r["buffer_mismatch_vs_reference"] == []
        assert not r["logits_nan"] and r["logits_max_diff_vs_reference"] <= 1e-5
    assert results[0]["logits_digest"] == results[1]["logits_digest"]
