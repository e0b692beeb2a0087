"""Rank 0's memory in accelerate's fsdp2_prepare_model (HF_FSDP_LOADFIX_STREAM): accelerate's own result, bitwise,
with each tensor broadcast once in its loaded dtype."""

import importlib.util
import inspect
import json
import math
import os

import pytest
from launch import require_accelerate_on_cpu, run_ranks

# case name -> builder kind (tests/models.py); tests/worker.py STREAM_CASES says what each case changes
CASES = {"ac": "uneven", "tied": "llama_tied", "keep_fp32": "keep_fp32", "frozen": "llama",
         "persistent_buffer": "deepseek_v3", "lora": "llama", "offload": "llama", "nomp": "llama"}


def _stream_applies():
    import accelerate.utils.fsdp_utils as fu

    from hf_fsdp_loadfix import _stream

    why = _stream.mismatch(fu)
    if why:
        pytest.skip(f"streaming does not apply here: {why}")


def _checkpoint_bytes(ckpt):
    with open(os.path.join(ckpt, "model.safetensors"), "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    size = {"BF16": 2, "F16": 2, "F32": 4}
    return sum(math.prod(v["shape"]) * size[v["dtype"]] for k, v in header.items() if k != "__metadata__")


def test_accelerate_stream_is_bitwise_accelerates_result(checkpoints, tmp_path):
    """Each case twice on each rank, HF_FSDP_LOADFIX_STREAM=0 (accelerate's own load) then =1, under bf16 mixed
    precision: every local shard (bytes, dtype, placements, requires_grad), every buffer, the loss of one SGD step
    and the shards after it are identical; the gathered state equals the checkpoint; streaming broadcast exactly
    the bytes of rank 0's loaded tensors, where accelerate broadcast fp32."""
    require_accelerate_on_cpu()
    _stream_applies()
    cases = dict(CASES)
    try:
        require_accelerate_on_cpu("llama_tied")
    except pytest.skip.Exception:  # accelerate <= 1.14 + torch >= 2.13 cannot shard tied embeddings at all
        del cases["tied"]
    args = []
    for name, kind in cases.items():
        args += ["--stream-case", name, kind, checkpoints(kind, **({"vocab": 131} if kind == "uneven" else {}))]
    outputs, results = run_ranks(args, tmp_path, timeout=300)
    for rc, text in outputs:
        assert rc == 0, text[-4000:]
    for rank in results:
        for name, runs in rank["cases"].items():
            upstream, streamed = runs["0"], runs["1"]
            assert streamed["status"] == "applied", (name, streamed["status"])
            for what in ("shards", "buffers", "loss", "after_step"):
                assert streamed[what] == upstream[what], (rank["rank"], name, what)
            assert streamed["bytes_broadcast"] == streamed["loaded_bytes"], (name, streamed["bytes_broadcast"])
            if name not in ("lora", "nomp"):  # trainable bf16 parameters: accelerate broadcast them as fp32
                assert upstream["bytes_broadcast"] > 1.4 * streamed["bytes_broadcast"], name
            if name != "lora":  # peft renames the keys
                assert streamed["checkpoint_keys_compared"] > 0 and streamed["mismatch_vs_checkpoint"] == [], name
            assert streamed["loss"] == results[0]["cases"][name]["1"]["loss"]
        cases, plain = rank["cases"], checkpoints("llama")
        # each case does what it says
        assert cases["nomp"]["1"]["bytes_broadcast"] == _checkpoint_bytes(plain)
        shards = {name: cases[name]["1"]["shards"] for name in cases}
        assert {v["dtype"] for k, v in shards["ac"].items() if k.endswith("weight")} == {"torch.float32"}
        assert shards["frozen"]["model.embed_tokens.weight"]["dtype"] == "torch.bfloat16"
        assert shards["frozen"]["model.layers.1.mlp.up_proj.weight"]["dtype"] == "torch.float32"
        if "tied" in shards:
            assert shards["tied"]["lm_head.weight"] == shards["tied"]["model.embed_tokens.weight"]
        assert cases["keep_fp32"]["1"]["loaded_bytes"] > _checkpoint_bytes(checkpoints("keep_fp32"))  # fp32 down_proj
        assert any(k.endswith("e_score_correction_bias") for k in shards["persistent_buffer"])
        assert any("lora_A" in k and v["requires_grad"] for k, v in shards["lora"].items())


def test_accelerate_stream_models_that_differ_between_ranks_fail_together(checkpoints, tmp_path):
    """Rank 1's model has another vocabulary: every rank raises the same error naming the key, instead of a
    broadcast of mismatched sizes."""
    require_accelerate_on_cpu()
    _stream_applies()
    other = checkpoints("uneven", vocab=131)
    outputs, _ = run_ranks(["--stream-case", "nomp", "llama", checkpoints("llama"), "--ckpt-other", other,
                            "--stream", "1"], tmp_path, timeout=120)
    for rc, text in outputs:
        assert rc != 0 and "the model being prepared differs between ranks: rank 1: " in text
        assert "model.embed_tokens.weight shape [131, 64] (rank 0: [128, 64])" in text


def _module(tmp_path, name, text):
    (tmp_path / f"{name}.py").write_text("import torch\n" + text)
    spec = importlib.util.spec_from_file_location(name, tmp_path / f"{name}.py")
    spec.loader.exec_module(mod := importlib.util.module_from_spec(spec))
    return mod


def test_accelerate_stream_recognised_by_structure(tmp_path):
    """Applied where fsdp2_prepare_model upcasts before capturing the state dict and fsdp2_load_full_state_dict is the
    1.14-1.15 one; a release that upcasts otherwise is not streamed (nothing to stream), nor one whose load calls
    something else (named)."""
    import accelerate
    import accelerate.utils.fsdp_utils as fu
    from packaging.version import Version

    from hf_fsdp_loadfix import _stream

    why = _stream.mismatch(fu)
    if Version(accelerate.__version__) >= Version("1.14"):
        assert why is None
    else:
        assert why is not None and "does not upcast parameters before capturing" in why or "has no" in why
    if not hasattr(fu, _stream.PREPARE) or not hasattr(fu, _stream.LOAD):
        return
    prepare = inspect.getsource(inspect.unwrap(fu.fsdp2_prepare_model))
    load = inspect.getsource(inspect.unwrap(fu.fsdp2_load_full_state_dict))
    if why is None:
        assert "param.data = param.data.to(torch.float32)" in prepare
        rebinding = prepare.replace("param.data = param.data.to(torch.float32)", "param = param.to(torch.float32)")
        assert "does not upcast" in _stream.mismatch(_module(tmp_path, "rebinding", rebinding + load))
        extra = load.replace("model.load_state_dict(sharded_sd, assign=True)",
                             "model.load_state_dict(sharded_sd, assign=True)\n    torch.cuda.synchronize()")
        assert "calls differ: synchronize" in _stream.mismatch(_module(tmp_path, "extra", prepare + extra))


def test_accelerate_stream_status_and_switch():
    from test_gate import py_json

    code = """
        import hf_fsdp_loadfix, accelerate.utils.fsdp_utils as fu
        print(json.dumps([hf_fsdp_loadfix.status()["accelerate_stream"], hf_fsdp_loadfix.status()["options"],
                          isinstance(vars(fu)["fsdp2_prepare_model"], wrapt.FunctionWrapper)]))
    """
    import accelerate.utils.fsdp_utils as fu

    from hf_fsdp_loadfix import _accelerate, _stream

    expected = _stream.mismatch(fu) if _accelerate.mismatch(fu) is None else None
    stream, options, wrapped = py_json(code)
    # fsdp2_prepare_model is wrapped wherever the package is on (the wait for rank 0), streamed where it applies
    assert (stream, wrapped) == ("applied" if expected is None else expected, True)
    assert options["stream"] is True
    assert py_json(code, env={"HF_FSDP_LOADFIX_STREAM": "0"})[1]["stream"] is False
    off = py_json(code, env={"HF_FSDP_LOADFIX_ACCELERATE": "0"})
    assert off[0] == "disabled by HF_FSDP_LOADFIX_ACCELERATE=0" and off[2] is True
    off = py_json(code, env={"HF_FSDP_LOADFIX": "0"})
    assert off[0] == "disabled by HF_FSDP_LOADFIX=0" and off[2] is False


def test_accelerate_imported_before_the_package_is_patched_where_accelerator_calls_it():
    """accelerate.accelerator and accelerate.utils import fsdp2_prepare_model / fsdp2_load_full_state_dict by name:
    a package applied after accelerate was imported (``import hf_fsdp_loadfix`` in a script, no startup hook) must
    reach those bindings too, and revert() must undo them."""
    from test_gate import py_json

    out = py_json("""
        import accelerate.accelerator as aa, accelerate.utils as au, accelerate.utils.fsdp_utils as fu
        import hf_fsdp_loadfix
        names = ("fsdp2_prepare_model", "fsdp2_load_full_state_dict")
        def bindings():  # (module, name) -> the binding is fsdp_utils' wrapped function
            return {f"{m.__name__}.{n}": getattr(m, n) is vars(fu)[n]
                    and isinstance(getattr(m, n), wrapt.FunctionWrapper) for m in (aa, au, fu) for n in names
                    if hasattr(m, n)}
        before = bindings()
        hf_fsdp_loadfix.revert()
        reverted = [k for m in (aa, au, fu) for k in names if isinstance(getattr(m, k, None), wrapt.FunctionWrapper)]
        hf_fsdp_loadfix.apply()
        print(json.dumps([before, reverted, bindings(), hf_fsdp_loadfix.status()["accelerate_stream"]]))
    """)
    import accelerate.utils.fsdp_utils as fu

    from hf_fsdp_loadfix import _accelerate, _stream

    if _accelerate.mismatch(fu):
        pytest.skip(f"the accelerate fix does not apply: {_accelerate.mismatch(fu)}")
    streamed = _stream.mismatch(fu) is None
    before, reverted, after, stream = out
    assert "accelerate.accelerator.fsdp2_prepare_model" in before
    # fsdp2_prepare_model is wrapped wherever the package is on (the wait for rank 0), streamed or not
    assert before == after == {k: True for k in before}, before
    assert reverted == [] and (stream == "applied") == streamed
