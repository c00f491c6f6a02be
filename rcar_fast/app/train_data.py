"""Training data: the release's caption augmentation, batches of (image, caption) pairs, the
validation split, and a structured synthetic dataset in the precomp layout that trains in seconds.

The release (``lib/datasets/image_caption.py``) serves one item per caption: caption j with
image j // 5 (images stored once, or five times per image), shuffled each epoch, 128 per batch,
the last incomplete batch dropped. On the train split every caption is augmented: each word
(not ``<start>``/``<end>``) is picked with probability 0.2; of the picked words half become
``<mask>``, a tenth a random token (uniform over the whole vocabulary, ``<mask>`` included)
and the rest are deleted. ``<mask>`` is appended to the vocabulary json's words, as the
release's ``vocab.add_word('<mask>')`` does, so the word embedding has one row more.

Randomness here is a function of (seed, epoch, step) only: the epoch's order of captions and
each global batch's augmentation are drawn the same way on every process of a distributed run
and on a resumed run, so a global batch is the same whatever the number of processes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .data import PrecompSplit, write_precomp
from .encoders import Vocabulary, encode_captions, tokenize

Tensor = torch.Tensor

MASK = "<mask>"
#: the release's augmentation: share of words picked, and of the picked words those masked and
#: those replaced by a random token (the rest, 0.4 of them, are deleted)
AUG_PICK = 0.20
AUG_MASK = 0.5
AUG_RANDOM = 0.1


def mask_vocabulary(vocab: Vocabulary) -> Tuple[Vocabulary, int, int]:
    """(the vocabulary with ``<mask>`` appended, its index, the word embedding's row count).

    As the release's ``add_word``: ``<mask>`` takes the next index (the number of words, for
    the release's contiguous vocabularies) unless the json already holds it; the embedding has
    ``len(vocab)`` rows (or max index + 1 if the json's indices have gaps)."""
    words = dict(vocab.word2idx)
    if MASK not in words:
        words[MASK] = max(len(words), vocab.max_index + 1)
    out = Vocabulary(words, source=vocab.source)
    return out, words[MASK], max(len(out), out.max_index + 1)


def seeded_rng(*keys: int) -> np.random.Generator:
    """A numpy generator that depends only on ``keys`` (seed, epoch, step, ...)."""
    return np.random.default_rng(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]))


def torch_seed(*keys: int) -> int:
    """A torch seed that depends only on ``keys``."""
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def augment(words: Sequence[np.ndarray], vocab_size: int, mask_id: int,
            rng: np.random.Generator) -> List[np.ndarray]:
    """The release's augmentation of each caption's word ids (without start/end tokens)."""
    if not words:
        return []
    sizes = np.array([len(w) for w in words])
    flat = np.concatenate(words) if sizes.sum() else np.zeros(0, dtype=np.int64)
    p = rng.random(flat.shape[0])
    rand_tok = rng.integers(0, vocab_size, flat.shape[0])
    picked = p < AUG_PICK
    q = p / AUG_PICK
    out = flat.copy()
    out[picked & (q < AUG_MASK)] = mask_id
    swap = picked & (q >= AUG_MASK) & (q < AUG_MASK + AUG_RANDOM)
    out[swap] = rand_tok[swap]
    keep = ~(picked & (q >= AUG_MASK + AUG_RANDOM))
    pieces = np.split(out, np.cumsum(sizes)[:-1])
    keeps = np.split(keep, np.cumsum(sizes)[:-1])
    return [w[k] for w, k in zip(pieces, keeps)]


@dataclass
class Batch:
    """One batch of pairs: images (n, R, D) float32, word ids (n, L) int64, lengths (n,) int64;
    pair k is (images[k], ids[k]), so the matching pairs are the diagonal of its scores."""
    images: Tensor
    ids: Tensor
    lengths: Tensor
    index: np.ndarray           # the captions' indices in the split

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def rows(self, start: int, stop: int) -> "Batch":
        """Pairs start..stop (a process's share), padded to their own longest caption."""
        lens = self.lengths[start:stop]
        L = int(lens.max()) if lens.numel() else 1
        return Batch(self.images[start:stop], self.ids[start:stop, :L], lens, self.index[start:stop])

    def to(self, device) -> "Batch":
        return Batch(self.images.to(device, non_blocking=True), self.ids.to(device, non_blocking=True),
                     self.lengths, self.index)


def _pad(seqs: Sequence[np.ndarray], start: int, end: int) -> Tuple[Tensor, Tensor]:
    lens = np.array([len(s) + 2 for s in seqs], dtype=np.int64)
    ids = np.zeros((len(seqs), int(lens.max()) if len(seqs) else 1), dtype=np.int64)
    for k, s in enumerate(seqs):
        ids[k, 0] = start
        ids[k, 1:len(s) + 1] = s
        ids[k, len(s) + 1] = end
    return torch.from_numpy(ids), torch.from_numpy(lens)


class TrainSet:
    """A precomp split served as the release serves its train split (module docstring)."""

    def __init__(self, split: PrecompSplit, vocab: Vocabulary, vocab_size: int, mask_id: int,
                 augment_captions: bool = True):
        self.split = split
        self.cpi = split.captions_per_image
        self.vocab_size, self.mask_id, self.augment = vocab_size, mask_id, augment_captions
        self.start, self.end = vocab.word2idx["<start>"], vocab.word2idx["<end>"]
        self.words = [np.array([vocab(w) for w in tokenize(c)], dtype=np.int64) for c in split.captions]

    def __len__(self) -> int:
        return len(self.words)

    def batches_per_epoch(self, batch_size: int) -> int:
        return len(self) // batch_size          # drop_last, as the release

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """The epoch's order of captions (the same on every process)."""
        return seeded_rng(seed, epoch, 1).permutation(len(self))

    def batch(self, index: np.ndarray, seed: int, epoch: int, step: int) -> Batch:
        """The pairs of ``index`` (caption indices), augmented with the step's own draws."""
        words = [self.words[j] for j in index]
        if self.augment:
            words = augment(words, self.vocab_size, self.mask_id, seeded_rng(seed, epoch, step, 2))
        ids, lens = _pad(words, self.start, self.end)
        return Batch(self.image_rows(np.asarray(index) // self.cpi), ids, lens, np.asarray(index))

    def image_rows(self, rows: np.ndarray) -> Tensor:
        """Region features of images ``rows`` as a float32 tensor (read from the memory map in
        sorted order)."""
        uniq, inv = np.unique(rows, return_inverse=True)
        block = np.asarray(self.split.images[uniq], dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(block[inv]))


@dataclass
class ValSet:
    """The validation pairs: the first ``n`` captions of the dev split (the release: 5,000) and
    their images, captions encoded as at test time."""
    images: Tensor
    ids: Tensor
    lengths: Tensor
    captions_per_image: int


def val_set(split: PrecompSplit, vocab: Vocabulary, n_captions: int) -> ValSet:
    cpi = split.captions_per_image
    n = min(n_captions, len(split.captions)) // cpi * cpi
    if n < cpi:
        raise ValueError(f"val captions: {split.folder} split {split.split!r} needs at least {cpi} "
                         f"captions for validation (--val-captions {n_captions})")
    ids, lens = encode_captions(split.captions[:n], vocab)
    images = torch.from_numpy(np.asarray(split.images[:n // cpi], dtype=np.float32).copy())
    return ValSet(images, ids, lens, cpi)


# ----------------------------------------------------------------------------- synthetic data

FILLER = ("a", "the", "with", "and", "on", "is", "of", "near")


def write_synthetic_precomp(folder: str, n_train: int = 100, n_dev: int = 20, n_test: int = 20,
                            regions: int = 6, img_dim: int = 32, n_concepts: int = 12,
                            concepts_per_image: int = 3, min_words: int = 3, max_words: int = 7,
                            noise: float = 0.2, seed: int = 0,
                            splits: Optional[Sequence[str]] = None) -> str:
    """Writes a structured synthetic dataset in the precomp layout to ``folder`` (splits train,
    dev, test, 5 captions per image) and its vocabulary json; returns the json's path.

    Each concept k has a random feature vector and a word ``c{k}``. An image holds
    ``concepts_per_image`` distinct concepts; each region is one of them (or, one region in
    four, background) plus ``noise``. A caption is ``min_words``..``max_words`` words: concept
    words of its own image with filler words between them. Other images share concepts, so a
    caption's image is found only by the set of its concepts: an untrained model ranks at
    chance, and training raises recall within a few dozen small steps (tests/test_train.py).
    """
    g = np.random.default_rng(seed)
    bank = g.standard_normal((n_concepts, img_dim)).astype(np.float32)
    words = ["<pad>", "<start>", "<end>", "<unk>"] + list(FILLER) + [f"c{k}" for k in range(n_concepts)]
    word2idx = {w: i for i, w in enumerate(words)}
    sizes = {"train": n_train, "dev": n_dev, "test": n_test}
    for split in (splits or ("train", "dev", "test")):
        n = sizes[split]
        owned = np.stack([g.choice(n_concepts, concepts_per_image, replace=False) for _ in range(n)])
        pick = owned[np.arange(n)[:, None], g.integers(0, concepts_per_image, (n, regions))]
        feats = bank[pick] + noise * g.standard_normal((n, regions, img_dim)).astype(np.float32)
        background = g.random((n, regions)) < 0.25
        feats[background] = g.standard_normal((int(background.sum()), img_dim)).astype(np.float32)
        captions = []
        for i in range(n):
            for _ in range(5):
                length = int(g.integers(min_words, max_words + 1))
                n_c = min(length, max(1, (length + 1) // 2))
                ws = [f"c{k}" for k in g.choice(owned[i], n_c, replace=n_c > concepts_per_image)]
                ws += [FILLER[int(f)] for f in g.integers(0, len(FILLER), length - n_c)]
                g.shuffle(ws)
                captions.append(" ".join(ws))
        write_precomp(folder, split, feats.astype(np.float32), captions)
    path = os.path.join(folder, "synthetic_precomp_vocab.json")
    vocab_json(word2idx, path)
    return path


def vocab_json(word2idx: Dict[str, int], path: str) -> None:
    """Writes ``word2idx`` as the release's vocabulary json."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"word2idx": word2idx, "idx2word": {str(i): w for w, i in word2idx.items()},
                   "idx": len(word2idx)}, f)


__all__ = ["AUG_MASK", "AUG_PICK", "AUG_RANDOM", "Batch", "MASK", "TrainSet", "ValSet", "augment",
           "mask_vocabulary", "seeded_rng", "torch_seed", "val_set", "vocab_json", "write_synthetic_precomp"]
