"""The GPU tier's checks, written once as functions of (backend, device, sizes).

tests/test_gpu.py runs them on CUDA tensors at Flickr-like sizes (skipped without a GPU);
tests/test_gpu_cases_cpu.py runs the very same functions on CPU tensors at small sizes with the
backends the CPU has (cpp, and triton through its interpreter), so a bug in a GPU test itself
(a module converted in place, a wrong dtype, a comparison that cannot fail) fails in CI, not in
the first minutes of a lent GPU.

Every check compares against the reference in float64 on the CPU, from fresh random inputs with
NaN in the padding, on a head that is copied, never converted in place.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import pytest
import torch

import rcar_fast
from rcar_fast import dropout, reference
from rcar_testutil import index_keep_masks, make_head, make_inputs, params_of, rcr_op, rcr_op_case

#: every (regulator, steps) set-up of the GPU tier
CONFIGS = [("only_rar", 2), ("only_rcr", 2), ("coop_rcar", 1), ("coop_rcar", 2), ("coop_rcar", 3)]
#: backends the GPU tier is for
GPU_BACKENDS = ("triton", "cuda")


class Dims(NamedTuple):
    n_i: int
    n_c: int
    R: int
    L: int
    d: int
    s: int


def _ref_scores(head, img, cap, lens, regulator, steps, attn_type):
    """The reference's scores in float64 on the CPU, for a copy of ``head``."""
    h = copy.deepcopy(head).double().cpu()
    with torch.no_grad():
        return reference.rcar_scores(img.double().cpu(), cap.double().cpu(), lens, params_of(h),
                                     regulator, steps, attn_type, h.smooth)


def fp32_matches_reference(backend, device, regulator, steps, attn_type, dims: Dims, seed: int, atol=1e-5,
                           lens=None):
    """float32 scores of ``backend`` on ``device`` within ``atol`` of the float64 reference;
    every element written (the output is copied into a NaN-filled buffer) and finite. ``lens``:
    the caption lengths (default random 1..L)."""
    img, cap, lens = make_inputs(dims.n_i, dims.n_c, dims.R, dims.L, dims.d, torch.float32, seed, lens=lens)
    head = make_head(regulator, steps, attn_type, dims.d, dims.s, torch.float32, seed)
    want = _ref_scores(head, img, cap, lens, regulator, steps, attn_type)
    h = copy.deepcopy(head).to(device)
    out = torch.full((dims.n_i, dims.n_c), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        got = h(img.to(device), cap.to(device), lens, backend=backend)
    assert got.dtype == torch.float32 and got.device.type == torch.device(device).type
    out.copy_(got.cpu())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=0, atol=atol)


def half_error_within_twice_torch(backend, device, dtype, regulator, steps, attn_type, dims: Dims, seed: int):
    """Half-precision scores: the error against the float64 reference at most twice that of the
    torch backend in the same dtype on the same device, + 1e-4; finite; float32."""
    img, cap, lens = make_inputs(dims.n_i, dims.n_c, dims.R, dims.L, dims.d, torch.float32, seed)
    head = make_head(regulator, steps, attn_type, dims.d, dims.s, torch.float32, seed)
    want = _ref_scores(head, img, cap, lens, regulator, steps, attn_type)
    h = copy.deepcopy(head).to(device=device, dtype=dtype)
    x, y = img.to(device, dtype), cap.to(device, dtype)
    with torch.no_grad():
        got = h(x, y, lens, backend=backend)
        base = h(x, y, lens, backend="torch")
    assert got.dtype == torch.float32       # half-precision features score in float32 (ops.rcar_scores)
    got, base = got.double().cpu(), base.double().cpu()
    err, err_torch = (got - want).abs().max().item(), (base - want).abs().max().item()
    assert torch.isfinite(got).all()
    assert err <= 2 * err_torch + 1e-4, (err, err_torch)


def flickr_shaped_block(backend, device, dtype, n_i: int, n_c: int):
    """n_i images x n_c captions of Flickr shape (R 36, d 1024, lengths 6..24, NaN padding) with
    the default head (coop_rcar T = 2, s 256) in ``dtype``: runs, finite, within 2e-2 of the
    float32 torch backend on the same inputs."""
    g = torch.Generator().manual_seed(3)
    img = torch.nn.functional.normalize(torch.randn(n_i, 36, 1024, generator=g), dim=-1)
    cap = torch.nn.functional.normalize(torch.randn(n_c, 24, 1024, generator=g), dim=-1)
    lens = torch.randint(6, 25, (n_c,), generator=g)
    cap[torch.arange(24)[None, :] >= lens[:, None]] = float("nan")
    torch.manual_seed(3)
    head = rcar_fast.RCARSimilarity().eval().to(device)
    half = copy.deepcopy(head).to(dtype)
    with torch.no_grad():
        want = head(img.to(device), cap.to(device), lens, backend="torch")
        got = half(img.to(device, dtype), cap.to(device, dtype), lens, backend=backend)
    assert got.dtype == torch.float32 and got.shape == (n_i, n_c)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max().item() < 2e-2


def _grads(head, backend, img, cap, lens, dtype, device, **kw):
    """(scores, gradients of img, cap and every parameter of sum(w * scores)) as float64 CPU."""
    h = copy.deepcopy(head).to(device=device, dtype=dtype)
    x = img.to(device, dtype).requires_grad_()
    y = cap.to(device, dtype).requires_grad_()
    params = list(h.parameters())
    out = h(x, y, lens, backend=backend, **kw)
    assert out.dtype == dtype
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    gs = torch.autograd.grad((out * w).sum(), [x, y] + params, allow_unused=True)
    return out.detach().double().cpu(), [None if g is None else g.double().cpu() for g in gs]


def gradients_match_reference(backend, device, regulator, steps, attn_type, dims: Dims, seed: int):
    """float32 gradients of img, cap and every parameter through ``backend``'s backward on
    ``device`` against the float64 reference (a deep copy of the same head); NaN padding gets
    exactly zero gradient."""
    img, cap, lens = make_inputs(dims.n_i, dims.n_c, dims.R, dims.L, dims.d, torch.float32, seed)
    head = make_head(regulator, steps, attn_type, dims.d, dims.s, torch.float32, seed)
    _, want = _grads(head, "reference", img, cap, lens, torch.float64, "cpu")
    _, got = _grads(head, backend, img, cap, lens, torch.float32, device)
    assert len(got) == len(want) == 2 + len(list(head.parameters()))
    for g, r in zip(got, want):
        if r is None:
            assert g is None or not g.any()
            continue
        assert g is not None and torch.isfinite(g).all()
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    for j, lj in enumerate(lens.tolist()):
        assert not got[1][j, lj:].any()


def training_step_with_dropout(backend, device, dims: Dims, seed: int = 9):
    """Training mode, coop_rcar T = 2, float32: with fixed dropout masks the scores and every
    gradient match the float64 reference under the same masks; with random masks two calls
    differ, the same torch seed repeats them, and every parameter gets a finite gradient."""
    img, cap, lens = make_inputs(dims.n_i, dims.n_c, dims.R, dims.L, dims.d, torch.float32, seed)
    head = make_head("coop_rcar", 2, "t2i", dims.d, dims.s, torch.float32, seed).train()
    with dropout.fixed_keep_masks(index_keep_masks):
        want_s, want = _grads(head, "reference", img, cap, lens, torch.float64, "cpu")
        got_s, got = _grads(head, backend, img, cap, lens, torch.float32, device)
    torch.testing.assert_close(got_s, want_s, rtol=0, atol=1e-5)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
    torch.manual_seed(1)
    a, ga = _grads(head, backend, img, cap, lens, torch.float32, device)
    torch.manual_seed(1)
    b, _ = _grads(head, backend, img, cap, lens, torch.float32, device)
    c, _ = _grads(head, backend, img, cap, lens, torch.float32, device)
    assert torch.equal(a, b), "the same seed gave different dropout masks"
    assert (a - c).abs().max() > 1e-4, "dropout inactive in training mode"
    assert all(g is not None and torch.isfinite(g).all() for g in ga)
    assert all(g.any() for g in ga[2:] if g is not None and g.numel() > 1)


def pair_scores_match_the_grid(backend, device, regulator, steps, attn_type, dims: Dims, seed: int, m: int = 64):
    """The pair list (the attention's paired form, rcar_fast.ops.pair_scores): an unsorted list of
    ``m`` pairs with repeats, float32 on ``device``: every entry within 1e-5 of the float64
    reference and within 1e-6 of the same backend's grid at that pair; gradients of img, cap and
    every parameter (dcontext accumulated through the index) within the gradient tier's tolerance
    of the float64 reference's; NaN padding gets exactly zero gradient."""
    img, cap, lens = make_inputs(dims.n_i, dims.n_c, dims.R, dims.L, dims.d, torch.float32, seed)
    head = make_head(regulator, steps, attn_type, dims.d, dims.s, torch.float32, seed)
    g = torch.Generator().manual_seed(seed)
    ii, cc = torch.randint(0, dims.n_i, (m,), generator=g), torch.randint(0, dims.n_c, (m,), generator=g)
    ii[1::7], cc[1::7] = int(ii[0]), int(cc[0])
    h = copy.deepcopy(head).to(device)
    with torch.no_grad():
        got = h.pair_scores(img.to(device), cap.to(device), lens, ii.to(device), cc, backend=backend)
        grid = h(img.to(device), cap.to(device), lens, backend=backend)
    want = _ref_scores(head, img, cap, lens, regulator, steps, attn_type)[ii, cc]
    out = torch.full((m,), float("nan"), dtype=torch.float64)
    out.copy_(got.cpu())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got, grid[ii.to(device), cc.to(device)], rtol=0, atol=1e-6)

    def pair_grads(name, dtype, dev):
        hh = copy.deepcopy(head).to(device=dev, dtype=dtype)
        x = img.to(dev, dtype).requires_grad_()
        y = cap.to(dev, dtype).requires_grad_()
        out = hh.pair_scores(x, y, lens, ii, cc, backend=name)
        w = torch.linspace(0.5, 1.5, m, dtype=out.dtype, device=out.device)
        gs = torch.autograd.grad((out * w).sum(), [x, y] + list(hh.parameters()), allow_unused=True)
        return [None if t is None else t.double().cpu() for t in gs]
    want_g = pair_grads("reference", torch.float64, "cpu")
    got_g = pair_grads(backend, torch.float32, device)
    for a, r in zip(got_g, want_g):
        if r is None:
            assert a is None or not a.any()
            continue
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)
    for j, lj in enumerate(lens.tolist()):
        assert not got_g[1][j, lj:].any()


def half_pair_scores_within_twice_torch(backend, device, dtype, regulator, steps, attn_type, dims: Dims, seed: int,
                                       m: int = 64):
    """The pair list in half precision (the CUDA forward's paired form runs one pair per block,
    the grid GP pairs per block): an unsorted list of ``m`` pairs with repeats; the error of its
    scores against the float64 reference at most twice the torch backend's pair list in the same
    dtype, + 1e-4; finite, float32."""
    img, cap, lens = make_inputs(dims.n_i, dims.n_c, dims.R, dims.L, dims.d, torch.float32, seed)
    head = make_head(regulator, steps, attn_type, dims.d, dims.s, torch.float32, seed)
    g = torch.Generator().manual_seed(seed)
    ii, cc = torch.randint(0, dims.n_i, (m,), generator=g), torch.randint(0, dims.n_c, (m,), generator=g)
    ii[1::7], cc[1::7] = int(ii[0]), int(cc[0])
    want = _ref_scores(head, img, cap, lens, regulator, steps, attn_type)[ii, cc]
    h = copy.deepcopy(head).to(device=device, dtype=dtype)
    x, y = img.to(device, dtype), cap.to(device, dtype)
    with torch.no_grad():
        got = h.pair_scores(x, y, lens, ii.to(device), cc, backend=backend)
        base = h.pair_scores(x, y, lens, ii.to(device), cc, backend="torch")
    assert got.dtype == torch.float32 and got.shape == (m,)
    got, base = got.double().cpu(), base.double().cpu()
    assert torch.isfinite(got).all()
    err, err_torch = (got - want).abs().max().item(), (base - want).abs().max().item()
    assert err <= 2 * err_torch + 1e-4, (err, err_torch)


def rcr_op_matches_torch_step(backend: str, device, dtype, with_state: bool, atol: float, d: int = 300, s: int = 16,
                              B: int = 1):
    """The inference rcr op of ``backend`` (rcar_testutil.rcr_op: "cpp" and "cuda" the extension's,
    "triton" the Triton op, run by the interpreter on CPU tensors) on ``device`` against torch's
    RCR step on the same device in float64: F and lam within
    ``atol`` on every valid row, exactly zero on padded rows (which hold NaN in E, F and lam), NaN
    where a valid row's input holds one (rcr_op_case's nan_valid);
    by default d = 300 (two column passes of the element-wise kernel), s = 16, 35 rows (B x 35)."""
    args, want_F, want_lam, pad = rcr_op_case(B, d, s, with_state, lambda x: x.to(device, dtype), nan_valid=True)
    got_F, got_lam = rcr_op(backend)(*args)
    assert got_F.dtype == dtype and got_F.device.type == torch.device(device).type
    valid = ~pad
    assert want_F.isnan().any() and want_lam.isnan().any()
    torch.testing.assert_close(got_F[:, valid].double(), want_F[:, valid], rtol=0, atol=atol, equal_nan=True)
    torch.testing.assert_close(got_lam[:, valid].double(), want_lam[:, valid], rtol=0, atol=atol * 10, equal_nan=True)
    assert not got_F[:, pad].any() and not got_lam[:, pad].any()


def attention_128_row_cases(backend, device, dtype):
    """The backend's attention op with the projection on tests/test_cuda_emu.py's WG_CASES (the
    CUDA 128-row kernel's cases: context lengths 9 to 64, d 45 to 104, s 24 to 256, 128 pairs of
    one row, NaN in the padding, F and lam or not) against the fp64 reference, with the emulator's
    tolerances for dtype."""
    from rcar_fast.backends import kernel_set
    from test_cuda_emu import TOL, WG_CASES, _ref, wg_case_args
    ks = kernel_set(backend)
    for Lq, Lc, P, d, s, _ in WG_CASES:
        for with_state in (False, True):
            args = wg_case_args(dtype, Lq, Lc, P, d, s, with_state)
            out = ks.attention(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args], None)
            assert not out.isnan().any(), (Lq, Lc, with_state)
            torch.testing.assert_close(out.cpu().double(), _ref(args), **TOL[dtype])


def rar_128_row_cases(backend, device, dtype):
    """The backend's rar op on tests/test_cuda_emu.py's RAR_WG_CASES x RAR_WG_STEPS (the CUDA
    128-row RAR kernel's cases: 7 to 70 rows a pair, s 24 to 256, 128 pairs of one row, dropout
    masks, two steps, h given or not, NaN in the padding) against the fp64 reference, with the
    emulator's tolerances for dtype."""
    from rcar_fast.backends import kernel_set
    from test_cuda_emu import RAR_WG_CASES, RAR_WG_STEPS, TOL, rar_wg_case_args
    from test_fused_ops import ref_rar
    ks = kernel_set(backend)
    for Lq, P, s, _ in RAR_WG_CASES:
        for T, dropout, h_given in RAR_WG_STEPS:
            args = rar_wg_case_args(dtype, Lq, P, s, T, dropout, h_given)
            out = ks.rar(*[a.to(device) if isinstance(a, torch.Tensor) else a for a in args])
            want = ref_rar(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
            assert not out.isnan().any(), (Lq, s, T, dropout)
            torch.testing.assert_close(out.cpu().double(), want, **TOL[dtype])


def rar_scores_are_rar_then_the_layer(backend, device, dtype, cases=None):
    """The kernel set's rar_scores (RAR with the scoring layer in its last launch) against its rar
    then sigmoid(score_w . h + score_b) in torch, on tests/test_cuda_emu.py's RAR_WG_CASES (the
    CUDA 128-row RAR kernel's), T = 1 from the mean and T = 2 from a given h; a wrong scoring
    layer refused by name."""
    from rcar_fast.backends import kernel_set
    from test_cuda_emu import RAR_WG_CASES, rar_wg_case_args
    ks = kernel_set(backend)
    assert ks.rar_scores is not None, f"{backend}: no rar_scores"
    for Lq, P, s, _ in cases or RAR_WG_CASES:
        for T, h_given in ((1, False), (2, True)):
            args = [a.to(device) if isinstance(a, torch.Tensor) else a
                    for a in rar_wg_case_args(dtype, Lq, P, s, T, False, h_given)]
            g = torch.Generator().manual_seed(3 + s)
            sw, sb = (torch.randn(s, generator=g) * 0.5).to(device), torch.randn(1, generator=g).to(device)
            got = ks.rar_scores(*args[:9], sw, sb)
            want = torch.sigmoid(ks.rar(*args).float() @ sw + sb)
            assert got.dtype == torch.float32 and got.shape == want.shape and torch.isfinite(got).all()
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with pytest.raises((ValueError, RuntimeError), match="^score_w"):
        ks.rar_scores(*args[:9], sw[:-1], sb)


def context_gram_gives_the_same_attention(backend, device, dtype=torch.float32):
    """The backend's attention given its kernel set's context_gram (the Gram matrices the
    pipeline makes once for several calls) returns the output it makes alone, bit for bit, on the
    grid and in the paired form, with and without the projection (NaN in the padding of every
    input); a gram of the wrong shape is refused by name."""
    from rcar_fast.backends import kernel_set
    ks = kernel_set(backend)
    assert ks.context_gram is not None, f"{backend}: no context_gram"
    g = torch.Generator().manual_seed(13)
    P, Lq, B, Lc, d, s = 5, 9, 3, 36, 64, 24
    q = torch.randn(P, Lq, d, generator=g)
    c = torch.randn(B, Lc, d, generator=g)
    ql = torch.tensor([9, 1, 4, 7, 9], dtype=torch.int32)
    cl = torch.tensor([36, 1, 20], dtype=torch.int32)
    for p, n in enumerate(ql.tolist()):
        q[p, n:] = float("nan")
    for b, n in enumerate(cl.tolist()):
        c[b, n:] = float("nan")
    W, bias = torch.randn(s, d, generator=g) * 0.2, torch.randn(s, generator=g) * 0.1
    q, c, W, bias = (t.to(device, dtype) for t in (q, c, W, bias))
    ql, cl = ql.to(device), cl.to(device)
    cidx = torch.tensor([2, 0, 2, 1, 0], dtype=torch.int32, device=device)
    gram = ks.context_gram(c, cl)
    for w, b in ((None, None), (W, bias)):
        for ci in (None, cidx):
            alone = ks.attention(q, ql, c, cl, None, None, 4.0, w, b, ci)
            given = ks.attention(q, ql, c, cl, None, None, 4.0, w, b, ci, gram)
            assert not alone.isnan().any()
            assert torch.equal(given, alone), (w is not None, ci is not None)
    with pytest.raises((ValueError, RuntimeError), match=r"gram: "):
        ks.attention(q, ql, c, cl, None, None, 4.0, None, None, None, gram[:1])


def selftest_passes(backend, device, dtypes=None):
    """rcar_fast.selftest on ``device``: every dtype ``backend`` takes (or ``dtypes``) passes."""
    rows = rcar_fast.selftest(device, backends=[backend], dtypes=dtypes, quiet=True)
    assert rows, "nothing was self-tested"
    failed = [f"{r.dtype}: {r.failure}" for r in rows if not r.ok]
    assert not failed, failed


#: what a step may allocate beyond its budget, in bytes, besides the gradients it returns and
#: one scatter of them: workspaces of the compiled kernels, the scores, index tensors
MEMORY_SLACK = 2**20


def memory_within_budget(backend, device, attn_type, dims: Dims, budgets, dtype=torch.float32,
                         slack=MEMORY_SLACK):
    """Peak allocation of scoring and of a training step (forward + backward, coop_rcar T = 2)
    under each ``budgets`` (bytes) on a grid whose d-wide tensors are each 4x the budget or more:

      scoring   peak <= budget + slack
      training  peak - (gradients of img, cap and the parameters) <= budget + slack
                + 2 x bytes(img, cap, parameters)   (each block's backward scatters into
                full-size gradients of the inputs; autograd then adds them up)

    and the grid really is bigger than the budget (so the blocks are what keeps it down)."""
    from rcar_testutil import peak_bytes
    img, cap, lens = make_inputs(dims.n_i, dims.n_c, dims.R, dims.L, dims.d, dtype, 5)
    head = make_head("coop_rcar", 2, attn_type, dims.d, dims.s, dtype, 5).to(device)
    img, cap = img.to(device), cap.to(device)
    lq = dims.L if attn_type == "t2i" else dims.R
    wide = dims.n_i * dims.n_c * lq * dims.d * img.element_size()     # one d-wide pair-grid tensor
    inputs = sum(t.numel() * t.element_size() for t in [img, cap, *head.parameters()])
    for budget in budgets:
        assert wide >= 4 * budget, "the grid must dwarf the budget for this check to mean anything"
        with torch.no_grad():
            infer = peak_bytes(lambda: head(img, cap, lens, backend=backend, memory_budget=budget), device)
        assert infer <= budget + slack, f"scoring: peak {infer} B > budget {budget} + {slack}"
        x, y = img.clone().requires_grad_(), cap.clone().requires_grad_()
        head.zero_grad(set_to_none=True)
        train = peak_bytes(lambda: head(x, y, lens, backend=backend, memory_budget=budget).sum().backward(), device)
        grads = inputs    # the gradients of img, cap and every parameter, all kept
        limit = budget + slack + 2 * inputs
        assert train - grads <= limit, (f"training: peak {train} B - gradients {grads} B > budget {budget} "
                                        f"+ {slack} + 2 x inputs {inputs}")


def repeated_lengths(n_c: int, lengths=(5, 12, 20)):
    """Caption lengths cycling through ``lengths``: each length group holds n_c / len(lengths)
    captions, so the Triton forward's programs fill (GP = 4 at lengths up to 16, 2 up to 32)
    and each group ends in a partial program."""
    return [lengths[j % len(lengths)] for j in range(n_c)]

