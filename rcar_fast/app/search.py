"""Top-k search over a gallery larger than memory, exact, on one process or many.

    rcar-fast search --checkpoint model_best.pth --gallery shard0.npy --gallery shard1.npy \
        --queries captions.txt --top-k 10 --out hits.tsv
    rcar_fast.app.search.search(head, queries, gallery, k)          # on encoded features

The gallery is read chunk by chunk (npy files: shapes from their headers, each chunk a plain
file read into a fresh array, :class:`Gallery`), each chunk scored against
every query with the head (retrieval.score_all), and only a running top k per query is kept:
the (queries x gallery) matrix never exists, and memory is bounded by the chunk, whatever the
gallery's size. Ranking is exact and deterministic: by score, ties by the lower gallery id.
Under torchrun each process reads its own contiguous share of the gallery's rows and the
processes' top-k lists are merged exactly (all gathered, padded; the same rule), so the result
equals one process's, which equals the top k of the exhaustive matrix.

Directions: captions -> images (queries are captions, the gallery images) and images ->
captions. ``rerank_k`` first keeps the ``rerank_k`` best gallery items of every query by the
cheap prefilter (the cosine of mean-pooled features, streamed the same way) and scores only
those with RCAR.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

Tensor = torch.Tensor


# ----------------------------------------------------------------------------- top-k lists

def merge_topk(scores: Tensor, ids: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The k best of each row of candidates (scores, ids: (n, m)): by score descending, ties by
    the lower id; missing entries carry id -1 and score -inf and sort last."""
    key_ids = torch.where(ids < 0, torch.iinfo(torch.int64).max, ids)
    order = torch.argsort(key_ids, dim=1, stable=True)
    scores, ids = scores.gather(1, order), ids.gather(1, order)
    order = torch.argsort(-scores, dim=1, stable=True)           # -(-inf) = +inf: missing entries last
    order = order[:, :k]
    return scores.gather(1, order), ids.gather(1, order)


def empty_topk(n_queries: int, k: int) -> Tuple[Tensor, Tensor]:
    return (torch.full((n_queries, k), -math.inf, dtype=torch.float64),
            torch.full((n_queries, k), -1, dtype=torch.int64))


@dataclass
class TopK:
    """scores (n_queries, k) float64 and gallery ids (n_queries, k) int64, best first; id -1
    where the gallery held fewer than k items."""
    scores: Tensor
    ids: Tensor

    def rows(self) -> Iterator[Tuple[int, int, int, float]]:
        """(query, rank, gallery id, score) rows, rank from 1."""
        for q in range(self.ids.shape[0]):
            for r in range(self.ids.shape[1]):
                g = int(self.ids[q, r])
                if g >= 0:
                    yield q, r + 1, g, float(self.scores[q, r])


# ----------------------------------------------------------------------------- the gallery

class Gallery:
    """Gallery items stored in npy files (memmapped), in order: global id = position over all
    files. Images: arrays (N, R, d); captions: arrays (N, L, d) with a matching lengths array
    per file. ``encode`` maps a loaded chunk to the head's input (e.g. the release's encoders)."""

    def __init__(self, files: Sequence[str], kind: str, length_files: Optional[Sequence[str]] = None,
                 encode: Optional[Callable] = None):
        if kind not in ("images", "captions"):
            raise ValueError(f"kind: expected 'images' or 'captions', got {kind!r}")
        if not files:
            raise ValueError("files: expected at least one .npy file of gallery features")
        self.kind, self.encode = kind, encode
        self.arrays = [self._load(f) for f in files]
        self.lengths = None
        if kind == "captions":
            if length_files is None or len(length_files) != len(files):
                raise ValueError("length_files: a captions gallery needs one lengths .npy per feature file")
            self.lengths = [np.load(f, mmap_mode="r", allow_pickle=False) for f in length_files]
            for f, a, ln in zip(length_files, self.arrays, self.lengths):
                if ln.shape != (a.shape[0],):
                    raise ValueError(f"{f}: expected ({a.shape[0]},) lengths, got {ln.shape}")
        self.offsets = np.cumsum([0] + [a.shape[0] for a in self.arrays])

    @staticmethod
    def _load(path):
        try:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise ValueError(f"{path}: not a readable .npy array ({str(exc).splitlines()[0] if str(exc) else ''})") from None
        if a.ndim != 3 or not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{path}: expected floating-point features of shape (N, rows, d), got {a.dtype} {a.shape}")
        return a

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _read(self, f: int, lo: int, hi: int) -> np.ndarray:
        """Rows lo..hi of file f, read into a fresh array (a file read, not a mapping: the pages of
        a memory map read once would stay in the process's resident set)."""
        a = self.arrays[f]
        row = int(np.prod(a.shape[1:])) * a.dtype.itemsize
        with open(a.filename, "rb") as fh:
            fh.seek(a.offset + lo * row)
            out = np.fromfile(fh, dtype=a.dtype, count=(hi - lo) * row // a.dtype.itemsize)
        return out.reshape((hi - lo,) + a.shape[1:])

    def chunks(self, start: int, stop: int, size: int) -> Iterator[Tuple[Tensor, Tensor, Optional[Tensor]]]:
        """(global ids, features, lengths or None) of rows start..stop, ``size`` at a time, read
        from disk only then."""
        pos = start
        while pos < stop:
            f = int(np.searchsorted(self.offsets, pos, side="right") - 1)
            lo = pos - int(self.offsets[f])
            hi = min(stop - int(self.offsets[f]), lo + size, self.arrays[f].shape[0])
            x = torch.from_numpy(self._read(f, lo, hi))
            lens = None if self.lengths is None else torch.from_numpy(np.asarray(self.lengths[f][lo:hi]).astype(np.int64))
            ids = torch.arange(pos, pos + (hi - lo), dtype=torch.int64)
            if self.encode is not None:
                x, lens = self.encode(x, lens)
            yield ids, x, lens
            pos += hi - lo


def share(n: int, rank: int, world: int) -> Tuple[int, int]:
    """The contiguous rows rank owns of n (the first n % world ranks one more)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


# ----------------------------------------------------------------------------- search

def _scores(head, queries, query_lens, x, lens, direction, backend, dtype, memory_budget) -> Tensor:
    """(n_queries, n_chunk) RCAR scores of the queries against a gallery chunk."""
    from .retrieval import score_all
    if direction == "t2i":        # queries are captions, the chunk images
        return score_all(head, x, queries, query_lens, backend=backend, dtype=dtype, memory_budget=memory_budget,
                         progress=False).t()
    return score_all(head, queries, x, lens, backend=backend, dtype=dtype, memory_budget=memory_budget, progress=False)


def _prefilter(queries, query_lens, x, lens, direction) -> Tensor:
    from .retrieval import prefilter_scores
    if direction == "t2i":
        return prefilter_scores(x, queries, query_lens).t()
    return prefilter_scores(queries, x, lens)


def _gather_topk(top: Tuple[Tensor, Tensor], k: int, group) -> Tuple[Tensor, Tensor]:
    """Every process's top-k merged exactly (the same rule), on every process."""
    if group is None:
        return top
    world = dist.get_world_size(group)
    scores = [torch.empty_like(top[0]) for _ in range(world)]
    ids = [torch.empty_like(top[1]) for _ in range(world)]
    dist.all_gather(scores, top[0].contiguous(), group=group)
    dist.all_gather(ids, top[1].contiguous(), group=group)
    return merge_topk(torch.cat(scores, dim=1), torch.cat(ids, dim=1), k)


@dataclass
class SearchStats:
    pairs_scored: int = 0
    seconds: float = 0.0
    chunks: int = 0


def search(head, queries: Tensor, gallery: Gallery, k: int, query_lens: Optional[Tensor] = None,
           direction: str = "t2i", rerank_k: Optional[int] = None, chunk: int = 256, backend: str = "auto",
           dtype=None, memory_budget: Optional[int] = None, group=None, progress: Optional[bool] = None,
           stats: Optional[SearchStats] = None) -> TopK:
    """The ``k`` best gallery items of every query (module docstring).

    head: an RCARSimilarity (its attn_type is its own; ``direction`` says which side the queries
    are). queries: direction "t2i": caption features (n_q, L, d) with ``query_lens``; "i2t":
    image features (n_q, R, d). gallery: a :class:`Gallery` of the other side. chunk: gallery
    items read and scored at a time (memory is one chunk's features and its (n_q, chunk) scores,
    plus the (n_q, k) lists). group: a process group (or True: the default one): each process
    searches its share of the gallery and every process returns the merged lists."""
    if direction not in ("t2i", "i2t"):
        raise ValueError(f"direction: expected 't2i' (captions -> images) or 'i2t' (images -> captions), "
                         f"got {direction!r}")
    want_gallery = "images" if direction == "t2i" else "captions"
    if gallery.kind != want_gallery:
        raise ValueError(f"gallery: direction {direction} searches a gallery of {want_gallery}, got {gallery.kind}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    if rerank_k is not None and (isinstance(rerank_k, bool) or not isinstance(rerank_k, int) or rerank_k < k):
        raise ValueError(f"rerank_k: expected an int >= k = {k}, got {rerank_k!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk: expected a positive int, got {chunk!r}")
    if direction == "t2i" and query_lens is None:
        raise ValueError("query_lens: caption queries need their lengths")
    if group is True:
        group = dist.group.WORLD
    rank, world = (dist.get_rank(group), dist.get_world_size(group)) if group is not None else (0, 1)
    start, stop = share(len(gallery), rank, world)
    n_q = queries.shape[0]
    stats = stats if stats is not None else SearchStats()
    t0 = time.perf_counter()
    from .distributed import together
    from .retrieval import _Progress
    candidates = None
    if rerank_k is not None:        # the prefilter's top rerank_k, over the whole gallery
        top = empty_topk(n_q, rerank_k)
        with together(group, "search (prefilter)"):     # a failure anywhere stops every process
            for ids, x, lens in gallery.chunks(start, stop, chunk):
                s = _prefilter(queries, query_lens, x, lens, direction).double()
                top = merge_topk(torch.cat([top[0], s], 1), torch.cat([top[1], ids.expand(n_q, -1)], 1), rerank_k)
        candidates = _gather_topk(top, rerank_k, group)[1]            # (n_q, rerank_k) gallery ids
    bar = _Progress(n_q * (stop - start), progress if rank == 0 else False, "searching")   # rank 0's share
    top = empty_topk(n_q, k)
    with together(group, "search"), contextlib.closing(bar):
        for ids, x, lens in gallery.chunks(start, stop, chunk):
            if candidates is None:
                s = _scores(head, queries, query_lens, x, lens, direction, backend, dtype, memory_budget).double()
                stats.pairs_scored += s.numel()
            else:           # only the candidate pairs: one scoring call per query that has any here
                s = torch.full((n_q, ids.shape[0]), -math.inf, dtype=torch.float64)
                hit = (candidates[:, :, None] == ids[None, None, :]).any(1)        # (n_q, n_chunk)
                for q in torch.nonzero(hit.any(1)).flatten().tolist():
                    cols = torch.nonzero(hit[q]).flatten()
                    qx = queries[q:q + 1]
                    ql = None if query_lens is None else query_lens[q:q + 1]
                    s[q, cols] = _scores(head, qx, ql, x[cols], None if lens is None else lens[cols], direction,
                                         backend, dtype, memory_budget).double()[0]
                    stats.pairs_scored += len(cols)
            top = merge_topk(torch.cat([top[0], s], 1), torch.cat([top[1], ids.expand(n_q, -1)], 1), k)
            stats.chunks += 1
            bar.update(n_q * ids.shape[0])
    result = _gather_topk(top, k, group)
    stats.seconds = time.perf_counter() - t0
    return TopK(*result)


def write_rows(top: TopK, path: str, query_names: Optional[Sequence[str]] = None) -> int:
    """Write (query, rank, gallery id, score) rows as tab-separated text; returns the row count."""
    n = 0
    with open(path, "w") as f:
        f.write("query\trank\tgallery_id\tscore\n")
        for q, r, g, s in top.rows():
            f.write(f"{query_names[q] if query_names else q}\t{r}\t{g}\t{s:.9g}\n")
            n += 1
    return n


class TextGallery:
    """A gallery of captions in text files (one per line), read ``size`` lines at a time and
    encoded then (``encode(lines) -> (features (n, L, d), lengths (n,))``); global id = line
    position over all files."""
    kind = "captions"

    def __init__(self, files: Sequence[str], encode: Callable):
        self.files, self.encode = list(files), encode
        counts = []
        for f in self.files:
            try:
                with open(f, encoding="utf-8") as fh:
                    counts.append(sum(1 for line in fh if line.strip()))
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"{f}: cannot read it as UTF-8 text ({exc})") from None
        self.offsets = np.cumsum([0] + counts)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def chunks(self, start: int, stop: int, size: int):
        """(global ids, features, lengths) of lines start..stop, ``size`` at a time."""
        pos, buf, ids = 0, [], []
        for f in self.files:
            with open(f, encoding="utf-8") as fh:
                for line in fh:
                    if not line.strip():
                        continue
                    if start <= pos < stop:
                        buf.append(line.strip())
                        ids.append(pos)
                        if len(buf) == size:
                            yield (torch.tensor(ids), *self.encode(buf))
                            buf, ids = [], []
                    pos += 1
                    if pos >= stop:
                        break
            if pos >= stop:
                break
        if buf:
            yield (torch.tensor(ids), *self.encode(buf))


# ----------------------------------------------------------------------------- command line

def add_parser(sub) -> None:
    """`rcar-fast search`: the command's arguments (rcar_fast.app.cli calls this)."""
    from .cli import _positive_float, _positive_int, parse_device
    p = sub.add_parser("search", help="top-k search of a release model over a gallery streamed from disk "
                                      "(torchrun: one share of the gallery per process)")
    p.add_argument("--checkpoint", required=True, help="a release checkpoint (.pth)")
    p.add_argument("--direction", choices=["t2i", "i2t"], default="t2i",
                   help="t2i: caption queries, a gallery of images; i2t: image queries, a gallery of captions")
    p.add_argument("--gallery", required=True, action="append",
                   help="t2i: region features (N, R, img_dim) .npy; i2t: captions .txt, one per line; "
                        "give it several times for several shards")
    p.add_argument("--queries", required=True, help="t2i: captions .txt; i2t: region features .npy")
    p.add_argument("--vocab", help="vocabulary json (default: *vocab*.json next to the checkpoint)")
    p.add_argument("--top-k", type=_positive_int, default=10)
    p.add_argument("--rerank-k", type=_positive_int, default=None,
                   help="first keep the best K of every query by the prefilter, then score those only")
    p.add_argument("--chunk", type=_positive_int, default=256, help="gallery items read and scored at a time")
    p.add_argument("--out", default=None, help="write (query, rank, gallery id, score) rows here (.tsv)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", type=parse_device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
    p.add_argument("--memory-budget", type=_positive_int, default=None, help="MiB per scoring tile")
    p.add_argument("--trust-checkpoint", action="store_true")
    p.add_argument("--timeout", type=_positive_float, default=1800.0,
                   help="under torchrun: seconds any process may wait for the others (default 1800)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def command(args) -> int:
    """`rcar-fast search` (add_parser); returns the exit status, raises ValueError for a user error
    (under torchrun: DistributedScoringError on every process when any failed)."""
    from . import distributed
    if args.rerank_k is not None and args.rerank_k < args.top_k:
        raise ValueError(f"--rerank-k {args.rerank_k}: must be at least --top-k {args.top_k}")
    device = args.device
    if distributed.under_torchrun():      # (rcar_fast.app.cli has joined already; a direct call joins here)
        distributed.launch(device, args.timeout)
    group = True if distributed.in_group() else None
    say = print if distributed.is_main() else (lambda *a, **k: None)
    with distributed.together(group, "search"):   # loading: every process ready, or every one stops
        model, queries, query_lens, gallery = _load(args, device)
    say(f"rcar-fast search: {queries.shape[0]} queries, a gallery of {len(gallery)} {gallery.kind}"
        + (f" in {len(args.gallery)} files" if len(args.gallery) > 1 else "") + f", top {args.top_k}"
        + (f" of the prefilter's {args.rerank_k}" if args.rerank_k else "")
        + (f", {distributed.world_size()} processes" if group else ""))
    stats = SearchStats()
    budget = args.memory_budget * 2**20 if args.memory_budget else None
    top = search(model.sim_enc, queries, gallery, args.top_k, query_lens, args.direction, args.rerank_k, args.chunk,
                 args.backend, args.dtype, budget, group, None if args.progress else False, stats)
    pairs = distributed.total(stats.pairs_scored) if group else stats.pairs_scored
    say(f"  {pairs} pairs scored in {stats.seconds:.1f} s ({pairs / max(stats.seconds, 1e-9):.0f} pairs/s)")
    if distributed.is_main():
        if args.out:
            n = write_rows(top, args.out)
            say(f"  wrote {n} rows to {args.out}")
        else:
            for qi, r, g, sc in top.rows():
                print(f"{qi}\t{r}\t{g}\t{sc:.6g}")
    return 0


def _load(args, device):
    """The search command's model, queries (encoded) and gallery (read as it is searched)."""
    import glob
    import os

    from .encoders import Vocabulary, check_vocab, encode_captions, load_checkpoint
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise ValueError(f"--out {args.out}: no such folder {os.path.dirname(os.path.abspath(args.out))}")
    model = load_checkpoint(args.checkpoint, args.trust_checkpoint).to(device).eval()
    vocab_path = args.vocab or next(iter(sorted(glob.glob(os.path.join(
        os.path.dirname(os.path.abspath(args.checkpoint)), "*vocab*.json")))), None)
    if vocab_path is None:
        raise ValueError("--vocab: no vocabulary json given and none next to the checkpoint")
    vocab = Vocabulary.from_json(vocab_path)
    check_vocab(model, vocab, vocab_path)

    def encode_images(x, lens=None):
        with torch.no_grad():
            return model.encode_images(x.float().to(device)).cpu(), None

    def encode_texts(lines):
        ids, lens = encode_captions(lines, vocab)
        with torch.no_grad():
            return model.encode_captions(ids.to(device), lens).cpu(), lens

    img_dim = model.config.img_dim

    def images(files, what):
        g = Gallery(files, "images", encode=encode_images)
        for f, a in zip(files, g.arrays):
            if a.shape[2] != img_dim:
                raise ValueError(f"{what} {f}: region features of size {a.shape[2]}, but {args.checkpoint} "
                                 f"expects img_dim {img_dim}")
        return g

    if args.direction == "t2i":
        try:
            with open(args.queries, encoding="utf-8") as f:
                lines = [ln.strip() for ln in f if ln.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--queries {args.queries}: cannot read it as UTF-8 text ({exc})") from None
        if not lines:
            raise ValueError(f"--queries {args.queries}: holds no captions")
        queries, query_lens = encode_texts(lines)
        gallery = images(args.gallery, "--gallery")
    else:
        q = images([args.queries], "--queries")
        queries = torch.cat([x for _, x, _ in q.chunks(0, len(q), 256)])
        query_lens = None
        gallery = TextGallery(args.gallery, encode_texts)
    return model, queries, query_lens, gallery


__all__ = ["Gallery", "SearchStats", "TextGallery", "TopK", "add_parser", "command", "empty_topk", "merge_topk",
           "search", "share", "write_rows"]
