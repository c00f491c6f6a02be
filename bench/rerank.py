"""Two-stage search's re-ranking: pair lists (one rcar_fast.ops.pair_scores call per tile of
candidate pairs, the kernels taking the list) against the per-caption path it replaced (one head
call per caption over its candidate images), on the CPU. Rows go to bench/results/history.csv.

    python -m bench.rerank                          # torch and cpp, 100 images x 500 captions, k 10
    python -m bench.rerank --backends cpp --images 200 --k 20

Op "two_stage rerank k=K pairs|per-caption": the seconds two_stage spent re-ranking
(TwoStageResult.rerank_s; the prefilter is the same for both), best of ``--repeats`` runs, the
two paths alternated; pairs/s counts the distinct candidate pairs scored. The note says whether
the two paths gave identical ranks (they must).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from .report import Row, append_csv, markdown_table
from .scale import cpu_env
from .shapes import SHARDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PerCaption(torch.nn.Module):
    """The same head seen without ``pair_scores``: retrieval.score_pairs then scores one grid per
    caption (the path two-stage search took before pair lists)."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, *args, **kwargs):
        return self.head(*args, **kwargs)


def measure(backend: str, n_i: int, k: int, repeats: int):
    """{path: (best rerank seconds, result)} for the pair-list and per-caption paths."""
    import rcar_fast
    from rcar_fast.app.retrieval import Scorer, two_stage
    img, cap, lens = SHARDS["flickr30k"].resized(n_i, 5 * n_i).inputs("cpu")
    torch.manual_seed(0)
    head = rcar_fast.RCARSimilarity().eval()
    heads = {"pairs": head, "per-caption": PerCaption(head)}
    best = {}
    for _ in range(repeats):
        for name, h in heads.items():
            res = two_stage(Scorer(h, img, cap, lens), k, backend=backend, progress=False)
            if name not in best or res.rerank_s < best[name][0]:
                best[name] = (res.rerank_s, res)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rerank", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="torch,cpp")
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--csv", default=os.path.join(ROOT, "bench", "results", "history.csv"))
    a = ap.parse_args(argv)
    env = cpu_env(f", {torch.get_num_threads()} threads")
    shard = SHARDS["flickr30k"].resized(a.images, 5 * a.images)
    rows = []
    for backend in a.backends.split(","):
        best = measure(backend, a.images, a.k, a.repeats)
        pairs, per = best["pairs"][1], best["per-caption"][1]
        same = torch.equal(pairs.i2t_ranks, per.i2t_ranks) and torch.equal(pairs.t2i_ranks, per.t2i_ranks)
        speedup = best["per-caption"][0] / best["pairs"][0]
        for name, (secs, res) in best.items():
            rows.append(Row(timestamp=env["timestamp"], git_commit=env["commit"], device=env["device"],
                            torch_version=env["torch"], triton_version=env["triton"], backend=backend,
                            op=f"two_stage rerank k={a.k} {name}", regulator="coop_rcar", steps=2,
                            attn_type="t2i", shape=shard.label, dtype="float32", median_ms=secs * 1e3,
                            pairs_per_s=res.pairs_scored / secs,
                            note=f"best of {a.repeats}; {res.pairs_scored} distinct pairs; ranks identical "
                                 f"to the other path: {same}; pairs / per-caption speed-up {speedup:.2f}"))
            print(f"{backend} {name}: rerank {secs:.2f} s, {res.pairs_scored / secs:.0f} pairs/s "
                  f"({res.pairs_scored} pairs)", flush=True)
        print(f"{backend}: pair lists {speedup:.2f}x the per-caption path; ranks identical: {same}", flush=True)
    append_csv(a.csv, rows)
    print("\n" + markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
