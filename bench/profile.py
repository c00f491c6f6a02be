"""Measured GPU time per kernel against the cost model's prediction per launch (bench/roofline.py):
which of the model's ceilings and leads hold, kernel by kernel, when a GPU is lent.

    python -m bench.profile                               # flickr30k, triton and cuda, bf16
    python -m bench.profile --shape headline --backends triton,cuda,torch --out profile.md

For each backend: the model's shape (its inputs as ``python -m bench`` draws them: bench/shapes.py,
bf16, the model's regulator set-up and direction) is scored once to warm up (JIT compiles, the
allocator), once timed between CUDA events (the wall time of the call), and once under
torch.profiler (CPU and CUDA activity: with CUDA alone some profilers have dropped kernel
records; only the device's kernels are kept, not its copies, memsets or the GPU mirrors of CPU
annotations). The profiled kernels are summed into the model's launch rows (ROW_RULES): a kernel
named like one of ours (kernels/*.py, csrc/cuda) goes to its own row; a cuBLAS/cuBLASLt GEMM to
"library GEMMs"; anything else (ATen element-wise, copies, reductions, index_put) to "other". The
model's launches go to the same rows by their names (model_row): its kernels by name, its lines
marked "(cuBLAS)" to the GEMMs, the rest to "other". A line the model books whole that mixes both
(torch's "projection (cuBLAS) + l2n" goes to the GEMMs, "rar (cuBLAS + element-wise)" to "other",
the pipeline's "block sources, scores and their write (torch)", a small GEMM among element-wise
ops, to "other")
splits differently between those two rows than the profiler's kernels do; their sum compares.

A row prints launches measured and predicted, the summed kernel time and the model's time (work
over its ceiling; the model's 5 us per launch is not in it, since the profiler's kernel times
leave out launch gaps), and their ratio; the last row compares the timed call with the model's
total (its launch costs included). Only a CUDA device can run it (profiler kernel times need
one); tests/test_profile.py checks the tables and the rules on recorded events.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

#: (pattern on a profiled kernel's name, row): the first match names the row; our kernels by
#: their own names (Triton's @triton.jit functions, the extension's __global__ functions: see
#: tests/test_profile.py, which finds each in kernels/ and csrc/cuda), cuBLAS's by its families
ROW_RULES: Tuple[Tuple[str, str], ...] = (
    (r"attention_fwd", "attention_fwd"),
    (r"_rcr_factors_gemm_kernel", "rcr_factors_gemm"),
    (r"_rcr_hidden_kernel", "rcr_hidden"),
    (r"rcr_factors_kernel", "rcr_factors_kernel"),
    (r"rcr_gemm_kernel", "rcr_gemm_kernel"),
    (r"rcr_wgmma_kernel", "rcr_wgmma_kernel"),
    (r"rar_fwd(_wg)?_kernel", "rar_fwd"),
    (r"rar_mean_kernel", "rar_mean_kernel"),
    (r"gram_kernel", "gram"),
    (r"gemm|gemv|xmma|nvjet|cutlass|cublas", "library GEMMs"),
)
OTHER = "other"

#: (prefix of a launch name of bench/roofline.py's model, row), in ROW_RULES's rows
MODEL_RULES: Tuple[Tuple[str, str], ...] = (
    ("attention_fwd", "attention_fwd"),
    ("rcr_factors_gemm", "rcr_factors_gemm"),
    ("rcr_hidden", "rcr_hidden"),
    ("rcr_factors_kernel", "rcr_factors_kernel"),
    ("rcr_gemm_kernel", "rcr_gemm_kernel"),
    ("rcr_wgmma_kernel", "rcr_wgmma_kernel"),
    ("rar_fwd", "rar_fwd"),
    ("rar_mean_kernel", "rar_mean_kernel"),
    ("gram", "gram"),
)


def kernel_row(name: str) -> str:
    """The row a profiled kernel's time is summed into (ROW_RULES, else OTHER)."""
    for pattern, row in ROW_RULES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return row
    return OTHER


def model_row(launch: str) -> str:
    """The row of one of the model's launch names (bench/roofline.py's Book keys): its kernels by
    their names (MODEL_RULES), its cuBLAS lines ("(cuBLAS)" in the name) the library GEMMs, every
    other line (torch/ATen ops) OTHER."""
    for prefix, row in MODEL_RULES:
        if launch.startswith(prefix):
            return row
    return "library GEMMs" if "(cuBLAS)" in launch else OTHER


def kernel_events(prof) -> List[Tuple[str, float]]:
    """(name, device microseconds) of every kernel a torch.profiler run recorded on a CUDA
    device (CUPTI's kernel records: their time range is the kernel's time on the device); not
    the device's copies and memsets, nor the GPU-side mirrors of CPU annotations."""
    from torch.autograd import DeviceType
    return [(e.name, float(e.time_range.elapsed_us())) for e in prof.events()
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
            and not e.name.startswith(("Memcpy", "Memset"))]


def measured_rows(events: Iterable[Tuple[str, float]]) -> Dict[str, Tuple[int, float]]:
    """{row: (kernels, seconds)} summed over the events."""
    out: Dict[str, Tuple[int, float]] = {}
    for name, us in events:
        row = kernel_row(name)
        n, s = out.get(row, (0, 0.0))
        out[row] = (n + 1, s + us * 1e-6)
    return out


def predicted_rows(book) -> Dict[str, Tuple[int, float]]:
    """{row: (launches, seconds)} of a bench.roofline Book: each launch's work over its ceiling,
    without the model's per-launch cost (the profiler's kernel times do not hold launch gaps)."""
    from .roofline import LAUNCH_S
    out: Dict[str, Tuple[int, float]] = {}
    for ln in book.launches.values():
        row = model_row(ln.name)
        n, s = out.get(row, (0, 0.0))
        out[row] = (n + ln.count, s + ln.seconds() - ln.count * LAUNCH_S)
    return out


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return f"x{a / b:.2f}" if a and b else "-"


def table(shape: str, backend: str, measured: Dict[str, Tuple[int, float]], predicted: Dict[str, Tuple[int, float]],
          wall_s: Optional[float], model_total_s: float) -> List[str]:
    """Markdown rows: every row either side has, the model's largest first, then the totals."""
    names = sorted(set(measured) | set(predicted), key=lambda r: (-predicted.get(r, (0, 0.0))[1], r))
    lines = []
    for r in names:
        mn, ms = measured.get(r, (0, 0.0))
        pn, ps = predicted.get(r, (0, 0.0))
        lines.append(f"| {shape} | {backend} | {r} | {mn} | {pn} | {ms * 1e3:.2f} | {ps * 1e3:.2f} | {_ratio(ms, ps)} |")
    mk = sum(n for n, _ in measured.values())
    pk = sum(n for n, _ in predicted.values())
    ksum = sum(s for _, s in measured.values())
    lines.append(f"| {shape} | {backend} | **kernels, summed** | {mk} | {pk} | {ksum * 1e3:.2f} "
                 f"| {sum(s for _, s in predicted.values()) * 1e3:.2f} | {_ratio(ksum, sum(s for _, s in predicted.values()))} |")
    wall = "-" if wall_s is None else f"{wall_s * 1e3:.2f}"
    lines.append(f"| {shape} | {backend} | **the call (timed; model with launch costs)** | | | {wall} "
                 f"| {model_total_s * 1e3:.2f} | {_ratio(wall_s, model_total_s)} |")
    return lines


HEADER = ["| shape | backend | row | kernels measured | launches predicted | measured ms | predicted ms "
          "| measured / predicted |", "|" + " --- |" * 8]


def _scorer(shape, backend: str, device):
    """A function scoring the shape's inputs (bench/shapes.py's draw, bf16) with ``backend``."""
    import torch

    import rcar_fast

    from .shapes import Shard
    from .roofline import D, R, S_DIM
    sh = Shard(shape.name, shape.n_images, shape.n_captions, shape.len_lo, shape.len_hi, R, D, S_DIM, shape.seed)
    torch.manual_seed(1234)
    model = rcar_fast.RCARSimilarity(D, S_DIM, shape.regulator, shape.steps, shape.attn_type)
    model = model.to(device, torch.bfloat16).eval()
    img, cap, lens = sh.inputs(device, torch.bfloat16)

    def run():
        with torch.no_grad():
            return model(img, cap, lens, backend=backend)
    return run


def profile_backend(shape_name: str, backend: str, device: str = "cuda") -> List[str]:
    """Warm up, time and profile one scoring call of the shape; its table rows."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from .roofline import SHAPES, model
    shape = SHAPES[shape_name]
    if shape.training:
        raise ValueError(f"--shape: {shape_name} is a training step; bench.profile scores inference shapes")
    run = _scorer(shape, backend, device)
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    torch.cuda.synchronize()
    wall = start.elapsed_time(end) / 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    book = model(backend, shape)
    return table(shape_name, backend, measured_rows(kernel_events(prof)), predicted_rows(book), wall, book.seconds())


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .roofline import SHAPES, backends_arg
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="flickr30k", choices=sorted(s for s, v in SHAPES.items() if not v.training))
    ap.add_argument("--backends", default="triton,cuda")
    ap.add_argument("--out", help="also append the table to this file")
    a = ap.parse_args(argv)
    backends = backends_arg(a.backends, "python -m bench.profile")
    if backends is None:
        return 2
    import torch
    if not torch.cuda.is_available():
        print("python -m bench.profile: needs a CUDA device (kernel times come from the profiler's CUDA "
              "activity); none is available", file=sys.stderr)
        return 2
    lines = [f"# Measured kernel time vs the cost model: {torch.cuda.get_device_name()}, bf16 "
             "(python -m bench.profile)", "", *HEADER]
    print("\n".join(lines), flush=True)
    status = 0
    for b in backends:
        try:
            rows = profile_backend(a.shape, b)
        except Exception as e:   # one backend's failure costs the others nothing
            why = str(e).splitlines()[0][:160] if str(e) else ""
            rows = [f"| {a.shape} | {b} | error: {type(e).__name__}: {why} | | | | | |"]
            status = 1
        print("\n".join(rows), flush=True)
        lines += rows
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
