"""RAR's dropout: its rate and where its keep-masks come from, for every backend and the reference.

RAR's key and query layers end in Dropout(RAR_DROPOUT) (SPEC.md), active in training only. Every
backend applies it the same way: ``x * keep``, with ``keep`` in {0, 1 / (1 - p)} drawn by
:func:`rar_keep_masks` for one RAR step and a block of the pair grid named by its global image
and caption indices. By default the masks are random (``torch.rand`` on the features' device,
so ``torch.manual_seed`` makes a run repeatable, and activation checkpointing replays them).

:func:`fixed_keep_masks` replaces the random draw with a function of the pair, position and
feature indices, so that every backend, however it cuts the pair grid into blocks, applies the
same masks as the reference: the tests compare training-mode scores and gradients that way.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Tuple

import torch

Tensor = torch.Tensor

#: the rate of RAR's two Dropout layers (the release's nn.Dropout(0.4))
RAR_DROPOUT = 0.4

#: ``source(step, images, captions, lq, width, device) -> (keep_k, keep_g)``: bool masks
#: (n_i, n_c, lq, width) for the keys and (n_i, n_c, width) for the query, True = kept;
#: images (n_i,) and captions (n_c,) are the block's global indices (int64, on ``device``)
MaskSource = Callable[[int, Tensor, Tensor, int, int, torch.device], Tuple[Tensor, Tensor]]

_SOURCE: Optional[MaskSource] = None


def _random_source(step, images, captions, lq, width, device):
    n_i, n_c = images.shape[0], captions.shape[0]
    keep_k = torch.rand(n_i, n_c, lq, width, device=device) >= RAR_DROPOUT
    keep_g = torch.rand(n_i, n_c, width, device=device) >= RAR_DROPOUT
    return keep_k, keep_g


def rar_keep_masks(step: int, images: Tensor, captions: Tensor, lq: int, width: int,
                   dtype: torch.dtype, device) -> Tuple[Tensor, Tensor]:
    """Scaled keep-masks of RAR step ``step`` for the pairs images x captions (global indices):
    keys (n_i, n_c, lq, width) and query (n_i, n_c, width), values 0 or 1 / (1 - RAR_DROPOUT),
    in ``dtype``; pair-grid layout (images first)."""
    device = torch.device(device)
    images = images.to(device=device, dtype=torch.int64)
    captions = captions.to(device=device, dtype=torch.int64)
    keep_k, keep_g = (_SOURCE or _random_source)(step, images, captions, lq, width, device)
    scale = 1.0 / (1.0 - RAR_DROPOUT)
    return keep_k.to(dtype) * scale, keep_g.to(dtype) * scale


def pair_keep_masks(step: int, images: Tensor, captions: Tensor, lq: int, width: int,
                    dtype: torch.dtype, device) -> Tuple[Tensor, Tensor]:
    """Scaled keep-masks of RAR step ``step`` for a pair LIST: pair m is (images[m], captions[m])
    (global indices, (M,) each); keys (M, lq, width), query (M, width). A fixed source gives each
    pair the very masks it gives that pair in the grid (:func:`rar_keep_masks`): it is asked once
    per distinct image, for that image's captions, never for the M x M grid of the list. The
    random default draws per pair."""
    device = torch.device(device)
    images = images.to(device=device, dtype=torch.int64)
    captions = captions.to(device=device, dtype=torch.int64)
    M = images.shape[0]
    if _SOURCE is None:
        keep_k = torch.rand(M, lq, width, device=device) >= RAR_DROPOUT
        keep_g = torch.rand(M, width, device=device) >= RAR_DROPOUT
    else:
        keep_k = torch.empty(M, lq, width, dtype=torch.bool, device=device)
        keep_g = torch.empty(M, width, dtype=torch.bool, device=device)
        for i in torch.unique(images).tolist():
            sel = (images == i).nonzero().flatten()
            k, g = _SOURCE(step, images[sel[:1]], captions[sel], lq, width, device)
            keep_k[sel], keep_g[sel] = k[0], g[0]
    scale = 1.0 / (1.0 - RAR_DROPOUT)
    return keep_k.to(dtype) * scale, keep_g.to(dtype) * scale


@contextlib.contextmanager
def fixed_keep_masks(source: MaskSource) -> Iterator[None]:
    """Within the block, every backend and the reference draw RAR's keep-masks from ``source``
    (see :data:`MaskSource`) instead of at random. Not thread-safe: one source per process."""
    global _SOURCE
    previous, _SOURCE = _SOURCE, source
    try:
        yield
    finally:
        _SOURCE = previous
