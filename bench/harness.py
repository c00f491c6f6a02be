"""Measuring one callable: time quantiles, peak memory, the device's matrix-product rate, and
where the numbers were taken (device, versions, commit).

Timing. A warm-up call first (it also tells how long one call takes), then:
  - CUDA, calls under ``DO_BENCH_MAX_S``: ``triton.testing.do_bench`` (median, 20th and 80th
    percentile over as many calls as fit ``budget_s``); without triton, CUDA events.
  - CUDA, slower calls, and CPU: a plain loop of ``repeats`` calls at most, stopping early once
    ``budget_s`` is spent (at least one call), timed with CUDA events or ``time.perf_counter``.

Peak memory, over one call (``measure_peak``):
  - CUDA: ``torch.cuda.max_memory_allocated()`` during the call minus what was allocated
    before it: the tensors the call itself allocated at its peak (inputs and weights excluded).
  - CPU: the same quantity from the c10 CPU allocator's memory events, which the profiler
    records for every allocation and free (``cpu_allocator_peak``): the tensors the call
    allocated at its peak. (The process's resident set can grow far more: glibc keeps freed
    heap pages: bench/README.md, "Peak memory".)
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

#: CUDA calls faster than this (seconds) are timed by triton's do_bench, slower ones by a loop
DO_BENCH_MAX_S = 0.05
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- environment

def git_commit() -> str:
    """``git rev-parse --short HEAD``, plus "-dirty" when tracked files differ from it.

    ``BENCH_GIT_COMMIT`` overrides it (for a copy of the tree without its .git, e.g. on a
    borrowed GPU machine)."""
    if os.environ.get("BENCH_GIT_COMMIT"):
        return os.environ["BENCH_GIT_COMMIT"]
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def triton_version() -> str:
    try:
        import triton
        return triton.__version__
    except Exception:   # not installed, or broken on this machine
        return "none"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tf32_enabled() -> bool:
    """Whether fp32 CUDA matmuls may use TF32. torch >= 2.9 has ``fp32_precision`` besides the
    legacy ``allow_tf32``, and refuses some mixes of the two; read the new one where it exists."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        return m.fp32_precision == "tf32"
    return bool(m.allow_tf32)


def set_tf32(flag: bool) -> None:
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        m.fp32_precision = "tf32" if flag else "ieee"
    else:
        m.allow_tf32 = flag


@contextlib.contextmanager
def tf32(flag: bool):
    """TF32 for fp32 CUDA matmuls on or off inside the block; the flags are left untouched
    when they already say so."""
    saved = tf32_enabled()
    if saved != flag:
        set_tf32(flag)
    try:
        yield
    finally:
        if saved != flag:
            set_tf32(saved)


def exact_fp32(device: torch.device):
    """fp32 products in full fp32 (no TF32) inside the block, for ground truth."""
    return tf32(False) if device.type == "cuda" else contextlib.nullcontext()


# ----------------------------------------------------------------------------- timing

@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    samples: int
    method: str


def _quantile(sorted_values: List[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list (numpy's default method)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def timing_from_samples(samples_ms: List[float], method: str) -> Timing:
    s = sorted(samples_ms)
    return Timing(statistics.median(s), _quantile(s, 0.2), _quantile(s, 0.8), len(s), method)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call, the device's queue drained before and after."""
    if device.type == "cuda":
        synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _do_bench():
    try:
        from triton.testing import do_bench
        return do_bench
    except Exception:
        return None


def benchmark(fn: Callable[[], object], device: torch.device, estimate_ms: float, repeats: int,
              budget_s: float, first_ms: Optional[float] = None) -> Timing:
    """Time ``fn`` (already warmed up; ``estimate_ms`` is one call's time).

    ``first_ms``: a call already timed after the warm-up (the memory probe on CPU), counted as
    the first sample of the loop.
    """
    do_bench = _do_bench() if device.type == "cuda" else None
    if do_bench is not None and estimate_ms < DO_BENCH_MAX_S * 1e3:
        med, p20, p80 = do_bench(fn, warmup=max(25, int(2 * estimate_ms)),
                                 rep=max(50, int(budget_s * 1e3)), quantiles=[0.5, 0.2, 0.8])
        return Timing(med, p20, p80, 0, "do_bench")   # do_bench picks its own count
    samples = [] if first_ms is None else [first_ms]
    spent = sum(samples) / 1e3
    while len(samples) < max(1, repeats) and (not samples or spent < budget_s):
        samples.append(time_call(fn, device))
        spent += samples[-1] / 1e3
    return timing_from_samples(samples, "cuda-events" if device.type == "cuda" else "perf_counter")


# ----------------------------------------------------------------------------- memory

def cpu_allocator_peak(fn: Callable[[], object]) -> Tuple[object, int, float]:
    """One call of ``fn`` on CPU tensors: (its output, the peak of the bytes it had allocated
    above what was allocated when it started, its ms). The c10 CPU allocator reports every
    allocation and free to the profiler as a memory event (those inside the compiled
    extension's kernels and in backward too); their running sum, in time order, peaks here."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        t0 = time.perf_counter()
        out = fn()
        ms = (time.perf_counter() - t0) * 1e3
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    if not events:
        raise RuntimeError("the profiler reported no allocation: no CPU peak can be measured")
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return out, peak, ms


def measure_peak(fn: Callable[[], object], device: torch.device) -> Tuple[object, Optional[int], float]:
    """One call of ``fn``: (its output, peak bytes the call added (None if unknown), its ms).

    See the module docstring for what "peak" means on each device. The bookkeeping runs
    outside the timed span on CUDA; on CPU the profiler records the call (its overhead is
    microseconds per op, small against the calls measured here).
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = []
        ms = time_call(lambda: out.append(fn()), device)
        return out[0], torch.cuda.max_memory_allocated(device) - base, ms
    return cpu_allocator_peak(fn)


def free_memory_bytes(device: torch.device) -> Optional[int]:
    """Memory a run may still take: free GPU memory, or MemAvailable on Linux."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


class ForeignCpu:
    """How busy other processes kept this machine's CPUs over a span (Linux /proc; None
    elsewhere): ``with ForeignCpu() as f: ...`` then ``f.share``, 0 = idle, 1 = every core
    busy with (or stolen by) something else. CPU timings are only as good as this is small."""

    share: Optional[float] = None

    @staticmethod
    def _ticks():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
            with open("/proc/self/stat") as f:
                own = f.read().rsplit(")", 1)[1].split()
            # busy = user nice system irq softirq steal; own = utime + stime (all threads)
            return v[0] + v[1] + v[2] + v[5] + v[6] + v[7], int(own[11]) + int(own[12])
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self):
        self._t0, self._start = time.perf_counter(), self._ticks()
        return self

    def __exit__(self, *exc):
        end = self._ticks()
        wall = time.perf_counter() - self._t0
        if self._start is not None and end is not None and wall > 0:
            hz, cpus = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
            others = (end[0] - self._start[0]) - (end[1] - self._start[1])
            self.share = min(1.0, max(0.0, others / hz / (wall * cpus)))
        return False


# ----------------------------------------------------------------------------- matmul rate

class MatmulPeak:
    """The device's measured dense matrix-product rate per dtype, measured once and cached.

    CPU: an n x n fp32 product (n = 2048), best of 5. CUDA: n = 8192, median of do_bench
    (or events) for bf16, fp16, fp32 without TF32 ("fp32") and with it ("tf32"). fp32 rows are
    compared with the tf32 rate when TF32 is on (:func:`tf32_enabled`).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._gflops: Dict[str, float] = {}

    def _measure(self, key: str) -> float:
        dev = self.device
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(key, torch.float32)
        n = 8192 if dev.type == "cuda" else 2048
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        ctx = tf32(key == "tf32") if dev.type == "cuda" else contextlib.nullcontext()
        with ctx:
            fn = lambda: torch.mm(a, b)   # noqa: E731
            est = time_call(fn, dev)
            if dev.type == "cuda":
                ms = benchmark(fn, dev, est, repeats=10, budget_s=0.5).median_ms
            else:
                ms = min(time_call(fn, dev) for _ in range(5))
        return 2 * n ** 3 / (ms * 1e-3) / 1e9

    def measure_all(self) -> Dict[str, float]:
        """Every rate this device's rows may be compared with (fp32 on CPU; bf16, fp32 and
        tf32 on CUDA)."""
        for key in (("bf16", "fp32", "tf32") if self.device.type == "cuda" else ("fp32",)):
            if key not in self._gflops:
                self._gflops[key] = self._measure(key)
        return self.measured()

    def key_for(self, dtype: torch.dtype) -> str:
        if dtype == torch.bfloat16:
            return "bf16"
        if dtype == torch.float16:
            return "fp16"
        if self.device.type == "cuda" and tf32_enabled():
            return "tf32"
        return "fp32"

    def gflops(self, dtype: torch.dtype) -> float:
        key = self.key_for(dtype)
        if key not in self._gflops:
            self._gflops[key] = self._measure(key)
        return self._gflops[key]

    def measured(self) -> Dict[str, float]:
        return dict(self._gflops)
