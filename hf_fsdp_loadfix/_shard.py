"""What every way of filling a shard shares: the local slice of a full tensor under a DTensor's placements, and the
local tensor a state-dict entry of a sharded model gets (cast, contiguous and placed as accelerate makes it)."""

import torch


def local_index(shape, mesh, placements):
    """This rank's part of a tensor of global ``shape`` under ``placements``, as an index (``full[index]``, or a
    safetensors ``get_slice(key)[index]`` that reads only those bytes), computed as torch's ``_distribute_tensors``
    does; None where this torch lacks the helper."""
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:
        return None
    local, offset = compute_local_shape_and_global_offset(torch.Size(shape), mesh, placements)
    return tuple(slice(o, o + n) for n, o in zip(local, offset))


def local_slice(full, mesh, placements):
    """This rank's part of ``full``, a view, with no communication."""
    index = local_index(full.shape, mesh, placements)
    if index is None:  # a torch that moved the helper: the public API slices alike (torch >= 2.6)
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, mesh, placements, src_data_rank=None).to_local()
    return full[index]


def as_target(local, target, cpu_offload=False, copy=True):
    """A ``target`` DTensor (meta) filled with ``local``: cast to the target's dtype (copied unless ``copy=False``
    says ``local`` is this rank's own already, so no view of a reused receive buffer survives), contiguous where the
    target is, on the mesh's device (CPU under ``cpu_offload``), as accelerate 1.14's ``fsdp2_load_full_state_dict``
    makes it. A slice read from the files is on CPU: on a GPU mesh it moves to the GPU here."""
    from torch.distributed.tensor import DTensor

    local = local.to(target.dtype, copy=copy)
    if target.is_contiguous():
        local = local.contiguous()
    local = local.cpu() if cpu_offload else local.to(target.device_mesh.device_type)
    return DTensor.from_local(local, target.device_mesh, target.placements,
                              run_check=False, shape=target.shape, stride=target.stride())
