"""The training run's chart: loss and dev rsum per epoch from its metrics CSV, as an SVG file
(no plotting library needed)."""

from __future__ import annotations

import csv
import math
import os
from typing import List, Optional, Sequence, Tuple


def _floats(rows, key: str) -> List[Tuple[float, float]]:
    out = []
    for r in rows:
        try:
            x, y = float(r["epoch"]), float(r[key])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(y):
            out.append((x, y))
    return out


def _panel(points: Sequence[Tuple[float, float]], x0: float, title: str, colour: str,
           width: float = 360, height: float = 240, pad: float = 44) -> str:
    parts = [f'<text x="{x0 + width / 2:.0f}" y="18" text-anchor="middle" font-size="14">{title}</text>',
             f'<rect x="{x0 + pad:.0f}" y="{pad - 14:.0f}" width="{width - pad - 10:.0f}" '
             f'height="{height - pad - 10:.0f}" fill="none" stroke="#999"/>']
    if not points:
        parts.append(f'<text x="{x0 + width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle" '
                     'font-size="12">no data yet</text>')
        return "\n".join(parts)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xlo, xhi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    ylo, yhi = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    left, right, top, bottom = x0 + pad, x0 + width - 10, pad - 14, height - 24

    def px(x, y):
        return (left + (x - xlo) / (xhi - xlo) * (right - left), bottom - (y - ylo) / (yhi - ylo) * (bottom - top))
    path = " ".join(f"{a:.1f},{b:.1f}" for a, b in (px(x, y) for x, y in points))
    parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
    parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5" fill="{colour}"/>' for a, b in (px(x, y) for x, y in points)]
    parts += [f'<text x="{left - 4:.0f}" y="{bottom:.0f}" text-anchor="end" font-size="10">{ylo:.4g}</text>',
              f'<text x="{left - 4:.0f}" y="{top + 10:.0f}" text-anchor="end" font-size="10">{yhi:.4g}</text>',
              f'<text x="{left:.0f}" y="{bottom + 14:.0f}" font-size="10">{xlo:g}</text>',
              f'<text x="{right:.0f}" y="{bottom + 14:.0f}" text-anchor="end" font-size="10">epoch {xhi:g}</text>']
    return "\n".join(parts)


def plot_metrics(csv_path: str, svg_path: Optional[str] = None) -> str:
    """Writes the chart of ``csv_path`` (a run's metrics.csv) to ``svg_path`` (default: beside
    it, metrics.svg); returns the path."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    svg_path = svg_path or os.path.join(os.path.dirname(os.path.abspath(csv_path)), "metrics.svg")
    body = "\n".join([_panel(_floats(rows, "loss"), 0, "train loss (mean per step)", "#c0392b"),
                      _panel(_floats(rows, "rsum"), 370, "dev rsum", "#2471a3")])
    tmp = svg_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write('<svg xmlns="http://www.w3.org/2000/svg" width="740" height="250" font-family="sans-serif">\n'
                f'<rect width="740" height="250" fill="white"/>\n{body}\n</svg>\n')
    os.replace(tmp, svg_path)
    return svg_path


__all__ = ["plot_metrics"]
