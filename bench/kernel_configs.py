"""Every Triton kernel launch the launchers make at the standard shapes, as the JIT would compile
it: what the compile report (bench/resources.py) compiles. The launchers themselves are called
(kernels/*: attention_fwd, attention_bwd, rar_fwd with and without its scoring layer, rar_bwd,
rcr_step, rcr_factors_bwd) on CPU tensors of the standard shapes with every kernel's launch
replaced by a recorder (nothing runs), so the block sizes come from their own choosers and the
arguments are the ones they pass.

Each recorded launch is then specialised as triton's JIT specialises a launch at run time
(triton._C.libtriton.native_specialize_impl with the CUDA backend): an integer equal to 1 becomes
a compile-time constant, integers that are multiples of 16 and 16-byte aligned tensors are marked
divisible by 16, integers get i32 or i64 by their value. Without this the report compiled a
variant the GPU never runs: unit strides unknown, every load scalar and unpipelined (the bf16
attention forward took 241 registers where its run-time variant takes 168;
bench/results/gpu_notes.md). Real launches with other sizes (a caption length or a pair count
that is not a multiple of 16) get variants of their own at run time; these rows sample both
kinds (Lq 16, 32, 64 and 36).

Standard shapes (SPEC.md): d = 1024, s = 256; t2i captions of up to 16, 32 or 64 words against
R = 36 regions, i2t the regions as queries against captions of up to 16, 32 or 64 words; P = 11
query items, B = 2 context items (grid) or a pair list (paired); every dtype. Every block size the
launchers can pick (query and context rows up to MAX_ROWS = 64) appears here.
"""

from __future__ import annotations

import contextlib
import inspect
from types import SimpleNamespace

#: (Lq, Lc) of the standard attention launches
STANDARD_SHAPES = ((16, 36), (32, 36), (64, 36), (36, 16), (36, 32), (36, 64))
#: RAR's query rows of the standard launches (t2i captions, i2t regions; 3 and 6: the packed
#: forward's most pairs per program, GPP 32, in fp32 and in bf16/fp16)
RAR_ROWS = (3, 6, 16, 32, 36, 64)
DTYPES = ("bf16", "fp16", "fp32")
D, S = 1024, 256
#: query and context items of the standard launches: 11 query items, so that a grouped program
#: count per context item is never 1 (the JIT would make it a constant) and the last program of
#: a context item is partial, as at real sizes
P_ITEMS, B_ITEMS = 11, 2
#: the options a launch passes besides its arguments
LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")


def _module(name: str):
    """rcar_fast.kernels.<name> (loaded through the triton backend, which also finds kernels/ in
    a source checkout run without an install)."""
    import importlib

    from rcar_fast.backends.triton_kernels import load_kernels
    return importlib.import_module(f"{load_kernels().__name__}.{name}")


def _dtype(name: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


@contextlib.contextmanager
def _recording(into: list):
    """Every Triton kernel launch inside appends (jit function, its arguments by name, its launch
    options) to ``into`` instead of running (compiled or interpreted kernels alike)."""
    from triton.runtime.jit import JITFunction
    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - every triton here has the interpreter
        pass

    def record(self, *args, grid, warmup, **kwargs):
        opts = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
        params = inspect.signature(self.fn).parameters
        values = {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}
        values.update(zip(params, args))
        values.update(kwargs)
        into.append((self, values, opts))

    saved = [(c, c.run) for c in classes]
    try:
        for c in classes:
            c.run = record
        yield into
    finally:
        for c, run in saved:
            c.run = run


def _launch_standard_shapes(dtype: str) -> None:
    """Calls every launcher at the standard shapes in ``dtype`` (under _recording: nothing runs)."""
    import torch
    attention, attention_bwd, rar, rcr = (_module(m) for m in ("attention", "attention_bwd", "rar", "rcr"))
    dt, P, B = _dtype(dtype), P_ITEMS, B_ITEMS
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dt)

    def full(n, v):
        return torch.full((n,), v, dtype=torch.int32)

    w, b = randn(S, D), randn(S)
    for Lq, Lc in STANDARD_SHAPES:
        q, c = randn(P, Lq, D), randn(B, Lc, D)
        for paired in (False, True):
            cidx = torch.zeros(P, dtype=torch.int32) if paired else None
            Bo = 1 if paired else B
            for state in (False, True):
                f = randn(Bo, P, Lq, D) if state else None
                lam = randn(Bo, P, Lq).abs() if state else 10.0
                for proj in (False, True):
                    wb = (w, b) if proj else (None, None)
                    attention.attention_fwd(q, full(P, Lq), c, full(B, Lc), f, lam, *wb, context_index=cidx)
                    attention_bwd.attention_bwd(randn(Bo, P, Lq, S if proj else D), q, full(P, Lq), c, full(B, Lc), f,
                                                lam, *wb, need_dfactors=state, context_index=cidx)
    rw = [randn(1, S, S), randn(1, S), randn(1, S, S), randn(1, S), randn(1, S), randn(1)]
    for Lq in RAR_ROWS:
        E = randn(B, P, Lq, S)
        for h0 in (None, randn(B, P, S)):
            for drop in (False, True):
                keep = (randn(B, P, Lq, S), randn(B, P, S)) if drop else (None, None)
                rar.rar_fwd(E, full(P, Lq), h0, *rw, *keep)
                if not drop:   # the last step taking the scoring layer (inference, KernelSet.rar_scores)
                    rar.rar_fwd(E, full(P, Lq), h0, *rw, score=(randn(S).float(), randn(1).float()))
                if h0 is not None:
                    rar.rar_bwd(randn(B, P, S), E, full(P, Lq), h0, *rw, *keep)
    E = randn(B, P, 16, S)
    mlp = [randn(2 * S, S), randn(2 * S), randn(D, 2 * S), randn(D), randn(S // 2, S), randn(S // 2), randn(1, S // 2),
           randn(1)]
    for state in (False, True):
        rcr.rcr_step(E, full(P, 16), randn(B, P, 16, D) if state else None, randn(B, P, 16).abs() if state else None,
                     10.0, *mlp)
        n = B * P * 16          # training: the d-wide chain of RCR's backward over the same rows
        for write_df in (False, True):
            rcr.rcr_factors_bwd(randn(n, 2 * S), mlp[2], mlp[3], randn(n, D) if state else None, randn(n, D),
                                randn(n, D) if write_df else None)


def _is_constexpr(param: inspect.Parameter) -> bool:
    ann = param.annotation
    return ann is not inspect.Parameter.empty and (getattr(ann, "__name__", None) == "constexpr"
                                                    or str(ann).endswith("constexpr"))


def specialization(fn, values: dict) -> tuple:
    """(constexprs, {argument: its JIT specialisation}) of one recorded launch: the declared
    constexprs' values, and per other argument "<type>" or "<type>:16" (divisible by 16) or
    "=1" (a constant 1), as triton's JIT specialises it (native_specialize_impl, CUDA backend)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    cfg, spec = {}, {}
    for name, p in inspect.signature(fn.fn).parameters.items():
        v = values[name]
        if _is_constexpr(p):
            cfg[name] = v
        elif isinstance(v, float):
            spec[name] = "fp32"         # floats are not specialised
        else:
            ty, attr = native_specialize_impl(CUDABackend, v, False, True, True)
            spec[name] = "=1" if ty == "constexpr" else (f"{ty}:16" if attr == "D" else ty)
    return cfg, spec


def _unique(items):
    out = []
    for it in items:
        if it not in out:
            out.append(it)
    return out


def recorded_launches() -> dict:
    """{report name: [(dtype, constexprs, launch options + "specialization")]} of every launch the
    launchers make at the standard shapes, each once."""
    names = {k.fn: name for name, k in kernels().items()}
    out = {name: [] for name in names.values()}
    for dtype in DTYPES:
        rec = []
        with _recording(rec):
            _launch_standard_shapes(dtype)
        for fn, values, opts in rec:
            cfg, spec = specialization(fn, values)
            out[names[fn]].append((dtype, cfg, dict(opts, specialization=spec)))
    return {name: _unique(v) for name, v in out.items()}


def kernels():
    """{report name: jit function} of every Triton kernel, as SimpleNamespace(fn=...)."""
    attention, attention_bwd, rar, rcr = (_module(m) for m in ("attention", "attention_bwd", "rar", "rcr"))
    K = SimpleNamespace
    return {
        "gram": K(fn=attention._gram_kernel),
        "attention_fwd": K(fn=attention._attention_fwd_kernel),
        "attention_bwd": K(fn=attention_bwd._attention_bwd_kernel),
        "attention_bwd_scores": K(fn=attention_bwd._attention_bwd_scores_kernel),
        "rar_fwd": K(fn=rar._rar_fwd_kernel),
        "rar_bwd": K(fn=rar._rar_bwd_kernel),
        "rcr_hidden": K(fn=rcr._rcr_hidden_kernel),
        "rcr_factors_gemm": K(fn=rcr._rcr_factors_gemm_kernel),
        "rcr_factors_bwd": K(fn=rcr._rcr_factors_bwd_kernel),
    }
