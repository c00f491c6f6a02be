"""Retrieval: all-pairs scoring, the recall metrics of the RCAR release, two-stage search.

Scoring. :func:`score_all` fills the (N_i, N_c) score matrix tile by tile with any backend
(``backend=`` as everywhere in rcar_fast), features moved to the head's device one tile at a
time, optionally in float16/bfloat16, with a tqdm progress bar on long runs (none if tqdm is
not installed). :func:`average_scores` averages several matrices: the published "ALL" rows
average a t2i model's and an i2t model's scores.

Metrics, as the release's ``lib/evaluation.py`` (i2t, t2i): caption j belongs to image j // 5.
  i2t: every image ranks all captions; its rank is the best rank of its five captions.
  t2i: every caption ranks all images; its rank is that of its image.
  R@K = percent of queries with rank < K (0-based ranks); medr = floor(median rank) + 1;
  meanr = mean rank + 1; rsum = the six recalls summed.
Ties (``ties=``): "pessimistic", the default, is the release's rule as this module states it: a
non-matching item that scores exactly as much as the best match counts as ranked ahead of it
(the release's argsort leaves ties to the sort; a constant score matrix here gets the worst
ranks, not the best). "expected" takes the expectation over a uniformly random order of every
tied block instead: a query with ``a`` non-matches above its best match, ``g`` non-matches
tied with it and ``m`` of its own items tied with it (m = 1 in t2i) has the expected rank
``a + g / (m + 1)``, and R@K counts ``P(rank < K)`` under that random order; medr is
floor(median of the expected ranks) + 1, meanr the mean expected rank + 1. The two agree
wherever no match ties a non-match; half-precision scores tie often (README, "Evaluate a
release checkpoint"). Scores must be finite.
Protocols: Flickr30K 1K test and MSCOCO 5K score the whole split; MSCOCO 1K is the average
of the metrics (medr and meanr too) over five folds of 1,000 images and their 5,000 captions.

Two-stage search (:func:`two_stage`). A cheap global prefilter, the cosine between the
mean of an image's regions and the mean of a caption's valid words, picks the top K captions
of every image and the top K images of every caption; RCAR scores only those pairs (each pair
once, though both directions may ask for it). Items the prefilter dropped keep their prefilter
order behind the re-ranked K. With K >= the candidate count it is exhaustive scoring. Ties
count against the match at every step: in the re-ranking, among the dropped items, and at the
cut (where the K-th place ties, non-matches take the places first, then lower indices).
:func:`compare_two_stage` reports the recall lost and the time saved against exhaustive.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .. import validate as V

Tensor = torch.Tensor

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
          "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
#: a run of at least this many pairs gets a progress bar when ``progress=None``
PROGRESS_MIN_PAIRS = 200_000
#: pairs per tile: a progress step (and a device transfer) every few seconds
TILE_PAIRS = {"cpu": 1 << 15, "cuda": 1 << 22}
#: bytes a tile's input features may take on the device when no memory budget is given
TILE_INPUT_BYTES = {"cpu": 256 << 20, "cuda": 2 << 30}


def resolve_dtype(dtype) -> Optional[torch.dtype]:
    """None, a torch floating dtype, or one of "fp32", "fp16", "bf16" (and their long names)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if isinstance(dtype, torch.dtype) and not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating-point dtype, got {dtype}")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in DTYPES:
        return DTYPES[dtype.lower()]
    raise ValueError(f"dtype: expected one of fp32, fp16, bf16 or a torch dtype, got {dtype!r}")


def _head_device(head: nn.Module) -> torch.device:
    p = next(iter(head.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _head_in(head: nn.Module, dtype: Optional[torch.dtype]) -> nn.Module:
    """``head`` in eval mode (RAR dropout off) and in ``dtype``; a copy when either has to
    change, so the caller's head is left as it was."""
    p = next(iter(head.parameters()), None)
    if (dtype is not None and p is not None and p.dtype != dtype) or head.training:
        head = copy.deepcopy(head).eval()
        if dtype is not None:
            head = head.to(dtype)
    return head


class _Progress:
    """A tqdm bar counting pairs, or nothing (tqdm missing, or not wanted)."""

    def __init__(self, total: int, progress: Optional[bool], desc: str):
        self.bar = None
        want = total >= PROGRESS_MIN_PAIRS if progress is None else bool(progress)
        if want:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, desc=desc, unit="pair", unit_scale=True, leave=False,
                            file=sys.stderr)

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


#: a matrix of at least MIN_TILES x MIN_TILE_PAIRS pairs is cut into at least MIN_TILES tiles (of
#: 2048 pairs or more: smaller tiles cost measurably on the CPU, 1000-pair tiles 13% for cpp),
#: whatever the process count: enough to share among processes (rcar_fast.app.distributed), and
#: the same tiles on one process, so that the scores are bit-identical (a pair's last bits
#: depend on the block it is computed in)
MIN_TILES, MIN_TILE_PAIRS = 16, 2048


def plan_tiles(n_i: int, n_c: int, regions: int, max_len: int, dim: int, itemsize: int,
               device_type: str = "cpu", memory_budget: Optional[int] = None,
               tile_pairs: Optional[int] = None) -> Tuple[int, int]:
    """(images per tile, captions per tile): the input features of one tile fit in
    ``memory_budget`` bytes (default 256 MiB on CPU, 2 GiB on GPU; the backend's own working
    set is bounded by the same budget, block by block), and a tile has about ``tile_pairs``
    pairs (default 32K on CPU, 4M on GPU, and at most 1/MIN_TILES of a large matrix) so that
    progress is reported every few seconds and processes can share the tiles."""
    budget = memory_budget or TILE_INPUT_BYTES.get(device_type, TILE_INPUT_BYTES["cuda"])
    pairs = tile_pairs or min(TILE_PAIRS.get(device_type, TILE_PAIRS["cuda"]),
                              max(MIN_TILE_PAIRS, n_i * n_c // MIN_TILES))
    per_img, per_cap = regions * dim * itemsize, max(1, max_len) * dim * itemsize
    tc = max(1, min(n_c, budget // 2 // per_cap))
    ti = max(1, min(n_i, budget // 2 // per_img, max(1, pairs // tc)))
    if ti == n_i:   # all images fit in one tile: spend the pair count on captions instead
        tc = max(1, min(n_c, budget // 2 // per_cap, max(tc, pairs // max(1, n_i))))
    return ti, tc


@dataclass(frozen=True)
class Tile:
    """One tile of the score matrix: images i0..i1 x the captions ``cols`` (one length order)."""
    i0: int
    i1: int
    cols: Tensor          # caption indices (int64, CPU), sorted by length
    max_len: int          # the longest caption among them (the tile's padded length)

    @property
    def pairs(self) -> int:
        return (self.i1 - self.i0) * len(self.cols)


def score_tiles(n_i: int, cap_lens: Tensor, regions: int, max_len: int, dim: int, itemsize: int,
                device_type: str = "cpu", memory_budget: Optional[int] = None,
                tile: Optional[Tuple[int, int]] = None) -> List[Tile]:
    """The tiles :func:`score_all` computes, in order: captions sorted by length (stable), cut
    into runs of the tile's caption count, each against every run of images. A function of the
    sizes and lengths only, so every process of a distributed run plans the same tiles."""
    n_c = int(cap_lens.shape[0])
    ti, tc = tile or plan_tiles(n_i, n_c, regions, max_len, dim, itemsize, device_type, memory_budget)
    if ti < 1 or tc < 1:
        raise ValueError(f"tile: expected two positive sizes, got {tile!r}")
    lens_cpu = cap_lens.cpu()
    order = torch.argsort(lens_cpu, stable=True)
    out = []
    for c0 in range(0, n_c, tc):
        cidx = order[c0:c0 + tc]
        Lt = int(lens_cpu[cidx].max())
        for i0 in range(0, n_i, ti):
            out.append(Tile(i0, min(n_i, i0 + ti), cidx, Lt))
    return out


def score_tile(head: nn.Module, img: Tensor, cap: Tensor, lens_cpu: Tensor, tile: Tile, device: torch.device,
               dtype: torch.dtype, backend: str, memory_budget: Optional[int]) -> Tensor:
    """The (i1 - i0, len(cols)) float32 CPU scores of one tile (features moved to the head's
    device and cast there, one tile at a time)."""
    cap_t = cap[tile.cols.to(cap.device), :tile.max_len].to(device=device, dtype=dtype)
    img_t = img[tile.i0:tile.i1].to(device=device, dtype=dtype)
    with torch.no_grad():
        s = head(img_t, cap_t, lens_cpu[tile.cols].to(device), backend=backend, memory_budget=memory_budget)
    return s.float().cpu()


def score_all(head: nn.Module, img: Tensor, cap: Tensor, cap_lens, backend: str = "auto",
              dtype=None, memory_budget: Optional[int] = None, progress: Optional[bool] = None,
              tile: Optional[Tuple[int, int]] = None, desc: str = "scoring", group=None) -> Tensor:
    """Scores every image against every caption: (N_i, N_c) float32 on the CPU.

    head: an :class:`rcar_fast.RCARSimilarity` (or a module with its forward signature); it
    runs on its own device in eval mode (a copy of it, if it was training).
    img (N_i, R, d), cap (N_c, L, d), cap_lens (N_c,): features, on any device (moved to the
    head's device, and cast to its dtype, one tile at a time).
    backend: as :func:`rcar_fast.ops.rcar_scores`. dtype: None (the head's dtype), or
    "fp16"/"bf16"/"fp32" (features and a copy of the head are cast; the head's last Linear,
    sigmoid and scores stay float32, see :func:`rcar_fast.ops.rcar_scores`). memory_budget:
    bytes for one tile's features, also passed to the backend as its per-block budget.
    progress: None = a bar for runs of 200K pairs or more, True/False.
    tile: (images, captions) per tile instead of :func:`plan_tiles`'s choice.
    Captions are tiled in order of length, so a tile pads only to its own longest caption.
    group: a torch.distributed process group (or True for the default one): the tiles are shared
    out among its processes, balanced by cost, and every process returns the whole matrix,
    bit-identical to one process's (rcar_fast.app.distributed); a failure on any process raises
    on every one.
    """
    cap_lens = V.check_features(img, cap, cap_lens).tensor
    dtype = resolve_dtype(dtype)
    if memory_budget is not None and (isinstance(memory_budget, bool) or not isinstance(memory_budget, int)
                                      or memory_budget <= 0):
        raise ValueError(f"memory_budget: expected a positive int of bytes, got {memory_budget!r}")
    device = _head_device(head)
    run_dtype = dtype or next((p.dtype for p in head.parameters()), img.dtype)
    head = _head_in(head, dtype)
    n_i, R, d = img.shape
    n_c, L = cap.shape[0], cap.shape[1]
    if n_i == 0 or n_c == 0:
        return torch.empty(n_i, n_c, dtype=torch.float32)
    itemsize = torch.empty((), dtype=run_dtype).element_size()
    tiles = score_tiles(n_i, cap_lens, R, L, d, itemsize, device.type, memory_budget, tile)
    lens_cpu = cap_lens.cpu()

    def compute(t: Tile) -> Tensor:
        return score_tile(head, img, cap, lens_cpu, t, device, run_dtype, backend, memory_budget)
    if group is not None and group is not False:
        from .distributed import score_tiles_distributed
        return score_tiles_distributed(tiles, compute, n_i, n_c, lens_cpu, getattr(head, "attn_type", "t2i"),
                                       None if group is True else group, progress, desc)
    out = torch.empty(n_i, n_c, dtype=torch.float32)
    bar = _Progress(n_i * n_c, progress, desc)
    try:
        for t in tiles:
            out[t.i0:t.i1, t.cols] = compute(t)
            bar.update(t.pairs)
    finally:
        bar.close()
    return out


def average_scores(score_matrices: Sequence[Tensor]) -> Tensor:
    """The element-wise mean of several (N_i, N_c) score matrices (float32 or wider)."""
    mats = list(score_matrices)
    if not mats:
        raise ValueError("score_matrices: expected at least one matrix")
    for k, m in enumerate(mats):
        V.check_float(f"score_matrices[{k}]", m, 2)
        if m.shape != mats[0].shape:
            raise ValueError(f"score_matrices[{k}]: shape {tuple(m.shape)} differs from "
                             f"{tuple(mats[0].shape)}")
    acc = torch.zeros(mats[0].shape, dtype=torch.promote_types(mats[0].dtype, torch.float32))
    for m in mats:
        acc += m.to(device="cpu", dtype=acc.dtype)
    return acc / len(mats)


# ----------------------------------------------------------------------------- metrics

def _check_sims(sims, captions_per_image: int) -> Tensor:
    if isinstance(sims, np.ndarray):
        sims = torch.from_numpy(sims)
    V.check_float("sims", sims, 2)
    if isinstance(captions_per_image, bool) or not isinstance(captions_per_image, int) or captions_per_image < 1:
        raise ValueError(f"captions_per_image: expected a positive int, got {captions_per_image!r}")
    n_i, n_c = sims.shape
    if n_c != captions_per_image * n_i or n_i == 0:
        raise ValueError(f"sims: expected shape (N, {captions_per_image}N) with N >= 1 (caption j "
                         f"belongs to image j // {captions_per_image}), got {tuple(sims.shape)}")
    if not bool(torch.isfinite(sims).all()):
        raise ValueError("sims: holds NaN or infinite scores")
    return sims.cpu()


TIES = ("pessimistic", "expected")


def _check_ties(ties) -> str:
    if not isinstance(ties, str) or ties not in TIES:
        raise ValueError(f"ties: expected 'pessimistic' or 'expected', got {ties!r}")
    return ties


def _check_chunk(chunk) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
    return chunk


def i2t_tie_counts(sims, captions_per_image: int = 5, chunk: int = 256) -> Tuple[Tensor, Tensor, Tensor]:
    """Per image, (N_i,) int64 each: non-matching captions scoring above its best own caption,
    non-matching captions scoring exactly as much, and own captions scoring exactly as much
    (at least 1). Rows are processed ``chunk`` images at a time."""
    sims = _check_sims(sims, captions_per_image)
    k, chunk = captions_per_image, _check_chunk(chunk)
    n_i = sims.shape[0]
    ahead, tied, tied_own = (torch.empty(n_i, dtype=torch.int64) for _ in range(3))
    for r0 in range(0, n_i, chunk):
        rows = sims[r0:r0 + chunk]
        n = rows.shape[0]
        img_idx = torch.arange(r0, r0 + n)                     # global image indices
        gt_cols = img_idx[:, None] * k + torch.arange(k)[None, :]
        own = rows.gather(1, gt_cols)
        best = own.max(dim=1).values[:, None]
        others = rows.clone()
        others.scatter_(1, gt_cols, -math.inf)                 # scores are finite: never tie
        ahead[r0:r0 + n] = (others > best).sum(dim=1)
        tied[r0:r0 + n] = (others == best).sum(dim=1)
        tied_own[r0:r0 + n] = (own == best).sum(dim=1)
    return ahead, tied, tied_own


def t2i_tie_counts(sims, captions_per_image: int = 5, chunk: int = 1024) -> Tuple[Tensor, Tensor, Tensor]:
    """Per caption, (N_c,) int64 each: other images scoring above its own image, other images
    scoring exactly as much, and 1 (its one image; the form of :func:`i2t_tie_counts`).
    Columns are processed ``chunk`` captions at a time."""
    sims = _check_sims(sims, captions_per_image)
    k, chunk = captions_per_image, _check_chunk(chunk)
    n_c = sims.shape[1]
    ahead, tied = torch.empty(n_c, dtype=torch.int64), torch.empty(n_c, dtype=torch.int64)
    for c0 in range(0, n_c, chunk):
        cols = sims[:, c0:c0 + chunk].t()                      # (n, N_i)
        n = cols.shape[0]
        gt = torch.arange(c0, c0 + n) // k                     # global caption index -> image
        own = cols.gather(1, gt[:, None])
        others = cols.clone()
        others.scatter_(1, gt[:, None], -math.inf)
        ahead[c0:c0 + n] = (others > own).sum(dim=1)
        tied[c0:c0 + n] = (others == own).sum(dim=1)
    return ahead, tied, torch.ones(n_c, dtype=torch.int64)


def _ranks_from_counts(counts, ties: str) -> Tensor:
    ahead, tied, tied_own = counts
    if ties == "pessimistic":
        return ahead + tied
    return ahead.double() + tied.double() / (tied_own.double() + 1.0)


def i2t_ranks(sims, captions_per_image: int = 5, chunk: int = 256, ties: str = "pessimistic") -> Tensor:
    """(N_i,) 0-based rank of each image's best-ranked own caption among all captions: int64
    under ``ties="pessimistic"`` (tied non-matches ahead), float64 expected ranks under
    ``"expected"`` (see the module docstring)."""
    ties = _check_ties(ties)
    return _ranks_from_counts(i2t_tie_counts(sims, captions_per_image, chunk), ties)


def t2i_ranks(sims, captions_per_image: int = 5, chunk: int = 1024, ties: str = "pessimistic") -> Tensor:
    """(N_c,) 0-based rank of each caption's image among all images (``ties`` as
    :func:`i2t_ranks`)."""
    ties = _check_ties(ties)
    return _ranks_from_counts(t2i_tie_counts(sims, captions_per_image, chunk), ties)


METRIC_NAMES = ("r1", "r5", "r10", "medr", "meanr")
RECALL_AT = (1, 5, 10)


def recall_from_ranks(ranks) -> Tuple[float, float, float, float, float]:
    """(R@1, R@5, R@10 in percent, medr, meanr) of 0-based ranks, as the release computes them."""
    r = np.asarray(ranks.cpu() if isinstance(ranks, Tensor) else ranks, dtype=np.float64)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"ranks: expected a non-empty 1-d array, got shape {r.shape}")
    return (100.0 * float(np.mean(r < 1)), 100.0 * float(np.mean(r < 5)),
            100.0 * float(np.mean(r < 10)), float(np.floor(np.median(r)) + 1), float(r.mean() + 1))


def recall_from_counts(counts, ties: str = "pessimistic") -> Tuple[float, float, float, float, float]:
    """(R@1, R@5, R@10, medr, meanr) from (ahead, tied, tied_own) counts
    (:func:`i2t_tie_counts`, :func:`t2i_tie_counts`) under the ``ties`` rule.

    "expected": with t = K - ahead, P(rank < K) is 0 for t <= 0, 1 for t > tied, else
    1 - C(tied, t) / C(tied + tied_own, t) (the first t of the tied block are all non-matches
    with that probability)."""
    ties = _check_ties(ties)
    if ties == "pessimistic":
        return recall_from_ranks(_ranks_from_counts(counts, ties))
    ahead, tied, own = (c.double() for c in counts)
    recalls = []
    for K in RECALL_AT:
        t = K - ahead
        all_others = torch.ones_like(ahead)                    # P(first t tied are non-matches)
        for j in range(K):
            step = torch.where(tied > j, (tied - j) / (tied + own - j).clamp(min=1.0), 0.0)
            all_others = torch.where(t > j, all_others * step, all_others)
        p = torch.where(t <= 0, 0.0, torch.where(t > tied, 1.0, 1.0 - all_others))
        recalls.append(100.0 * float(p.mean()))
    r = _ranks_from_counts(counts, ties).numpy()
    return (recalls[0], recalls[1], recalls[2], float(np.floor(np.median(r)) + 1), float(r.mean() + 1))


@dataclass
class Recall:
    """i2t and t2i (R@1, R@5, R@10, medr, meanr); rsum is the six recalls summed."""
    i2t: Tuple[float, float, float, float, float]
    t2i: Tuple[float, float, float, float, float]

    @property
    def rsum(self) -> float:
        return float(sum(self.i2t[:3]) + sum(self.t2i[:3]))

    def as_dict(self) -> Dict[str, float]:
        d = {f"i2t_{n}": v for n, v in zip(METRIC_NAMES, self.i2t)}
        d.update({f"t2i_{n}": v for n, v in zip(METRIC_NAMES, self.t2i)})
        d["rsum"] = self.rsum
        return d

    def lines(self) -> List[str]:
        """The release's report: rsum, then R@1 R@5 R@10 medr meanr per direction."""
        return [f"rsum: {self.rsum:.1f}",
                "Image to text: " + " ".join(f"{v:.1f}" for v in self.i2t),
                "Text to image: " + " ".join(f"{v:.1f}" for v in self.t2i)]


def recall_from_rank_arrays(i2t: Tensor, t2i: Tensor) -> Recall:
    return Recall(recall_from_ranks(i2t), recall_from_ranks(t2i))


def recall_metrics(sims, captions_per_image: int = 5, ties: str = "pessimistic") -> Recall:
    """i2t and t2i metrics of one (N, 5N) score matrix (Flickr30K 1K test, MSCOCO 5K).
    ``ties``: "pessimistic" (the release's rule, default) or "expected" (module docstring)."""
    ties = _check_ties(ties)
    return Recall(recall_from_counts(i2t_tie_counts(sims, captions_per_image), ties),
                  recall_from_counts(t2i_tie_counts(sims, captions_per_image), ties))


def average_recall(results: Sequence[Recall]) -> Recall:
    """Every number averaged over ``results`` (the release's five-fold MSCOCO 1K)."""
    results = list(results)
    if not results:
        raise ValueError("results: expected at least one Recall")
    mean = lambda rows: tuple(float(np.mean(col)) for col in zip(*rows))
    return Recall(mean([r.i2t for r in results]), mean([r.t2i for r in results]))


def fold_slices(n_images: int, folds: int = 5, captions_per_image: int = 5) -> List[Tuple[slice, slice]]:
    """(image slice, caption slice) of each fold: MSCOCO 1K is 5 folds of 1,000 images."""
    if n_images % folds:
        raise ValueError(f"n_images: {n_images} images do not split into {folds} equal folds")
    n = n_images // folds
    return [(slice(f * n, (f + 1) * n), slice(f * n * captions_per_image, (f + 1) * n * captions_per_image))
            for f in range(folds)]


def fold5_metrics(sims, captions_per_image: int = 5, ties: str = "pessimistic") -> Tuple[Recall, List[Recall]]:
    """(average, per fold) metrics over five folds of a full (N, 5N) matrix (MSCOCO 1K)."""
    sims = _check_sims(sims, captions_per_image)
    ties = _check_ties(ties)
    per = [recall_metrics(sims[si, sc], captions_per_image, ties)
           for si, sc in fold_slices(sims.shape[0], 5, captions_per_image)]
    return average_recall(per), per


# ----------------------------------------------------------------------------- two-stage

def global_embeddings(img: Tensor, cap: Tensor, cap_lens, chunk: int = 4096) -> Tuple[Tensor, Tensor]:
    """l2-normalised means: of each image's regions (N_i, d) and each caption's valid words
    (N_c, d), in float32 on the features' device (padding is never read)."""
    cap_lens = V.check_features(img, cap, cap_lens).tensor.to(cap.device)
    gi = img.float().mean(dim=1)
    parts = []
    for c0 in range(0, cap.shape[0], chunk):
        c = cap[c0:c0 + chunk].float()
        ln = cap_lens[c0:c0 + chunk]
        valid = torch.arange(c.shape[1], device=c.device)[None, :] < ln[:, None]
        parts.append(torch.where(valid[..., None], c, 0.0).sum(dim=1) / ln[:, None].float())
    gc = torch.cat(parts) if parts else cap.new_zeros(0, cap.shape[2], dtype=torch.float32)
    l2n = lambda x: x / (x.norm(dim=-1, keepdim=True) + 1e-8)
    return l2n(gi), l2n(gc)


def prefilter_scores(img: Tensor, cap: Tensor, cap_lens) -> Tensor:
    """Cosine of mean-pooled embeddings, (N_i, N_c) float32 on the CPU: the cheap first stage."""
    gi, gc = global_embeddings(img, cap, cap_lens)
    return (gi @ gc.t()).cpu()


@dataclass
class Scorer:
    """One model's view of a split: its head and the features its encoders made."""
    head: nn.Module
    img: Tensor
    cap: Tensor
    lens: Tensor


def score_pairs(head: nn.Module, img: Tensor, cap: Tensor, cap_lens, pair_img: Tensor,
                pair_cap: Tensor, backend: str = "auto", dtype=None,
                memory_budget: Optional[int] = None, max_images: int = 4096,
                progress: Optional[bool] = None, desc: str = "re-ranking",
                tile_pairs: Optional[int] = None) -> Tensor:
    """Scores of the listed (image, caption) pairs, (P,) float32 on the CPU.

    A head with ``pair_scores`` (RCARSimilarity) scores the list in tiles of at most
    ``tile_pairs`` pairs (default TILE_PAIRS for the head's device, and as many as keep the
    tile's distinct images and captions within TILE_INPUT_BYTES), ONE pair-list call per tile
    (rcar_fast.ops.pair_scores: the kernels take the list). Any other head scores grids, so its
    pairs are grouped by caption: one call per caption scores its listed images (at most
    ``max_images`` per call). Same arguments as :func:`score_all`.
    """
    cap_lens = V.check_features(img, cap, cap_lens).tensor
    dtype = resolve_dtype(dtype)
    device = _head_device(head)
    run_dtype = dtype or next((p.dtype for p in head.parameters()), img.dtype)
    head = _head_in(head, dtype)
    if not isinstance(pair_img, Tensor) or not isinstance(pair_cap, Tensor) \
            or pair_img.shape != pair_cap.shape or pair_img.dim() != 1:
        raise ValueError("pair_img, pair_cap: expected two 1-d index tensors of one length")
    pair_img, pair_cap = pair_img.cpu().long(), pair_cap.cpu().long()
    out = torch.empty(pair_img.shape[0], dtype=torch.float32)
    if pair_img.numel() == 0:
        return out
    for name, idx, n in (("pair_img", pair_img, img.shape[0]), ("pair_cap", pair_cap, cap.shape[0])):
        if int(idx.min()) < 0 or int(idx.max()) >= n:
            raise ValueError(f"{name}: indices must be in [0, {n})")
    order = torch.argsort(pair_cap * img.shape[0] + pair_img)
    lens_cpu = cap_lens.cpu()
    bar = _Progress(int(pair_img.numel()), progress, desc)
    try:
        with torch.no_grad():
            if callable(getattr(head, "pair_scores", None)):
                per_pair = (img.shape[1] + cap.shape[1]) * img.shape[2] * torch.finfo(run_dtype).bits // 8
                n_tile = tile_pairs or min(TILE_PAIRS.get(device.type, TILE_PAIRS["cuda"]),
                                           max(1, TILE_INPUT_BYTES.get(device.type, TILE_INPUT_BYTES["cuda"]) // per_pair))
                for s0 in range(0, order.numel(), n_tile):
                    part = order[s0:s0 + n_tile]
                    out[part] = _score_pair_tile(head, img, cap, lens_cpu, pair_img[part], pair_cap[part], device,
                                                 run_dtype, backend, memory_budget)
                    bar.update(int(part.numel()))
            else:
                _score_pairs_by_caption(head, img, cap, lens_cpu, pair_img, pair_cap, order, device, run_dtype,
                                        backend, memory_budget, max_images, out, bar)
    finally:
        bar.close()
    return out


def _score_pair_tile(head, img, cap, lens_cpu, pi, pc, device, run_dtype, backend, memory_budget) -> Tensor:
    """One pair_scores call for the pairs (pi[m], pc[m]): only the tile's distinct images and
    captions go to the device (captions cut to the tile's longest)."""
    ui, li = torch.unique(pi, return_inverse=True)
    uc, lc = torch.unique(pc, return_inverse=True)
    lens_t = lens_cpu[uc]
    img_t = img[ui.to(img.device)].to(device=device, dtype=run_dtype)
    cap_t = cap[uc.to(cap.device), :int(lens_t.max())].to(device=device, dtype=run_dtype)
    s = head.pair_scores(img_t, cap_t, lens_t, li, lc, backend=backend, memory_budget=memory_budget)
    return s.float().cpu()


def _score_pairs_by_caption(head, img, cap, lens_cpu, pair_img, pair_cap, order, device, run_dtype, backend,
                            memory_budget, max_images, out, bar) -> None:
    """score_pairs for a head that scores grids only: one call per caption and its images."""
    uniq, counts = torch.unique_consecutive(pair_cap[order], return_counts=True)
    start = 0
    for j, n in zip(uniq.tolist(), counts.tolist()):
        sel = order[start:start + n]
        start += n
        ln = int(lens_cpu[j])
        cap_j = cap[j:j + 1, :ln].to(device=device, dtype=run_dtype)
        lens_j = lens_cpu[j:j + 1].to(device)
        for s0 in range(0, n, max_images):
            part = sel[s0:s0 + max_images]
            iidx = pair_img[part]
            img_t = img[iidx.to(img.device)].to(device=device, dtype=run_dtype)
            s = head(img_t, cap_j, lens_j, backend=backend, memory_budget=memory_budget)
            out[part] = s[:, 0].float().cpu()
        bar.update(n)


@dataclass
class TwoStageResult:
    """Ranks and metrics of a two-stage search, with its cost.

    ``k_images`` / ``k_captions``: candidates kept per caption / per image; ``pairs_scored``:
    distinct pairs RCAR scored (of ``pairs_total``); seconds spent in the prefilter
    (``prefilter_s``, incl. picking candidates) and re-ranking (``rerank_s``)."""
    i2t_ranks: Tensor
    t2i_ranks: Tensor
    recall: Recall
    k_images: int
    k_captions: int
    pairs_scored: int
    pairs_total: int
    prefilter_s: float
    rerank_s: float

    @property
    def seconds(self) -> float:
        return self.prefilter_s + self.rerank_s


def _as_scorers(scorers) -> List[Scorer]:
    if isinstance(scorers, Scorer):
        return [scorers]
    scorers = list(scorers)
    if not scorers or not all(isinstance(s, Scorer) for s in scorers):
        raise TypeError("scorers: expected a Scorer or a non-empty list of Scorers")
    shape = (scorers[0].img.shape[0], scorers[0].cap.shape[0])
    for s in scorers:
        if (s.img.shape[0], s.cap.shape[0]) != shape:
            raise ValueError("scorers: every Scorer must hold the same images and captions")
    return scorers


def top_candidates(P: Tensor, k: int, own: Tensor) -> Tensor:
    """(rows, k) column indices of each row's k highest scores in ``P`` (rows, cols); ``own``
    (rows, m) holds each row's matching columns. Where the k-th place ties, the tied
    non-matches take the places first, then the matches, each in column order: a tie at the
    cut counts against the match, and the candidates do not depend on ``topk``'s tie order."""
    vals, idx = P.topk(k, dim=1)
    at_cut = (P >= vals[:, -1:]).sum(dim=1) > k          # topk chose among tied scores
    rows = at_cut.nonzero().flatten()
    if rows.numel():
        sub = P[rows]
        is_own = torch.zeros(sub.shape, dtype=torch.bool).scatter_(1, own[rows], True)
        tie_key = is_own.to(torch.uint8)                   # non-matches (0) before matches (1)
        by_key = torch.sort(tie_key, dim=1, stable=True).indices
        order = torch.sort(sub.gather(1, by_key), dim=1, descending=True, stable=True).indices
        idx[rows] = by_key.gather(1, order[:, :k])
    return idx


def two_stage(scorers, k: int, captions_per_image: int = 5, backend: str = "auto", dtype=None,
              memory_budget: Optional[int] = None, progress: Optional[bool] = None,
              prefilter: Optional[Tensor] = None) -> TwoStageResult:
    """Two-stage retrieval: prefilter every pair cheaply, re-rank the top ``k`` with RCAR.

    scorers: one :class:`Scorer` or several (their RCAR scores are averaged, and so are their
    prefilter cosines, e.g. the t2i and i2t models of an "ALL" row). k: candidates per query
    in both directions (capped at the number of images / captions). prefilter: an (N_i, N_c)
    first-stage score matrix to use instead of :func:`prefilter_scores`.
    A query whose match the prefilter dropped ranks it behind all k candidates, in prefilter
    order among the rest. Ties count against the match, as in :func:`i2t_ranks`: in the
    re-ranking, among the dropped items, and at the cut (:func:`top_candidates`).
    """
    scorers = _as_scorers(scorers)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    cpi = captions_per_image
    n_i, n_c = scorers[0].img.shape[0], scorers[0].cap.shape[0]
    if n_c != cpi * n_i or n_i == 0:
        raise ValueError(f"scorers: expected N images and {cpi}N captions, got {n_i} and {n_c}")
    t0 = time.perf_counter()
    if prefilter is None:
        P = average_scores([prefilter_scores(s.img, s.cap, s.lens) for s in scorers])
    else:
        V.check_float("prefilter", prefilter, 2)
        P = prefilter.cpu()                     # its own precision: no ties made by rounding
        if P.shape != (n_i, n_c):
            raise ValueError(f"prefilter: expected shape {(n_i, n_c)}, got {tuple(P.shape)}")
        if not bool(torch.isfinite(P).all()):
            raise ValueError("prefilter: holds NaN or infinite scores")
    kc, ki = min(k, n_c), min(k, n_i)
    own = torch.arange(n_i)[:, None] * cpi + torch.arange(cpi)[None, :]     # (N_i, cpi)
    gt_img = torch.arange(n_c) // cpi
    cand_c = top_candidates(P, kc, own)                        # (N_i, kc) captions per image
    cand_i = top_candidates(P.t(), ki, gt_img[:, None])        # (N_c, ki) images per caption
    keys = torch.cat([(torch.arange(n_i)[:, None] * n_c + cand_c).reshape(-1),
                      (cand_i * n_c + torch.arange(n_c)[:, None]).reshape(-1)])
    keys = torch.unique(keys)                                 # sorted, each pair once
    t1 = time.perf_counter()
    scores = average_scores([score_pairs(s.head, s.img, s.cap, s.lens, keys // n_c, keys % n_c,
                                         backend=backend, dtype=dtype, memory_budget=memory_budget,
                                         progress=progress)[None] for s in scorers])[0]
    t2 = time.perf_counter()
    lookup = lambda q: scores[torch.searchsorted(keys, q)]

    # i2t: image i's candidates cand_c[i]
    r_c = lookup(torch.arange(n_i)[:, None] * n_c + cand_c)                  # (N_i, kc)
    gt_c = (cand_c // cpi) == torch.arange(n_i)[:, None]
    best_in = torch.where(gt_c, r_c, -math.inf).max(dim=1).values
    rank_in = (torch.where(gt_c, -math.inf, r_c) >= best_in[:, None]).sum(dim=1)
    best_p = P.gather(1, own).max(dim=1).values
    outside = torch.ones(n_i, n_c, dtype=torch.bool)
    outside.scatter_(1, cand_c, False)
    outside.scatter_(1, own, False)
    rank_out = kc + ((P >= best_p[:, None]) & outside).sum(dim=1)
    i2t = torch.where(gt_c.any(dim=1), rank_in, rank_out)

    # t2i: caption j's candidates cand_i[j]
    r_i = lookup(cand_i * n_c + torch.arange(n_c)[:, None])                  # (N_c, ki)
    gt_i = cand_i == gt_img[:, None]
    best_in = torch.where(gt_i, r_i, -math.inf).max(dim=1).values
    rank_in = (torch.where(gt_i, -math.inf, r_i) >= best_in[:, None]).sum(dim=1)
    Pt = P.t()
    own_p = Pt.gather(1, gt_img[:, None])
    outside = torch.ones(n_c, n_i, dtype=torch.bool)
    outside.scatter_(1, cand_i, False)
    outside.scatter_(1, gt_img[:, None], False)
    rank_out = ki + ((Pt >= own_p) & outside).sum(dim=1)
    t2i = torch.where(gt_i.any(dim=1), rank_in, rank_out)
    t3 = time.perf_counter()
    return TwoStageResult(i2t, t2i, recall_from_rank_arrays(i2t, t2i), ki, kc, int(keys.numel()),
                          n_i * n_c, (t1 - t0) + (t3 - t2), t2 - t1)


@dataclass
class TwoStageReport:
    """Two-stage against exhaustive: per-metric differences (two-stage minus exhaustive) and
    times. ``recall_lost`` is the rsum exhaustive reached that two-stage did not."""
    exhaustive: Recall
    two_stage: Recall
    exhaustive_s: float
    two_stage_s: float
    pairs_scored: int
    pairs_total: int
    diff: Dict[str, float] = field(default_factory=dict)

    @property
    def recall_lost(self) -> float:
        return self.exhaustive.rsum - self.two_stage.rsum

    @property
    def time_saved(self) -> float:
        """Share of the exhaustive time saved (negative: two-stage was slower)."""
        return 1.0 - self.two_stage_s / self.exhaustive_s if self.exhaustive_s > 0 else math.nan

    def lines(self) -> List[str]:
        worst = min(self.diff.items(), key=lambda kv: kv[1]) if self.diff else ("-", 0.0)
        drop = f"largest drop {worst[0]} {-worst[1]:.1f}" if worst[1] < 0 else "no recall lower"
        return [f"two-stage: RCAR scored {self.pairs_scored} of {self.pairs_total} pairs "
                f"({100.0 * self.pairs_scored / max(1, self.pairs_total):.1f}%)",
                f"two-stage: rsum {self.two_stage.rsum:.1f} vs exhaustive {self.exhaustive.rsum:.1f} "
                f"(recall lost {self.recall_lost:.1f}; {drop})",
                f"two-stage: {self.two_stage_s:.2f} s vs exhaustive {self.exhaustive_s:.2f} s "
                f"({100.0 * self.time_saved:.0f}% of the time saved)"]


def compare_two_stage(exhaustive: Recall, exhaustive_s: float, result: TwoStageResult) -> TwoStageReport:
    """How much recall two-stage search lost and how much time it saved against exhaustive."""
    e, t = exhaustive.as_dict(), result.recall.as_dict()
    diff = {k: t[k] - e[k] for k in e if k.endswith(("r1", "r5", "r10"))}
    return TwoStageReport(exhaustive, result.recall, exhaustive_s, result.seconds,
                          result.pairs_scored, result.pairs_total, diff)


__all__ = ["Recall", "Scorer", "TwoStageReport", "TwoStageResult", "average_recall", "average_scores",
           "compare_two_stage", "fold5_metrics", "fold_slices", "global_embeddings", "i2t_ranks",
           "plan_tiles", "prefilter_scores", "recall_from_ranks", "recall_metrics", "resolve_dtype",
           "score_all", "score_pairs", "t2i_ranks", "top_candidates", "two_stage", "i2t_tie_counts",
           "t2i_tie_counts", "recall_from_counts", "TIES"]
