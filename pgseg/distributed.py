"""The collective operations the losses and the prototype EMA need, handed to the model once.

The model never asks torch.distributed for ranks itself: whoever builds it (the training step) gives it a
:class:`Collectives` — the world of one by default, :meth:`Collectives.from_process_group` inside an initialised
process group (ARCHITECTURE: configured once, like open_clip's ``ClipLoss(rank, world_size)``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn

# its suggested replacement is private API; the autograd all_gather stays the public way to gather with gradient
warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")


def _sendable(x: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``x`` the process group's backend can send (NCCL sends device tensors only)."""
    out = x.detach().clone()
    if dist.get_backend() == "nccl" and not out.is_cuda:
        out = out.cuda()
    return out


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward hands on a contiguous gradient: the autograd all_gather sends each part's
    gradient back to its rank as it gets it, and gloo sends a strided view's memory as if it were contiguous (a
    gradient that ``torch.cat``'s backward slices out of a transposed or expanded tensor came back wrong)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


@dataclass(frozen=True)
class Collectives:
    """This process's place in the world and the two collectives of a training step. ``Collectives()`` is a world
    of one: ``gather`` and ``mean`` return their input."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_process_group(cls) -> "Collectives":
        """The initialised default process group's rank and size (a world of one outside of one)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate ``x`` [b, ...] from every rank along dim 0 ([W·b, ...]); gradients flow back to each rank."""
        if self.world == 1:
            return x
        return torch.cat([_ContiguousGrad.apply(part) for part in dist_nn.all_gather(x.contiguous())], dim=0)

    @torch.no_grad()
    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of ``x`` over ranks (a new tensor; ``x`` is untouched)."""
        if self.world == 1:
            return x
        return self.total(x) / self.world

    @torch.no_grad()
    def total(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over ranks (a new tensor; ``x`` is untouched)."""
        if self.world == 1:
            return x
        out = _sendable(x)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(x.device)

    @torch.no_grad()
    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``x`` on every rank (a new tensor; ``x`` is untouched)."""
        if self.world == 1:
            return x
        out = _sendable(x)
        dist.broadcast(out, src=src)
        return out.to(x.device)


SINGLE = Collectives()
