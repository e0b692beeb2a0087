"""One rank of an FSDP cpu-ram-efficient load, as ``hf-fsdp-loadfix check`` and the benchmarks run it.

    python -m hf_fsdp_loadfix._worker --ckpt DIR --out DIR [--dtype float32] [--load-only | --shard accelerate
        [--mixed-precision bf16]] [--prepare-only] [--device cuda]

``from_pretrained`` under transformers' FSDP gate with the peak anonymous RSS sampled from /proc, then (unless
``--load-only``) FSDP2 sharding with the broadcast from rank 0 (torch's ``fully_shard`` + ``set_model_state_dict(
broadcast_from_rank0=True)``, or accelerate's own ``fsdp2_prepare_model``), the full state dict compared bitwise
with the checkpoint file, and a forward pass (``--prepare-only``: the peak over load and sharding, and the sharding's
time, nothing compared; ``--device cuda``: see the section of that name below). Writes ``rank<N>.json`` into
``--out``, and before that ``rank<N>.step.json``: the step it is in and the package's status before the load, for a
rank that fails (:func:`steps`). :func:`launch` starts N such processes with the variables torchrun would set.
"""

import argparse
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time


def rss_anon_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler(threading.Thread):
    """Samples RssAnon every 0.5 ms until :meth:`finish`; ``base`` is the value when created."""

    def __init__(self):
        super().__init__(daemon=True)
        self.base = self.peak = rss_anon_kb()
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, rss_anon_kb())
            time.sleep(0.0005)

    def finish(self) -> int:
        """Peak above the base, in KB."""
        self.stop.set()
        self.join()
        return max(self.peak, rss_anon_kb()) - self.base


def digest(t) -> str:
    import torch

    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return hashlib.sha1(t.numpy().tobytes()).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv, out, nproc=2, env=None, timeout=600, node_rank=0, nnodes=1, port=None):
    """Run ``python *argv --out out`` on ``nproc`` local gloo ranks; return [(returncode, output)] and the
    ``rank<N>.json`` each wrote (None where it wrote none)."""
    port = port or free_port()
    procs = []
    for local in range(nproc):
        rank = node_rank * nproc + local
        penv = {**os.environ, **(env or {}), "RANK": str(rank), "LOCAL_RANK": str(local),
                "WORLD_SIZE": str(nproc * nnodes), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen([sys.executable, *argv, "--out", str(out)], env=penv,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for proc in procs:
            try:
                text, _ = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                text = proc.communicate()[0] + f"\n[killed after {timeout} s]"
            outputs.append((proc.returncode, text))
    finally:
        for proc in procs:
            proc.kill()
    results = []
    for local in range(nproc):
        path = os.path.join(str(out), f"rank{node_rank * nproc + local}.json")
        results.append(json.load(open(path)) if os.path.exists(path) else None)
    return outputs, results


STEPS = ("from_pretrained", "the FSDP2 sharding", "the comparison and forward pass")


def step(out: str, rank: int, name: str, **fields) -> None:
    """Record that this rank starts step ``name`` of :data:`STEPS` (``rank<N>.step.json``, ``fields`` kept from the
    earlier steps): where a rank that fails before writing ``rank<N>.json`` failed."""
    path = os.path.join(out, f"rank{rank}.step.json")
    os.makedirs(out, exist_ok=True)
    old = json.load(open(path)) if os.path.exists(path) else {}
    with open(path, "w") as f:
        json.dump({**old, **fields, "step": name}, f)


def steps(out: str, nproc: int, node_rank: int = 0) -> list:
    """What each rank recorded with :func:`step` (None where it got to none)."""
    paths = [os.path.join(str(out), f"rank{node_rank * nproc + local}.step.json") for local in range(nproc)]
    return [json.load(open(path)) if os.path.exists(path) else None for path in paths]


def dtype_kwargs(dtype: str) -> dict:
    import torch
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype if dtype == "auto" else getattr(torch, dtype)}


def model_class(ckpt: str):
    """The class named in the checkpoint's config (``architectures``), else ``AutoModel``."""
    import transformers

    archs = getattr(transformers.AutoConfig.from_pretrained(ckpt), "architectures", None) or []
    return next((getattr(transformers, a) for a in archs if hasattr(transformers, a)), transformers.AutoModel)


def load(cls, ckpt: str, **kwargs):
    """``from_pretrained`` with peak anonymous RSS and wall time; returns (model, loading info, measurements)."""
    sampler = PeakSampler()
    sampler.start()
    t0 = time.perf_counter()
    model, info = cls.from_pretrained(ckpt, output_loading_info=True, **kwargs)
    load_s = time.perf_counter() - t0
    peak = sampler.finish()
    return model, info, {"load_s": load_s, "rss_base_kb": sampler.base, "rss_peak_delta_kb": peak,
                         "rss_after_delta_kb": rss_anon_kb() - sampler.base}


def describe(model) -> dict:
    """Where every state-dict entry lives, the non-persistent buffers (digested), and tying."""
    npb = {}
    for mod_name, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            buf = module._buffers.get(name)
            if buf is not None:
                npb[f"{mod_name}.{name}" if mod_name else name] = {
                    "device": buf.device.type, "dtype": str(buf.dtype),
                    "digest": None if buf.device.type == "meta" else digest(buf)}
    in_emb, out_emb = model.get_input_embeddings(), model.get_output_embeddings()
    return {
        "state": {k: {"device": v.device.type, "shape": list(v.shape), "dtype": str(v.dtype)}
                  for k, v in model.state_dict().items()},
        "non_persistent": npb,
        "tied": out_emb is not None and in_emb.weight is out_emb.weight,
        # transformers' kernels step (5.25: on by default): the mode, and the layers whose forward kernels replaced
        "kernels": {"used": getattr(model, "use_kernels", None), "mode": str(getattr(model, "kernels_mode", None)),
                    "replaced": {n: getattr(vars(m)["forward"], "__qualname__", "?")
                                 for n, m in model.named_modules() if "forward" in vars(m)}},
    }


def shard_native(model, rank: int):
    """FSDP2 on the root module, then rank 0's full state dict broadcast into the shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    full_sd = model.state_dict() if rank == 0 else {}
    fully_shard(model)
    model.tie_weights()  # 4.x T5 ties whole modules: point every alias at the sharded parameter
    set_model_state_dict(model, full_sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def accelerator_like(rank: int, mixed_precision: str = "no", **plugin_kwargs):
    """What accelerate's FSDP2 functions read from an ``Accelerator`` (``cpu_ram_efficient_loading=True``, a
    transformer-based wrap, ``mixed_precision`` as ``--mixed_precision`` sets it for both), on CPU/gloo."""
    from types import SimpleNamespace

    import torch
    from accelerate import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    PartialState(cpu=True)  # accelerate's logging needs it (as Accelerator() initialises it)
    if mixed_precision != "no":
        plugin_kwargs["mixed_precision_policy"] = mixed_precision
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, cpu_ram_efficient_loading=True,
                                            auto_wrap_policy="transformer_based_wrap", **plugin_kwargs)
    return SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None,
                           parallelism_config=None, mixed_precision=mixed_precision, is_main_process=rank == 0,
                           device=torch.device("cpu"))


def shard_accelerate(model, rank: int, mixed_precision: str = "no"):
    """accelerate's own ``fsdp2_prepare_model``, as ``accelerate launch`` runs it (the model's
    ``_no_split_modules`` wrapped)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    return fsdp2_prepare_model(accelerator_like(rank, mixed_precision), model)


@contextlib.contextmanager
def counted_broadcasts():
    """Bytes sent with ``dist.broadcast`` (what accelerate and the package call) inside the block: ``[n]``."""
    import torch.distributed as dist

    sent, broadcast = [0], dist.broadcast

    def counting(tensor, *args, **kwargs):
        sent[0] += tensor.numel() * tensor.element_size()
        return broadcast(tensor, *args, **kwargs)

    dist.broadcast = counting
    try:
        yield sent
    finally:
        dist.broadcast = broadcast


def full_state(model) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def _checkpoint_tensors(ckpt: str, wanted):
    """(key, tensor) for the ``wanted`` keys in the checkpoint's safetensors and .bin files, one file at a time."""
    import torch
    from safetensors import safe_open

    for f in sorted(os.listdir(ckpt)):
        path = os.path.join(ckpt, f)
        if f.endswith(".safetensors"):
            with safe_open(path, "pt") as st:
                yield from ((k, st.get_tensor(k)) for k in st.keys() if k in wanted)
        elif f.endswith(".bin"):
            yield from ((k, t) for k, t in torch.load(path, weights_only=True, map_location="cpu").items()
                        if k in wanted)


def compare_to_checkpoint(full: dict, ckpt: str) -> dict:
    """Bitwise comparison (after a cast to the loaded dtype) of every key the checkpoint files also hold."""
    import torch

    compared, mismatch = 0, []
    for k, t in _checkpoint_tensors(ckpt, full):
        compared += 1
        if not torch.equal(full[k].cpu(), t.to(full[k].dtype)):
            mismatch.append(k)
    return {"checkpoint_keys_compared": compared, "mismatch_vs_checkpoint": sorted(mismatch)}


def forward(model, device="cpu", grad=False):
    """Logits of a fixed 8-token input (``decoder_input_ids`` too for encoder-decoders) on ``device``, as float32."""
    import torch

    cfg = model.config
    vocab = getattr(cfg, "vocab_size", None) or getattr(cfg.get_text_config(), "vocab_size", 100)
    ids = (torch.arange(1, 9).reshape(1, 8) % vocab).to(device)
    kwargs = {"decoder_input_ids": ids} if cfg.is_encoder_decoder else {}
    with torch.set_grad_enabled(grad):
        out = model(input_ids=ids, **kwargs)
    return (out.logits if getattr(out, "logits", None) is not None else out[0]).float()


def init_rank() -> int:
    """The variables accelerate sets for FSDP cpu-ram-efficient loading, and a gloo process group; the rank."""
    import torch.distributed as dist

    os.environ.setdefault("ACCELERATE_USE_FSDP", "true")
    os.environ.setdefault("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    dist.init_process_group("gloo")
    return dist.get_rank()


# --device cuda: accelerate's real Accelerator, one GPU per rank (NCCL), prepare(model, optimizer), a training step


def rank_device(device: str, local_rank: int) -> str:
    """A rank's device: the GPU of its local rank (``launch`` starts local ranks 0..N-1, one per GPU), or the CPU."""
    return f"cuda:{local_rank}" if device == "cuda" else "cpu"


def gpu_accelerator():
    """``Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2, cpu_ram_efficient_loading=True))``
    (decoder layers wrapped, as ``accelerate launch`` configs do), made before ``from_pretrained`` as a training script
    makes it: its NCCL process group, on this rank's GPU."""
    from accelerate import Accelerator
    from accelerate.utils import FullyShardedDataParallelPlugin

    os.environ.setdefault("ACCELERATE_USE_FSDP", "true")
    accelerator = Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(
        fsdp_version=2, cpu_ram_efficient_loading=True, auto_wrap_policy="transformer_based_wrap"))
    want = rank_device("cuda", int(os.environ["LOCAL_RANK"]))
    if accelerator.distributed_type.name != "FSDP" or str(accelerator.device) != want:
        raise RuntimeError(f"--device cuda: accelerate runs {accelerator.distributed_type.name} on "
                           f"{accelerator.device}, not FSDP on {want}")
    return accelerator


def gpu_prepare(accelerator, model):
    """``accelerator.prepare(model, optimizer)`` with an AdamW built on the loaded parameters (meta off rank 0), as the
    Trainer builds it for FSDP2; then how many of the prepared model's parameters the optimizer holds."""
    import torch

    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    held = [id(p) for group in optimizer.param_groups for p in group["params"]]
    params = {id(p) for p in model.parameters()}
    return model, optimizer, {"device": str(accelerator.device), "optimizer_params": len(held),
                              "model_params": len(params), "optimizer_model_params": len(set(held) & params)}


def gpu_train_step(accelerator, model, optimizer) -> dict:
    """One AdamW step on the fixed input, the mean square of the logits as the loss: the loss, or the error."""
    try:
        loss = forward(model, accelerator.device, grad=True).square().mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        return {"train_loss": loss.item()}
    except Exception as err:  # reported as a failure of the check
        return {"train_error": f"{type(err).__name__}: {err}"}


def finish(result: dict, out: str) -> None:
    """Write this rank's JSON, wait for the others, leave the process group."""
    import torch.distributed as dist

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--load-only", action="store_true")
    p.add_argument("--shard", default="native", choices=["native", "accelerate"])
    p.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"], help="--shard accelerate's")
    p.add_argument("--prepare-only", action="store_true", help="measure the load and the sharding, compare nothing")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: the section of that name above")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    accelerator = gpu_accelerator() if args.device == "cuda" else None
    rank = accelerator.process_index if accelerator else init_rank()
    import torch
    import torch.distributed as dist
    import transformers
    import transformers.modeling_utils  # noqa: F401  (the package patches it here: the status below says how)

    import hf_fsdp_loadfix

    if args.shard == "accelerate":
        import accelerate.utils.fsdp_utils  # noqa: F401  (so that status() reports the accelerate fix)
    step(args.out, rank, STEPS[0], status=hf_fsdp_loadfix.status())
    cls, kwargs = model_class(args.ckpt), dtype_kwargs(args.dtype)
    dist.barrier()
    total = PeakSampler()  # from_pretrained and the sharding together
    total.start()
    model, info, measured = load(cls, args.ckpt, **kwargs)
    result = {"rank": rank, "transformers": transformers.__version__, "status": hf_fsdp_loadfix.status(),
              **measured, **describe(model), "missing_keys": sorted(info["missing_keys"]),
              "persistent_buffers": sorted(model.state_dict().keys() - dict(model.named_parameters(
                  remove_duplicate=False)).keys())}
    if not args.load_only:
        step(args.out, rank, STEPS[1])
        t0 = time.perf_counter()
        with counted_broadcasts() as sent:
            if accelerator:
                model, optimizer, held = gpu_prepare(accelerator, model)
                result.update(held)
            elif args.shard == "accelerate":
                model = shard_accelerate(model, rank, args.mixed_precision)
            else:
                model = shard_native(model, rank)
        # shard-on-read: what this rank read from the files, and the keys the checkpoint lacks, from rank 0
        filled = hf_fsdp_loadfix.status()["shard_on_read"]
        result.update(prepare_s=time.perf_counter() - t0, rss_peak_total_delta_kb=total.finish(),
                      bytes_broadcast=sent[0],
                      bytes_from_rank0=filled.get("bytes_broadcast", 0) if isinstance(filled, dict) else 0,
                      **({"shard_on_read": filled} if isinstance(filled, dict) else {}))
    if not (args.load_only or args.prepare_only):
        step(args.out, rank, STEPS[2])
        full = full_state(model)
        result.update(compare_to_checkpoint(full, args.ckpt))
        result["state_digest"] = hashlib.sha1("".join(k + digest(full[k]) for k in sorted(full)).encode()).hexdigest()
        try:
            logits = forward(model, accelerator.device if accelerator else "cpu")
            result.update(logits_digest=digest(logits), logits_nan=bool(torch.isnan(logits).any()))
        except Exception as err:  # a model whose forward needs more than input_ids
            result["logits_error"] = f"{type(err).__name__}: {err}"
        if accelerator and "logits_error" not in result:
            result.update(gpu_train_step(accelerator, model, optimizer))
    finish(result, args.out)


if __name__ == "__main__":
    main()
