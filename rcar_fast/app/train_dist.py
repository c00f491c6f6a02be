"""Training across processes (torchrun; gloo on CPU, NCCL on GPUs): the release's global-batch
loss computed from per-process shares, with autograd through every collective.

A global batch of B pairs is cut into contiguous shares (:func:`shares`: the first B mod W
processes take one pair more). Process r encodes its share's images and captions, gathers the
image embeddings of the whole batch (:func:`gather_rows`, autograd: the backward sums every
process's gradient for a row and hands the owner its rows), and scores all B images against
its n_r captions: columns o_r .. o_r + n_r of the global (B, B) score matrix S. Of the
release's hinge terms (:func:`rcar_fast.app.train.contrastive_loss`):

- a column's terms (a caption against every image, the hinge against S[j, j]) are all local;
- a row's terms (an image against every caption) need S[i, i], held by the process that owns
  caption i, so the diagonal is gathered with autograd; with max-violation each process takes
  its local row maxima, the maxima are gathered with autograd, and process r adds the rows of
  its own share, so every term is counted once.

The processes' losses sum to the release's loss on the whole batch; each backpropagates
W x its loss, since DistributedDataParallel averages the gradients (so they equal one
process's gradient of the global loss). The image encoder's BatchNorm takes its statistics
over the whole global batch (:class:`SyncBatchNorm1d`, a CPU-capable SyncBatchNorm), so the
forward, the running statistics and the gradients equal one process's on the same batch.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

Tensor = torch.Tensor


class TrainingStopped(RuntimeError):
    """Raised on every process when the run stops for a reason all of them agree on (a
    non-finite loss, or a set-up error on one of them); process 0 reports it."""


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def shares(n: int, world_size: int) -> List[int]:
    """How many pairs of a batch of ``n`` each process takes (contiguous, in rank order)."""
    return [n // world_size + (1 if r < n % world_size else 0) for r in range(world_size)]


def offset(counts: Sequence[int], r: int) -> int:
    return int(sum(counts[:r]))


def comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


class _GatherRows(torch.autograd.Function):
    """The rows of every process, concatenated in rank order; backward: the gradient summed
    over processes, each process keeping the rows it gave."""

    @staticmethod
    def forward(ctx, x: Tensor, counts: List[int]) -> Tensor:
        r = dist.get_rank()
        ctx.rows = (offset(counts, r), counts[r])
        width = max(counts)
        pad = x.new_zeros((width,) + tuple(x.shape[1:]))
        pad[:x.shape[0]] = x
        parts = [torch.empty_like(pad) for _ in counts]
        dist.all_gather(parts, pad.contiguous())
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        o, n = ctx.rows
        return grad[o:o + n], None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def gather_rows(x: Tensor, counts: Sequence[int]) -> Tensor:
    """Every process's ``x`` (counts[r] rows on process r) concatenated, with autograd."""
    if world() == 1:
        return x
    return _GatherRows.apply(x, list(counts))


def all_reduce_sum(x: Tensor) -> Tensor:
    """The sum over processes of ``x``, with autograd."""
    return x if world() == 1 else _AllReduceSum.apply(x)


class SyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training-mode statistics cover every process's rows (the same state
    dict as nn.BatchNorm1d). Alone in its process, or in eval mode, it is nn.BatchNorm1d."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or world() == 1:
            return super().forward(x)
        count = torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device)
        dist.all_reduce(count)
        n = float(count.item())
        mean = all_reduce_sum(x.sum(0)) / n
        var = all_reduce_sum((x - mean).pow(2).sum(0)) / n
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            self.running_var.mul_(1 - m).add_(var.detach() * (n / max(n - 1.0, 1.0)), alpha=m)
        y = (x - mean) / torch.sqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """Makes every nn.BatchNorm1d of ``model`` a :class:`SyncBatchNorm1d`, in place: the same
    module objects, parameters (the optimizer's references, requires_grad) and buffers, only
    the class changes; returns ``model``."""
    for module in model.modules():
        if type(module) is nn.BatchNorm1d:
            module.__class__ = SyncBatchNorm1d
    return model


def local_contrastive_loss(scores: Tensor, counts: Sequence[int], margin: float,
                           max_violation: bool) -> Tensor:
    """This process's part of the release's loss on the global batch (module docstring).

    scores: (B, n_r), all B images against this process's captions, which are columns
    o_r .. o_r + n_r of the global score matrix. The parts of all processes sum to
    ``contrastive_loss`` of the whole (B, B) matrix."""
    r = rank()
    B, n = scores.shape
    o = offset(counts, r)
    cols = torch.arange(n, device=scores.device)
    own = scores[o + cols, cols]                                     # S[j, j] for my captions j
    diag = gather_rows(own, counts)                                  # S[i, i] for every image i
    mask = torch.zeros(B, n, dtype=torch.bool, device=scores.device)
    mask[o + cols, cols] = True
    cost_s = (margin + scores - diag[:, None]).clamp(min=0).masked_fill(mask, 0)   # image i's row
    cost_im = (margin + scores - own[None, :]).clamp(min=0).masked_fill(mask, 0)   # caption j's column
    if not max_violation:
        return cost_s.sum() + cost_im.sum()
    row_max = gather_rows(cost_s.max(1)[0][None, :], [1] * len(counts)).max(0)[0]  # (B,) over processes
    return row_max[o:o + n].sum() + cost_im.max(0)[0].sum()


def agree(error: Optional[str]) -> None:
    """Every process learns whether any process failed (``error`` not None) and raises
    :class:`TrainingStopped` naming the failed processes; a no-op alone."""
    if world() == 1:
        if error is not None:
            raise TrainingStopped(error)
        return
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=comm_device())
    dist.all_reduce(flag)
    if int(flag.item()):
        errors: List[Optional[str]] = [None] * world()
        dist.all_gather_object(errors, error)
        failed = [(q, e) for q, e in enumerate(errors) if e is not None]
        same = len({e for _, e in failed}) == 1 and len(failed) == world()
        raise TrainingStopped(failed[0][1] if same else "; ".join(f"rank {q}: {e}" for q, e in failed))


def sum_over_processes(value: Tensor) -> Tensor:
    """A detached tensor summed over the processes (no autograd)."""
    if world() == 1:
        return value.detach()
    out = value.detach().clone().to(comm_device())
    dist.all_reduce(out)
    return out.to(value.device)


__all__ = ["SyncBatchNorm1d", "TrainingStopped", "agree", "all_reduce_sum", "gather_rows",
           "local_contrastive_loss", "offset", "rank", "shares", "sum_over_processes",
           "sync_batchnorm", "world"]
