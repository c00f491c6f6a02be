"""The "torch" backend against the ground truth (rcar_fast.reference), forward and backward,
for every regulator set-up and both directions, with NaN in every padded word."""

from __future__ import annotations

import math

import pytest
import torch

import rcar_fast
from rcar_fast import block_plan, ops, pipeline, reference
from rcar_fast.modules import RARModule, RCRModule
from rcar_testutil import (ATTN_TYPES, CONFIGS, NAN, grads, make_head, make_inputs, params_of,
                           query_mask, randomize_, seed_of)

D, S = 40, 16
DTYPE_TOL = [pytest.param(torch.float32, 1e-5, id="f32"), pytest.param(torch.float64, 1e-10, id="f64")]


def assert_close(actual, expected, tol, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- full scores

@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("regulator,steps", CONFIGS)
@pytest.mark.parametrize("dtype,tol", DTYPE_TOL)
def test_scores_match_reference(regulator, steps, attn_type, dtype, tol):
    seed = seed_of("scores", regulator, steps, attn_type, dtype)
    head = make_head(regulator, steps, attn_type, D, S, dtype, seed)
    img, cap, lens = make_inputs(4, 5, 6, 9, D, dtype, seed)
    assert int(lens.min()) == 1 and int(lens.max()) == 9
    p = params_of(head, detach=True)
    ref = reference.rcar_scores(img, cap, lens, p, regulator, steps, attn_type)
    assert ref.shape == (4, 5) and torch.isfinite(ref).all()
    assert float(ref.std()) > 1e-4, "degenerate test inputs: every score is the same"
    with torch.no_grad():   # the in-place inference path
        out_module = head(img, cap, lens, backend="torch")
        out_auto = head(img, cap, lens)
        out_ops = ops.rcar_scores(img, cap, lens, p, regulator, steps, attn_type, backend="torch")
        out_ref_ops = ops.rcar_scores(img, cap, lens, p, regulator, steps, attn_type, backend="reference")
    for name, out in (("module", out_module), ("auto", out_auto), ("ops", out_ops)):
        assert out.dtype == dtype
        assert torch.isfinite(out).all(), name
        assert_close(out, ref, tol, name)
    assert torch.equal(out_ref_ops, ref)
    # the autograd (out-of-place) path gives the same numbers
    out_grad_path = head(img, cap, lens, backend="torch")
    assert out_grad_path.requires_grad or (regulator == "only_rcr" and steps == 0)
    assert_close(out_grad_path.detach(), ref, tol, "autograd path")


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("regulator,steps", CONFIGS)
def test_gradients_match_reference(regulator, steps, attn_type):
    seed = seed_of("grads", regulator, steps, attn_type)
    head = make_head(regulator, steps, attn_type, D, S, torch.float64, seed)
    img, cap, lens = make_inputs(3, 5, 5, 7, D, torch.float64, seed)
    img.requires_grad_()
    cap.requires_grad_()
    names = [n for n, _ in head.named_parameters()]
    params = [p for _, p in head.named_parameters()]
    w = torch.rand(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) + 0.5

    out_t = head(img, cap, lens, backend="torch")
    g_t = grads(out_t, [img, cap, *params], w)
    out_r = reference.rcar_scores(img, cap, lens, dict(head.named_parameters()), regulator, steps,
                                  attn_type)
    g_r = grads(out_r, [img, cap, *params], w)
    assert_close(out_t.detach(), out_r.detach(), 1e-10, "scores")

    for name, a, b in zip(["img", "cap", *names], g_t, g_r):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0, f"{name}: unused by the reference"
            continue
        assert a is not None, f"{name}: no gradient from the torch backend"
        assert torch.isfinite(a).all(), f"{name}: non-finite gradient"
        assert_close(a, b, 1e-9, f"grad {name}")
    g_img, g_cap = g_t[0], g_t[1]
    assert torch.count_nonzero(g_img) > 0
    valid = torch.arange(7)[None, :] < lens[:, None]
    assert torch.all(g_cap[~valid] == 0), "gradient reached padded words"
    assert torch.count_nonzero(g_cap[valid]) > 0
    used = sum(int(g is not None and torch.count_nonzero(g) > 0) for g in g_t[2:])
    # only_rcr T = 0 (plain SCAN) uses no parameter at all; every other set-up uses several
    assert used >= (0 if (regulator == "only_rcr" and steps == 0) else 3)


def test_reference_sanity_unused_parameters():
    """only_rcr ignores sim_eval_w and has no RAR; only_rar T has one alv and T RAR modules."""
    h = make_head("only_rcr", 2, "t2i", D, S, torch.float64, 3)
    assert not [n for n in params_of(h) if n.startswith("rar_modules")]
    h = make_head("only_rar", 3, "i2t", D, S, torch.float64, 3)
    assert sorted({n.split(".")[1] for n in params_of(h) if n.startswith("alv_modules")}) == ["0"]
    assert sorted({n.split(".")[1] for n in params_of(h) if n.startswith("rar_modules")}) == ["0", "1", "2"]


# ----------------------------------------------------------------------------- an independent reading of SPEC.md

def _l2n(x):
    return x / (math.sqrt(float((x * x).sum())) + 1e-8)


def _lin(p, name, x):
    return p[name + ".weight"] @ x + p[name + ".bias"]


def _spec_attention(Q, C, Fm, lam):
    """SPEC.md's A(Q, C, F, lam) written with explicit loops. Fm (Lq, d), lam list of Lq."""
    Lq, Lc = Q.shape[0], C.shape[0]
    S = [[0.0] * Lq for _ in range(Lc)]
    for c in range(Lc):
        for q in range(Lq):
            v = float((C[c] * Fm[q] * Q[q]).sum())
            S[c][q] = v if v > 0 else 0.1 * v
    out = []
    for q in range(Lq):
        logits = []
        for c in range(Lc):
            norm = math.sqrt(sum(S[c][k] ** 2 for k in range(Lq)))
            logits.append(lam[q] * S[c][q] / (norm + 1e-8))
        m = max(logits)
        e = [math.exp(v - m) for v in logits]
        z = sum(e)
        U = sum((e[c] / z) * C[c] for c in range(Lc))
        out.append(_l2n(U))
    return out


def _spec_pair(Q, C, p, regulator, T, lam0):
    Lq, d = Q.shape
    Fm = [torch.ones(d, dtype=Q.dtype) for _ in range(Lq)]
    lam = [lam0] * Lq

    def alv(t, A):
        return [_l2n(_lin(p, f"alv_modules.{t}.sim_transform_w", (Q[q] - A[q]) ** 2)) for q in range(Lq)]

    def rcr(t, E):
        Fn, ln = [], []
        for q in range(Lq):
            m = _lin(p, f"rcr_modules.{t}.rcr_matrix_w.2",
                     torch.tanh(_lin(p, f"rcr_modules.{t}.rcr_matrix_w.0", E[q])))
            Fn.append(torch.clamp(torch.tanh(m) + Fm[q], -1.0, 1.0))
            sm = _lin(p, f"rcr_modules.{t}.rcr_smooth_w.2",
                      torch.tanh(_lin(p, f"rcr_modules.{t}.rcr_smooth_w.0", E[q])))
            ln.append(max(0.0, float(sm[0]) + lam[q]))
        return Fn, ln

    def rar(t, E, h):
        g = torch.tanh(_lin(p, f"rar_modules.{t}.rar_q_w.0", h))
        logits = [float(_lin(p, f"rar_modules.{t}.rar_v_w.0",
                             torch.tanh(_lin(p, f"rar_modules.{t}.rar_k_w.0", E[q])) * g)[0])
                  for q in range(Lq)]
        m = max(logits)
        e = [math.exp(v - m) for v in logits]
        z = sum(e)
        return _l2n(sum((e[q] / z) * E[q] for q in range(Lq)))

    def final(h):
        return 1.0 / (1.0 + math.exp(-float(_lin(p, "sim_eval_w", h)[0])))

    if regulator == "only_rar":
        E = alv(0, _spec_attention(Q, C, Fm, lam))
        h = sum(E) / Lq
        for t in range(T):
            h = rar(t, E, h)
        return final(h)
    if regulator == "only_rcr":
        for t in range(T):
            E = alv(t, _spec_attention(Q, C, Fm, lam))
            Fm, lam = rcr(t, E)
        A = _spec_attention(Q, C, Fm, lam)
        cos = [float((Q[q] * A[q]).sum()) / max(float(Q[q].norm() * A[q].norm()), 1e-8) for q in range(Lq)]
        return sum(cos) / Lq
    h = None
    for t in range(T):
        E = alv(t, _spec_attention(Q, C, Fm, lam))
        if t == 0:
            h = sum(E) / Lq
        if t < T - 1:
            Fm, lam = rcr(t, E)
        h = rar(t, E, h)
    return final(h)


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("regulator,steps", [("only_rar", 2), ("only_rcr", 0), ("only_rcr", 2),
                                             ("coop_rcar", 1), ("coop_rcar", 3)])
def test_both_backends_match_spec_written_out(regulator, steps, attn_type):
    seed = seed_of("spec", regulator, steps, attn_type)
    d, s = 7, 6
    head = make_head(regulator, steps, attn_type, d, s, torch.float64, seed)
    img, cap, lens = make_inputs(2, 3, 4, 4, d, torch.float64, seed, lens=[1, 4, 3])
    p = params_of(head, detach=True)
    lam0 = 10.0 if attn_type == "t2i" else 3.0
    expected = torch.empty(2, 3, dtype=torch.float64)
    for i in range(2):
        for j in range(3):
            words = cap[j, :int(lens[j])]
            Q, C = (words, img[i]) if attn_type == "t2i" else (img[i], words)
            expected[i, j] = _spec_pair(Q, C, p, regulator, steps, lam0)
    for backend in ("reference", "torch"):
        with torch.no_grad():
            out = ops.rcar_scores(img, cap, lens, p, regulator, steps, attn_type, backend=backend)
        assert_close(out, expected, 1e-10, backend)


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_smooth_is_used(attn_type):
    """An explicit smooth changes the first-step temperature, in both backends alike."""
    head = make_head("coop_rcar", 2, attn_type, D, S, torch.float64, 5, smooth=4.5)
    img, cap, lens = make_inputs(3, 4, 5, 6, D, torch.float64, 6)
    p = params_of(head, detach=True)
    with torch.no_grad():
        out = head(img, cap, lens, backend="torch")
        default = ops.rcar_scores(img, cap, lens, p, "coop_rcar", 2, attn_type, backend="torch")
    ref = reference.rcar_scores(img, cap, lens, p, "coop_rcar", 2, attn_type, smooth=4.5)
    assert_close(out, ref, 1e-10)
    assert not torch.allclose(out, default, atol=1e-6)
    ref_default = reference.rcar_scores(img, cap, lens, p, "coop_rcar", 2, attn_type)
    assert_close(default, ref_default, 1e-10)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_smooth_as_zero_dim_tensor(backend):
    """The argument checks accept a 0-d tensor for smooth (check_temperatures with shape ()); every
    backend must then give the same scores as the equal float."""
    head = make_head("coop_rcar", 2, "t2i", D, S, torch.float64, 8)
    img, cap, lens = make_inputs(2, 3, 5, 6, D, torch.float64, 9)
    p = params_of(head, detach=True)
    with torch.no_grad():
        as_float = ops.rcar_scores(img, cap, lens, p, smooth=6.0, backend=backend)
        as_tensor = ops.rcar_scores(img, cap, lens, p, smooth=torch.tensor(6.0, dtype=torch.float64),
                                    backend=backend)
    assert_close(as_tensor, as_float, 1e-12)


# ----------------------------------------------------------------------------- padding, odd sizes, blocks

@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("regulator,steps", [("only_rar", 2), ("only_rcr", 2), ("coop_rcar", 2)])
def test_padding_content_never_matters(regulator, steps, attn_type):
    seed = seed_of("pad", regulator, steps, attn_type)
    head = make_head(regulator, steps, attn_type, D, S, torch.float64, seed)
    outs = []
    for pad in (NAN, float("inf"), -float("inf"), 1e300, None):
        img, cap, lens = make_inputs(3, 5, 6, 8, D, torch.float64, seed, pad=pad)
        with torch.no_grad():
            outs.append(head(img, cap, lens, backend="torch"))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    assert torch.isfinite(outs[0]).all()


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("regulator,steps", [("only_rar", 2), ("only_rcr", 2), ("coop_rcar", 2)])
@pytest.mark.parametrize("n_i,n_c,R,L,d,s,lens", [
    (3, 4, 7, 5, 37, 10, None),            # d odd and not a power of two, R != 36
    (1, 1, 1, 1, 3, 2, [1]),               # one region, one one-word caption
    (2, 3, 36, 3, 24, 8, [3, 3, 3]),       # R = 36, no padding at all
    (5, 3, 2, 6, 29, 6, [1, 1, 1]),        # only one-word captions
    (2, 5, 3, 9, 11, 4, [9, 2, 7, 1, 5]),
])
def test_odd_sizes(regulator, steps, attn_type, n_i, n_c, R, L, d, s, lens):
    seed = seed_of("odd", regulator, steps, attn_type, n_i, n_c, R, L, d, s)
    head = make_head(regulator, steps, attn_type, d, s, torch.float64, seed)
    img, cap, lens = make_inputs(n_i, n_c, R, L, d, torch.float64, seed, lens=lens)
    p = params_of(head, detach=True)
    ref = reference.rcar_scores(img, cap, lens, p, regulator, steps, attn_type)
    with torch.no_grad():
        out = head(img, cap, lens, backend="torch")
    assert out.shape == (n_i, n_c)
    assert_close(out, ref, 1e-10)


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("regulator,steps", [("only_rar", 2), ("only_rcr", 2), ("coop_rcar", 2)])
def test_small_memory_budget_same_scores_and_grads(regulator, steps, attn_type, monkeypatch):
    seed = seed_of("budget", regulator, steps, attn_type)
    head = make_head(regulator, steps, attn_type, D, S, torch.float64, seed)
    img, cap, lens = make_inputs(4, 5, 6, 9, D, torch.float64, seed)
    calls = []
    real = block_plan.iter_blocks

    def counted(*a, **k):
        for blk in real(*a, **k):
            calls.append(1)
            yield blk
    monkeypatch.setattr(pipeline, "iter_blocks", counted)
    with torch.no_grad():
        full = head(img, cap, lens, backend="torch")
        n_default = len(calls)
        small = head(img, cap, lens, backend="torch", memory_budget=1)
        n_small = len(calls) - n_default
        mid = head(img, cap, lens, backend="torch", memory_budget=3 * 9 * D * 8 * 4)
    assert n_small > n_default and n_small >= 4, (n_default, n_small)
    assert_close(small, full, 1e-12, "budget=1")
    assert_close(mid, full, 1e-12, "budget=mid")
    ref = reference.rcar_scores(img, cap, lens, params_of(head, True), regulator, steps, attn_type)
    assert_close(small, ref, 1e-10, "budget=1 vs reference")
    # gradients too
    img.requires_grad_()
    w = torch.rand(4, 5, dtype=torch.float64)
    g_full = grads(head(img, cap, lens, backend="torch"), [img], w)[0]
    g_small = grads(head(img, cap, lens, backend="torch", memory_budget=1), [img], w)[0]
    assert_close(g_small, g_full, 1e-12, "grad img, budget=1")


def test_inputs_not_modified():
    """The in-place inference path must not write into the caller's tensors."""
    for attn_type in ATTN_TYPES:
        head = make_head("coop_rcar", 3, attn_type, D, S, torch.float64, 11)
        img, cap, lens = make_inputs(3, 4, 5, 6, D, torch.float64, 12)
        img0, cap0, lens0 = img.clone(), cap.clone(), lens.clone()
        p0 = {k: v.clone() for k, v in params_of(head, True).items()}
        with torch.no_grad():
            head(img, cap, lens, backend="torch")
            ops.adaptive_attention(img, cap, lens, attn_type=attn_type, backend="torch")
        assert torch.equal(img, img0)
        assert torch.equal(cap, cap0) or torch.equal(cap.nan_to_num(7.0), cap0.nan_to_num(7.0))
        assert torch.isnan(cap).sum() == torch.isnan(cap0).sum()
        assert torch.equal(lens, lens0)
        for k, v in params_of(head, True).items():
            assert torch.equal(v, p0[k]), k


# ----------------------------------------------------------------------------- the pieces

N_I, N_C, R_, L_ = 3, 4, 5, 6


def _piece_inputs(attn_type, seed, dtype=torch.float64, with_factors=False, tensor_temps=False):
    img, cap, lens = make_inputs(N_I, N_C, R_, L_, D, dtype, seed)
    Lq = L_ if attn_type == "t2i" else R_
    qm = query_mask(N_I, lens, Lq, attn_type)
    gen = torch.Generator().manual_seed(seed + 1)
    factors = temps = None
    if with_factors:
        factors = (torch.rand(N_I, N_C, Lq, D, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
        factors[~qm] = NAN
    if tensor_temps:
        temps = (torch.rand(N_I, N_C, Lq, generator=gen, dtype=torch.float64) * 11 + 1).to(dtype)
        temps[~qm] = NAN
    else:
        temps = 4.0 if attn_type == "t2i" else 2.5
    return img, cap, lens, qm, factors, temps


def _check_piece(out_t, out_r, qm, tol, what):
    """Torch vs reference at valid query rows; the torch output exactly zero at padded rows."""
    assert out_t.shape == out_r.shape, what
    assert torch.isfinite(out_t).all(), f"{what}: non-finite output"
    assert_close(out_t[qm], out_r[qm], tol, what)
    assert torch.all(out_t[~qm] == 0), f"{what}: padded query rows not zero"


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("with_factors", [False, True], ids=["F=None", "F=tensor"])
@pytest.mark.parametrize("tensor_temps", [False, True], ids=["lam=float", "lam=tensor"])
def test_adaptive_attention_matches_reference(attn_type, with_factors, tensor_temps):
    seed = seed_of("aa", attn_type, with_factors, tensor_temps)
    img, cap, lens, qm, factors, temps = _piece_inputs(attn_type, seed, with_factors=with_factors,
                                                       tensor_temps=tensor_temps)
    kw = dict(factors=factors, temperatures=temps, attn_type=attn_type)
    with torch.no_grad():
        out_t = ops.adaptive_attention(img, cap, lens, backend="torch", **kw)
    out_r = ops.adaptive_attention(img, cap, lens, backend="reference", **kw)
    Lq = L_ if attn_type == "t2i" else R_
    assert out_t.shape == (N_I, N_C, Lq, D)
    _check_piece(out_t, out_r, qm, 1e-10, "adaptive_attention")
    norms = torch.linalg.vector_norm(out_t[qm], dim=-1)
    assert_close(norms, torch.ones_like(norms), 1e-6, "l2n of the output")


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_adaptive_attention_default_temperature(attn_type):
    img, cap, lens, qm, _, _ = _piece_inputs(attn_type, seed_of("aa-def", attn_type))
    lam0 = 10.0 if attn_type == "t2i" else 3.0
    for backend in ("torch", "reference"):
        with torch.no_grad():
            a = ops.adaptive_attention(img, cap, lens, attn_type=attn_type, backend=backend)
            b = ops.adaptive_attention(img, cap, lens, temperatures=lam0, attn_type=attn_type, backend=backend)
            c = ops.adaptive_attention(img, cap, lens, temperatures=lam0 + 2, attn_type=attn_type, backend=backend)
        assert torch.equal(a, b), backend
        assert not torch.allclose(a[qm], c[qm]), backend


def test_adaptive_attention_float32():
    img, cap, lens, qm, factors, temps = _piece_inputs("t2i", 21, torch.float32, True, True)
    out_t = ops.adaptive_attention(img, cap, lens, factors, temps, "t2i", backend="torch")
    out_r = ops.adaptive_attention(img, cap, lens, factors, temps, "t2i", backend="reference")
    assert out_t.dtype == torch.float32
    _check_piece(out_t.detach(), out_r, qm, 1e-5, "adaptive_attention f32")


def _alv_weights(seed, dtype=torch.float64, s=S, d=D):
    gen = torch.Generator().manual_seed(seed)
    r = math.sqrt(6.0 / (s + d))
    w = ((torch.rand(s, d, generator=gen, dtype=torch.float64) * 2 - 1) * r).to(dtype)
    b = (torch.randn(s, generator=gen, dtype=torch.float64) * 0.2).to(dtype)
    return w, b


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("with_factors", [False, True], ids=["F=None", "F=tensor"])
@pytest.mark.parametrize("tensor_temps", [False, True], ids=["lam=float", "lam=tensor"])
def test_alignment_matches_reference(attn_type, with_factors, tensor_temps):
    seed = seed_of("alv", attn_type, with_factors, tensor_temps)
    img, cap, lens, qm, factors, temps = _piece_inputs(attn_type, seed, with_factors=with_factors,
                                                       tensor_temps=tensor_temps)
    w, b = _alv_weights(seed)
    kw = dict(factors=factors, temperatures=temps, attn_type=attn_type)
    with torch.no_grad():
        out_t = ops.alignment(img, cap, lens, w, b, backend="torch", **kw)
    out_r = ops.alignment(img, cap, lens, w, b, backend="reference", **kw)
    Lq = L_ if attn_type == "t2i" else R_
    assert out_t.shape == (N_I, N_C, Lq, S)
    _check_piece(out_t, out_r, qm, 1e-10, "alignment")


def _random_module_weights(module, seed):
    randomize_(module, seed)
    return {k: v.detach().double() for k, v in module.state_dict().items()}


def _E_with_nan(attn_type, seed, s=S):
    _, _, lens = make_inputs(N_I, N_C, R_, L_, 2, torch.float64, seed)
    Lq = L_ if attn_type == "t2i" else R_
    qm = query_mask(N_I, lens, Lq, attn_type)
    gen = torch.Generator().manual_seed(seed + 7)
    E = torch.nn.functional.normalize(torch.randn(N_I, N_C, Lq, s, generator=gen, dtype=torch.float64), dim=-1)
    E[~qm] = NAN
    return E, lens, qm, Lq, gen


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("with_factors", [False, True], ids=["F=None", "F=tensor"])
@pytest.mark.parametrize("tensor_temps", [False, True], ids=["lam=float", "lam=tensor"])
def test_rcr_update_matches_reference(attn_type, with_factors, tensor_temps):
    seed = seed_of("rcr", attn_type, with_factors, tensor_temps)
    E, lens, qm, Lq, gen = _E_with_nan(attn_type, seed)
    weights = _random_module_weights(RCRModule(D, S), seed)
    factors = None
    temps = 10.0
    if with_factors:
        factors = torch.rand(N_I, N_C, Lq, D, generator=gen, dtype=torch.float64) * 2 - 1
        factors[~qm] = NAN
    if tensor_temps:
        temps = torch.rand(N_I, N_C, Lq, generator=gen, dtype=torch.float64) * 2 - 0.5   # some relu'd
        temps[~qm] = NAN
    with torch.no_grad():
        F_t, lam_t = ops.rcr_update(E, factors, temps, lens, weights, attn_type, backend="torch")
    F_r, lam_r = ops.rcr_update(E, factors, temps, lens, weights, attn_type, backend="reference")
    assert F_t.shape == (N_I, N_C, Lq, D) and lam_t.shape == (N_I, N_C, Lq)
    _check_piece(F_t, F_r, qm, 1e-10, "rcr factors")
    _check_piece(lam_t, lam_r, qm, 1e-10, "rcr temperatures")
    assert F_t[qm].abs().max() <= 1.0 and lam_t.min() >= 0


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("with_h", [False, True], ids=["h=None", "h=tensor"])
@pytest.mark.parametrize("dtype,tol", DTYPE_TOL)
def test_rar_update_matches_reference(attn_type, with_h, dtype, tol):
    seed = seed_of("rar", attn_type, with_h, dtype)
    E, lens, qm, Lq, gen = _E_with_nan(attn_type, seed)
    weights = {k: v.to(dtype) for k, v in _random_module_weights(RARModule(S), seed).items()}
    h = torch.nn.functional.normalize(torch.randn(N_I, N_C, S, generator=gen, dtype=torch.float64), dim=-1)
    h = h.to(dtype) if with_h else None
    E = E.to(dtype)
    with torch.no_grad():
        out_t = ops.rar_update(E, h, lens, weights, attn_type, backend="torch")
    out_r = ops.rar_update(E, h, lens, weights, attn_type, backend="reference")
    assert out_t.shape == (N_I, N_C, S) and out_t.dtype == dtype
    assert torch.isfinite(out_t).all()
    assert_close(out_t, out_r, tol, "rar_update")
    if with_h:   # h matters through the query vector g
        with torch.no_grad():
            other = ops.rar_update(E, None, lens, weights, attn_type, backend="torch")
        assert not torch.allclose(other, out_t, atol=1e-6)


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_pieces_compose_to_scores(attn_type):
    """coop_rcar T = 2 assembled from the ops equals rcar_scores (torch backend)."""
    head = make_head("coop_rcar", 2, attn_type, D, S, torch.float64, 31)
    img, cap, lens = make_inputs(N_I, N_C, R_, L_, D, torch.float64, 32)
    p = params_of(head, True)
    Lq = L_ if attn_type == "t2i" else R_
    qm = query_mask(N_I, lens, Lq, attn_type)
    sub = lambda prefix: {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}
    with torch.no_grad():
        E0 = ops.alignment(img, cap, lens, p["alv_modules.0.sim_transform_w.weight"],
                           p["alv_modules.0.sim_transform_w.bias"], attn_type=attn_type, backend="torch")
        h = ops.rar_update(E0, None, lens, sub("rar_modules.0."), attn_type, backend="torch")
        Fm, lam = ops.rcr_update(E0, None, None, lens, sub("rcr_modules.0."), attn_type, backend="torch")
        Fm[~qm] = NAN     # padded rows may hold anything
        lam = lam.masked_fill(~qm, NAN)
        E1 = ops.alignment(img, cap, lens, p["alv_modules.1.sim_transform_w.weight"],
                           p["alv_modules.1.sim_transform_w.bias"], Fm, lam, attn_type, backend="torch")
        h = ops.rar_update(E1, h, lens, sub("rar_modules.1."), attn_type, backend="torch")
        scores = torch.sigmoid(h @ p["sim_eval_w.weight"].t() + p["sim_eval_w.bias"]).squeeze(-1)
        full = ops.rcar_scores(img, cap, lens, p, "coop_rcar", 2, attn_type, backend="torch")
    assert_close(scores, full, 1e-12)


# -- gradients through the pieces, NaN at padded query rows of every per-position input

@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("piece", ["adaptive_attention", "alignment"])
def test_piece_gradients_match_reference(piece, attn_type):
    seed = seed_of("piece-grad", piece, attn_type)
    img, cap, lens, qm, factors, temps = _piece_inputs(attn_type, seed, with_factors=True, tensor_temps=True)
    w, b = _alv_weights(seed)
    leaves = [x.requires_grad_() for x in (img, cap, factors, temps, w, b)]
    names = ["img", "cap", "factors", "temperatures", "weight", "bias"]

    def run(backend):
        if piece == "adaptive_attention":
            return ops.adaptive_attention(img, cap, lens, factors, temps, attn_type, backend=backend)
        return ops.alignment(img, cap, lens, w, b, factors, temps, attn_type, backend=backend)

    gen = torch.Generator().manual_seed(seed)
    out_r = run("reference")
    wts = torch.rand(out_r.shape, generator=gen, dtype=torch.float64)
    g_r = grads(out_r, leaves, wts)
    g_t = grads(run("torch"), leaves, wts)
    for name, a, b_ in zip(names, g_t, g_r):
        if b_ is None:
            assert a is None or torch.count_nonzero(a) == 0, name
            continue
        assert torch.isfinite(a).all(), f"{piece}: non-finite gradient of {name} ({attn_type})"
        assert_close(a, b_, 1e-9, f"{piece}: grad {name}")


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_update_gradients_match_reference(attn_type):
    seed = seed_of("upd-grad", attn_type)
    E, lens, qm, Lq, gen = _E_with_nan(attn_type, seed)
    factors = torch.rand(N_I, N_C, Lq, D, generator=gen, dtype=torch.float64) * 2 - 1
    factors[~qm] = NAN
    temps = torch.rand(N_I, N_C, Lq, generator=gen, dtype=torch.float64) * 5 + 1
    temps[~qm] = NAN
    h = torch.nn.functional.normalize(torch.randn(N_I, N_C, S, generator=gen, dtype=torch.float64), dim=-1)
    rcr_w = {k: v.requires_grad_() for k, v in _random_module_weights(RCRModule(D, S), seed).items()}
    rar_w = {k: v.requires_grad_() for k, v in _random_module_weights(RARModule(S), seed).items()}
    for x in (E, factors, temps, h):
        x.requires_grad_()
    wF = torch.rand(N_I, N_C, Lq, D, generator=gen, dtype=torch.float64)
    wl = torch.rand(N_I, N_C, Lq, generator=gen, dtype=torch.float64)
    wh = torch.rand(N_I, N_C, S, generator=gen, dtype=torch.float64)
    leaves = [E, factors, temps, h, *rcr_w.values(), *rar_w.values()]
    names = ["E", "factors", "temperatures", "h", *rcr_w, *rar_w]

    def loss(backend):
        Fm, lam = ops.rcr_update(E, factors, temps, lens, rcr_w, attn_type, backend=backend)
        h1 = ops.rar_update(E, h, lens, rar_w, attn_type, backend=backend)
        h0 = ops.rar_update(E, None, lens, rar_w, attn_type, backend=backend)
        return (Fm * wF).sum() + (lam * wl).sum() + (h1 * wh).sum() + (h0 * wh.flip(-1)).sum()

    g_r = torch.autograd.grad(loss("reference"), leaves, allow_unused=True)
    g_t = torch.autograd.grad(loss("torch"), leaves, allow_unused=True)
    for name, a, b in zip(names, g_t, g_r):
        assert a is not None and b is not None, name
        assert torch.isfinite(a).all(), f"non-finite gradient of {name}"
        assert_close(a, b, 1e-9, f"grad {name}")


# ----------------------------------------------------------------------------- training mode

@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("regulator,steps", [("only_rar", 2), ("coop_rcar", 1), ("coop_rcar", 2)])
def test_dropout_active_only_in_training(regulator, steps, attn_type):
    seed = seed_of("train", regulator, steps, attn_type)
    head = make_head(regulator, steps, attn_type, D, S, torch.float64, seed)
    img, cap, lens = make_inputs(3, 4, 5, 7, D, torch.float64, seed)
    head.train()
    torch.manual_seed(1)
    a = head(img, cap, lens, backend="torch")
    torch.manual_seed(1)
    b = head(img, cap, lens, backend="torch")
    torch.manual_seed(2)
    c = head(img, cap, lens, backend="torch")
    assert torch.equal(a, b), "same seed, different dropout"
    assert not torch.allclose(a, c, atol=1e-6), "dropout inactive in training mode"
    # backward works in training mode
    img.requires_grad_()
    torch.manual_seed(3)
    out = head(img, cap, lens, backend="torch")
    out.sum().backward()
    assert torch.isfinite(img.grad).all() and torch.count_nonzero(img.grad) > 0
    for n, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    head.eval()
    with torch.no_grad():
        e1 = head(img, cap, lens, backend="torch")
        e2 = head(img, cap, lens, backend="torch")
    assert torch.equal(e1, e2)
    assert not torch.allclose(a.detach(), e1, atol=1e-6)
    ref = reference.rcar_scores(img.detach(), cap, lens, params_of(head, True), regulator, steps,
                                attn_type, training=False)
    assert_close(e1, ref, 1e-10)


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
def test_only_rcr_has_no_dropout(attn_type):
    head = make_head("only_rcr", 2, attn_type, D, S, torch.float64, 41)
    img, cap, lens = make_inputs(3, 4, 5, 7, D, torch.float64, 42)
    with torch.no_grad():
        e = head(img, cap, lens, backend="torch")
        head.train()
        torch.manual_seed(5)
        t = head(img, cap, lens, backend="torch")
    assert_close(t, e, 1e-12)


def test_reference_dropout_is_seeded():
    head = make_head("coop_rcar", 2, "t2i", D, S, torch.float64, 51)
    img, cap, lens = make_inputs(3, 4, 5, 7, D, torch.float64, 52)
    p = params_of(head, True)
    runs = []
    for s in (1, 1, 2):
        torch.manual_seed(s)
        runs.append(reference.rcar_scores(img, cap, lens, p, "coop_rcar", 2, "t2i", training=True))
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2], atol=1e-6)


@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("regulator,steps", [("only_rar", 3), ("coop_rcar", 2)])
def test_training_dropout_placement_matches_reference(regulator, steps, attn_type):
    """With RAR's keep-masks fixed (a function of the pair, position and feature indices,
    rcar_fast.dropout.fixed_keep_masks), training-mode scores of the torch backend and the
    reference agree: dropout sits on the same tensors (K and g), step by step, with the
    module's rate; and the masks are asked for once per RAR step, steps 0..T-1."""
    from rcar_fast import dropout
    from rcar_testutil import index_keep_masks
    steps_seen = []

    def source(step, *args):
        steps_seen.append(step)
        return index_keep_masks(step, *args)
    seed = seed_of("keyed", regulator, steps, attn_type)
    head = make_head(regulator, steps, attn_type, D, S, torch.float64, seed)
    assert all(m.p == dropout.RAR_DROPOUT for m in head.modules() if isinstance(m, torch.nn.Dropout))
    img, cap, lens = make_inputs(3, 4, 5, 7, D, torch.float64, seed)
    head.train()
    with torch.no_grad(), dropout.fixed_keep_masks(source):
        out_t = head(img, cap, lens, backend="torch")
        assert sorted(set(steps_seen)) == list(range(steps)), steps_seen
        steps_seen.clear()
        out_r = reference.rcar_scores(img, cap, lens, params_of(head, True), regulator, steps, attn_type,
                                      training=True)
    assert sorted(set(steps_seen)) == list(range(steps)), steps_seen
    assert_close(out_t, out_r, 1e-10)
    head.eval()
    with torch.no_grad():
        out_e = head(img, cap, lens, backend="torch")
    assert not torch.allclose(out_e, out_t, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpp"])
@pytest.mark.parametrize("attn_type", ATTN_TYPES)
@pytest.mark.parametrize("regulator,steps", [("only_rar", 2), ("only_rcr", 2), ("coop_rcar", 3)])
def test_padded_blocks_match_reference(regulator, steps, attn_type, backend, monkeypatch):
    """The planner groups captions by exact length, so blocks normally carry no padding: force
    one group of mixed lengths (NaN padding inside every block) and compare with the reference."""
    import rcar_fast.block_plan as plan
    if backend not in rcar_fast.available_backends("cpu"):
        pytest.skip(f"{backend} unavailable")
    monkeypatch.setattr(plan, "plan_caption_groups", lambda lens, max_waste=0.0: [list(range(len(lens)))])
    dtype = torch.float32 if backend == "triton" else torch.float64
    img, cap, lens = make_inputs(3, 5, 6, 7, 24, dtype, seed_of("padded", regulator, steps, attn_type))
    head = make_head(regulator, steps, attn_type, 24, 8, dtype, 3)
    with torch.no_grad():
        want = reference.rcar_scores(img.double(), cap.double(), lens,
                                     {k: v.double() for k, v in params_of(head).items()},
                                     regulator, steps, attn_type)
        got = head(img, cap, lens, backend=backend)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-10 if dtype == torch.float64 else 2e-6)
