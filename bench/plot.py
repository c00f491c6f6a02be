"""PNG charts of one run's rows (optional: needs matplotlib, which nothing else needs).

  throughput.png  pairs/s per case, one bar per backend (log scale)
  speedup.png     speed-up over release_loop per case, one bar per backend
"""

from __future__ import annotations

import os
from typing import List, Sequence

from .report import BASELINE, Row, speedups


def _case(r: Row) -> str:
    shard = r.shape.split(" ")[:2]
    return f"{r.op}\n{r.regulator} T={r.steps} {r.attn_type}\n{' '.join(shard)} {r.dtype}"


def _bars(ax, cases: List[str], values: dict, colors: dict, log: bool) -> None:
    backends = list(values)
    width = 0.8 / max(1, len(backends))
    for k, b in enumerate(backends):
        xs = [i + (k - (len(backends) - 1) / 2) * width for i in range(len(cases))]
        ys = [values[b].get(c, 0.0) or 0.0 for c in cases]
        ax.bar(xs, ys, width, label=b, color=colors[b])
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def write_plots(rows: Sequence[Row], out_dir: str) -> List[str]:
    """Write the charts into ``out_dir``; returns their paths. Raises ImportError without
    matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [(r, s) for r, s in zip(rows, speedups(rows)) if r.pairs_per_s]
    cases = list(dict.fromkeys(_case(r) for r, _ in timed))
    throughput, speedup = {}, {}
    for r, s in timed:
        throughput.setdefault(r.backend, {})[_case(r)] = r.pairs_per_s
        if r.backend != BASELINE and s is not None:
            speedup.setdefault(r.backend, {})[_case(r)] = s
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {b: palette[k % len(palette)] for k, b in enumerate(throughput)}   # same in both
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, values, ylabel, log in (("throughput.png", throughput, "pairs / s", True),
                                      ("speedup.png", speedup, "speed-up over release_loop", False)):
        if not values:
            continue
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(cases)), 4.5))
        _bars(ax, cases, values, colors, log)
        ax.set_ylabel(ylabel)
        if not log:
            ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(f"rcar_fast: {ylabel} ({rows[0].device})", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
