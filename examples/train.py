"""A few training steps under FSDP2 with cpu_ram_efficient_loading, loaded through hf_fsdp_loadfix.

    accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/train.py [--model DIR]   # GPUs
    torchrun --nproc_per_node 2 examples/train.py --cpu [--sharded] [--model DIR]                      # CPU, gloo

--model is a local checkpoint directory; without it, a tiny random bf16 Llama is built locally (no download) in a
temporary folder whose path is printed; --random-model builds it in --model instead (kept for later runs). Every rank
prints where its parameters are after from_pretrained (rank 0: cpu; the other ranks: meta with the package, cpu
without it), then rank 0 prints the loss of each step, averaged over the ranks. --out DIR also writes rank<N>.json.
"""

import argparse
import json
import os
import tempfile

import hf_fsdp_loadfix  # noqa: F401  (the startup hook has already imported it where the package is installed)
import torch
import torch.distributed as dist
import transformers
from transformers import AutoConfig, AutoModelForCausalLM


def build_tiny_llama(path):
    config = AutoConfig.for_model("llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)


def shard_on_cpu(model, sharded):
    """What accelerate's FSDP2 prepare does with cpu_ram_efficient_loading, with torch's own functions; ``sharded``:
    every rank reads its own slices of the checkpoint instead of rank 0 broadcasting it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    full_state = model.state_dict() if dist.get_rank() == 0 and not sharded else {}  # others: meta tensors
    if not sharded:
        hf_fsdp_loadfix.wait_for_rank0()  # before the first collective: rank 0 may still be reading the checkpoint
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    if sharded:
        hf_fsdp_loadfix.fill_shards(model)
        return model
    model.tie_weights()  # point tied aliases at the sharded parameter (a no-op for untied models)
    set_model_state_dict(model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


LAUNCH = ("start one process per rank: torchrun --nproc_per_node 2 examples/train.py --cpu (CPU ranks), or "
          "accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/train.py (GPUs)")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=LAUNCH[0].upper() + LAUNCH[1:] + ".")
    p.add_argument("--model", help="a local checkpoint directory (default: a tiny random Llama built in a temporary "
                                    "folder, its path printed)")
    p.add_argument("--random-model", action="store_true",
                   help="build a tiny random bf16 Llama in --model if it holds no checkpoint yet, and train it")
    p.add_argument("--cpu", action="store_true",
                   help="CPU ranks (gloo) with torch's fully_shard, as accelerate's FSDP2 prepare does it (accelerate "
                        "runs DDP on CPU); the default without CUDA. Without it: accelerate's Accelerator on GPUs")
    p.add_argument("--sharded", action="store_true",
                   help="with --cpu: shard-on-read, every rank (rank 0 too) reads only its own slices of the "
                        "checkpoint, nothing is broadcast")
    p.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    p.add_argument("--out", help="write rank<N>.json (losses, devices after from_pretrained) into this directory")
    args = p.parse_args()
    args.cpu = args.cpu or not torch.cuda.is_available()
    quiet = os.environ.get("RANK", "0") != "0"  # one message per job, from rank 0; the other ranks exit alike
    if args.model is not None and not args.random_model and not os.path.isfile(os.path.join(args.model, "config.json")):
        if quiet:
            raise SystemExit(2)
        p.error(f"--model {args.model}: no checkpoint there (no config.json); pass a local checkpoint directory, or "
                "add --random-model to build a tiny random Llama there")
    if args.sharded and not args.cpu:
        p.error("--sharded runs on CPU ranks: add --cpu")
    if not {"RANK", "WORLD_SIZE"} <= os.environ.keys():
        p.error(f"RANK and WORLD_SIZE are not set: {LAUNCH}")
    if args.model is None:
        args.model = os.path.join(tempfile.gettempdir(), f"hf_fsdp_loadfix-example-tiny-llama-"
                                                         f"{transformers.__version__}")
        args.random_model = True
        if not quiet:
            print(f"no --model: a tiny random Llama in {args.model} (built there unless an earlier run did)",
                  flush=True)
    return args


def main():
    args = parse_args()
    cpu = args.cpu

    if cpu:  # what accelerate launch + Accelerator() set up on GPUs
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"
        dist.init_process_group("gloo")
        device, barrier, backward = torch.device("cpu"), dist.barrier, torch.Tensor.backward
    else:
        from accelerate import Accelerator

        accelerator = Accelerator()  # FSDP2, bf16 mixed precision, cpu_ram_efficient_loading from the config file
        device, barrier, backward = accelerator.device, accelerator.wait_for_everyone, accelerator.backward
    rank, world = dist.get_rank(), dist.get_world_size()

    if args.random_model and int(os.environ.get("LOCAL_RANK", 0)) == 0 and \
            not os.path.exists(os.path.join(args.model, "config.json")):
        build_tiny_llama(args.model)
    barrier()  # the last collective before from_pretrained; the next one waits for rank 0's load

    # the process group is up and both FSDP variables are set: only local rank 0 reads the weights
    dtype = torch.float32 if cpu else torch.bfloat16
    if cpu and args.sharded:  # the FSDP gate and shard-on-read for this load: every rank on meta, rank 0 too
        with hf_fsdp_loadfix.fsdp_loading():
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    devices = sorted({t.device.type for t in model.state_dict().values()})
    print(f"rank {rank}: parameters on {'|'.join(devices)} after from_pretrained", flush=True)

    if cpu:
        model = shard_on_cpu(model, args.sharded)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:  # accelerate wants model and optimizer together; it shards the model and broadcasts rank 0's weights
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model, optimizer = accelerator.prepare(model, optimizer)

    data = torch.randint(0, model.config.vocab_size, (4 * world, 32), generator=torch.Generator().manual_seed(0))
    batch = data[rank::world].to(device)  # each rank its own rows of a tiny fixed dataset
    losses = []
    for step in range(args.steps):
        loss = model(input_ids=batch, labels=batch).loss
        backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append((mean / world).item())
        if rank == 0:
            print(f"step {step}: loss {losses[-1]!r}", flush=True)

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank, "devices_after_from_pretrained": devices, "losses": losses,
                       "transformers": transformers.__version__, "patched": hf_fsdp_loadfix.status()["applied"]}, f)
    dist.barrier()  # every rank done before the group goes away
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
