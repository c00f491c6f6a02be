"""Exact scoring across processes (torch.distributed; gloo on CPU, NCCL on GPUs).

    torchrun --nproc_per_node 4 -m rcar_fast eval --data ... --checkpoint ...
    rcar_fast.retrieval.score_all(head, img, cap, lens, group=True)     # inside a process group

Every process plans the same tiles of the score matrix (retrieval.score_tiles: a function of
the sizes and lengths only) and owns a fixed share of them, balanced by cost (:func:`owners`:
the largest tiles first, each to the least-loaded process). A process scores only its tiles;
then the scores are gathered with ``all_gather_into_tensor`` (``all_gather_single`` in newer
torch; each process's tiles flattened in
plan order and padded to the longest share) and written into place by tile, so every process
returns the whole matrix and no score is ever summed with another or with a sentinel: the
result is bit-identical to one process's for the same backend, dtype and thread count (each
tile is the same computation wherever it runs).

Failure: a process whose tiles raise still joins the status exchange that precedes the gather,
so every process learns of it and raises :class:`DistributedScoringError` naming the failed
ranks and their errors; no process waits on a collective that will never come. The process
group's timeout bounds the rest (a process that died outright): `launch` sets it.
Progress: process 0 shows one bar for every process's pairs, through the group's key-value
store where there is one (each process adds its pairs as it finishes a tile).
"""

from __future__ import annotations

import contextlib
import datetime
import heapq
import os
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist

Tensor = torch.Tensor
_PROGRESS_KEY = "rcar_fast/score_all/pairs"


class DistributedScoringError(RuntimeError):
    """Raised on every process when scoring failed on one or more of them."""


def tile_cost(tile, lens_cpu: Tensor, attn_type: str) -> float:
    """A tile's cost, proportional to its work: in t2i a pair's work grows with its caption's
    length (every product runs over the words), in i2t mostly not (the regions are the queries),
    plus a fixed part per pair."""
    n_img = tile.i1 - tile.i0
    lens = lens_cpu[tile.cols].double()
    per_pair = lens + 8.0 if attn_type == "t2i" else 36.0 + 0.25 * lens
    return float(n_img * per_pair.sum())


def owners(costs: Sequence[float], world: int) -> List[int]:
    """The owning rank of every tile: the largest first, each to the least-loaded rank (ties to
    the lower rank, then the lower tile index): deterministic, so every process agrees."""
    order = sorted(range(len(costs)), key=lambda k: (-costs[k], k))
    heap = [(0.0, r) for r in range(world)]
    out = [0] * len(costs)
    for k in order:
        load, r = heapq.heappop(heap)
        out[k] = r
        heapq.heappush(heap, (load + costs[k], r))
    return out


def describe(exc: BaseException) -> str:
    """``Type: first line of the message``: how a process's error is reported to the others."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _comm_device(group) -> torch.device:
    """Where the group's collectives take their tensors: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_all(error: Optional[str], group=None, what: str = "scoring") -> None:
    """Every process of the group calls this at the same point with its own error (None when it
    is fine); if any process failed, every one raises :class:`DistributedScoringError` naming
    the failed ranks and their errors, so no process goes on to wait on a collective the failed
    ones will never join."""
    failed = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=_comm_device(group))
    dist.all_reduce(failed, group=group)
    if int(failed.item()):
        errors = [None] * dist.get_world_size(group)
        dist.all_gather_object(errors, error, group=group)
        ranks = {}                     # message -> the ranks that raised it, in rank order
        for q, e in enumerate(errors):
            if e is not None:
                ranks.setdefault(e, []).append(q)
        raise DistributedScoringError(f"{what} failed on " + "; ".join(
            f"rank{'s' if len(qs) > 1 else ''} {', '.join(map(str, qs))}: {e}" for e, qs in ranks.items()))


@contextlib.contextmanager
def together(group=None, what: str = "preparing"):
    """``with together(group, "loading"):`` a step every process runs; an exception in it on any
    process raises :class:`DistributedScoringError` on every process at the block's end (the
    processes agree there: every one must reach it). Without a group (None, False, or
    torch.distributed not initialised) the block's exceptions pass through unchanged."""
    if group is True:
        group = dist.group.WORLD
    if group is None or group is False or not in_group():
        yield
        return
    error = None
    try:
        yield
    except Exception as exc:
        error = describe(exc)
    check_all(error, group, what)


def _store(group):
    try:
        from torch.distributed.distributed_c10d import _get_default_store
        return _get_default_store() if group is None or group == dist.group.WORLD else None
    except Exception:   # no store where the group was made another way: a bar of process 0's share
        return None


def score_tiles_distributed(tiles, compute: Callable, n_i: int, n_c: int, lens_cpu: Tensor, attn_type: str,
                            group=None, progress: Optional[bool] = None, desc: str = "scoring") -> Tensor:
    """The (n_i, n_c) matrix of ``tiles`` scored by ``compute(tile)`` across the group's
    processes (module docstring); every process returns it whole."""
    from .retrieval import _Progress
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: torch.distributed is not initialised (init_process_group first, or "
                         "run under torchrun)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    own = owners([tile_cost(t, lens_cpu, attn_type) for t in tiles], world)
    mine = [k for k, r in enumerate(own) if r == rank]
    sizes = [sum(tiles[k].pairs for k, r in enumerate(own) if r == q) for q in range(world)]
    store = _store(group)
    if store is not None and rank == 0:
        store.set(_PROGRESS_KEY, "0")
    dist.barrier(group)                                   # the counter exists before anyone adds
    bar = _Progress(n_i * n_c, progress, desc) if rank == 0 else None
    local = torch.full((max(sizes),), float("nan"), dtype=torch.float32)
    error = None
    try:
        pos, done = 0, 0
        for k in mine:
            t = tiles[k]
            local[pos:pos + t.pairs] = compute(t).reshape(-1)
            pos += t.pairs
            if store is not None:
                total = store.add(_PROGRESS_KEY, t.pairs)
                if bar is not None:
                    bar.update(total - done)
                    done = total
            elif bar is not None:
                bar.update(t.pairs)
    except Exception as exc:   # joined below, so that every process hears of it
        error = describe(exc)
    finally:
        if bar is not None:
            bar.close()
    check_all(error, group, "scoring")
    comm_device = _comm_device(group)
    gathered = torch.empty(world * local.numel(), dtype=torch.float32, device=comm_device)
    # all_gather_into_tensor (renamed all_gather_single in newer torch): equal-sized, padded shares
    gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather_single(gathered, local.to(comm_device), group=group)
    gathered = gathered.cpu().view(world, -1)
    out = torch.empty(n_i, n_c, dtype=torch.float32)
    pos = [0] * world
    for k, t in enumerate(tiles):
        q = own[k]
        out[t.i0:t.i1, t.cols] = gathered[q, pos[q]:pos[q] + t.pairs].view(t.i1 - t.i0, len(t.cols))
        pos[q] += t.pairs
    return out


# ----------------------------------------------------------------------------- processes

def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch(device: torch.device, timeout_s: float = 1800.0) -> None:
    """Join the process group torchrun describes (env://): gloo for CPU scoring, NCCL for CUDA
    (each process on its LOCAL_RANK's GPU), every collective bounded by ``timeout_s``."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(process_device(device).index or 0)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def env_rank() -> int:
    """This process's rank as the launcher set it (RANK; 0 without one), before any group exists."""
    return int(os.environ.get("RANK", "0"))


def process_device(device: torch.device) -> torch.device:
    """Under torchrun, ``cuda`` without an index means this process's GPU, cuda:LOCAL_RANK."""
    if device.type == "cuda" and device.index is None and under_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def total(n: int, group=None) -> int:
    """The sum of ``n`` over the group's processes."""
    t = torch.tensor([int(n)], dtype=torch.int64, device=_comm_device(group))
    dist.all_reduce(t, group=group)
    return int(t.item())


def barrier() -> None:
    """Wait for every process of the default group (nothing without one)."""
    if in_group():
        dist.barrier()


def finish() -> None:
    """Leave the process group, if this process is in one."""
    if in_group():
        dist.destroy_process_group()


def in_group() -> bool:
    """Whether this process is in a process group (torchrun, after :func:`launch`)."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the default group (1 without one)."""
    return dist.get_world_size() if in_group() else 1


def is_main() -> bool:
    """True on the process that prints and writes (rank 0, or a run without a group)."""
    return not in_group() or dist.get_rank() == 0
