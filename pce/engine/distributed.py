"""Process-group helpers for DDP (``torchrun --nproc_per_node=N tools/train.py CONFIG``).

``init_distributed()`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) and initialises ``env://`` with NCCL on CUDA and Gloo on CPU; without those variables (or with
``WORLD_SIZE=1``) it is a no-op and everything below works for a single process. The multi-node ``torchrun``
recipe (rendezvous, ``--nnodes``) is in ``docs/DISTRIBUTED.md``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from pce.moe.routing import keyed_routers

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "get_rank", "get_world_size", "is_main_process",
           "all_reduce_mean", "all_reduce_max", "all_gather_object",
           "broadcast_parameters", "InferenceShardSampler", "sync_router_keys", "convert_sync_batchnorm",
           "max_rank_difference"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(backend: Optional[str] = None, device: str = "auto") -> DistInfo:
    """Initialise the default process group from torchrun's environment (no-op for one process)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend())
    if world <= 1:
        return DistInfo()
    use_cuda = torch.cuda.is_available() and device != "cpu"
    backend = backend or ("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, backend)


def cleanup_distributed() -> None:
    if is_initialized():
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(values: Dict[str, float]) -> Dict[str, float]:
    """Mean of scalar values over ranks (identity for one process)."""
    if get_world_size() == 1 or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    t /= get_world_size()
    return dict(zip(keys, t.tolist()))


def all_reduce_max(flag: float) -> float:
    if get_world_size() == 1:
        return float(flag)
    t = torch.tensor([float(flag)], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_gather_object(obj: Any) -> List[Any]:
    if get_world_size() == 1:
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def broadcast_parameters(tensors: List[torch.Tensor], src: int = 0) -> None:
    if get_world_size() == 1:
        return
    for t in tensors:
        dist.broadcast(t.data, src=src)


@torch.no_grad()
def sync_router_keys(model: torch.nn.Module) -> None:
    """Average the EMA-updated (non-trainable) router keys over ranks and renormalise them: every rank
    updates its keys from its own batch, DDP only synchronises gradients."""
    if get_world_size() == 1:
        return
    keys = [r.keys for r in keyed_routers(model) if not r.keys.requires_grad]
    for k in keys:
        dist.all_reduce(k.data)
        k.data.div_(get_world_size())
        k.data.copy_(torch.nn.functional.normalize(k.data, dim=-1))


_PLAIN_BN = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)


def convert_sync_batchnorm(model: torch.nn.Module) -> int:
    """Replace, in place, every plain ``BatchNorm1d/2d/3d`` child of ``model`` by a ``torch.nn.SyncBatchNorm``
    (torch's ``convert_sync_batchnorm`` on each; same parameters, buffers and state-dict keys). Subclasses are
    kept: the experts' ``StackedBatchNorm2d`` normalise each expert's routed pixels on their own. Returns how
    many were converted. SyncBatchNorm synchronises only CUDA (and XPU / HPU) inputs in training mode."""
    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) in _PLAIN_BN:
                setattr(module, name, torch.nn.SyncBatchNorm.convert_sync_batchnorm(child))
                n += 1
    return n


@torch.no_grad()
def max_rank_difference(tensors: List[torch.Tensor]) -> float:
    """The largest absolute difference of ``tensors`` between any two ranks (0.0: identical on every rank, as
    DDP keeps the parameters; 0.0 for one process). A collective: every rank calls it."""
    if get_world_size() == 1 or not tensors:
        return 0.0
    flat = torch.cat([t.detach().reshape(-1).to(_comm_device(), torch.float64) for t in tensors])
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).max().item())


class InferenceShardSampler(Sampler[int]):
    """Rank ``r`` of ``n`` gets indices ``r, r + n, ...`` (no padding, so metrics count every sample once)."""

    def __init__(self, size: int, rank: Optional[int] = None, world_size: Optional[int] = None) -> None:
        self.size = int(size)
        self.rank = get_rank() if rank is None else int(rank)
        self.world_size = get_world_size() if world_size is None else int(world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))
