"""Exact scoring across processes (rcar_fast.app.distributed) with gloo on this CPU: 1 to 4
processes, sizes that do not divide evenly, both directions: every process returns the whole
matrix, bit-identical to one process's; the metrics too; every tile owned exactly once,
balanced by cost; a process that raises makes every process raise, and nothing hangs."""

from __future__ import annotations

import os

import pytest
import torch

from dist_workers import run_spawned, score_worker
from rcar_fast.app import distributed as DS
from rcar_fast.app import retrieval as RT
from rcar_testutil import make_head, make_inputs

#: (regulator, steps, attn_type, n_i, n_c, seed, tile (images, captions) per tile)
CASES = {"t2i": ("coop_rcar", 2, "t2i", 7, 11, 1, (2, 3)),
         "i2t": ("coop_rcar", 2, "i2t", 5, 13, 2, (3, 4)),
         "rcr": ("only_rcr", 1, "t2i", 3, 10, 3, (1, 7)),
         "metrics": ("coop_rcar", 2, "t2i", 3, 15, 4, (2, 4)),
         "default tiles": ("coop_rcar", 2, "t2i", 10, 300, 5, None)}      # 3,000 pairs: 2 tiles


def _single(case):
    regulator, steps, attn_type, n_i, n_c, seed, tile = case
    torch.set_num_threads(1)
    img, cap, lens = make_inputs(n_i, n_c, 5, 7, 24, torch.float32, seed)
    head = make_head(regulator, steps, attn_type, 24, 8, torch.float32, seed)
    return RT.score_all(head, img, cap, lens, backend="torch", tile=tile)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_process_gets_the_one_process_matrix(world, tmp_path):
    run_spawned(score_worker, world, (str(tmp_path), CASES, -1))
    want = {k: _single(c) for k, c in CASES.items()}
    for rank in range(world):
        got = torch.load(os.path.join(tmp_path, f"{rank}.pt"))
        assert "error" not in got, got.get("trace")
        for k in CASES:
            assert torch.equal(got[k], want[k]), (rank, k)           # bit-identical, no NaN left
    m1 = RT.recall_metrics(want["metrics"])
    mw = RT.recall_metrics(torch.load(os.path.join(tmp_path, "0.pt"))["metrics"])
    assert m1.as_dict() == mw.as_dict()


def test_a_failing_process_fails_every_process_without_hanging(tmp_path):
    run_spawned(score_worker, 3, (str(tmp_path), {"t2i": CASES["t2i"]}, 1), timeout_s=120)
    for rank in range(3):
        got = torch.load(os.path.join(tmp_path, f"{rank}.pt"))
        assert "DistributedScoringError" in got.get("error", ""), (rank, got)
        assert "rank 1: RuntimeError: planted failure on rank 1" in got["error"]


def test_tiles_owned_once_and_balanced():
    lens = torch.randint(6, 25, (997,), generator=torch.Generator().manual_seed(0))
    tiles = RT.score_tiles(103, lens, 36, 24, 1024, 2, tile=(16, 64))
    costs = [DS.tile_cost(t, lens, "t2i") for t in tiles]
    for world in (1, 2, 3, 4, 7):
        own = DS.owners(costs, world)
        assert len(own) == len(tiles) and set(own) <= set(range(world))
        loads = [sum(c for c, r in zip(costs, own) if r == q) for q in range(world)]
        assert max(loads) <= sum(costs) / world + max(costs)           # LPT's bound
        assert own == DS.owners(costs, world)                          # deterministic
    seen = torch.zeros(103, 997, dtype=torch.int64)
    for t in tiles:
        seen[t.i0:t.i1, t.cols] += 1
    assert torch.equal(seen, torch.ones_like(seen))                    # every pair in one tile


def test_group_without_torch_distributed_is_a_clear_error():
    img, cap, lens = make_inputs(2, 3, 5, 7, 24, torch.float32, 1)
    head = make_head("coop_rcar", 2, "t2i", 24, 8, torch.float32, 1)
    with pytest.raises(ValueError, match="group: torch.distributed is not initialised"):
        RT.score_all(head, img, cap, lens, group=True)
