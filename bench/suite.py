"""The benchmark suite: which cases and rows run, how each is measured, and the command line.

A *case* is one op (``rcar_scores`` inference, or ``train_step``: forward + backward in train
mode) on one shard with one regulator set-up and direction. A *row* is one way of computing
it: ``release_loop`` (bench/release_loop.py), every backend ``rcar_fast.available_backends``
lists for the device (new backends join by themselves), and ``torch+compile``
(``torch.compile`` of RCARSimilarity's forward on the torch backend). Every row is warmed up,
timed (bench/harness.py), probed for peak memory, and compared with the fp32 reference
(``rcar_fast.reference``) on the same inputs: on every caption when the ``reference`` row ran
in exact fp32 (its output is the reference), else on ``--ref-captions`` evenly spaced captions.

    python -m bench                 # the full suite (see bench/README.md)
    python -m bench --quick         # a few minutes on a 2-core CPU
    python -m bench --train         # add the training-step benchmark
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

import rcar_fast
from rcar_fast import reference

from . import flops, harness, release_loop
from .report import BASELINE, Row, append_csv, check_csv, headline, markdown_table, read_csv
from .shapes import SHARDS, TRAIN_SHARD, Shard

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_CSV = os.path.join(RESULTS_DIR, "history.csv")
COMPILED = "torch+compile"
#: regulator set-ups of the full suite; the first is the paper's headline model
CONFIGS = (("coop_rcar", 2), ("coop_rcar", 1), ("coop_rcar", 3), ("only_rar", 2), ("only_rcr", 2))
HEADLINE = CONFIGS[0]
DIRECTIONS = ("t2i", "i2t")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: captions of the shard an eager CPU row warms up on (a full call there is seconds long)
WARMUP_CAPTIONS = 4
#: a training step may take this share of the free memory (extrapolated from a small step);
#: a bigger one runs on the largest square batch that fits, and the note says so
TRAIN_MEMORY_SHARE = 0.5
#: --quick starts no row after this many seconds (a busy machine must not stretch it past 3 min)
QUICK_TIME_LIMIT_S = 150.0
#: pairs of the small training step that predicts a training row's memory (and warms it up)
TRAIN_PROBE = 16


@dataclass(frozen=True)
class Case:
    shard: Shard
    regulator: str
    steps: int
    attn_type: str
    op: str = "rcar_scores"

    @property
    def label(self) -> str:
        return f"{self.op} {self.regulator} T={self.steps} {self.attn_type} {self.shard.label}"

    @property
    def is_headline(self) -> bool:
        return (self.regulator, self.steps) == HEADLINE

    def counted_flops(self) -> int:
        s = self.shard
        f = flops.shard_flops(s.n_images, s.cap_lens().tolist(), s.regions, s.embed_dim, s.sim_dim,
                              self.regulator, self.steps, self.attn_type)
        return f * (flops.TRAIN_STEP_FACTOR if self.op == "train_step" else 1)


@dataclass
class Settings:
    device: torch.device
    dtype: torch.dtype = torch.float32
    repeats: int = 3            # timed calls at most per row (outside do_bench)
    budget_s: float = 15.0      # timing budget per row (at least one call is timed)
    ref_captions: int = 20      # captions the reference is computed on when it is not a row
    compile: str = "headline"   # torch+compile rows: "none", "headline" cases, or "all"
    backends: Optional[Sequence[str]] = None   # row names to run; None: all
    time_limit_s: Optional[float] = None       # start no row after this many seconds


def row_names(case: Case, settings: Settings) -> List[str]:
    """The rows of a case, in run order (the reference first: it may serve as ground truth)."""
    avail = rcar_fast.available_backends(settings.device)
    if os.environ.get("TRITON_INTERPRET") == "1":   # Triton's numpy interpreter: a test mode
        avail = [b for b in avail if b != "triton"]
    names = (["reference"] if "reference" in avail else []) + [BASELINE] + \
        [b for b in avail if b != "reference"]
    if case.op == "train_step":   # the release loop is inference only (torch.no_grad)
        names = [n for n in names if n != BASELINE]
    elif "torch" in avail and (settings.compile == "all" or
                               (settings.compile == "headline" and case.is_headline)):
        names.append(COMPILED)
    if settings.backends is not None:
        names = [n for n in names if n in settings.backends]
    return names


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return text[:limit]


class Suite:
    """Runs cases, appends each row to the CSV as soon as it is measured, keeps the rows."""

    def __init__(self, settings: Settings, csv_path: str, log: Optional[Callable[[str], None]] = None):
        self.s = settings
        self.csv_path = csv_path
        self.log = log or (lambda line: print(line, flush=True))
        self.rows: List[Row] = []
        self.t0 = time.perf_counter()
        self.skipped = 0
        self.peak = harness.MatmulPeak(settings.device)
        self.env = dict(
            timestamp=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            git_commit=harness.git_commit(), device=harness.device_name(settings.device),
            torch_version=torch.__version__, triton_version=harness.triton_version())
        check_csv(csv_path)

    # -- bookkeeping -------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def out_of_time(self) -> bool:
        return self.s.time_limit_s is not None and self.elapsed() > self.s.time_limit_s

    def _row(self, case: Case, backend: str, **values) -> Row:
        return Row(**self.env, backend=backend, op=case.op, regulator=case.regulator,
                   steps=case.steps, attn_type=case.attn_type, shape=case.shard.label,
                   dtype=str(self.s.dtype).replace("torch.", ""), **values)

    def _emit(self, row: Row) -> None:
        self.rows.append(row)
        append_csv(self.csv_path, [row])
        t = "" if row.median_ms is None else f"{row.median_ms:.4g} ms, {row.pairs_per_s:.4g} pairs/s"
        self.log(f"[{self.elapsed():7.1f}s] {row.backend:>14} | {row.op} {row.regulator} "
                 f"T={row.steps} {row.attn_type} {row.shape} | {t} {row.note}")

    def _timed_row(self, case: Case, backend: str, fn, warmup_fn, out_of: Optional[list],
                   notes: List[str]) -> Row:
        """Warm up, probe memory (keeping the output in ``out_of``), time; a Row of numbers."""
        dev = self.s.device
        warm_ms = harness.time_call(warmup_fn or fn, dev)
        with harness.ForeignCpu() as foreign:
            out, peak, probe_ms = harness.measure_peak(fn, dev)
            if out_of is not None:
                out_of.append(out)
            t = harness.benchmark(fn, dev, probe_ms, self.s.repeats, self.s.budget_s,
                                  first_ms=probe_ms)
        sec = t.median_ms / 1e3
        gflops = case.counted_flops() / sec / 1e9
        notes.insert(0, t.method if t.method == "do_bench" else f"n={t.samples}")
        if warmup_fn is None and warm_ms > 10 * t.median_ms and warm_ms > 1e3:
            notes.append(f"first call {warm_ms / 1e3:.1f} s")
        if dev.type == "cpu" and foreign.share is not None:   # other work skews CPU times
            notes.append(f"others {100 * foreign.share:.0f}% cpu")
        return self._row(case, backend, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                         pairs_per_s=case.shard.pairs / sec, gflops=gflops,
                         frac_of_matmul_peak=gflops / self.peak.gflops(self.s.dtype),
                         peak_mem_mb=None if peak is None else peak / 2**20, note="; ".join(notes))

    # -- models and inputs -------------------------------------------------------------
    def _model(self, case: Case) -> torch.nn.Module:
        torch.manual_seed(1234)
        sh = case.shard
        m = rcar_fast.RCARSimilarity(sh.embed_dim, sh.sim_dim, case.regulator, case.steps,
                                     case.attn_type)
        return m.to(self.s.device, self.s.dtype)

    def _truth(self, case, model, img, cap, lens) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """fp32 reference scores on (a subset of) the captions: (scores, caption index or None)."""
        n_c = cap.shape[0]
        k = min(n_c, max(1, self.s.ref_captions))
        idx = None if k == n_c else torch.linspace(0, n_c - 1, k).round().long().unique()
        params = {n: p.detach().float() for n, p in model.named_parameters()}
        sel = (lambda x: x) if idx is None else (lambda x: x.index_select(0, idx.to(x.device)))
        with torch.no_grad(), harness.exact_fp32(self.s.device):
            scores = reference.rcar_scores(img.float(), sel(cap).float(), sel(lens), params,
                                           case.regulator, case.steps, case.attn_type, model.smooth)
        return scores, idx

    # -- inference ------------------------------------------------------------------------
    def run_case(self, case: Case) -> None:
        if case.op == "train_step":
            return self.run_train_case(case)
        names = row_names(case, self.s)
        if not names:
            return
        self.log(f"== {case.label}: {', '.join(names)}")
        dev = self.s.device
        model = self._model(case).eval()
        params = dict(model.named_parameters())
        img, cap, lens = case.shard.inputs(dev, self.s.dtype)
        n_w = min(WARMUP_CAPTIONS, cap.shape[0])
        exact_reference = self.s.dtype == torch.float32 and not (
            dev.type == "cuda" and harness.tf32_enabled())
        truth, truth_idx = None, None

        def call(name: str, cap_, lens_):
            if name == BASELINE:
                return lambda: release_loop.rcar_scores(img, cap_, lens_, params, case.regulator,
                                                        case.steps, case.attn_type, model.smooth)
            if name == COMPILED:
                torch._dynamo.reset()
                compiled = torch.compile(model)
                return lambda: compiled(img, cap_, lens_, backend="torch")
            return lambda: model(img, cap_, lens_, backend=name)

        for name in names:
            if self.out_of_time():
                self.skipped += 1
                continue
            notes: List[str] = []
            outs: list = []
            try:
                with torch.no_grad():
                    fn = call(name, cap, lens)
                    eager_cpu = dev.type == "cpu" and name != COMPILED
                    warm = call(name, cap[:n_w], lens[:n_w]) if eager_cpu else None
                    row = self._timed_row(case, name, fn, warm, outs, notes)
            except Exception as e:   # a failing row (compile, memory, a backend bug) is recorded
                self._emit(self._row(case, name, note="error: " + _first_line(e)))
                continue
            try:
                if truth is None and name == "reference" and exact_reference:
                    truth = outs[0]
                    row.note += "; is the reference"
                if truth is None:
                    truth, truth_idx = self._truth(case, model, img, cap, lens)
                got = outs[0] if truth_idx is None else outs[0].index_select(1, truth_idx.to(dev))
                row.max_abs_err = (got.float() - truth).abs().max().item()
                if truth_idx is not None:
                    row.note += f"; err on {len(truth_idx)}/{cap.shape[0]} captions"
            except Exception as e:
                row.note += "; no error: the reference failed: " + _first_line(e)
            self._emit(row)

    # -- training ---------------------------------------------------------------------------
    def _train_step(self, model: torch.nn.Module, case: Case, backend: str):
        """One training step on the case's shard: loss = scores.sum(), backward to the weights
        and to both feature tensors (as the encoders upstream would need)."""
        img, cap, lens = case.shard.inputs(self.s.device, self.s.dtype)
        img.requires_grad_(True)
        cap.requires_grad_(True)

        def run():
            model.zero_grad(set_to_none=True)
            img.grad = cap.grad = None
            model(img, cap, lens, backend=backend).sum().backward()
        return run

    def _fit_train(self, case: Case, probes: Sequence[Tuple[int, Optional[int]]]):
        """The training case that fits in memory, judged from the peaks of small square steps
        ``probes`` [(n, peak bytes of an n x n step)]: (case to run or None, note).

        The peak is modelled as a + b * pairs, fitted through the two probes (one probe: a = 0).
        The pipeline checkpoints blocks of the pair grid, so past a few blocks the peak grows far
        slower than the pairs; the affine fit over-predicts then, never under-predicts while the
        probes still fit in one block."""
        free = harness.free_memory_bytes(self.s.device)
        if any(peak is None for _, peak in probes) or free is None:
            return case, ""
        (n0, p0), (n1, p1) = probes[0], probes[-1]
        per_pair = max((p1 - p0) / (n1 ** 2 - n0 ** 2), 0.0) if n1 != n0 else p1 / n1 ** 2
        base = max(p1 - per_pair * n1 ** 2, 0.0)
        need, room = base + per_pair * case.shard.pairs, TRAIN_MEMORY_SHARE * free
        if need <= room:
            return case, ""
        sh = case.shard
        msg = (f"{sh.n_images}x{sh.n_captions} needs ~{need / 2**30:.1f} GiB, "
               f"{free / 2**30:.1f} GiB free")
        n = int(math.sqrt(max(room - base, 0.0) / per_pair)) // TRAIN_PROBE * TRAIN_PROBE
        if n < n1:
            return None, f"skipped: {msg}"
        return dataclasses.replace(case, shard=sh.resized(n, n)), f"{msg}: ran {n}x{n}"

    def run_train_case(self, case: Case) -> None:
        names = row_names(case, self.s)
        if not names:
            return
        self.log(f"== {case.label}: {', '.join(names)}")
        model = self._model(case).train()
        full = min(case.shard.n_images, case.shard.n_captions)
        sizes = sorted({min(TRAIN_PROBE, full), min(2 * TRAIN_PROBE, full)})
        probe_case = dataclasses.replace(case, shard=case.shard.resized(sizes[0], sizes[0]))
        for name in names:
            if self.out_of_time():
                self.skipped += 1
                continue
            try:
                # two small steps predict the memory (a + b * pairs) and warm up
                probes = [(n, harness.measure_peak(self._train_step(
                    model, dataclasses.replace(case, shard=case.shard.resized(n, n)), name), self.s.device)[1])
                    for n in sizes]
                run_case, fit_note = self._fit_train(case, probes)
                if run_case is None:
                    row = self._row(case, name, note=fit_note)
                else:
                    warm = (self._train_step(model, probe_case, name)
                            if self.s.device.type == "cpu" else None)
                    notes = ["loss = scores.sum()"] + ([fit_note] if fit_note else [])
                    row = self._timed_row(run_case, name, self._train_step(model, run_case, name),
                                          warm, None, notes)
            except Exception as e:
                row = self._row(case, name, note="error: " + _first_line(e))
            self._emit(row)

    def run(self, cases: Sequence[Case]) -> List[Row]:
        for case in cases:
            self.run_case(case)
        if self.skipped:
            self.log(f"--time-limit {self.s.time_limit_s:g} s reached: {self.skipped} rows not run")
        return self.rows

    def header(self) -> str:
        peaks = ", ".join(f"{k} {v:.4g} GFLOP/s" for k, v in self.peak.measured().items())
        e = self.env
        return (f"{e['timestamp']}, commit {e['git_commit']}, {e['device']}, torch "
                f"{e['torch_version']}, triton {e['triton_version']}; measured matmul rate: "
                f"{peaks or 'not measured'}; wall {self.elapsed():.0f} s")


# ----------------------------------------------------------------------------- cases

def build_cases(shards: Sequence[Shard], configs, directions, train: bool, infer: bool,
                train_shard: Shard = TRAIN_SHARD) -> List[Case]:
    """Most important first, so that a time limit cuts the least: the headline set-up on the
    first shard, then the training step, then every other inference case."""
    inference = [Case(shard, reg, steps, d) for (reg, steps) in configs for shard in shards
                 for d in directions] if infer else []
    first = [c for c in inference if c.is_headline and c.shard == shards[0]]
    training = [Case(train_shard, HEADLINE[0], HEADLINE[1], d, op="train_step")
                for d in directions] if train else []
    return first + training + [c for c in inference if c not in first]


def _parse_configs(text: str):
    out = []
    for item in text.split(","):
        reg, _, steps = item.partition(":")
        out.append((reg.strip(), int(steps) if steps else 2))
    return out


def _csv_list(text: Optional[str]):
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark rcar_fast's backends against the release's per-caption loop "
                    "(bench/README.md says what runs and what each column means).")
    p.add_argument("--quick", action="store_true",
                   help="Flickr30K-shaped 100 images x 25 captions, coop_rcar T=2, t2i and i2t, "
                        "no compile, 3 calls or 10 s per row, reference on 10 captions, no row "
                        f"started after {QUICK_TIME_LIMIT_S:g} s")
    p.add_argument("--train", action="store_true", help="add the training-step benchmark")
    p.add_argument("--train-only", action="store_true", help="only the training-step benchmark")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--tf32", action="store_true",
                   help="CUDA: let fp32 products use TF32 (compared with the tf32 matmul rate; "
                        "the reference is then computed separately, in exact fp32)")
    p.add_argument("--shards", help=f"comma list of {', '.join(SHARDS)} (default all; quick: flickr30k)")
    p.add_argument("--configs", help="comma list of regulator:steps, e.g. coop_rcar:2,only_rar:2")
    p.add_argument("--directions", help="comma list of t2i, i2t (default both)")
    p.add_argument("--backends", help="comma list of rows to run: release_loop, backend names, "
                                      f"{COMPILED} (default all available)")
    p.add_argument("--images", type=int, help="images per shard (default 100)")
    p.add_argument("--captions", type=int, help="captions per shard (default 100; quick 25)")
    p.add_argument("--train-pairs", type=int, default=TRAIN_SHARD.n_images,
                   help="images = captions of the training step (default 128)")
    p.add_argument("--repeats", type=int,
                   help="timed calls per row at most, outside do_bench (default CPU 3; CUDA 20)")
    p.add_argument("--budget", type=float,
                   help="seconds of timed calls per row (default CPU 15, quick 10; CUDA 1, quick 0.3)")
    p.add_argument("--ref-captions", type=int,
                   help="captions the fp32 reference is computed on when it is not a row (default 20; quick 10)")
    p.add_argument("--compile", choices=("none", "headline", "all"),
                   help=f"{COMPILED} rows: none, headline cases only, or all (default: headline on "
                        "CPU, all on CUDA; quick: none)")
    p.add_argument("--time-limit", type=float,
                   help=f"start no row after this many seconds (default none; quick {QUICK_TIME_LIMIT_S:g})")
    p.add_argument("--csv", default=DEFAULT_CSV, help="history file rows are appended to "
                                                      "(default bench/results/history.csv)")
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--plot", nargs="?", const=RESULTS_DIR, metavar="DIR",
                   help="write PNG charts (needs matplotlib) to DIR (default bench/results)")
    p.add_argument("--summarize", metavar="CSV",
                   help="print the table of the latest run in CSV and exit")
    p.add_argument("--all-runs", action="store_true", help="--summarize: every run in the file")
    p.add_argument("--compact", action="store_true", help="--summarize: fewer columns")
    return p.parse_args(argv)


def settings_from_args(a: argparse.Namespace) -> Tuple[Settings, List[Case]]:
    device = torch.device(a.device)
    quick = a.quick
    shards = [SHARDS[n] for n in (_csv_list(a.shards) or (["flickr30k"] if quick else list(SHARDS)))]
    shards = [s.resized(a.images, a.captions or (25 if quick else None)) for s in shards]
    configs = _parse_configs(a.configs) if a.configs else ([HEADLINE] if quick else list(CONFIGS))
    directions = _csv_list(a.directions) or list(DIRECTIONS)
    compile_mode = a.compile or ("none" if quick else ("all" if device.type == "cuda" else "headline"))
    cuda = device.type == "cuda"
    s = Settings(device=device, dtype=DTYPES[a.dtype],
                 repeats=a.repeats or (20 if cuda else 3),
                 budget_s=a.budget if a.budget is not None else
                 ((0.3 if quick else 1.0) if cuda else (10.0 if quick else 15.0)),
                 ref_captions=a.ref_captions or (10 if quick else 20), compile=compile_mode,
                 backends=_csv_list(a.backends),
                 time_limit_s=a.time_limit if a.time_limit is not None else (QUICK_TIME_LIMIT_S if quick else None))
    train_shard = TRAIN_SHARD.resized(a.train_pairs, a.train_pairs)
    cases = build_cases(shards, configs, directions, train=a.train or a.train_only,
                        infer=not a.train_only, train_shard=train_shard)
    return s, cases


def summarize(path: str, all_runs: bool = False, compact: bool = False) -> str:
    """The table (and headline) of the latest run in a history file, or of all its runs."""
    rows = read_csv(path)
    if not rows:
        return f"{path}: no rows"
    if not all_runs:
        latest = max(r.timestamp for r in rows)
        rows = [r for r in rows if r.timestamp == latest]
    return markdown_table(rows, compact) + "\n\n" + headline(rows)


@contextlib.contextmanager
def _quiet_compiler():
    """torch.compile's graph-break warnings (the ops validate their inputs in Python) would
    bury the table; keep its errors."""
    try:
        torch._logging.set_logs(dynamo=logging.ERROR, inductor=logging.ERROR)
    except Exception:
        pass
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Dynamo detected.*")
        yield


def argument_error(argv) -> Optional[str]:
    """None if the arguments are usable here, ``HELP_SHOWN`` once ``--help`` has been printed,
    else one line saying which argument is wrong (argparse's error without the usage block, a
    device that is not here, an unknown shard, regulator or step count, a count below 1)."""
    import contextlib
    import io

    from rcar_fast.app.cli import parse_device

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            a = parse_args(argv)
    except SystemExit as exc:
        if exc.code in (0, None):        # --help
            sys.stdout.write(out.getvalue())
            return HELP_SHOWN
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        return lines[-1].split(": error: ", 1)[-1] if lines else f"bad arguments {argv}"
    if a.summarize:
        return None
    try:
        parse_device(a.device)
    except argparse.ArgumentTypeError as exc:
        return f"--device: {exc}"
    unknown = [t for t in _csv_list(a.shards) or [] if t not in SHARDS]
    if unknown:
        return f"--shards: unknown {', '.join(unknown)} (known: {', '.join(SHARDS)})"
    for item in _csv_list(a.configs) or []:
        reg, _, steps = item.partition(":")
        try:
            rcar_fast.RCARSimilarity(16, 8, reg, int(steps) if steps else 2)
        except (ValueError, TypeError) as exc:
            return f"--configs {item!r}: expected regulator:steps ({str(exc).splitlines()[0]})"
    if [d for d in _csv_list(a.directions) or [] if d not in ("t2i", "i2t")]:
        return f"--directions: expected a comma list of t2i, i2t, got {a.directions!r}"
    for name in ("images", "captions", "train_pairs", "repeats", "ref_captions"):
        v = getattr(a, name, None)
        if v is not None and v < 1:
            return f"--{name.replace('_', '-')}: expected a positive integer, got {v}"
    try:
        settings_from_args(a)
    except (ValueError, TypeError, KeyError, RuntimeError) as exc:
        return f"bad arguments ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


HELP_SHOWN = "(help shown)"


def main(argv=None) -> int:
    """Every argument error prints one line on stderr and returns 2, before anything runs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    message = argument_error(argv)
    if message == HELP_SHOWN:
        return 0
    if message is not None:
        print(f"python -m bench: {message}", file=sys.stderr)
        return 2
    a = parse_args(argv)
    if a.summarize:
        print(summarize(a.summarize, a.all_runs, a.compact))
        return 0
    settings, cases = settings_from_args(a)
    if settings.device.type == "cuda":
        if not torch.cuda.is_available():
            print("--device cuda: CUDA is not available here", file=sys.stderr)
            return 2
        if a.tf32:
            harness.set_tf32(True)
    return run_settings(a, settings, cases)


def run_settings(a: argparse.Namespace, settings: Settings, cases: List[Case]) -> int:
    """Run the cases, print the table, write what --out and --plot ask for."""
    with _quiet_compiler():
        suite = Suite(settings, a.csv)
        suite.peak.measure_all()
        print(f"rcar_fast bench: {len(cases)} cases on {suite.env['device']}; rows -> {a.csv}",
              flush=True)
        rows = suite.run(cases)
    table = markdown_table(rows)
    head = headline(rows)
    text = f"{suite.header()}\n\n{table}\n" + (f"\nHeadline (torch vs release_loop):\n{head}\n" if head else "")
    print("\n" + text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(f"# rcar_fast benchmark\n\n{text}")
    if a.plot:
        from .plot import write_plots
        try:
            for path in write_plots(rows, a.plot):
                print(f"wrote {path}")
        except ImportError:
            print("--plot: matplotlib is not installed (pip install matplotlib); no charts written")
    return 0
