"""Several processes training together (started by torchrun): the process group, and the batch
statistics of a loss taken over every process's rows.

Data parallel convention: each rank holds an equal slice of the global batch and computes the
*global* loss, whose batch statistics (FVU's variance, mean L0, ...) come from `batch_sum` /
`batch_mean`. Those are differentiable all-reduces, so the backward pass hands each rank W times
its share of the global gradient; averaging the ranks' gradients (`average_grads`) then gives
exactly the single-process gradient, up to summation order.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
from torch import Tensor

TIMEOUT = timedelta(minutes=30)
"""How long a rank waits for the others at a collective (an evaluation on rank 0 can take minutes)."""


@dataclass(frozen=True)
class Distributed:
    """This process's place in the group."""

    rank: int
    world_size: int
    local_rank: int
    device: str
    """The device this rank trains on (cuda:LOCAL_RANK on a GPU machine)."""

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run's files (config, checkpoints, logs, W&B)."""
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def broadcast_text(self, text: str) -> str:
        """Rank 0's string on every rank (e.g. a random run name)."""
        data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=self.device)
        length = torch.tensor([data.numel()], device=self.device)
        dist.broadcast(length, 0)
        buffer = data if self.is_main else torch.empty(int(length), dtype=torch.uint8, device=self.device)
        dist.broadcast(buffer, 0)
        return bytes(buffer.cpu().tolist()).decode()

    def broadcast_(self, tensors: Iterable[Tensor]) -> None:
        """Overwrite the tensors with rank 0's values (in place)."""
        for t in tensors:
            dist.broadcast(t.data, 0)

    def sum_(self, t: Tensor) -> Tensor:
        """In-place sum over the ranks (no autograd)."""
        dist.all_reduce(t)
        return t

    def gather_rows(self, x: Tensor) -> Tensor:
        """The ranks' equal-size row blocks concatenated in rank order: the global batch."""
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def average_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Mean of every parameter's gradient over the ranks, all transfers in flight at once."""
        grads = [p.grad for p in params if p.grad is not None]
        for work in [dist.all_reduce(g, async_op=True) for g in grads]:
            work.wait()
        for g in grads:
            g.div_(self.world_size)

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of n rows (n must divide evenly)."""
        if n % self.world_size:
            raise ValueError(
                f"batch size {n} does not split evenly over {self.world_size} processes; "
                f"use a --batch-size divisible by {self.world_size}"
            )
        per_rank = n // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def launched() -> bool:
    """True in a process torchrun started as one of several (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> Distributed | None:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA); None when this is a
    single process. `device` "cuda" becomes this rank's own GPU, cuda:LOCAL_RANK."""
    if not launched():
        return None
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {missing} are not: start the processes with torchrun")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    kind = torch.device(device).type
    if kind == "cuda":
        device = f"cuda:{local}" if torch.device(device).index is None else device
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo", timeout=TIMEOUT)
    return Distributed(rank, world, local, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# -- batch statistics over every rank's rows ---------------------------------------------------
_spanning: Distributed | None = None


@contextmanager
def batch_spans_ranks(group: Distributed | None) -> Iterator[None]:
    """While active (with a group), `batch_sum` and `batch_mean` reduce over every rank's rows;
    otherwise they are the plain local sum and mean."""
    global _spanning
    previous, _spanning = _spanning, group
    try:
        yield
    finally:
        _spanning = previous


def batch_sum(t: Tensor) -> Tensor:
    """t summed over the ranks (each rank's t a sum over its rows), differentiable."""
    if _spanning is None:
        return t
    if t.requires_grad:
        return dist_autograd.all_reduce(t)
    out = t.detach().clone()
    dist.all_reduce(out)
    return out


def batch_mean(t: Tensor) -> Tensor:
    """The mean over dim 0 of the global batch (every rank's rows, equal counts), differentiable."""
    if _spanning is None:
        return t.mean(dim=0)
    return batch_sum(t.sum(dim=0)) / (t.shape[0] * _spanning.world_size)
