"""Top-k search over a gallery in several shards on disk (rcar_fast.app.search): the k best of
every query equal the k best of the exhaustive matrix (ties by the lower gallery id), on one
process and several (gloo), both directions, with the prefilter; memory does not grow with the
gallery. A stand-in head with integer scores makes ties certain and exact; the real head is
checked too."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from dist_workers import run_spawned, search_worker
from rcar_fast.app import search as SR
from rcar_testutil import make_head, make_inputs, peak_bytes

N_G, N_Q, ROWS, D = 23, 7, 3, 4


class GridHead(nn.Module):
    """Scores (N_i, N_c) = (7 a_i + 3 b_j) mod 5 from the first feature of each item: integers,
    many ties, the same whatever the batch."""
    attn_type = "t2i"

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, img, cap, cap_lens, backend="auto", memory_budget=None):
        a, b = img[:, 0, 0], cap[:, 0, 0]
        return torch.remainder(7 * a[:, None] + 3 * b[None, :], 5.0)


def _items(n, seed, rows=ROWS):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rows, D, generator=g)
    x[:, 0, 0] = torch.randint(0, 9, (n,), generator=g).float()
    return x


def queries_for(direction):
    """The queries of the stand-in tests: captions (with lengths) for t2i, images for i2t."""
    if direction == "t2i":
        return _items(N_Q, 1), torch.full((N_Q,), ROWS, dtype=torch.int64)
    return _items(N_Q, 1), None


def _write_gallery(tmp_path, direction, sizes=(9, 1, 13)):
    """The gallery items in shards of ``sizes`` rows: (files, length files, all items)."""
    x = _items(sum(sizes), 2)
    files, lfiles, pos = [], [], 0
    for k, n in enumerate(sizes):
        f = tmp_path / f"g{k}.npy"
        np.save(f, x[pos:pos + n].numpy())
        files.append(str(f))
        if direction == "i2t":
            lf = tmp_path / f"g{k}_lens.npy"
            np.save(lf, np.full(n, ROWS, dtype=np.int64))
            lfiles.append(str(lf))
        pos += n
    return files, (lfiles or None), x


def _exhaustive_topk(scores: torch.Tensor, k: int):
    """Written out: sort every row by (-score, id), take k."""
    ids, vals = [], []
    for row in scores.tolist():
        order = sorted(range(len(row)), key=lambda g: (-row[g], g))[:k]
        ids.append(order + [-1] * (k - len(order)))
        vals.append([row[g] for g in order] + [-math.inf] * (k - len(order)))
    return torch.tensor(vals, dtype=torch.float64), torch.tensor(ids)


def _full(direction, x):
    q, ql = queries_for(direction)
    h = GridHead()
    if direction == "t2i":
        return h(x, q, ql).t()
    return h(q, x, None)


@pytest.mark.parametrize("chunk", [1, 4, 100])
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_topk_equals_the_exhaustive_topk(tmp_path, direction, chunk):
    files, lfiles, x = _write_gallery(tmp_path, direction)
    q, ql = queries_for(direction)
    gallery = SR.Gallery(files, "images" if direction == "t2i" else "captions", lfiles)
    for k in (1, 5, N_G + 4):
        top = SR.search(GridHead(), q, gallery, k, ql, direction, chunk=chunk)
        want = _exhaustive_topk(_full(direction, x), k)
        assert torch.equal(top.ids, want[1]) and torch.equal(top.scores, want[0]), (k, chunk)
    rows = list(top.rows())
    assert len(rows) == N_Q * N_G and rows[0][:2] == (0, 1)


@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_prefilter_reranks_only_candidates(tmp_path, direction):
    files, lfiles, x = _write_gallery(tmp_path, direction)
    q, ql = queries_for(direction)
    gallery = SR.Gallery(files, "images" if direction == "t2i" else "captions", lfiles)
    full = SR.search(GridHead(), q, gallery, 5, ql, direction)
    same = SR.search(GridHead(), q, gallery, 5, ql, direction, rerank_k=N_G)    # every item a candidate
    assert torch.equal(full.ids, same.ids) and torch.equal(full.scores, same.scores)
    stats = SR.SearchStats()
    few = SR.search(GridHead(), q, gallery, 2, ql, direction, rerank_k=6, chunk=5, stats=stats)
    assert stats.pairs_scored == N_Q * 6
    assert (few.ids >= 0).all()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_several_processes_merge_exactly(tmp_path, direction, world):
    files, lfiles, x = _write_gallery(tmp_path, direction)
    run_spawned(search_worker, world, (str(tmp_path), files, lfiles, direction, 6, None, 4))
    want = _exhaustive_topk(_full(direction, x), 6)
    for rank in range(world):
        got = torch.load(os.path.join(tmp_path, f"{rank}.pt"))
        assert not isinstance(got, dict), got
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), rank


def test_real_head_matches_exhaustive_scores(tmp_path):
    """RCARSimilarity (fp64): the search's ids are the exhaustive matrix's top k wherever the
    k-th and the next score are apart (no near-tie), and its scores match to 1e-12."""
    from rcar_fast.app.retrieval import score_all
    img, cap, lens = make_inputs(17, 4, 5, 6, 16, torch.float64, 3)
    head = make_head("coop_rcar", 2, "t2i", 16, 8, torch.float64, 3)
    for k, n in enumerate((6, 11)):
        np.save(tmp_path / f"i{k}.npy", img[[0, 6][k]:[6, 17][k]].numpy())
    gallery = SR.Gallery([str(tmp_path / "i0.npy"), str(tmp_path / "i1.npy")], "images")
    top = SR.search(head, cap, gallery, 4, lens, "t2i", chunk=5)
    full = score_all(head, img, cap, lens).t().double()          # (queries, gallery)
    want = _exhaustive_topk(full, 5)
    for q in range(4):
        if want[0][q, 3] - want[0][q, 4] > 1e-9:
            assert top.ids[q].tolist() == want[1][q, :4].tolist()
        torch.testing.assert_close(top.scores[q], full[q, top.ids[q]], rtol=0, atol=1e-12)


def test_memory_does_not_grow_with_the_gallery(tmp_path):
    """The same chunk over a gallery 8x as large: the same peak (the matrix never exists)."""
    q, ql = queries_for("t2i")

    def peak(n):
        x = _items(n, 5, rows=16)
        np.save(tmp_path / f"big{n}.npy", x.numpy())
        gallery = SR.Gallery([str(tmp_path / f"big{n}.npy")], "images")
        return peak_bytes(lambda: SR.search(GridHead(), q, gallery, 3, ql, "t2i", chunk=64))
    small, large = peak(256), peak(2048)
    assert large <= 1.25 * small + 4096, (small, large)


def test_bad_arguments_name_the_argument(tmp_path):
    files, lfiles, _ = _write_gallery(tmp_path, "t2i")
    gallery = SR.Gallery(files, "images")
    q, ql = queries_for("t2i")
    for kw, word in ((dict(k=0), "k"), (dict(k=3, rerank_k=2), "rerank_k"), (dict(k=3, chunk=0), "chunk"),
                     (dict(k=3, direction="i2t"), "gallery"), (dict(k=3, direction="up"), "direction")):
        with pytest.raises(ValueError, match=word):
            SR.search(GridHead(), q, gallery, query_lens=ql, **kw)
    with pytest.raises(ValueError, match="length_files"):
        SR.Gallery(files, "captions")
    with pytest.raises(ValueError, match="not a readable"):
        (tmp_path / "bad.npy").write_text("no")
        SR.Gallery([str(tmp_path / "bad.npy")], "images")
