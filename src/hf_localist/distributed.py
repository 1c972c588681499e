"""Multi-process helpers: rank, broadcast from rank 0, all-reduce, and full views of sharded (DTensor) parameters.

Every function is a no-op (or the identity) without an initialised ``torch.distributed`` process group of more
than one process, so single-process code paths are unchanged. See docs/distributed.md for what is synchronised:

- data-parallel training (DDP): the gradients are averaged by DDP; the penalty's loss term gets the right share
  from ``num_items_in_batch`` (training/penalty.py); the proximal step is deterministic on identical weights; a
  recruitment pass runs on every rank on the same (unsharded) data, then rank 0's decisions, localist state and,
  when it accepted a block, its trainable weights are broadcast (recruitment/recruit.py);
- sharded parameters (FSDP2 ``fully_shard``, DTensor): the group norms and the proximal step read the full weight
  (an all-gather whose backward averages the gradient over the mesh, like FSDP's reduce-scatter) and write their
  shard back.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

try:  # torch >= 2.4
    from torch.distributed.tensor import DTensor, Partial, distribute_tensor
except ImportError:  # pragma: no cover - older torch
    DTensor = Partial = distribute_tensor = None


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (picklable objects; tensors in its lists, tuples and dicts arrive on the
    CPU)."""
    if not is_distributed():
        return obj
    if dist.get_rank() == src:  # unpickled tensors land on the device they left: send CPU tensors
        obj = tree_map(lambda x: x.detach().cpu() if isinstance(x, torch.Tensor) else x, obj)
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


@torch.no_grad()
def broadcast_tensors_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """In place: every tensor takes rank ``src``'s values (e.g. parameters after a recruitment pass).

    Sharded (DTensor) parameters are skipped: each rank holds a different shard, and the sharded training keeps
    them consistent itself."""
    if not is_distributed():
        return
    device = _comm_device()
    for t in tensors:
        if is_dtensor(t):
            continue
        buf = t.detach() if t.device == device else t.detach().to(device)
        dist.broadcast(buf, src=src)
        if buf is not t:
            t.copy_(buf)


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on at least one rank."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# ---------------------------------------------------------------------------------------------- sharded parameters
def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def full_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """The full (unsharded) value of a DTensor as a plain tensor; any other tensor unchanged.

    Differentiable: the all-gather's backward reduce-scatters the gradient and *averages* it over the mesh (each
    rank's loss holds its own share of the penalty, the way FSDP averages the data gradients), so the gradient
    that reaches each shard equals the data-parallel mean of the ranks' penalty gradients.
    """
    if not is_dtensor(t):
        return t
    if not (t.requires_grad and torch.is_grad_enabled()):
        return t.full_tensor()
    n = t.device_mesh.size()
    return _ScaleGrad.apply(t.full_tensor(grad_placements=[Partial()] * t.device_mesh.ndim), 1.0 / n)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times ``scale`` (turns the sum reduce-scatter of a Partial gradient into a mean)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


@torch.no_grad()
def write_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """In place: a DTensor parameter takes the value ``full`` (identical on every rank); each rank keeps its shard."""
    if not is_dtensor(param):
        if full.data_ptr() != param.data_ptr():
            param.copy_(full)
        return
    shard = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
    param.to_local().copy_(shard.to_local())
