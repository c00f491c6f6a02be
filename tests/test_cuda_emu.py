"""The CUDA kernels of csrc/cuda/*.cuh run on the CPU: tests/cuda_emu/ compiles them for the
host against a small emulation of CUDA (include/cuda_emu.h: a block's 256 threads as fibers
switched at __syncthreads and warp shuffles, run between barriers in thread order and reversed,
wmma tiles computed in fp32 with their alignment rules checked, shared memory filled with NaN
bytes before each block and nothing written past the launch's size) and launches them the way
the launchers in csrc/cuda/*.cu do (the same plan.h choices, grids and template arguments; the
host code around them, the GEMMs of rar_cuda and attention_bwd_cuda, is written again here in
torch). Every kernel's own
code (index math, the pairs of a block, masking, barriers, the order of the passes) is checked
here against the op contract's per-pair reference (tests/test_fused_ops.py), with NaN in every
padded row. No GPU runs here: code generation is the compile tier's (tests/test_compile.py),
timing and the hardware's tensor-core layouts a GPU's (tests/test_gpu.py)."""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess

import pytest
import torch

from test_fused_ops import (RAR_STEPS_TOL, _mixed_lengths, _rar_sample, _sample, rar_in_one_call_and_in_step_calls,
                            ref_attention, ref_rar)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU = os.path.join(ROOT, "tests", "cuda_emu")
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
H200_SMEM = 232448   # opt-in shared memory per block, H100/H200
A100_SMEM = 166912
#: the kernels round F * Q, P and E to the input type: tolerances against the fp64 reference
TOL = {torch.float32: dict(rtol=0, atol=2e-5), torch.float16: dict(rtol=0, atol=4e-3),
       torch.bfloat16: dict(rtol=0, atol=3e-2)}
MODE_ATTENDED, MODE_ALIGNMENT = 0, 1

_VP, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


def _emu_sources():
    """Every file the library is built from: the driver, the emulation and csrc/cuda's headers."""
    import glob
    cuda = os.path.join(ROOT, "csrc", "cuda")
    return sorted(glob.glob(os.path.join(EMU, "**", "*.[ch]*"), recursive=True)
                  + glob.glob(os.path.join(cuda, "*.cuh")) + [os.path.join(cuda, "plan.h")])


def build_emu(folder: str):
    """tests/cuda_emu/kernels.cpp built as a shared library (g++, C++20, torch's c10 headers for
    the half types), loaded with its entry points typed; None without a compiler. The library is
    kept in ``folder`` under the hash of its sources, flags and compiler, so that the test
    processes of one run (pytest -n) build it once (a lock file orders them)."""
    import fcntl
    import hashlib
    from torch.utils.cpp_extension import include_paths
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return None
    fma = ["-mfma"] if platform.machine() in ("x86_64", "AMD64") else []   # std::fma inline, not a libm call
    flags = ["-std=c++20", "-O2", *fma, "-shared", "-fPIC", f"-I{os.path.join(EMU, 'include')}",
             f"-I{os.path.join(ROOT, 'csrc')}", *[f"-I{p}" for p in include_paths()]]
    h = hashlib.sha256(" ".join([cxx, torch.__version__, *flags]).encode())
    for path in _emu_sources():
        with open(path, "rb") as f:
            h.update(path.encode() + f.read())
    lib = os.path.join(folder, f"libcudaemu-{h.hexdigest()[:16]}.so")
    with open(os.path.join(folder, "libcudaemu.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(lib):
            subprocess.run([cxx, *flags, os.path.join(EMU, "kernels.cpp"), "-o", lib + ".tmp"], check=True)
            os.replace(lib + ".tmp", lib)
    so = ctypes.CDLL(lib)
    so.emu_gram.argtypes = [ctypes.c_int, _VP, _VP, _I64, _I64, _I64, _I64, _I64, _VP]
    so.emu_attention_fwd.argtypes = [ctypes.c_int, ctypes.c_int, _VP, _VP, _VP, _VP, _VP, _VP, _VP, _F32, _VP, _VP,
                                     _VP, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _VP, _VP]
    so.emu_attention_fwd.restype = _I64
    so.emu_rar_step.argtypes = [ctypes.c_int, _VP, _VP, _VP, _VP, _VP, _VP, _VP, _VP, _I64, _I64, _I64, _I64, _I64,
                                _VP, _I64, _VP, _VP, _VP, _VP]
    so.emu_rar_step.restype = _I64
    so.emu_attention_sqdiff.argtypes = [ctypes.c_int, _VP, _VP, _VP, _VP, _VP, _VP, _VP, _F32, _VP, _I64, _I64, _I64,
                                        _I64, _I64, _I64, _I64, _VP]
    so.emu_attention_sqdiff_chunk.argtypes = [ctypes.c_int, *[_VP] * 7, _F32, _VP, *[_I64] * 8, _VP]
    so.emu_attention_sqdiff_chunk.restype = _I64
    so.emu_bwd_chunk_end.argtypes = [_I64] * 4
    so.emu_bwd_chunk_end.restype = _I64
    so.emu_l2n_bwd_rows.argtypes = [ctypes.c_int, _VP, _VP, _VP, _I64, _I64, _I64, _I64, _I64, _VP]
    so.emu_attention_bwd.argtypes = [ctypes.c_int, ctypes.c_int, _VP, _VP, _VP, _VP, _VP, _VP, _VP, _F32, _VP, _VP,
                                     _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _VP, _VP, _VP, _VP, _VP]
    so.emu_attention_bwd.restype = _I64
    so.emu_rar_bwd.argtypes = [ctypes.c_int, *[_VP] * 12, _I64, _I64, _I64, _I64, _I64, _VP, _VP, _VP, _VP]
    so.emu_rar_bwd.restype = _I64
    so.emu_rar_mean.argtypes = [ctypes.c_int, _VP, _VP, _I64, _I64, _I64, _I64, _VP]
    so.emu_rcr_factors.argtypes = [ctypes.c_int, _VP, _VP, _VP, _I64, _I64, _I64, _I64, ctypes.c_uint]
    so.emu_rcr_gemm.argtypes = [ctypes.c_int, ctypes.c_int, _VP, _VP, _VP, _VP, _VP, _I64, _I64, _I64, _I64, _I64,
                                _VP]
    so.emu_rcr_factors_bwd.argtypes = [ctypes.c_int, *[_VP] * 6, _I64, _I64, _I64, ctypes.c_uint, _VP, _VP]
    so.emu_rcr_hidden_smooth_wg.argtypes = [ctypes.c_int, _VP, _VP, _VP, _VP, _VP, _VP, _VP, _VP, _F32, _VP, _I64,
                                            _I64, _I64, _I64, _I64, _I64, _VP, _VP]
    so.emu_rcr_smooth.argtypes = [ctypes.c_int, _VP, _VP, _VP, _VP, _F32, _VP, _I64, _I64, _I64, _I64, ctypes.c_uint,
                                  _VP]
    so.emu_last_error.restype = ctypes.c_char_p
    so.emu_selftest.argtypes = [ctypes.c_int, _VP]
    so.emu_set_reverse.argtypes = [ctypes.c_int]
    so.emu_set_wgmma.argtypes = [ctypes.c_int]
    so.emu_wgmma_ops.restype = ctypes.c_long
    return _Checked(so)


class _Checked:
    """The library's entry points, each followed by a check of emu_last_error: a kernel that
    deadlocks the emulation (a barrier not every thread reaches) raises here."""

    def __init__(self, so):
        self._so = so

    def __getattr__(self, name):
        fn = getattr(self._so, name)

        def call(*args):
            out = fn(*args)
            err = self._so.emu_last_error()
            if err:
                raise RuntimeError(f"{name}: {err.decode()}")
            return out
        return call


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    # the base temporary folder is the run's, shared by its xdist workers (getbasetemp's parent)
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    so = build_emu(str(shared))
    if so is None:
        pytest.skip("no host C++ compiler")
    return so


@pytest.fixture(params=["in order", "reversed"])
def emu(emu_lib, request):
    """The library, its threads run between barriers first-to-last or last-to-first (a missing
    barrier between one thread's write and another's read shows in one of the two)."""
    emu_lib.emu_set_reverse(int(request.param == "reversed"))
    return emu_lib


def test_the_emulation_itself(emu):
    """Barriers and shuffles behave as on a GPU: a block reduction over 256 threads on three
    blocks, one XOR shuffle; a barrier that thread 0 never reaches is reported, not a hang."""
    out = torch.full((4 * 256,), float("nan"))
    emu.emu_selftest(0, _ptr(out))
    t = torch.arange(256, dtype=torch.float32)
    for b in range(3):
        assert torch.equal(out[b * 256:(b + 1) * 256], torch.full((256,), float((t + b).sum())))
    assert torch.equal(out[768:], (torch.arange(256) ^ 5).float())
    with pytest.raises(RuntimeError, match="barrier no thread can pass"):
        emu.emu_selftest(1, _ptr(out))


def test_kernels_use_dynamic_shared_memory_only():
    """The emulation gives a block one dynamic shared-memory array (extern __shared__); a static
    __shared__ variable would become each thread's own there, silently. So the kernels have none."""
    import glob
    import re
    cuda = os.path.join(ROOT, "csrc", "cuda")
    for path in glob.glob(os.path.join(cuda, "*.cuh")) + glob.glob(os.path.join(cuda, "*.cu")):
        with open(path) as f:
            for n, line in enumerate(f, 1):
                code = line.split("//")[0]
                if re.search(r"\b__shared__\b", code):
                    assert "extern" in code, f"{os.path.relpath(path, ROOT)}:{n}: static __shared__ ({line.strip()})"


def _ptr(t):
    return None if t is None else t.data_ptr()


def emu_attention(emu, args, context_index=None, limit=H200_SMEM, strided=False, wgmma=False, guarded=False):
    """(output, plan) of the CUDA attention forward on ``args`` (the attention op's arguments):
    plan = 1000 GP + MT when a tensor-core kernel ran (MT 8: attention_fwd_wg_kernel's 128 rows;
    1-4: attention_fwd_tc_kernel), MT when the per-pair kernel did.
    strided: query, context and factors passed as they are (last dimension contiguous, as
    attention_cuda requires) and lam with any strides; else everything made contiguous.
    wgmma: launched as on an sm_90a build (attention_fwd_wg_kernel where plan.h choose_wg_plan
    takes the shapes, else a 64-row block's projection on wgmma: checked to have run wgmma exactly
    where the plan's blocks have 128 rows, or 64 with a projection).
    guarded: the inputs copied to end right before an inaccessible page (_Guarded): a read past
    one kills the process."""
    emu.emu_set_wgmma(int(wgmma))
    emu.emu_wgmma_ops()
    try:
        out, used = _emu_attention(emu, args, context_index, limit, strided, guarded)
    finally:
        emu.emu_set_wgmma(0)
    ran = emu.emu_wgmma_ops()
    wg_rows = used >= 1000 and used % 1000 == 8
    assert not wg_rows or (wgmma and args[7] is not None), (wgmma, used)
    assert (ran > 0) == (wgmma and used >= 1000 and used % 1000 in (4, 8) and args[7] is not None), (wgmma, used, ran)
    return out, used


def _emu_attention(emu, args, context_index, limit, strided, guarded=False):
    keep = (0, 2, 4, 5) if strided else ()
    q, ql, c, cl, f, lam, lam_scalar, w, b = [a.contiguous() if isinstance(a, torch.Tensor) and i not in keep else a
                                              for i, a in enumerate(args)]
    if guarded:
        guard = _Guarded()
        q, c, f, lam, w, b = (guard(t) for t in (q, c, f, lam, w, b))
    assert all(t is None or t.stride(-1) == 1 for t in (q, c, f))
    P, Lq, D = q.shape
    B, Lc = c.shape[:2]
    Bo = 1 if context_index is not None else B
    width = D if w is None else w.shape[0]
    dt = DTYPES[q.dtype]
    gram = torch.full((B, Lc, Lc), float("nan"))
    emu.emu_gram(dt, _ptr(c), _ptr(cl), B, Lc, D, c.stride(0), c.stride(1), _ptr(gram))
    out = torch.full((Bo, P, Lq, width), float("nan"), dtype=q.dtype)
    cidx = None if context_index is None else context_index.to(torch.int32).contiguous()
    strides = None
    if strided:
        fs = f.stride()[:3] if f is not None else (0, 0, 0)
        ls = lam.stride() if lam is not None else (0, 0, 0)
        strides = torch.tensor([*q.stride()[:2], *c.stride()[:2], *fs, *ls], dtype=torch.int64)
    used = emu.emu_attention_fwd(dt, MODE_ATTENDED if w is None else MODE_ALIGNMENT, _ptr(q), _ptr(ql), _ptr(c),
                                 _ptr(cl), _ptr(cidx), _ptr(f), _ptr(lam), lam_scalar, _ptr(w), _ptr(b), _ptr(gram),
                                 B, P, Lq, Lc, D, 0 if w is None else w.shape[0], limit, _ptr(strides), _ptr(out))
    return out, used


def _ref(args, context_index=None):
    """The reference in fp64 on the same (rounded) inputs; paired: per pair p with its item."""
    q, ql, c, cl, f, lam, lam_scalar, w, b = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                                              else a for a in args]
    if context_index is None:
        return ref_attention(q, ql, c, cl, f, lam, lam_scalar, w, b)
    rows = []
    for p, bi in enumerate(context_index.tolist()):
        one = ref_attention(q[p:p + 1], ql[p:p + 1], c[bi:bi + 1], cl[bi:bi + 1],
                            None if f is None else f[:, p:p + 1], None if lam is None else lam[:, p:p + 1],
                            lam_scalar, w, b)
        rows.append(one[0, 0])
    return torch.stack(rows)[None]


def _check(out, want, dtype):
    assert not torch.isnan(out).any(), "an element of the output was never written (or NaN leaked)"
    torch.testing.assert_close(out.double(), want, **TOL[dtype])


ATT_CASES = [(False, False), (True, False), (False, True), (True, True)]
ATT_IDS = ["A,F=1", "A,F,lam", "E,F=1", "E,F,lam"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("Lq,Lc,gp,wg_gp", [(7, 9, 9, 11), (13, 9, 4, 9), (20, 9, 3, 6), (36, 20, 1, 3),
                                             (64, 36, 1, 2)],
                         ids=["Lq7", "Lq13", "Lq20", "Lq36", "Lq64"])
@pytest.mark.parametrize("with_state,with_weight,wgmma", [(*c, False) for c in ATT_CASES] + [(False, True, True),
                                                                                               (True, True, True)],
                         ids=ATT_IDS + ["E,F=1,wgmma", "E,F,lam,wgmma"])
def test_tensor_core_forward_groups(emu, with_state, with_weight, wgmma, Lq, Lc, gp, wg_gp, dtype):
    """attention_fwd_tc_kernel on the grid: P = 11 query items (mixed lengths, 1 and Lq among
    them) against B = 2 context items (one of length 1), GP = 64 // Lq packed pairs per block
    (their Lq rows back to back: pair boundaries inside a 16-row tile; Lq 7: 9 pairs, more than
    the block's 8 warps) with a partial last block per item, d = 40 (two chunks of 32, the second
    partial), s = 24. wgmma: as launched on an sm_90a build: attention_fwd_wg_kernel, GP = 128 //
    Lq pairs (at most P = 11) in 128 rows, each item's 11 pairs in one block (pair boundaries
    inside and across the two warpgroups' 64 rows)."""
    lens = _mixed_lengths(11, Lq, Lq)
    args = _sample(dtype, seed=3 + Lq + with_state, with_state=with_state, with_weight=with_weight, P=11, Lq=Lq,
                   Lc=Lc, d=40, s=24, qlens=lens)
    out, used = emu_attention(emu, args, wgmma=wgmma)
    assert used // 1000 == (wg_gp if wgmma else gp), used
    assert (used % 1000 == 8) == wgmma, used
    _check(out, _ref(args), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("with_state", [False, True], ids=["F=1", "F,lam"])
def test_tensor_core_forward_paired(emu, with_state, dtype):
    """The paired form: pair p takes context item context_index[p] (unsorted, repeated), one pair
    per block; the output has one item on the context side."""
    args = _sample(dtype, seed=21 + with_state, with_state=False, with_weight=True, P=7, Lq=12, Lc=9, d=40, s=24,
                   qlens=_mixed_lengths(7, 12, 4))
    if with_state:   # per pair: factors (1, P, Lq, d) and lam (1, P, Lq), NaN in padded rows
        g = torch.Generator().manual_seed(5)
        f = torch.rand(1, 7, 12, 40, generator=g) * 2 - 1
        lam = torch.rand(1, 7, 12, generator=g) * 8 + 1
        for p, n in enumerate(args[1].tolist()):
            f[:, p, n:] = float("nan")
            lam[:, p, n:] = float("nan")
        args[4], args[5] = f.to(dtype), lam.to(dtype)
    cidx = torch.tensor([1, 0, 1, 1, 0, 1, 0])
    out, used = emu_attention(emu, args, context_index=cidx)
    assert used // 1000 == 1, used
    _check(out, _ref(args, cidx), dtype)


@pytest.mark.parametrize("wgmma", [False, True], ids=["wmma", "wgmma"])
@pytest.mark.parametrize("Lq,gp,wg_gp", [(1, 64, 70), (3, 21, 42)], ids=["Lq1", "Lq3"])
def test_packed_blocks_up_to_64_pairs(emu, Lq, gp, wg_gp, wgmma):
    """The most pairs a packed block takes (plan.h kTcMaxGP = 64: 64 pairs of one row; 21 of 3):
    P = 70 query items against B = 2 (a full block and a partial one per item), fp16, the
    attention forward with F, lam and the projection, and two RAR steps with dropout: every pair's
    length, norms, softmax and output from its own entry of the block's pair table (wgmma: as on
    an sm_90a build, attention_fwd_wg_kernel's 128-row blocks: 70 pairs of one row, 42 of 3)."""
    P = 70
    lens = _mixed_lengths(P, Lq, 40 + Lq)
    args = _sample(torch.float16, seed=60 + Lq, with_state=True, with_weight=True, P=P, Lq=Lq, Lc=9, d=40, s=24,
                   qlens=lens)
    out, used = emu_attention(emu, args, wgmma=wgmma)
    assert used // 1000 == (wg_gp if wgmma else gp), used
    _check(out, _ref(args), torch.float16)
    rargs = _rar_sample(torch.float16, seed=70 + Lq, T=1, dropout=True, h_given=False, P=P, Lq=Lq, s=40, qlens=lens)
    h, used = emu_rar(emu, rargs)
    assert all(u // 1000 == gp for u in used), used
    want = ref_rar(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in rargs])
    assert not torch.isnan(h).any()
    torch.testing.assert_close(h.double(), want, **TOL[torch.float16])


#: (Lq, Lc, P, d, s, GP) of attention_fwd_wg_kernel's cases (tests/test_gpu.py runs them on a GPU)
WG_CASES = [(12, 9, 23, 72, 100, 10), (20, 20, 13, 45, 256, 6), (9, 36, 16, 104, 24, 14), (30, 64, 5, 40, 200, 4),
            (1, 33, 130, 40, 24, 128)]
WG_IDS = ["BC16,d72,s100", "BC32,d45,s256", "BC48,d104", "BC64,s200", "Lq1,128 pairs"]


def wg_case_args(dtype, Lq, Lc, P, d, s, with_state):
    """The attention op's arguments of one WG_CASES case (NaN in every padded row and column)."""
    return _sample(dtype, seed=80 + Lq + Lc + with_state, with_state=with_state, with_weight=True, P=P, Lq=Lq,
                   Lc=Lc, d=d, s=s, qlens=_mixed_lengths(P, Lq, 7 * Lq + Lc))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("with_state", [False, True], ids=["F=1", "F,lam"])
@pytest.mark.parametrize("Lq,Lc,P,d,s,gp", WG_CASES, ids=WG_IDS)
def test_wgmma_forward_128_row_blocks(emu, Lq, Lc, P, d, s, gp, with_state, dtype):
    """attention_fwd_wg_kernel (as launched on an sm_90a build): every width of the scores' wgmma
    (BC 16, 32, 48, 64: context lengths 9, 20, 36, 64 and 33), d not a multiple of the 32-column
    chunk (72, 104: a partial last chunk; 45: not a multiple of 8 either, so W is staged element
    by element, not in 16-byte loads), s below, at and far below the projection's 256 columns,
    P not a multiple of GP (a partial last block per context item, Lq 30: 4 pairs in 120 rows and
    one in 30), 128 pairs of one row (plan.h kWgMaxGP), NaN in every padded row and column, the
    second context item of length 1. The inputs end right before an inaccessible page."""
    args = wg_case_args(dtype, Lq, Lc, P, d, s, with_state)
    out, used = emu_attention(emu, args, wgmma=True, guarded=True)
    assert used == 1000 * gp + 8, used
    _check(out, _ref(args), dtype)


@pytest.mark.parametrize("case,plan", [("attended", 5004), ("paired", 1001), ("64 rows", 5004), ("48 rows", 4003),
                                       ("s 300", 5004)])
def test_wgmma_forward_where_the_128_row_kernel_does_not_apply(emu, case, plan):
    """On an sm_90a build, the shapes plan.h choose_wg_plan leaves to attention_fwd_tc_kernel
    (checked by the plan the launch took, and against the reference): no projection, one pair a
    block (paired), blocks of 64 rows or fewer (5 pairs of 12 rows: the 64-row block's
    projection on wgmma; 4 pairs: 48 rows, wmma), s above 256 (the 64-row block's projection on
    wgmma, two 256-column passes)."""
    P = {"64 rows": 5, "48 rows": 4}.get(case, 11)
    args = _sample(torch.float16, seed=90, with_state=True, with_weight=case != "attended", P=P, Lq=12, Lc=9, d=40,
                   s=300 if case == "s 300" else 24, qlens=_mixed_lengths(P, 12, 5))
    cidx = torch.tensor([1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 0]) if case == "paired" else None
    if cidx is not None:   # per pair: factors and lam of the output's one context row
        args[4], args[5] = args[4][:1], args[5][:1]
    out, used = emu_attention(emu, args, context_index=cidx, wgmma=True)
    assert used == plan, used
    _check(out, _ref(args, cidx), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16 (tensor cores)", "fp32 (per pair)"])
def test_forward_with_strided_inputs(emu, dtype):
    """The launchers pass the tensors' own strides: query and context as slices of wider rows,
    factors a slice of a larger tensor, lam a transposed view. The forward reads through them."""
    args = _sample(dtype, seed=12, with_state=True, with_weight=True, P=6, Lq=10, Lc=9, d=40, s=24,
                   qlens=_mixed_lengths(6, 10, 7))
    q, ql, c, cl, f, lam = args[:6]
    g = torch.Generator().manual_seed(1)
    wide = lambda t: torch.cat([t, torch.randn(*t.shape[:-1], 8, generator=g).to(t.dtype)], -1)[..., :t.shape[-1]]
    sargs = list(args)
    sargs[0], sargs[2], sargs[4] = wide(q), wide(c), wide(f)
    sargs[5] = lam.transpose(0, 1).contiguous().transpose(0, 1)
    assert not sargs[0].is_contiguous() and not sargs[5].is_contiguous()
    out, used = emu_attention(emu, sargs, strided=True)
    assert (used >= 1000) == (dtype == torch.float16), used
    _check(out, _ref(args), dtype)


@pytest.mark.parametrize("with_weight", [False, True], ids=["A", "E"])
@pytest.mark.parametrize("Lq,Lc,mt", [(8, 9, 1), (6, 40, 1), (8, 64, 1), (12, 20, 2), (12, 64, 2), (16, 33, 2),
                                      (24, 64, 3), (32, 49, 4)],
                         ids=["MT1,1 col tile", "MT1,3", "MT1,4", "MT2,2", "MT2,4", "MT2,3", "MT3,4", "MT4,4"])
def test_tensor_core_forward_tile_shares(emu, with_weight, Lq, Lc, mt):
    """Every split of the products over the warps (attention_kernels.cuh TcScoreTiles, TcPC,
    TcProjection): 2 pairs of one block give 16 MT rows with MT 1 to 4 and 1 to 4 column tiles of
    the scores, so a row tile's columns go to 4, 2 or 1 warps of each half (some with none, some
    with two); s = 100 spreads the projection over two warps of each half. fp16, F and lam."""
    args = _sample(torch.float16, seed=40 + Lq + Lc, with_state=True, with_weight=with_weight, P=2, Lq=Lq, Lc=Lc,
                   d=40, s=100, qlens=[Lq, Lq - 3])
    out, used = emu_attention(emu, args)
    assert used == 2000 + mt, used
    _check(out, _ref(args), torch.float16)


@pytest.mark.parametrize("wgmma", [False, True], ids=["wmma", "wgmma"])
def test_tensor_core_forward_wide_projection(emu, wgmma):
    """s = 300: the projection's 256-column passes run twice, the second partly empty; d = 72:
    three chunks of 32. wgmma: a 64-row block (50 rows used) as on an sm_90a build."""
    args = _sample(torch.float16, seed=8, with_state=True, with_weight=True, P=5, Lq=10, Lc=9, d=72, s=300,
                   qlens=_mixed_lengths(5, 10, 2))
    out, used = emu_attention(emu, args, wgmma=wgmma)
    assert used // 1000 == 5, used   # 64 // 10 = 6 pairs a block, at most P = 5
    _check(out, _ref(args), torch.float16)


def test_tensor_core_forward_fewer_pairs_when_memory_is_short(emu):
    """With a smaller shared-memory limit the plan lowers GP: 6 pairs of 10 rows (64 rows) do not
    fit, nor 5 (50 rows, still 64), 4 do (40 rows: 48)."""
    args = _sample(torch.float16, seed=9, with_state=False, with_weight=True, P=6, Lq=10, Lc=9, d=40, s=300,
                   qlens=_mixed_lengths(6, 10, 3))
    full, used_full = emu_attention(emu, args, limit=H200_SMEM)
    small, used_small = emu_attention(emu, args, limit=140_000)
    assert used_full == 6004 and used_small == 4003, (used_full, used_small)
    _check(small, _ref(args), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("with_state,with_weight", ATT_CASES, ids=ATT_IDS)
def test_per_pair_forward(emu, with_state, with_weight, dtype):
    """attention_fwd_kernel: fp32 (always; exact products) and fp16 past 64 rows (Lq = 70)."""
    Lq = 70 if dtype == torch.float16 else 12
    args = _sample(dtype, seed=31 + with_state, with_state=with_state, with_weight=with_weight, P=3, Lq=Lq, Lc=9,
                   d=40, s=24, qlens=_mixed_lengths(3, Lq, 6))
    out, used = emu_attention(emu, args)
    assert 1 <= used < 1000, used
    _check(out, _ref(args), dtype)


def sqdiff_is_tensor_core(dtype, Lq, Lc) -> bool:
    """Whether attention_bwd_cuda takes the backward's (Q - A)^2 from attention_fwd_tc_kernel
    (fp16/bf16, Lq and Lc <= 64: in the inputs' dtype) or from attention_fwd_kernel (fp32)."""
    return dtype != torch.float32 and Lq <= 64 and Lc <= 64


def emu_attention_grads(emu, args, grad, chunk=None, context_index=None, limit=H200_SMEM):
    """attention_bwd as attention_bwd_cuda computes it: without a weight the backward kernel on the
    output's gradient, all pairs at once; with one, per chunk of pairs (plan.h bwd_chunk_end; all
    pairs where chunk is None) the forward's (Q - A)^2 (kModeSquaredDiff: attention_fwd_tc_kernel
    in the inputs' dtype where sqdiff_is_tensor_core, checked to have run, else attention_fwd_kernel
    in fp32), Y = D2 W^T + b, l2n_bwd_rows_kernel's dY, dW += dY^T D2, db += sum dY and G2 = dY W
    (torch here, cuBLAS there: fp32 products in fp32; in fp16/bf16 D2 and dY in the inputs' dtype,
    fp32 sums), then the backward kernel on G2. The backward kernel: attention_bwd_tc_kernel in
    fp16/bf16 where plan.h choose_bwd_tc_plan takes the shapes, else attention_bwd_kernel per pair.
    context_index: the paired form (pair p against item context_index[p]; the per-pair tensors
    then have one item on the context side).
    Returns ((dquery, dcontext, dfactors, dlam, dweight, dbias), None where absent; the backward
    kernel's plans, 1000 GP + MT each, 0 for the per-pair kernel)."""
    q, ql, c, cl, f, lam, lam_scalar, w, b = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
    P, Lq, D = q.shape
    B, Lc = c.shape[:2]
    cidx = None if context_index is None else context_index.to(torch.int32).contiguous()
    Bo = 1 if cidx is not None else B
    pairs, dt = Bo * P, DTYPES[q.dtype]
    gram = torch.full((B, Lc, Lc), float("nan"))
    emu.emu_gram(dt, _ptr(c), _ptr(cl), B, Lc, D, c.stride(0), c.stride(1), _ptr(gram))
    dq, dc = torch.zeros(P, Lq, D), torch.zeros(B, Lc, D)
    df = None if f is None else torch.full((Bo, P, Lq, D), float("nan"))
    dlam = None if lam is None else torch.full((Bo, P, Lq), float("nan"))
    common = [_ptr(q), _ptr(ql), _ptr(c), _ptr(cl), _ptr(cidx), _ptr(f), _ptr(lam), lam_scalar]
    outs = [_ptr(dq), _ptr(dc), _ptr(df), _ptr(dlam)]
    dw = db = None
    plans = []
    if w is None:
        plans.append(emu.emu_attention_bwd(dt, MODE_ATTENDED, *common, None, _ptr(gram), B, P, Lq, Lc, D, 0, 0, pairs,
                                           limit, _ptr(grad.contiguous()), *outs))
        return (dq, dc, df, dlam, dw, db), plans
    S = w.shape[0]
    Wf = w.float()
    half = q.dtype != torch.float32
    rounded = (lambda x: x.to(q.dtype).float()) if half else (lambda x: x)   # as rounded operands
    tc = sqdiff_is_tensor_core(q.dtype, Lq, Lc)
    db, dw = torch.zeros(S), torch.zeros(S, D)
    gflat = grad.contiguous()
    pid0 = 0
    while pid0 < pairs:
        pid1 = emu.emu_bwd_chunk_end(pid0, chunk or pairs, pairs, P)
        n = pid1 - pid0
        d2 = torch.full((n * Lq, D), float("nan"), dtype=q.dtype if tc else torch.float32)
        used = emu.emu_attention_sqdiff_chunk(dt, *common, _ptr(gram), B, P, Lq, Lc, D, pid0, pid1, limit, _ptr(d2))
        assert (used > 0) == tc, used
        d2r = rounded(d2.float())
        Y = torch.addmm(b.float(), d2r, Wf.t()).contiguous()
        dy = torch.full((n * Lq, S), float("nan"))
        emu.emu_l2n_bwd_rows(dt, _ptr(Y), _ptr(gflat), _ptr(ql), pid0, n * Lq, P, Lq, S, _ptr(dy))
        dyr = rounded(dy)
        db += dy.sum(0)
        dw += dyr.t() @ d2r
        g2 = (dyr @ Wf).contiguous()
        plans.append(emu.emu_attention_bwd(dt, MODE_ALIGNMENT, *common, _ptr(w), _ptr(gram), B, P, Lq, Lc, D, S, pid0,
                                           n, limit, _ptr(g2), *outs))
        pid0 = pid1
    return (dq, dc, df, dlam, dw, db), plans


def bwd_is_tensor_core(dtype, Lq, Lc) -> bool:
    """Whether attention_bwd_cuda runs attention_bwd_tc_kernel (fp16/bf16, Lq and Lc <= 64, a
    block that fits the H200's shared memory) or attention_bwd_kernel per pair."""
    return dtype != torch.float32 and Lq <= 64 and Lc <= 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("with_state,with_weight", ATT_CASES, ids=ATT_IDS)
def test_attention_backward(emu, with_state, with_weight, dtype):
    """attention_bwd_kernel (and, with a weight, the kModeSquaredDiff forward and
    l2n_bwd_rows_kernel): every gradient of sum(grad * out) against the fp64 reference's autograd
    on the same (rounded) inputs; padded rows of dquery, dfactors and dlam exactly zero."""
    args = _sample(dtype, seed=41 + with_state + 2 * with_weight, with_state=with_state, with_weight=with_weight,
                   P=4, Lq=7, Lc=9, d=40, s=24, qlens=_mixed_lengths(4, 7, 8))
    q, ql, c, cl, f, lam = args[:6]
    B, P, Lq = c.shape[0], q.shape[0], q.shape[1]
    width = q.shape[2] if args[7] is None else args[7].shape[0]
    grad = torch.randn(B, P, Lq, width, generator=torch.Generator().manual_seed(3)).to(dtype)
    got, plans = emu_attention_grads(emu, args, grad)
    assert all((u > 0) == bwd_is_tensor_core(dtype, Lq, c.shape[1]) for u in plans), plans
    _check_grads(args, grad, got, dtype)


#: the CUDA backwards' gradients against the fp64 reference (the attention's and RAR's; bf16 as
#: fp16: tests/test_cuda_emu_fuzz.py's random bf16 RAR problems stay within it)
GRAD_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=2e-2, atol=2e-2),
            torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def ref_grads(args, grad, context_index=None):
    """{the argument's position (0, 2, 4, 5, 7, 8, where given): the fp64 reference's gradient of
    sum(grad * out) (None where it does not depend on it)} on the same (rounded) inputs (paired:
    _ref's per-pair form)."""
    leaves = [a.double().detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
              for a in args]
    out = _ref(leaves, context_index)
    floats = [i for i in (0, 2, 4, 5, 7, 8) if leaves[i] is not None]
    return dict(zip(floats, torch.autograd.grad((out * grad.double()).sum(), [leaves[i] for i in floats],
                                                allow_unused=True)))


def _check_grads(args, grad, got, dtype, context_index=None, skip=None, slack=None):
    """Every gradient of sum(grad * out) (got: emu_attention_grads') against the fp64 reference's
    autograd on the same (rounded) inputs (paired: _ref's per-pair form); padded rows of dquery,
    dfactors and dlam exactly zero; nothing left unwritten (NaN). skip: {the argument's position
    (0 query, 2 context, 4 factors): a mask of its gradient's elements not compared with the
    reference} (tests/test_cuda_emu_fuzz.py: kink_masks); slack: {the argument's position: a
    tensor of its gradient's shape}, an element within it of the reference passes (the fuzz's
    conditioning_slack), the rest are compared at the usual tolerance."""
    q, ql, c, cl, f, lam = args[:6]
    Lq = q.shape[1]
    want = ref_grads(args, grad, context_index)
    tol = GRAD_TOL[dtype]
    for i, g in zip((0, 2, 4, 5, 7, 8), got):
        if i not in want:
            assert g is None
            continue
        assert not torch.isnan(g).any(), i
        w = torch.zeros_like(g, dtype=torch.float64) if want[i] is None else torch.nan_to_num(want[i])
        gd = g.double()
        if skip is not None and skip.get(i) is not None:
            gd = torch.where(skip[i], w, gd)
        if slack is not None and slack.get(i) is not None:
            gd = torch.where((gd - w).abs() <= slack[i], w, gd)
        torch.testing.assert_close(gd, w, **tol)
    pad = torch.arange(Lq)[None, :] >= ql[:, None].long()
    assert not got[0][pad].any()
    if f is not None:
        assert not got[2][:, pad].any() and not got[3][:, pad].any()


@pytest.mark.parametrize("form", ["grid", "paired", "chunks"])
@pytest.mark.parametrize("with_state,with_weight", ATT_CASES, ids=ATT_IDS)
def test_tensor_core_backward(emu, with_state, with_weight, form):
    """attention_bwd_tc_kernel (fp16) on blocks of several packed pairs: P = 11 query items of up
    to Lq = 6 rows (GP 10, 64-row blocks (MT 4): two blocks an item, the second one pair), Lc = 37
    context rows (bc 48: three column tiles of the scores, dP and the dC chunk) on item 0 and 1 row
    on item 1, d = 72 (three chunks, the last partial); paired (context_index: one pair a block,
    MT 1); chunks of 4 pairs with a weight (parts of an item: the chunk's G2 and outputs offset to
    it; without a weight all pairs at once) - every gradient against the fp64 reference's autograd.
    The plan each launch took is checked."""
    P, Lq, Lc = 11, 6, 37
    args = _sample(torch.float16, seed=61 + with_state + 2 * with_weight, with_state=with_state,
                   with_weight=with_weight, P=P, Lq=Lq, Lc=Lc, d=72, s=24, qlens=_mixed_lengths(P, Lq, 12))
    cidx = torch.tensor([0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0]) if form == "paired" else None
    if cidx is not None and with_state:
        args[4], args[5] = args[4][:1].contiguous(), args[5][:1].contiguous()
    Bo = 1 if cidx is not None else 2
    width = 72 if args[7] is None else args[7].shape[0]
    grad = torch.randn(Bo, P, Lq, width, generator=torch.Generator().manual_seed(5)).to(torch.float16)
    chunk = 4 if form == "chunks" else None
    got, plans = emu_attention_grads(emu, args, grad, chunk=chunk, context_index=cidx)
    if form == "grid":
        want = [10004]
    elif form == "paired":
        want = [1001]
    else:
        want = [4002, 4002, 3002] * 2 if with_weight else [10004]
    assert plans == want, plans
    _check_grads(args, grad, got, torch.float16, cidx)


@pytest.mark.parametrize("paired", [False, True], ids=["grid", "paired"])
@pytest.mark.parametrize("chunk", [2, 3, 5, 7, 20], ids=lambda c: f"chunk{c}")
def test_backward_sqdiff_chunks(emu, chunk, paired):
    """The backward's (Q - A)^2 from attention_fwd_tc_kernel (kModeSquaredDiff, fp16) in the chunks
    attention_bwd_cuda takes (plan.h bwd_chunk_end / bwd_chunk_rect; B = 2 items, P = 5 pairs each):
    chunks of 2 and 3 are parts of one context item (pairs p0 .. of item b0, the last part shorter),
    5 one whole item, 7 one item (whole items only), 20 all of them; paired (B = 1 on the output's
    side) parts of the one row of pairs. Each chunk's rows equal the one-call rows of its pairs exactly, and
    those equal the per-pair kernel's fp32 (Q - A)^2 within fp16 rounding; padded rows zero
    (finite, for dW = dY^T D2). The chunks tile the pairs in order."""
    B, P, Lq, Lc, D = 2, 5, 6, 9, 40
    args = _sample(torch.float16, seed=51 + paired, with_state=True, with_weight=True, B=B, P=P, Lq=Lq, Lc=Lc, d=D,
                   s=24, qlens=_mixed_lengths(P, Lq, 9))
    q, ql, c, cl, f, lam, lam_scalar = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args[:7]]
    cidx = None
    if paired:   # pair p against item context_index[p]; the per-pair tensors have one item on the context side
        cidx = torch.tensor([1, 0, 1, 1, 0], dtype=torch.int32)
        f, lam = f[:1].contiguous(), lam[:1].contiguous()
    Bo = 1 if paired else B
    pairs, dt = Bo * P, DTYPES[torch.float16]
    gram = torch.full((B, Lc, Lc), float("nan"))
    emu.emu_gram(dt, _ptr(c), _ptr(cl), B, Lc, D, c.stride(0), c.stride(1), _ptr(gram))
    common = [_ptr(q), _ptr(ql), _ptr(c), _ptr(cl), _ptr(cidx), _ptr(f), _ptr(lam), lam_scalar, _ptr(gram),
              B, P, Lq, Lc, D]
    whole = torch.full((pairs * Lq, D), float("nan"), dtype=torch.float16)
    assert emu.emu_attention_sqdiff_chunk(dt, *common, 0, pairs, H200_SMEM, _ptr(whole)) > 0
    simt = torch.full((pairs * Lq, D), float("nan"))
    emu.emu_attention_sqdiff(dt, *common, 0, pairs, _ptr(simt))
    pad = (torch.arange(Lq)[None, :] >= ql[:, None].long()).repeat(Bo, 1).reshape(-1)
    if paired:
        pad |= (cl[cidx.long()] == 0).repeat_interleave(Lq)
    assert not whole.isnan().any() and (whole[pad] == 0).all()
    torch.testing.assert_close(whole.float(), simt, **TOL[torch.float16])
    ends, pid0 = [], 0
    while pid0 < pairs:
        pid1 = emu.emu_bwd_chunk_end(pid0, chunk, pairs, P)
        assert pid0 < pid1 <= pairs and (pid1 - pid0 <= chunk or chunk < 1)
        if chunk < P:
            assert pid0 // P == (pid1 - 1) // P          # inside one context item
        elif pid1 < pairs:
            assert pid1 % P == 0                          # whole items
        part = torch.full(((pid1 - pid0) * Lq, D), float("nan"), dtype=torch.float16)
        assert emu.emu_attention_sqdiff_chunk(dt, *common, pid0, pid1, H200_SMEM, _ptr(part)) > 0
        assert torch.equal(part, whole[pid0 * Lq:pid1 * Lq]), (pid0, pid1)
        ends.append(pid1)
        pid0 = pid1
    per_item = -(-P // chunk) if chunk < P else 1
    assert len(ends) == (per_item * Bo if chunk < P else -(-Bo // (chunk // P)))


# ----------------------------------------------------------------------------- RAR

def emu_rar(emu, args, limit=H200_SMEM, wgmma=False, guarded=False, score=None):
    """The rar op as rar_cuda computes it: h in E's dtype (rar_mean_kernel's mean of E over the
    valid rows at the start), each step's gate pre-activations h Wq^T + bq in E's dtype on the host
    (torch here, cuBLAS there), rar_fwd_kernel per step (the gates' tanh, keep_g and wv in it).
    wgmma: as on an sm_90a build (rar_fwd_wg_kernel where plan.h choose_rar_wg_plan takes the
    shapes: checked to have run wgmma exactly when the plan says MT 8). guarded: E and Wk end
    right before an inaccessible page (_Guarded). score (w (s,), b (1,), float32): the last step
    writes the scores sigmoid(w . h + b) (B, P) float32 instead of h (rar_fwd_wg_kernel only).
    Returns (h in E's dtype, or the scores; the plans used)."""
    emu.emu_set_wgmma(int(wgmma))
    emu.emu_wgmma_ops()
    try:
        h, used = _emu_rar(emu, args, limit, guarded, score)
    finally:
        emu.emu_set_wgmma(0)
    ran = emu.emu_wgmma_ops()
    assert (ran > 0) == any(u % 1000 == 8 for u in used), (used, ran)
    assert wgmma or not any(u % 1000 == 8 for u in used), used
    return h, used


def _emu_rar(emu, args, limit, guarded, score=None):
    E, ql, h0, wq, bq, wk, bk, wv, bv, kk, kg = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
    if guarded:
        guard = _Guarded()
        E, wk = guard(E), guard(wk)
    B, P, Lq, S = E.shape
    if h0 is None:
        h = torch.full((B, P, S), float("nan"), dtype=E.dtype)
        emu.emu_rar_mean(DTYPES[E.dtype], _ptr(E), _ptr(ql), B, P, Lq, S, _ptr(h))
    else:
        h = h0.clone()
    used = []
    for t in range(wq.shape[0]):
        pre = torch.addmm(bq[t], h.reshape(-1, S), wq[t].T).contiguous()
        last = score is not None and t == wq.shape[0] - 1
        h_next = torch.full((B, P) if last else (B, P, S), float("nan"),
                            dtype=torch.float32 if last else E.dtype)
        sw, sb = score if last else (None, None)
        used.append(emu.emu_rar_step(DTYPES[E.dtype], _ptr(E), _ptr(ql), _ptr(wk), _ptr(bk), _ptr(bv), _ptr(wv),
                                     _ptr(kk), _ptr(kg), B, P, Lq, S, t, _ptr(pre), limit,
                                     None if last else _ptr(h_next), _ptr(sw), _ptr(sb), _ptr(h_next) if last else None))
        h = h_next
    return h, used


@pytest.mark.parametrize("wgmma,P", [(False, 11), (True, 23)], ids=["P11", "wgmma,P23"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_rar_steps_in_one_call_equal_one_step_calls(emu, dtype, wgmma, P):
    """rar_cuda's schedule (emu_rar: h in E's dtype between steps, each step's gate pre-activations
    one GEMM in it, their tanh in the kernel): T = 3 steps in one call equal three calls of one
    step, bit for bit, as training's per-step calls and the backward's recompute need; and close
    to the reference. wgmma: P = 23 pairs of 5 rows, rar_fwd_wg_kernel's 115-row blocks."""
    args = _rar_sample(dtype, seed=21, T=3, dropout=False, h_given=False, P=P, Lq=5, s=32,
                       qlens=_mixed_lengths(P, 5, 5))
    step_plans = []

    def run(*a):
        h, used = emu_rar(emu, a, wgmma=wgmma)
        step_plans.extend(used)
        return h
    whole, h = rar_in_one_call_and_in_step_calls(run, args)
    assert all((u % 1000 == 8) == wgmma for u in step_plans), step_plans
    assert whole.dtype == dtype
    torch.testing.assert_close(whole, h, rtol=0, atol=0)
    up = [a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    torch.testing.assert_close(whole.double(), ref_rar(*up), **RAR_STEPS_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("T,dropout,h_given", [(1, False, False), (2, False, True), (3, False, False),
                                               (1, True, False), (1, True, True)],
                         ids=["T1", "T2,h0", "T3", "T1,drop", "T1,drop,h0"])
@pytest.mark.parametrize("Lq,gp", [(7, 9), (20, 3), (70, 1)], ids=["Lq7", "Lq20", "rows70"])
def test_rar_forward(emu, Lq, gp, T, dropout, h_given, dtype):
    """rar_fwd_kernel: P = 11 query items of mixed lengths against B = 2, GP = 64 // Lq packed
    pairs per block (a partial last one; Lq 7: 9 pairs, more than the block's 8 warps, so a warp
    takes a second pair's softmax), s = 40 (two chunks of 32); 70 rows: one pair, two GEMM row
    groups."""
    args = _rar_sample(dtype, seed=Lq + T + 2 * dropout, T=T, dropout=dropout, h_given=h_given, P=11, Lq=Lq, s=40,
                       qlens=_mixed_lengths(11, Lq, 9))
    out, used = emu_rar(emu, args)
    assert all(u // 1000 == gp for u in used), used
    want = ref_rar(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), want, **TOL[dtype])


#: (Lq, P, s, GP) of rar_fwd_wg_kernel's cases, and (T, dropout, h given) (tests/test_gpu.py runs them on a GPU)
RAR_WG_CASES = [(7, 23, 40, 18), (20, 13, 256, 6), (36, 5, 100, 3), (70, 3, 45, 1), (1, 130, 24, 128)]
RAR_WG_IDS = ["Lq7,s40", "Lq20,s256", "Lq36,s100", "rows70,s45", "Lq1,128 pairs"]
RAR_WG_STEPS = [(1, False, False), (2, False, True), (1, True, False)]


def rar_wg_case_args(dtype, Lq, P, s, T, dropout, h_given):
    """The rar op's arguments of one RAR_WG_CASES x RAR_WG_STEPS case (NaN in the padded rows)."""
    return _rar_sample(dtype, seed=100 + Lq + T + 2 * dropout, T=T, dropout=dropout, h_given=h_given, P=P, Lq=Lq,
                       s=s, qlens=_mixed_lengths(P, Lq, 3 * Lq + s))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("T,dropout,h_given", RAR_WG_STEPS, ids=["T1", "T2,h0", "T1,drop"])
@pytest.mark.parametrize("Lq,P,s,gp", RAR_WG_CASES, ids=RAR_WG_IDS)
def test_rar_forward_128_row_blocks(emu, Lq, P, s, gp, T, dropout, h_given, dtype):
    """rar_fwd_wg_kernel (as launched on an sm_90a build): GP = 128 // Lq packed pairs in 128 rows
    (pair boundaries inside and across the two warpgroups' 64 rows), a partial last block per
    context item, s below, at and far below the keys' 256 columns (40, 100: a partial last 32-column
    chunk of K; 45: not a multiple of 8 either, E and Wk staged element by element), 128 pairs of
    one row (plan.h kWgMaxGP), one pair of 70 rows, dropout masks, several steps, NaN in the
    padded rows of E and of the masks. E and Wk end right before an inaccessible page."""
    args = rar_wg_case_args(dtype, Lq, P, s, T, dropout, h_given)
    out, used = emu_rar(emu, args, wgmma=True, guarded=True)
    assert used == [1000 * gp + 8] * T, used
    want = ref_rar(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("T,h_given", [(1, False), (2, True)], ids=["T1", "T2,h0"])
@pytest.mark.parametrize("Lq,P,s,gp", RAR_WG_CASES, ids=RAR_WG_IDS)
def test_rar_scores_128_row_blocks(emu, Lq, P, s, gp, T, h_given, dtype):
    """rar_fwd_wg_kernel's last step with the scoring layer (the rar_scores op's CUDA kernel, as on
    an sm_90a build): each pair's sigmoid(w . h + b) in float32 from h rounded to E's dtype, h never
    stored; equal (to fp32 summation order) to the same steps' h then the layer in torch, and close
    to the reference's."""
    args = rar_wg_case_args(dtype, Lq, P, s, T, False, h_given)
    g = torch.Generator().manual_seed(3 + s)
    sw, sb = torch.randn(s, generator=g) * 0.5, torch.randn(1, generator=g)
    got, used = emu_rar(emu, args, wgmma=True, score=(sw, sb))
    assert used == [1000 * gp + 8] * T and got.dtype == torch.float32 and got.shape == args[0].shape[:2], used
    h, _ = emu_rar(emu, args, wgmma=True)
    torch.testing.assert_close(got, torch.sigmoid(h.float() @ sw + sb), rtol=0, atol=1e-6)
    want = ref_rar(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
    torch.testing.assert_close(got.double(), torch.sigmoid(want @ sw.double() + sb.double()), **TOL[dtype])


@pytest.mark.parametrize("case,plan", [("64 rows", 3004), ("s 300", 3004)])
def test_rar_forward_where_the_128_row_kernel_does_not_apply(emu, case, plan):
    """On an sm_90a build, what plan.h choose_rar_wg_plan leaves to rar_fwd_kernel: blocks of 64
    rows or fewer (3 pairs of 20 rows), s above 256."""
    P = 3 if case == "64 rows" else 11
    args = _rar_sample(torch.float16, seed=7, T=1, dropout=False, h_given=False, P=P, Lq=20,
                       s=300 if case == "s 300" else 40, qlens=_mixed_lengths(P, 20, 4))
    out, used = emu_rar(emu, args, wgmma=True)
    assert used == [plan], used
    want = ref_rar(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
    torch.testing.assert_close(out.double(), want, **TOL[torch.float16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
@pytest.mark.parametrize("Lq", [5, 20], ids=["MT1", "MT2"])
def test_rar_backward(emu, Lq, dropout, dtype):
    """rar_bwd_kernel, one step as rar_bwd_cuda runs it (the shared-weight products on the host:
    dE += dKp Wk, dh = dgp Wq, dWk = sum dKp^T E, dbk = sum dKp, dWq = sum dgp^T h, dbq = sum dgp,
    dwv = sum dwv): every gradient against the fp64 reference's autograd on the same inputs."""
    args = _rar_sample(dtype, seed=50 + Lq + dropout, T=1, dropout=dropout, h_given=True, P=5, Lq=Lq, s=40,
                       qlens=_mixed_lengths(5, Lq, 2))
    assert emu_rar_bwd_check(emu, args, dtype, seed=6) == (1 if Lq <= 16 else 2)


def emu_rar_bwd_check(emu, args, dtype, seed):
    """One RAR step's backward as rar_bwd_cuda runs it (rar_bwd_kernel, then the shared-weight
    products on the host) on ``args`` (_rar_sample's, T = 1, h given) and a gradient of h drawn
    from ``seed``: every gradient checked against the fp64 reference's autograd (GRAD_TOL), none
    left unwritten. Returns the kernel's MT."""
    E, ql, h0, wq, bq, wk, bk, wv, bv, kk, kg = [a.contiguous() if isinstance(a, torch.Tensor) else a for a in args]
    B, P, _, S = E.shape
    grad = torch.randn(B, P, S, generator=torch.Generator().manual_seed(seed)).to(dtype)
    dE, dKp = torch.full(E.shape, float("nan")), torch.full(E.shape, float("nan"))
    dgp, dwv = torch.full((B, P, S), float("nan")), torch.full((B, P, S), float("nan"))
    used = emu.emu_rar_bwd(DTYPES[dtype], _ptr(grad), _ptr(E), _ptr(ql), _ptr(h0), _ptr(wq), _ptr(bq), _ptr(wk),
                           _ptr(bk), _ptr(wv), _ptr(bv), _ptr(kk), _ptr(kg), B, P, E.shape[2], S, H200_SMEM,
                           _ptr(dE), _ptr(dKp), _ptr(dgp), _ptr(dwv))
    Ef, hf = torch.nan_to_num(E.float()), h0.float()
    dE = dE + (dKp.reshape(-1, S) @ wk[0].float()).view(E.shape)
    got = {"E": dE, "h0": (dgp.reshape(-1, S) @ wq[0].float()).view(B, P, S),
           "wk": (dKp.reshape(-1, S).t() @ Ef.reshape(-1, S))[None], "bk": dKp.sum((0, 1, 2))[None],
           "wq": (dgp.reshape(-1, S).t() @ hf.reshape(-1, S))[None], "bq": dgp.sum((0, 1))[None],
           "wv": dwv.sum((0, 1))[None]}
    names = ("E", None, "h0", "wq", "bq", "wk", "bk", "wv", "bv", None, None)
    leaves = [a.double().requires_grad_() if n is not None else (a.double() if isinstance(a, torch.Tensor)
              and a.is_floating_point() else a) for a, n in zip(args, names)]
    out = ref_rar(*leaves)
    keys = [n for n in names if n is not None]
    want = dict(zip(keys, torch.autograd.grad((out * grad.double()).sum(), [leaves[names.index(k)] for k in keys],
                                              allow_unused=True)))
    tol = GRAD_TOL[dtype]
    for k, g in got.items():
        assert not torch.isnan(g).any(), k
        torch.testing.assert_close(g.double(), torch.nan_to_num(want[k]), **tol, msg=k)
    return used


# ----------------------------------------------------------------------------- RCR

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("has_f", [False, True], ids=["F=1", "F"])
def test_rcr_factors(emu, has_f, dtype):
    """rcr_factors_kernel over (B = 2, P = 3, Lq = 5) rows x d = 300 on a grid of 4 blocks
    (grid-stride over rows, two column passes): clamp(tanh(M) + F, -1, 1), zero at padded rows
    whatever M and F hold there (NaN); a NaN in a valid row's M or F comes out NaN, as from torch's
    clamp (no silent -1 or 1)."""
    B, P, Lq, D = 2, 3, 5, 300
    g = torch.Generator().manual_seed(4)
    ql = torch.tensor([5, 1, 3], dtype=torch.int32)
    m = (torch.randn(B, P, Lq, D, generator=g) * 2).to(dtype)
    f = (torch.rand(B, P, Lq, D, generator=g) * 2 - 1).to(dtype) if has_f else None
    valid = (torch.arange(Lq)[None, :] < ql[:, None].long())[None, :, :, None]
    m[~valid.expand_as(m)] = float("nan")
    if f is not None:
        f[~valid.expand_as(f)] = float("nan")
        f[1, 2, 0, 9] = float("nan")              # a valid row's F
    m[0, 0, 1, 5] = m[1, 0, 4, 299] = float("nan")   # valid rows' M
    want = torch.where(valid, torch.clamp(torch.tanh(m.double()) + (1.0 if f is None else f.double()), -1, 1), 0.0)
    assert int(want.isnan().sum()) == 2 + (f is not None)
    out = m.clone()
    emu.emu_rcr_factors(DTYPES[dtype], _ptr(out), _ptr(f), _ptr(ql), B * P * Lq, P, Lq, D, 4)
    torch.testing.assert_close(out.double(), want, **TOL[dtype], equal_nan=True)


RCR_HIDDEN, RCR_FACTORS = 0, 1   # csrc/cuda/rcr_kernels.cuh kRcrHidden, kRcrFactors


class _Guarded:
    """Copies of tensors that each end right before an inaccessible page, so that a kernel reading
    or writing past a tensor's end dies of SIGSEGV (the test process with it) instead of touching a
    neighbour's bytes unseen. Keeps the mappings alive while it lives."""

    def __init__(self):
        self._keep = []

    def __call__(self, t):
        if t is None:
            return None
        import mmap
        page, nbytes = mmap.PAGESIZE, t.numel() * t.element_size()
        size = -(-nbytes // page) * page + page
        m = mmap.mmap(-1, size)
        buf = (ctypes.c_char * size).from_buffer(m)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        assert libc.mprotect(ctypes.addressof(buf) + size - page, page, 0) == 0, ctypes.get_errno()   # PROT_NONE
        g = torch.frombuffer(m, dtype=t.dtype, count=t.numel(), offset=size - page - nbytes).view(t.shape)
        g.copy_(t)
        self._keep += [m, buf]
        return g


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("epi,has_f", [(RCR_HIDDEN, False), (RCR_FACTORS, False), (RCR_FACTORS, True)],
                         ids=["hidden", "factors,F=1", "factors,F"])
@pytest.mark.parametrize("wgmma,K", [(0, 40), (1, 40), (1, 136), (1, 150)],
                         ids=["wmma", "wgmma,K40", "wgmma,K136", "wgmma,K150"])
def test_rcr_gemm(emu, epi, has_f, dtype, wgmma, K):
    """rcr_gemm_kernel (wmma) and rcr_wgmma_kernel (Hopper's wgmma, as the emulator models it from
    the PTX ISA) as rcr.cu launches them, over (B = 2, P = 3, Lq = 25) = 150 rows x N = 300 columns
    (two row blocks of 128, two column blocks of 256, each second one partial; every warp's, and
    every warpgroup's, share in the first block) x K: 40 (wmma: two chunks of 32, the second
    partial; wgmma: one partial chunk of 64), 136 (wgmma: three chunks, both buffers used and
    reused, the last 8 wide; 16-byte loads) and 150 (K not a multiple of 8: element loads, zeros
    past K). hidden tanh(A B^T + b); factors clamp(tanh(A B^T + b) + F, -1, 1), zero at padded
    rows whatever A and F hold there (NaN). A NaN in a valid row's A makes that row NaN, in a valid
    F that element, as torch's step. A, B, F and the output each end at an inaccessible page
    (_Guarded): the partial blocks read and write nothing past them."""
    B, P, Lq, N = 2, 3, 25, 300
    M = B * P * Lq
    g = torch.Generator().manual_seed(6 + epi + has_f)
    ql = torch.tensor([25, 1, 13], dtype=torch.int32)
    a = (torch.randn(B, P, Lq, K, generator=g) * 0.5).to(dtype)
    w = (torch.randn(N, K, generator=g) * 0.3).to(dtype)
    bias = (torch.randn(N, generator=g) * 0.5).to(dtype)
    f = (torch.rand(B, P, Lq, N, generator=g) * 2 - 1).to(dtype) if has_f else None
    valid = (torch.arange(Lq)[None, :] < ql[:, None].long())[None, :, :, None]
    if epi == RCR_FACTORS:
        a[~valid.expand_as(a)] = float("nan")
        if f is not None:
            f[~valid.expand_as(f)] = float("nan")
            f[1, 2, 3, 260] = float("nan")                 # a valid row's F, in the second column block
    a[1, 0, 20, 7] = float("nan")                          # a valid row's A (row 95 of the first block)
    y = torch.tanh(a.double() @ w.double().T + bias.double())
    if epi == RCR_HIDDEN:
        want = y
    else:
        want = torch.where(valid, torch.clamp(y + (1.0 if f is None else f.double()), -1, 1), 0.0)
    assert int(want.isnan().sum()) == N + (f is not None)
    guard = _Guarded()
    out = guard(torch.full((B, P, Lq, N), float("nan"), dtype=dtype))
    emu.emu_wgmma_ops()
    emu.emu_set_wgmma(wgmma)
    try:
        emu.emu_rcr_gemm(DTYPES[dtype], epi, _ptr(guard(a)), _ptr(guard(w)), _ptr(bias), _ptr(guard(f)), _ptr(ql), M,
                         N, K, P, Lq, _ptr(out))
    finally:
        emu.emu_set_wgmma(0)
    torch.testing.assert_close(out.double(), want, **TOL[dtype], equal_nan=True)
    assert (want.abs() == 1).any() or epi == RCR_HIDDEN    # the clamp is reached
    assert (emu.emu_wgmma_ops() > 0) == bool(wgmma)      # the kernel asked for ran


@pytest.mark.parametrize("has_f,want_df", [(False, True), (True, True), (True, False)], ids=["F=1", "F", "F,no dF"])
@pytest.mark.parametrize("dtype,wgmma,H", [(torch.float32, 0, 40), (torch.float16, 0, 40), (torch.bfloat16, 0, 40),
                                           (torch.float16, 1, 136), (torch.bfloat16, 1, 150)],
                         ids=["fp32", "fp16,wmma", "bf16,wmma", "fp16,wgmma,K136", "bf16,wgmma,K150"])
def test_rcr_factors_bwd(emu, dtype, wgmma, H, has_f, want_df):
    """The rcr_factors_bwd op's kernels as rcr.cu launches them (the d-wide chain of RCR's
    recomputed backward): fp16/bf16 the kRcrFactorsBwd epilogue of rcr_gemm_kernel (wmma, K = 40:
    two chunks of 32) or rcr_wgmma_kernel (K 136: 16-byte loads, three chunks; 150: element loads),
    fp32 rcr_factors_bwd_kernel over the host's product, over 150 rows x d = 300 (two row blocks
    and two column blocks, the second of each partial; a grid of 4 blocks for fp32), against the
    chain in fp64: gm = grad [|z| <= 1] (1 - t^2), dF = grad [|z| <= 1], t = tanh(hidden w2^T + b2),
    z = t + F (1 without F), at the elements whose mask rounding cannot flip (|z| not within 1% of
    1); the others zero or grad's value. A NaN in F gives zeros there (|z| <= 1 is false, as torch's
    where). Every tensor read or written ends at an inaccessible page (_Guarded)."""
    n, D = 150, 300
    from test_rcr_recompute import _chain_case, chain_fp64
    hidden, w2, b2, fac, grad = _chain_case(n, D, H, has_f, dtype, seed=21 + H + has_f)
    if fac is not None:
        fac[140, 290] = float("nan")     # the second row block's second column block
    t, gz, sure, g64 = chain_fp64(hidden, w2, b2, fac, grad)
    guard = _Guarded()
    gm = guard(torch.full((n, D), float("nan"), dtype=dtype))
    df = guard(torch.full((n, D), float("nan"), dtype=dtype)) if want_df else None
    m = (hidden @ w2.t()).contiguous() if dtype == torch.float32 else None
    emu.emu_wgmma_ops()
    emu.emu_set_wgmma(wgmma)
    try:
        emu.emu_rcr_factors_bwd(DTYPES[dtype], _ptr(guard(hidden)), _ptr(guard(w2)), _ptr(m), _ptr(b2),
                                _ptr(guard(fac)), _ptr(guard(grad)), n, D, H, 4, _ptr(gm), _ptr(df))
    finally:
        emu.emu_set_wgmma(0)
    assert (emu.emu_wgmma_ops() > 0) == bool(wgmma)      # the kernel asked for ran
    tol = TOL[dtype] if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gm.double()[sure], (gz * (1 - t * t))[sure], **tol)
    unsure = ~sure
    for out in [gm] + ([df] if want_df else []):
        assert not out.isnan().any()
    if want_df:
        torch.testing.assert_close(df.double()[sure], gz[sure], **tol)
        assert ((df.double()[unsure] == 0) | (df.double() == g64)[unsure]).all()
    if fac is not None:
        assert gm[140, 290] == 0 and (not want_df or df[140, 290] == 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("has_lam", [False, True], ids=["scalar", "lam"])
@pytest.mark.parametrize("K,H1,H2", [(256, 512, 128), (100, 200, 50), (100, 0, 50)], ids=["s256", "s100", "no hidden"])
def test_rcr_hidden_and_temperatures_wgmma(emu, K, H1, H2, has_lam, dtype):
    """rcr_wgmma_kernel's hidden-layer launch with the temperatures in it (as rcr.cu launches it on
    an sm_90a build): per row block, H1 / 256 blocks of hidden = tanh(E w1^T + b1), then one block
    of the kRcrSmooth epilogue, relu(ws2 . tanh(E ws1^T + bs1) + bs2 + lam) straight from the
    accumulators of E ws1^T (m64n128k16; s / 2 = 128: the whole block, 16-byte loads; 50: a partial
    block, K = 100 not a multiple of 8: element loads; no hidden columns: the temperatures' blocks
    alone), over (B = 2, P = 3, Lq = 25) = 150 rows (two row blocks, the second partial); lam zero at
    padded rows whatever E and lam hold there (NaN); the scalar lam where none is given; a NaN in a
    valid row comes out NaN. E, w1 and ws1 end at an inaccessible page."""
    B, P, Lq = 2, 3, 25
    g = torch.Generator().manual_seed(9 + K + H1 + has_lam)
    ql = torch.tensor([25, 1, 13], dtype=torch.int32)
    E = (torch.randn(B, P, Lq, K, generator=g) * 0.3).to(dtype)
    w1 = (torch.randn(H1, K, generator=g) * 0.3).to(dtype)
    b1 = (torch.randn(H1, generator=g) * 0.5).to(dtype)
    ws1 = (torch.randn(H2, K, generator=g) * 0.3).to(dtype)
    bs1 = (torch.randn(H2, generator=g) * 0.5).to(dtype)
    ws2 = (torch.randn(H2, generator=g) * 0.3).to(dtype)
    bs2 = torch.randn(1, generator=g).to(dtype)
    lam = (torch.rand(B, P, Lq, generator=g) * 4 - 3).to(dtype) if has_lam else None
    valid = (torch.arange(Lq)[None, :] < ql[:, None].long())[None].expand(B, P, Lq)
    E[~valid] = float("nan")
    if lam is not None:
        lam[~valid] = float("nan")
    E[1, 0, 20, 7] = float("nan")                   # a valid row's E (row 95, the first row block)
    old = lam.double() if lam is not None else -0.5
    want_h = torch.tanh(E.double() @ w1.double().T + b1.double())
    hs = E.double() @ ws1.double().T + bs1.double()
    want = torch.where(valid, torch.relu(torch.tanh(hs) @ ws2.double() + bs2.double() + old), 0.0)
    guard = _Guarded()
    out = torch.full((B, P, Lq), float("nan"), dtype=dtype)
    hidden = torch.full((B, P, Lq, H1), float("nan"), dtype=dtype)
    if H1:   # (an empty tensor has no page to end at)
        hidden, w1 = guard(hidden), guard(w1)
    emu.emu_set_wgmma(1)
    emu.emu_wgmma_ops()
    emu.emu_rcr_hidden_smooth_wg(DTYPES[dtype], _ptr(guard(E)), _ptr(w1), _ptr(b1), _ptr(guard(ws1)),
                                 _ptr(bs1), _ptr(ws2), _ptr(bs2), _ptr(lam), -0.5, _ptr(ql), B * P * Lq, H1, H2, K,
                                 P, Lq, _ptr(hidden), _ptr(out))
    emu.emu_set_wgmma(0)
    assert emu.emu_wgmma_ops() > 0
    assert torch.isnan(want[1, 0, 20]) and torch.isnan(out).sum() == 1
    torch.testing.assert_close(out.double(), want, equal_nan=True, **TOL[dtype])
    assert (want[valid] > 0).any() and (want[valid] == 0).any()     # both sides of the relu
    torch.testing.assert_close(hidden.double(), want_h, equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("has_lam", [False, True], ids=["scalar", "lam"])
def test_rcr_smooth(emu, has_lam, dtype):
    """rcr_smooth_kernel over (B = 2, P = 3, Lq = 5) rows x s/2 = 70 columns on a grid of 2
    blocks (8 rows each, grid-stride): relu(ws2 . tanh(hs) + bs2 + lam), zero at padded rows
    whatever hs and lam hold there (NaN), the scalar lam where none is given; a NaN in a valid
    row's input comes out NaN, as from torch's step (no silent zero)."""
    B, P, Lq, H2 = 2, 3, 5, 70
    g = torch.Generator().manual_seed(5)
    ql = torch.tensor([5, 1, 3], dtype=torch.int32)
    hs = (torch.randn(B, P, Lq, H2, generator=g) * 2).to(dtype)
    ws2 = (torch.randn(H2, generator=g) * 0.3).to(dtype)
    bs2 = torch.randn(1, generator=g).to(dtype)
    lam = (torch.rand(B, P, Lq, generator=g) * 4 - 3).to(dtype) if has_lam else None
    valid = (torch.arange(Lq)[None, :] < ql[:, None].long())[None].expand(B, P, Lq)
    hs[~valid] = float("nan")
    if lam is not None:
        lam[~valid] = float("nan")
    hs[1, 0, 2, 7] = float("nan")                   # a valid row's input
    old = lam.double() if lam is not None else -0.5
    want = torch.where(valid, torch.relu(torch.tanh(hs.double()) @ ws2.double() + bs2.double() + old), 0.0)
    out = torch.full((B, P, Lq), float("nan"), dtype=dtype)
    emu.emu_rcr_smooth(DTYPES[dtype], _ptr(hs), _ptr(ws2), _ptr(bs2), _ptr(lam), -0.5, _ptr(ql), B * P * Lq, P, Lq,
                       H2, 2, _ptr(out))
    assert torch.isnan(want[1, 0, 2]) and torch.isnan(out).sum() == 1
    torch.testing.assert_close(out.double(), want, equal_nan=True, **TOL[dtype])
    assert (want[valid] > 0).any() and (want[valid] == 0).any()     # both sides of the relu
