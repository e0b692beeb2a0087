"""Weights from rank 0 by broadcast: the layout agreement every rank runs before any broadcast, and the fill of a model
that a consumer other than FSDP prepares (DDP, or no wrapper), whose state-dict entries are on meta off rank 0."""

import torch

FROM_RANK0 = "_hf_fsdp_loadfix_from_rank0"  # set by from_pretrained on every rank of an FSDP load the package serves


def group_device():
    """Where the default process group's collectives take their tensors: this rank's GPU under NCCL, else the CPU."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"


def from_rank0(model) -> bool:
    """Was (a module of) ``model`` loaded under FSDP cpu-ram-efficient loading, to be filled from rank 0?  Wrappers
    (peft, activation checkpointing, torch.compile) hold the loaded model as a submodule."""
    return isinstance(model, torch.nn.Module) and any(getattr(m, FROM_RANK0, False) for m in model.modules())


def pending(model) -> bool:
    """Loaded under FSDP cpu-ram-efficient loading and not prepared yet: rank 0 alone holds the values (the same
    answer on every rank)."""
    return from_rank0(model) and not any(
        hasattr(p, "device_mesh") or type(p).__name__ == "FlatParameter" for p in model.parameters())


def agree(model, device, upcast: bool = False) -> dict:
    """Rank 0's state-dict layout ``{key: (dtype, shape)}``, broadcast to every rank and compared with each rank's own:
    keys, shapes and dtypes (a trainable parameter's dtype not where ``upcast``: accelerate's mixed precision casts it
    to fp32 on every rank). If they differ anywhere, every rank raises the same error naming rank, key and both
    values, instead of a broadcast that hangs or reinterprets bytes."""
    import torch.distributed as dist

    entries = model.state_dict(keep_vars=True)
    local = {k: (v.dtype, tuple(v.shape)) for k, v in entries.items()}
    box = [local if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, group=dist.group.WORLD, device=device)
    plan = box[0]
    problems = [f"{k} missing" for k in plan if k not in local] + [f"{k} not on rank 0" for k in local if k not in plan]
    problems += [f"{k} shape {list(local[k][1])} (rank 0: {list(v[1])})" for k, v in plan.items()
                 if k in local and local[k][1] != v[1]]
    problems += [f"{k} dtype {local[k][0]} (rank 0: {v[0]})" for k, v in plan.items()
                 if k in local and local[k][0] != v[0] and not (upcast and getattr(entries[k], "requires_grad", False))]
    flag = torch.tensor([len(problems)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, problems)
        ranks = [f"rank {r}: {', '.join(p[:5])}{f' and {len(p) - 5} more' if len(p) > 5 else ''}"
                 for r, p in enumerate(found) if p]
        raise RuntimeError(f"hf_fsdp_loadfix: the model being prepared differs between ranks: {'; '.join(ranks)}")
    return plan


def fill_from_rank0(model, device) -> None:
    """Every rank ends with rank 0's state-dict values: one broadcast per distinct tensor, in key order, after
    :func:`agree`. Off rank 0 a meta entry becomes a real tensor on ``device`` *in place* (``torch.utils.swap_tensors``:
    the same Python object, so an optimizer built before ``prepare`` trains it, tied parameters stay one, a parameter
    keeps ``requires_grad``); a real one is overwritten. Non-persistent buffers are each rank's own (computed alike).
    This is what DDP's construction does for real tensors; it cannot copy out of meta."""
    import torch.distributed as dist

    plan = agree(model, device)
    entries = model.state_dict(keep_vars=True)
    rank0, done = dist.get_rank() == 0, set()
    with torch.no_grad():
        for key in sorted(plan):
            tensor = entries[key]
            if id(tensor) in done or not isinstance(tensor, torch.Tensor):
                continue
            done.add(id(tensor))
            dtype, shape = plan[key]
            value = tensor.detach().to(device).contiguous() if rank0 else torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(value, src=0, group=dist.group.WORLD)
            if rank0:
                continue
            if tensor.device.type != "meta":
                tensor.detach().copy_(value)
            elif isinstance(tensor, torch.nn.Parameter):
                torch.utils.swap_tensors(tensor, torch.nn.Parameter(value, requires_grad=tensor.requires_grad))
            else:
                torch.utils.swap_tensors(tensor, value)
