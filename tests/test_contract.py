"""The non-rank-0 contract, end to end: 2 gloo ranks, real transformers, real accelerate / native FSDP2."""

import pytest
import transformers
from launch import require_accelerate_on_cpu, run_ranks
from packaging.version import Version

from hf_fsdp_loadfix import versions

# Each kind loaded as the checkpoint's dtype (bf16) and cast to fp32, sharded through accelerate's real
# fsdp2_prepare_model (persistent plain buffers of root_buffer/deepseek_v3 need the package's accelerate fix) and
# through native fully_shard + set_model_state_dict(broadcast_from_rank0=True). T5 ties whole modules
# (shared/encoder/decoder embeddings), which neither accelerate's wrap policy nor set_model_state_dict on
# torch 2.13 can shard: it is checked up to the end of from_pretrained.
# DeepSeek-V3 as float32 in both modes: from transformers 5.24 its router gate.weight stays fp32 in a bf16 load
# (_keep_in_fp32_modules_strict), and FSDP2 without mixed precision refuses two dtypes in one group, upstream too
CASES = [
    (kind, dtype, "load" if kind == "t5" else mode)
    for kind in ["llama", "llama_tied", "root_buffer", "t5", "mixtral", "llava"]
    for dtype, mode in [("auto", "accelerate"), ("float32", "native")]
] + [("deepseek_v3", "float32", "accelerate"), ("deepseek_v3", "float32", "native"),
     ("llama_sharded", "float32", "accelerate"), ("llama_bin", "auto", "native")]

FP16_T5 = ("t5", "float16", "load")  # in the native group's launch: test_keep_in_fp32_modules_match_rank0


def _runs_on_cpu(kind, mode):
    try:
        if mode == "accelerate":
            require_accelerate_on_cpu(kind)
    except pytest.skip.Exception:
        return False
    return True


@pytest.fixture(scope="module")
def grouped_runs(checkpoints, tmp_path_factory):
    """The CASES in 2 launches (process start-up and imports are most of a launch): the accelerate cases and the
    others, each launch run the first time one of its cases is asked for; the rank outputs and per-rank results."""
    runs = {}

    def get(accelerate):
        if accelerate not in runs:
            cases = [c for c in CASES if (c[2] == "accelerate") == accelerate and _runs_on_cpu(c[0], c[2])]
            cases += [] if accelerate else [FP16_T5]
            args = [a for kind, dtype, mode in cases for a in ("--case", kind, dtype, mode, checkpoints(kind))]
            runs[accelerate] = run_ranks(args, tmp_path_factory.mktemp("contract"), timeout=600)
        return runs[accelerate]

    return get


@pytest.mark.parametrize("kind,dtype,mode", CASES)
def test_non_rank0_contract(grouped_runs, kind, dtype, mode):
    if mode == "accelerate":
        require_accelerate_on_cpu(kind)
    outputs, results = grouped_runs(mode == "accelerate")
    for rc, text in outputs:
        assert rc == 0, text[-4000:]
    rank0, rank1 = (r["cases"][f"{kind}:{dtype}:{mode}"] for r in results)
    assert_contract(rank0, rank1, kind, dtype, mode)


NEWEST_FITS = Version(transformers.__version__) >= Version("5.25")  # the newest class's structure (C7's kernels step)


@pytest.mark.skipif(not NEWEST_FITS, reason="C7's structure does not fit: the relabelled release is refused "
                                            "(tests/test_gate.py)")
def test_next_minor_release_patched_after_its_proof(checkpoints, tmp_path):
    """The newest tested release labelled as the next minor: patched without FORCE, one warning per rank, proven at
    the first load on every rank, and the contract holds (root-owned non-persistent buffer, persistent plain buffer,
    accelerate's FSDP2 broadcast)."""
    require_accelerate_on_cpu("root_buffer")
    outputs, (rank0, rank1) = run_ranks(["--ckpt", checkpoints("root_buffer"), "--kind", "root_buffer",
                                         "--mode", "accelerate", "--relabel", versions.FIRST_UNTESTED], tmp_path)
    for rc, text in outputs:
        assert rc == 0, text[-4000:]
        assert text.count(f"transformers {versions.FIRST_UNTESTED} is untested") == 1, text[-4000:]
    for r in (rank0, rank1):
        assert r["transformers"] == versions.FIRST_UNTESTED
        assert r["status"]["case"] == (f"untested (newer than {versions.NEWEST_TESTED}), structure matches "
                                       f"{versions.NEWEST.upper()}; proven in this process")
    assert_contract(rank0, rank1, "root_buffer", "auto", "accelerate")


@pytest.mark.skipif(not NEWEST_FITS, reason="C7's structure does not fit: the relabelled release is refused")
@pytest.mark.parametrize("strict", [False, True])
def test_next_minor_release_failing_its_proof_runs_as_upstream(checkpoints, tmp_path, strict):
    """The next minor whose from_pretrained ends with a step that needs real weights (the shape of 5.25's kernels
    step): the proof fails on every rank; the package steps aside with one warning naming the release and the step,
    and the job is upstream's (rank 1 on cpu, keys and logits after accelerate's broadcast as upstream's).
    HF_FSDP_LOADFIX_STRICT=1: one error on every rank instead."""
    require_accelerate_on_cpu("root_buffer")
    outputs, results = run_ranks(["--ckpt", checkpoints("llama"), "--mode", "accelerate", "--break-tail",
                                  "--relabel", versions.FIRST_UNTESTED], tmp_path,
                                 env={"HF_FSDP_LOADFIX_STRICT": "1" if strict else "0"})
    step = "from_pretrained on the meta path: RuntimeError"
    for rc, text in outputs:
        if strict:
            assert rc != 0 and "HF_FSDP_LOADFIX_STRICT=1 makes this an error" in text and step in text, text[-4000:]
            continue
        assert rc == 0, text[-4000:]
        assert text.count("the package steps aside in this process") == 1 and step in text, text[-4000:]
    if strict:
        return
    rank0, rank1 = results
    for r in results:
        assert not r["status"]["applied"] and "failed the proof" in r["status"]["case"], r["status"]
    assert {v["device"] for v in rank1["state"].values()} == {"cpu"}  # upstream: every rank loads
    for r in results:  # after accelerate's own broadcast: every key equals the checkpoint, logits equal
        assert r["checkpoint_keys_compared"] > 0 and r["mismatch_vs_checkpoint"] == r["mismatch_vs_reference"] == []
    assert rank0["logits_digest"] == rank1["logits_digest"]


def assert_contract(rank0, rank1, kind, dtype, mode):
    assert rank0["status"]["applied"] and rank1["status"]["applied"], rank1["status"]

    # 1. every state-dict entry on meta with exactly rank 0's shape and dtype; rank 0 real
    assert rank1["state"].keys() == rank0["state"].keys()
    for key, ref in rank0["state"].items():
        got = rank1["state"][key]
        assert ref["device"] == "cpu", key
        assert (got["device"], got["shape"], got["dtype"]) == ("meta", ref["shape"], ref["dtype"]), key
    if dtype == "float32":
        assert {v["dtype"] for v in rank0["state"].values()} - {"torch.int64"} >= {"torch.float32"}

    # 3. non-persistent buffers real on CPU, same dtype and bytes as rank 0
    assert rank1["non_persistent"].keys() == rank0["non_persistent"].keys()
    for key, ref in rank0["non_persistent"].items():
        assert rank1["non_persistent"][key] == ref, key

    # 4. tying as on rank 0; 5. the loading report does not call the state dict missing; 6. kernelized as rank 0
    assert rank1["tied"] == rank0["tied"] == (kind in ("llama_tied", "t5"))
    assert rank1["kernels"] == rank0["kernels"]
    if Version(transformers.__version__) >= Version("5.25"):  # the kernels step ran on every rank, on by default
        assert rank0["kernels"]["used"] is True
    assert rank1["missing_keys"] == rank0["missing_keys"]

    if mode == "load":
        return
    # after the FSDP2 broadcast: every key equals the checkpoint bitwise on every rank, logits equal, no NaN
    for r in (rank0, rank1):
        assert r["checkpoint_keys_compared"] > 0 or kind == "llava"  # llava's checkpoint keys are renamed at load
        assert r["mismatch_vs_checkpoint"] == [] and r["mismatch_vs_reference"] == []
        assert r["buffer_mismatch_vs_reference"] == []
        assert r["tied_after_shard"] == rank0["tied"]
        assert not r["logits_nan"] and r["logits_max_diff_vs_reference"] <= 1e-5
    assert rank0["logits_digest"] == rank1["logits_digest"]


def test_keep_in_fp32_modules_match_rank0(grouped_runs):
    outputs, results = grouped_runs(False)
    for rc, text in outputs:
        assert rc == 0, text[-4000:]
    rank0, rank1 = (r["cases"][":".join(FP16_T5)] for r in results)
    fp32 = {k for k, v in rank0["state"].items() if v["dtype"] == "torch.float32"}
    assert fp32 and all(".wo." in k for k in fp32)  # T5's _keep_in_fp32_modules
    assert {k for k, v in rank1["state"].items() if v["dtype"] == "torch.float32"} == fp32


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_non_rank0_memory_flat_in_model_size(checkpoints, tmp_path, dtype):
    """Peak anonymous RSS on rank 1 during from_pretrained (sampled from /proc) must not grow with the model."""
    small = checkpoints("sized", hidden=64, layers=2, vocab=1024)
    big = checkpoints("sized", hidden=512, layers=12, vocab=16384, inter=1536)  # ~53M params, 106 MB bf16
    peaks = []
    for i, ckpt in enumerate((small, big)):
        outputs, (rank0, rank1) = run_ranks(["--ckpt", ckpt, "--dtype", dtype], tmp_path / str(i))
        assert all(rc == 0 for rc, _ in outputs), outputs
        peaks.append(rank1["rss_peak_delta_kb"] / 1024)
        rank0_mb = rank0["rss_peak_delta_kb"] / 1024
    if dtype == "float32":  # a cast materialises rank 0's copy (a bf16 load may stay file-backed mmap)
        assert rank0_mb > 150, "rank 0 holds the model: the measurement does see a model-sized allocation"
    assert max(peaks) <= 32, peaks
    assert peaks[1] - peaks[0] <= 8, peaks


def test_without_the_package_upstream_breaks_the_contract(checkpoints, tmp_path):
    """Sentinel: the same checks fail on every supported release when the package is disabled (non-rank-0 keeps
    real parameter storage: placeholders, zeros or checkpoint copies). If this ever passes, re-measure the class."""
    outputs, (rank0, rank1) = run_ranks(["--ckpt", checkpoints("root_buffer"), "--patch", "0", "--kind", "root_buffer"],
                                        tmp_path, env={"HF_FSDP_LOADFIX": "0"})
    assert all(rc == 0 for rc, _ in outputs), outputs
    assert rank1["status"] is None  # HF_FSDP_LOADFIX=0: the startup hook does not even import the package
    assert "cpu" in {v["device"] for k, v in rank1["state"].items() if k != "bias_table"}
