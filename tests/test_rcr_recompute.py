"""RCR's recomputing autograd step (rcar_fast.torch_math.rcr_step_recomputed), which the fused
backends' training path takes (KernelSet.rcr_recompute): the same values and gradients as plain
autograd through rcr_step, in several chunks of rows, with nothing d-wide saved for backward."""

from __future__ import annotations

import pytest
import torch

import rcar_fast
from rcar_fast import torch_math as tm
from rcar_testutil import make_head, make_inputs, rcr_op_case


def _case(with_state: bool, dtype, seed: int = 5):
    """(E, factors, lam, weights) of rcr_op_case (d 20, s 6; rows 2 x 7 x 5 = 70), as leaves in
    ``dtype`` that require grad (factors and lam only ``with_state``), padded rows finite."""
    args, *_ = rcr_op_case(2, 20, 6, with_state, lambda x: x.to(dtype), seed)
    E, _, factors, lam, lam_scalar, *weights = args
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(E.shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    if factors is not None:
        factors = (torch.rand(factors.shape, generator=g, dtype=torch.float64) * 2.4 - 1.2).to(dtype)
        factors.requires_grad_()
        lam = (torch.rand(lam.shape, generator=g, dtype=torch.float64) * 4 - 1).to(dtype).requires_grad_()
    else:
        lam = lam_scalar
    w = {n: x.detach().clone().requires_grad_() for n, x in zip(tm.RCR_NAMES, weights)}
    return E, factors, lam, w


def _grads(fn, E, factors, lam, w, keep_F=None, keep_lam=None):
    """(F, lam) of fn and the gradients of a loss that weights every output element differently
    (by 0 where ``keep_F`` / ``keep_lam`` is False)."""
    Fn, lam_n = fn(E, factors, lam, w)
    gF = torch.linspace(-1, 2, Fn.numel(), dtype=torch.float64).view(Fn.shape)
    glam = torch.linspace(2, -1, lam_n.numel(), dtype=torch.float64).view(lam_n.shape)
    gF = gF if keep_F is None else gF * keep_F
    glam = glam if keep_lam is None else glam * keep_lam
    leaves = [E] + [x for x in (factors, lam) if isinstance(x, torch.Tensor)] + list(w.values())
    loss = (Fn * gF.to(Fn.dtype)).sum() + (lam_n * glam.to(lam_n.dtype)).sum()
    return (Fn, lam_n), torch.autograd.grad(loss, leaves)


def _plain(E, factors, lam, w):
    return tm.rcr_step(E, factors, lam, w, "", False)


def _recomputed(E, factors, lam, w):
    return tm.rcr_step_recomputed(E, factors, lam, w, "")


@pytest.mark.parametrize("chunks,min_rows", [(1, 256), (3, 1), (8, 1), (70, 1), (4, 30)])
@pytest.mark.parametrize("with_state", [False, True])
def test_values_and_gradients_equal_plain_autograd(chunks, min_rows, with_state, monkeypatch):
    """fp64: F, lam and every gradient (E, factors, lam, the eight weights) as plain autograd's,
    in one chunk, several uneven ones, one row each, and chunks held to a minimum length. The
    factors cross +-1 and lam crosses 0, so the clamp and the relu both cut."""
    monkeypatch.setattr(tm, "RCR_CHUNKS", chunks)
    monkeypatch.setattr(tm, "RCR_MIN_CHUNK_ROWS", min_rows)
    case = _case(with_state, torch.float64)
    (F1, l1), g1 = _grads(_recomputed, *case)
    (F0, l0), g0 = _grads(_plain, *case)
    assert ((F0 == 1) | (F0 == -1)).any() and ((F0 > -1) & (F0 < 1)).any()
    torch.testing.assert_close(F1, F0, rtol=0, atol=1e-14)
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-14)
    if with_state:
        assert (l0 == 0).any() and (l0 > 0).any()
    assert len(g1) == len(g0) == (11 if with_state else 9)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


def test_chunks_cover_every_row_once(monkeypatch):
    """The chunks tile the rows in order, without gap or overlap, at most RCR_CHUNKS of them, each
    at least RCR_MIN_CHUNK_ROWS rows but the last."""
    for chunks, min_rows in [(8, 256), (3, 1), (8, 1), (5, 7)]:
        monkeypatch.setattr(tm, "RCR_CHUNKS", chunks)
        monkeypatch.setattr(tm, "RCR_MIN_CHUNK_ROWS", min_rows)
        for rows in [1, 2, 7, 69, 70, 255, 256, 257, 2049, 73728]:
            cut = tm._chunks(rows)
            assert cut[0][0] == 0 and cut[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(cut, cut[1:]))
            assert len(cut) <= chunks
            assert all(r1 - r0 >= min(min_rows, rows) for r0, r1 in cut[:-1])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.5e-2)])
def test_half_and_single_precision_gradients(dtype, tol, monkeypatch):
    """fp32, fp16 and bf16 in 3 chunks against plain autograd in fp64 on the same (rounded)
    inputs, at the elements whose clamp and relu masks are not in doubt: where the clamp's input
    is within 1% of +-1 or relu's within 0.05 of 0 the loss does not weight the output (a mask
    that rounding flips moves a gradient by O(1), in plain autograd too). Every gradient within
    about two of the dtype's ulps of its largest entry (measured, largest over the gradients:
    fp16 7.4e-4, bf16 8.0e-3; plain autograd on the same inputs: fp16 1.3e-3, bf16 7.5e-3)."""
    monkeypatch.setattr(tm, "RCR_CHUNKS", 3)
    monkeypatch.setattr(tm, "RCR_MIN_CHUNK_ROWS", 1)
    E, factors, lam, w = _case(True, dtype)
    E64, f64, lam64 = (x.detach().double().requires_grad_() for x in (E, factors, lam))
    w64 = {k: v.detach().double().requires_grad_() for k, v in w.items()}
    with torch.no_grad():     # the clamp's and relu's inputs in fp64
        def lin(x, name):
            return torch.nn.functional.linear(x, w64[name + ".weight"], w64[name + ".bias"])
        z = torch.tanh(lin(torch.tanh(lin(E64, "rcr_matrix_w.0")), "rcr_matrix_w.2")) + f64
        o = lin(torch.tanh(lin(E64, "rcr_smooth_w.0")), "rcr_smooth_w.2").squeeze(-1) + lam64
    keep_F = (z.abs() - 1).abs() > 0.01
    keep_lam = o.abs() > 0.05
    assert keep_F.float().mean() > 0.8 and keep_lam.float().mean() > 0.8
    (F1, l1), g1 = _grads(_recomputed, E, factors, lam, w, keep_F, keep_lam)
    (F0, l0), g0 = _grads(_plain, E64, f64, lam64, w64, keep_F, keep_lam)
    assert F1.dtype == dtype and all(g.dtype == dtype for g in g1)
    torch.testing.assert_close(F1.double(), F0, rtol=tol, atol=tol)
    torch.testing.assert_close(l1.double(), l0, rtol=tol, atol=tol)
    for a, b in zip(g1, g0):
        scale = b.abs().max().clamp(min=1)
        torch.testing.assert_close(a.double() / scale, b / scale, rtol=tol, atol=tol)


def test_saves_only_its_inputs():
    """Nothing the forward computes is saved for backward: every saved tensor is one of the
    step's inputs (E, factors, lam, the weights), so a block keeps no d-wide RCR activation
    between its forward and its backward (plain autograd saves three)."""
    E, factors, lam, w = _case(True, torch.float64)
    inputs = {x.data_ptr() for x in [E, factors, lam, *w.values()]}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        Fn, lam_n = _recomputed(E, factors, lam, w)
    assert saved and all(t.data_ptr() in inputs for t in saved)
    plain = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: plain.append(t) or t, lambda t: t):
        _plain(E, factors, lam, w)
    assert sum(t.shape == factors.shape and t.data_ptr() not in inputs for t in plain) >= 2


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_fused_backends_train_through_it_and_torch_does_not(backend, monkeypatch):
    """The fused backends' training step calls the recomputing step (one call per RCR step, the
    gradients of the reference's within fp64 rounding, in several chunks), triton with its kernel
    for the d-wide chain (kernels/rcr.py rcr_factors_bwd), cpp with the extension's op
    (rcr_factors_bwd); the torch backend keeps plain autograd."""
    if rcar_fast.backend_status()[backend] != "available":
        pytest.skip(f"{backend}: {rcar_fast.backend_status()[backend]}")
    monkeypatch.setattr(tm, "RCR_CHUNKS", 4)
    monkeypatch.setattr(tm, "RCR_MIN_CHUNK_ROWS", 1)
    calls = []
    original = tm.rcr_step_recomputed

    def counting(*args):
        calls.append(args[4])
        chains.append(args[5])
        return original(*args)
    chains = []
    monkeypatch.setattr(tm, "rcr_step_recomputed", counting)
    img, cap, lens = make_inputs(2, 3, 5, 6, 24, torch.float64, 3)
    head = make_head("coop_rcar", 3, "i2t", 24, 8, torch.float64, 3).eval()
    grads = {}
    for name in ("reference", "torch", backend):
        calls.clear()
        x, y = img.clone().requires_grad_(), cap.clone().requires_grad_()
        out = head(x, y, lens, backend=name)
        grads[name] = torch.autograd.grad(out.sum(), [x, y] + list(head.parameters()), allow_unused=True)
        if name != backend:
            assert calls == []
            continue
        # every block's two RCR steps in forward, then again in the checkpointed recompute
        blocks = len(calls) // 4
        assert blocks >= 1 and calls == ["rcr_modules.0.", "rcr_modules.1."] * (2 * blocks)
        kernel = _triton_rcr().rcr_factors_bwd if backend == "triton" else _extension_chain()
        assert chains and all(c is kernel for c in chains)
    tol = dict(rtol=1e-5, atol=1e-7) if backend == "triton" else dict(rtol=1e-9, atol=1e-11)
    for got, want in zip(grads[backend], grads["reference"]):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, **tol)


needs_triton = pytest.mark.skipif("triton" not in rcar_fast.available_backends("cpu"), reason="triton not importable")


def _triton_rcr():
    import importlib

    from rcar_fast.backends.triton_kernels import load_kernels
    return importlib.import_module(load_kernels().__name__ + ".rcr")


def _chain_case(n: int, d: int, h: int, with_f: bool, dtype, seed: int = 11):
    """(hidden (n, h), w2 (d, h), b2 (d,), factors or None, grad (n, d)) in ``dtype``: hidden a
    tanh output, M = hidden W2^T + b2 of O(1), factors crossing +-1."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.tanh(torch.randn(n, h, generator=g, dtype=torch.float64)).to(dtype)
    w2 = (torch.randn(d, h, generator=g, dtype=torch.float64) / h ** 0.5).to(dtype)
    b2 = (torch.randn(d, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    fac = (torch.rand(n, d, generator=g, dtype=torch.float64) * 2.4 - 1.2).to(dtype) if with_f else None
    grad = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    return hidden, w2, b2, fac, grad


@needs_triton
@pytest.mark.parametrize("with_f", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,d", [(70, 20), (130, 300)])
def test_triton_factors_bwd_matches_the_chain(n, d, dtype, with_f):
    """kernels/rcr.py rcr_factors_bwd (interpreter) against the chain in fp64 on the same
    inputs, over several row and column tiles (n past a tile of rows, d below and above a column
    tile): factors_bwd_matches_the_chain."""
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    factors_bwd_matches_the_chain(_triton_rcr().rcr_factors_bwd, n, d, dtype, with_f, tol)


def _extension_chain():
    """The extension's rcr_factors_bwd op (the "cpp" kernel set's chain), or a skip."""
    from rcar_fast.backends import extension_kernels
    if extension_kernels.CPP.rcr_factors_bwd is None:
        pytest.skip("the extension has no CPU rcr_factors_bwd")
    return extension_kernels.CPP.rcr_factors_bwd


@pytest.mark.parametrize("with_f", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_extension_factors_bwd_matches_the_chain(dtype, with_f):
    """The extension's rcr_factors_bwd op on CPU (float, double for double; one rounding to the
    inputs' dtype) against the chain in fp64: factors_bwd_matches_the_chain. Its CUDA kernels:
    tests/test_cuda_emu.py test_rcr_factors_bwd (emulator) and test_gpu.py."""
    tol = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6),
           torch.float16: dict(rtol=2e-3, atol=2e-3)}[dtype]
    factors_bwd_matches_the_chain(_extension_chain(), 70, 300, dtype, with_f, tol)


def chain_fp64(hidden, w2, b2, fac, grad):
    """The chain in fp64 on the given (rounded) inputs: (t = tanh(hidden W2^T + b2), gz = grad
    [|z| <= 1] with z = t + F (1 without F), the elements whose mask rounding cannot flip (|z|
    not within 1% of 1: most of them, with both sides of the clamp), grad in fp64)."""
    h64, w64, b64, g64 = (x.double() for x in (hidden, w2, b2, grad))
    t = torch.tanh(h64 @ w64.t() + b64)
    z = t + (1.0 if fac is None else fac.double())
    gz = torch.where(z.abs() <= 1, g64, torch.zeros(()).double())
    sure = (z.abs() - 1).abs() > 0.01
    assert sure.float().mean() > 0.8 and (gz[sure] == 0).any() and (gz[sure] != 0).any()
    return t, gz, sure, g64


def factors_bwd_matches_the_chain(fn, n, d, dtype, with_f, tol, device="cpu", h=16):
    """fn(hidden, w2, b2, factors, grad, dF) (a kernel set's rcr_factors_bwd) against the chain
    in fp64 on the same inputs: gm = grad [|z| <= 1] (1 - t^2) and dF = grad [|z| <= 1],
    t = tanh(hidden W2^T + b2), z = t + F (1 without F), at the elements whose mask rounding cannot
    flip (|z| not within 1% of 1); the rest of the elements (the mask's choice either way) are zero
    or gz's value. dF NaN-filled before, so an element fn leaves unwritten shows."""
    hidden, w2, b2, fac, grad = (None if x is None else x.to(device) for x in _chain_case(n, d, h, with_f, dtype))
    dF = torch.full((n, d), float("nan"), dtype=dtype, device=device)
    gm = fn(hidden, w2, b2, fac, grad, dF)
    hidden, w2, b2, fac, grad, gm, dF = (None if x is None else x.cpu() for x in (hidden, w2, b2, fac, grad, gm, dF))
    t, gz, sure, g64 = chain_fp64(hidden, w2, b2, fac, grad)
    assert gm.dtype == dF.dtype == dtype
    torch.testing.assert_close(gm.double()[sure], (gz * (1 - t * t))[sure], **tol)
    torch.testing.assert_close(dF.double()[sure], gz[sure], **tol)
    unsure = ~sure
    assert ((dF.double()[unsure] == 0) | ((dF.double() - g64).abs()[unsure] <= 1e-3 * g64.abs()[unsure])).all()


@needs_triton
def test_triton_factors_bwd_without_df_and_into_a_misaligned_view():
    """No dfactors: only gm (the kernel's dF store is compiled out); dfactors a view whose rows
    start off a 16-byte boundary (fp16, d 20: 40-byte rows, from row 1): written all the same,
    through a buffer (the kernel's stores assume aligned rows), its neighbours untouched."""
    rcr = _triton_rcr()
    hidden, w2, b2, fac, grad = _chain_case(9, 20, 16, True, torch.float16)
    ref_df = torch.empty(9, 20, dtype=torch.float16)
    ref = rcr.rcr_factors_bwd(hidden, w2, b2, fac, grad, ref_df)
    torch.testing.assert_close(rcr.rcr_factors_bwd(hidden, w2, b2, fac, grad), ref, rtol=0, atol=0)
    big = torch.full((10, 20), 7.0, dtype=torch.float16)
    view = big[1:]
    assert view.data_ptr() % 16 != 0
    got = rcr.rcr_factors_bwd(hidden, w2, b2, fac, grad, view)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(view, ref_df, rtol=0, atol=0)
    assert (big[0] == 7).all()


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("chain", ["triton", "extension"])
def test_recomputed_step_with_a_kernel_chain_equals_the_torch_chain(chain, with_state, monkeypatch):
    """rcr_step_recomputed with a kernel set's op for its d-wide chain (as the triton, cpp and cuda
    backends train) against the torch ops' chain: the same gradients (fp64 inputs: the Triton kernel
    computes in fp32, the extension's CPU op in fp64), in 3 chunks (dF written into row slices of
    one buffer)."""
    monkeypatch.setattr(tm, "RCR_CHUNKS", 3)
    monkeypatch.setattr(tm, "RCR_MIN_CHUNK_ROWS", 1)
    if chain == "triton" and "triton" not in rcar_fast.available_backends("cpu"):
        pytest.skip("triton not importable")
    kernel = _triton_rcr().rcr_factors_bwd if chain == "triton" else _extension_chain()
    tol = dict(rtol=1e-5, atol=1e-6) if chain == "triton" else dict(rtol=1e-12, atol=1e-13)
    case = _case(with_state, torch.float64)
    _, g_torch = _grads(_recomputed, *case)
    _, g_kernel = _grads(lambda E, f, lam, w: tm.rcr_step_recomputed(E, f, lam, w, "", kernel), *case)
    for a, b in zip(g_kernel, g_torch):
        scale = b.abs().max().clamp(min=1)
        torch.testing.assert_close(a / scale, b / scale, **tol)


def test_extension_factors_bwd_refuses_bad_input_by_name():
    """The extension's rcr_factors_bwd checks every argument before any work: a wrong shape or
    dtype gets an error naming the argument; dfactors a view whose rows are not contiguous is
    written all the same (through a buffer), its neighbours untouched; its fake has gm's shape, and
    opcheck holds (the schema's declared mutation of dfactors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    fn = _extension_chain()
    hidden, w2, b2, fac, grad = _chain_case(9, 20, 16, True, torch.float32)
    bad = {"w2": (hidden, w2[:, :5], b2, fac, grad, None), "b2": (hidden, w2, b2[:3], fac, grad, None),
           "factors": (hidden, w2, b2, fac[:4], grad, None), "grad": (hidden, w2, b2, fac, grad.double(), None),
           "dfactors": (hidden, w2, b2, fac, grad, torch.empty(9, 21)), "hidden": (hidden[0], w2, b2, fac, grad, None)}
    for name, args in bad.items():
        with pytest.raises(RuntimeError, match=f"^{name}: expected"):
            fn(*args)
    ref_df = torch.empty(9, 20)
    ref = fn(hidden, w2, b2, fac, grad, ref_df)
    big = torch.full((9, 30), 7.0)
    view = big[:, 5:25]
    assert not view.is_contiguous()
    torch.testing.assert_close(fn(hidden, w2, b2, fac, grad, view), ref, rtol=0, atol=0)
    torch.testing.assert_close(view, ref_df, rtol=0, atol=0)
    assert (big[:, :5] == 7).all() and (big[:, 25:] == 7).all()
    with FakeTensorMode():
        out = torch.ops.rcar_fast.rcr_factors_bwd(torch.empty(9, 16), torch.empty(20, 16), torch.empty(20), None,
                                                  torch.empty(9, 20), None)
    assert out.shape == (9, 20) and out.dtype == torch.float32
    for args in ((hidden, w2, b2, fac, grad, torch.empty(9, 20)), (hidden, w2, b2, None, grad, None)):
        torch.library.opcheck(torch.ops.rcar_fast.rcr_factors_bwd.default, args)   # schema (the mutation), fake
