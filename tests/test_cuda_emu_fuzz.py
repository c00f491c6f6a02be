"""Property-based parity of the CUDA attention and RAR kernels, forward and backward, on the host
emulator (tests/cuda_emu): random problems, each checked against the fp64 reference, in both
thread orders.

tests/test_cuda_emu.py checks each kernel and plan at shapes chosen to reach its corners; here
hypothesis draws the shapes instead (query and context rows 1..64 on either side of the
tensor-core kernels' 16-row tiles and 64-row blocks, ragged lengths down to 1 with NaN past them,
d and s not multiples of the 32-column chunks or of 8, one to three context items, the grid and
the paired form, the wgmma build or not, the H200's or the A100's shared memory, the backward's
chunks of pairs), so that a combination no hand-written case names still meets the reference.
As in tests/test_hypothesis.py, ``derandomize=True`` draws the same examples on every run and
``database=None`` replays nothing, so the test is deterministic."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from rcar_testutil import NAN  # noqa: E402
from test_cuda_emu import (A100_SMEM, H200_SMEM, TOL, _check, _check_grads, _ref, emu,  # noqa: E402,F401
                           emu_attention, emu_attention_grads, emu_lib, emu_rar, emu_rar_bwd_check, ref_grads)
from test_fused_ops import _rar_sample, ref_rar  # noqa: E402

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@st.composite
def problems(draw, wg=False, dtypes=("fp32", "fp16", "bf16")):
    """(the attention op's arguments, context_index or None, dtype): P query items of Lq rows,
    B context items of Lc rows, every length drawn in 1..its rows, NaN past each length (in
    the query, the context, the factors and lam). wg: the shapes of the 128-row wgmma kernel
    (fp16/bf16, a weight, the grid, more than 64 rows a block: several pairs of up to 24 rows).
    dtypes: those to draw from (tests/test_fused_fuzz.py: not bf16 on the Triton interpreter)."""
    dtype = DTYPES[draw(st.sampled_from(["fp16", "bf16"] if wg else list(dtypes)))]
    B, P = draw(st.integers(1, 3)), draw(st.integers(5, 24) if wg else st.integers(1, 12))
    Lq, Lc = draw(st.integers(1, 24) if wg else st.integers(1, 64)), draw(st.integers(1, 64))
    d = draw(st.sampled_from([8, 13, 40, 72]))
    s = draw(st.sampled_from([6, 24, 40]))
    with_state = draw(st.booleans())
    with_weight, paired = (True, False) if wg else (draw(st.booleans()), draw(st.booleans()))
    qlens = draw(st.lists(st.integers(1, Lq), min_size=P, max_size=P))
    clens = draw(st.lists(st.integers(1, Lc), min_size=B, max_size=B))
    cidx = torch.tensor(draw(st.lists(st.integers(0, B - 1), min_size=P, max_size=P))) if paired else None
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    Bo = 1 if paired else B
    q = torch.randn(P, Lq, d, generator=g, dtype=torch.float64)
    c = torch.randn(B, Lc, d, generator=g, dtype=torch.float64)
    f = torch.rand(Bo, P, Lq, d, generator=g, dtype=torch.float64) * 2 - 1 if with_state else None
    lam = torch.rand(Bo, P, Lq, generator=g, dtype=torch.float64) * 8 + 1 if with_state else None
    for p, n in enumerate(qlens):
        q[p, n:] = NAN
        if with_state:
            f[:, p, n:] = NAN
            lam[:, p, n:] = NAN
    for b, n in enumerate(clens):
        c[b, n:] = NAN
    w = torch.randn(s, d, generator=g, dtype=torch.float64) * 0.4 if with_weight else None
    bias = torch.randn(s, generator=g, dtype=torch.float64) * 0.1 if with_weight else None
    cast = [None if t is None else t.to(dtype) for t in (q, c, f, lam, w, bias)]
    q, c, f, lam, w, bias = cast
    args = [q, torch.tensor(qlens, dtype=torch.int32), c, torch.tensor(clens, dtype=torch.int32), f, lam, 4.0, w,
            bias]
    return args, cidx, dtype


@SETTINGS
@given(problems(), st.booleans(), st.sampled_from([H200_SMEM, A100_SMEM]))
def test_attention_forward_on_random_problems(emu, problem, wgmma, limit):
    """The forward as attention_cuda launches it (the per-pair kernel, attention_fwd_tc_kernel or,
    with wgmma, attention_fwd_wg_kernel, by plan.h) equals the fp64 reference within the dtype's
    tolerance, every output element written (no NaN: padded rows are zeros)."""
    args, cidx, dtype = problem
    out, _ = emu_attention(emu, args, context_index=cidx, limit=limit, wgmma=wgmma)
    _check(out, _ref(args, cidx), dtype)


@settings(SETTINGS, max_examples=60)
@given(problems(wg=True))
def test_attention_forward_128_row_blocks_on_random_problems(emu, problem):
    """attention_fwd_wg_kernel's shapes (as launched on an sm_90a build): several packed pairs of
    one context item in 128 rows, pair boundaries anywhere in the two warpgroups' 64 rows."""
    args, cidx, dtype = problem
    out, _ = emu_attention(emu, args, context_index=cidx, wgmma=True)
    _check(out, _ref(args, cidx), dtype)


def kink_masks(args, cidx, dtype):
    """{0: dquery's, 2: dcontext's, 4: dfactors' mask}: the gradient elements that a score at
    LeakyReLU's kink reaches. The kernels take S0 = X C^T with X = F * Q rounded to the dtype
    (the product of two inputs is exact in fp32, then rounded once, to nearest even, as torch
    rounds here; without factors X = Q, nothing rounded), summed in fp32; the reference takes X
    exactly. Where the two S0 have different signs (or either is within the fp32 sum's error,
    d 2^-23 sum_k |X_k C_k|, of zero) the slope of LeakyReLU (1 or 0.1) that multiplies dS0[q, c]
    differs between them: the gradient is discontinuous there, and the two may differ by O(1)
    (found by this test: 0.44 in a dfactors element of about 0.8, fp16, a score of 3e-4 whose
    rounded X moved it by 1.5e-3 to the other side). Everything else the backward takes from
    the forward (S, the norms, P, U) is continuous, so the jump reaches only dS0[q, c]'s products:
    query row q of the pair (dquery, dfactors: dX = dS0 C) and context row c (dcontext: dS0^T X);
    dlam, dweight and dbias do not depend on it. Every other element is compared at the usual
    tolerance."""
    q, ql, c, cl, f = args[:5]
    P, Lq, D = q.shape
    dq = torch.zeros(P, Lq, D, dtype=torch.bool)
    dc = torch.zeros(c.shape, dtype=torch.bool)
    df = None if f is None else torch.zeros(f.shape, dtype=torch.bool)
    for p in range(P):
        for b in ([int(cidx[p])] if cidx is not None else range(c.shape[0])):
            fb = 0 if cidx is not None else b        # the pair's index on the output's context side
            n, m = int(ql[p]), int(cl[b])
            X = q[p, :n].double() * (1.0 if f is None else f[fb, p, :n].double())
            Xr = X.to(dtype).double()
            C = c[b, :m].double()
            exact, rounded = X @ C.T, Xr @ C.T
            err = D * 2.0 ** -23 * (Xr.abs() @ C.abs().T)
            near = ((exact > 0) != (rounded > 0)) | (exact.abs() <= err) | (rounded.abs() <= err)   # n x m
            rows, cols = near.any(1), near.any(0)
            dq[p, :n][rows] = True
            dc[b, :m][cols] = True
            if df is not None:
                df[fb, p, :n][rows] = True
    return {0: dq, 2: dc, 4: df}


def conditioning_slack(args, grad, cidx, dtype, trials=2):
    """{argument position: twice the largest change of the fp64 reference's gradient, element by
    element, over a few perturbations of Q, F and C by up to one unit roundoff of the dtype
    (relative, seeded)}: how far the reference itself moves under rounding-sized changes of its
    inputs. The kernels round X = F * Q, P, dS0 and dU to the dtype; where the problem is
    ill-conditioned at that scale (one- or two-row items, steep per-column normalisation: one
    drawn fp16 problem's gradients of about 5 moved by 0.3-1.2 under 2^-8 perturbations, the
    kernel's error was 0.17), an error within this is the problem's, not the kernel's. A bug's
    error does not follow the problem's conditioning."""
    u = torch.finfo(dtype).eps / 2

    def grads(a):
        return {i: torch.zeros_like(a[i], dtype=torch.float64) if g is None else torch.nan_to_num(g)
                for i, g in ref_grads(a, grad, cidx).items()}
    base = grads(args)
    gen = torch.Generator().manual_seed(int(args[0].numel()))
    worst = {i: torch.zeros_like(g) for i, g in base.items()}
    for _ in range(trials):
        a = list(args)
        for i in (0, 2, 4):
            if isinstance(a[i], torch.Tensor):
                a[i] = a[i].double() * (1 + u * (2 * torch.rand(a[i].shape, generator=gen, dtype=torch.float64) - 1))
        for i, g in grads(a).items():
            worst[i] = torch.maximum(worst[i], (g - base[i]).abs())
    return {i: 2 * w for i, w in worst.items()}


@SETTINGS
@given(problems(dtypes=("fp32", "fp16")), st.sampled_from([None, 1, 2, 5]))
def test_attention_backward_on_random_problems(emu, problem, chunk):
    """The backward as attention_bwd_cuda runs it (with a weight per chunk of pairs: the (Q - A)^2
    forward, dY, dW, db and G2, then the backward kernel; attention_bwd_tc_kernel or the per-pair
    kernel by plan.h): every gradient of sum(grad * out) against the fp64 reference's autograd
    but for the elements a score at LeakyReLU's kink reaches (kink_masks), each within the usual
    tolerance or within the problem's own sensitivity to rounding-sized changes of its inputs
    (conditioning_slack); padded rows of dquery, dfactors and dlam exactly zero. fp32 and fp16,
    not bf16, whose rounding makes many drawn problems that ill-conditioned (the kernel's code
    is the same template for both half types)."""
    args, cidx, dtype = problem
    P, Lq, D = args[0].shape
    Bo = 1 if cidx is not None else args[2].shape[0]
    width = D if args[7] is None else args[7].shape[0]
    grad = torch.randn(Bo, P, Lq, width, generator=torch.Generator().manual_seed(P * 64 + Lq)).to(dtype)
    got, _ = emu_attention_grads(emu, args, grad, chunk=chunk, context_index=cidx)
    _check_grads(args, grad, got, dtype, cidx, skip=kink_masks(args, cidx, dtype),
                 slack=conditioning_slack(args, grad, cidx, dtype))


@settings(SETTINGS, max_examples=60)
@given(st.sampled_from(list(DTYPES.values())), st.integers(1, 3), st.integers(1, 20), st.integers(1, 80),
       st.sampled_from([6, 24, 45, 100, 256]), st.integers(1, 3), st.booleans(), st.booleans(), st.booleans(),
       st.integers(0, 2 ** 31 - 1), st.data())
def test_rar_forward_on_random_problems(emu, dtype, B, P, Lq, s, T, dropout, h_given, wgmma, seed, data):
    """RAR's T steps as rar_cuda launches them (rar_fwd_kernel, or with wgmma rar_fwd_wg_kernel
    where plan.h takes the shapes), query lengths drawn in 1..Lq with NaN past them (in E and in
    the dropout masks): h equals the fp64 reference within the dtype's tolerance."""
    _check_rar(emu, dtype, B, P, Lq, s, T, dropout, h_given, wgmma, seed, data)


def _check_rar(emu, dtype, B, P, Lq, s, T, dropout, h_given, wgmma, seed, data):
    qlens = data.draw(st.lists(st.integers(1, Lq), min_size=P, max_size=P))
    args = _rar_sample(dtype, seed=seed, T=T, dropout=dropout, h_given=h_given, B=B, P=P, Lq=Lq, s=s, qlens=qlens)
    out, _ = emu_rar(emu, args, wgmma=wgmma)
    want = ref_rar(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), want, **TOL[dtype])


@settings(SETTINGS, max_examples=60)
@given(st.sampled_from([torch.float16, torch.bfloat16]), st.integers(1, 3), st.integers(5, 40), st.integers(1, 24),
       st.sampled_from([6, 24, 45, 100, 256]), st.integers(1, 3), st.booleans(), st.booleans(),
       st.integers(0, 2 ** 31 - 1), st.data())
def test_rar_forward_128_row_blocks_on_random_problems(emu, dtype, B, P, Lq, s, T, dropout, h_given, seed, data):
    """rar_fwd_wg_kernel's shapes (as launched on an sm_90a build): several packed pairs in 128
    rows, pair boundaries anywhere in the two warpgroups' 64 rows."""
    _check_rar(emu, dtype, B, P, Lq, s, T, dropout, h_given, True, seed, data)


@settings(SETTINGS, max_examples=60)
@given(st.sampled_from(list(DTYPES.values())), st.integers(1, 3), st.integers(1, 12), st.integers(1, 64),
       st.sampled_from([6, 24, 45, 100]), st.booleans(), st.integers(0, 2 ** 31 - 1), st.data())
def test_rar_backward_on_random_problems(emu, dtype, B, P, Lq, s, dropout, seed, data):
    """One RAR step's backward as rar_bwd_cuda runs it (rar_bwd_kernel with the MT plan.h picks,
    the shared-weight products after it): every gradient against the fp64 reference's autograd,
    query lengths drawn in 1..Lq with NaN past them."""
    qlens = data.draw(st.lists(st.integers(1, Lq), min_size=P, max_size=P))
    args = _rar_sample(dtype, seed=seed, T=1, dropout=dropout, h_given=True, B=B, P=P, Lq=Lq, s=s, qlens=qlens)
    emu_rar_bwd_check(emu, args, dtype, seed=seed % 1000)
