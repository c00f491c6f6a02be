"""Self-test: every backend on a small problem on one device, forward and backward, against the
reference; the check ``backend="auto"`` runs before it first trusts a backend.

    rcar_fast.selftest("cuda")          # prints a table, returns its rows
    rcar-fast selftest --device cuda    # the same from the command line (exit 1 on a failure)

The problem: 2 images x 3 captions (lengths 1, L and one between, NaN in the padding); on a GPU
R = 36 regions, L = 24 words, d = 1024, s = 256 (the shapes, so the kernel configurations, of
real use); on the CPU R = 7, L = 9, d = 32, s = 16. Two heads with random weights and biases: coop_rcar
T = 2 (attention fused with the projection, RCR, RAR) and only_rcr T = 1 (the attention alone
and the cosine scores), each in both directions, eval mode. Checked against the reference in
float64 on the CPU:

  forward   max |scores - reference|: float64 <= 1e-9; float32 <= 1e-4; float16/bfloat16 within
            twice the error of the torch backend in the same dtype on the same device, + 1e-4;
  backward  gradients of img, cap and every parameter of sum(w * scores): relative error
            ||g - g_ref|| / max(||g_ref||, 1e-3 of the largest gradient's norm) per tensor,
            float64 <= 1e-7, float32 <= 1e-3, half within twice the torch backend's + 0.1
            (half-precision gradients of RCR's clamp jump where rounding moves a value across
            the clamp's edge: 0.01-0.2 for either backend, by the draw); finite, and zero at
            padded words. The float32 check is the one that catches a wrong formula; the half
            checks catch what breaks only in half precision (overflow, NaN, a wrong cast).

Nothing here draws from the global random generator (users' seeds stay untouched), and it runs
with autograd on and autocast off whatever the caller's context.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from . import backends as _backends

Tensor = torch.Tensor
HEADS = (("coop_rcar", 2), ("only_rcr", 1))
DIRECTIONS = ("t2i", "i2t")
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class SelftestRow:
    backend: str
    device: str
    dtype: str
    forward_err: float = float("nan")
    forward_tol: float = float("nan")
    grad_err: float = float("nan")
    grad_tol: float = float("nan")
    seconds: float = 0.0
    failure: Optional[str] = None      # None: passed

    @property
    def ok(self) -> bool:
        return self.failure is None


def _dims(device: torch.device):
    """(R, L, d, s): the standard shapes on a GPU (so the kernel configurations of real use get
    compiled and checked), small ones on the CPU (no configurations there; seconds matter)."""
    return (36, 24, 1024, 256) if device.type == "cuda" else (7, 9, 32, 16)


def _problem(device: torch.device, seed: int = 0):
    """img (2, R, d), cap (3, L, d) float64 on the CPU with NaN padding, lens (3,) = 1, L and
    one between; the heads' parameters per (regulator, steps), float64."""
    from .ops import parameter_shapes
    R, L, d, s = _dims(device)
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(2, R, d, generator=g, dtype=torch.float64)
    cap = torch.randn(3, L, d, generator=g, dtype=torch.float64)
    img = img / img.norm(dim=-1, keepdim=True)
    cap = cap / cap.norm(dim=-1, keepdim=True)
    lens = torch.tensor([1, L, L // 2 + 1])
    cap[torch.arange(L)[None, :] >= lens[:, None]] = float("nan")
    params = {}
    for regulator, steps in HEADS:
        p = {}
        for name, shape in parameter_shapes(regulator, steps, d, s).items():
            if name.endswith("weight"):
                r = 1.5 * (6.0 / (shape[0] + shape[-1])) ** 0.5
                p[name] = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * r
            else:
                p[name] = torch.randn(shape, generator=g, dtype=torch.float64) * 0.2
        params[regulator, steps] = p
    return img, cap, lens, params


def _run(backend, img, cap, lens, params, regulator, steps, attn_type, dtype, device):
    """(scores float64 CPU, gradients float64 CPU: img, cap, then params in order)."""
    from .ops import rcar_scores
    x = img.to(device, dtype).requires_grad_()
    y = cap.to(device, dtype).requires_grad_()
    p = {k: v.to(device, dtype).requires_grad_() for k, v in params.items()}
    out = rcar_scores(x, y, lens, p, regulator, steps, attn_type, backend=backend)
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    grads = torch.autograd.grad((out * w).sum(), [x, y, *p.values()], allow_unused=True)
    grads = [torch.zeros(t.shape, dtype=torch.float64) if gr is None else gr.detach().double().cpu()
             for gr, t in zip(grads, [x, y, *p.values()])]
    return out.detach().double().cpu(), grads


@functools.lru_cache(maxsize=None)
def _reference(device_type: str, regulator: str, steps: int, attn_type: str):
    """The reference's scores and gradients for the problem of ``device_type`` (computed once
    per process: they do not depend on the backend or dtype under test)."""
    img, cap, lens, params = _problem(torch.device(device_type))
    return _run("reference", img, cap, lens, params[regulator, steps], regulator, steps, attn_type,
                torch.float64, torch.device("cpu"))


def _rel(got: Sequence[Tensor], want: Sequence[Tensor]) -> float:
    """max over tensors of ||a - b|| / max(||b||, 1e-3 max ||b||): relative per tensor, with a
    floor so that a gradient that is zero in exact arithmetic (RAR's rar_v_w bias: a softmax
    ignores a shift) is judged against the gradients' scale, not against its own round-off."""
    norms = [b.norm().item() for b in want]
    floor = 1e-3 * max(norms + [0.0])
    worst = 0.0
    for a, b, n in zip(got, want, norms):
        den = max(n, floor)
        worst = max(worst, (a - b).norm().item() / den if den > 0 else a.norm().item())
    return worst


def _check(backend: str, device: torch.device, dtype: torch.dtype) -> SelftestRow:
    row = SelftestRow(backend, str(device), str(dtype).replace("torch.", ""))
    t0 = time.perf_counter()
    img, cap, lens, params = _problem(device)
    fwd_err = grad_err = fwd_torch = grad_torch = 0.0
    half = dtype in (torch.float16, torch.bfloat16)
    for (regulator, steps), p in params.items():
        for attn_type in DIRECTIONS:
            want, want_g = _reference(device.type, regulator, steps, attn_type)
            got, got_g = _run(backend, img, cap, lens, p, regulator, steps, attn_type, dtype, device)
            if not torch.isfinite(got).all() or not all(torch.isfinite(gr).all() for gr in got_g):
                raise FloatingPointError(f"non-finite output or gradient ({regulator} T={steps} {attn_type})")
            for j, lj in enumerate(lens.tolist()):
                if got_g[1][j, lj:].any():
                    raise AssertionError(f"non-zero gradient at padded words ({regulator} T={steps} {attn_type})")
            fwd_err = max(fwd_err, (got - want).abs().max().item())
            grad_err = max(grad_err, _rel(got_g, want_g))
            if half:
                base, base_g = _run("torch", img, cap, lens, p, regulator, steps, attn_type, dtype, device)
                fwd_torch = max(fwd_torch, (base - want).abs().max().item())
                grad_torch = max(grad_torch, _rel(base_g, want_g))
    exact64 = dtype == torch.float64 and backend != "triton"    # triton computes fp64 at fp32 accuracy
    if half:
        row.forward_tol, row.grad_tol = 2 * fwd_torch + 1e-4, 2 * grad_torch + 0.1
    elif exact64:
        row.forward_tol, row.grad_tol = 1e-9, 1e-7
    else:
        row.forward_tol, row.grad_tol = 1e-4, 1e-3
    row.forward_err, row.grad_err = fwd_err, grad_err
    if not fwd_err <= row.forward_tol:
        row.failure = f"forward error {fwd_err:.1e} > {row.forward_tol:.1e}"
    elif not grad_err <= row.grad_tol:
        row.failure = f"gradient error {grad_err:.1e} > {row.grad_tol:.1e}"
    row.seconds = time.perf_counter() - t0
    return row


def run_check(backend: str, device, dtype: torch.dtype) -> SelftestRow:
    """One self-test row; an exception becomes the row's failure."""
    device = torch.device(device)
    t0 = time.perf_counter()
    try:
        with torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device.type, enabled=False):
            return _check(backend, device, dtype)
    except Exception as exc:   # any failure of the backend is the result, not a crash
        row = SelftestRow(backend, str(device), str(dtype).replace("torch.", ""))
        row.failure = f"raised {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        row.seconds = time.perf_counter() - t0
        return row


def check_backend(backend: str, device, dtype: Optional[torch.dtype]) -> Optional[str]:
    """None if ``backend`` passes the self-test on ``device`` in ``dtype`` (float32 when None),
    else the failure in words. Used by ``backend="auto"`` (cached there)."""
    return run_check(backend, device, torch.float32 if dtype is None else dtype).failure


def selftest(device=None, backends: Optional[Sequence[str]] = None,
             dtypes: Optional[Sequence[torch.dtype]] = None, quiet: bool = False,
             file=None) -> List[SelftestRow]:
    """Run the self-test of every available backend (or ``backends``) on ``device`` (default:
    CUDA if present, else the CPU) in each dtype it takes (or ``dtypes``), print a table to
    ``file`` (default sys.stdout; ``quiet``: print nothing) and return the rows. A (backend, dtype) the backend refuses
    (e.g. bfloat16 on the Triton interpreter) is listed as skipped, with the reason."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    names = [b for b in (backends or _backends.available_backends(device)) if b != "reference"]
    rows: List[SelftestRow] = []
    skipped: Dict[tuple, str] = {}
    for name in names:
        for dtype in (dtypes or DTYPES):
            problem = _backends.dtype_problem(name, dtype)
            if problem is not None:
                skipped[name, dtype] = problem
                continue
            rows.append(run_check(name, device, dtype))
            _backends._SELFTEST[name, str(device), dtype] = rows[-1].failure
    if not quiet:
        file = sys.stdout if file is None else file
        print(f"rcar_fast self-test on {device} (forward: max abs error of the scores; gradients: "
              "max relative error over img, cap and every parameter; vs the float64 reference)", file=file)
        print(f"{'backend':<10}{'dtype':<10}{'fwd err':>10}{'tol':>10}{'grad err':>10}{'tol':>10}"
              f"{'s':>7}  result", file=file)
        for r in rows:
            print(f"{r.backend:<10}{r.dtype:<10}{r.forward_err:>10.1e}{r.forward_tol:>10.1e}"
                  f"{r.grad_err:>10.1e}{r.grad_tol:>10.1e}{r.seconds:>7.2f}  "
                  f"{'ok' if r.ok else 'FAILED: ' + r.failure}", file=file)
        for (name, dtype), why in skipped.items():
            print(f"{name:<10}{str(dtype).replace('torch.', ''):<10}{'':>57}  skipped: {why}", file=file)
    return rows
