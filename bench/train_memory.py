"""Peak memory of one training step per backend, measured on CPU tensors, fitted and
extrapolated to the issue's 128 x 128 step.

    python -m bench.train_memory                  # every CPU backend, the default sizes
    python -m bench.train_memory --write          # also write bench/results/train_memory.md
    python -m bench.train_memory --backends torch,cpp --sizes 4,8,16 --d 1024 --s 256

What is measured. The head is the paper's i2t ``coop_rcar`` T=2 RCARSimilarity in train mode
(RAR dropout on), fp32, d = 1024, s = 256 by default, R = 36 regions, seeded as bench/suite.py's
models are. For n x n pairs (n images against n captions, ``bench.shapes.Shard`` features: random
unit vectors) one step is bench/suite.py's ``_train_step``: forward, loss = scores.sum(), and
backward to every weight and to both feature tensors. Its peak is ``harness.measure_peak`` on
CPU: the running sum of the c10 CPU allocator's allocation and free events in the torch profiler
(``harness.cpu_allocator_peak``), i.e. the bytes the step allocated at its peak above what was
allocated when it started: inputs and weights excluded, the step's own gradients (weights: a
constant; features: per image and caption) and everything autograd keeps included.

How it differs from the suite's training row, on purpose:
  - One block. Every caption has the same length (``--caption-len``, 15 by default: the mean
    of the train shard's uniform 6..24), since the pipeline cuts the grid into one block per
    caption length (rcar_fast.block_plan), and the budget is ``ONE_BLOCK_BUDGET`` (1 TiB, above
    even the planner's 128 x 128 working set of every backend), so the whole grid is one block:
    the peak is the algorithm's own footprint, not the budget's. Each measured step counts the
    blocks rcar_fast.pipeline yields (:func:`count_blocks`); a step of more than one block is an
    error, not a row.
  - Gradients are set to None before the measured call, outside it: the suite's step clears
    them inside, so there the previous step's gradients, freed during the call, lower the peak.
  - A warm-up step at the smallest size per backend first, not measured (the extension's first
    call allocates ~12 MiB once; measured here).

The fit. peak = a + b * pairs, least squares through each backend's measured points, then
evaluated at 128 x 128 = 16,384 pairs: an EXTRAPOLATION from small CPU fp32 allocator
measurements, not a measurement at that size and not a GPU's. The planner's own per-pair
estimate (``live_buffers_train`` x Lq x d x 4 bytes, rcar_fast.backends) is shown beside b.

Triton. Its kernels run on CPU tensors only under TRITON_INTERPRET=1, which this module sets
(before rcar_fast is imported, and only where it is unset and no CUDA device is present, the
rule of tests/conftest.py). The interpreter keeps its own arrays in numpy, which the c10
allocator does not see (on a GPU they are registers and shared memory, not allocations either);
what it counts is every tensor the launchers, the torch parts of the step and autograd allocate.
The interpreter takes ~45-60 s per pair at d = 1024 on a 2-core CPU, so triton runs only the
sizes of ``--triton-sizes`` (default 1 and 2: 1 and 4 pairs), and its fit rests on those. The
report then adds every backend's fit through the sizes all of them ran: over so few pairs the
constant part of the step dominates the peak, and the slopes of torch and cpp over those sizes
differ from their fits over all their sizes, so triton's extrapolation is a lower bound where both
come out below, and no estimate at all where one overshoots (the report says which, and by how
much, from the other backends' numbers).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"     # before rcar_fast imports any Triton kernel

import rcar_fast  # noqa: E402

from . import harness  # noqa: E402
from .shapes import Shard  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_OUT = os.path.join(RESULTS_DIR, "train_memory.md")
CPU = torch.device("cpu")
#: the backends this measures (the reference keeps its own schedule and ignores the budget)
BACKENDS = ("torch", "cpp", "triton")
#: the head: the paper's i2t model
REGULATOR, STEPS, ATTN_TYPE = "coop_rcar", 2, "i2t"
#: one block per step: far above the planner's working set of a 128 x 128 step on any backend
#: (torch: 17 d-wide buffers x 16,384 pairs x 36 x 1024 x 4 B = 41 GB)
ONE_BLOCK_BUDGET = 1 << 40
#: the issue's step, where the fit is evaluated
TARGET_N = 128
#: sizes n (n x n pairs) of every backend, and of triton under the interpreter
DEFAULT_SIZES = (1, 2, 4, 8, 16)
DEFAULT_TRITON_SIZES = (1, 2)
MIB = 2 ** 20
#: a fit over the shared sizes whose slope falls below this share of the full fit's marks the
#: narrow backends' extrapolations as lower bounds
LOWER_BOUND_SHARE = 0.8


# ----------------------------------------------------------------------------- one step

@contextlib.contextmanager
def count_blocks():
    """Inside the block: the list of blocks (caption indices, Lg, i0, i1) rcar_fast.pipeline cuts
    each call's pair grid into (its ``iter_blocks`` wrapped; the checkpointed backward recomputes
    blocks without planning again, so a step's list is its forward's blocks)."""
    from rcar_fast import pipeline
    original = pipeline.iter_blocks
    seen: List[tuple] = []

    def counting(*args, **kwargs):
        for block in original(*args, **kwargs):
            seen.append(block)
            yield block

    pipeline.iter_blocks = counting
    try:
        yield seen
    finally:
        pipeline.iter_blocks = original


def make_head(d: int, s: int) -> rcar_fast.RCARSimilarity:
    """The measured head: i2t coop_rcar T=2, fp32, train mode, seeded as bench/suite.py's."""
    torch.manual_seed(1234)
    return rcar_fast.RCARSimilarity(d, s, REGULATOR, STEPS, ATTN_TYPE).train()


def step_shard(n: int, d: int, s: int, caption_len: int) -> Shard:
    """n images x n captions, every caption ``caption_len`` words (one length: one block)."""
    return Shard("train_memory", n, n, caption_len, caption_len, embed_dim=d, sim_dim=s)


def make_step(model: torch.nn.Module, img: torch.Tensor, cap: torch.Tensor, lens: torch.Tensor,
              backend: str, budget: int = ONE_BLOCK_BUDGET):
    """One training step as bench/suite.py's ``_train_step``: loss = scores.sum(), backward to the
    weights and to both feature tensors (which must require grad). Gradients are not cleared
    here (:func:`measure_step` clears them before the measured call)."""
    def step():
        model(img, cap, lens, backend=backend, memory_budget=budget).sum().backward()
    return step


def clear_grads(model: torch.nn.Module, *features: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    for x in features:
        x.grad = None


@dataclass
class StepPeak:
    """One measured step: n x n pairs on ``backend``: the peak bytes, the step's seconds (under
    the profiler), the blocks the pipeline cut it into."""
    backend: str
    n: int
    peak: int
    seconds: float
    blocks: int

    @property
    def pairs(self) -> int:
        return self.n * self.n


def measure_step(model: torch.nn.Module, backend: str, n: int, caption_len: int = 15,
                 budget: int = ONE_BLOCK_BUDGET, inputs=None) -> StepPeak:
    """Peak bytes of one training step of ``model`` on n x n pairs (module docstring).

    inputs: (img, cap, lens) to use instead of the shard's (their ``.grad`` is left set, so a
    caller can see the backward reached them). Raises RuntimeError when the step was not one
    block, or left no gradient on a feature tensor or a weight (no backward ran)."""
    if inputs is None:
        inputs = step_shard(n, model.embed_dim, model.sim_dim, caption_len).inputs(CPU)
    img, cap, lens = inputs
    img.requires_grad_(True)
    cap.requires_grad_(True)
    clear_grads(model, img, cap)
    with count_blocks() as blocks:
        _, peak, ms = harness.measure_peak(make_step(model, img, cap, lens, backend, budget), CPU)
    if len(blocks) != 1:
        raise RuntimeError(f"{backend} {n}x{n}: the step ran as {len(blocks)} blocks, not one: its peak "
                           "is set by the memory budget, not the algorithm (one caption length and "
                           "ONE_BLOCK_BUDGET make it one block)")
    missing = [name for name, x in [("img", img), ("cap", cap), *model.named_parameters()] if x.grad is None]
    if missing:
        raise RuntimeError(f"{backend} {n}x{n}: no gradient on {', '.join(missing[:4])}: the backward did not run")
    return StepPeak(backend, n, int(peak), ms / 1e3, len(blocks))


def measure_backend(backend: str, sizes: Sequence[int], d: int, s: int, caption_len: int,
                    log=None) -> List[StepPeak]:
    """The peaks of one backend at every size (after one unmeasured warm-up step at the
    smallest), on a fresh head."""
    model = make_head(d, s)
    sizes = sorted(set(sizes))
    t0 = time.perf_counter()
    warm = step_shard(sizes[0], d, s, caption_len).inputs(CPU)
    for x in warm[:2]:
        x.requires_grad_(True)
    make_step(model, *warm, backend)()
    if log:
        log(f"{backend}: warm-up {sizes[0]}x{sizes[0]} {time.perf_counter() - t0:.1f} s")
    points = []
    for n in sizes:
        p = measure_step(model, backend, n, caption_len)
        points.append(p)
        if log:
            log(f"{backend}: {n}x{n} peak {p.peak} B ({p.peak / MIB:.3f} MiB), {p.blocks} block, {p.seconds:.1f} s")
    return points


# ----------------------------------------------------------------------------- the fit

def affine_fit(pairs: Sequence[float], peaks: Sequence[float]) -> Tuple[float, float]:
    """(a, b) of peak = a + b * pairs, least squares (through both points when there are two;
    one point: a = 0)."""
    if len(pairs) != len(peaks) or not pairs:
        raise ValueError("affine_fit: expected as many peaks as pair counts, at least one")
    x = torch.tensor(pairs, dtype=torch.float64)
    y = torch.tensor(peaks, dtype=torch.float64)
    if len(set(pairs)) == 1:
        return 0.0, float(y.mean() / x[0])
    xm, ym = x.mean(), y.mean()
    b = ((x - xm) * (y - ym)).sum() / ((x - xm) ** 2).sum()
    return float(ym - b * xm), float(b)


@dataclass
class Fit:
    backend: str
    a: float                # bytes
    b: float                # bytes per pair
    points: List[StepPeak]

    def at(self, pairs: int) -> float:
        return self.a + self.b * pairs

    def max_residual(self) -> float:
        """Largest |measured - fitted| over the points, bytes."""
        return max(abs(p.peak - self.at(p.pairs)) for p in self.points)


def fit_backend(points: Sequence[StepPeak]) -> Fit:
    a, b = affine_fit([p.pairs for p in points], [p.peak for p in points])
    return Fit(points[0].backend, a, b, list(points))


def planner_bytes_per_pair(backend: str, d: int, regions: int = 36) -> int:
    """The block planner's training working set per i2t pair: live_buffers_train d-wide
    (Lq = R) fp32 buffers (rcar_fast.block_plan.block_pairs)."""
    from rcar_fast.backends import kernel_set
    return kernel_set(backend).live_buffers_train * regions * d * 4


# ----------------------------------------------------------------------------- run, report

def measure_all(backends: Sequence[str], sizes: Sequence[int], triton_sizes: Sequence[int], d: int, s: int,
                caption_len: int, max_gib: float, log=None) -> Tuple[Dict[str, Fit], Dict[str, str]]:
    """Every backend's points and fit; (fits, {backend: why it was skipped})."""
    here = rcar_fast.available_backends(CPU)
    status = rcar_fast.backend_status()
    fits, skipped = {}, {}
    for name in backends:
        if name not in here:
            skipped[name] = status.get(name, "unknown backend")
            continue
        want = triton_sizes if name == "triton" else sizes
        # the planner's working set, 2x for safety, must fit --max-gib
        ok = [n for n in want if 2 * planner_bytes_per_pair(name, d) * n * n <= max_gib * 2 ** 30]
        if len(ok) < len(want):
            skipped[f"{name} sizes"] = (f"{', '.join(str(n) for n in want if n not in ok)} left out: "
                                        f"2x the planner's working set > --max-gib {max_gib:g}")
        if not ok:
            skipped[name] = f"no size fits --max-gib {max_gib:g}"
            continue
        fits[name] = fit_backend(measure_backend(name, ok, d, s, caption_len, log))
    return fits, skipped


def _mib(b: float) -> str:
    return f"{b / MIB:.3f}"


def report(fits: Dict[str, Fit], skipped: Dict[str, str], d: int, s: int, caption_len: int) -> str:
    """The markdown tables: measured points, then the fits and the 128 x 128 extrapolation."""
    torch_fit = fits.get("torch")
    torch_at = {p.n: p.peak for p in torch_fit.points} if torch_fit else {}
    lines = ["Measured (one step, one block; peak = bytes the step allocated above its start, c10 CPU allocator):",
             "",
             "| backend | n x n | pairs | peak bytes | peak MiB | fit MiB | blocks | step s | peak / torch's |",
             "|---|---|---|---|---|---|---|---|---|"]
    for f in fits.values():
        for p in f.points:
            ratio = f"{p.peak / torch_at[p.n]:.3f}" if p.n in torch_at else ""
            lines.append(f"| {p.backend} | {p.n}x{p.n} | {p.pairs} | {p.peak} | {_mib(p.peak)} | "
                         f"{_mib(f.at(p.pairs))} | {p.blocks} | {p.seconds:.1f} | {ratio} |")
    target = TARGET_N * TARGET_N
    lines += ["",
              f"Fit peak = a + b * pairs (least squares over the points above) and its value at "
              f"{TARGET_N} x {TARGET_N} = {target} pairs: EXTRAPOLATED from these small CPU fp32 allocator "
              "measurements, not measured at that size, not on a GPU:",
              "",
              "| backend | points (pairs) | a MiB | b MiB/pair | planner MiB/pair | max residual MiB | "
              f"{TARGET_N}x{TARGET_N} extrapolated GiB | / torch's |",
              "|---|---|---|---|---|---|---|---|"]
    shared_lines, unsure, what = like_for_like(fits, target)
    for f in fits.values():
        ratio = f"{f.at(target) / torch_fit.at(target):.3f}" if torch_fit else ""
        bound = f" ({what}, see below)" if f.backend in unsure else ""
        lines.append(f"| {f.backend} | {', '.join(str(p.pairs) for p in f.points)} | {_mib(f.a)} | "
                     f"{f.b / MIB:.4f} | {planner_bytes_per_pair(f.backend, d) / MIB:.4f} | "
                     f"{_mib(f.max_residual())} | {f.at(target) / 2**30:.2f}{bound} | {ratio}{bound} |")
    lines += shared_lines
    if skipped:
        lines += ["", "Not run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    lines += ["", f"Head: {REGULATOR} T={STEPS} {ATTN_TYPE}, train mode, fp32, d={d}, s={s}, R=36, every caption "
              f"{caption_len} words (one length: one block), memory_budget={ONE_BLOCK_BUDGET} B; "
              "loss = scores.sum(), backward to the weights and both feature tensors; gradients cleared "
              "before the measured call; one unmeasured warm-up step per backend at its smallest size."]
    return "\n".join(lines)


def like_for_like(fits: Dict[str, Fit], target: int) -> Tuple[List[str], List[str], str]:
    """Where the backends ran different sizes (triton under the interpreter: fewer), every
    backend's fit through the sizes they all ran, and what that does to the backends that ran
    more: how far a fit over few pairs is from the fit over all of theirs. Returns (markdown
    lines, the backends whose extrapolation is then in doubt, what it is then: "lower bound"
    where every slope over few pairs falls short of its full fit's, "not an estimate" where one
    overshoots); empty lines and list where all ran the same sizes or the slopes agree."""
    if len(fits) < 2:
        return [], [], ""
    shared = sorted(set.intersection(*({p.n for p in f.points} for f in fits.values())))
    if len(shared) < 2 or all(len(f.points) == len(shared) for f in fits.values()):
        return [], [], ""
    few = {name: fit_backend([p for p in f.points if p.n in shared]) for name, f in fits.items()}
    torch_few = few.get("torch")
    pairs = ", ".join(str(n * n) for n in shared)
    lines = ["", f"Like for like: every backend's fit through the sizes all of them ran ({pairs} pairs); "
             f"the last column is the fit through all of the backend's own points, for comparison:", "",
             f"| backend | a MiB | b MiB/pair | {TARGET_N}x{TARGET_N} extrapolated GiB | / torch's | "
             "b MiB/pair, all own points |",
             "|---|---|---|---|---|---|"]
    for name, f in few.items():
        ratio = f"{f.at(target) / torch_few.at(target):.3f}" if torch_few else ""
        lines.append(f"| {name} | {_mib(f.a)} | {f.b / MIB:.4f} | {f.at(target) / 2**30:.2f} | {ratio} | "
                     f"{fits[name].b / MIB:.4f} |")
    wide = [name for name in fits if len(fits[name].points) > len(shared)]
    narrow = [name for name in fits if name not in wide]
    slopes = ", ".join(f"{name} {few[name].b / MIB:.3f} against {fits[name].b / MIB:.3f}" for name in wide)
    shares = [few[name].b / fits[name].b if fits[name].b > 0 else 0.0 for name in wide]
    worst, most = min(shares), max(shares)
    if worst >= LOWER_BOUND_SHARE and most <= 1 / LOWER_BOUND_SHARE:
        lines += ["", f"Over {pairs} pairs the slopes of the backends that ran more sizes are within "
                  f"{100 * max(abs(1 - r) for r in shares):.0f}% of their full fits' (MiB/pair, few against all "
                  f"points: {slopes})."]
        return lines, [], ""
    if most <= 1 / LOWER_BOUND_SHARE:
        what, why = "lower bound", ("the peak is the largest of the step's phases, and at a few pairs a constant "
                                    "one (the weights' gradients among them) is the largest. So")
        verdict = "are lower bounds, not estimates"
    else:
        what, why = "not an estimate", "a fit over so few pairs is off by that much either way, so"
        verdict = "are neither estimates nor bounds"
    lines += ["", f"Caution: over {pairs} pairs the slopes of the backends that ran more sizes are "
              f"{100 * worst:.0f}-{100 * most:.0f}% of their full fits' (MiB/pair, few against all points: "
              f"{slopes}): {why} the {TARGET_N}x{TARGET_N} figures of {', '.join(narrow)}, fitted on {pairs} pairs "
              f"only, {verdict}; compare their measured peaks with the other backends' at the same sizes (the "
              "first table's last column) instead."]
    return lines, narrow, what


def header(argv: Sequence[str], wall_s: float) -> str:
    return (f"{datetime.date.today().isoformat()}, commit {harness.git_commit()}, "
            f"{harness.device_name(CPU)}, {os.cpu_count()}-core CPU, "
            f"{'a GPU present but not used' if torch.cuda.is_available() else 'no GPU'}, torch {torch.__version__}, "
            f"triton {harness.triton_version()} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}); "
            f"command: `python -m bench.train_memory{''.join(' ' + a for a in argv)}`; wall {wall_s:.0f} s. "
            "CPU allocator measurements (c10 CPU allocator events in the torch profiler), not GPU memory.")


def _int_list(text: str) -> List[int]:
    out = [int(t) for t in text.split(",") if t.strip()]
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.train_memory",
        description="Peak memory of one i2t coop_rcar T=2 training step per backend on CPU tensors (one "
                    "block), fitted a + b * pairs and extrapolated to 128 x 128 (module docstring).")
    p.add_argument("--sizes", type=_int_list, default=list(DEFAULT_SIZES),
                   help="n of the n x n steps of every backend but triton (default 1,2,4,8,16)")
    p.add_argument("--triton-sizes", type=_int_list, default=list(DEFAULT_TRITON_SIZES),
                   help="n of triton's steps (the interpreter: ~45-60 s per pair at d=1024; default 1,2)")
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma list of torch, cpp, triton (default all)")
    p.add_argument("--d", type=int, default=1024, help="embed_dim (default 1024)")
    p.add_argument("--s", type=int, default=256, help="sim_dim (default 256)")
    p.add_argument("--caption-len", type=int, default=15, help="words of every caption (default 15)")
    p.add_argument("--max-gib", type=float, default=8.0,
                   help="leave out a size whose planned working set x 2 exceeds this (default 8)")
    p.add_argument("--write", nargs="?", const=DEFAULT_OUT, metavar="PATH",
                   help="also write the tables to PATH (default bench/results/train_memory.md)")
    a = p.parse_args(argv)
    a.backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    bad = [b for b in a.backends if b not in BACKENDS]
    if bad:
        p.error(f"--backends: unknown {', '.join(bad)} (known: {', '.join(BACKENDS)})")
    return a


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    t0 = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)   # noqa: E731
    fits, skipped = measure_all(a.backends, a.sizes, a.triton_sizes, a.d, a.s, a.caption_len, a.max_gib, log)
    text = f"{header(argv, time.perf_counter() - t0)}\n\n{report(fits, skipped, a.d, a.s, a.caption_len)}\n"
    print("\n" + text)
    if a.write:
        os.makedirs(os.path.dirname(os.path.abspath(a.write)), exist_ok=True)
        with open(a.write, "w") as f:
            f.write(f"# Training-step peak memory per backend (python -m bench.train_memory)\n\n{text}")
        print(f"wrote {a.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
