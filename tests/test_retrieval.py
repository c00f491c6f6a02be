"""End-to-end retrieval: recall metrics on hand-made score matrices, the all-pairs engine, two-stage
search, the release's encoders and checkpoints, the precomp loader and the synthetic data.

Expected values come from hand-made inputs whose ranks are written out, from plain re-statements
of the release's code written here (``release_i2t`` / ``release_t2i``: its argsort loops), or
from direct torch computations (nn.GRU, nn.Linear) — never from the functions under test.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import types

import numpy as np
import pytest
import torch

from rcar_fast.app import data as D
from rcar_fast.app import encoders as E
from rcar_fast.app import retrieval as RT
from rcar_testutil import make_head, make_inputs

DIM, SIM = 24, 8

# ----------------------------------------------------------------------------- release-style oracles


def release_i2t(npts, sims):
    """The release's lib/evaluation.py i2t, restated: argsort per image, best of its 5 captions."""
    ranks = np.zeros(npts)
    for index in range(npts):
        inds = np.argsort(sims[index])[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in range(5 * index, 5 * index + 5))
    return ranks


def release_t2i(npts, sims):
    ranks = np.zeros(5 * npts)
    sims = sims.T
    for index in range(npts):
        for i in range(5):
            inds = np.argsort(sims[5 * index + i])[::-1]
            ranks[5 * index + i] = np.where(inds == index)[0][0]
    return ranks


def release_metrics(ranks):
    r1 = 100.0 * len(np.where(ranks < 1)[0]) / len(ranks)
    r5 = 100.0 * len(np.where(ranks < 5)[0]) / len(ranks)
    r10 = 100.0 * len(np.where(ranks < 10)[0]) / len(ranks)
    return (r1, r5, r10, np.floor(np.median(ranks)) + 1, ranks.mean() + 1)


def assert_metrics(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-9)


# ----------------------------------------------------------------------------- metrics, hand-made

# 3 images, 15 captions (caption j belongs to image j // 5). Row i is image i's scores.
#   image 0: own captions 0..4 best 0.90 (c1); non-own above it: c6 0.95           -> rank 1
#   image 1: own 5..9 best 0.96 (c7); non-own above: c0 .99 c2 .98 c3 .97          -> rank 3
#   image 2: own 10..14 best 0.50 (c12); non-own above: 0.6..0.99 (seven of them)  -> rank 7
HAND = torch.tensor([
    [0.10, 0.90, 0.20, 0.30, 0.40, 0.50, 0.95, 0.00, 0.00, 0.00, 0.01, 0.02, 0.03, 0.04, 0.05],
    [0.99, 0.10, 0.98, 0.97, 0.11, 0.20, 0.30, 0.96, 0.00, 0.40, 0.12, 0.13, 0.14, 0.15, 0.16],
    [0.99, 0.98, 0.97, 0.96, 0.95, 0.60, 0.70, 0.10, 0.20, 0.30, 0.11, 0.40, 0.50, 0.21, 0.22],
], dtype=torch.float64)
HAND_I2T = [1, 3, 7]
# t2i: column j ranks the three images; rank of image j // 5, counted by hand per column:
#   c0 (.10,.99,.99): own .10 below both -> 2    c1 (.90,.10,.98): 1     c2 (.20,.98,.97): 2
#   c3 (.30,.97,.96): 2    c4 (.40,.11,.95): 1
#   c5 (.50,.20,.60): own .20 -> 2   c6 (.95,.30,.70): 2   c7 (0,.96,.10): 0   c8 (0,0,.20): own 0 ties
#   image 0 and is below image 2 -> 2   c9 (0,.40,.30): 0
#   c10 (.01,.12,.11): own .11 -> 1   c11 (.02,.13,.40): 0   c12 (.03,.14,.50): 0
#   c13 (.04,.15,.21): 0   c14 (.05,.16,.22): 0
HAND_T2I = [2, 1, 2, 2, 1, 2, 2, 0, 2, 0, 1, 0, 0, 0, 0]


def test_hand_made_ranks_and_metrics():
    assert RT.i2t_ranks(HAND).tolist() == HAND_I2T
    assert RT.t2i_ranks(HAND).tolist() == HAND_T2I
    rec = RT.recall_metrics(HAND)
    # i2t ranks 1, 3, 7: R@1 0%, R@5 2/3, R@10 100%, median 3 -> medr 4, mean 11/3 -> meanr 14/3
    assert_metrics(rec.i2t, (0.0, 200 / 3, 100.0, 4.0, 14 / 3))
    # t2i: 6 of 15 at rank 0, 3 at rank 1, 6 at rank 2; median (8th) 1 -> medr 2; mean 15/15
    assert_metrics(rec.t2i, (40.0, 100.0, 100.0, 2.0, 2.0))
    assert rec.rsum == pytest.approx(0 + 200 / 3 + 100 + 40 + 100 + 100)
    assert rec.lines()[0] == f"rsum: {rec.rsum:.1f}"


def test_ties_count_against_the_match():
    sims = torch.full((3, 15), 0.5)
    assert RT.i2t_ranks(sims).tolist() == [10, 10, 10]
    assert RT.t2i_ranks(sims).tolist() == [2] * 15
    rec = RT.recall_metrics(sims)
    # i2t rank 10: even R@10 (rank < 10) misses; t2i rank 2: R@5 and R@10 hit
    assert rec.i2t[:3] == (0.0, 0.0, 0.0) and rec.t2i[:3] == (0.0, 100.0, 100.0)
    assert rec.rsum == 200.0


def random_order_metrics(sims, cpi):
    """The "expected" tie rule by brute force: every order of a query's items equally likely,
    then a stable sort by score (so tied items keep that random order); per direction, the
    percent of (query, order) with rank < 1, 5, 10 averaged over queries, floor(median of the
    per-query mean ranks) + 1, and the mean rank + 1. Small rows only (n! orders)."""
    def query(scores, matches):
        ranks = []
        for perm in itertools.permutations(range(len(scores))):
            order = sorted(perm, key=lambda c: -scores[c])
            ranks.append(min(order.index(c) for c in matches))
        return np.array(ranks, dtype=np.float64)

    n_i, n_c = sims.shape
    out = []
    for per_query in ([query(sims[i], range(cpi * i, cpi * i + cpi)) for i in range(n_i)],
                      [query(sims[:, j], [j // cpi]) for j in range(n_c)]):
        mean_rank = np.array([r.mean() for r in per_query])
        out.append(tuple(100.0 * np.mean([np.mean(r < K) for r in per_query]) for K in (1, 5, 10))
                   + (float(np.floor(np.median(mean_rank)) + 1), float(mean_rank.mean() + 1)))
    return out


def test_expected_ties_on_a_constant_matrix():
    rec = RT.recall_metrics(torch.full((3, 15), 0.5), ties="expected")
    # i2t: 10 tied non-matches, 5 tied own captions. The first own caption's position X in a
    # random order: P(X >= t) = C(10, t) / C(15, t); E[X] = 10 / 6
    assert_metrics(rec.i2t, (100.0 * (1 - 10 / 15), 100.0 * (1 - 252 / 3003), 100.0 * (1 - 1 / 3003),
                             2.0, 10 / 6 + 1))
    # t2i: 2 tied other images, 1 own: rank 0, 1, 2 equally likely
    assert_metrics(rec.t2i, (100.0 / 3, 100.0, 100.0, 2.0, 2.0))
    assert RT.i2t_ranks(torch.full((3, 15), 0.5), ties="expected").tolist() == [10 / 6] * 3
    assert RT.t2i_ranks(torch.full((3, 15), 0.5), ties="expected").tolist() == [1.0] * 15


@pytest.mark.parametrize("n,cpi,seed", [(2, 3, 0), (3, 2, 1), (7, 1, 2), (2, 3, 3), (3, 2, 4)])
def test_expected_ties_average_every_tie_order(n, cpi, seed):
    gen = torch.Generator().manual_seed(seed)
    sims = torch.randint(0, 3, (n, cpi * n), generator=gen).double()     # ties everywhere
    want_i2t, want_t2i = random_order_metrics(sims.numpy(), cpi)
    rec = RT.recall_metrics(sims, cpi, ties="expected")
    assert_metrics(rec.i2t, want_i2t)
    assert_metrics(rec.t2i, want_t2i)
    # the release's rule is the worst order: never more recall
    worst = RT.recall_metrics(sims, cpi)
    assert all(w <= e + 1e-9 for w, e in zip(worst.i2t[:3] + worst.t2i[:3], rec.i2t[:3] + rec.t2i[:3]))


def test_tie_rules_agree_without_ties():
    sims = scores_with_signal(40, seed=3)
    assert RT.recall_metrics(sims, ties="expected") == RT.recall_metrics(sims)
    assert torch.equal(RT.i2t_ranks(sims, ties="expected"), RT.i2t_ranks(sims).double())
    mean, per = RT.fold5_metrics(sims, ties="expected")
    assert mean == RT.fold5_metrics(sims)[0]
    with pytest.raises(ValueError, match="ties"):
        RT.recall_metrics(sims, ties="optimistic")
    with pytest.raises(ValueError, match="ties"):
        RT.t2i_ranks(sims, ties=None)


def test_medr_of_an_even_count_floors_the_median():
    # ranks 0, 1, 2, 3: np.median 1.5, floor 1, +1 -> 2; mean 1.5 + 1
    assert RT.recall_from_ranks(torch.tensor([3, 0, 2, 1])) == (25.0, 100.0, 100.0, 2.0, 2.5)


@pytest.mark.parametrize("n", [1, 4, 23])
def test_metrics_match_release_loops_on_random_scores(n):
    gen = torch.Generator().manual_seed(n)
    sims = torch.rand(n, 5 * n, generator=gen, dtype=torch.float64)   # no ties (almost surely)
    rec = RT.recall_metrics(sims)
    s = sims.numpy()
    assert np.array_equal(RT.i2t_ranks(sims).numpy(), release_i2t(n, s))
    assert np.array_equal(RT.t2i_ranks(sims).numpy(), release_t2i(n, s))
    assert_metrics(rec.i2t, release_metrics(release_i2t(n, s)))
    assert_metrics(rec.t2i, release_metrics(release_t2i(n, s)))


def scores_with_signal(n, seed, cpi=5):
    """(n, cpi n) continuous float64 scores (no ties, almost surely) in which each caption's own
    image scores higher on average, so that the recalls are neither 0 nor 100."""
    gen = torch.Generator().manual_seed(seed)
    sims = torch.rand(n, cpi * n, generator=gen, dtype=torch.float64)
    cols = torch.arange(cpi * n)
    sims[cols // cpi, cols] += 0.6 * torch.rand(cpi * n, generator=gen, dtype=torch.float64)
    return sims


@pytest.mark.parametrize("i2t_chunk,t2i_chunk", [(256, 1024), (7, 13), (1, 1), (299, 1499)])
def test_metrics_past_one_chunk_match_the_release_loops(i2t_chunk, t2i_chunk):
    # 300 images x 1500 captions: more than one default chunk in both directions (256 images,
    # 1,024 captions), and odd chunk sizes whose last chunk is partial
    n = 300
    sims = scores_with_signal(n, seed=31)
    s = sims.numpy()
    want_i2t, want_t2i = release_i2t(n, s), release_t2i(n, s)
    assert np.array_equal(RT.i2t_ranks(sims, chunk=i2t_chunk).numpy(), want_i2t)
    assert np.array_equal(RT.t2i_ranks(sims, chunk=t2i_chunk).numpy(), want_t2i)
    rec = RT.recall_metrics(sims)
    assert_metrics(rec.i2t, release_metrics(want_i2t))
    assert_metrics(rec.t2i, release_metrics(want_t2i))
    assert 100.0 < rec.rsum < 500.0          # the signal makes every recall informative
    with pytest.raises(ValueError, match="chunk"):
        RT.i2t_ranks(sims, chunk=0)


def test_fold5_uses_only_the_diagonal_blocks_and_averages():
    gen = torch.Generator().manual_seed(5)
    sims = torch.rand(10, 50, generator=gen, dtype=torch.float64)
    blocked = sims.clone()
    off = torch.ones(10, 50, dtype=torch.bool)     # outside every fold's block: huge scores
    for f in range(5):
        off[2 * f:2 * f + 2, 10 * f:10 * f + 10] = False
    blocked[off] = 1e6
    mean, per = RT.fold5_metrics(blocked)
    want = []
    for f in range(5):
        blk = sims[2 * f:2 * f + 2, 10 * f:10 * f + 10].numpy()
        want.append(release_metrics(release_i2t(2, blk)) + release_metrics(release_t2i(2, blk)))
    for f in range(5):
        assert_metrics(per[f].i2t + per[f].t2i, want[f])
    assert_metrics(mean.i2t + mean.t2i, tuple(np.mean(want, axis=0)))
    assert mean.rsum == pytest.approx(np.mean([sum(w[0:3]) + sum(w[5:8]) for w in want]))


def test_average_scores_and_errors():
    a, b = torch.rand(2, 10), torch.rand(2, 10)
    torch.testing.assert_close(RT.average_scores([a, b]), (a + b) / 2)
    with pytest.raises(ValueError, match="score_matrices"):
        RT.average_scores([a, torch.rand(2, 5)])
    with pytest.raises(ValueError, match="score_matrices"):
        RT.average_scores([])
    with pytest.raises(ValueError, match="sims"):
        RT.recall_metrics(torch.rand(2, 9))
    with pytest.raises(ValueError, match="NaN"):
        RT.recall_metrics(torch.tensor([[float("nan")] * 5]))
    with pytest.raises(ValueError, match="folds"):
        RT.fold_slices(7)


# ----------------------------------------------------------------------------- engine

@pytest.fixture(scope="module")
def small_set():
    """5 images (R = 4) x 25 captions (lengths 1..6, NaN padding), a float64 coop_rcar T=2 head."""
    img, cap, lens = make_inputs(5, 25, 4, 6, DIM, torch.float64, seed=11)
    head = make_head("coop_rcar", 2, "t2i", DIM, SIM, torch.float64, seed=3)
    with torch.no_grad():
        want = head(img, cap, lens, backend="reference")
    return head, img, cap, lens, want


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("tile", [None, (2, 3), (5, 1)])
def test_score_all_matches_one_reference_call(small_set, backend, tile):
    head, img, cap, lens, want = small_set
    got = RT.score_all(head, img, cap, lens, backend=backend, tile=tile, progress=False)
    assert got.dtype == torch.float32 and got.shape == (5, 25)
    torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=0)


def test_score_all_scores_in_eval_mode_and_leaves_the_head_training(small_set):
    head, img, cap, lens, want = small_set
    head.train()
    try:
        got = RT.score_all(head, img, cap, lens, backend="torch", progress=False)
        assert head.training
    finally:
        head.eval()
    torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=0)   # no RAR dropout


def test_score_all_half_precision_keeps_the_head(small_set):
    head, img, cap, lens, want = small_set
    got = RT.score_all(head, img.float(), cap.float(), lens, backend="torch", dtype="bf16", progress=False)
    assert got.dtype == torch.float32
    assert (got - want.float()).abs().max() < 0.02     # bf16 has 8 bits of mantissa
    assert (got - want.float()).abs().max() > 0        # it did run in bf16
    assert next(head.parameters()).dtype == torch.float64
    with pytest.raises(ValueError, match="dtype"):
        RT.score_all(head, img, cap, lens, dtype="fp8")
    with pytest.raises(ValueError, match="memory_budget"):
        RT.score_all(head, img, cap, lens, memory_budget=0)


def test_progress_bar_counts_every_pair(small_set, monkeypatch):
    head, img, cap, lens, _ = small_set
    bars = []

    class FakeTqdm:
        def __init__(self, total, **kw):
            self.total, self.n, self.closed = total, 0, False
            bars.append(self)

        def update(self, n):
            self.n += n

        def close(self):
            self.closed = True

    fake = types.ModuleType("tqdm.auto")
    fake.tqdm = FakeTqdm
    monkeypatch.setitem(sys.modules, "tqdm", types.ModuleType("tqdm"))
    monkeypatch.setitem(sys.modules, "tqdm.auto", fake)
    RT.score_all(head, img, cap, lens, backend="torch", tile=(2, 4), progress=True)
    assert len(bars) == 1 and bars[0].total == 125 and bars[0].n == 125 and bars[0].closed
    RT.score_all(head, img, cap, lens, backend="torch", progress=None)   # 125 pairs: too short for a bar
    assert len(bars) == 1
    # without tqdm there is no bar, and scoring still works
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    got = RT.score_all(head, img, cap, lens, backend="torch", progress=True)
    assert got.shape == (5, 25)


def test_plan_tiles_respects_the_budget():
    budget = 8 << 20
    ti, tc = RT.plan_tiles(1000, 5000, 36, 40, 1024, 4, "cpu", budget)
    assert ti * 36 * 1024 * 4 <= budget // 2 and tc * 40 * 1024 * 4 <= budget // 2
    assert ti >= 1 and tc >= 1
    assert RT.plan_tiles(3, 7, 36, 40, 1024, 4, "cpu") == (3, 7)


# ----------------------------------------------------------------------------- two-stage

def test_prefilter_is_cosine_of_mean_pooled(small_set):
    _, img, cap, lens, _ = small_set
    got = RT.prefilter_scores(img, cap, lens)
    for i in range(img.shape[0]):
        gi = img[i].mean(0)
        for j in range(cap.shape[0]):
            gc = cap[j, :int(lens[j])].mean(0)     # valid words only: padding is NaN
            want = float(gi @ gc / (gi.norm() * gc.norm()))
            assert float(got[i, j]) == pytest.approx(want, abs=1e-5)


def test_score_pairs_matches_the_grid(small_set):
    head, img, cap, lens, want = small_set
    gen = torch.Generator().manual_seed(2)
    pi, pc = torch.randint(0, 5, (40,), generator=gen), torch.randint(0, 25, (40,), generator=gen)
    got = RT.score_pairs(head, img, cap, lens, pi, pc, backend="torch", max_images=2)
    torch.testing.assert_close(got, want[pi, pc].float(), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="pair_cap"):
        RT.score_pairs(head, img, cap, lens, pi, pc + 100)


@pytest.mark.parametrize("attn_type", ["t2i", "i2t"])
def test_two_stage_with_every_candidate_is_exhaustive(small_set, attn_type):
    _, img, cap, lens, _ = small_set
    head = make_head("coop_rcar", 2, attn_type, DIM, SIM, torch.float64, seed=8)
    sims = RT.score_all(head, img, cap, lens, backend="torch", progress=False).double()
    res = RT.two_stage(RT.Scorer(head, img, cap, lens), k=25, backend="torch")
    assert res.pairs_scored == res.pairs_total == 125
    assert torch.equal(res.i2t_ranks, RT.i2t_ranks(sims)) and torch.equal(res.t2i_ranks, RT.t2i_ranks(sims))
    assert res.recall == RT.recall_metrics(sims)
    assert torch.equal(res.i2t_ranks, torch.from_numpy(release_i2t(5, sims.numpy())).long())


def brute_two_stage(sims, pre, k, cpi=5):
    """The two-stage ranking written out per query: the top-k by prefilter, re-ordered by RCAR,
    then the rest in prefilter order; the position of the best match in that list. Every sort
    puts a non-match before a match of the same score (ties count against the match), and is
    otherwise stable (lower index first)."""
    n_i, n_c = sims.shape
    i2t = []
    for i in range(n_i):
        match = lambda c: c // cpi == i
        order = sorted(range(n_c), key=lambda c: (-pre[i, c], match(c)))
        top, rest = order[:k], order[k:]
        ranked = sorted(top, key=lambda c: (-sims[i, c], match(c))) + rest
        i2t.append(min(ranked.index(c) for c in range(cpi * i, cpi * i + cpi)))
    t2i = []
    for c in range(n_c):
        match = lambda i: i == c // cpi
        order = sorted(range(n_i), key=lambda i: (-pre[i, c], match(i)))
        top, rest = order[:k], order[k:]
        ranked = sorted(top, key=lambda i: (-sims[i, c], match(i))) + rest
        t2i.append(ranked.index(c // cpi))
    return i2t, t2i


@pytest.mark.parametrize("k", [1, 2, 4])
def test_two_stage_ranks_match_the_written_out_procedure(k):
    # a deliberately weak prefilter (noisy) so that some matches fall outside the top k
    n = 6
    img, cap, lens = make_inputs(n, 5 * n, 4, 5, DIM, torch.float64, seed=20 + k)
    head = make_head("only_rar", 1, "t2i", DIM, SIM, torch.float64, seed=4)
    sims = RT.score_all(head, img, cap, lens, backend="torch", progress=False).double()
    gen = torch.Generator().manual_seed(k)
    pre = torch.rand(n, 5 * n, generator=gen)
    res = RT.two_stage(RT.Scorer(head, img, cap, lens), k=k, backend="torch", prefilter=pre)
    want_i2t, want_t2i = brute_two_stage(sims.numpy(), pre.numpy(), k)
    assert res.i2t_ranks.tolist() == want_i2t
    assert res.t2i_ranks.tolist() == want_t2i
    assert res.k_images == min(k, n) and res.k_captions == k
    assert max(n * k, 5 * n * min(k, n)) <= res.pairs_scored <= n * k + 5 * n * min(k, n)


class IntegerHead(torch.nn.Module):
    """A stand-in head with exact ties: the sum of an image's regions dotted with the sum of a
    caption's valid words. On small-integer features every score is an integer, exact in any
    float type and in any batch, so equal scores are equal whichever call computes them."""

    def forward(self, img, cap, cap_lens, backend="auto", memory_budget=None):
        valid = torch.arange(cap.shape[1])[None, :] < cap_lens.cpu()[:, None]
        words = torch.where(valid[..., None], cap, 0.0).sum(dim=1)
        return img.sum(dim=1) @ words.t()


def integer_set(n, seed):
    gen = torch.Generator().manual_seed(seed)
    img = torch.randint(-1, 2, (n, 2, 4), generator=gen).double()
    cap = torch.randint(-1, 2, (5 * n, 3, 4), generator=gen).double()
    lens = torch.randint(1, 4, (5 * n,), generator=gen)
    cap[torch.arange(3)[None, :] >= lens[:, None]] = float("nan")
    return img, cap, lens


@pytest.mark.parametrize("prefilter", ["constant", "three_values", "duplicates"])
@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_two_stage_ties_count_against_the_match(prefilter, k):
    n = 6
    img, cap, lens = integer_set(n, seed=k)
    head = IntegerHead()
    with torch.no_grad():
        sims = head(img, cap, lens).numpy()
    assert len(np.unique(sims)) < sims.size // 4            # RCAR's stand-in ties a lot
    gen = torch.Generator().manual_seed(10 + k)
    if prefilter == "constant":
        pre = torch.zeros(n, 5 * n)
    elif prefilter == "three_values":
        pre = torch.randint(0, 3, (n, 5 * n), generator=gen).float()
    else:   # images 2m and 2m + 1 duplicated, and so are their captions: every match ties
        base = torch.rand(n // 2, 5 * n // 2, generator=gen)
        i, c = torch.arange(n)[:, None], torch.arange(5 * n)[None, :]
        pre = base[i // 2, (c // 10) * 5 + c % 5]
        assert torch.equal(pre[0], pre[1]) and torch.equal(pre[:, 0], pre[:, 5])
    res = RT.two_stage(RT.Scorer(head, img, cap, lens), k=k, prefilter=pre)
    want_i2t, want_t2i = brute_two_stage(sims, pre.numpy(), k)
    assert res.i2t_ranks.tolist() == want_i2t
    assert res.t2i_ranks.tolist() == want_t2i


def test_two_stage_with_ties_and_every_candidate_is_exhaustive():
    img, cap, lens = integer_set(5, seed=9)
    head = IntegerHead()
    with torch.no_grad():
        sims = head(img, cap, lens)
    res = RT.two_stage(RT.Scorer(head, img, cap, lens), k=25, prefilter=torch.zeros(5, 25))
    assert torch.equal(res.i2t_ranks, RT.i2t_ranks(sims)) and torch.equal(res.t2i_ranks, RT.t2i_ranks(sims))
    assert res.recall == RT.recall_metrics(sims)


def test_top_candidates_break_ties_against_the_match_then_by_index():
    P = torch.tensor([[0.5, 0.9, 0.5, 0.5, 0.1],
                      [0.3, 0.3, 0.3, 0.3, 0.3]])
    own = torch.tensor([[2, 3], [0, 4]])
    got = RT.top_candidates(P, 3, own)
    # row 0: 0.9 (col 1), then of the tied 0.5s the non-match col 0, then own col 2 (before 3)
    # row 1: all tie: the non-matches 1, 2, 3 take every place
    assert [sorted(r) for r in got.tolist()] == [[0, 1, 2], [1, 2, 3]]


def test_two_stage_averages_several_scorers(small_set):
    head_a, img, cap, lens, _ = small_set
    head_b = make_head("only_rcr", 1, "i2t", DIM, SIM, torch.float64, seed=9)
    cap_b = cap * 0.5 + 0.1      # a second model has its own features
    sa = RT.score_all(head_a, img, cap, lens, backend="torch", progress=False)
    sb = RT.score_all(head_b, img, cap_b, lens, backend="torch", progress=False)
    res = RT.two_stage([RT.Scorer(head_a, img, cap, lens), RT.Scorer(head_b, img, cap_b, lens)], k=30)
    avg = (sa.double() + sb.double()) / 2
    assert torch.equal(res.t2i_ranks, RT.t2i_ranks(avg)) and torch.equal(res.i2t_ranks, RT.i2t_ranks(avg))


def test_compare_two_stage_reports_loss_and_time():
    ex = RT.Recall((50.0, 80.0, 90.0, 2.0, 3.0), (40.0, 70.0, 80.0, 2.0, 4.0))
    res = RT.TwoStageResult(torch.zeros(1), torch.zeros(1),
                            RT.Recall((50.0, 75.0, 90.0, 2.0, 3.0), (40.0, 70.0, 78.0, 2.0, 4.0)),
                            10, 10, 30, 100, 0.5, 1.5)
    rep = RT.compare_two_stage(ex, 8.0, res)
    assert rep.recall_lost == pytest.approx(7.0)
    assert rep.time_saved == pytest.approx(0.75)
    assert rep.diff["i2t_r5"] == -5.0 and rep.diff["t2i_r10"] == -2.0
    text = "\n".join(rep.lines())
    assert "30 of 100" in text and "75%" in text and "i2t_r5 5.0" in text


# ----------------------------------------------------------------------------- encoders

IMG_DIM, EMB, WORD, VOCAB = 20, 12, 7, 15


def randomize_all_(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                v = torch.randn(t.shape, generator=gen, dtype=torch.float64) * 0.3
                if name.endswith("running_var"):
                    v = v.abs() + 0.5
                t.copy_(v)
    return module


def test_image_encoder_is_fc_plus_mlp_then_l2n():
    enc = randomize_all_(E.EncoderImage(IMG_DIM, EMB), 1).double().eval()
    x = torch.randn(3, 5, IMG_DIM, dtype=torch.float64)
    sd = enc.state_dict()
    fc = x @ sd["fc.weight"].t() + sd["fc.bias"]
    h = x @ sd["mlp.layers.0.weight"].t() + sd["mlp.layers.0.bias"]
    h = (h - sd["mlp.bns.0.running_mean"]) / torch.sqrt(sd["mlp.bns.0.running_var"] + 1e-5)
    h = torch.relu(h * sd["mlp.bns.0.weight"] + sd["mlp.bns.0.bias"])
    mlp = h @ sd["mlp.layers.1.weight"].t() + sd["mlp.layers.1.bias"]
    want = fc + mlp
    torch.testing.assert_close(enc(x), want / (want.norm(dim=-1, keepdim=True) + 1e-8))
    enc.no_imgnorm = True
    torch.testing.assert_close(enc(x), want)
    assert sd["mlp.layers.0.weight"].shape == (EMB // 2, IMG_DIM)
    assert sd["mlp.bns.1.running_mean"].shape == (EMB,)      # held (the release has it), unused


@pytest.mark.parametrize("bi,layers", [(True, 1), (False, 1), (True, 2)])
def test_text_encoder_matches_a_gru_run_on_each_caption_alone(bi, layers):
    enc = E.EncoderText(VOCAB, WORD, EMB, layers, use_bi_gru=bi).double().eval()
    ids = torch.randint(0, VOCAB, (4, 6))
    lens = torch.tensor([6, 1, 3, 5])
    got = enc(ids, lens)
    assert got.shape == (4, 6, EMB)
    for j in range(4):
        n = int(lens[j])
        x = enc.embed.weight[ids[j, :n]][None]               # (1, n, word_dim)
        out, _ = enc.rnn(x)                                   # the GRU on this caption alone
        out = out[0]
        if bi:
            out = (out[:, :EMB] + out[:, EMB:]) / 2
        want = out / (out.norm(dim=-1, keepdim=True) + 1e-8)
        torch.testing.assert_close(got[j, :n], want)
        assert torch.count_nonzero(got[j, n:]) == 0
    with pytest.raises(ValueError, match="ids"):
        enc(torch.full((1, 2), VOCAB), torch.tensor([2]))


def release_encoder_keys(bi=True, layers=1):
    keys = ["img_enc.fc.weight", "img_enc.fc.bias",
            "img_enc.mlp.layers.0.weight", "img_enc.mlp.layers.0.bias",
            "img_enc.mlp.layers.1.weight", "img_enc.mlp.layers.1.bias"]
    for b in (0, 1):
        keys += [f"img_enc.mlp.bns.{b}.{n}" for n in
                 ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    keys.append("txt_enc.embed.weight")
    for l in range(layers):
        for suffix in ([""] + (["_reverse"] if bi else [])):
            keys += [f"txt_enc.rnn.{n}_l{l}{suffix}" for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    return keys


def small_config(**kw):
    c = dict(vocab_size=VOCAB, img_dim=IMG_DIM, embed_size=EMB, word_dim=WORD, sim_dim=SIM,
             regulator="coop_rcar", steps=2, attn_type="t2i")
    c.update(kw)
    return E.ModelConfig(**c)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return randomize_all_(E.MatchingModel(small_config(**kw)), seed + 100).eval()


def test_model_keys_are_the_release_layout():
    from test_checkpoint import RELEASE_KEYS
    m = make_model()
    want = set(release_encoder_keys()) | {"sim_enc." + k for k in RELEASE_KEYS[("coop_rcar", 2)]}
    assert set(m.state_dict()) == want


def release_opt(**kw):
    """The release's options (arguments.py names) as the argparse.Namespace it saves."""
    o = dict(img_dim=IMG_DIM, embed_size=EMB, word_dim=WORD, sim_dim=SIM, num_layers=1,
             use_bi_gru=True, no_imgnorm=False, no_txtnorm=False, vocab_size=VOCAB,
             attn_type="i2t", t2i_smooth=10.0, i2t_smooth=4.0, self_regulator="coop_rcar",
             rcar_step=2, rcr_step=0, rar_step=0, data_name="f30k_precomp", vocab_path="./vocab")
    o.update(kw)
    return argparse.Namespace(**o)


def test_release_checkpoint_round_trip(tmp_path):
    m = make_model(1, attn_type="i2t", smooth=4.0)
    state = {"module." + k: v.clone() for k, v in m.state_dict().items()}   # DataParallel keys
    path = tmp_path / "model_best.pth"
    torch.save({"model": state, "opt": release_opt(), "epoch": 7,
                "best_rsum": np.float64(500.5), "Eiters": 3}, path)
    got = E.load_checkpoint(str(path))
    assert not got.training
    c = got.config
    assert (c.regulator, c.steps, c.attn_type, c.smooth, c.vocab_size) == ("coop_rcar", 2, "i2t", 4.0, VOCAB)
    for k, v in m.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    x = torch.randn(3, 4, IMG_DIM)
    ids, lens = torch.randint(0, VOCAB, (6, 5)), torch.tensor([5, 2, 3, 4, 5, 1])
    with torch.no_grad():
        a = got(x, ids, lens, backend="torch")
        b = m(x, ids, lens, backend="torch")     # m has the same config and weights
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_save_checkpoint_writes_the_release_layout(tmp_path):
    m = make_model(5, regulator="only_rar", steps=2, attn_type="i2t")
    path = tmp_path / "saved.pth"
    E.save_checkpoint(m, str(path), module_prefix=True, epoch=3)
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 3 and raw["opt"]["self_regulator"] == "only_rar" and raw["opt"]["rar_step"] == 2
    assert all(k.startswith("module.") for k in raw["model"])
    got = E.load_checkpoint(str(path))
    assert got.config == m.config
    for k, v in m.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k


@pytest.mark.parametrize("regulator,steps", [("only_rar", 2), ("only_rcr", 1), ("coop_rcar", 2), ("coop_rcar", 3)])
def test_checkpoint_without_opt_infers_the_head(tmp_path, regulator, steps):
    m = make_model(2, regulator=regulator, steps=steps)
    parts = [{k[8:]: v for k, v in m.state_dict().items() if k.startswith(p + ".")}
             for p in ("img_enc", "txt_enc", "sim_enc")]
    path = tmp_path / "sgraf_style.pth"
    torch.save({"model": parts}, path)                   # the list form, no 'opt'
    got = E.load_checkpoint(str(path), attn_type="i2t")
    assert (got.config.regulator, got.config.steps) == (regulator, steps)
    assert (got.config.embed_size, got.config.sim_dim, got.config.img_dim) == (EMB, SIM, IMG_DIM)
    assert got.config.attn_type == "i2t" and got.config.use_bi_gru


def test_checkpoint_errors_name_the_file_and_key(tmp_path):
    m = make_model(3)
    good = tmp_path / "good.pth"
    torch.save({"model": m.state_dict(), "opt": release_opt(attn_type="t2i")}, good)
    with pytest.raises(E.CheckpointError, match="nowhere.pth: no such checkpoint"):
        E.load_checkpoint(str(tmp_path / "nowhere.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(E.CheckpointError, match="junk.pth: cannot read"):
        E.load_checkpoint(str(junk))
    # steps 3 asked for, the file holds T = 2: the first missing key is named
    with pytest.raises(E.CheckpointError, match=r"good.pth: missing key 'sim_enc\.alv_modules\.2\."):
        E.load_checkpoint(str(good), steps=3)
    # a checkpoint whose sim head was trained at another embedding size
    state = m.state_dict()
    state["sim_enc.alv_modules.0.sim_transform_w.weight"] = torch.zeros(SIM, EMB + 4)
    bad = tmp_path / "bad.pth"
    torch.save({"model": state, "opt": release_opt()}, bad)
    with pytest.raises(E.CheckpointError, match=r"bad.pth: key 'sim_enc\.alv_modules\.0\.sim_transform_w\.weight' "
                                                r"has shape \(8, 16\), the model expects \(8, 12\)"):
        E.load_checkpoint(str(bad))
    extra = dict(m.state_dict(), **{"sim_enc.rar_modules.5.rar_q_w.0.weight": torch.zeros(1)})
    torch.save({"model": extra}, bad)
    with pytest.raises(E.CheckpointError, match="unexpected key 'sim_enc.rar_modules.5"):
        E.load_checkpoint(str(bad), regulator="coop_rcar", steps=2)
    torch.save({"weights": 1}, bad)
    with pytest.raises(E.CheckpointError, match="bad.pth: no 'model' state dict"):
        E.load_checkpoint(str(bad))


def test_vocabulary_forms_and_encoding(tmp_path):
    w2i = {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "a": 4, "dog": 5, "runs": 6, ".": 7}
    release = tmp_path / "f30k_precomp_vocab.json"
    release.write_text(json.dumps({"word2idx": w2i, "idx2word": {str(v): k for k, v in w2i.items()}, "idx": 8}))
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(w2i))
    for p in (release, plain):
        v = E.Vocabulary.from_json(str(p))
        assert len(v) == 8
        assert v.encode("A dog runs fast.") == [1, 4, 5, 6, 3, 7, 2]
    ids, lens = E.encode_captions(["a dog", "dog runs ."], E.Vocabulary(w2i))
    assert ids.tolist() == [[1, 4, 5, 2, 0], [1, 5, 6, 7, 2]] and lens.tolist() == [4, 5]
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(E.CheckpointError, match="bad.json: not a vocabulary json"):
        E.Vocabulary.from_json(str(bad))
    bad.write_text(json.dumps({"a": 0, "<start>": 1}))
    with pytest.raises(E.CheckpointError, match="bad.json: no <end>, <unk> token"):
        E.Vocabulary.from_json(str(bad))
    m = make_model(4)
    big = E.Vocabulary(dict(w2i, zebra=VOCAB + 3))
    with pytest.raises(E.CheckpointError, match="rows"):
        E.check_vocab(m, big, "v.json")


def test_tokenize_splits_punctuation_and_contractions():
    assert E.tokenize("A man's dog, don't RUN!") == ["a", "man", "'s", "dog", ",", "do", "n't", "run", "!"]
    assert E.tokenize("a well-known  place") == ["a", "well-known", "place"]


# ----------------------------------------------------------------------------- data

def write_split(folder, split, n, R=3, Dm=IMG_DIM, repeat=1, seed=0):
    rng = np.random.default_rng(seed)
    ims = rng.standard_normal((n, R, Dm)).astype(np.float32)
    caps = [f"caption {j} of image {j // 5}" for j in range(5 * n)]
    D.write_precomp(str(folder), split, np.repeat(ims, repeat, axis=0) if repeat > 1 else ims, caps)
    return ims, caps


def test_load_precomp_once_and_five_times(tmp_path):
    ims, caps = write_split(tmp_path, "test", 4)
    sp = D.load_precomp(str(tmp_path), "test")
    assert sp.n_images == 4 and sp.captions == caps and np.array_equal(np.asarray(sp.images), ims)
    ims5, _ = write_split(tmp_path / "precomp", "testall", 3, repeat=5, seed=1)
    sp = D.load_precomp(str(tmp_path / "precomp"), "testall")
    assert sp.n_images == 3 and np.array_equal(np.asarray(sp.images), ims5)
    # the release's layout: data_path/precomp/
    nested = tmp_path / "f30k"
    write_split(nested / "precomp", "dev", 2)
    assert D.load_precomp(str(nested), "dev").n_images == 2


def test_load_precomp_errors_name_the_file(tmp_path):
    write_split(tmp_path, "test", 4)
    with pytest.raises(D.DataError, match=r"no split 'tset' .*splits here: test"):
        D.load_precomp(str(tmp_path), "tset")
    with pytest.raises(D.DataError, match="nowhere: no such data folder"):
        D.load_precomp(str(tmp_path / "nowhere"), "test")
    with open(tmp_path / "test_caps.txt", "a") as f:
        f.write("one caption too many\n")
    with pytest.raises(D.DataError, match=r"test_caps.txt: 21 captions do not pair with the 4 images"):
        D.load_precomp(str(tmp_path), "test")
    write_split(tmp_path, "dev", 2)
    (tmp_path / "dev_ims.npy").write_bytes(b"garbage")
    with pytest.raises(D.DataError, match="dev_ims.npy: not a readable .npy"):
        D.load_precomp(str(tmp_path), "dev")
    np.save(tmp_path / "dev_ims.npy", np.zeros((2, 5), np.float32))
    with pytest.raises(D.DataError, match=r"dev_ims.npy: expected region features of shape \(N, R, D\)"):
        D.load_precomp(str(tmp_path), "dev")
    (tmp_path / "dev_ims.npy").unlink()
    with pytest.raises(D.DataError, match="dev_ims.npy: no such file"):
        D.load_precomp(str(tmp_path), "dev")


def test_structured_dataset_layout():
    a = D.structured_dataset(3, 5, regions=6, dim=32, min_len=2, max_len=7, seed=4)
    b = D.structured_dataset(3, 5, regions=6, dim=32, min_len=2, max_len=7, seed=4)
    assert a.img.shape == (3, 6, 32) and a.cap.shape == (15, 7, 32) and a.lens.shape == (15,)
    assert torch.equal(a.img, b.img) and torch.equal(a.cap.nan_to_num(9), b.cap.nan_to_num(9))
    valid = torch.arange(7)[None, :] < a.lens[:, None]
    assert torch.isnan(a.cap[~valid]).all() and not torch.isnan(a.cap[valid]).any()
    torch.testing.assert_close(a.cap[valid].norm(dim=-1), torch.ones(int(valid.sum())))
    assert int(a.lens.min()) >= 2 and int(a.lens.max()) <= 7


def test_structured_data_makes_retrieval_meaningful():
    """Words derive from their own image's regions: the matching head ranks true pairs first far
    more often than chance (1 in 8 images)."""
    data = D.structured_dataset(8, 5, regions=12, dim=256, seed=1)
    for attn_type in ("t2i", "i2t"):
        head = D.structured_head("coop_rcar", 2, attn_type, embed_dim=256, sim_dim=32, seed=2)
        rec = RT.recall_metrics(RT.score_all(head, data.img, data.cap, data.lens, backend="torch"))
        assert rec.t2i[0] >= 60.0 and rec.i2t[0] >= 60.0, rec      # chance: 12.5
