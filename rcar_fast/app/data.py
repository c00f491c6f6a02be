"""Data: the SCAN "precomp" layout of Flickr30K / MSCOCO, and a synthetic structured dataset.

Precomp layout (SCAN, and the RCAR release's ``PrecompRegionDataset``): a folder (or its
``precomp/`` subfolder, where the release looks) holds for each split

  ``{split}_ims.npy``   float region features, (N, R, 2048) (R = 36 for BUTD features); some
                        releases store each image five times, (5N, R, 2048): then every
                        fifth row is an image, as the release's evaluation takes them
  ``{split}_caps.txt``  one caption per line, 5N lines; caption j belongs to image j // 5

Flickr30K's ``test`` split has 1,000 images and 5,000 captions; MSCOCO's ``testall`` has
5,000 images (five folds of 1,000 for the "1K" protocol) and 25,000 captions.

Structured synthetic data (:func:`structured_dataset`): features already in the joint space,
made so that retrieval means something: images are regions drawn around a shared bank of
concept vectors, and each caption's words are its own image's region concepts plus noise, with
some filler words of pure noise. A caption therefore matches its image's regions better than
other images' regions, but other images share concepts, so negatives are not trivially apart.
:func:`structured_head` gives an RCAR head whose score rises as a caption's words and their
attended regions agree, so that recall on this data is high for a correct implementation and
at chance for a broken one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from ..modules import RCARSimilarity

Tensor = torch.Tensor


class DataError(ValueError):
    """A data file that is missing or malformed; the message names the file."""


@dataclass
class PrecompSplit:
    """One split in the precomp layout: ``images`` (N, R, img_dim) (a read-only memory map of
    the .npy file where possible), ``captions`` (5N strings; caption j is of image j // 5)."""
    images: np.ndarray
    captions: List[str]
    split: str
    folder: str
    captions_per_image: int = 5

    @property
    def n_images(self) -> int:
        return int(self.images.shape[0])


def precomp_folder(data_dir: str) -> str:
    """``data_dir`` itself if it holds ``*_caps.txt`` files, else its ``precomp/`` subfolder
    when that does (the release's layout); ``data_dir`` otherwise."""
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: no such data folder")
    for cand in (data_dir, os.path.join(data_dir, "precomp")):
        if os.path.isdir(cand) and any(f.endswith("_caps.txt") for f in os.listdir(cand)):
            return cand
    return data_dir


def available_splits(data_dir: str) -> List[str]:
    """Splits that have both ``{split}_caps.txt`` and ``{split}_ims.npy`` in the folder."""
    folder = precomp_folder(data_dir)
    names = os.listdir(folder)
    return sorted(f[:-len("_caps.txt")] for f in names
                  if f.endswith("_caps.txt") and f[:-len("_caps.txt")] + "_ims.npy" in names)


def load_precomp(data_dir: str, split: str = "test", captions_per_image: int = 5) -> PrecompSplit:
    """Loads ``{split}_ims.npy`` and ``{split}_caps.txt`` from ``data_dir`` (or its ``precomp/``).

    Raises DataError naming the file for a missing split or file, a file that is not an array
    of (N, R, D) floats, an empty or non-UTF-8 caption file, or counts that do not pair up
    (captions must be ``captions_per_image`` x images, the images stored once or
    ``captions_per_image`` times).
    """
    if not isinstance(split, str) or not split or os.sep in split or split.startswith("."):
        raise DataError(f"split: expected a split name such as 'test', got {split!r}")
    folder = precomp_folder(data_dir)
    caps_path = os.path.join(folder, f"{split}_caps.txt")
    ims_path = os.path.join(folder, f"{split}_ims.npy")
    if not os.path.isfile(caps_path) and not os.path.isfile(ims_path):
        have = available_splits(data_dir)
        raise DataError(f"{folder}: no split {split!r} ({split}_caps.txt and {split}_ims.npy missing; "
                        f"splits here: {', '.join(have) if have else 'none'})")
    for p in (caps_path, ims_path):
        if not os.path.isfile(p):
            raise DataError(f"{p}: no such file (split {split!r} needs it)")
    try:
        with open(caps_path, encoding="utf-8") as f:
            captions = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{caps_path}: cannot read it as UTF-8 text ({exc})") from None
    while captions and not captions[-1]:
        captions.pop()   # a trailing empty line is not a caption
    if not captions:
        raise DataError(f"{caps_path}: holds no captions")
    empty = [i for i, c in enumerate(captions) if not c]
    if empty:
        raise DataError(f"{caps_path}: line {empty[0] + 1} is empty")
    try:
        images = np.load(ims_path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:   # numpy raises several types for a malformed file
        raise DataError(f"{ims_path}: not a readable .npy array ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if images.ndim != 3 or images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise DataError(f"{ims_path}: expected region features of shape (N, R, D), got {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise DataError(f"{ims_path}: expected floating-point features, got dtype {images.dtype}")
    k = captions_per_image
    n_caps, n_ims = len(captions), images.shape[0]
    if n_ims * k == n_caps:
        pass
    elif n_ims == n_caps and n_caps % k == 0:
        images = images[::k]          # each image stored k times: take every k-th
    else:
        raise DataError(f"{caps_path}: {n_caps} captions do not pair with the {n_ims} images of "
                        f"{os.path.basename(ims_path)} ({k} captions per image)")
    return PrecompSplit(images, captions, split, folder, k)


def write_precomp(folder: str, split: str, images: np.ndarray, captions: List[str]) -> None:
    """Writes a split in the precomp layout (for tests and small experiments)."""
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, f"{split}_ims.npy"), np.asarray(images))
    with open(os.path.join(folder, f"{split}_caps.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(captions) + "\n")


# ----------------------------------------------------------------------------- synthetic data

def _l2n(x: Tensor) -> Tensor:
    return x / (x.norm(dim=-1, keepdim=True) + 1e-8)


@dataclass
class StructuredData:
    """img (N, R, d), cap (5N, L, d) with NaN padding, lens (5N,); caption j is of image j // 5.
    ``concepts`` (n_concepts, d) and ``region_concepts`` (N, R) say how they were made."""
    img: Tensor
    cap: Tensor
    lens: Tensor
    concepts: Tensor
    region_concepts: Tensor
    captions_per_image: int = 5


def structured_dataset(n_images: int, captions_per_image: int = 5, regions: int = 36,
                       dim: int = 1024, min_len: int = 6, max_len: int = 24,
                       n_concepts: int = 64, region_noise: float = 0.5, word_noise: float = 0.6,
                       filler: float = 0.25, seed: int = 0, nan_padding: bool = True,
                       dtype: torch.dtype = torch.float32) -> StructuredData:
    """Synthetic image-caption features in which each caption describes its own image.

    Every region is ``l2n(c + region_noise * u)`` for a concept vector c (drawn from a bank of
    ``n_concepts`` random unit vectors) and a random unit vector u. A caption of image i has
    a length in [min_len, max_len]; each word is, with probability 1 - ``filler``,
    ``l2n(c_r + word_noise * u)`` for the concept c_r of a random region r of image i, else a
    filler word ``l2n(u)`` unrelated to any image. Padding holds NaN (or 0).
    """
    for name, v in (("n_images", n_images), ("captions_per_image", captions_per_image),
                    ("regions", regions), ("dim", dim), ("n_concepts", n_concepts)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"min_len, max_len: expected 1 <= min_len <= max_len, got {min_len}, {max_len}")
    if not 0.0 <= filler < 1.0:
        raise ValueError(f"filler: expected a probability in [0, 1), got {filler}")
    g = torch.Generator().manual_seed(seed)
    f32 = torch.float32   # generated in float32 (1000 images' captions are 0.5 GB per buffer)
    concepts = _l2n(torch.randn(n_concepts, dim, generator=g, dtype=f32))
    region_concepts = torch.randint(0, n_concepts, (n_images, regions), generator=g)
    noise = _l2n(torch.randn(n_images, regions, dim, generator=g, dtype=f32))
    img = _l2n(concepts[region_concepts] + region_noise * noise)
    n_c = n_images * captions_per_image
    lens = torch.randint(min_len, max_len + 1, (n_c,), generator=g)
    cap = torch.empty(n_c, max_len, dim, dtype=dtype)
    for c0 in range(0, n_c, 256):   # captions in chunks: each draws max_len words
        c1 = min(n_c, c0 + 256)
        owner = torch.arange(c0, c1) // captions_per_image
        pick = torch.randint(0, regions, (c1 - c0, max_len), generator=g)
        words = concepts[region_concepts[owner[:, None], pick]]
        words += word_noise * _l2n(torch.randn(c1 - c0, max_len, dim, generator=g, dtype=f32))
        is_filler = torch.rand(c1 - c0, max_len, generator=g) < filler
        words = torch.where(is_filler[..., None], torch.randn(c1 - c0, max_len, dim, generator=g,
                                                              dtype=f32), words)
        cap[c0:c1] = _l2n(words)
    pad = torch.arange(max_len)[None, :] >= lens[:, None]
    cap[pad] = float("nan") if nan_padding else 0.0
    return StructuredData(img.to(dtype), cap.to(dtype), lens, concepts.to(dtype), region_concepts,
                          captions_per_image)


def structured_head(regulator: str = "coop_rcar", steps: int = 2, attn_type: str = "t2i",
                    embed_dim: int = 1024, sim_dim: int = 256, seed: int = 0,
                    smooth: Optional[float] = None) -> RCARSimilarity:
    """An RCAR head (eval mode) whose score rises as query and attended context agree.

    Every regulator module keeps the release's random initialisation (seeded); only the
    alignment projections and the final Linear are set by hand:
      ``sim_transform_w``: the first s/2 outputs are ``-sum_k (Q - A)_k^2`` (= -||Q - A||^2),
      the other s/2 the constant 1; so after l2n the first half of E falls as the residual
      between a word and its attended regions grows.
      ``sim_eval_w``: 1/2 on the first half of h, 0 on the rest (bias 0).
    A random head (the release's init) ranks at chance; this one ranks the structured data's
    true pairs first, through the same code path (attention, RCR, RAR, sigmoid).
    """
    torch.manual_seed(seed)
    head = RCARSimilarity(embed_dim, sim_dim, regulator, steps, attn_type, smooth)
    half = sim_dim // 2
    with torch.no_grad():
        for alv in head.alv_modules:
            w = alv.sim_transform_w
            w.weight.zero_()
            w.bias.zero_()
            w.weight[:half] = -1.0
            w.bias[half:] = 1.0
        head.sim_eval_w.weight.zero_()
        head.sim_eval_w.bias.zero_()
        head.sim_eval_w.weight[0, :half] = 0.5
    return head.eval()


__all__ = ["DataError", "PrecompSplit", "StructuredData", "available_splits", "load_precomp",
           "precomp_folder", "structured_dataset", "structured_head", "write_precomp"]
