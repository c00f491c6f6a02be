"""Benchmark rows: the CSV history they are appended to, and the markdown table they print as.

One row per measurement, columns ``FIELDS`` (bench/README.md says what each means). The table
adds one derived column, the speed-up over ``release_loop`` for the same op, regulator, steps,
direction, shape and dtype.
"""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, fields
from typing import Dict, Iterable, List, Optional, Sequence

BASELINE = "release_loop"


@dataclass
class Row:
    timestamp: str
    git_commit: str
    device: str
    torch_version: str
    triton_version: str
    backend: str
    op: str
    regulator: str
    steps: int
    attn_type: str
    shape: str
    dtype: str
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    pairs_per_s: Optional[float] = None
    gflops: Optional[float] = None
    frac_of_matmul_peak: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    max_abs_err: Optional[float] = None
    note: str = ""


FIELDS = [f.name for f in fields(Row)]
FLOAT_FIELDS = FIELDS[FIELDS.index("median_ms"):FIELDS.index("max_abs_err") + 1]


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def append_csv(path: str, rows: Iterable[Row]) -> None:
    """Append rows to ``path``, writing the header when the file is new. A file with another
    header is refused (ValueError) rather than mixed."""
    check_csv(path)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(FIELDS)
        for r in rows:
            w.writerow([_cell(v) for v in asdict(r).values()])


def check_csv(path: str) -> None:
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != FIELDS:
            raise ValueError(f"{path}: its header {header} is not this benchmark's {FIELDS}; "
                             f"pass another --csv or move the old file away")


def read_csv(path: str) -> List[Row]:
    """Rows of a history file, numbers parsed back (empty cells are None)."""
    out = []
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            kw = {k: rec.get(k) or "" for k in FIELDS}
            for k in FLOAT_FIELDS:
                kw[k] = float(kw[k]) if kw[k] else None
            kw["steps"] = int(kw["steps"] or 0)
            out.append(Row(**kw))
    return out


# ----------------------------------------------------------------------------- table

def _case_key(r: Row):
    return (r.op, r.regulator, int(r.steps), r.attn_type, r.shape, r.dtype)


def speedups(rows: Sequence[Row]) -> List[Optional[float]]:
    """Per row: release_loop's median / the row's median for the same case (None if either
    is missing)."""
    base: Dict[tuple, float] = {_case_key(r): r.median_ms for r in rows
                                if r.backend == BASELINE and r.median_ms}
    return [base[_case_key(r)] / r.median_ms if r.median_ms and _case_key(r) in base else None
            for r in rows]


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def markdown_table(rows: Sequence[Row], compact: bool = False) -> str:
    """One line per row; ``compact`` drops the spread, the dtype's details and the note."""
    cols = [("backend", lambda r, sp: r.backend), ("op", lambda r, sp: r.op),
            ("regulator", lambda r, sp: r.regulator), ("T", lambda r, sp: str(r.steps)),
            ("dir", lambda r, sp: r.attn_type),
            ("shape", lambda r, sp: " ".join(r.shape.split(" ")[:2]) if compact else r.shape),
            ("dtype", lambda r, sp: r.dtype), ("median ms", lambda r, sp: _fmt(r.median_ms, ".4g")),
            ("p20-p80 ms", lambda r, sp: "" if r.p20_ms is None else f"{r.p20_ms:.4g}-{r.p80_ms:.4g}"),
            ("pairs/s", lambda r, sp: _fmt(r.pairs_per_s, ".4g")),
            ("GFLOP/s", lambda r, sp: _fmt(r.gflops, ".4g")),
            ("% matmul peak", lambda r, sp: "" if r.frac_of_matmul_peak is None
             else f"{100 * r.frac_of_matmul_peak:.1f}"),
            ("x release_loop", lambda r, sp: "" if sp is None else f"{sp:.2f}"),
            ("peak MB", lambda r, sp: _fmt(r.peak_mem_mb, ".4g")),
            ("max abs err", lambda r, sp: _fmt(r.max_abs_err, ".2e")),
            ("note", lambda r, sp: r.note.replace("|", "/"))]
    if compact:
        cols = [c for c in cols if c[0] not in ("p20-p80 ms", "note")]
    lines = ["| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r, sp in zip(rows, speedups(rows)):
        lines.append("| " + " | ".join(c[1](r, sp) for c in cols) + " |")
    return "\n".join(lines)


def headline(rows: Sequence[Row], backend: str = "torch", regulator: str = "coop_rcar",
             steps: int = 2, shard_prefix: str = "flickr30k") -> str:
    """The issue-2 lines: ``backend`` vs release_loop at coop_rcar T=2 on the Flickr shard,
    per direction, and its GFLOP/s against the measured matmul rate."""
    sp = speedups(rows)
    lines = []
    for r, s in zip(rows, sp):
        if (r.backend == backend and r.op == "rcar_scores" and r.regulator == regulator
                and int(r.steps) == steps and r.shape.startswith(shard_prefix) and s is not None):
            base = next(b for b in rows if b.backend == BASELINE and _case_key(b) == _case_key(r))
            peak = (f"{r.gflops:.4g} GFLOP/s = {100 * r.frac_of_matmul_peak:.1f}% of the measured "
                    f"{r.dtype} matmul rate" if r.frac_of_matmul_peak else "")
            lines.append(f"- {r.attn_type} [{r.shape}, {r.dtype}]: {backend} {r.pairs_per_s:.4g} pairs/s "
                         f"vs release_loop {base.pairs_per_s:.4g} pairs/s: x{s:.2f}; {peak}")
    return "\n".join(lines)
