"""The fused backends' ops against one per-pair reference, op by op: the Triton custom ops
(under TRITON_INTERPRET=1) and the compiled extension's C++ CPU ops, both to the contract of
csrc/README.md. Forward values, every gradient through the registered autograd (so the
backward ops attention_bwd / rar_bwd), the raw outputs of rar_bwd, opcheck, fp64 and fp32, NaN
in every padded row, lengths 1 and full, d and s not powers of two."""

from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

import rcar_fast
from rcar_fast import reference

Tensor = torch.Tensor


def _fused_backends():
    out = []
    st = rcar_fast.backend_status()
    if "triton" in rcar_fast.available_backends("cpu"):
        out.append("triton")
    out.append(pytest.param("cpp", marks=pytest.mark.skipif(st["cpp"] != "available", reason=st["cpp"])))
    return out


BACKENDS = _fused_backends()


def _ops(backend):
    """(attention, attention_bwd, rar, rar_bwd) of one backend."""
    if backend == "triton":
        from rcar_fast.backends.triton_kernels import load_kernels
        tb = load_kernels()
        return tb.triton_attention, tb.triton_attention_bwd, tb.triton_rar, tb.triton_rar_bwd
    from rcar_fast.backends import extension_kernels  # noqa: F401  (registers fake and autograd)
    o = torch.ops.rcar_fast
    return o.attention.default, o.attention_bwd.default, o.rar.default, o.rar_bwd.default


def _tol(dtype, backend):
    # the Triton kernels accumulate in fp32 even for fp64 inputs; the C++ kernels in fp64
    if dtype == torch.float64 and backend != "triton":
        return dict(rtol=1e-9, atol=1e-11)
    return dict(rtol=2e-5, atol=2e-6)


# ----------------------------------------------------------------------------- the reference

def ref_attention(q, ql, c, cl, factors, lam, lam_scalar, weight, bias):
    """The attention op's contract, per pair through reference.attention_one (differentiable)."""
    B, P, Lq = c.shape[0], q.shape[0], q.shape[1]
    width = q.shape[2] if weight is None else weight.shape[0]
    rows = []
    for b in range(B):
        for p in range(P):
            n, m = int(ql[p]), int(cl[b])
            Q, C = q[p, :n][None], c[b, :m][None]
            Fq = factors[b, p, :n][None] if factors is not None else 1.0
            lq = lam[b, p, :n][None] if lam is not None else lam_scalar
            A = reference.attention_one(Q, C, Fq, lq)[0]
            if weight is not None:
                A = reference.l2n(F.linear((Q[0] - A) ** 2, weight, bias))
            rows.append(torch.cat([A, A.new_zeros(Lq - n, width)]))
    return torch.stack(rows).view(B, P, Lq, width)


def ref_rar(E, ql, h0, wq, bq, wk, bk, wv, bv, keep_k, keep_g):
    """The rar op's contract, per pair (differentiable)."""
    B, P, Lq, S = E.shape
    out = []
    for b in range(B):
        for p in range(P):
            n = int(ql[p])
            e = E[b, p, :n]
            h = e.mean(0) if h0 is None else h0[b, p]
            for t in range(wq.shape[0]):
                K = torch.tanh(e @ wk[t].T + bk[t])
                g = torch.tanh(wq[t] @ h + bq[t])
                if keep_k is not None:
                    K, g = K * keep_k[b, p, :n], g * keep_g[b, p]
                a = torch.softmax((K * g) @ wv[t] + bv[t], dim=0)
                h = reference.l2n(a @ e)
            out.append(h)
    return torch.stack(out).view(B, P, S)


# ----------------------------------------------------------------------------- samples

def _sample(dtype, seed, with_state, with_weight, B=2, P=3, Lq=5, Lc=4, d=13, s=6, qlens=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(P, Lq, d, generator=g, dtype=torch.float64)
    c = torch.randn(B, Lc, d, generator=g, dtype=torch.float64)
    ql = torch.tensor(qlens or [Lq, 1, 3][:P], dtype=torch.int32)
    cl = torch.tensor([Lc, 1][:B], dtype=torch.int32)
    for p in range(P):
        q[p, int(ql[p]):] = float("nan")
    for b in range(B):
        c[b, int(cl[b]):] = float("nan")
    factors = lam = weight = bias = None
    if with_state:
        factors = torch.rand(B, P, Lq, d, generator=g, dtype=torch.float64) * 2 - 1
        lam = torch.rand(B, P, Lq, generator=g, dtype=torch.float64) * 8 + 1
        for p in range(P):
            factors[:, p, int(ql[p]):] = float("nan")
            lam[:, p, int(ql[p]):] = float("nan")
    if with_weight:
        weight = torch.randn(s, d, generator=g, dtype=torch.float64) * 0.4
        bias = torch.randn(s, generator=g, dtype=torch.float64) * 0.1
    cast = [x.to(dtype) if isinstance(x, Tensor) else x for x in (q, c, factors, lam, weight, bias)]
    q, c, factors, lam, weight, bias = cast
    return [q, ql, c, cl, factors, lam, 4.0, weight, bias]


def _rar_sample(dtype, seed, T, dropout, h_given, B=2, P=3, Lq=5, s=7, qlens=None):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(B, P, Lq, s, generator=g, dtype=torch.float64)
    ql = torch.tensor(qlens or [Lq, 1, 3][:P], dtype=torch.int32)
    for p in range(P):
        E[:, p, int(ql[p]):] = float("nan")
    wq, wk = (torch.randn(T, s, s, generator=g, dtype=torch.float64) * 0.5 for _ in range(2))
    bq, bk, wv = (torch.randn(T, s, generator=g, dtype=torch.float64) * 0.3 for _ in range(3))
    bv = torch.randn(T, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, P, s, generator=g, dtype=torch.float64) if h_given else None
    kk = kg = None
    if dropout:
        kk = (torch.rand(B, P, Lq, s, generator=g) > 0.4).double() / 0.6
        kg = (torch.rand(B, P, s, generator=g) > 0.4).double() / 0.6
        for p in range(P):
            kk[:, p, int(ql[p]):] = float("nan")     # padded rows of a mask are never read either
    return [x.to(dtype) if isinstance(x, Tensor) and x.is_floating_point() else x
            for x in (E, ql, h0, wq, bq, wk, bk, wv, bv, kk, kg)]


#: fp64 reference against T = 3 RAR steps in half precision (rar_in_one_call_and_in_step_calls'
#: tests): measured on the CUDA emulation, max abs error fp16 1.8e-4, bf16 1.7e-3
RAR_STEPS_TOL = {torch.float16: dict(rtol=1e-2, atol=2e-3), torch.bfloat16: dict(rtol=2e-2, atol=1e-2)}


def rar_in_one_call_and_in_step_calls(rar, args):
    """(rar over every stacked module of args in one call, the same as one call per module, each
    given the last one's h), args as _rar_sample returns them (no dropout masks)."""
    E, ql, h0, wq, bq, wk, bk, wv, bv, kk, kg = args
    h = h0
    for t in range(wq.shape[0]):
        h = rar(E, ql, h, wq[t:t + 1], bq[t:t + 1], wk[t:t + 1], bk[t:t + 1], wv[t:t + 1], bv[t:t + 1], kk, kg)
    return rar(*args), h


def _mixed_lengths(n, Lq, seed):
    """n query lengths in 1..Lq, seeded, with a full one first and a one-row one in the middle."""
    lens = torch.randint(1, Lq + 1, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    lens[0], lens[n // 2] = Lq, 1
    return lens


ATTENTION_CASES = [(False, False), (True, False), (False, True), (True, True)]
ATT_IDS = ["A,F=1", "A,F,lam", "E,F=1", "E,F,lam"]


def _grad_inputs(args):
    """Clones of the floating tensors as leaves that require grad; others as they are."""
    return [a.clone().requires_grad_() if isinstance(a, Tensor) and a.is_floating_point() else a
            for a in args]


# ----------------------------------------------------------------------------- attention

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("with_state,with_weight", ATTENTION_CASES, ids=ATT_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_forward_and_gradients(backend, with_state, with_weight, dtype):
    args = _sample(dtype, seed=hash((with_state, with_weight)) % 1000, with_state=with_state,
                   with_weight=with_weight)
    _check_attention(backend, args, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("with_state", [False, True], ids=["F=1", "F,lam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_several_chunks(backend, with_state, dtype):
    """Blocks wider than one chunk everywhere: Lq = 40 and Lc = 36 (64-row blocks: fp32's exact
    products split along K = 64 into four of 16), d = 37 (three d-chunks of 16, the last
    partial), s = 45 (in Triton, fp32's forward projects 32 columns per pass and parks Y in the
    output; the backward builds Y 32 columns and dY 16 columns at a time; partial chunks
    masked). Gradients in both dtypes: fp32 against the reference in fp64 on the same inputs."""
    args = _sample(dtype, seed=7 + with_state, with_state=with_state, with_weight=True, Lq=40, Lc=36,
                   d=37, s=45)
    _check_attention(backend, args, dtype, grads=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("Lq,P,groups", [(5, 37, (12, 25)), (20, 11, (3, 6))], ids=["short", "long"])
@pytest.mark.parametrize("with_state,with_weight", ATTENTION_CASES, ids=ATT_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_many_query_items_per_context_item(backend, with_state, with_weight, Lq, P, groups, dtype):
    """P query items against each of B = 2 context items, mixed query lengths (1 and Lq among
    them), NaN in every padding: the Triton forward packs GP pairs of one context item into one
    program's rows, Lq rows each with no padding between them (forward_config's GP, groups =
    (fp32's, fp16's): 64 // Lq and 128 // Lq; full programs and a partial last one per
    item; the norm across query rows is each pair's own), fp32 through the chunked projection,
    fp16 through the s-wide one. Every pair against the reference."""
    if backend == "triton":
        from rcar_fast.backends.triton_kernels import load_kernels
        kernels = load_kernels()
        half = dtype != torch.float32
        for mode in (kernels.attention.MODE_ATTENDED.value, kernels.attention.MODE_ALIGNMENT.value):
            cfg = kernels.attention.forward_config(half, Lq, 9, 13, 6, mode, grouped=True)
            assert cfg["GP"] == groups[half] and cfg["PACKED"]
            assert P > groups[half] and P % groups[half]      # full programs and a partial last one
    if dtype == torch.float16 and backend == "cpp":
        pytest.skip("the C++ CPU kernels take float32 and float64")
    lens = _mixed_lengths(P, Lq, Lq)
    args = _sample(dtype, seed=11 + Lq + with_state, with_state=with_state, with_weight=with_weight, P=P, Lq=Lq,
                   Lc=9, qlens=lens)
    att = _ops(backend)[0]
    out = att(*args)
    up = [a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
    want = ref_attention(*up)
    tol = _tol(dtype, backend) if dtype == torch.float32 else dict(rtol=2e-2, atol=4e-3)
    torch.testing.assert_close(out.double(), want, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_nan_in_a_valid_row_reaches_the_whole_pair(backend):
    """A NaN in a valid row of a pair's factors (not its first row) makes that pair's column norms
    NaN, so every row of the pair comes out NaN, as from the reference (torch's sum over the
    pair's rows), and no other pair is touched: with packed pairs (the Triton forward's 12 of 5
    rows per program) the norm handed to the rows before the NaN must be NaN too."""
    P, Lq = 13, 5
    lens = [5, 5, 4, 1, 3, 5, 2, 5, 4, 5, 1, 5, 3]
    args = _sample(torch.float32, seed=17, with_state=True, with_weight=False, P=P, Lq=Lq, Lc=9, qlens=lens)
    args[4][0, 1, 3, 2] = float("nan")                 # pair (0, 1), row 3 of 5
    args[4][1, 8, 2, 5] = float("nan")                 # pair (1, 8), row 2 of 4
    out = _ops(backend)[0](*args)
    up = [a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
    want = ref_attention(*up)
    nan_rows = want.isnan().any(-1)
    assert nan_rows[0, 1, :5].all() and nan_rows[1, 8, :4].all() and int(nan_rows.sum()) == 9
    assert torch.equal(out.isnan().any(-1), nan_rows)
    torch.testing.assert_close(out.double(), want, **_tol(torch.float32, backend), equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_triton_forward_rows_not_evenly_spaced(dtype):
    """The packed forward addresses a program's rows from its first pair's (kernels/attention.py:
    _flat_rows copies where a pair is not Lq rows after the one before): a query, factors and lam
    that are views into longer rows (NaN between them) give what their contiguous copies give,
    and the reference's answer, with several pairs per program."""
    if "triton" not in BACKENDS:
        pytest.skip("no triton")
    P, Lq = 13, 7
    q, ql, c, cl, f, lam, lam0, w, b = _sample(dtype, seed=5, with_state=True, with_weight=True, P=P, Lq=Lq, Lc=9,
                                               qlens=_mixed_lengths(P, Lq, 3))
    qv = torch.full((P, Lq + 3, q.shape[2]), float("nan"), dtype=dtype)[:, :Lq]
    fv = torch.full((2, P, Lq + 2, q.shape[2]), float("nan"), dtype=dtype)[:, :, :Lq]
    lv = torch.full((2, P, Lq + 1), float("nan"), dtype=dtype)[:, :, :Lq]
    qv.copy_(q), fv.copy_(f), lv.copy_(lam)
    assert qv.stride(0) != Lq * qv.stride(1) and fv.stride(1) != Lq * fv.stride(2) and lv.stride(1) != Lq * lv.stride(2)
    att = _ops("triton")[0]
    out = att(qv, ql, c, cl, fv, lv, lam0, w, b)
    torch.testing.assert_close(out, att(q, ql, c, cl, f, lam, lam0, w, b), rtol=0, atol=0)
    up = [a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in (q, ql, c, cl, f, lam, lam0, w, b)]
    tol = _tol(dtype, "triton") if dtype == torch.float32 else dict(rtol=2e-2, atol=4e-3)
    torch.testing.assert_close(out.double(), ref_attention(*up), **tol)


@pytest.mark.parametrize("Lq", [5, 20], ids=["BQ16", "BQ32"])
@pytest.mark.parametrize("with_state,with_weight", ATTENTION_CASES, ids=ATT_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_gradients_many_query_items_per_context_item(backend, with_state, with_weight, Lq):
    """Gradients where the Triton backward's first kernel takes several pairs of one context item
    per program (GP 4 at BQ 16, 2 at BQ 32; P = 7: a partial last program): every input's
    gradient, fp32, against the reference in fp64 on the same inputs; none at padded rows. The
    backward's chooser keeps 64 query rows in every dtype (the forward's 128 for bf16/fp16
    spill there)."""
    if backend == "triton":
        from rcar_fast.backends.triton_kernels import load_kernels
        bwd = importlib.import_module(load_kernels().__name__ + ".attention_bwd")
        for half in (False, True):
            for mode in (0, 1):
                assert bwd.attention_bwd_config(half, Lq, 9, 21, 10, mode, grouped=True)["GP"] == 64 // (16 if Lq <= 16 else 32)
    lens = _mixed_lengths(7, Lq, Lq + 1)
    args = _sample(torch.float32, seed=31 + Lq + with_state, with_state=with_state, with_weight=with_weight, P=7,
                   Lq=Lq, Lc=9, d=21, s=10, qlens=lens)
    _check_attention(backend, args, torch.float32, grads=True)


def _check_attention(backend, args, dtype, grads=False):
    """Forward against the per-pair reference; for fp64 (or with grads) also every gradient,
    the reference in fp64 on the same inputs."""
    att = _ops(backend)[0]
    out = att(*args)
    up = [a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
    with torch.no_grad():
        want = ref_attention(*up)
    assert out.dtype == dtype and out.shape == want.shape
    torch.testing.assert_close(out.double(), want, **_tol(dtype, backend))
    if dtype != torch.float64 and not grads:
        return
    tol = _tol(torch.float32, backend) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    leaves = _grad_inputs(args)
    ref_leaves = _grad_inputs(up)
    gout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    idx = [i for i, a in enumerate(leaves) if isinstance(a, Tensor) and a.requires_grad]
    got = torch.autograd.grad((att(*leaves) * gout.to(dtype)).sum(), [leaves[i] for i in idx])
    exp = torch.autograd.grad((ref_attention(*ref_leaves) * gout).sum(), [ref_leaves[i] for i in idx],
                              allow_unused=True)
    for i, g, e in zip(idx, got, exp):
        e = torch.zeros_like(g.double()) if e is None else torch.nan_to_num(e, nan=0.0)
        assert torch.isfinite(g).all(), f"input {i}: non-finite gradient"
        torch.testing.assert_close(g.double(), e, **tol, msg=f"input {i}")
    q, ql = leaves[0], args[1]
    dq = got[idx.index(0)]
    for p in range(q.shape[0]):
        assert not dq[p, int(ql[p]):].any(), "gradient at a padded query row"


# ----------------------------------------------------------------------------- RAR

RAR_CASES = [(1, False, False), (1, False, True), (3, False, False), (2, False, True),
             (1, True, False), (1, True, True)]
RAR_IDS = ["T1,mean", "T1,h", "T3,mean", "T2,h", "T1,dropout,mean", "T1,dropout,h"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("T,dropout,h_given", RAR_CASES, ids=RAR_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rar_forward_and_gradients(backend, T, dropout, h_given, dtype):
    rar = _ops(backend)[2]
    args = _rar_sample(dtype, seed=10 * T + 2 * dropout + h_given, T=T, dropout=dropout, h_given=h_given)
    out = rar(*args)
    with torch.no_grad():
        want = ref_rar(*[a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args])
    torch.testing.assert_close(out.double(), want, **_tol(dtype, backend))
    if dtype != torch.float64:
        return
    # the keep-masks are constants of the step, not differentiated
    leaves = _grad_inputs(args[:9]) + args[9:]
    ref_leaves = _grad_inputs(args[:9]) + args[9:]
    gout = torch.randn(out.shape, dtype=dtype, generator=torch.Generator().manual_seed(5))
    idx = [i for i, a in enumerate(leaves) if isinstance(a, Tensor) and a.requires_grad]
    got = torch.autograd.grad((rar(*leaves) * gout).sum(), [leaves[i] for i in idx])
    exp = torch.autograd.grad((ref_rar(*ref_leaves) * gout).sum(), [ref_leaves[i] for i in idx],
                              allow_unused=True)
    for i, g, e in zip(idx, got, exp):
        e = torch.zeros_like(g) if e is None else torch.nan_to_num(e, nan=0.0)
        assert torch.isfinite(g).all(), f"input {i}: non-finite gradient"
        torch.testing.assert_close(g, e, **_tol(torch.float32, backend), msg=f"input {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("Lq,P,groups", [(5, 37, (12, 25)), (20, 11, (3, 6)), (2, 70, (32, 32))],
                         ids=["short", "long", "tiny"])
@pytest.mark.parametrize("T,dropout,h_given", RAR_CASES, ids=RAR_IDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rar_many_pairs(backend, T, dropout, h_given, Lq, P, groups, dtype):
    """P pairs per context item, mixed lengths (1 and Lq among them), NaN in every padding: the
    Triton forward packs GP pairs' rows per program (rar_config's GP, groups = (fp32's, fp16's):
    64 and 128 rows; full programs and a partial last one per item; softmax, mean and sums are
    each pair's own; "tiny": GP capped at 32 pairs, kernels/rar.py's MAX_PAIRS), its gates one
    GEMM per step. Against the reference."""
    if backend == "triton":
        from rcar_fast.backends.triton_kernels import load_kernels
        half = dtype != torch.float32
        assert load_kernels().rar.rar_config(Lq, 7, half=half, grouped=True)["GP"] == groups[half]
        assert P > groups[half] and P % groups[half]       # full programs and a partial last one
    if dtype == torch.float16 and backend == "cpp":
        pytest.skip("the C++ CPU kernels take float32 and float64")
    lens = _mixed_lengths(P, Lq, Lq)
    args = _rar_sample(dtype, seed=3 * T + dropout + 5 * h_given + Lq, T=T, dropout=dropout, h_given=h_given, P=P,
                       Lq=Lq, qlens=lens)
    out = _ops(backend)[2](*args)
    want = ref_rar(*[a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args])
    tol = _tol(dtype, backend) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-3)
    torch.testing.assert_close(out.double(), want, **tol)


def test_triton_rar_each_pair_softmax_its_own():
    """fp32, 37 pairs of up to 5 rows (12 per program): wv scaled so the logits of pairs in one
    program lie hundreds apart. Each pair's softmax subtracts its own maximum (a maximum over the
    program's rows would underflow exp to zero for the lower pairs). Against the fp64 reference.
    (The softmax's sum needs no such test: h = l2n(sum a E) does not see a common factor of a.)"""
    if "triton" not in BACKENDS:
        pytest.skip("the Triton backend is not available here")
    args = _rar_sample(torch.float32, seed=41, T=1, dropout=False, h_given=True, P=37, Lq=5,
                       qlens=_mixed_lengths(37, 5, 5))
    args[7] = args[7] * 200.0      # wv: logits spread over hundreds
    out = _ops("triton")[2](*args)
    want = ref_rar(*[a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args])
    assert torch.isfinite(out).all()
    # logits in the hundreds: fp32's rounding of them moves a by about 1e-5 relative
    torch.testing.assert_close(out.double(), want, rtol=1e-3, atol=1e-4)


def test_triton_rar_pair_sums_keep_the_weights_precision():
    """fp16, pairs of two rows x and -x + y / 1000 with keys nearly equal (Wk tiny): the weights a
    are 0.5 +- about 1e-3, so h = l2n(a1 x + a2 (-x + y / 1000)) turns on a1 - a2, about 1e-3,
    which fp16 weights (0.5's ulp is 2^-11) carry only to about 25%. The packed forward's per-pair
    sums take each weight in two fp16 halves (hi + lo): against the fp64 reference within 2e-3."""
    if "triton" not in BACKENDS:
        pytest.skip("the Triton backend is not available here")
    g = torch.Generator().manual_seed(31)
    B, P, Lq, s = 1, 6, 2, 16
    x = torch.randn(B, P, s, generator=g, dtype=torch.float64)
    y = torch.randn(B, P, s, generator=g, dtype=torch.float64)
    E = torch.stack([x, -x + y / 1000], dim=2).half()
    wq, wk = torch.randn(1, s, s, generator=g, dtype=torch.float64) * 0.3, torch.randn(1, s, s, generator=g) * 1e-3
    bq, bk, wv = (torch.randn(1, s, generator=g, dtype=torch.float64) for _ in range(3))
    bv = torch.zeros(1, dtype=torch.float64)
    h0 = torch.randn(B, P, s, generator=g, dtype=torch.float64)
    args = [E, torch.full((P,), Lq, dtype=torch.int32)] + [t.half() for t in (h0, wq, bq, wk.double(), bk, wv, bv)]
    out = _ops("triton")[2](*args, None, None)
    up = [a.double() if a.is_floating_point() else a for a in args]
    want = ref_rar(*up, None, None)
    torch.testing.assert_close(out.double(), want, rtol=2e-3, atol=2e-3)


def test_triton_rar_steps_in_one_call_equal_one_step_calls():
    """fp16, T = 3 in one call equals three calls of one step each, bit for bit: the launcher keeps
    h in E's dtype between steps (as the backward's recompute, a call per step, does) and computes
    each gate's pre-activation h Wq^T + bq in that dtype. Also against the reference."""
    if "triton" not in BACKENDS:
        pytest.skip("the Triton backend is not available here")
    args = _rar_sample(torch.float16, seed=21, T=3, dropout=False, h_given=False, P=11, Lq=5,
                       qlens=_mixed_lengths(11, 5, 5))
    whole, h = rar_in_one_call_and_in_step_calls(_ops("triton")[2], args)
    assert whole.dtype == torch.float16
    torch.testing.assert_close(whole, h, rtol=0, atol=0)
    up = [a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
    torch.testing.assert_close(whole.double(), ref_rar(*up), **RAR_STEPS_TOL[torch.float16])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rar_several_chunks(backend, dtype):
    """s = 37: three column chunks of 16 in the Triton kernels, the last partial (fp32 also
    streams E from memory 16 columns at a time); forward and gradients (dropout, one step),
    fp32 against the reference in fp64 on the same (fp32) inputs."""
    rar = _ops(backend)[2]
    args = _rar_sample(dtype, seed=11, T=1, dropout=True, h_given=True, s=37)
    up = [a.double() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
    out = rar(*args)
    torch.testing.assert_close(out.double(), ref_rar(*up), **_tol(dtype, backend))
    tol = _tol(torch.float32, backend) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    leaves = _grad_inputs(args[:9]) + args[9:]
    ref_leaves = _grad_inputs(up[:9]) + up[9:]
    gout = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    idx = [i for i, a in enumerate(leaves) if isinstance(a, Tensor) and a.requires_grad]
    got = torch.autograd.grad((rar(*leaves) * gout.to(dtype)).sum(), [leaves[i] for i in idx])
    exp = torch.autograd.grad((ref_rar(*ref_leaves) * gout).sum(), [ref_leaves[i] for i in idx])
    for i, g, e in zip(idx, got, exp):
        torch.testing.assert_close(g.double(), torch.nan_to_num(e, nan=0.0), **tol, msg=f"input {i}")


def test_triton_launch_buffers_filled_under_the_tests(monkeypatch):
    """kernels/_alloc.empty: every bit set under RCAR_FAST_FILL_EMPTY=1 (this suite's setting,
    tests/conftest.py), so every element is NaN, also viewed as a narrower float (d2 in dF's
    storage); unfilled (torch.empty) with it off; integer buffers never filled."""
    from rcar_fast.backends.triton_kernels import load_kernels
    alloc = importlib.import_module(load_kernels().__name__ + "._alloc")
    assert os.environ.get("RCAR_FAST_FILL_EMPTY") == "1" and alloc.filling()
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        x = alloc.empty((3, 5), dtype=dtype, device="cpu")
        assert x.shape == (3, 5) and x.dtype == dtype and bool(torch.isnan(x).all()), dtype
    assert bool(torch.isnan(alloc.empty((4,), torch.float32, "cpu").view(torch.float16)).all())
    assert alloc.empty((2,), torch.int32, "cpu").dtype == torch.int32
    monkeypatch.setenv("RCAR_FAST_FILL_EMPTY", "0")
    assert not alloc.filling()
    assert alloc.empty((3, 5), dtype=torch.float32, device="cpu").shape == (3, 5)


def triton_dw_gemm_sums_in_fp32(device: str, dtype: torch.dtype) -> None:
    """mm_f32, the GEMM that makes the Triton backward's dW (dY^T (Q - A)^2 over every row, no
    atomics): the products of fp16/bf16 operands summed in fp32, not rounded to the operands'
    dtype (2048 ones and a 1: 2049, which neither fp16 nor bf16 holds), and random operands
    within fp32 rounding of the fp64 product of the same values. On CUDA (tests/test_gpu.py)
    fp16/bf16 take torch.mm's fp32 output; elsewhere the widened operands."""
    from rcar_fast.backends.triton_kernels import load_kernels
    mm_f32 = importlib.import_module(load_kernels().__name__ + ".attention_bwd").mm_f32
    a = torch.ones(2, 2049, dtype=dtype, device=device)
    b = torch.ones(2049, 3, dtype=dtype, device=device)
    got = mm_f32(a, b)
    assert got.dtype == torch.float32 and bool((got == 2049.0).all()), got
    g = torch.Generator().manual_seed(5)
    a = torch.randn(7, 300, generator=g).to(dtype).to(device)
    b = torch.randn(300, 11, generator=g).to(dtype).to(device)
    torch.testing.assert_close(mm_f32(a, b).double().cpu(), a.double().cpu() @ b.double().cpu(), rtol=1e-5, atol=1e-5)


def half_backward_matches_fp32(backend: str, device: str, dtype: torch.dtype) -> None:
    """The attention backward op in fp16/bf16 with F, lam and the projection (the training path):
    dW and db the same bit for bit whether dF is asked for or not (the Triton backward's d2
    scratch then lives in dF's storage, viewed as the inputs' dtype, or in a buffer of its own),
    and every gradient close to the same op's fp32 backward on the same (rounded) inputs (fp16
    measured here within 0.3% of each gradient's largest magnitude; allowed 1%, bf16 5%)."""
    bwd = _ops(backend)[1]
    q, ql, c, cl, f, lam, lam_s, w, bias = _sample(dtype, seed=41, with_state=True, with_weight=True, P=7,
                                                   Lq=6, Lc=9, d=40, s=24, qlens=[6, 1, 3, 6, 5, 2, 4])
    grad = torch.randn(2, 7, 6, 24, generator=torch.Generator().manual_seed(42)).to(dtype)
    args = [x.to(device) if isinstance(x, Tensor) else x for x in (grad, q, ql, c, cl, f, lam, lam_s, w, bias)]
    with_df = bwd(*args, True)
    without_df = bwd(*args, False)
    assert without_df[2].numel() == 0 and with_df[2].numel() > 0
    for i in (4, 5):                        # dweight, dbias
        assert torch.equal(with_df[i], without_df[i]), i
    wide = [x.float() if isinstance(x, Tensor) and x.is_floating_point() else x for x in args]
    want = bwd(*wide, True)
    rel = 1e-2 if dtype == torch.float16 else 5e-2      # of each gradient's largest magnitude
    for i, name in enumerate(("dquery", "dcontext", "dfactors", "dlam", "dweight", "dbias")):
        got, exp = with_df[i].cpu().double(), want[i].cpu().double()
        scale = float(exp.abs().max()) + 1e-6
        err = float((got - exp).abs().max())
        assert torch.isfinite(got).all() and err <= rel * scale, (name, err, scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_backward_matches_fp32(backend):
    half_backward_matches_fp32(backend, "cpu", torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_dw_gemm_sums_in_fp32(dtype):
    triton_dw_gemm_sums_in_fp32("cpu", dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rar_bwd_outputs(backend):
    """rar_bwd's raw outputs (dKp, dgp, dwv per pair) against autograd of the reference."""
    rar_bwd = _ops(backend)[3]
    E, ql, h, wq, bq, wk, bk, wv, bv, kk, kg = _rar_sample(torch.float64, 7, T=1, dropout=True, h_given=True)
    gout = torch.randn(h.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    dE, dh, dKp, dgp, dwv = rar_bwd(gout, E, ql, h, wq, bq, wk, bk, wv, bv, kk, kg)
    B, P, Lq, S = E.shape
    for b in range(B):
        for p in range(P):
            n = int(ql[p])
            e = E[b, p, :n].clone().requires_grad_()
            hh = h[b, p].clone().requires_grad_()
            wvv = wv[0].clone().requires_grad_()
            Kp = e @ wk[0].T + bk[0]
            Kp.retain_grad()
            gp = wq[0] @ hh + bq[0]
            gp.retain_grad()
            K, g = torch.tanh(Kp) * kk[b, p, :n], torch.tanh(gp) * kg[b, p]
            a = torch.softmax((K * g) @ wvv + bv[0], dim=0)
            out = reference.l2n(a @ e)
            (out * gout[b, p]).sum().backward()
            tol = _tol(torch.float64, backend)
            torch.testing.assert_close(dE[b, p, :n].double(), e.grad, **tol)
            torch.testing.assert_close(dh[b, p].double(), hh.grad, **tol)
            torch.testing.assert_close(dKp[b, p, :n].double(), Kp.grad, **tol)
            torch.testing.assert_close(dgp[b, p].double(), gp.grad, **tol)
            # dwv per pair: sum over valid q of dlogit K g; summed over pairs it is wv's gradient
            torch.testing.assert_close(dwv[b, p].double(), wvv.grad, **tol)
            assert not dE[b, p, n:].any() and not dKp[b, p, n:].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    """torch.library.opcheck on all four ops: schema, fake implementation, autograd."""
    att, att_bwd, rar, rar_bwd = _ops(backend)
    for with_state, with_weight in ATTENTION_CASES:
        args = _sample(torch.float64, 1, with_state, with_weight)
        args = [torch.nan_to_num(a) if isinstance(a, Tensor) else a for a in args]
        torch.library.opcheck(att, args)
        torch.library.opcheck(att, _grad_inputs(args))
        grad = torch.randn_like(att(*args))
        torch.library.opcheck(att_bwd, [grad] + args + [True])
    for T, dropout, h_given in RAR_CASES:
        args = _rar_sample(torch.float64, 2, T, dropout, h_given)
        args = [torch.nan_to_num(a) if isinstance(a, Tensor) else a for a in args]
        torch.library.opcheck(rar, args)
        torch.library.opcheck(rar, _grad_inputs(args[:9]) + args[9:])
        E, ql, h0, wq, bq, wk, bk, wv, bv, kk, kg = args
        h = h0 if h0 is not None else E.mean(2)
        torch.library.opcheck(rar_bwd, (torch.randn_like(h), E, ql, h, wq[:1], bq[:1], wk[:1], bk[:1],
                                        wv[:1], bv[:1], kk, kg))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("with_state", [False, True], ids=["F=1,lam=float", "F,lam"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_rcr_matches_torch_rcr_step(backend, with_state, dtype):
    """The inference-only rcr op (C++; Triton: two GEMM kernels with the element-wise work in
    their epilogues, test_triton_rcr_gemm_tiles covers their tiling) against the
    torch backend's RCR step on every valid row; padded rows of the inputs hold NaN and the
    outputs are zero there; a NaN in a valid row's E, factors or lam comes out NaN where torch's
    step gives NaN (the clamp and the relu keep it: no silent -1, 1 or 0); opcheck."""
    from rcar_testutil import rcr_op, rcr_op_case
    B, P, Lq, d = 3, 7, 5, 140
    args, want_F, want_lam, pad = rcr_op_case(B, d, 6, with_state, lambda x: x.to(dtype), nan_valid=True)
    # the reference carries the valid rows' NaN: E's to a whole row of F and lam, F's and lam's to one entry
    assert int(want_F.isnan().sum()) == d + (1 if with_state else 0)
    assert int(want_lam.isnan().sum()) == 1 + (1 if with_state else 0)
    op = rcr_op(backend)
    got_F, got_lam = op(*args)
    assert got_F.dtype == dtype and got_F.shape == (B, P, Lq, d) and got_lam.shape == (B, P, Lq)
    exact64 = dtype == torch.float64 and backend != "triton"      # Triton accumulates in fp32
    tol = dict(rtol=1e-10, atol=1e-12) if exact64 else dict(rtol=1e-5, atol=2e-6)
    valid = ~pad
    torch.testing.assert_close(got_F[:, valid].double(), want_F[:, valid], **tol, equal_nan=True)
    torch.testing.assert_close(got_lam[:, valid].double(), want_lam[:, valid], **tol, equal_nan=True)
    assert not got_F[:, pad].any() and not got_lam[:, pad].any()
    if dtype == torch.float64:
        torch.library.opcheck(op, [torch.nan_to_num(a) if isinstance(a, Tensor) else a for a in args])


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-6), (torch.float16, 4e-3)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("with_state", [False, True], ids=["F=1,lam=float", "F,lam"])
def test_triton_rcr_gemm_tiles(with_state, dtype, atol):
    """The Triton rcr op's two GEMM kernels over several tiles in every direction (asserted from
    the launcher's config): 245 rows (B = 7; 4 row blocks of 64 for fp32, 2 of 128 for fp16),
    d = 300 (5 column blocks of 64, 2 of 256), s = 136: the hidden program runs down the 272 rows
    of W1 and the 68 of ws1 in 6 blocks of 64, the fifth holding both (columns 256..271 of H, then
    the temperatures' first 48), the last partial; the hidden K = 136 over 9 chunks (fp32) or one
    masked 256-wide tile (fp16), the factors' K = 272 over 17 and 9 chunks; padded rows NaN in,
    zero out."""
    if "triton" not in BACKENDS:
        pytest.skip("triton not available here")
    from rcar_testutil import rcr_op, rcr_op_case
    from rcar_fast.backends.triton_kernels import load_kernels
    rcr = importlib.import_module(load_kernels().__name__ + ".rcr")
    B, d, s = 7, 300, 136
    for which in ("hidden", "factors"):     # the case spans several blocks of each kernel's tiles
        cfg = rcr.rcr_gemm_config(dtype != torch.float32, s, which)
        assert B * 7 * 5 > cfg["BM"] and (2 * s if which == "hidden" else d) > cfg["BN"]
        assert (s if which == "hidden" else 2 * s) > cfg["BK"]
        if which == "hidden":   # a column block holds the last of H and the first of the temperatures
            assert 2 * s % cfg["BN"] and (2 * s + s // 2) % cfg["BN"] and cfg["BS"] > s
    args, want_F, want_lam, pad = rcr_op_case(B, d, s, with_state, lambda x: x.to(dtype))
    got_F, got_lam = rcr_op("triton")(*args)
    assert got_F.dtype == dtype and got_F.shape == (B, 7, 5, d) and got_lam.shape == (B, 7, 5)
    valid = ~pad
    torch.testing.assert_close(got_F[:, valid].double(), want_F[:, valid], rtol=1e-5, atol=atol)
    torch.testing.assert_close(got_lam[:, valid].double(), want_lam[:, valid], rtol=1e-5, atol=atol * 10)
    assert not got_F[:, pad].any() and not got_lam[:, pad].any()


def test_triton_rcr_inputs_made_aligned():
    """The Triton RCR kernels promise the compiler 16-byte aligned matrices: the launcher copies a
    view at an unaligned address (and leaves an aligned one in place)."""
    if "triton" not in BACKENDS:
        pytest.skip("triton not available here")
    from rcar_fast.backends.triton_kernels import load_kernels
    rcr = importlib.import_module(load_kernels().__name__ + ".rcr")
    base = torch.arange(40, dtype=torch.float16)
    view = base[1:33].view(4, 8)
    assert view.data_ptr() % 16 != 0
    got = rcr._aligned(view)
    assert got.data_ptr() % 16 == 0 and torch.equal(got, view)
    assert rcr._aligned(base).data_ptr() == base.data_ptr()


def test_triton_rcr_takes_strided_weights_and_biases():
    """The hidden kernel reads W1, b1, ws1 and bs1 from their own pointers as contiguous rows: the
    launcher makes strided views contiguous (here each weight and bias a view of every other
    element of a larger tensor), and the step equals the one on contiguous copies."""
    if "triton" not in BACKENDS:
        pytest.skip("triton not available here")
    from rcar_testutil import rcr_op_case
    from rcar_fast.backends.triton_kernels import load_kernels
    rcr = importlib.import_module(load_kernels().__name__ + ".rcr")
    args, *_ = rcr_op_case(1, 20, 16, True, lambda x: x.float())
    weights = list(args[5:])

    def spread(t):      # the same values at every other element of a tensor twice as long
        wide = torch.full(t.shape[:-1] + (2 * t.shape[-1],), float("nan"), dtype=t.dtype)
        wide[..., ::2] = t
        view = wide[..., ::2]
        assert not view.is_contiguous() and torch.equal(view, t)
        return view
    strided = [spread(w) if i in (0, 1, 4, 5) else w for i, w in enumerate(weights)]   # w1, b1, ws1, bs1
    want = rcr.rcr_step(*args[:5], *weights)
    got = rcr.rcr_step(*args[:5], *strided)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


def test_interpreter_patches_the_language_once_per_launch_and_where_a_call_needs_it():
    """kernels/_interpreter.py: inside a launch a device function is not re-patched when the
    launch has patched the language modules it names (every kernel here runs that way), and is
    patched when it names one the launch did not (tl.core, where the kernel's module names only
    tl: unpatched, core.add has no semantic and fails); the patches come from each module's list
    of builtins (every interpreter-tier test runs through them)."""
    if "triton" not in BACKENDS or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter only")
    from rcar_fast.backends.triton_kernels import load_kernels
    interp = importlib.import_module(load_kernels().__name__ + "._interpreter")
    assert interp.use_one_patch_per_launch() and interp.use_listed_builtins()   # installed (kernels/__init__)
    from interp_core_helper import add_one_kernel
    x = torch.arange(16, dtype=torch.float32)
    add_one_kernel[(1,)](x, B=16)
    assert torch.equal(x, torch.arange(16, dtype=torch.float32) + 1)


def test_triton_rcr_rejects_more_rows_than_int32_indexes():
    """The Triton RCR kernels index rows in int32: more than 2^31 - 1 rows (B * P * Lq) is a
    ValueError naming E, before anything is allocated or launched (E here an expanded view)."""
    if "triton" not in BACKENDS:
        pytest.skip("triton not available here")
    from rcar_testutil import rcr_op_case
    from rcar_fast.backends.triton_kernels import load_kernels
    rcr = importlib.import_module(load_kernels().__name__ + ".rcr")
    args, *_ = rcr_op_case(1, 20, 6, False, lambda x: x.float())
    E = args[0][:1, :1, :1].expand(2 ** 16, 2 ** 12, 2 ** 3, 6)
    with pytest.raises(ValueError, match=r"E: the Triton RCR step takes at most 2147483647 rows .* got 2147483648"):
        rcr.rcr_step(E, torch.ones(2 ** 12, dtype=torch.int32), None, None, 4.0, *args[5:])


def test_triton_rejects_shapes_past_the_compiled_range():
    """The Triton kernels take at most 64 query/context rows and s <= 256 per pair (the range the
    compile tier checks): past it, a ValueError naming the argument, before any launch."""
    if "triton" not in BACKENDS:
        pytest.skip("triton not available here")
    att, _, rar, _ = _ops("triton")
    args = _sample(torch.float32, seed=1, with_state=False, with_weight=True, Lq=65)
    with pytest.raises(ValueError, match="query: the Triton kernels take at most 64 query rows"):
        att(*args)
    args = _sample(torch.float32, seed=1, with_state=False, with_weight=True, Lc=70)
    with pytest.raises(ValueError, match="context: the Triton kernels take at most 64 context rows"):
        att(*args)
    args = _sample(torch.float32, seed=1, with_state=False, with_weight=True, s=300)
    with pytest.raises(ValueError, match="weight: the Triton kernels take alignment vectors of at most 256"):
        att(*args)
    args = _rar_sample(torch.float32, seed=1, T=1, dropout=False, h_given=False, Lq=65)
    with pytest.raises(ValueError, match="E: the Triton kernels take at most 64 rows"):
        rar(*args)
